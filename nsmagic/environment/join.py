"""Entering existing namespaces (``--join-net`` ...), as nsenter(1) does, with setns(2).

The targets are opened in the kernel before the fork, so a missing process, a mistyped name or
a file of the wrong kind fails the cell before any child exists; the child inherits the open
descriptors and enters them before it makes any namespace of its own. It is single-threaded,
which setns(2) requires for user and mount namespaces.

The order is nsenter's. Entering a user namespace gives all capabilities *in it* and none
outside it, so every other namespace is tried first (a root kernel may enter them all from
where it is), then the user namespace, then, again, those that were refused for want of
privilege (namespaces owned by the joined user namespace, which an ordinary user may only enter
from inside it). After a user namespace the child becomes uid and gid 0 of that namespace where
they are mapped, as nsenter does unless ``--preserve-credentials``.
"""

from __future__ import annotations

import errno
import fcntl
import os

from ..errors import OptionError, PrivilegeError, StepFailed
from ..kinds import BY_FLAG, BY_PROC, JOINABLE
from ..spec import Namespaces
from ..steps import do
from ..syscalls import setns
from .base import Part

#: ioctl(2) on a namespace file: its CLONE_NEW* type (Linux 4.11).
NS_GET_NSTYPE = 0xB703

#: Kinds in the order they are entered (nsenter's), and their flags.
_FLAGS = {kind: BY_PROC[kind].flag for kind in ("user", "ipc", "uts", "net", "pid", "mnt")}
assert set(_FLAGS) == set(JOINABLE)


class JoinNamespaces(Part):
    def __init__(self, spec: Namespaces):
        self.targets = {kind: str(spec.join[kind]) for kind in _FLAGS if kind in spec.join}
        self.paths: dict[str, str] = {}
        self.fds: dict[str, int] = {}

    def check(self) -> None:
        self.paths = {kind: _resolve(kind, target) for kind, target in self.targets.items()}

    def prepare(self) -> None:
        """Open the targets (a missing or wrong one fails here, before the fork): nothing is made
        on the host, and :meth:`cleanup` closes them."""
        for kind, path in self.paths.items():
            target = self.targets[kind]
            self.fds[kind] = _open(kind, target, path)
            _check_kind(kind, target, path, self.fds[kind])
        if "user" in self.fds and _same(self.fds["user"], "/proc/self/ns/user"):
            os.close(self.fds.pop("user"))  # setns(2) refuses our own user namespace (EINVAL)

    def before_unshare(self) -> None:
        refused = []
        for kind, fd in self.fds.items():
            if kind != "user" and not self._enter(kind, fd, may_refuse="user" in self.fds):
                refused.append(kind)
        if "user" in self.fds:
            self._enter("user", self.fds["user"])
            for kind in refused:
                self._enter(kind, self.fds[kind])
            _become_root_inside()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def _enter(self, kind: str, fd: int, may_refuse: bool = False) -> bool:
        """setns(2) into one namespace; False if refused and *may_refuse* (to retry later)."""
        try:
            do(f"setns({self.paths[kind]}, CLONE_{_FLAGS[kind].name}) for --join-{kind}", setns, fd, _FLAGS[kind],
               hints=lambda err: _advice(kind, err))
            return True
        except StepFailed as e:
            if may_refuse and e.errno == errno.EPERM:
                return False
            raise

    def explain(self) -> list[str]:
        return [f"open({path}) + ioctl(NS_GET_NSTYPE)  [--join-{kind}]" for kind, path in self.paths.items()]

    def cleanup(self) -> None:
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            os.close(fd)


def _resolve(kind: str, target: str) -> str:
    """The namespace file a target names: a path, a PID, or (net only) an ``ip netns`` name."""
    if target.isdigit():
        return f"/proc/{int(target)}/ns/{kind}"
    if "/" in target:
        return target
    if kind == "net" and target and not target.startswith("."):
        return f"/run/netns/{target}"
    extra = ", or a name made with ip netns add" if kind == "net" else ""
    raise OptionError(f"--join-{kind} {target!r}: give a path (/proc/PID/ns/{kind}) or a PID{extra}")


def _open(kind: str, target: str, path: str) -> int:
    option = f"--join-{kind} {target}"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if target.isdigit():
            raise OptionError(f"{option}: there is no process with PID {int(target)}") from None
        if path.startswith("/run/netns/") and "/" not in target:
            raise OptionError(f"{option}: there is no network namespace named {target!r} "
                              f"(ip netns list shows them; ip netns add {target} makes one)") from None
        raise OptionError(f"{option}: {path} does not exist") from None
    except PermissionError:
        why = ("another user's namespaces can only be entered by root" if os.geteuid() != 0 else
               "that process does not allow it (it is not dumpable, or in a more privileged container)")
        raise PrivilegeError(f"{option}: opening {path} was refused: {why}") from None
    except OSError as e:
        raise OptionError(f"{option}: cannot open {path}: {e.strerror}") from None


def _check_kind(kind: str, target: str, path: str, fd: int) -> None:
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        raise OptionError(f"--join-{kind} {target}: {path} is not a namespace file "
                          f"(such as /proc/PID/ns/{kind})") from None
    if nstype != _FLAGS[kind]:
        other = BY_FLAG[nstype].proc if nstype in BY_FLAG else hex(nstype)
        hint = f"; use --join-{other}" if other in _FLAGS else ""
        raise OptionError(f"--join-{kind} {target}: {path} is a {other} namespace, not a {kind} one{hint}")


def _same(fd: int, path: str) -> bool:
    mine, theirs = os.stat(path), os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _become_root_inside() -> None:
    """uid and gid 0 of the joined user namespace, where they are mapped (nsenter's default);
    otherwise the ids stay, shown inside as the overflow id 65534."""
    try:
        os.setgroups([])
    except OSError:  # refused where setgroups is "deny", as after an unprivileged map
        pass
    for change in (os.setgid, os.setuid):
        try:
            do(f"{change.__name__}(0) after --join-user", change, 0, hints={})
        except StepFailed as e:
            if e.errno != errno.EINVAL:  # EINVAL: 0 is not mapped there
                raise


def _advice(kind: str, err: int) -> str:
    if err == errno.EPERM:
        return (f"; entering a {kind} namespace needs CAP_SYS_ADMIN over it: run the kernel as root, "
                "or add --join-user with the namespace's owner, which an ordinary user may enter if "
                "it made it")
    if err == errno.EINVAL:
        return "; Linux refused this combination (a PID namespace that is not a descendant of ours?)"
    return ""
