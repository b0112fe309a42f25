"""How values cross from the child back into the kernel.

Values are pickled with cloudpickle (so functions and classes defined in the notebook travel by
value) at protocol 5. Large buffers (numpy arrays, bytearrays, anything exposing PickleBuffer)
go out of band: the child writes them into a memfd that the kernel created before the fork, and
the kernel maps that file copy-on-write, so a 100 MB array is copied once (into the memfd) and
never again. Only a small index travels through the pipe. The mapping lives as long as any
value that was built on it.

Classes and functions that the kernel already had when the child was forked travel by
reference, not by value: an exception of a class defined in the notebook must come back as an
instance of *that* class, or ``except TutorialError`` would not catch it. An object inherited
through the fork sits at the same address in both processes, so its ``id`` identifies it; one
the cell made under the same name has another, and comes back by value instead.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import sys
import threading
import types
from dataclasses import dataclass, field

import cloudpickle

#: Buffers and pickles at least this large go through the memfd, not the pipe.
OUT_OF_BAND = 64 * 1024
_ALIGN = 64


@dataclass
class Packed:
    """One pickled value: its pickle (inline, or a slice of the memfd) and its buffers."""

    inline: bytes | None
    span: tuple[int, int] | None = None
    buffers: list[tuple[int, int]] = field(default_factory=list)


_kernel_namespace = threading.local()
#: Types pickled by the standard library alone: setting up a cloudpickle pickler costs a fresh
#: fork more than pickling them.
_PLAIN = frozenset({int, float, complex, bool, str, bytes, type(None)})


def _from_kernel(name: str, ident: int, by_value: bytes | None):
    """The kernel's own object under *name*, if it is the very object the child had (same id:
    inherited through the fork, so at the same address); otherwise the child made it, and its
    copy by value is used."""
    namespace = getattr(_kernel_namespace, "ns", None) or {}
    obj = namespace.get(name)
    if obj is not None and id(obj) == ident:
        return obj
    if by_value is None:
        raise pickle.UnpicklingError(f"{name!r} was made in the child and cannot be rebuilt here")
    return pickle.loads(by_value)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, except that classes and functions of the job's namespace go by reference."""

    def __init__(self, file, namespace, buffer_callback):
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self.namespace = namespace

    def reducer_override(self, obj):
        if self.namespace and isinstance(obj, (type, types.FunctionType)):
            name = getattr(obj, "__qualname__", None)
            if name and self.namespace.get(name) is obj:
                try:
                    by_value = cloudpickle.dumps(obj, protocol=5)
                except Exception:
                    by_value = None
                return _from_kernel, (name, id(obj), by_value)
        return super().reducer_override(obj)


class Packer:
    """The child's side: pickles values, putting large pieces into the shared memfd."""

    def __init__(self, memfd: int, namespace: dict | None = None):
        self.fd = memfd
        self.end = 0
        self.namespace = namespace

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
        if type(obj) in _PLAIN:  # the common small result: no cloudpickle machinery to set up
            data = pickle.dumps(obj, protocol=5)
            return Packed(None, self._put(data)) if len(data) >= OUT_OF_BAND else Packed(data)
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

        file = io.BytesIO()
        _Pickler(file, self.namespace, out_of_band).dump(obj)
        data = file.getvalue()
        if len(data) >= OUT_OF_BAND:
            return Packed(None, self._put(data), spans)
        return Packed(data, None, spans)


class Unpacker:
    """The kernel's side: maps the memfd once, lazily, and rebuilds values on it."""

    def __init__(self, memfd: int, namespace: dict | None = None):
        self.fd = memfd
        self.namespace = namespace or {}
        self._view: memoryview | None = None

    def _map(self) -> memoryview:
        if self._view is None:
            size = os.fstat(self.fd).st_size
            # Before Python 3.13 the mapping keeps a duplicate of the memfd open for as long as a
            # value built on it lives; 3.13 can do without it.
            untracked = {"trackfd": False} if sys.version_info >= (3, 13) else {}
            m = mmap.mmap(self.fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                          **untracked)
            self._view = memoryview(m)
        return self._view

    def unpack(self, packed: Packed):
        if packed.inline is not None:
            data = packed.inline
        else:
            start, length = packed.span
            data = self._map()[start:start + length]
        buffers = [self._map()[s:s + n] for s, n in packed.buffers]
        _kernel_namespace.ns = self.namespace
        try:
            return pickle.loads(data, buffers=buffers)
        finally:
            _kernel_namespace.ns = None
