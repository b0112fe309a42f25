"""What a run asks for: which namespaces, and how they are set up.

Everything is checked here, before any system call, so a request that cannot succeed never
starts a child (bubblewrap's rule). The implications are unshare(1)'s: ``--map-root-user``
implies a user namespace, ``--mount-proc`` a mount namespace, a hostname a UTS namespace, and a
clock offset a time namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import OptionError
from .kinds import BY_PROC, JOINABLE, KINDS, CloneFlag

_BIT_OF = {k.field: int(k.flag) for k in KINDS}


@dataclass
class Namespaces:
    """The namespaces a child gets, in unshare(1)'s terms.

    Namespaces not asked for stay shared with the calling process, as with unshare(1).
    ``Namespaces()`` asks for none: the child is then an ordinary fork, which is still useful
    (the cell cannot change the kernel's variables).
    """

    mount: bool = False
    uts: bool = False
    ipc: bool = False
    net: bool = False
    pid: bool = False
    user: bool = False
    cgroup: bool = False
    time: bool = False
    #: Map uid and gid 0 inside to the caller's ids (``unshare -r``); implies ``user``.
    map_root_user: bool = False
    #: Mount a fresh ``/proc`` (``unshare --mount-proc``); implies ``mount``.
    mount_proc: bool = False
    #: Set this hostname inside; implies ``uts``.
    hostname: str | None = None
    #: Shift CLOCK_MONOTONIC by this many seconds inside; implies ``time``.
    monotonic: float = 0.0
    #: Shift CLOCK_BOOTTIME by this many seconds inside; implies ``time``.
    boottime: float = 0.0

    # -- the environment around the namespaces (see nsmagic.environment) ---------------------------
    #: Bring ``lo`` up inside; implies ``net``.
    lo: bool = False
    #: A veth pair to the kernel: ``"HOST_CIDR[:CHILD_ADDR]"``, or ``""`` to pick a free
    #: link-local /30; implies ``net``.
    veth: str | None = None
    #: Existing namespaces to enter (setns), by kind: ``{"net": "/run/netns/lab", "uts": "1234"}``.
    #: Kinds: net, uts, ipc, mnt, pid, user. A target is a path, a PID, or for net a name made
    #: with ``ip netns add``.
    join: dict[str, str] = field(default_factory=dict)
    #: cgroup limits: memory in bytes or as ``"64M"``, a number of processes, a fraction of CPUs.
    memory: int | str | None = None
    pids: int | None = None
    cpus: float | None = None
    #: Mounts inside; each implies ``mount``. ``bind``/``ro_bind`` entries are ``"SRC:DST"``.
    tmpfs: list[str] = field(default_factory=list)
    bind: list[str] = field(default_factory=list)
    ro_bind: list[str] = field(default_factory=list)
    #: A prepared root filesystem to pivot into; implies ``mount``.
    rootfs: str | None = None

    def __post_init__(self) -> None:
        asked = self._asked_for() if self.join else {}  # before the implications below
        if self.map_root_user:
            self.user = True
        if self.mount_proc:
            self.mount = True
        if self.hostname is not None:
            _check_hostname(self.hostname)
            self.uts = True
        if self.monotonic or self.boottime:
            self.time = True
        if self.mount_proc and self.user and not self.pid and "pid" not in self.join:
            raise OptionError(
                "--mount-proc inside a user namespace (-r or -U) needs -p too: a user namespace "
                "may mount /proc only for a PID namespace it owns (unshare -r --mount-proc fails "
                "the same way); add -p"
            )
        if self.lo or self.veth is not None:
            self.net = True
        if self.tmpfs or self.bind or self.ro_bind or self.rootfs is not None:
            self.mount = True
        if self.join:
            self._check_joins(asked)

    def _asked_for(self) -> dict[str, list[str]]:
        """For each kind, the options that ask for a fresh namespace of it, as the user may have
        typed them (``-n/--net``, ``--lo``): what a message about a conflict must name."""
        asked = {k.field: [k.options] if getattr(self, k.field) else [] for k in KINDS}
        implied = (("user", "-r/--map-root-user", self.map_root_user),
                   ("mount", "--mount-proc", self.mount_proc),
                   ("uts", "--hostname", self.hostname is not None),
                   ("time", "--monotonic", bool(self.monotonic)), ("time", "--boottime", bool(self.boottime)),
                   ("net", "--lo", self.lo), ("net", "--veth", self.veth is not None),
                   ("mount", "--tmpfs", bool(self.tmpfs)), ("mount", "--bind", bool(self.bind)),
                   ("mount", "--ro-bind", bool(self.ro_bind)), ("mount", "--rootfs", self.rootfs is not None))
        for field_name, option, given in implied:
            if given:
                asked[field_name].append(option)
        return asked

    def _check_joins(self, asked: dict[str, list[str]]) -> None:
        for kind in self.join:
            if kind not in JOINABLE:
                raise OptionError(f"cannot join a {kind!r} namespace; joinable: {', '.join(JOINABLE)}")
            options = asked[BY_PROC[kind].field]
            if not options:
                continue
            named = ", ".join(options)
            makes = "makes" if len(options) == 1 else "make"
            inside = ("; to configure the joined namespace, do it from inside the cell"
                      if set(options) & {"--lo", "--veth", "--hostname", "--mount-proc", "--tmpfs", "--bind",
                                         "--ro-bind"} else "")
            raise OptionError(
                f"{named} and --join-{kind} in one cell: {named} {makes} a fresh {BY_PROC[kind].words} "
                f"namespace, and a process is in one {kind} namespace at a time; drop one of them{inside}"
            )

    @classmethod
    def from_flags(cls, flags: CloneFlag, **kw) -> "Namespaces":
        """Build a request from ``CLONE_NEW*`` flags, for callers who think in clone(2)'s terms."""
        return cls(**{k.field: bool(flags & k.flag) for k in KINDS}, **kw)

    @property
    def flags(self) -> CloneFlag:
        """All the ``CLONE_NEW*`` flags this request creates."""
        return CloneFlag(self.flag_bits)

    @property
    def flag_bits(self) -> int:
        """The same as a plain int, which is what the child works with."""
        bits = 0
        for name, bit in _BIT_OF.items():
            if getattr(self, name):
                bits |= bit
        return bits

    def describe(self) -> str:
        """A short unshare(1)-style spelling, for messages."""
        parts = [k.letter for k in KINDS if getattr(self, k.field)]
        if self.map_root_user:
            parts.append("-r")
        if self.mount_proc:
            parts.append("--mount-proc")
        return " ".join(parts) or "(no namespaces)"


def _check_hostname(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise OptionError("--hostname needs a non-empty name")
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 64:
        raise OptionError(f"--hostname {name!r} is {len(raw)} bytes long; Linux allows at most 64")
    if b"\0" in raw:
        raise OptionError("--hostname cannot contain a NUL byte")
