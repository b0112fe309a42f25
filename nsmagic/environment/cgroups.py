"""cgroup limits for a cell: ``--memory``, ``--pids``, ``--cpus``.

The child gets a cgroup of its own, made in the kernel before the fork and removed when the cell
ends, so a memory hog, a fork loop or a busy loop is stopped without touching the kernel.

Container runtimes start a process directly in its cgroup with ``clone3(CLONE_INTO_CGROUP)``.
nsmagic forks with glibc (see :mod:`nsmagic.clone`), so it does the equivalent: the kernel opens
the new cgroup's ``cgroup.procs`` before the fork, and the child writes ``0`` (itself) to it first
thing, before it makes any namespace and long before the cell's code runs. What the child starts
is then born inside the cgroup (so is the PID 1 forked after a user namespace is made), and with
``-C`` the cell's cgroup namespace is rooted at its own cgroup, as in a container. Doing the move
in the kernel after the namespaces are made (the ``host`` hook) would work too, but would leave a
``-C`` cell looking at ``/nsmagic-...`` instead of ``/``, and cost a round trip.

Where the cgroup goes depends on the host:

* cgroup v1, and hybrid hosts whose memory, pids and cpu controllers are v1: a child of the
  kernel's own cgroup in each hierarchy needed, ``<mount>/<kernel's cgroup>/nsmagic-<pid>-<n>``.
* cgroup v2: a cgroup with processes in it cannot hand controllers to children ("no internal
  processes"), and the kernel's cgroup has the kernel in it. So the new cgroup goes beside the
  kernel's, under its parent, whose ``cgroup.subtree_control`` already gives the kernel's cgroup
  the controllers, as with ``systemd-run --scope``. Only in the root cgroup, which the rule
  exempts, does it go below.

Without root, that directory must be writable by the kernel's user, which a delegated cgroup v2
subtree gives. If there is none, the cell fails before its child starts.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field

from ..errors import OptionError, PrivilegeError, SetupError
from ..mountinfo import parse as parse_mountinfo
from ..steps import do
from .base import Part

#: The largest limit a cgroup file takes (a signed 64-bit count of bytes).
MAX_MEMORY = (1 << 63) - 1
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_PERIOD_US = 100_000
_MIN_CPUS = 0.01  # a 1 ms quota per 100 ms period: the least Linux accepts
_REMOVE_WAIT = 5.0
_names = itertools.count(1)
_OPTION_OF = {"memory": "--memory", "pids": "--pids", "cpu": "--cpus"}
_DELEGATE = ("on a systemd host (cgroup v2), start Jupyter with "
             "`systemd-run --user --scope -p Delegate=yes jupyter lab` to get a delegated cgroup, "
             "or run the kernel as root")

#: The counters that say a limit was hit: (file, key), by controller and by cgroup v2 or not.
_COUNTERS = {
    ("memory", False): ("memory.oom_control", "oom_kill"),
    ("memory", True): ("memory.events", "oom_kill"),
    ("pids", False): ("pids.events", "max"),
    ("pids", True): ("pids.events", "max"),
}


# -- values --------------------------------------------------------------------------------


def parse_memory(value) -> int:
    """Bytes from an int or a string such as ``"64M"`` (K, M, G, T are powers of 1024)."""
    hint = "give a whole number of bytes or a number with K, M, G or T, e.g. --memory 64M"
    size = 0
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        # Exact arithmetic: 1.5M is 1572864 bytes, but 1.5 (no unit) is no whole number of bytes.
        whole, _, fraction = m[1].partition(".")
        size, rest = divmod(int(whole + fraction) * _UNITS[m[2].upper()], 10 ** len(fraction))
        if rest:
            raise OptionError(f"--memory {value!r} is not a whole number of bytes; {hint}")
    if not 0 < size <= MAX_MEMORY:
        raise OptionError(f"--memory {value!r}: not a size from 1 byte to {MAX_MEMORY} bytes; {hint}")
    return size


def human_size(size: int) -> str:
    for unit in "TGMK":
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size} bytes"


def check_pids(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OptionError(f"--pids {value!r}: give a whole number of processes above 0, e.g. --pids 64")
    return value


def check_cpus(value) -> float:
    count = os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _MIN_CPUS <= value <= count:
        spelled = f"{value:g}" if isinstance(value, float) else repr(value)
        raise OptionError(f"--cpus {spelled}: give a fraction of CPUs from {_MIN_CPUS} to {count} "
                          f"(this machine's CPUs), e.g. --cpus 0.5")
    return float(value)


# -- where the kernel's cgroups are --------------------------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy and the kernel's cgroup directory in it."""

    v2: bool
    controllers: frozenset
    own: str
    #: The mount point: the highest directory of this hierarchy visible here.
    top: str


def hierarchies(proc_cgroup: str, mountinfo: str) -> list[Hierarchy]:
    """The hierarchies the kernel is in, from ``/proc/self/cgroup`` and ``/proc/self/mountinfo``.

    A v2 hierarchy's controllers are those of its top (``cgroup.controllers``), read from disk.
    """
    mounts = []
    for m in parse_mountinfo(mountinfo):
        if m.fstype in ("cgroup", "cgroup2"):
            mounts.append((m.fstype == "cgroup2", m.root, m.point, set(m.super_options.split(","))))
    found = []
    for line in proc_cgroup.splitlines():
        number, names, path = line.split(":", 2)
        v2 = number == "0" and not names
        wanted = set(names.split(",")) if names else set()
        for mount_v2, root, mountpoint, options in mounts:
            rel = _below(path, root)
            if mount_v2 != v2 or rel is None or not wanted <= options:
                continue
            controllers = _words(os.path.join(mountpoint, "cgroup.controllers")) if v2 else frozenset(wanted)
            found.append(Hierarchy(v2, controllers, os.path.normpath(os.path.join(mountpoint, rel)), mountpoint))
            break
    return found


def choose(needed: list[str], found: list[Hierarchy]) -> dict[Hierarchy, set[str]]:
    """Which hierarchy each controller is in: a v1 one if it is mounted there (a controller
    belongs to one hierarchy at a time), else v2."""
    chosen: dict[Hierarchy, set[str]] = {}
    for name in needed:
        where = (next((h for h in found if not h.v2 and name in h.controllers), None)
                 or next((h for h in found if h.v2 and name in h.controllers), None))
        if where is None:
            raise SetupError(f"{_OPTION_OF[name]}: this machine offers no {name} cgroup controller to "
                             f"the kernel's cgroups (see /proc/cgroups and /proc/self/cgroup); drop "
                             f"{_OPTION_OF[name]} or enable the controller")
        chosen.setdefault(where, set()).add(name)
    return chosen


def v2_parent(h: Hierarchy, controllers: set[str]) -> str:
    """The directory to make the cell's cgroup in, in a v2 hierarchy (see the module's doc)."""
    if controllers <= _words(os.path.join(h.own, "cgroup.subtree_control")):
        return h.own
    if os.path.normpath(h.own) == os.path.normpath(h.top):
        raise PrivilegeError(
            f"{_options(controllers)}: the kernel's cgroup {h.own} is the top of the cgroup v2 "
            f"tree visible here and has processes, so it cannot give the "
            f"{_names_of(controllers - _words(os.path.join(h.own, 'cgroup.subtree_control')))} "
            f"controller to a cgroup for the cell; {_DELEGATE}")
    parent = os.path.dirname(os.path.normpath(h.own))
    missing = controllers - _words(os.path.join(h.own, "cgroup.controllers"))
    if missing:
        raise PrivilegeError(
            f"{_options(missing)}: the {_names_of(missing)} controller is not enabled in "
            f"{parent}/cgroup.subtree_control, so a cgroup beside the kernel's cannot use it; "
            f"enable it there (echo +{' +'.join(sorted(missing))} > {parent}/cgroup.subtree_control) or {_DELEGATE}")
    return parent


# -- the part ------------------------------------------------------------------------------


@dataclass
class _Group:
    """One cgroup made for the child, in one hierarchy."""

    path: str
    v2: bool
    controllers: set[str]
    procs: int = -1
    written: list[tuple[str, str]] = field(default_factory=list)


class CgroupLimits(Part):
    """Puts the child in cgroups of its own with the limits asked for, and reads back why it died."""

    def __init__(self, spec):
        self.spec = spec
        self.memory: int | None = None
        self.pids: int | None = None
        self.cpus: float | None = None
        self.needed: list[str] = []
        self.groups: list[_Group] = []
        self._seen: dict[str, int] = {}
        # cleanup() may run in the reaper thread while annotate() reads the counters.
        self._lock = threading.Lock()

    # -- kernel, before the fork

    def check(self) -> None:
        self.needed = []
        if self.spec.memory is not None:
            self.memory = parse_memory(self.spec.memory)
            self.needed.append("memory")
        if self.spec.pids is not None:
            self.pids = check_pids(self.spec.pids)
            self.needed.append("pids")
        if self.spec.cpus is not None:
            self.cpus = check_cpus(self.spec.cpus)
            self.needed.append("cpu")

    def prepare(self) -> None:
        found = hierarchies(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo"))
        for h, controllers in choose(self.needed, found).items():
            parent = v2_parent(h, controllers) if h.v2 else h.own
            _check_writable(parent, h.v2, controllers)
            _remove_stale(parent)
            group = _Group(os.path.join(parent, f"nsmagic-{os.getpid()}-{next(_names)}"), h.v2, controllers)
            _mkdir(group.path, controllers)
            self.groups.append(group)
            for name, value in self._limits(group):
                _write(group, name, value)
            group.procs = _open(os.path.join(group.path, "cgroup.procs"), controllers)

    def _limits(self, group: _Group) -> list[tuple[str, str]]:
        out = []
        if "memory" in group.controllers:
            if group.v2:
                out.append(("memory.max", str(self.memory)))
                if os.path.exists(os.path.join(group.path, "memory.swap.max")):
                    out.append(("memory.swap.max", "0"))  # swap would hide the OOM kill
            else:
                out.append(("memory.limit_in_bytes", str(self.memory)))
                if os.path.exists(os.path.join(group.path, "memory.memsw.limit_in_bytes")):
                    out.append(("memory.memsw.limit_in_bytes", str(self.memory)))
        if "pids" in group.controllers:
            out.append(("pids.max", str(self.pids)))
        if "cpu" in group.controllers:
            quota = max(1000, round(self.cpus * _PERIOD_US))
            if group.v2:
                out.append(("cpu.max", f"{quota} {_PERIOD_US}"))
            else:
                out += [("cpu.cfs_period_us", str(_PERIOD_US)), ("cpu.cfs_quota_us", str(quota))]
        return out

    # -- child, before its namespaces

    def before_unshare(self) -> None:
        for group in self.groups:
            try:
                do(f"write 0 to {group.path}/cgroup.procs", os.write, group.procs, b"0",
                   hints=": could not join the cell's cgroup", explained=False)
            finally:
                os.close(group.procs)

    # -- kernel, after

    def explain(self) -> list[str]:
        return [f"cgroup{' v2' if g.v2 else ''} {g.path}: " + ", ".join(f"{k} = {v}" for k, v in g.written)
                for g in self.groups]

    def cleanup(self) -> None:
        failures = []
        with self._lock:
            self._read_counters()
            for group in self.groups:
                if group.procs >= 0:
                    os.close(group.procs)
                    group.procs = -1
                try:
                    _remove(group)
                except OSError as e:
                    failures.append(f"{group.path}: {e.strerror or e}")
            self.groups = []
        if failures:
            raise SetupError(f"could not remove the cell's cgroup ({'; '.join(failures)}); "
                             "its processes may still be exiting")

    def exit_reason(self, status: int) -> str | None:
        return "; ".join(self._reasons(died=True)) or None

    def annotate(self, error: BaseException) -> str | None:
        return "; ".join(self._reasons(died=False)) or None

    def _reasons(self, died: bool) -> list[str]:
        with self._lock:
            seen = self._read_counters()
        out = []
        if self.memory is not None and seen.get("oom_kill"):
            who = "killed" if died else "a process of the cell was killed"
            out.append(f"{who} by the OOM killer: memory limit {human_size(self.memory)}")
        if self.pids is not None and seen.get("max"):
            out.append(f"the pids limit ({self.pids}) was reached: a new process or thread was refused")
        return out

    def _read_counters(self) -> dict[str, int]:
        """The limit counters of the cell's cgroups, kept so they outlive the cgroups."""
        for group in self.groups:
            for name in group.controllers:
                spot = _COUNTERS.get((name, group.v2))
                if spot is None:
                    continue
                try:
                    text = _read(os.path.join(group.path, spot[0]))
                except OSError:
                    continue
                for line in text.splitlines():
                    key, _, value = line.partition(" ")
                    if key == spot[1] and value.strip().isdigit():
                        self._seen[key] = max(self._seen.get(key, 0), int(value))
        return self._seen


# -- files ---------------------------------------------------------------------------------


def _options(controllers) -> str:
    return "/".join(_OPTION_OF[c] for c in sorted(controllers))


def _names_of(controllers) -> str:
    return ", ".join(sorted(controllers))


def _below(path: str, root: str) -> str | None:
    """*path* relative to *root*, or None if it is not at or under it."""
    if root == "/":
        return path.lstrip("/")
    if path == root:
        return ""
    return path[len(root) + 1:] if path.startswith(root + "/") else None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _words(path: str) -> frozenset:
    try:
        return frozenset(_read(path).split())
    except OSError:
        return frozenset()


def _check_writable(parent: str, v2: bool, controllers) -> None:
    # A v2 move also needs write access to cgroup.procs of the common ancestor: here, *parent*.
    targets = [parent] + ([os.path.join(parent, "cgroup.procs")] if v2 else [])
    if all(os.access(t, os.W_OK | os.X_OK if t == parent else os.W_OK) for t in targets):
        return
    try:
        owner = f"it belongs to uid {os.stat(parent).st_uid}"
    except OSError as e:
        owner = e.strerror
    if os.geteuid() == 0:  # root is refused only by a read-only mount
        raise PrivilegeError(f"{_options(controllers)}: cannot create a cgroup for the cell: {parent} "
                             f"is read-only here (a container's /sys/fs/cgroup?); run where cgroups are writable")
    raise PrivilegeError(f"{_options(controllers)}: no cgroup this kernel (uid {os.geteuid()}) may "
                         f"write to: {parent} is not writable ({owner}); {_DELEGATE}")


def _privilege_or_setup(e: OSError, what: str, controllers) -> Exception:
    cls = PrivilegeError if e.errno in (errno.EPERM, errno.EACCES, errno.EROFS) else SetupError
    return cls(f"{_options(controllers)}: {what} failed: {e.strerror or e}")


def _mkdir(path: str, controllers) -> None:
    try:
        os.mkdir(path)
    except OSError as e:
        raise _privilege_or_setup(e, f"mkdir {path}", controllers) from None


def _open(path: str, controllers) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _privilege_or_setup(e, f"opening {path}", controllers) from None


def _write(group: _Group, name: str, value: str) -> None:
    path = os.path.join(group.path, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise _privilege_or_setup(e, f"writing {value!r} to {path}", group.controllers) from None
    group.written.append((name, value))


def _remove_stale(parent: str) -> None:
    """Remove empty cgroups left by kernels that died while a cell ran."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(r"nsmagic-(\d+)-\d+", name)
        if m and not os.path.exists(f"/proc/{m[1]}"):
            try:
                os.rmdir(os.path.join(parent, name))
            except OSError:
                pass


def _remove(group: _Group) -> None:
    """Remove a cgroup, killing what is left in it (processes that outlived the child)."""
    deadline = time.monotonic() + _REMOVE_WAIT
    while True:
        try:
            os.rmdir(group.path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        _kill_members(group)
        time.sleep(0.005)


def _kill_members(group: _Group) -> None:
    kill = os.path.join(group.path, "cgroup.kill")
    if group.v2 and os.path.exists(kill):
        try:
            with open(kill, "w") as f:
                f.write("1")
            return
        except OSError:
            pass
    procs = os.path.join(group.path, "cgroup.procs")
    try:
        listed = {int(p) for p in _read(procs).split()}
    except OSError:
        return
    pidfds = {}
    for pid in listed:
        try:
            pidfds[pid] = os.pidfd_open(pid)
        except OSError:
            pass
    try:
        # Still listed after its pidfd was opened: the pidfd is of a member, or of a process that
        # has since exited, which no signal can reach. A reused pid is never signalled.
        still = {int(p) for p in _read(procs).split()}
        for pid, fd in pidfds.items():
            if pid in still:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except OSError:
                    pass
    except OSError:
        pass
    finally:
        for fd in pidfds.values():
            os.close(fd)
