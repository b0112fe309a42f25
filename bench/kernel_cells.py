"""Targets 1 and 2: what a namespaced cell costs a notebook user, measured from the client."""

from __future__ import annotations

import inspect

from . import floor
from .core import floor_note, Verdict, at_most, interleave, median, ms, say
from .kernel import Kernel

BODY = "x = 1"
PLAIN = BODY
ISOLATED = f"%%innamespace -u -i -p -m\n{BODY}"
WITH_NET = f"%%innamespace -u -i -p -m -n\n{BODY}"
NET_ONLY = f"%%innamespace -n\n{BODY}"

# The least a fork-based cell can cost in this kernel: bench.floor's fork_pipe, run in the kernel
# (which cannot import bench) from its own source.
FLOOR_SETUP = (f"_bench_floor = {{}}\nexec({inspect.getsource(floor)!r}, _bench_floor)\n"
               "_bench_fork_cell = _bench_floor['fork_pipe']")
FLOOR = f"_bench_fork_cell({BODY!r})"


def round_trip(quick: bool) -> list[Verdict]:
    n = 40 if quick else 200
    with Kernel() as k:
        k.run(FLOOR_SETUP)
        for code in (PLAIN, ISOLATED, WITH_NET, FLOOR) * 5:  # warm up: imports, caches, the reaper thread
            k.run(code)
        plain, iso, net, floor = interleave(k.timer(PLAIN), k.timer(ISOLATED), k.timer(WITH_NET),
                                            k.timer(FLOOR), n=n, timer=lambda fn: fn())
    p = median(plain)
    say(f"  cell round trip medians of {n}: plain {ms(p)}, -uipm {ms(median(iso))}, "
        f"-uipmn {ms(median(net))}, bare fork cell {ms(median(floor))}")
    bare = median(floor) / p
    return [
        at_most("cell round trip `-u -i -p -m`", f"{ms(p)} (plain cell)", ms(median(iso)),
                median(iso) / p, 2.0, note="; ".join(filter(None, [
                    f"median of {n} interleaved, body `{BODY}`", floor_note("the bare fork cell", bare, 2.0)]))),
        at_most("cell round trip `-u -i -p -m -n`", f"{ms(p)} (plain cell)", ms(median(net)),
                median(net) / p, 2.3, note=floor_note("the bare fork cell", bare, 2.3)),
        Verdict("floor: a cell that forks, pipes a pickle back, reaps in a thread", ms(median(floor)),
                f"{ms(median(iso))} (`-u -i -p -m`)", median(iso) / median(floor), "(information)", None,
                note="ratio = nsmagic / floor; the floor has no namespaces and no IPython in the child: "
                     "what any fork-based cell costs in this kernel"),
    ]


def many_net_cells(quick: bool) -> list[Verdict]:
    n, window = (100, 10) if quick else (200, 20)
    with Kernel() as k:
        k.run(PLAIN)
        times = [k.run(NET_ONLY)[0] for _ in range(n)]
    first, last = median(times[:window]), median(times[-window:])
    return [at_most(f"{n} `-n` cells: last {window} vs first {window}", f"{ms(first)} (first {window})",
                    f"{ms(last)} (last {window})", last / first, 1.2,
                    note=f"median of all {n}: {ms(median(times))}, max {ms(max(times))}")]


#: Each flag alone (and a container-like set), to document what each costs and why.
PER_FLAG = ["-u", "-i", "-m", "-p", "-n", "-C", "-T", "-U", "-r", "-p --mount-proc", "-r -p -n --mount-proc",
            "--memory 64M --pids 64"]


def per_flag(quick: bool) -> list[Verdict]:
    n = 15 if quick else 60
    cells = [PLAIN, f"%%innamespace\n{BODY}"] + [f"%%innamespace {f}\n{BODY}" for f in PER_FLAG]
    with Kernel() as k:
        for code in cells * 2:
            k.run(code)
        times = interleave(*(k.timer(c) for c in cells), n=n, timer=lambda fn: fn())
    plain = median(times[0])
    names = ["(no namespace: a bare child)"] + PER_FLAG
    return [Verdict(f"cell `{name}`", f"{ms(plain)} (plain cell)", ms(median(t)), median(t) / plain,
                    "(information)", None, note=f"median of {n} interleaved")
            for name, t in zip(names, times[1:])]
