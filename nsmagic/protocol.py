"""The framed pipe between the kernel and its child.

A frame is a kind byte, an 8-byte length and the payload. Framing is kept apart from what the
payloads mean (the shape of ``multiprocessing.connection``): the child writes whole frames with
blocking writes, the kernel feeds whatever bytes it has read into a :class:`FrameReader`, which
may hold half a frame between reads. A child that dies between frames and one that dies in the
middle of a frame are different events: the first is a crash, the second a :class:`ProtocolError`.

Payloads are pickled with the standard library (they hold only plain data made by nsmagic's own
child code), except ``SETUP_FAILED``, a tiny text record in the manner of subprocess's
``name:errno:message``, because a failed set-up step should not depend on pickle working.
"""

from __future__ import annotations

import enum
import os
import pickle
import struct

from .errors import ProtocolError

_HEADER = struct.Struct("!BQ")


class Kind(enum.IntEnum):
    """What a frame carries."""

    #: Child to kernel: a set-up step failed: ``step NUL errno NUL message``.
    SETUP_FAILED = 1
    #: Child to kernel: ``display()`` data: dict with data, metadata, transient, update.
    DISPLAY = 2
    #: Child to kernel: ``clear_output(wait)``.
    CLEAR_OUTPUT = 3
    #: Child to kernel: ``input()`` asks the notebook: (prompt, password).
    INPUT = 4
    #: Child to kernel: the cell is over; the report (see :mod:`nsmagic.outcome`). If it has
    #: parked pieces, the child waits for the answer: empty once the kernel has copied them,
    #: b"push" to have them written into the memfd instead (then PUSHED follows).
    DONE = 5
    #: Child to kernel: my namespaces are made; do your side (a veth, a cgroup) and answer.
    READY = 7
    #: Child to kernel: for --explain, the steps it made and its namespaces; answered when shown.
    EXPLAIN = 8
    #: Child to kernel: a message for the front end that is not display data (a widget's comm
    #: messages), for the kernel to send as its own; answered when sent.
    IOPUB = 9
    #: Child to kernel: the parked pieces are in the memfd now.
    PUSHED = 10
    #: Kernel to box: run a cell (see nsmagic.box); the cell's memfd comes with it.
    RUN = 11
    #: Box to kernel: my namespaces and set-up are done; I wait for cells.
    STARTED = 12
    #: Kernel to child: the answer to INPUT: (ok, text or reason); empty after DISPLAY and
    #: CLEAR_OUTPUT, READY, EXPLAIN and IOPUB, to say they are done (b"no" after a failed READY);
    #: after DONE, see there.
    ANSWER = 6


#: A plain dict lookup, not ``Kind(n)``: enum's call path touches a dozen objects, and every
#: page touched right after a fork is a page copied.
_KIND_OF = {int(kind): kind for kind in Kind}


HEADER_SIZE = _HEADER.size


def header(kind: Kind, length: int) -> bytes:
    return _HEADER.pack(kind, length)


def parse_header(data: bytes) -> tuple[Kind, int]:
    kind, length = _HEADER.unpack(data)
    if kind not in _KIND_OF:
        raise ProtocolError(f"a frame of unknown kind {kind}")
    return _KIND_OF[kind], length


def send(fd: int, kind: Kind, payload: bytes = b"") -> None:
    """Write one whole frame to a blocking pipe."""
    view = memoryview(_HEADER.pack(kind, len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def send_obj(fd: int, kind: Kind, obj) -> None:
    send(fd, kind, dumps(obj))


def load(payload: bytes):
    try:
        return pickle.loads(payload)
    except Exception as e:  # the payload was made by our own child: garbage means a bug
        raise ProtocolError(f"a frame from the child could not be decoded ({e})") from None


def setup_record(step: str, err: int, message: str) -> bytes:
    return b"\0".join([step.encode(), str(err).encode(), message.encode("utf-8", "replace")])


def parse_setup_record(payload: bytes) -> tuple[str, int, str]:
    try:
        step, err, message = payload.split(b"\0", 2)
        return step.decode(), int(err), message.decode("utf-8", "replace")
    except ValueError:
        raise ProtocolError(f"a set-up failure record from the child is garbled: {payload[:80]!r}") from None


class FrameReader:
    """Turns the bytes read from a pipe, in pieces of any size, back into frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Kind, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buf)
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            if kind not in _KIND_OF:
                raise ProtocolError(f"the child sent a frame of unknown kind {kind}")
            kind = _KIND_OF[kind]
            frames.append((kind, bytes(self._buf[_HEADER.size:end])))
            del self._buf[:end]
        return frames

    def eof(self) -> None:
        """The pipe closed: fine between frames, a :class:`ProtocolError` inside one."""
        if self._buf:
            raise ProtocolError(
                f"the child's report was cut off after {len(self._buf)} bytes of an unfinished frame"
            )


def recv_blocking(fd: int) -> tuple[Kind, bytes]:
    """Read exactly one frame from a blocking pipe (the child's side of ANSWER)."""
    kind, length = parse_header(read_exact(fd, _HEADER.size))
    return kind, read_exact(fd, length)


def read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("the kernel closed the pipe")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
