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

Where the cgroup goes depends on the host (:data:`SETUPS` names each set-up, for ``%nsinfo``
and the errors):

* cgroup v1, and hybrid hosts whose memory, pids and cpu controllers are v1: a child of the
  kernel's own cgroup in each hierarchy needed, ``<mount>/<kernel's cgroup>/nsmagic-<pid>-<n>``.
* cgroup v2: always inside the kernel's own cgroup G, so the cell stays under G's limits (a
  container's, a service's) and inside what was delegated. A cgroup with processes in it cannot
  give controllers to children ("no internal processes"), except the top cgroup: there, as root,
  the controllers are enabled and the cell's cgroup is made below. Any other G (a systemd
  service, a container's cgroup, a user's delegated scope) first has its processes moved into
  leaves, the kernel into ``G/nsmagic-<pid>-kernel`` and the rest into ``G/nsmagic-others``, as
  container runtimes and systemd do; then the controllers are enabled in G and the cell's
  cgroup ``G/nsmagic-<pid>-<n>`` is made beside the leaves. The leaves stay while the kernel
  lives; at its exit it moves back and removes them (put_back), or, if it was killed, its
  sentinel's sweep does (or the next kernel's).

Without root, G (with its ``cgroup.procs`` and ``cgroup.subtree_control``) must be writable by the
kernel's user, which a delegated cgroup v2 subtree gives (systemd's ``Delegate=yes``). If it is
not, the cell fails before its child starts, with advice that fits the set-up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field

from ..errors import OptionError, PrivilegeError, SetupError
from ..mountinfo import parse as parse_mountinfo
from ..proctree import gone
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


# -- cgroup v2: the set-ups the kernel may be in, and where the cell's cgroup goes there -----

#: What each set-up is, in words for ``%nsinfo`` and for the limit errors.
SETUPS = {
    "v1": "cgroup v1 or hybrid (memory, pids, cpu on v1): the cell's cgroup goes below the kernel's",
    "v2-top": "cgroup v2, the kernel in the top cgroup as root: the cell's cgroup goes below it",
    "v2-delegated": "cgroup v2, a cgroup delegated to this user (Delegate=yes): the kernel moves into "
                    "a leaf of it, the cell's cgroup goes beside that leaf",
    "v2-group": "cgroup v2, root in a service's or container's cgroup: the kernel moves into a leaf "
                "of it, the cell's cgroup goes beside that leaf",
    "v2-not-writable": "cgroup v2, a cgroup this user may not write to: no limits without delegation",
    "v2-read-only": "cgroup v2 mounted read-only (a container): no limits here",
}

#: The leaves nsmagic moves processes into. Only a leaf of the kernel's own cgroup G is made,
#: for the one reason that G may then give controllers to the cell's cgroup.
_LEAF = re.compile(r"nsmagic-(\d+-kernel|others)")
_OTHERS = "nsmagic-others"
#: The cgroups nsmagic names for a kernel's pid: its cells' and its leaf.
_MADE = re.compile(r"nsmagic-(\d+)-(?:\d+|kernel)")


@dataclass(frozen=True)
class Place:
    """Where the cells' cgroups go in a v2 hierarchy, and what must be done there first."""

    setup: str
    #: The kernel's cgroup, or the one whose leaf the kernel was moved into.
    group: str
    #: Controllers to enable in ``group/cgroup.subtree_control``.
    enable: frozenset
    #: Whether the processes in *group* must first move into leaves (a non-top group with processes).
    leaf: bool


def kernel_group(h: Hierarchy) -> str:
    """The kernel's cgroup, or, if the kernel (or whoever forked it) was moved into one of
    nsmagic's leaves, the cgroup that leaf is in."""
    own = os.path.normpath(h.own)
    return os.path.dirname(own) if _LEAF.fullmatch(os.path.basename(own)) else own


def is_top(path: str) -> bool:
    """The real top cgroup, exempt from the no-internal-process rule. Every other cgroup has a
    ``cgroup.type`` file, even the top of a container's cgroup namespace (which only looks like
    the top, and is not exempt)."""
    return not os.path.exists(os.path.join(path, "cgroup.type"))


def setup_of(h: Hierarchy) -> str:
    """Which of :data:`SETUPS` the kernel is in, for hierarchy *h*."""
    if not h.v2:
        return "v1"
    group = kernel_group(h)
    if _read_only(group):
        return "v2-read-only"
    if not _may_write(group):
        return "v2-not-writable"
    if is_top(group):
        return "v2-top"
    return "v2-group" if os.geteuid() == 0 else "v2-delegated"


def describe() -> str:
    """The set-up of the hierarchy the memory controller is in (the one ``--memory`` uses)."""
    try:
        found = hierarchies(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo"))
        [h] = choose(["memory"], found)
    except (OSError, ValueError, SetupError):
        return "no memory cgroup controller here: --memory cannot be used"
    return SETUPS[setup_of(h)]


def v2_place(h: Hierarchy, controllers: set[str]) -> Place:
    """Where the cell's cgroup goes in v2 hierarchy *h*, or a one-line error saying why it cannot.

    Always inside the kernel's own cgroup G, never beside it: the cell then stays under G's own
    limits (a container's, a service's) and inside what was delegated. A cgroup with processes
    cannot give controllers to a child unless it is the top, so in any other G the processes move
    into leaves first, as systemd and container runtimes do (see docs/design.md, "cgroups").
    """
    group = kernel_group(h)
    setup = setup_of(h)
    missing = controllers - _words(os.path.join(group, "cgroup.controllers"))
    if missing:
        raise PrivilegeError(_missing_words(missing, group, setup))
    if setup in ("v2-read-only", "v2-not-writable"):
        raise PrivilegeError(_unwritable_words(controllers, group, setup))
    enabled = _words(os.path.join(group, "cgroup.subtree_control"))
    if controllers <= enabled:  # a leaf move was done already, or G has no processes
        return Place(setup, group, frozenset(), False)
    top = is_top(group)
    return Place(setup, group, frozenset(controllers - enabled),
                 leaf=not top and bool(_read(os.path.join(group, "cgroup.procs")).split()))


def _in_words(setup: str) -> str:
    return SETUPS[setup].split(":")[0]


def _missing_words(missing, group: str, setup: str) -> str:
    parent = os.path.dirname(group)
    names = _names_of(missing)
    head = (f"{_options(missing)}: the {names} controller is not given to the kernel's cgroup "
            f"{group} ({_in_words(setup)}): {parent}/cgroup.subtree_control does not enable it")
    if setup == "v2-delegated" or (setup == "v2-not-writable" and _systemd()):
        return (f"{head}; systemd delegates only some controllers to users: add "
                f"`Delegate=cpu cpuset io memory pids` under [Service] in "
                f"/etc/systemd/system/user@.service.d/delegate.conf, then log in again")
    if os.geteuid() == 0:
        return f"{head}; enable it: echo +{' +'.join(sorted(missing))} > {parent}/cgroup.subtree_control"
    return f"{head}; ask for a cgroup with it delegated, or drop {_options(missing)}"


def _unwritable_words(controllers, group: str, setup: str) -> str:
    opts = _options(controllers)
    if setup == "v2-read-only":
        return (f"{opts}: /sys/fs/cgroup is mounted read-only here ({_in_words(setup)}), so no "
                f"cgroup can be made for the cell; give the limits to the container itself "
                f"(docker run --memory 1g --pids-limit 100, or a pod's resources.limits), or "
                f"start it with a writable cgroup (docker run --privileged)")
    try:
        owner = f"it belongs to uid {os.stat(group).st_uid}"
    except OSError as e:
        owner = e.strerror
    head = (f"{opts}: no cgroup this kernel (uid {os.geteuid()}) may write to: {group} is not "
            f"writable ({owner}; {_in_words(setup)})")
    if _systemd():
        return (f"{head}; start Jupyter in a cgroup delegated to you: "
                f"`systemd-run --user --scope -p Delegate=yes jupyter lab`, or run the kernel as root")
    return (f"{head}; have root delegate a cgroup to uid {os.geteuid()} (chown it and its "
            f"cgroup.procs, cgroup.subtree_control, cgroup.threads) and start Jupyter in it, or run "
            f"the kernel as root")


def _systemd() -> bool:
    """Whether systemd runs this machine (sd_booted(3)'s test), so Delegate=yes would help."""
    return os.path.isdir("/run/systemd/system")


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _may_write(group: str) -> bool:
    """What moving processes and enabling controllers in *group* need: the directory, and its
    ``cgroup.procs`` (a move's common ancestor) and ``cgroup.subtree_control``."""
    files = [os.path.join(group, n) for n in ("cgroup.procs", "cgroup.subtree_control")]
    return os.access(group, os.W_OK | os.X_OK) and all(os.access(f, os.W_OK) for f in files)


def settle(place: Place, controllers, own: str) -> None:
    """Make *place* ready for the cell's cgroup: the leaf move, then the controllers.

    The kernel goes alone into ``nsmagic-<pid>-kernel``; whatever else was in G (the Jupyter
    server, other kernels, a shell) into ``nsmagic-others``: G can enable controllers only once
    it holds no process. What these processes start later is born in their leaf. The changes are
    recorded, so that the kernel's exit can undo them (:func:`_restore`), also where the kernel
    found itself in a leaf already (one a killed kernel's leaf move put its Jupyter server in).
    """
    group = place.group
    if place.leaf:
        _move_out(group, controllers)
    if place.enable:
        _enable(group, place.enable, controllers)
    track(group, place.enable)


def track(parent: str, enabled=frozenset()) -> None:
    """Have the kernel's exit tidy *parent*: its own cells' cgroups, and what :func:`settle` did."""
    _changed.setdefault(parent, set()).update(enabled)
    if not _restore_registered:
        _register_restore()


def _move_out(group: str, controllers) -> None:
    me = os.getpid()
    leaf = os.path.join(group, f"nsmagic-{me}-kernel")
    _mkdir(leaf, controllers, exist_ok=True)
    _move(me, leaf, controllers)
    for _ in range(10):  # processes forked meanwhile are born in G: move them too
        left = [int(p) for p in _read(os.path.join(group, "cgroup.procs")).split()]
        if not left:
            return
        others = os.path.join(group, _OTHERS)
        _mkdir(others, controllers, exist_ok=True)
        for pid in left:
            _move(pid, others, controllers)
    # still not empty: enabling the controllers then fails, and says which processes stayed


def _move(pid: int, leaf: str, controllers) -> None:
    try:
        with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
            f.write(str(pid))
    except ProcessLookupError:
        pass  # it exited meanwhile
    except OSError as e:
        raise _privilege_or_setup(e, f"moving pid {pid} into {leaf}", controllers) from None


def _enable(group: str, names, controllers) -> None:
    path = os.path.join(group, "cgroup.subtree_control")
    try:
        with open(path, "w") as f:
            f.write(" ".join(f"+{n}" for n in sorted(names)))
    except OSError as e:
        if e.errno == errno.EBUSY:
            stayed = " ".join(_read(os.path.join(group, "cgroup.procs")).split()) or "none now"
            raise SetupError(f"{_options(controllers)}: {group} still had processes that could not be "
                             f"moved into a leaf (pids: {stayed}), so it cannot give controllers to a "
                             f"cgroup for the cell; run the cell again") from None
        raise _privilege_or_setup(e, f"writing {' '.join('+' + n for n in sorted(names))} to {path}",
                                  controllers) from None


#: The cgroups this kernel changed (a leaf move, controllers enabled), and the controllers it enabled.
_changed: dict[str, set] = {}
_restore_registered = False


def _register_restore() -> None:
    global _restore_registered
    import atexit

    atexit.register(_restore)
    _restore_registered = True


def _restore() -> None:
    """At the kernel's exit, remove what is left of its cells' cgroups, and put back what
    :func:`settle` changed (:func:`put_back`).

    Where another kernel's cells still use G, its leaf is left, and moved back by the last of
    them. A kernel killed cannot run this: its sentinel's sweep puts back in its place
    (nsmagic.sentinel), or, where it had none, the next kernel's.
    """
    me = os.getpid()
    for group, enabled in list(_changed.items()):
        try:
            # The last cell's cgroup may still be there: its clean-up runs in the background
            # (a library caller may exit as soon as run() returns), and it is over now.
            for name in os.listdir(group):
                if re.fullmatch(rf"nsmagic-{me}-\d+", name):
                    remove(os.path.join(group, name))
            put_back(group, me, enabled)
        except OSError:
            continue  # left for the next sweep
        finally:
            _changed.pop(group, None)


#: How often put_back() looks again at a leaf that processes were forked into meanwhile.
_MOVE_ROUNDS = 20


def put_back(group: str, kernel: int, enabled=frozenset()) -> bool:
    """Undo what :func:`settle` did in *group* for the kernel of pid *kernel*, if no other kernel
    now needs it: disable the controllers, move the processes of the leaves (the kernel's and
    ``nsmagic-others``) back into *group*, remove the leaves. Returns whether it did.

    Used by the kernel at its exit, and by a sweep for a kernel that is gone. Everything in the
    kernel's leaf moves back with it, not only the kernel: its sentinel and what the kernel
    started outside its cells were in *group* before the move, and belong there again. Without a
    leaf (the top cgroup), only the controllers this kernel enabled (*enabled*) are disabled.
    Raises OSError if the tree could not be written.
    """
    leaf = f"nsmagic-{kernel}-kernel"
    if not os.path.exists(os.path.join(group, "cgroup.subtree_control")):
        return False  # cgroup v1: no leaf moves there
    with _locked(group):
        children = {d for d in os.listdir(group) if os.path.isdir(os.path.join(group, d))}
        if not children <= {leaf, _OTHERS}:
            return False  # another kernel's leaf or cells: the controllers are still needed
        off = _words(os.path.join(group, "cgroup.subtree_control")) if children else enabled
        if off:
            # Disabling is allowed while the leaves hold processes; moving them into a group
            # that gives controllers to children is not (no internal processes).
            with open(os.path.join(group, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join(f"-{n}" for n in sorted(off)))
        for name in sorted(children, key=lambda d: d != _OTHERS):  # the others first, then the kernel
            _empty_into(os.path.join(group, name), group)
        return True


def _empty_into(leaf: str, group: str) -> None:
    """Move every process of *leaf* into *group* and remove *leaf*, again for those forked meanwhile."""
    for _ in range(_MOVE_ROUNDS):
        try:
            pids = _read(os.path.join(leaf, "cgroup.procs")).split()
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                with open(os.path.join(group, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except ProcessLookupError:
                pass  # exited meanwhile
        try:
            os.rmdir(leaf)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
    os.rmdir(leaf)  # still busy: raises, and the next sweep tries again


#: How long a kernel waits for another one's hold on a cgroup it is about to change.
_LOCK_WAIT = 5.0


@contextlib.contextmanager
def _locked(group: str):
    """Hold an advisory lock on *group* (flock(2) on its directory), so that one kernel's
    :func:`put_back` and another's cell set-up in the same cgroup do not interleave.

    Danger: a flock belongs to the open file, which a fork made meanwhile by another thread
    shares until the child drops its inherited fds (nsmagic.child does that first thing). So
    the wait is bounded, and after it the work goes on unlocked, as it would without the lock.
    """
    try:
        fd = os.open(group, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield  # the operation itself will say what is wrong with *group*
        return
    try:
        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)
            except OSError:
                break  # no locks on this file system: unlocked, as before
        yield
    finally:
        os.close(fd)


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
            parent = kernel_group(h) if h.v2 else h.own
            group = _Group(os.path.join(parent, f"nsmagic-{os.getpid()}-{next(_names)}"), h.v2, controllers)
            # Locked from the look at G to the cell's cgroup made in it: once that exists, no
            # other kernel's put_back() takes the controllers away.
            with _locked(parent):
                if h.v2:
                    _remove_stale(parent)
                    settle(v2_place(h, controllers), controllers, h.own)
                else:
                    _check_writable(parent, controllers)
                    _remove_stale(parent)
                    track(parent)
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
                    remove(group.path)
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


def _check_writable(parent: str, controllers) -> None:
    """A v1 hierarchy's cgroup for the cell goes below the kernel's (v2: :func:`v2_place`)."""
    if os.access(parent, os.W_OK | os.X_OK):
        return
    try:
        owner = f"it belongs to uid {os.stat(parent).st_uid}"
    except OSError as e:
        owner = e.strerror
    if os.geteuid() == 0:  # root is refused only by a read-only mount
        raise PrivilegeError(f"{_options(controllers)}: cannot create a cgroup for the cell: {parent} "
                             f"is read-only here ({SETUPS['v1'].split(':')[0]}; a container's "
                             f"/sys/fs/cgroup?); give the limits to the container itself, or run "
                             f"where cgroups are writable")
    raise PrivilegeError(f"{_options(controllers)}: no cgroup this kernel (uid {os.geteuid()}) may "
                         f"write to: {parent} is not writable ({owner}; {SETUPS['v1'].split(':')[0]}); "
                         f"cgroup v1 has no delegation to users: run the kernel as root")


def _privilege_or_setup(e: OSError, what: str, controllers) -> Exception:
    cls = PrivilegeError if e.errno in (errno.EPERM, errno.EACCES, errno.EROFS) else SetupError
    return cls(f"{_options(controllers)}: {what} failed: {e.strerror or e}")


def _mkdir(path: str, controllers, exist_ok: bool = False) -> None:
    try:
        os.mkdir(path)
    except FileExistsError:
        if not exist_ok:
            raise _privilege_or_setup(FileExistsError(17, "File exists"), f"mkdir {path}", controllers) from None
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


def stale(parent: str) -> list[str]:
    """The cgroups in *parent* that nsmagic made for a kernel that is gone (or a zombie: killed,
    not yet reaped): its cells' (``nsmagic-<pid>-<n>``, the kernel died while they ran) and its
    leaf (``nsmagic-<pid>-kernel``, it could not move back at exit). Used by a cell's set-up and
    by the sentinel's sweep (nsmagic.sentinel)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return [os.path.join(parent, n) for n in names if (m := _MADE.fullmatch(n)) and gone(int(m[1]))]


def _remove_stale(parent: str) -> None:
    """Remove the empty cgroups left by kernels that have gone, and an empty ``nsmagic-others``.
    Only empty ones: a cell's set-up does not wait on what a dead kernel left running (the
    sentinel's sweep kills that)."""
    for path in [*stale(parent), os.path.join(parent, _OTHERS)]:
        try:
            os.rmdir(path)
        except OSError:
            pass


def remove(path: str) -> None:
    """Remove a cgroup nsmagic made, killing what is left in a cell's (processes that outlived
    the child). A kernel's leaf is only removed once empty: what the kernel started outside its
    cells is not nsmagic's to end (and may be a sentinel). Raises OSError if it stays busy."""
    deadline = time.monotonic() + _REMOVE_WAIT
    leaf = _LEAF.fullmatch(os.path.basename(path))
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if leaf or e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        _kill_members(path)
        time.sleep(0.005)


def _kill_members(path: str) -> None:
    kill = os.path.join(path, "cgroup.kill")  # cgroup v2, Linux >= 5.14
    if os.path.exists(kill):
        try:
            with open(kill, "w") as f:
                f.write("1")
            return
        except OSError:
            pass
    procs = os.path.join(path, "cgroup.procs")
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
