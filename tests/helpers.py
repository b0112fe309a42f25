"""Small helpers shared by the test modules (fixtures are in conftest.py)."""

from __future__ import annotations

import time
from typing import Callable

#: Kernel-side code: how many of nsmagic's value memfds the kernel has mapped right now.
MAPPED_MEMFDS = "sum('nsmagic-values' in line for line in open('/proc/self/maps'))"


def wait_until(predicate: Callable[[], object], seconds: float = 10.0, step: float = 0.02) -> bool:
    """Whether *predicate* became true within *seconds* (what a kernel cleans up in the
    background: a reaped child, a removed link or cgroup). Never a measure of speed: the
    allowance is generous, and only its running out fails a test."""
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(step)
    return True
