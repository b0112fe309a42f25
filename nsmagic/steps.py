"""The child's set-up checklist: each namespace step, in the order Linux needs them.

Each step does nothing unless its option was asked for, and fails with a :class:`StepFailed`
that names the system call and says what to do. All of them run before any of the cell's code.

Order matters:

1. ``unshare(CLONE_NEWUSER)`` first, alone, so that every other namespace is owned by it and a
   refusal is blamed on the right thing; then the uid/gid maps (``deny`` to
   ``/proc/self/setgroups`` before ``gid_map``, or an unprivileged write is refused).
2. ``unshare`` of the remaining flags. CLONE_NEWPID only moves where *children* are born, which
   is why the kernel does it itself just before fork() when it can (see :mod:`nsmagic.clone`);
   with a user namespace it must be done here and followed by a second fork.
3. The time namespace's clock offsets, which can only be written before any process enters it;
   then this process enters it (setns on ``time_for_children``) unless a fork follows anyway.
4. Inside (in the process that runs the cell): mounts made private before anything is mounted,
   so nothing shows on the host; a fresh ``/proc``; the hostname.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Callable, Mapping, TypeVar, Union

from . import syscalls
from .errors import StepFailed
from .spec import Namespaces
from .syscalls import CloneFlag


#: When ``--explain`` asks for it, every step done is written here, as the system call it is,
#: with the process that made it.
log: list[tuple[str, str]] | None = None
where = "child"

T = TypeVar("T")
#: Words to add to a failed step's errno text: per errno, always, or made from the errno.
Hints = Union[Mapping[int, str], str, Callable[[int], str], None]


def record(call: str) -> None:
    """Note a system call done for ``--explain`` (parts call this for their own steps)."""
    if log is not None:
        log.append((where, call))


_NEWUSER, _NEWPID = int(CloneFlag.NEWUSER), int(CloneFlag.NEWPID)


def enter_namespaces(spec: Namespaces, uid: int, gid: int, *, pid_done: bool) -> None:
    """Steps 1 to 3, in the single-threaded child."""
    if spec.user:
        _unshare(_NEWUSER, in_user_ns=False)
        if spec.map_root_user:
            _write_id_maps(uid, gid)
    rest = spec.flag_bits & ~_NEWUSER
    if pid_done:
        rest &= ~_NEWPID
    if rest:
        _unshare(rest, in_user_ns=spec.user)
    if spec.time:
        _set_clock_offsets(spec.monotonic, spec.boottime)
        if not rest & _NEWPID:
            _enter_own_time_namespace()


def set_up_inside(spec: Namespaces) -> None:
    """Step 4, in the process that will run the cell."""
    if spec.mount:
        do('mount(NULL, "/", NULL, MS_REC|MS_PRIVATE)', syscalls.mount, None, "/", None,
            syscalls.MS_REC | syscalls.MS_PRIVATE)
    if spec.mount_proc:
        do('mount("proc", "/proc", "proc", MS_NOSUID|MS_NODEV|MS_NOEXEC)', syscalls.mount, "proc", "/proc",
            "proc", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    if spec.hostname is not None:
        do(f"sethostname({_quote(spec.hostname)})", socket.sethostname, spec.hostname)


def _unshare(flags: int, *, in_user_ns: bool) -> None:
    flags = CloneFlag(flags)
    do(f"unshare({flags.spelled()})", syscalls.unshare, int(flags),
       hints=lambda err: f"; {syscalls.advice(flags, err, in_user_ns)}")


def _write_id_maps(uid: int, gid: int) -> None:
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")


def _set_clock_offsets(monotonic: float, boottime: float) -> None:
    lines = []
    for clock, offset in (("monotonic", monotonic), ("boottime", boottime)):
        if offset:
            secs = int(offset // 1)
            nsecs = int(round((offset - secs) * 1e9))
            lines.append(f"{clock} {secs} {nsecs}")
    if lines:
        _write("/proc/self/timens_offsets", "\n".join(lines))


def _enter_own_time_namespace() -> None:
    def enter():
        fd = os.open("/proc/self/ns/time_for_children", os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, CloneFlag.NEWTIME)
        finally:
            os.close(fd)

    do('setns(open("/proc/self/ns/time_for_children"), CLONE_NEWTIME)', enter)


def _write(path: str, text: str) -> None:
    def write():
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    do(f"write({_quote(path)}, {_quote(text)})", write)


def do(step: str, fn: Callable[..., T], *args, hints: Hints = None, explained: bool = True) -> T:
    """Run one set-up step, ``fn(*args)``, and note it for ``--explain`` as *step* (the system call
    as a student would write it), unless its part explains it from the kernel (*explained* False).

    An :class:`OSError` becomes :class:`StepFailed` naming *step*, worded with the errno's text and
    *hints*: words appended for that errno (a dict), for any errno (a string), or made from it (a
    function). Every step of the child's set-up, here and in the parts, goes through this.
    """
    try:
        result = fn(*args)
    except OSError as e:
        err = e.errno or errno.EIO
        raise StepFailed(step, err, f"{os.strerror(err)}{_hint(hints, err)}") from None
    if explained:
        record(step)
    return result


def _hint(hints: Hints, err: int) -> str:
    if hints is None:
        hints = _HINTS
    if isinstance(hints, str):
        return hints
    if callable(hints):
        return hints(err)
    return hints.get(err, "")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_HINTS = {
    errno.EPERM: " (this needs privilege in the namespace; -r gives root inside a user namespace)",
    errno.ERANGE: " (a clock offset would move the clock below zero)",
}
