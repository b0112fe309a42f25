"""``python -m bench.ab [REV]``: each cell's cost under this tree and under REV, in one run.

Two kernels, one importing nsmagic from this working tree and one from REV (default ``HEAD~1``,
unpacked with ``git archive`` into a temporary directory), run the same cells interleaved, so
that whatever else the machine does hits both alike. Reported per cell: the two medians and
their ratio (this tree / REV), and each against a plain cell of its own kernel. The dated table
goes to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .core import interleave, load, machine, median, ms, say
from .kernel import Kernel

REPO = Path(__file__).resolve().parent.parent
CELLS = {
    "plain cell": "x = 1",
    "-u -i -p -m": "%%innamespace -u -i -p -m\nx = 1",
    "-u -i -p -m -n": "%%innamespace -u -i -p -m -n\nx = 1",
    "-r -p -n --mount-proc": "%%innamespace -r -p -n --mount-proc\nx = 1",
    "-n -o (1 MB array)": "%%innamespace -n -o a\nimport numpy as np\na = np.ones(1 << 17)",
}


def unpack(rev: str, into: str) -> None:
    data = subprocess.run(["git", "archive", rev, "nsmagic"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("rev", nargs="?", default="HEAD~1")
    parser.add_argument("-n", type=int, default=40, help="rounds (default 40)")
    args = parser.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    before = load()
    with tempfile.TemporaryDirectory(prefix="nsmagic-ab-") as old_tree:
        unpack(rev, old_tree)
        new_env = {**os.environ, "PYTHONPATH": str(REPO)}
        old_env = {**os.environ, "PYTHONPATH": old_tree}
        with Kernel(env=new_env) as new, Kernel(env=old_env) as old:
            for k, tree in ((new, str(REPO)), (old, old_tree)):
                where = k.value("__import__('nsmagic').__file__")
                assert where.startswith(tree), f"kernel imports nsmagic from {where}, not {tree}"
            timers = []
            for code in CELLS.values():
                timers += [new.timer(code), old.timer(code)]
            for timer in timers * 3:  # warm up both
                timer()
            times = interleave(*timers, n=args.n, timer=lambda fn: fn())
    m = machine()
    lines = [f"# A/B: this tree ({m['commit']} + working changes) vs {rev}", "",
             f"- date: {m['date']}; {args.n} interleaved rounds; load before {before}, after {load()}",
             f"- machine: Linux {m['kernel']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}", "",
             "| cell | this tree | " + rev + " | ratio | vs plain (this / " + rev + ") |", "|---|---|---|---|---|"]
    plain_new, plain_old = median(times[0]), median(times[1])
    for i, name in enumerate(CELLS):
        a, b = median(times[2 * i]), median(times[2 * i + 1])
        lines.append(f"| {name} | {ms(a)} | {ms(b)} | {a / b:.2f}x | {a / plain_new:.2f}x / {b / plain_old:.2f}x |")
    table = "\n".join(lines) + "\n"
    out = REPO / "bench" / "results" / f"{datetime.date.today().isoformat()}-ab-{rev}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table)
    print(table)
    say(f"written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
