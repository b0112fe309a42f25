"""The kernel's handle on one forked child: its pid and pidfd, signals, and its end.

A child goes through one explicit state at a time::

    FORKED --watch()--> WATCHED --reap()-----------> REAPED
                           \\--leave_to_reaper()--> LEFT

``FORKED``: the pid is known but no pidfd is open yet (an interrupt can land right after the
fork). ``WATCHED``: a pidfd is open, so the child's exit can be waited for in a poll loop next to
its pipes. ``REAPED``: this thread waited for it. ``LEFT``: the reaper thread (nsmagic.clone)
waits for it, so that the kernel does not wait for a teardown (a network namespace, a large
copy-on-write heap) or for a child stuck in an uninterruptible call. Either way the clean-up
(a veth pair, a cgroup) runs once, after the child is gone.
"""

from __future__ import annotations

import enum
import os
import select
import time
from typing import Callable

from .clone import reaper


class State(enum.Enum):
    FORKED = "forked"
    WATCHED = "watched"
    REAPED = "reaped"
    LEFT = "left to the reaper"


class Child:
    """One child process of the kernel."""

    def __init__(self, pid: int, cleanup: Callable[[], None] | None = None):
        self.pid = pid
        self.pidfd = -1
        self.state = State.FORKED
        self.status: int | None = None
        self._cleanup = cleanup

    @property
    def done(self) -> bool:
        """Whether nothing more is to be done for it here (reaped, or handed to the reaper)."""
        return self.state in (State.REAPED, State.LEFT)

    def watch(self) -> int:
        """Open the pidfd that becomes readable when the child ends; return it."""
        self.pidfd = os.pidfd_open(self.pid)
        self.state = State.WATCHED
        return self.pidfd

    def signal(self, sig: int, group: bool = True) -> None:
        """Signal the child; with *group*, its whole process group (what it started too)."""
        if self.done:
            return
        if group:
            try:
                os.killpg(self.pid, sig)
                return
            except ProcessLookupError:  # not yet (or no longer) a group leader
                pass
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, seconds: float) -> bool:
        """Wait up to *seconds* for the child to exit (without reaping it); whether it did."""
        if self.pidfd < 0:
            return False
        end = time.monotonic() + max(0.0, seconds)
        while True:
            left = end - time.monotonic()
            if _readable(self.pidfd, left):
                return True
            if left <= 0:
                return False

    def reap(self) -> int:
        """Wait for the child here (it must have ended, or be about to), then clean up; its
        wait status."""
        if self.state is State.REAPED:
            return self.status
        try:
            _, self.status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped elsewhere (a nested run's handler): nothing to read
            self.status = 0
        finally:
            self.state = State.REAPED
            self._run_cleanup()
        return self.status

    def leave_to_reaper(self) -> None:
        """Let the reaper thread wait for the child and clean up after it."""
        if self.done:
            return
        self.state = State.LEFT
        cleanup, self._cleanup = self._cleanup, None
        reaper.reap(self.pid, cleanup)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def _run_cleanup(self) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()


def _readable(fd: int, seconds: float = 0.0) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(min(max(0, int(seconds * 1000)), (1 << 31) - 1)))
