"""The framed pipe between the kernel and its child.

A frame is a kind byte, an 8-byte length and the payload. Framing is kept apart from what the
payloads mean (the shape of ``multiprocessing.connection``): the child writes whole frames with
blocking writes, the kernel feeds whatever bytes it has read into a :class:`FrameReader`, which
may hold half a frame between reads. A child that dies between frames and one that dies in the
middle of a frame are different events: the first is a crash, the second a :class:`ProtocolError`.

The kernel trusts nothing that comes through this pipe: a program the cell runs may have found
it, and whatever the kernel decodes runs in the host's namespaces. So the reader accepts only
frames of the kinds a child sends, each at most :data:`MAX_FRAME` bytes (a larger declared
length is refused before a byte of it is buffered), and payloads are decoded as plain data:
pickles of ``None``, booleans, numbers, strings, bytes, tuples, lists, dicts and sets only, read
by an unpickler that refuses every global (:func:`load`), so no class is looked up and no
callable is called. ``SETUP_FAILED`` is a tiny text record in the manner of subprocess's
``name:errno:message``, because a failed set-up step should not depend on pickle working. The
only full unpickle is of the values the user asked for (see :mod:`nsmagic.values`), and only
from a final report that carries this kernel's :data:`SECRET`.
"""

from __future__ import annotations

import enum
import hmac
import io
import os
import pickle
import struct

from .errors import ProtocolError

_HEADER = struct.Struct("!BQ")

#: The largest payload either side accepts (display data of a large image fits many times).
MAX_FRAME = 256 << 20

#: Made once per kernel and inherited by every child through the fork: a final report must
#: carry it. A program the cell runs that found the pipe (and cannot read the cell's memory)
#: cannot forge one.
SECRET = os.urandom(16)


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
#: What the kernel accepts from a child: every kind but those only the kernel sends.
_FROM_CHILD = {n: kind for n, kind in _KIND_OF.items() if kind not in (Kind.ANSWER, Kind.RUN)}


HEADER_SIZE = _HEADER.size


def header(kind: Kind, length: int) -> bytes:
    return _HEADER.pack(kind, length)


def parse_header(data: bytes) -> tuple[Kind, int]:
    kind, length = _HEADER.unpack(data)
    if kind not in _KIND_OF:
        raise ProtocolError(f"a frame of unknown kind {kind}")
    _check_length(kind, length)
    return _KIND_OF[kind], length


def send(fd: int, kind: Kind, payload: bytes = b"") -> None:
    """Write one whole frame to a blocking pipe."""
    if len(payload) > MAX_FRAME:
        raise ValueError(f"nsmagic cannot send {len(payload)} bytes in one message; the limit is "
                         f"{MAX_FRAME >> 20} MiB (bring large data back with -o instead)")
    view = memoryview(_HEADER.pack(kind, len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def send_obj(fd: int, kind: Kind, obj) -> None:
    send(fd, kind, dumps(obj))


class _PlainUnpickler(pickle.Unpickler):
    """Builds plain data only: every opcode that would look up a class or a function (and so
    every REDUCE, BUILD or NEWOBJ, which need one) ends in :meth:`find_class`, which refuses."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def load(payload: bytes):
    """Decode a control payload as plain data, running nothing from it."""
    try:
        return _PlainUnpickler(io.BytesIO(payload)).load()
    except Exception as e:  # our own child sends plain data only: anything else is forged
        raise ProtocolError(f"the child sent a message that is not plain data ({_brief(e)}); "
                            "nothing in it was run, and the cell was stopped") from None


def load_record(payload: bytes, fields: tuple[str, ...] | int):
    """:func:`load`, and the shape the kernel's handler expects: a dict with exactly *fields*
    (names), or a tuple of that many items; a :class:`ProtocolError` otherwise, so that a
    garbled message never surfaces as a KeyError deep in a handler."""
    data = load(payload)
    if isinstance(fields, int):
        ok = isinstance(data, tuple) and len(data) == fields
    else:
        ok = isinstance(data, dict) and set(data) == set(fields)
    if not ok:
        raise ProtocolError(f"the child sent a message of the wrong shape ({type(data).__name__}); "
                            "the pipe was written by something else, and the cell was stopped")
    return data


def _brief(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 120 else text[:117] + "..."


def check_secret(token) -> None:
    """A final report must carry this kernel's :data:`SECRET`; a forged one does not."""
    if not isinstance(token, bytes) or not hmac.compare_digest(token, SECRET):
        raise ProtocolError("the cell's final report was not written by nsmagic's child (a program "
                            "in the cell wrote into nsmagic's private pipe); nothing in it was "
                            "used, and the cell was stopped")


def setup_record(step: str, err: int, message: str) -> bytes:
    return b"\0".join([step.encode(), str(err).encode(), message.encode("utf-8", "replace")])


def parse_setup_record(payload: bytes) -> tuple[str, int, str]:
    try:
        step, err, message = payload.split(b"\0", 2)
        return step.decode(), int(err), message.decode("utf-8", "replace")
    except ValueError:
        raise ProtocolError(f"a set-up failure record from the child is garbled: {payload[:80]!r}") from None


def _check_length(kind: int, length: int) -> None:
    if length > MAX_FRAME:
        raise ProtocolError(f"the child announced a message of {length} bytes (kind {kind}); the limit "
                            f"is {MAX_FRAME >> 20} MiB: the pipe was written by something else")


class FrameReader:
    """Turns the bytes read from a pipe, in pieces of any size, back into frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Kind, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buf)
            if kind not in _FROM_CHILD:
                raise ProtocolError(f"the child sent a message of unknown kind {kind}: the pipe was "
                                    "written by something else, and the cell was stopped")
            _check_length(kind, length)
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            kind = _FROM_CHILD[kind]
            frames.append((kind, bytes(self._buf[_HEADER.size:end])))
            del self._buf[:end]
        return frames

    def pending(self) -> int:
        """Bytes of a frame not yet complete."""
        return len(self._buf)

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
