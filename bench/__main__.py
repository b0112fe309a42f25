"""``python -m bench [--quick | --full] [--heap-gib N] [--only NAME ...]``"""

from __future__ import annotations

import argparse
import datetime
import socket
import time
import traceback
from pathlib import Path

from .boxes import box_create, box_round_trip, box_thousand, nslink
from .core import Verdict, load, markdown, say
from .heap import big_heap
from .kernel_cells import many_net_cells, per_flag, round_trip
from .library import library
from .values import array_out

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer runs, a 0.5 GiB heap (default)")
    mode.add_argument("--full", action="store_true", help="more runs, 200 cells, a 4 GiB heap")
    parser.add_argument("--heap-gib", type=float, help="heap size for the big-heap target")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these targets")
    args = parser.parse_args()
    quick = not args.full
    gib = args.heap_gib if args.heap_gib is not None else (0.5 if quick else 4.0)

    targets = {
        "round_trip": lambda: round_trip(quick),
        "many_net_cells": lambda: many_net_cells(quick),
        "per_flag": lambda: per_flag(quick),
        "library": lambda: library(quick),
        "array_out": lambda: array_out(quick),
        "big_heap": lambda: big_heap(quick, gib),
        "box_round_trip": lambda: box_round_trip(quick),
        "box_create": lambda: box_create(quick),
        "nslink": lambda: nslink(quick),
        "box_thousand": lambda: box_thousand(quick),
    }
    chosen = args.only or list(targets)
    unknown = set(chosen) - set(targets)
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; choose from {list(targets)}")

    start, load_before = time.perf_counter(), load()
    verdicts: list[Verdict] = []
    for name in chosen:
        say(f"== {name}")
        t = time.perf_counter()
        for attempt in (1, 2):  # nsmagic is under development: retry a transient failure once
            try:
                got = targets[name]()
                break
            except Exception as e:
                say(f"  attempt {attempt} failed: {type(e).__name__}: {e}")
                if attempt == 2:
                    traceback.print_exc()
                    got = [Verdict(name, "-", "-", None, "-", None, f"failed twice: {type(e).__name__}: {e}",
                                   failed=True)]
        for v in got:
            if attempt == 2 and not v.failed:
                v.note = (v.note + "; " if v.note else "") + "measured on a second attempt after a failure"
            say("  " + v.line())
        say(f"  ({time.perf_counter() - t:.1f} s)")
        verdicts += got

    mode = "full" if args.full else "quick"
    table = markdown(verdicts, mode, time.perf_counter() - start, load_before)
    RESULTS.mkdir(exist_ok=True)
    dated = RESULTS / result_name(mode)
    dated.write_text(table)
    (RESULTS / "latest.md").write_text(table)
    print()
    print(table, end="")
    say(f"written to {dated} (and {RESULTS / 'latest.md'})")


def result_name(mode: str) -> str:
    """``YYYY-MM-DD-HHMM-<host>-<mode>.md``: each run keeps its own dated record, named for the
    machine it measured, beside the others (docs/performance.md reads them)."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{datetime.datetime.now().strftime('%Y-%m-%d-%H%M')}-{host}-{mode}.md"


if __name__ == "__main__":
    main()
