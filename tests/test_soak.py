"""Hundreds of cells: the kernel leaks nothing and never hangs."""

import os
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.kernel, pytest.mark.root]

MIXED = ["-n -p --mount-proc", "-r -p -n", "-u -i", "-m -C", "-T --monotonic 5", "-U", "-n -o leak_check"]


def kernel_state(pid: int) -> dict:
    proc = psutil.Process(pid)
    children = proc.children(recursive=True)
    return {
        "fds": proc.num_fds(),
        "threads": proc.num_threads(),
        "children": [(c.pid, c.status()) for c in children],
        "mounts": Path(f"/proc/{pid}/mountinfo").read_text().count("\n"),
    }


def settled_state(pid: int, want_fds: int, seconds: float = 5.0) -> dict:
    """The kernel's state once the reaper has caught up (children are reaped off the cell's path)."""
    end = time.monotonic() + seconds
    while True:
        state = kernel_state(pid)
        if (not state["children"] and state["fds"] <= want_fds) or time.monotonic() > end:
            return state
        time.sleep(0.05)


def net_namespaces_in_use() -> set[str]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.add(os.readlink(entry / "ns" / "net"))
            except OSError:
                pass
    return found


def test_hundreds_of_cells_leak_no_fds_threads_children_mounts_or_namespaces(fresh_kernel):
    k = fresh_kernel
    k.execute("leak_check = 0").ok()
    body = "import os\nleak_check = {}\nprint(os.readlink('/proc/self/ns/net'))"
    # Warm up with the same cells: imports, the reaper thread, IPython's caches, and (under
    # ipykernel 7.3) one more zmq event pipe, an eventfd, opened by the first cell that prints.
    for options in MIXED * 3:
        k.execute(f"%%innamespace {options}\n" + body.format(1)).ok()
    before = settled_state(k.pid, want_fds=10**6)
    inodes = []
    for i in range(300):
        options = MIXED[i % len(MIXED)]
        cell = k.execute(f"%%innamespace {options}\n" + body.format(i)).ok()
        if "-n" in options:
            inodes.append(cell.stdout.strip())
    after = settled_state(k.pid, want_fds=before["fds"])
    assert after == before
    assert k.value("leak_check") == 293  # the last -o cell (i = 293) brought its value back
    kernel_net = k.value("__import__('os').readlink('/proc/self/ns/net')")
    assert inodes and kernel_net not in inodes  # (inode numbers are recycled, so not unique)
    deadline = time.monotonic() + 10  # network namespaces are torn down asynchronously
    while set(inodes) & net_namespaces_in_use() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(inodes) & net_namespaces_in_use()


def test_thousand_cells_with_busy_threads_never_hang(fresh_kernel):
    k = fresh_kernel
    k.execute("""import sys, threading
_stop = threading.Event()
def _busy():
    n = 0
    while not _stop.is_set():
        n += 1
sys.setswitchinterval(1e-5)
_threads = [threading.Thread(target=_busy, daemon=True) for _ in range(2)]
for t in _threads: t.start()""").ok()
    try:
        hangs, failures = 0, []
        for i in range(1000):
            try:
                cell = k.execute(f"%%innamespace -p -n\nx = {i}\nx", timeout=30)
            except TimeoutError:
                hangs += 1
                k.km.interrupt_kernel()
                continue
            if cell.status != "ok" or cell.result != {"text/plain": str(i)}:
                failures.append((i, cell.ename, cell.evalue))
        assert hangs == 0
        assert failures == []
    finally:
        k.execute("_stop.set()\nfor t in _threads: t.join()\nsys.setswitchinterval(0.005)")
    assert settled_state(k.pid, want_fds=10**6)["children"] == []
