"""Small helpers shared by the test modules (fixtures are in conftest.py)."""

from __future__ import annotations

import re
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


class Running:
    """A cell started without waiting for it, so the test can act while it runs: wait for what
    it prints (``wait_for``), interrupt it (``interrupt``), then read its reply (``finish``).
    Everything it printed is in ``text``."""

    def __init__(self, kernel, code: str, *, stop_on_error: bool = True):
        self.kernel, self.text = kernel, ""
        self.msg_id = kernel.kc.execute(code, stop_on_error=stop_on_error)

    def wait_for(self, pattern: str, seconds: float = 30) -> re.Match:
        """The first match of *pattern* in what the cell printed; fails the test if the cell
        ended with an error first, or never printed it."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                msg = self.kernel.kc.iopub_channel.get_msg(timeout=1)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") != self.msg_id:
                continue
            if msg["msg_type"] == "stream":
                self.text += msg["content"]["text"]
                if m := re.search(pattern, self.text):
                    return m
            elif msg["msg_type"] == "error":
                raise AssertionError(f"{msg['content']['ename']}: {msg['content']['evalue']}\n{self.text}")
        raise AssertionError(f"the cell never printed {pattern!r}; it printed {self.text[-2000:]!r}")

    def finish(self, seconds: float = 60) -> dict:
        """The cell's reply, after everything it printed has been read into ``text``."""
        end = time.monotonic() + seconds
        idle = False
        while not idle and time.monotonic() < end:
            try:
                msg = self.kernel.kc.iopub_channel.get_msg(timeout=1)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") == self.msg_id:
                if msg["msg_type"] == "stream":
                    self.text += msg["content"]["text"]
                idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
        while time.monotonic() < end:
            try:
                reply = self.kernel.kc.shell_channel.get_msg(timeout=1)
            except Exception:
                continue
            if reply["parent_header"].get("msg_id") == self.msg_id:
                return reply["content"]
        raise AssertionError("the cell did not finish")

    def interrupt(self, seconds: float = 60) -> dict:
        """Press the interrupt button, then the cell's reply (see ``finish``)."""
        self.kernel.km.interrupt_kernel()
        return self.finish(seconds)
