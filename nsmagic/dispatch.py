"""What the kernel does with each frame a child sends during one cell: a table of handlers.

One :class:`Conversation` lasts one cell, in a one-shot child or in a box. Each frame kind the
child may send has one handler; a kind only the kernel sends, a frame after the final report, or
a final report out of order is a :class:`~nsmagic.errors.ProtocolError`, and the caller kills the
child: the kernel acts on nothing else a child writes into its control pipe.
"""

from __future__ import annotations

import errno
from typing import Callable

from . import protocol
from .errors import PrivilegeError, ProtocolError, SetupError
from .protocol import Kind


class Conversation:
    """The kernel's side of one cell's frames.

    *answers* is the fd the kernel answers on; *unpacker* fetches the report's large pieces;
    *worker_pid* says which process ran the cell (whose memory they are copied from). The
    optional *host_side* (READY: do the parts' kernel-side work) and *explain* (EXPLAIN: show
    the steps) are the run's; a frame of a kind the run did not ask for is refused.
    """

    def __init__(self, sinks, answers: int, unpacker, worker_pid: Callable[[], int], *,
                 host_side: Callable[[], None] | None = None, explain: Callable[[dict], None] | None = None,
                 extra: dict | None = None):
        self.sinks = sinks
        self.answers = answers
        self.unpacker = unpacker
        self.worker_pid = worker_pid
        #: The cell's report once it is complete (its large pieces fetched): the end of the cell.
        self.report = None
        #: Set while the kernel stops the child: its report is not wanted any more.
        self.stopping = False
        self._pushing = None  # a report whose pieces the child is writing into the memfd
        self._host_side = host_side
        self._explain = explain
        self.handlers: dict[Kind, Callable[[bytes], None]] = {
            Kind.DISPLAY: self._display,
            Kind.CLEAR_OUTPUT: self._clear_output,
            Kind.IOPUB: self._iopub,
            Kind.INPUT: self._input,
            Kind.EXPLAIN: self._explain_frame,
            Kind.READY: self._ready,
            Kind.DONE: self._done,
            Kind.PUSHED: self._pushed,
            Kind.SETUP_FAILED: self._setup_failed,
            **(extra or {}),
        }

    def __call__(self, kind: Kind, payload: bytes) -> None:
        if self.report is not None:
            raise ProtocolError(f"the child sent a {kind.name} frame after its final report")
        handler = self.handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"the child sent a {kind.name} frame, which it may not send here")
        handler(payload)

    def reply(self, payload: bytes = b"") -> None:
        try:
            protocol.send(self.answers, Kind.ANSWER, payload)
        except BrokenPipeError:  # the child is gone; its exit is noticed by the pidfd
            pass

    # -- the handlers ---------------------------------------------------------------------------

    def _display(self, payload: bytes) -> None:
        msg = protocol.load(payload)
        self.sinks.display(msg["data"], msg["metadata"], msg["transient"], msg["update"])
        self.reply()

    def _clear_output(self, payload: bytes) -> None:
        self.sinks.clear_output(protocol.load(payload))
        self.reply()

    def _iopub(self, payload: bytes) -> None:
        self.sinks.iopub(**protocol.load(payload))
        self.reply()

    def _input(self, payload: bytes) -> None:
        prompt, password = protocol.load(payload)
        if self.stopping:
            self.reply(protocol.dumps((False, "input() is not available: the cell is being stopped")))
            return
        self.sinks.flush()
        try:
            answer = (True, self.sinks.input(prompt, password))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            answer = (False, f"input() is not available here: {type(e).__name__}: {e}")
        self.reply(protocol.dumps(answer))

    def _explain_frame(self, payload: bytes) -> None:
        if self._explain is None:
            raise ProtocolError("the child sent an EXPLAIN frame that nobody asked for")
        explain, self._explain = self._explain, None  # once
        explain(protocol.load(payload))
        self.reply()

    def _ready(self, payload: bytes) -> None:
        if self._host_side is None:
            raise ProtocolError("the child sent a READY frame, but no part of its run needs the kernel")
        host_side, self._host_side = self._host_side, None  # once
        try:
            host_side()
        except BaseException:
            self.reply(b"no")
            raise
        self.reply()

    def _done(self, payload: bytes) -> None:
        if self._pushing is not None:
            raise ProtocolError("the child sent a second report")
        report = protocol.load(payload)
        if self.stopping:  # the child need not wait for its pieces to be fetched
            if report.parked is not None:
                self.reply()
            return
        if report.parked is None:
            self.report = report
            return
        try:
            pulled = self.unpacker.pull(self.worker_pid(), report.parked)
        except BaseException:
            self.reply()  # interrupted: the child need not wait, and is stopped anyway
            raise
        if pulled:
            self.report = report
            self.reply()
        else:
            self._pushing = report
            self.reply(b"push")

    def _pushed(self, payload: bytes) -> None:
        if self._pushing is None:
            raise ProtocolError("the child said its pieces are in the memfd, but was not asked to put them there")
        self.report, self._pushing = self._pushing, None

    def _setup_failed(self, payload: bytes) -> None:
        raise setup_error(*protocol.parse_setup_record(payload))


def setup_error(step: str, err: int, message: str) -> Exception:
    """The kernel's error for a set-up step that failed in the child."""
    text = f"{step} failed: {message}"
    exc = PrivilegeError(text) if err in (errno.EPERM, errno.EACCES) else SetupError(text)
    exc.errno = err
    return exc
