"""Benchmarks for nsmagic: ``python -m bench --quick`` (under a minute) or ``--full``.

Each target compares nsmagic with a baseline measured in the same run, interleaved, and reports
medians, the ratio and a PASS/MISS verdict. Nothing here asserts: it is a report. The table also
goes to a dated file of its own, ``bench/results/YYYY-MM-DD-HHMM-<host>-<mode>.md`` (commit the
ones worth keeping), and to ``bench/results/latest.md`` (not kept).
"""
