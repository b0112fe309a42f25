"""The few pieces every target shares: timing, interleaving, verdicts, the machine, the table."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

median = statistics.median


def measure(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds taken by each of *n* calls of *fn*."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def interleave(*fns: Callable[[], object], n: int, timer=None) -> list[list[float]]:
    """Run the *fns* in turn, *n* rounds, so drift (caches, frequency, neighbours) hits them all.

    Each fn is timed with perf_counter unless *timer* is given; a timer is called as
    ``timer(fn)`` and returns seconds (for fns that time themselves, e.g. a kernel round trip).
    Returns one list of times per fn. The order alternates each round (a, b / b, a), so no fn
    always runs right after another.
    """
    timer = timer or (lambda fn: measure(fn, 1)[0])
    out: list[list[float]] = [[] for _ in fns]
    for r in range(n):
        order = list(enumerate(fns))
        if r % 2:
            order.reverse()
        for i, fn in order:
            out[i].append(timer(fn))
    return out


@dataclass
class Verdict:
    """One target: what was measured against what, and whether it met the target."""

    name: str
    baseline: str
    candidate: str
    ratio: float | None
    target: str
    ok: bool | None  # None: could not be measured (or information only)
    note: str = ""
    failed: bool = False  # the measurement itself raised

    @property
    def verdict(self) -> str:
        return "ERROR" if self.failed else {True: "PASS", False: "MISS", None: "N/A"}[self.ok]

    def line(self) -> str:
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        text = (f"[{self.verdict}] {self.name}: baseline {self.baseline}, nsmagic {self.candidate}, "
                f"ratio {ratio}, target {self.target}")
        return text + (f"  ({self.note})" if self.note else "")


def at_most(name: str, baseline: str, candidate: str, ratio: float, limit: float, note: str = "",
            what: str = "x") -> Verdict:
    return Verdict(name, baseline, candidate, ratio, f"<= {limit:g}{what}", ratio <= limit, note)


def at_least(name: str, baseline: str, candidate: str, ratio: float, limit: float, note: str = "",
             what: str = "x") -> Verdict:
    return Verdict(name, baseline, candidate, ratio, f">= {limit:g}{what}", ratio >= limit, note)


def floor_note(what: str, floor_ratio: float, limit: float, faster: bool = False) -> str:
    """A note for a target that the floor measured in the same run already misses: no design
    built on that floor could meet it on this machine. With *faster*, the ratio is how many
    times faster than the baseline, and the target is a lower bound."""
    if (floor_ratio >= limit) if faster else (floor_ratio <= limit):
        return ""
    if faster:
        return f"{what} alone is {floor_ratio:.2f}x faster: the target is beyond the floor on this machine"
    return f"{what} alone is {floor_ratio:.2f}x: the target is below the floor on this machine"


def ms(seconds: float) -> str:
    v = seconds * 1e3
    return f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        rev = ""
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "commit": rev or "?",
        "load": load(),
    }


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def markdown(verdicts: list[Verdict], mode: str, seconds: float, load_before: str) -> str:
    m = machine()
    lines = [
        f"# nsmagic benchmarks ({mode})",
        "",
        f"- date: {m['date']}, commit {m['commit']}, run took {seconds:.0f} s",
        f"- machine: Linux {m['kernel']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}",
        f"- load average (1/5/15 min) before: {load_before}, after: {m['load']} "
        "(other work on the machine skews every number)",
        "",
        "| target | baseline | nsmagic | ratio | target | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        ratio = "-" if v.ratio is None else f"{v.ratio:.2f}x"
        lines.append(f"| {v.name} | {v.baseline} | {v.candidate} | {ratio} | {v.target} | {v.verdict} |")
    notes = [f"- {v.name}: {v.note}" for v in verdicts if v.note]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def say(*args) -> None:
    print(*args, flush=True)
