"""Mounts inside the cell: fresh tmpfs, bind mounts, and a root filesystem to pivot into.

Every one of these options implies ``-m``, and ``/`` is made recursively private before any of
them is mounted, so they all live in the cell's own mount namespace: none shows on the host, and
all vanish with the namespace when its last process exits. There is nothing to clean up, and
nsmagic never creates anything on the host; that is why every destination must already exist
(as with ``mount(8)``), on the host or, with ``--rootfs``, in the root filesystem.

Mounts are made parents first (by the depth of their destination), so ``--tmpfs /mnt`` does not
hide a bind on ``/mnt/x``. A bind is recursive (``--rbind``), as bubblewrap's is; a read-only
bind is then remounted ``MS_BIND|MS_REMOUNT|MS_RDONLY``, every mount of the bound tree, keeping
the ``nosuid``/``nodev``/``noexec`` flags each already had: inside a user namespace those flags
are locked, and a remount that drops one is refused.

``--rootfs DIR`` follows bubblewrap and runc. DIR is bind-mounted on itself (pivot_root(2) wants
a mount point); a fresh ``/proc`` and a small ``/dev`` are mounted in it, then the cell's binds
and tmpfs, whose destinations are paths inside DIR (symbolic links resolved as if DIR were
``/``); then runc's ``chdir(DIR); pivot_root(".", "."); umount2(".", MNT_DETACH)``. That form
needs no ``put_old`` directory inside DIR, so DIR is never written to and may be read-only or
owned by someone else. glibc has no pivot_root wrapper, so it is called through ``syscall()``
with the number of the running architecture, from the kernel's syscall tables; on an
architecture not in the table ``--rootfs`` is refused rather than guessed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass

from .. import mountinfo, syscalls
from ..errors import OptionError, StepFailed
from ..shell import fit_shell, preload
from ..spec import Namespaces
from ..steps import do
from .base import Part

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_NOSYMFOLLOW = 0x100
MS_BIND = 0x1000
MNT_DETACH = 2
_ST_NOSYMFOLLOW = 0x2000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

#: pivot_root(2)'s number by ``uname -m``, with the pointer size of the process that ABI has
#: (a 32-bit Python on a 64-bit kernel uses another table, and is refused instead).
_PIVOT_ROOT = {
    "x86_64": (64, 155), "i386": (32, 217), "i486": (32, 217), "i586": (32, 217), "i686": (32, 217),
    "aarch64": (64, 41), "armv6l": (32, 218), "armv7l": (32, 218), "armv8l": (32, 218),
    "ppc64le": (64, 203), "ppc64": (64, 203), "ppc": (32, 203), "s390x": (64, 217),
    "riscv64": (64, 41), "loongarch64": (64, 41),
}

#: Host devices bound into the ``/dev`` of a root filesystem (bubblewrap's ``--dev`` set).
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
#: Mount flags a read-only remount must keep (statvfs reports them with the same bits).
_KEPT = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC
_TMPFS_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV


@dataclass
class _Mount:
    kind: str           # "tmpfs", "bind" or "ro-bind"
    source: str | None  # a host path
    target: str         # where to mount, as the child sees it before pivoting, symlinks resolved
    shown: str          # the destination in the words of the cell (inside the new root)


class Mounts(Part):
    """``--tmpfs``, ``--bind``, ``--ro-bind`` and ``--rootfs``."""

    def __init__(self, spec: Namespaces):
        self.spec = spec
        self.root: str | None = None
        #: The root filesystem's /proc and /dev, resolved inside it.
        self.proc = self.dev = ""
        self.mounts: list[_Mount] = []
        self.devices: list[str] = []
        self.pivot_nr = 0

    # -- the kernel's side ------------------------------------------------------------------

    def check(self) -> None:
        if self.spec.rootfs is not None:
            self.root, self.proc, self.dev = _check_rootfs(self.spec.rootfs)
            self.pivot_nr = _pivot_root_number()
            self.devices = [name for name in _DEVICES if os.path.exists(f"/dev/{name}")]
        for directory in _listed("--tmpfs", self.spec.tmpfs):
            self.mounts.append(self._tmpfs(directory))
        for option, values in (("--bind", self.spec.bind), ("--ro-bind", self.spec.ro_bind)):
            for value in _listed(option, values):
                if not (option == "--bind" and self._binds_root_on_itself(value)):
                    self.mounts.append(self._bind(option, value))
        self.mounts.sort(key=lambda m: m.target.rstrip("/").count("/"))

    def prepare(self) -> None:
        if self.root is not None:
            preload()

    def _tmpfs(self, directory) -> _Mount:
        option = f"--tmpfs {directory}"
        if not isinstance(directory, str) or not directory:
            raise OptionError("--tmpfs needs a directory")
        target, shown = self._destination(option, directory)
        if not stat.S_ISDIR(_stat(option, target, f"the destination {shown}", self.root).st_mode):
            raise OptionError(f"{option}: {shown} is not a directory; a tmpfs is mounted on a directory")
        return _Mount("tmpfs", None, target, shown)

    def _binds_root_on_itself(self, value) -> bool:
        """``--bind /:/`` with no ``--rootfs`` (bubblewrap's ``--bind / /``): the cell's root
        already is the host's, with every mount under it, which is what a recursive bind of /
        would give; so it is accepted and nothing is mounted. (A mount over / would not even be
        seen: a process's root stays the mount it had, under anything stacked on it.)"""
        return (self.spec.rootfs is None and isinstance(value, str) and value.count(":") == 1
                and all(part and os.path.realpath(part) == "/" for part in value.split(":")))

    def _bind(self, flag: str, value) -> _Mount:
        if not isinstance(value, str) or value.count(":") != 1 or value.startswith(":") or value.endswith(":"):
            raise OptionError(f"{flag} {value}: expected SRC:DST, two paths joined by one ':', "
                              f"e.g. {flag} /srv/data:/mnt")
        option = f"{flag} {value}"
        src, dst = value.split(":")
        source = os.path.realpath(src)
        src_mode = _stat(option, source, f"the source {src}", None).st_mode
        target, shown = self._destination(option, dst)
        dst_mode = _stat(option, target, f"the destination {shown}", self.root).st_mode
        if stat.S_ISDIR(src_mode) != stat.S_ISDIR(dst_mode):
            what = ("a directory", "not") if stat.S_ISDIR(src_mode) else ("not a directory", "one")
            raise OptionError(f"{option}: the source is {what[0]} but the destination is {what[1]}; "
                              "a directory binds onto a directory, a file onto a file")
        return _Mount(flag[2:], source, target, shown)

    def _destination(self, option: str, path: str) -> tuple[str, str]:
        """Where to mount *path*: on the host, or inside the root filesystem (bubblewrap's rule:
        a destination is a path of the container, relative ones from its ``/``)."""
        if self.root is None:
            target = os.path.realpath(path)
            shown = target
        else:
            shown = os.path.normpath(os.path.join("/", path))
            target = _in_root(option, self.root, shown)
        if target == (self.root or "/"):
            raise OptionError(f"{option}: cannot mount over /; to give the cell another root "
                              "filesystem, use --rootfs DIR")
        return target, shown

    def explain(self) -> list[str]:
        lines = []
        root = self.root
        if root is not None:
            lines += [f"mount --rbind {root} {root}   (pivot_root(2) needs a mount point)",
                      f"mount -t proc proc {self.proc}   (the host's /proc bound instead if Linux "
                      "refuses a fresh one: a user namespace without -p)",
                      f"mount -t tmpfs tmpfs {self.dev}; bind /dev/{{{','.join(self.devices)}}} into it; "
                      f"mount -t devpts devpts {self.dev}/pts"]
        for m in self.mounts:
            if m.kind == "tmpfs":
                lines.append(f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {m.target}")
            else:
                lines.append(f"mount --rbind {m.source} {m.target}")
                if m.kind == "ro-bind":
                    lines.append(f"mount -o remount,bind,ro {m.target}   (and each mount under it, "
                                 "keeping nosuid/nodev/noexec)")
        if root is not None:
            lines.append(f"cd {root}; pivot_root . .; umount -l .; cd /   (the host's files are gone)")
        return lines

    # -- the cell's side --------------------------------------------------------------------

    def inside(self) -> None:
        root = self.root
        if root is not None:
            _step(f"mount --rbind {root} {root}", syscalls.mount, root, root, None, MS_BIND | syscalls.MS_REC)
            _mount_proc(self.proc)
            _mount_dev(self.dev, self.devices)
        for m in self.mounts:
            if m.kind == "tmpfs":
                _step(f"mount -t tmpfs tmpfs {m.shown}", syscalls.mount, "tmpfs", m.target, "tmpfs",
                      _TMPFS_FLAGS, "mode=1777")
            else:
                _bind_mount(m)
        if root is not None:
            _pivot(root, self.pivot_nr)
            fit_shell()


# -- checks, in the kernel -----------------------------------------------------------------

def _listed(option: str, values) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise OptionError(f"{option}: expected a list of values, not {values!r}")
    return list(values)


def _stat(option: str, path: str, what: str, root: str | None) -> os.stat_result:
    where = "" if root is None else f" in the root filesystem {root}"
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        hint = "; nsmagic mounts only on paths that exist, create it first" if what.startswith("the dest") else ""
        raise OptionError(f"{option}: {what} does not exist{where}{hint}") from None
    except PermissionError:
        raise OptionError(f"{option}: {what}{where} cannot be reached by uid {os.geteuid()} (permission "
                          "denied); make it and its parent directories searchable (chmod o+x)") from None


def _check_rootfs(value) -> tuple[str, str, str]:
    """The root filesystem's real path, and those of its /proc and /dev."""
    option = f"--rootfs {value}"
    if not isinstance(value, str) or not value:
        raise OptionError("--rootfs needs the directory of a root filesystem")
    root = os.path.realpath(value)
    if not stat.S_ISDIR(_stat(option, root, root, None).st_mode):
        raise OptionError(f"{option}: {root} is not a directory")
    if root == "/":
        raise OptionError(f"{option}: that is the host's own root; give the directory of a prepared "
                          "root filesystem (an unpacked Alpine minirootfs, a debootstrap)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise OptionError(f"{option}: uid {os.geteuid()} cannot read it; make it readable and "
                          "searchable (chmod 755)")
    found = []
    for sub in ("proc", "dev"):
        found.append(_in_root(option, root, f"/{sub}"))
        if not os.path.isdir(found[-1]):
            raise OptionError(f"{option}: it has no /{sub} directory to mount on, so it does not look "
                              f"like a root filesystem (if it is one, mkdir {value.rstrip('/')}/{sub})")
    return root, found[0], found[1]


def _in_root(option: str, root: str, path: str) -> str:
    """The host path of *path* inside the tree at *root*, following symbolic links as if *root*
    were ``/``, as the kernel will after pivot_root: ``/var/run -> /run`` stays inside."""
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while todo:
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        try:
            link = os.readlink(os.path.join(root, *done, name))
        except OSError:  # not a link, or missing: os.stat will say which
            done.append(name)
            continue
        links += 1
        if links > 40:
            raise OptionError(f"{option}: too many levels of symbolic links in {path} inside {root}")
        if link.startswith("/"):
            done = []
        todo[:0] = [p for p in link.split("/") if p]
    return os.path.join(root, *done)


def _pivot_root_number() -> int:
    machine = os.uname().machine
    bits = ctypes.sizeof(ctypes.c_void_p) * 8
    known = _PIVOT_ROOT.get(machine)
    if known is None or known[0] != bits:
        raise OptionError(f"--rootfs: nsmagic does not know the pivot_root(2) system call number of "
                          f"{machine} for a {bits}-bit process, and will not guess it; "
                          "--rootfs cannot be used on this machine")
    return known[1]


# -- mounting, in the child ----------------------------------------------------------------

_HINTS = {
    errno.EPERM: " (mounting needs privilege in the mount namespace; -r gives it without root)",
    errno.ENOENT: " (a destination inside another of the cell's mounts must exist there)",
    errno.EOVERFLOW: " (the cell's uid is not mapped in its user namespace; add -r)",
}


def _step(step: str, fn, *args) -> None:
    """One mount step; :meth:`Mounts.explain` lists them from the kernel, so they are not recorded."""
    do(step, fn, *args, hints=_HINTS, explained=False)


def _bind_mount(m: _Mount) -> None:
    before = _mounts() if m.kind == "ro-bind" else {}
    _step(f"mount --rbind {m.source} {m.shown}", syscalls.mount, m.source, m.target, None,
          MS_BIND | syscalls.MS_REC)
    if m.kind != "ro-bind":
        return
    under = m.target.rstrip("/") + "/"
    made = sorted((path for mount_id, path in _mounts().items()
                   if mount_id not in before and (path == m.target or path.startswith(under))),
                  key=lambda path: path.count("/"))
    for path in made:
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | _kept_flags(path)
        _step(f"mount -o remount,bind,ro {path}", syscalls.mount, None, path, None, flags)


def _kept_flags(path: str) -> int:
    have = os.statvfs(path).f_flag
    return (have & _KEPT) | (MS_NOSYMFOLLOW if have & _ST_NOSYMFOLLOW else 0)


def _mounts() -> dict[str, str]:
    """Mount id -> mount point, as this process sees them."""
    return {m.id: m.point for m in mountinfo.read()}


def _mount_proc(target: str) -> None:
    """A fresh /proc, which with -p lists only the namespace's processes. Linux refuses one in a
    user namespace that does not also own the PID namespace (rootless without -p); the /proc the
    child sees is bound instead, as rootless podman does for a container sharing the host's PIDs."""
    try:
        do(f"mount -t proc proc {target}", syscalls.mount, "proc", target, "proc",
           syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC, hints={}, explained=False)
    except StepFailed as e:
        if e.errno not in (errno.EPERM, errno.EACCES):
            raise
        _step(f"mount --rbind /proc {target}", syscalls.mount, "/proc", target, None, MS_BIND | syscalls.MS_REC)


def _mount_dev(dev: str, devices: list[str]) -> None:
    """bubblewrap's ``--dev``: a tmpfs with the harmless host devices bound in, the usual links,
    and a private devpts, which ``!cmd`` needs (IPython runs commands on a pseudo-terminal)."""
    _step(f"mount -t tmpfs tmpfs {dev}", syscalls.mount, "tmpfs", dev, "tmpfs", _TMPFS_FLAGS, "mode=755")

    def populate():
        for name in devices:
            os.close(os.open(f"{dev}/{name}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
        for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
            os.symlink(to, f"{dev}/{name}")
        os.mkdir(f"{dev}/shm")
        os.chmod(f"{dev}/shm", 0o1777)
        os.mkdir(f"{dev}/pts", 0o755)

    _step(f"make the nodes, links and directories of {dev}", populate)
    for name in devices:
        node = f"{dev}/{name}"
        _step(f"mount --bind /dev/{name} {node}", syscalls.mount, f"/dev/{name}", node, None, MS_BIND)
    _step(f"mount -t devpts devpts {dev}/pts", syscalls.mount, "devpts", f"{dev}/pts", "devpts",
          syscalls.MS_NOSUID | syscalls.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")


def _pivot(root: str, number: int) -> None:
    def pivot():
        os.chdir(root)
        if _libc.syscall(ctypes.c_long(number), b".", b".") == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if _libc.umount2(b".", MNT_DETACH) == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        os.chdir("/")

    _step(f"pivot_root into {root} (cd {root}; pivot_root . .; umount -l .)", pivot)
