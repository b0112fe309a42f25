"""The errors nsmagic raises, each with a message a student can act on.

Every error here renders as one line in a notebook (``_render_traceback_``, the hook IPython
offers for exactly this), because the interesting part is what happened and what to do, not
where inside nsmagic it was noticed. Exceptions raised by the cell's own code are not wrapped:
they come back as themselves (see :mod:`nsmagic.outcome`).
"""

from __future__ import annotations

import signal


class NsmagicError(Exception):
    """Base class of every error nsmagic raises about a run (not the cell's own errors)."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class OptionError(NsmagicError, ValueError):
    """An option or a combination of options that cannot work; found before the child starts."""


class PrivilegeError(NsmagicError, PermissionError):
    """The kernel may not create a namespace it was asked for."""


class SetupError(NsmagicError, OSError):
    """A set-up step in the child (a mount, a uid map, a hostname) failed before the cell ran."""


class StepFailed(Exception):
    """A set-up step failed in the child, before the cell ran: the system call as it was made, its
    errno, and words saying what to do. The child sends it back as a small record, and the
    kernel raises it as :class:`SetupError` or :class:`PrivilegeError`."""

    def __init__(self, step: str, err: int, message: str):
        super().__init__(f"{step}: {message}")
        self.step, self.errno, self.message = step, err, message


class ChildDied(NsmagicError):
    """The child ended without reporting a result: it exited early, crashed or was killed."""

    def __init__(self, pid: int, status: int, reason: str | None = None):
        self.pid = pid
        self.status = status
        self.reason = reason
        code = _exitcode(status)
        if code < 0:
            how = f"was killed by signal {-code} ({_signame(-code)})"
            self.signal, self.exitcode = -code, None
        else:
            how = f"exited with status {code}"
            self.signal, self.exitcode = None, code
        if reason:
            how = f"{how}: {reason}"
        self.how = how
        super().__init__(self._message())

    def _message(self) -> str:
        return (f"the cell's child process (pid {self.pid}) {self.how} before the cell finished; "
                "nothing it computed came back")


class BoxDied(ChildDied):
    """A box's process ended: during a cell, between cells, or while it was being set up. Its
    state is lost, and its name is free for a new box."""

    def __init__(self, name: str, pid: int, status: int, reason: str | None = None, *,
                 idle: bool = False, starting: bool = False):
        self.box, self.idle, self.starting = name, idle, starting
        super().__init__(pid, status, reason)

    def _message(self) -> str:
        when = ("while it was being set up" if self.starting
                else "between cells" if self.idle else "during this cell")
        return (f"box {self.box!r} (pid {self.pid}) {self.how}, {when}; its state is lost, and the "
                f"name is free: the next --name {self.box} makes a new box")


class CellTimeout(NsmagicError, TimeoutError):
    """The cell ran longer than its timeout, so its child and namespaces were killed."""


class OutputError(NsmagicError):
    """Some variables named with ``-o`` could not be brought back; the others did arrive."""

    def __init__(self, failures: dict[str, str], arrived: list[str]):
        self.failures = failures
        self.arrived = arrived
        parts = "; ".join(f"{name!r}: {why}" for name, why in failures.items())
        got = f" Arrived: {', '.join(arrived)}." if arrived else ""
        super().__init__(f"could not bring back {parts}.{got}")


class ProtocolError(NsmagicError):
    """The child's report was cut short or garbled: a bug in nsmagic, or a cell that wrote
    into nsmagic's private pipe."""


class CellError(NsmagicError):
    """An exception of the cell whose own class could not be rebuilt in the kernel.

    Instances carry the child's class name as their type's ``__name__`` so a notebook's error
    reply still names the original exception.
    """

    def __init__(self, message: str, traceback_lines: list[str]):
        super().__init__(message)
        self.traceback_lines = traceback_lines

    def _render_traceback_(self) -> list[str]:
        return self.traceback_lines


def cell_error(ename: str, evalue: str, traceback_lines: list[str]) -> CellError:
    """A :class:`CellError` whose class is named *ename*, so the notebook's error reply does."""
    cls = type(ename, (CellError,), {"__module__": "nsmagic.child"})
    return cls(evalue, traceback_lines)


class ChildTraceback(Exception):
    """The traceback text of an exception raised in the child, attached as ``__cause__``.

    The same device as ``concurrent.futures.process._RemoteTraceback``: a plain Python traceback
    of the re-raised exception then shows where it happened inside the namespace.
    """

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _exitcode(status: int) -> int:
    import os

    return os.waitstatus_to_exitcode(status)


_SIGNAL_WORDS = {
    signal.SIGSEGV: "segmentation fault",
    signal.SIGKILL: "killed",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "arithmetic error",
    signal.SIGILL: "illegal instruction",
}


def _signame(signum: int) -> str:
    try:
        sig = signal.Signals(signum)
    except ValueError:
        return "unknown signal"
    words = _SIGNAL_WORDS.get(sig)
    return f"{sig.name}, {words}" if words else sig.name
