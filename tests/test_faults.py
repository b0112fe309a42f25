"""What a cell cannot do to its kernel or leave on the host, tried on real kernels.

Each fault ends the cell with a one-line error and leaves the kernel alive; a SIGKILLed kernel
takes every process its cells started with it (see nsmagic.sentinel).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from kernel import Kernel
from processes import descendants, wait_gone

# -- nothing survives the kernel -----------------------------------------------------------------

#: A cell that starts a setsid daemon and a double-forked sleeper, says so, and keeps running.
DETACHING = """%%innamespace {options}
import subprocess, time
subprocess.Popen(["setsid", "sleep", "607"])
subprocess.run(["sh", "-c", "sleep 607 &"])
print("started", flush=True)
time.sleep(600)
"""


def _start_detaching_cell(k: Kernel, options: str) -> list[psutil.Process]:
    """Run DETACHING without waiting for it; the kernel's descendants once both sleepers run."""
    k.kc.execute(DETACHING.format(options=options))
    end = time.monotonic() + 30
    while time.monotonic() < end:
        procs = descendants(k.pid)
        if sum(_is_sleeper(p) for p in procs) == 2:
            return procs
        time.sleep(0.05)
    raise AssertionError(f"the cell's two sleepers did not start: {[p.cmdline() for p in descendants(k.pid)]}")


def _is_sleeper(p: psutil.Process) -> bool:
    try:
        return p.cmdline() == ["sleep", "607"]
    except psutil.Error:
        return False


def _ours(pattern: str, names) -> set[str]:
    return {n for n in names if re.fullmatch(pattern, n)}


def _links_of(pid: int) -> set[str]:
    return _ours(rf"nsm{pid:x}-[0-9a-f]+", os.listdir("/sys/class/net"))


def _cgroups_of(pid: int) -> set[str]:
    found = set()
    for top in Path("/sys/fs/cgroup").iterdir():
        for path in top.rglob(f"nsmagic-{pid}-*"):
            found.add(str(path))
    return found


def _kill_kernel_and_check(k: Kernel, procs: list[psutil.Process]) -> None:
    pid = k.pid
    try:
        os.kill(pid, signal.SIGKILL)
        pids = [p.pid for p in procs]
        left = wait_gone(pids, seconds=10)
        assert not left, f"outlived the kernel: {[(p, psutil.Process(p).cmdline()) for p in left if psutil.pid_exists(p)]}"
        end = time.monotonic() + 10
        while (_links_of(pid) or _cgroups_of(pid)) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _links_of(pid) and not _cgroups_of(pid)
    finally:
        for p in procs:  # whatever a failure left
            try:
                p.kill()
            except psutil.Error:
                pass
        k.shutdown()


@pytest.mark.kernel
@pytest.mark.parametrize("options", ["", "-n", "-p --mount-proc", "-n --veth --memory 64M --pids 50", "-r -p -n"])
def test_a_killed_kernel_takes_every_process_of_its_cells_with_it(options):
    k = Kernel.start()
    k.execute("%load_ext nsmagic").ok()
    _kill_kernel_and_check(k, _start_detaching_cell(k, options))


@pytest.mark.rootless
@pytest.mark.parametrize("options", ["-r", "-r -p --mount-proc", "-r -n --lo"])
def test_a_killed_rootless_kernel_takes_every_process_of_its_cells_with_it(rootless_env, options):
    k = rootless_env.start_kernel()
    k.execute("%load_ext nsmagic").ok()
    _kill_kernel_and_check(k, _start_detaching_cell(k, options))
