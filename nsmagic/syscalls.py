"""The Linux system calls nsmagic needs, and the words for what goes wrong with them.

Python 3.12 grew ``os.unshare`` and ``os.setns``; 3.10 and 3.11 have neither, so they come from
glibc through ctypes. glibc exports ``unshare``, ``setns``, ``mount`` and ``prctl`` as functions,
which spares us per-architecture syscall numbers. libc is resolved once, at import, not per cell.

The calls the kernel makes just before each fork (pipes, the memfd, non-blocking flags, the PID
namespace) go through a second handle that keeps the GIL: each takes microseconds and never
blocks. Given up there, the GIL goes to another thread with work of its own at the start of a
cell (ipykernel's IOPub thread sending the cell's first messages, IPython's history thread
storing its input), and that work then delays the fork; held, it waits until the kernel waits
for its child, and is done while the child runs (the difference shows when the cells are
stored in the history, as a notebook's are; docs/performance.md). ``os.unshare`` and ``os.setns`` give up the GIL too, so
this handle serves every Python version. The child's ``prctl`` calls use it as well: the child
has one thread, and giving up the GIL there only writes to (and so copies) pages of the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .kinds import BY_FLAG, CloneFlag

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

_held = ctypes.PyDLL(None, use_errno=True)  # calls keep the GIL: only for short, non-blocking ones
_held.unshare.argtypes = [ctypes.c_int]
_held.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_held.pipe2.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_held.memfd_create.argtypes = [ctypes.c_char_p, ctypes.c_uint]
_held.fcntl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_held.open.argtypes = [ctypes.c_char_p, ctypes.c_int]
_held.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_F_GETFL, _F_SETFL = 3, 4  # the same on every Linux architecture


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                                   ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_IOV_MAX = 1024


class _PyBuffer(ctypes.Structure):
    """``Py_buffer``, whose layout is part of the stable ABI."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
CAP_SYS_ADMIN = 21


def _check(ret: int, what: str) -> None:
    if ret == -1:
        _fail(what)


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what} failed: {os.strerror(err)}")


# The child calls these with plain ints and spells the flags only when a call failed: CloneFlag's
# arithmetic runs in Python, and in a fresh fork every object it touches costs a page copy.

def unshare(flags: int) -> None:
    if _held.unshare(int(flags)) == -1:
        _fail(f"unshare({CloneFlag(flags).spelled()})")


def setns(fd: int, nstype: int = 0) -> None:
    if _held.setns(fd, int(nstype)) == -1:
        _fail(f"setns({CloneFlag(nstype).spelled()})")


def pipe() -> tuple[int, int]:
    """``os.pipe2(os.O_CLOEXEC)``, keeping the GIL."""
    fds = (ctypes.c_int * 2)()
    _check(_held.pipe2(fds, os.O_CLOEXEC), "pipe2")
    return fds[0], fds[1]


def memfd(name: str) -> int:
    """``os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)``, keeping the GIL (the
    kernel seals it before it maps it: see nsmagic.values.seal)."""
    fd = _held.memfd_create(os.fsencode(name), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    _check(fd, "memfd_create")
    return fd


def set_nonblocking(fd: int) -> None:
    """``os.set_blocking(fd, False)``, keeping the GIL."""
    flags = _held.fcntl(fd, _F_GETFL, 0)
    _check(flags, "fcntl(F_GETFL)")
    _check(_held.fcntl(fd, _F_SETFL, flags | os.O_NONBLOCK), "fcntl(F_SETFL)")


def open_readonly(path: str) -> int:
    """``os.open(path, os.O_RDONLY | os.O_CLOEXEC)`` for a /proc file, keeping the GIL."""
    fd = _held.open(os.fsencode(path), os.O_RDONLY | os.O_CLOEXEC)
    _check(fd, f"open({path!r})")
    return fd


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == -1:
        _fail(f"mount({source!r}, {target!r}, {fstype!r})")


def set_parent_death_signal(sig: int) -> None:
    _check(_held.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def set_undumpable() -> None:
    """``prctl(PR_SET_DUMPABLE, 0)``: this process's /proc files become root's (of the first user
    namespace), so processes it starts in a user namespace cannot open its /proc/PID/fd or mem."""
    _check(_held.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE, 0)")


def set_child_subreaper() -> None:
    _check(_held.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


# Only children call the two above, each as the first call of a fresh fork. A harmless read
# here makes ctypes do its one-time set-up of prctl in this process, not in every child
# (fewer pages copied in each child, and no GIL hand-over there).
_held.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)


def buffer_address(obj) -> int:
    """Where the bytes of a contiguous buffer (read-only ones too) start in this process.
    The address stays valid only while something else holds the buffer (a memoryview)."""
    view = _PyBuffer()
    _get_buffer(obj, ctypes.byref(view), 0)  # PyBUF_SIMPLE; raises the buffer's own error
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


def read_process_memory(pid: int, pieces: list[tuple[int, int, int]]) -> None:
    """Copy ``(local address, remote address, length)`` pieces out of process *pid* with one
    process_vm_readv(2) per 1024 pieces: a single copy, with no file or pipe in between. Needs
    the right to ptrace *pid*: root has it, and so has a user over its own dumpable child."""
    pending = [p for p in pieces if p[2]]
    while pending:
        batch, pending = pending[:_IOV_MAX], pending[_IOV_MAX:]
        local = (_IOVec * len(batch))(*[(here, n) for here, _, n in batch])
        remote = (_IOVec * len(batch))(*[(there, n) for _, there, n in batch])
        got = _libc.process_vm_readv(pid, local, len(batch), remote, len(batch), 0)
        _check(got, "process_vm_readv")
        if got == 0:
            raise OSError(errno.EFAULT, "process_vm_readv copied nothing")
        rest = []
        for here, there, n in batch:  # a short copy ends at a piece's boundary, or inside one
            if got >= n:
                got -= n
            else:
                rest.append((here + got, there + got, n - got))
                got = 0
        pending = rest + pending


_capabilities: tuple[int, int] | None = None


def has_capability(cap: int) -> bool:
    """Whether this process has *cap* in its effective set (from ``/proc/self/status``, read
    once per process: a kernel's capabilities do not change while it runs)."""
    global _capabilities
    if _capabilities is None or _capabilities[0] != os.getpid():
        effective = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    effective = int(line.split()[1], 16)
        _capabilities = (os.getpid(), effective)
    return bool(_capabilities[1] >> cap & 1)


def advice(flags: CloneFlag, err: int, in_user_ns: bool) -> str:
    """What a student should do when creating the namespaces in *flags* failed with *err*."""
    words = ", ".join(BY_FLAG[f].words for f in CloneFlag if f in flags)
    kind = "namespace" if "," not in words else "namespaces"
    if CloneFlag.NEWUSER in flags or in_user_ns:
        blocked = userns_switched_off(err)
        if blocked:
            return blocked
    if err in (errno.EPERM, errno.EACCES):
        if CloneFlag.NEWUSER in flags or in_user_ns:
            return (
                f"creating {words} {kind} was refused even inside a user namespace: user "
                "namespaces may be disabled or restricted on this machine (see "
                "/proc/sys/user/max_user_namespaces, the sysctl kernel.unprivileged_userns_clone, "
                "or AppArmor's kernel.apparmor_restrict_unprivileged_userns); %nsinfo shows which"
            )
        return (
            f"creating {words} {kind} needs CAP_SYS_ADMIN, which this kernel "
            f"(uid {os.geteuid()}) does not have; add -r (--map-root-user) to create "
            f"{'it' if kind == 'namespace' else 'them'} inside a new user namespace, as unshare -r does"
        )
    if err == errno.ENOSPC:
        files = ", ".join(f"/proc/sys/user/max_{BY_FLAG[f].proc}_namespaces" for f in CloneFlag if f in flags)
        return f"the limit on {words} {kind} is reached (see {files}); end other containers or raise the limit"
    if err == errno.EINVAL:
        return f"this Linux kernel does not support {words} {kind} (or not in this combination)"
    if err == errno.EUSERS:
        return "user namespaces are nested too deeply (the limit is 32)"
    return os.strerror(err)


#: The settings that switch unprivileged user namespaces off, the errno each gives, and the fix.
#: (path, value that switches them off, errnos, words, fix)
_USERNS_SWITCHES = [
    ("/proc/sys/user/max_user_namespaces", "0", (errno.ENOSPC, errno.EPERM),
     "user namespaces are switched off on this machine (sysctl user.max_user_namespaces = 0)",
     "as root: sysctl -w user.max_user_namespaces=15000 (and in /etc/sysctl.d/ to keep it)"),
    ("/proc/sys/kernel/unprivileged_userns_clone", "0", (errno.EPERM, errno.EACCES),
     "unprivileged user namespaces are switched off (sysctl kernel.unprivileged_userns_clone = 0)",
     "as root: sysctl -w kernel.unprivileged_userns_clone=1"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1", (errno.EPERM, errno.EACCES),
     "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10+: sysctl "
     "kernel.apparmor_restrict_unprivileged_userns = 1), so they get no capabilities",
     "as root: give the kernel's Python an AppArmor profile that allows `userns,`, or "
     "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
]


def userns_switched_off(err: int) -> str | None:
    """One line naming the setting that refused a user namespace (or what -r does inside one)
    with *err*, and its fix; None if no such setting explains it."""
    for path, off, errnos, words, fix in _USERNS_SWITCHES:
        if err in errnos and _setting(path) == off:
            return f"{words}; {fix}"
    if err in (errno.EPERM, errno.ENOSYS) and _setting("/proc/self/status", "Seccomp:") == "2":
        return ("a seccomp filter refuses unshare(CLONE_NEWUSER) here (a container's default profile "
                f"answers {errno.errorcode[err]}); start the container with "
                "--security-opt seccomp=unconfined (Docker, Podman) or seccompProfile: Unconfined "
                "(Kubernetes), or run the kernel as root without -r")
    if err == errno.ENOSYS:
        return "this Linux kernel has no user namespaces (CONFIG_USER_NS is off); -r cannot work here"
    return None


def _setting(path: str, key: str | None = None) -> str | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    if key is None:
        return text.strip()
    for line in text.splitlines():
        if line.startswith(key):
            return line[len(key):].strip()
    return None
