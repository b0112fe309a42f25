"""What this kernel can isolate, probed for real: the first cell of every tutorial (``%nsinfo``).

Reading capabilities is not enough to know whether a namespace can be made (seccomp filters,
sysctls, AppArmor and namespace limits all have a say), so each kind is tried: a forked,
single-threaded probe calls ``unshare`` and reports by its exit status, once directly and once
inside a new user namespace (what ``-r`` does).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field

from . import mountinfo
from .clone import fork
from .kinds import BY_FLAG, KINDS, CloneFlag
from .syscalls import unshare

@dataclass
class Kind:
    flag: CloneFlag
    inode: str
    direct: bool
    with_user: bool
    limit: int | None

    @property
    def name(self) -> str:
        return BY_FLAG[self.flag].proc

    @property
    def status(self) -> str:
        if self.direct:
            return "yes"
        if self.with_user:
            return "with -r"
        return "no"

    @property
    def hint(self) -> str:
        if self.direct:
            return ""
        if self.with_user:
            return f"add -r: {BY_FLAG[self.flag].words} namespaces need CAP_SYS_ADMIN, which -r gives inside a user namespace"
        if self.limit == 0:
            return f"/proc/sys/user/max_{self.name}_namespaces is 0: raise it (sysctl user.max_{self.name}_namespaces)"
        if self.flag == CloneFlag.NEWTIME and not os.path.exists("/proc/self/ns/time"):
            return "this Linux kernel has no time namespaces (they need Linux 5.6)"
        return "refused even inside a user namespace: see the user namespace settings below"


@dataclass
class Info:
    """The probe's findings, renderable as HTML (notebooks) or text."""

    uid: int
    kinds: list[Kind]
    cgroup: str
    settings: dict[str, str] = field(default_factory=dict)
    #: Which set-up --memory/--pids/--cpus find here (``cgroups.SETUPS``).
    cgroup_setup: str = ""

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td><code>{k.name}</code></td><td><code>{BY_FLAG[k.flag].letter}</code></td>"
            f"<td><code>{html.escape(k.inode)}</code></td><td>{k.status}</td>"
            f"<td>{_limit(k)}</td><td>{html.escape(k.hint)}</td></tr>"
            for k in self.kinds
        )
        settings = "".join(f"<tr><td><code>{html.escape(n)}</code></td><td>{html.escape(v)}</td></tr>"
                           for n, v in self.settings.items())
        return (
            f"<p><b>nsmagic</b>: what this kernel (uid {self.uid}) can isolate, probed just now</p>"
            "<table><thead><tr><th>namespace</th><th>flag</th><th>kernel's inode</th>"
            "<th>can create</th><th>max_*_namespaces</th><th>hint</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
            f"<table><tbody><tr><td>cgroups</td><td>{html.escape(self.cgroup)}</td></tr>"
            f"<tr><td>cgroup limits</td><td>{html.escape(self.cgroup_setup)}</td></tr>{settings}</tbody></table>"
        )

    def __repr__(self) -> str:
        lines = [f"nsmagic: what this kernel (uid {self.uid}) can isolate, probed just now",
                 f"{'namespace':<10} {'flag':<4} {'kernel inode':<20} {'create':<8} {'limit':<8} hint"]
        for k in self.kinds:
            lines.append(f"{k.name:<10} {BY_FLAG[k.flag].letter:<4} {k.inode:<20} {k.status:<8} {_limit(k):<8} {k.hint}")
        lines.append(f"cgroups: {self.cgroup}")
        lines.append(f"cgroup limits: {self.cgroup_setup}")
        lines += [f"{n}: {v}" for n, v in self.settings.items()]
        return "\n".join(lines)


def _limit(kind: Kind) -> str:
    """The kind's /proc/sys/user/max_*_namespaces value: how many a user may have at once."""
    return "-" if kind.limit is None else str(kind.limit)


def probe() -> Info:
    """Probe every namespace kind; takes a few milliseconds per kind."""
    kinds = []
    for kind in KINDS:
        flag = kind.flag
        limit = _read_int(f"/proc/sys/user/max_{kind.proc}_namespaces")
        direct = _can_unshare(flag)
        with_user = direct or (flag != CloneFlag.NEWUSER and _can_unshare(flag, in_user=True))
        kinds.append(Kind(flag, _inode(flag), direct, with_user, limit))
    from .environment.cgroups import describe

    return Info(os.geteuid(), kinds, cgroup_version(), _settings(), describe())


def _inode(flag: CloneFlag) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{BY_FLAG[flag].proc}")
    except OSError:
        return "(none)"


def _can_unshare(flag: CloneFlag, in_user: bool = False) -> bool:
    """Try it in a forked child: the kernel is multi-threaded, and user and time namespaces
    are refused to a multi-threaded process."""
    pid = fork()
    if pid == 0:
        ok = 1
        try:
            if in_user:
                unshare(CloneFlag.NEWUSER)
            unshare(flag)
            ok = 0
        finally:
            os._exit(ok)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def cgroup_version() -> str:
    """``v2``, ``v1`` or ``hybrid``, with the controllers' whereabouts."""
    unified = {}
    v1 = []
    for m in mountinfo.read():
        if m.fstype == "cgroup2":
            unified[m.point] = m.point
        elif m.fstype == "cgroup":
            v1 += [o for o in m.super_options.split(",")
                   if o not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec")]
    if v1 and unified:
        return f"hybrid: v1 controllers ({', '.join(sorted(set(v1)))}) and a v2 mount at {', '.join(unified)}"
    if v1:
        return f"v1 ({', '.join(sorted(set(v1)))})"
    if unified:
        return f"v2 at {', '.join(unified)}"
    return "none mounted"


def _settings() -> dict[str, str]:
    out = {}
    for path in ("/proc/sys/kernel/unprivileged_userns_clone",
                 "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
                 "/proc/sys/user/max_user_namespaces"):
        value = _read_text(path)
        if value is not None:
            out[path] = value
    if "/proc/sys/kernel/apparmor_restrict_unprivileged_userns" not in out:
        out["AppArmor user-namespace restriction"] = "not present"
    if "/proc/sys/kernel/unprivileged_userns_clone" not in out:
        out["kernel.unprivileged_userns_clone"] = "not present (unprivileged user namespaces are not switched off by it)"
    return out


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    return int(text) if text and text.lstrip("-").isdigit() else None
