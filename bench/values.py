"""Target 4: bringing a 100 MB numpy array back with ``-o``, against an in-band pickle in a pipe."""

from __future__ import annotations

from .core import Verdict, at_least, at_most, interleave, median, ms, say
from .kernel import Kernel

SIZE = 100_000_000

SETUP = f"""\
import pickle
import numpy as np
N = {SIZE} // 8

def _bench_array():
    # Every page written at memory speed: what is timed is moving the array, not making its
    # numbers (a random generator alone is slower than the copy being measured).
    return np.full(N, 1.5)

def _bench_inband():
    # What one would write without nsmagic: a forked child pickles the array in-band (protocol 5,
    # no buffer_callback) into a pipe; the parent reads it into one preallocated buffer, unpickles.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            data = pickle.dumps(_bench_array(), protocol=5)
            os.write(w, len(data).to_bytes(8, 'little'))
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(0)
    os.close(w)
    with open(r, 'rb', buffering=0) as f:
        size = int.from_bytes(f.read(8), 'little')
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            got += f.readinto(view[got:])
    os.waitpid(pid, 0)
    return pickle.loads(buf)
"""

NSMAGIC = "%%innamespace -u -o arr\narr = _bench_array()"
BASELINE = "arr = _bench_inband()"
MAKE = "_a = _bench_array(); del _a"  # the array alone, made in the kernel
PREPARE = "arr = None; gc.collect(); _bench_reset_peak(); _rss0 = _bench_status('VmRSS')"
GROWTH = {"peak": "_bench_status('VmHWM') - _rss0", "nbytes": "arr.nbytes"}
# Touch one element per page, so that pages the kernel only mapped (a memfd, if the values came
# that way) count as well.
TOUCH = "_ = float(arr[::512].sum())"


def array_out(quick: bool) -> list[Verdict]:
    n = 9 if quick else 21
    growth: dict[str, list[int]] = {NSMAGIC: [], BASELINE: []}
    untouched: list[int] = []

    with Kernel() as k:
        k.run(SETUP)

        def cell(code):
            def timed():
                k.run(PREPARE)
                seconds = k.run(code)[0]
                if code is NSMAGIC:
                    untouched.append(k.run("", GROWTH)[1]["peak"])
                values = k.run(TOUCH, GROWTH)[1]
                assert values["nbytes"] == SIZE, values
                growth[code].append(values["peak"])
                return seconds
            return timed

        for _ in range(4):  # warm up: the first 100 MB allocations of a fresh kernel are 3x slower
            cell(NSMAGIC)(), cell(BASELINE)()  # here (the VM's host backs its memory lazily)
        for v in growth.values():
            v.clear()
        untouched.clear()
        ns, base, make = interleave(cell(NSMAGIC), cell(BASELINE), k.timer(MAKE), n=n, timer=lambda fn: fn())

    t_ns, t_base = median(ns), median(base)
    gbps, gbps_base = SIZE / t_ns / 1e9, SIZE / t_base / 1e9
    g_ns, g_base = median(growth[NSMAGIC]) / SIZE, median(growth[BASELINE]) / SIZE
    say(f"  -o arr: nsmagic cell {ms(t_ns)} ({gbps:.2f} GB/s), in-band pipe cell {ms(t_base)} "
        f"({gbps_base:.2f} GB/s); peak RSS growth {g_ns:.2f}x vs {g_base:.2f}x the array")
    base_text = f"{gbps_base:.2f} GB/s ({ms(t_base)} cell, in-band pickle via pipe)"
    return [
        Verdict("`-o arr`, 100 MB array: end-to-end rate", "-", f"{gbps:.2f} GB/s ({ms(t_ns)} cell)",
                None, ">= 2 GB/s", gbps >= 2,
                note=f"cell = make the array in the child + bring it back; median of {n} interleaved; "
                     f"a plain cell that only makes the array takes {ms(median(make))}"),
        Verdict("`-o arr`: the transport alone", f"{ms(median(make))} (a plain cell making the array)",
                f"{SIZE / max(t_ns - median(make), 1e-9) / 1e9:.2f} GB/s", None, "(information)", None,
                note="nsmagic's cell time minus the time to make the array: the cost of bringing it back"),
        at_least("`-o arr` vs in-band pickle through a pipe", base_text, f"{gbps:.2f} GB/s",
                 t_base / t_ns, 4),
        at_most("`-o arr`: kernel peak RSS growth / array size",
                f"{SIZE / 1e6:.0f} MB array; in-band pipe grew {g_base * SIZE / 1e6:.0f} MB ({g_base:.2f}x)",
                f"{g_ns * SIZE / 1e6:.0f} MB", g_ns, 1.2,
                note=f"after touching every page of arr; before touching it: "
                     f"{median(untouched) / 1e6:.1f} MB (the kernel copies the array out of the "
                     "child into memory of its own; it makes no other copy)"),
    ]
