"""Boxes: a cell in a live box, making a box, linking two, and a thousand cells in one box."""

from __future__ import annotations

from .core import Verdict, at_most, interleave, median, ms, say
from .kernel import Kernel

BODY = "x = 1"
FLAGS = "-n -p -u -i -m"
PLAIN = BODY
IN_BOX = f"%%innamespace --name bench\n{BODY}"
ONE_SHOT = f"%%innamespace {FLAGS}\n{BODY}"

#: Read in the kernel: its fds, threads and resident memory, and the same of a box's process.
USAGE = """
def _bench_usage(pid):
    import os
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return (len(os.listdir(f"/proc/{pid}/fd")), threads, rss)
"""


def box_round_trip(quick: bool) -> list[Verdict]:
    n = 40 if quick else 200
    with Kernel() as k:
        k.run(f"%%innamespace --name bench {FLAGS}\n{BODY}")
        for code in (PLAIN, IN_BOX, ONE_SHOT) * 5:
            k.run(code)
        plain, boxed, one_shot = interleave(k.timer(PLAIN), k.timer(IN_BOX), k.timer(ONE_SHOT), n=n,
                                            timer=lambda fn: fn())
        k.run("%nsstop --all")
    p = median(plain)
    say(f"  medians of {n}: plain {ms(p)}, in a box {ms(median(boxed))}, one-shot {ms(median(one_shot))}")
    return [
        at_most(f"box cell round trip (`{FLAGS}` box)", f"{ms(p)} (plain cell)", ms(median(boxed)),
                median(boxed) / p, 1.3, note=f"median of {n} interleaved, body `{BODY}`; no fork per cell"),
        Verdict("one-shot cell with the same flags", f"{ms(p)} (plain cell)", ms(median(one_shot)),
                median(one_shot) / p, "(information)", None, note="what a box saves: the fork"),
    ]


def box_create(quick: bool) -> list[Verdict]:
    n = 15 if quick else 60
    with Kernel() as k:
        made = iter(range(1 << 30))
        for code in (ONE_SHOT, f"%%innamespace --name warm {FLAGS}\n{BODY}") * 3:
            k.run(code)
        k.run("%nsstop --all")

        def create():
            seconds = k.run(f"%%innamespace --name make{next(made)} {FLAGS}\n{BODY}")[0]
            k.run("%nsstop --all")  # not timed
            return seconds

        one_shot, boxes = interleave(k.timer(ONE_SHOT), create, n=n, timer=lambda fn: fn())
    return [at_most(f"making a box (`{FLAGS}`) and running its first cell", f"{ms(median(one_shot))} (one-shot cell)",
                    ms(median(boxes)), median(boxes) / median(one_shot), 1.2,
                    note=f"median of {n} interleaved; the box's end is not timed")]


def nslink(quick: bool) -> list[Verdict]:
    n = 10 if quick else 40
    with Kernel() as k:
        times = []
        for i in range(n + 1):
            k.run(f"%%innamespace --name la{i} -n\npass\n")
            k.run(f"%%innamespace --name lb{i} -n\npass\n")
            seconds = k.value(f"(lambda t0, _: __import__('time').perf_counter() - t0)("
                              f"__import__('time').perf_counter(), get_ipython().run_line_magic('nslink', 'la{i} lb{i}'))")
            k.run("%nsstop --all")
            if i:  # the first imports pyroute2
                times.append(seconds)
    return [at_most("%nslink (a veth pair between two boxes, addressed, up)", "100 ms (target)",
                    ms(median(times)), median(times) / 0.1, 1.0,
                    note=f"median of {n}, timed in the kernel; max {ms(max(times))}")]


def box_thousand(quick: bool) -> list[Verdict]:
    n, window = (400, 50) if quick else (1000, 50)
    with Kernel() as k:
        k.run(USAGE)
        k.run(f"%%innamespace --name long {FLAGS}\n{BODY}")
        for _ in range(20):
            k.run(IN_BOX.replace("bench", "long"))
        worker = k.value("__import__('nsmagic.box').box.get('long').worker")
        before = (k.value("_bench_usage(__import__('os').getpid())"), k.value(f"_bench_usage({worker})"))
        # Each box cell next to a plain one: the ratio of the two cancels the machine's drift
        # (other work, frequency), so a trend left in it is the box's own.
        plain, boxed = interleave(k.timer(PLAIN), k.timer(IN_BOX.replace("bench", "long")), n=n,
                                  timer=lambda fn: fn())
        times = [b / p for b, p in zip(boxed, plain)]
        after = (k.value("_bench_usage(__import__('os').getpid())"), k.value(f"_bench_usage({worker})"))
        k.run("%nsstop --all")
    first, last = median(times[:window]), median(times[-window:])
    say(f"  box cell / plain cell: first {window} {first:.2f}, last {window} {last:.2f}; "
        f"box cells {ms(median(boxed[:window]))} -> {ms(median(boxed[-window:]))}")
    growth = "; ".join(f"{who}: fds {b[0]}->{a[0]}, threads {b[1]}->{a[1]}, RSS {b[2] >> 20}->{a[2] >> 20} MiB"
                       for who, b, a in zip(("kernel", "box"), before, after))
    return [
        at_most(f"{n} cells in one box: last {window} vs first {window}",
                f"{first:.2f}x a plain cell (first {window})", f"{last:.2f}x (last {window})", last / first, 1.1,
                note=f"each a median of box cell / plain cell, interleaved; {growth}"),
    ]
