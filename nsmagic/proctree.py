"""The process tree as /proc shows it: a process's children, and whether a process is gone.

Standard library only: the sentinel (nsmagic.sentinel, run by path while it watches a kernel)
loads this file as well as nsmagic does.
"""

from __future__ import annotations

import os


def children(pid: int | str = "self") -> list[int]:
    """The children of *pid* (``"self"``: this process, also right in a PID namespace whose /proc
    is the host's), from every thread's list: a child belongs to the thread that forked it, and
    an orphan handed to a subreaper to one of its threads. Pids are as this /proc numbers them."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += map(int, f.read().split())
        except (OSError, ValueError):  # the thread ended meanwhile
            pass
    return out


def gone(pid: int) -> bool:
    """No such process, or only its zombie (a killed kernel whose parent has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False

