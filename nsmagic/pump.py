"""One loop that passes on everything a child does, until a condition holds or a deadline passes.

A child can write to its stdout or stderr pipe, send a frame on its control pipe (display data,
a question for ``input()``, its report), or exit (its pidfd becomes readable). The loop waits on
all of them at once in the calling thread: nothing sleeps or polls on a timer, and the pipes are
always drained, so a child printing 50 MB never blocks on a full pipe while the kernel waits for
something else. One-shot cells and boxes (long-lived children that run many cells) use the same
loop; what a frame means is the caller's (see :mod:`nsmagic.dispatch`).

Order: what the child wrote to a stream before it sent a frame is passed on before the frame is
handled (the child flushes its streams first; the loop drains them before each frame), and a
report sent just before an exit is read before the exit is noticed.
"""

from __future__ import annotations

import codecs
import os
import select
import time
from typing import Callable

from .protocol import FrameReader, Kind

_CHUNK = 1 << 16


class StreamDecoder:
    """UTF-8 bytes of one stream, read in pieces of any size, passed on as text.

    A character split across two reads is held until its last byte arrives; bytes that are not
    UTF-8 become U+FFFD rather than an error."""

    def __init__(self, sink: Callable[[str], None]):
        self.sink = sink
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self.sink(text)

    def finish(self) -> None:
        text = self._decoder.decode(b"", final=True)
        if text:
            self.sink(text)


def read_some(fd: int) -> bytes | None:
    """What a non-blocking fd has now: bytes, ``b""`` at end of file, None if nothing yet."""
    try:
        return os.read(fd, _CHUNK)
    except BlockingIOError:
        return None


class Pump:
    """The kernel's side of a child's pipes and pidfd.

    *streams* maps each stream pipe (read end, non-blocking) to its decoder; *control* is the
    frame pipe (read end, non-blocking), whose frames go to *on_frame(kind, payload)*; *pidfd*
    is the child's. After :meth:`run` has seen the pidfd fire, :attr:`exited` is true.
    """

    def __init__(self, streams: dict[int, StreamDecoder], control: int, on_frame: Callable[[Kind, bytes], None],
                 pidfd: int):
        self.streams = streams
        self.control = control
        self.on_frame = on_frame
        self.pidfd = pidfd
        self.reader = FrameReader()
        self.exited = False
        self._poller = select.poll()
        self._open = {*streams, control, pidfd}
        for fd in self._open:
            self._poller.register(fd, select.POLLIN)

    def run(self, until: Callable[[], bool], deadline: float | None = None) -> bool:
        """Pass on what the child does until *until()* holds (True) or *deadline* (a
        ``time.monotonic()`` value) passes first (False)."""
        while not until():
            wait_ms = -1
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait_ms = max(1, int(left * 1000))
            if self.exited:  # what the child sent before it ended has been passed on
                return until()
            events = self._poller.poll(wait_ms)
            # Streams first: what the child wrote before a frame must be shown before it.
            for fd, _ in sorted(events, key=lambda e: e[0] in (self.control, self.pidfd)):
                if fd in self.streams:
                    self._read_stream(fd)
                elif fd == self.control:
                    self._read_control()
                elif fd == self.pidfd and not self.exited:
                    # A report sent just before the exit is still in the pipe: read it first.
                    while self.control in self._open and self._read_control():
                        pass
                    self.drain_streams()
                    self.exited = True
                    self._forget(self.pidfd)
                if until():
                    break
        return True

    def _read_stream(self, fd: int) -> bool:
        data = read_some(fd)
        if data is None:
            return False
        if not data:
            self._forget(fd)
            return False
        self.streams[fd].feed(data)
        return True

    def _read_control(self) -> bool:
        """Read and handle what the control pipe has; False if it had nothing."""
        data = read_some(self.control)
        if data is None:
            return False
        if not data:
            self._forget(self.control)
            self.reader.eof()
            return False
        for kind, payload in self.reader.feed(data):
            self.drain_streams()
            self.on_frame(kind, payload)
        return True

    def drain_streams(self) -> None:
        """Pass on everything the stream pipes hold now."""
        for fd in list(self.streams):
            while fd in self._open and self._read_stream(fd):
                pass

    def finish(self) -> None:
        """Pass on the last bytes of a character cut off by the end of a stream."""
        for decoder in self.streams.values():
            decoder.finish()

    def _forget(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            self._poller.unregister(fd)
