"""Watching the processes a test's cells start, and removing what a failed test left."""

from __future__ import annotations

import psutil

from helpers import wait_until


def descendants(pid: int) -> list[psutil.Process]:
    """The processes below *pid*, except nsmagic's sentinel (which lives as long as the kernel)."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if not is_sentinel(p)]
    except psutil.NoSuchProcess:
        return []


def is_sentinel(p: psutil.Process) -> bool:
    try:
        return any(arg.endswith("nsmagic/sentinel.py") for arg in p.cmdline())
    except psutil.Error:
        return False


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
