"""``%nsls``: the kernel's boxes as a table, as ``docker ps`` or warden's ``list`` shows containers.

Every figure is read from ``/proc`` when the table is made: the box's namespaces (the inodes
under ``/proc/PID/ns``), its processes (the box's process and all its descendants), and their
resident memory. The ``nsenter`` line is what a terminal user types to enter the same
namespaces: what a box shares with the kernel needs no flag.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass

from .box import DEAD

from .kinds import KINDS
from .proctree import children

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Row:
    name: str
    pid: int
    state: str
    namespaces: list[tuple[str, str]]
    uptime: float
    processes: int
    memory: int
    limit: int | None
    nsenter: str


def row(box) -> Row:
    kinds = [k for k in KINDS if getattr(box.spec, k.field) or k.proc in box.spec.join]
    alive = box.state != DEAD and box.worker > 0
    namespaces = [(k.proc, _inode(box, k.proc) if alive else "-") for k in kinds]
    pids = _tree(box.worker) if alive else []
    flags = [k.letter for k in kinds]  # nsenter(1)'s letters are unshare(1)'s
    if "-U" in flags:  # the user namespace first, so that the others are entered with its rights
        flags.remove("-U")
        flags.insert(0, "-U --preserve-credentials")
    nsenter = f"nsenter -t {box.worker} {' '.join(flags)}".rstrip() if alive else ""
    if alive and box.undumpable and os.geteuid() != 0:
        # Linux lets only root open an undumpable process's /proc/PID/ns (see README, Security)
        nsenter = f"sudo {nsenter}"
    limit = None
    if box.spec.memory is not None:
        from .environment.cgroups import parse_memory
        limit = parse_memory(box.spec.memory)
    return Row(box.name, box.worker, box.state if box.state != DEAD else f"dead ({box.death})",
               namespaces, time.monotonic() - box.created, len(pids), sum(map(_rss, pids)), limit, nsenter)


class Table:
    """The rows, shown as HTML in a notebook and as text elsewhere."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>no boxes: make one with <code>%%innamespace --name BOX ...</code></p>"
        body = "".join(
            f"<tr><td><b>{html.escape(r.name)}</b></td><td>{r.pid}</td><td>{html.escape(r.state)}</td>"
            f"<td>{'<br>'.join(f'<code>{ns}:{html.escape(i)}</code>' for ns, i in r.namespaces) or 'none'}</td>"
            f"<td>{_duration(r.uptime)}</td><td>{r.processes}</td><td>{_memory(r)}</td>"
            f"<td><code>{html.escape(r.nsenter)}</code></td></tr>"
            for r in self.rows)
        return ("<table><thead><tr><th>box</th><th>host PID</th><th>state</th><th>namespaces</th>"
                "<th>up</th><th>processes</th><th>memory (PSS)</th><th>enter from a terminal</th></tr></thead>"
                f"<tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        if not self.rows:
            return "no boxes: make one with %%innamespace --name BOX ..."
        lines = [f"{'BOX':<12} {'PID':>7} {'STATE':<16} {'UP':>7} {'PROCS':>5} {'MEMORY':<16} NAMESPACES"]
        for r in self.rows:
            spaces = " ".join(f"{ns}:{inode}" for ns, inode in r.namespaces) or "none"
            lines.append(f"{r.name:<12} {r.pid:>7} {r.state:<16} {_duration(r.uptime):>7} {r.processes:>5} "
                         f"{_memory(r):<16} {spaces}")
            if r.nsenter:
                lines.append(f"{'':<12} enter: {r.nsenter}")
        return "\n".join(lines)


def table(boxes) -> Table:
    return Table([row(box) for box in boxes])


def _inode(box, ns: str) -> str:
    """From the kernel's own fd of the box's namespace: an undumpable box's /proc/PID/ns is
    root's alone."""
    try:
        return f"[{os.fstat(box.ns[ns]).st_ino}]"
    except (OSError, KeyError):
        return "?"


def _tree(pid: int) -> list[int]:
    """*pid* and every descendant of it, from each thread's list of children."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children(current)
    return out


def _rss(pid: int) -> int:
    """The process's proportional share of the memory it uses (PSS): a box is a copy-on-write
    copy of the kernel, and the pages it still shares with it count for half."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _memory(r: Row) -> str:
    used = _size(r.memory)
    return f"{used} of {_size(r.limit)}" if r.limit else used


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
