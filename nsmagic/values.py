"""How values cross from the child back into the kernel.

Values are pickled with cloudpickle (so functions and classes defined in the notebook travel by
value) at protocol 5. Large buffers (numpy arrays, bytearrays, anything exposing PickleBuffer)
go out of band: the child writes them into a memfd that the kernel created before the fork, and
the kernel maps that file copy-on-write, so a 100 MB array is copied once (into the memfd) and
never again. Only a small index travels through the pipe. The mapping lives as long as any
value that was built on it.
"""

from __future__ import annotations

import mmap
import os
import pickle
from dataclasses import dataclass, field

#: Buffers and pickles at least this large go through the memfd, not the pipe.
OUT_OF_BAND = 64 * 1024
_ALIGN = 64


@dataclass
class Packed:
    """One pickled value: its pickle (inline, or a slice of the memfd) and its buffers."""

    inline: bytes | None
    span: tuple[int, int] | None = None
    buffers: list[tuple[int, int]] = field(default_factory=list)


class Packer:
    """The child's side: pickles values, putting large pieces into the shared memfd."""

    def __init__(self, memfd: int):
        self.fd = memfd
        self.end = 0

    def _put(self, data) -> tuple[int, int]:
        start = -(-self.end // _ALIGN) * _ALIGN
        view = memoryview(data).cast("B")
        offset = start
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        self.end = offset
        return start, offset - start

    def pack(self, obj) -> Packed:
        import cloudpickle

        spans: list[tuple[int, int]] = []

        def out_of_band(buf: pickle.PickleBuffer) -> bool:
            try:
                raw = buf.raw()
            except BufferError:  # not contiguous: leave it in the pickle
                return True
            if raw.nbytes < OUT_OF_BAND:
                return True
            spans.append(self._put(raw))
            return False

        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
        if len(data) >= OUT_OF_BAND:
            return Packed(None, self._put(data), spans)
        return Packed(data, None, spans)


class Unpacker:
    """The kernel's side: maps the memfd once, lazily, and rebuilds values on it."""

    def __init__(self, memfd: int):
        self.fd = memfd
        self._view: memoryview | None = None

    def _map(self) -> memoryview:
        if self._view is None:
            size = os.fstat(self.fd).st_size
            m = mmap.mmap(self.fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._view = memoryview(m)
        return self._view

    def unpack(self, packed: Packed):
        if packed.inline is not None:
            data = packed.inline
        else:
            start, length = packed.span
            data = self._map()[start:start + length]
        buffers = [self._map()[s:s + n] for s, n in packed.buffers]
        return pickle.loads(data, buffers=buffers)
