"""How values cross from the child back into the kernel.

Values are pickled with cloudpickle (so functions and classes defined in the notebook travel by
value) at protocol 5. Large pieces (numpy arrays and anything else exposing PickleBuffer, and
pickles of 64 KiB or more) go out of band, and only a small index travels through the pipe.
The child keeps those pieces where they are and says where they are; the kernel copies them
straight out of the child's memory with process_vm_readv(2) into one fresh private mapping
(with transparent huge pages where Linux offers them), then lets the child exit. That is a
single copy into memory that is the kernel's own, which is why it is fast: writing the pieces
into a file first costs a shared-memory page allocation per 4 KiB page on top of the copy.
Where the kernel may not read the child's memory (an unprivileged kernel and a child
that made itself undumpable, or a security module that forbids it), the child writes the
pieces into a memfd that the kernel created before the fork, and the kernel maps that file
copy-on-write instead. Either way the mapping lives as long as any value built on it does.

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

from .syscalls import buffer_address, read_process_memory

#: Buffers and pickles at least this large go out of band, not through the pipe.
OUT_OF_BAND = 64 * 1024
_ALIGN = 64
_HUGE_PAGE = 2 << 20


@dataclass
class Packed:
    """One pickled value: its pickle (inline, or a span of the out-of-band area) and the spans
    of its buffers there."""

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


@dataclass
class Parked:
    """Where the child's out-of-band pieces are: the size of the area they make up in the
    kernel, and each piece's ``(offset there, address in the child, length)``."""

    size: int
    pieces: list[tuple[int, int, int]]


class Packer:
    """The child's side: pickles values, and parks large pieces until the kernel has them."""

    def __init__(self, memfd: int, namespace: dict | None = None):
        self.fd = memfd
        self.end = 0
        self.namespace = namespace
        self._parked: list[tuple[int, memoryview]] = []  # the views keep the pieces in place

    def _put(self, data) -> tuple[int, int]:
        start = -(-self.end // _ALIGN) * _ALIGN
        view = memoryview(data).cast("B")
        self._parked.append((start, view))
        self.end = start + view.nbytes
        return start, view.nbytes

    def parked(self) -> Parked | None:
        """What the kernel must fetch before the child may exit (None: nothing)."""
        if not self._parked:
            return None
        return Parked(self.end, [(start, buffer_address(view), view.nbytes) for start, view in self._parked])

    def push(self) -> None:
        """Write the parked pieces into the memfd, for a kernel that cannot read them here."""
        for offset, view in self._parked:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n

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


#: Below this, one thread copies; above, one per CPU (up to 8), each at least this much.
_PARALLEL = 32 << 20


def _copy(pid: int, pieces: list[tuple[int, int, int]], total: int) -> None:
    """Copy *pieces* out of *pid*, in several threads when they are large: page allocation
    and copying then run on every CPU (docs/performance.md has the figures).
    Returns only once every thread is done, even if interrupted: none may write into the
    area after its caller has let it go."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = 1
    groups = _split(pieces, min(cpus, 8, max(1, total // _PARALLEL)))
    errors: list[OSError] = []

    def work(group):
        try:
            read_process_memory(pid, group)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(g,), name="nsmagic-copy") for g in groups[1:]]
    for thread in threads:
        thread.start()
    interrupted = None
    try:
        work(groups[0])
    finally:
        for thread in threads:
            while thread.is_alive():
                try:
                    thread.join()
                except KeyboardInterrupt as e:
                    interrupted = e
    if interrupted is not None:
        raise interrupted
    if errors:
        raise errors[0]


def _split(pieces: list[tuple[int, int, int]], k: int) -> list[list[tuple[int, int, int]]]:
    """*pieces* cut into *k* groups of about equal bytes, cut at huge-page multiples."""
    if k <= 1:
        return [pieces]
    share = -(-sum(n for _, _, n in pieces) // k // _HUGE_PAGE) * _HUGE_PAGE
    groups: list[list[tuple[int, int, int]]] = [[]]
    room = share
    for here, there, n in pieces:
        while n:
            if room == 0:
                groups.append([])
                room = share
            take = min(n, room)
            groups[-1].append((here, there, take))
            here, there, n, room = here + take, there + take, n - take, room - take
    return groups


class Unpacker:
    """The kernel's side: fetches the out-of-band area once and rebuilds values on it."""

    def __init__(self, memfd: int, namespace: dict | None = None):
        self.fd = memfd
        self.namespace = namespace or {}
        self._view: memoryview | None = None

    def pull(self, pid: int, parked: Parked) -> bool:
        """Copy the parked pieces out of process *pid*; False if Linux does not let us (then
        the child must :meth:`~Packer.push` them into the memfd)."""
        try:
            area = mmap.mmap(-1, parked.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError:
            return False
        if parked.size >= _HUGE_PAGE and hasattr(area, "madvise"):
            try:
                area.madvise(mmap.MADV_HUGEPAGE)  # 512 times fewer page faults, when available
            except (OSError, AttributeError):
                pass
        base = buffer_address(area)
        try:
            _copy(pid, [(base + start, there, n) for start, there, n in parked.pieces], parked.size)
        except OSError:
            area.close()
            return False
        self._view = memoryview(area)
        return True

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
