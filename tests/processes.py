"""Watching the processes a test's cells start, and removing what a failed test left."""

from __future__ import annotations

import psutil

from helpers import wait_until


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_gone(pids, seconds: float = 5.0) -> list[int]:
    """The pids of *pids* still present (not even as zombies) after *seconds*."""
    wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), seconds, 0.05)
    return [p for p in pids if psutil.pid_exists(p)]


def kill_sleepers(pids) -> None:
    """End, by pid, whatever ``sleep 600`` of a test's cells is still there (after a failure)."""
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.cmdline() == ["sleep", "600"]:
                proc.kill()
        except psutil.Error:
            pass
