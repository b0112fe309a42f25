"""Hundreds of cells: the kernel leaks nothing and never hangs."""

import os
import queue
import time
from pathlib import Path

import psutil
import pytest

from helpers import Running
from processes import is_sentinel

pytestmark = [pytest.mark.slow, pytest.mark.kernel, pytest.mark.root]

MIXED = ["-n -p --mount-proc", "-r -p -n", "-u -i", "-m -C", "-T --monotonic 5", "-U", "-n -o leak_check"]


def kernel_state(pid: int) -> dict:
    proc = psutil.Process(pid)
    children = [c for c in proc.children(recursive=True) if not is_sentinel(c)]
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


# -- ten thousand mixed cells ---------------------------------------------------------------------

#: (options, body) for the soak: every flag, a veth pair, limits, a tmpfs, a 1 MB -o array.
SOAK = [
    ("-m", "x = 1"), ("-u --hostname soak", "x = 1"), ("-i", "x = 1"), ("-n", "x = 1"),
    ("-p --mount-proc", "x = 1"), ("-U", "x = 1"), ("-C", "x = 1"), ("-T --monotonic 5", "x = 1"),
    ("-r -p -n --mount-proc", "x = 1"), ("-n --lo", "x = 1"), ("--tmpfs /mnt", "open('/mnt/f', 'w').write('x')"),
    ("--memory 64M --pids 64", "x = 1"), ("-n -o soak_array", "soak_array = np.ones(1 << 17)"),
    ("-n --veth", "x = 1"), ("", "print('x' * 100)"), ("-p", "import subprocess\nsubprocess.run(['true'])"),
]
#: Every this many cells, one that times out and one that is interrupted.
SOAK_FAULT_EVERY = 100


def _state(k) -> dict:
    proc = psutil.Process(k.pid)
    maps = Path(f"/proc/{k.pid}/maps").read_text().splitlines()
    return {
        **settled_state(k.pid, want_fds=10**6),
        "rss": proc.memory_info().rss,
        "maps": len(maps),
        "value_maps": sum("nsmagic-values" in line for line in maps),
        "links": {n for n in os.listdir("/sys/class/net") if n.startswith(f"nsm{k.pid:x}-")},
        "cgroups": {str(p) for top in Path("/sys/fs/cgroup").iterdir() for p in top.rglob(f"nsmagic-{k.pid}-*")},
        "host_mounts": Path("/proc/self/mountinfo").read_text().count("\n"),
    }


def _run_batch(k, codes: list[str]) -> set[str]:
    """Send every cell at once (the kernel queues them), then check every reply: only the
    timed-out ones may fail, with CellTimeout. Returns what the cells printed."""
    # stop_on_error=False: ipykernel would otherwise abort the cells queued behind a failed one.
    ids = {k.kc.execute(code, stop_on_error=False): code for code in codes}
    replies, printed = {}, {}
    while len(replies) < len(ids):
        reply = k.kc.shell_channel.get_msg(timeout=120)
        if reply["parent_header"].get("msg_id") in ids:
            replies[reply["parent_header"]["msg_id"]] = reply["content"]
    while True:
        try:
            msg = k.kc.iopub_channel.get_msg(timeout=0.2)
        except queue.Empty:
            break
        parent = msg["parent_header"].get("msg_id")
        if parent in ids and msg["msg_type"] == "stream":
            printed[parent] = printed.get(parent, "") + msg["content"]["text"]
    for msg_id, content in replies.items():
        expected = "error" if "--timeout" in ids[msg_id] else "ok"
        assert content["status"] == expected, (ids[msg_id], content.get("ename"), content.get("evalue"))
        if expected == "error":
            assert content["ename"] == "CellTimeout"
    return {text.strip() for text in printed.values() if text.startswith("net:")}


def _interrupted(k) -> None:
    cell = Running(k, "%%innamespace -n\nimport time\nprint('started', flush=True)\ntime.sleep(60)",
                   stop_on_error=False)
    cell.wait_for("started")
    assert cell.interrupt()["ename"] == "KeyboardInterrupt"


@pytest.mark.timeout(1800)
def test_ten_thousand_mixed_cells_leave_the_kernel_and_the_host_as_they_were(fresh_kernel):
    k = fresh_kernel
    cells = int(os.environ.get("NSMAGIC_SOAK_CELLS", "10000"))
    k.execute("import numpy as np\nsoak_array = None").ok()
    for options, body in SOAK * 2:  # warm-up: imports, caches, the reaper and the sentinel
        k.execute(f"%%innamespace {options}\n{body}").ok()
    _interrupted(k)
    before = _state(k)
    inodes = set()
    for start in range(0, cells, SOAK_FAULT_EVERY):  # a batch of cells in flight, then an interrupt
        codes = []
        for i in range(start, min(cells, start + SOAK_FAULT_EVERY)):
            options, body = SOAK[i % len(SOAK)]
            if i % SOAK_FAULT_EVERY == SOAK_FAULT_EVERY - 1:
                options, body = "-p --timeout 0.2", "import time\ntime.sleep(60)"
            elif options == "-n":
                body = "import os\nprint(os.readlink('/proc/self/ns/net'))"
            codes.append(f"%%innamespace {options}\n{body}")
        inodes |= _run_batch(k, codes)
        _interrupted(k)
    assert k.value("soak_array.shape") == (1 << 17,)
    after = _state(k)
    for key in ("fds", "threads", "children", "mounts", "links", "cgroups", "host_mounts"):
        assert after[key] == before[key], key
    assert after["rss"] <= before["rss"] * 1.2
    assert after["value_maps"] <= 1 and after["maps"] <= before["maps"] + 8
    deadline = time.monotonic() + 10
    while inodes & net_namespaces_in_use() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not inodes & net_namespaces_in_use()
