"""Target 5: a namespaced cell in a kernel holding gigabytes of small Python objects.

fork() copies the page tables of the whole heap, and the child's exit tears them down again;
a namespaced cell should cost less than a bare fork + _exit + waitpid on the same heap.
"""

from __future__ import annotations

import psutil

from .core import Verdict, at_most, median, ms, say
from .kernel import Kernel

GIB = 1 << 30
MARGIN = 2 * GIB  # for the children, the client and the system

BUILD = """\
_heap, _base, _t = [], _bench_status('VmRSS'), time.perf_counter()
while _bench_status('VmRSS') - _base < {size}:
    _heap.append([(i,) for i in range(1_000_000)])  # about 100 MB of tuples and ints
_heap_bytes, _heap_seconds = _bench_status('VmRSS') - _base, time.perf_counter() - _t
_heap_objects = 2 * sum(map(len, _heap))
"""

# Timed inside the kernel, interleaved as bench.core.interleave does it.
TIMED = """\
def _bench_fork():
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _times['fork()'].append(time.perf_counter() - t)
    os.waitpid(pid, 0)

def _bench_cell():
    get_ipython().run_cell_magic('innamespace', '-u', 'x = 1')

_times = {{'cell': [], 'fork': [], 'fork()': []}}
for _r in range({n}):
    _order = [('cell', _bench_cell), ('fork', _bench_fork)]
    for _name, _fn in (reversed(_order) if _r % 2 else _order):
        _t = time.perf_counter()
        _fn()
        _times[_name].append(time.perf_counter() - _t)
"""


def big_heap(quick: bool, gib: float) -> list[Verdict]:
    n = 7 if quick else 15
    want = int(gib * GIB)
    available = psutil.virtual_memory().available
    note = ""
    if want + MARGIN > available:
        want = max(GIB // 4, int((available - MARGIN) * 0.8))
        note = f"scaled down from {gib:g} GiB: only {available / GIB:.1f} GiB available; "
    with Kernel(timeout=600) as k:
        k.run(BUILD.format(size=want))
        built = k.run("", {"bytes": "_heap_bytes", "s": "_heap_seconds", "objects": "_heap_objects"})[1]
        say(f"  heap: {built['bytes'] / GIB:.2f} GiB, {built['objects'] / 1e6:.0f} M objects, "
            f"built in {built['s']:.1f} s")
        k.run(TIMED.format(n=1))  # warm up
        k.run(TIMED.format(n=n))
        times = k.value("_times")
    cell, fork = median(times["cell"]), median(times["fork"])
    size = f"{built['bytes'] / GIB:.2f} GiB heap"
    return [at_most(f"`-u` cell vs bare fork, {size}", f"{ms(fork)} (fork + _exit + waitpid)", ms(cell),
                    cell / fork, 0.6,
                    note=note + f"{built['objects'] / 1e6:.0f} M objects; timed in the kernel, "
                                f"median of {n} interleaved; of the bare round trip, fork() itself took "
                                f"{ms(median(times['fork()']))}, the rest is the child's exit, which "
                                "nsmagic leaves to its reaper thread")]
