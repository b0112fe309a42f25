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

from helpers import Running
from kernel import Kernel
from helpers import wait_until
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
@pytest.mark.root
@pytest.mark.parametrize("options", ["", "-n", "-p --mount-proc", "-n --veth --memory 64M --pids 50", "-r -p -n"])
def test_a_killed_kernel_takes_every_process_of_its_cells_with_it(options):
    k = Kernel.start()
    k.execute("%load_ext nsmagic").ok()
    _kill_kernel_and_check(k, _start_detaching_cell(k, options))


@pytest.mark.rootless
@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("options", ["-r", "-r -p --mount-proc", "-r -n --lo"])
def test_a_killed_rootless_kernel_takes_every_process_of_its_cells_with_it(rootless_env, options):
    k = rootless_env.start_kernel()
    k.execute("%load_ext nsmagic").ok()
    _kill_kernel_and_check(k, _start_detaching_cell(k, options))


# -- the fault matrix: each leaves the kernel alive, with a one-line error -----------------------


@pytest.fixture(scope="module")
def victim():
    """A kernel of this module's own: the faults below must leave it usable, and do."""
    k = Kernel.start()
    k.execute("%load_ext nsmagic\nimport os, time").ok()
    yield k
    k.shutdown()


def _alive_and_clean(k: Kernel) -> None:
    assert k.execute("1 + 1").ok().result == {"text/plain": "2"}
    left = wait_gone([p.pid for p in descendants(k.pid)], seconds=10)
    assert not left, f"left behind: {left}"


FAULTS = [
    ("-n", "import ctypes\nctypes.string_at(0)", "ChildDied", "SIGSEGV"),
    ("-p", "os._exit(3)", "ChildDied", "exited with status 3"),
    ("-n", "os.kill(os.getpid(), 9)", "ChildDied", "SIGKILL"),
    ("-u -i", "os.kill(os.getpid(), 9)", "ChildDied", "SIGKILL"),  # (PID 1 of -p cannot kill itself)
    ("--memory 32M", "hog = b'x' * (256 << 20)", "ChildDied|MemoryError", "OOM killer|"),
    ("--pids 30 --timeout 5", "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\ntime.sleep(60)",
     "CellTimeout", "timeout of 5s"),
    ("-n --timeout 1", "time.sleep(60)", "CellTimeout", "timeout of 1s"),
    ("", "import builtins\nos.close(builtins.input.__self__.control)", "ChildDied", "status 122"),
    ("-p", "import builtins\nos.write(builtins.input.__self__.control, os.urandom(4096))\ntime.sleep(60)",
     "ProtocolError", ""),
    ("-p", "import builtins\nos.write(builtins.input.__self__.control, b'\\x02' + bytes(8) + b'\\x80')\ntime.sleep(60)",
     "ProtocolError", "not plain data"),
    ("", "import builtins\nos.write(builtins.input.__self__.control, b'\\x05\\x00\\x00')\nos._exit(0)",
     "ProtocolError", "cut off"),
    ("-o lock", "import threading\nlock = threading.Lock()", "OutputError", "'lock': cannot pickle"),
    ("-o bad", "class Bad:\n    def __reduce__(self):\n        return (int, ('not a number',))\nbad = Bad()",
     "OutputError", "could not be unpickled in the kernel"),
]


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("options, body, ename, words", FAULTS, ids=[f[2] + ":" + f[1][:30] for f in FAULTS])
def test_a_fault_in_the_cell_is_a_one_line_error_and_the_kernel_lives_on(victim, options, body, ename, words):
    cell = victim.execute(f"%%innamespace {options}\n{body}", timeout=60)
    assert cell.status == "error" and re.fullmatch(ename, cell.ename), (cell.ename, cell.evalue)
    assert re.search(words, cell.evalue), cell.evalue
    if cell.ename not in ("MemoryError",):
        assert len(cell.traceback.splitlines()) == 1, cell.traceback
    _alive_and_clean(victim)


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("options", ["", "-n"])
def test_a_cell_closing_its_stdout_and_stderr_leaves_the_kernel_alive(victim, options):
    cell = victim.execute(f"%%innamespace {options}\nos.close(1)\nos.close(2)\nx = 1\nprint('lost')")
    assert cell.status in ("ok", "error")
    _alive_and_clean(victim)


@pytest.mark.kernel
@pytest.mark.root
def test_a_huge_timeout_is_a_timeout_not_an_overflow(victim):
    assert victim.execute("%%innamespace --timeout 3e6 -n\n6 * 7").ok().result == {"text/plain": "42"}


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("body", ["time.sleep(60)", "while True: pass", "while True: print('x' * 1000)"],
                         ids=["syscall", "busy", "flood"])
@pytest.mark.parametrize("options", ["-n", "-p"])
def test_an_interrupt_ends_any_cell(victim, body, options):
    cell = Running(victim, f"%%innamespace {options}\nprint('started', flush=True)\n{body}")
    cell.wait_for("started")
    assert cell.interrupt()["ename"] == "KeyboardInterrupt"  # read up to idle: the flood too
    _alive_and_clean(victim)


@pytest.mark.kernel
@pytest.mark.root
def test_a_later_kernel_sweeps_what_a_kernel_that_died_without_its_sentinel_left():
    from processes import is_sentinel

    k = Kernel.start()
    k.execute("%load_ext nsmagic").ok()
    procs = _start_detaching_cell(k, "-n --veth --pids 50")
    pid = k.pid
    later = None
    try:
        sentinels = [p for p in psutil.Process(pid).children() if is_sentinel(p)]
        assert len(sentinels) == 1
        sentinels[0].kill()  # (a zombie until its kernel reaps it: not waited for)
        os.kill(pid, signal.SIGKILL)
        # Checked at once: any kernel that starts on this machine from now on sweeps them.
        assert _links_of(pid) and _cgroups_of(pid), "the dead kernel's link and cgroup stay"
        later = Kernel.start()
        later.execute("%load_ext nsmagic").ok()
        end = time.monotonic() + 15
        while (_links_of(pid) or _cgroups_of(pid)) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _links_of(pid) and not _cgroups_of(pid)
        assert not wait_gone([p.pid for p in procs], seconds=10)  # ended with their cgroup
    finally:
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        k.shutdown()
        if later is not None:
            later.shutdown()


def test_the_sweep_reads_this_machines_cgroups_and_links():
    from nsmagic import proctree, sentinel

    assert isinstance(sentinel.stale_cgroups(), list) and isinstance(sentinel.stale_links(), list)
    assert not proctree.gone(os.getpid()) and proctree.gone(2 ** 22 + 1)


#: A subreaper (as a desktop session's systemd --user is) whose child, the "kernel", forks the
#: sentinel's process and dies before it runs: the sentinel then starts as the subreaper's child.
#: Prints whether the sentinel ended by itself, then ends it and its sweep's helpers.
ORPHANED_SENTINEL = r"""
import ctypes, os, select, signal, socket, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
os.set_inheritable(theirs.fileno(), True)
said, say = os.pipe()
kernel = os.fork()
if kernel == 0:
    if os.fork() == 0:
        while os.getppid() == kernel:  # until the kernel has died
            time.sleep(0.01)
        os.write(say, str(os.getpid()).encode())
        os.execv(sys.executable, [sys.executable, "-I", "-S", sys.argv[1], str(theirs.fileno()), str(kernel)])
    os._exit(0)
theirs.close()
pid = int(os.read(said, 16))
pidfd = os.pidfd_open(pid)
ended = select.select([pidfd], [], [], 30)[0]
print("ended" if ended else "still watching", flush=True)
os.kill(pid, signal.SIGKILL)
"""


def test_a_sentinel_whose_kernel_died_before_it_ran_sweeps_and_ends():
    """It must not take its new parent (init, a subreaper) for the kernel and watch it forever."""
    import subprocess
    import sys

    from nsmagic import sentinel

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # no nsmagic for its sweep: nothing swept
    out = subprocess.run([sys.executable, "-c", ORPHANED_SENTINEL, sentinel.__file__], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ended", out.stderr


#: A "kernel" with a sentinel: it forks a child that hands itself over and would be frozen at
#: the kernel's death (still holding the kernel's end of the sentinel's socket, as a child does
#: until it seals its descriptors off), says both pids, and waits to be killed. The kernel itself
#: does nothing for the child after fork(): killed at that moment, it is killed here.
WATCHED_CHILD = r"""
import os, signal, time
from nsmagic import sentinel
from nsmagic.syscalls import set_parent_death_signal
assert sentinel.guard.arm(), "no sentinel"
ready, say = os.pipe()
child = os.fork()
if child == 0:
    assert sentinel.guard.watch_self(), "the sentinel did not take the child"
    set_parent_death_signal(signal.SIGSTOP)
    os.write(say, b"1")
    time.sleep(600)
    os._exit(0)
os.read(ready, 1)
print(child, sentinel.guard._proc.pid, flush=True)
time.sleep(600)
"""


def test_the_sentinel_ends_a_child_that_still_holds_the_kernels_end_of_its_socket():
    """The sentinel's socket never ends by EOF while a frozen child holds a copy of the kernel's
    end: it must watch the kernel's pidfd, not wait in a read for a message that never comes."""
    import subprocess
    import sys

    kernel = subprocess.Popen([sys.executable, "-c", WATCHED_CHILD], stdout=subprocess.PIPE, text=True)
    pids, pidfds = [], []
    try:
        pids = [int(p) for p in kernel.stdout.readline().split()]
        assert len(pids) == 2, "the kernel did not start its child and sentinel"
        pidfds = [os.pidfd_open(p) for p in pids]  # theirs: the kernel lives and has not reaped them
        kernel.kill()
        kernel.wait()
        left = wait_gone(pids, seconds=15)
        assert not left, f"outlived the kernel: {left} of child, sentinel {pids}"
    finally:
        kernel.kill()
        kernel.wait()
        for fd in pidfds:  # whatever a failure left (frozen: SIGKILL still ends it)
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(fd)


@pytest.mark.root
def test_the_sweep_removes_a_dead_kernels_leaf_but_kills_nothing_in_it():
    """A dead kernel's leaf (``nsmagic-<pid>-kernel``, see nsmagic.environment.cgroups) is
    stale; what the kernel started outside its cells may live on in it, and is not nsmagic's."""
    import subprocess

    from nsmagic import sentinel
    from nsmagic.environment.cgroups import hierarchies

    [pids] = [h for h in hierarchies(open("/proc/self/cgroup").read(), open("/proc/self/mountinfo").read())
              if "pids" in h.controllers]
    dead = int(open("/proc/sys/kernel/pid_max").read()) + 1  # never a process
    empty, busy = (os.path.join(pids.own, f"nsmagic-{pid}-kernel") for pid in (dead, dead + 1))
    os.mkdir(empty)
    os.mkdir(busy)
    lives_on = subprocess.Popen(["sleep", "600"])
    try:
        with open(os.path.join(busy, "cgroup.procs"), "w") as f:
            f.write(str(lives_on.pid))
        assert {empty, busy} <= set(sentinel.stale_cgroups())
        assert busy in sentinel.sweep()
        assert not os.path.exists(empty) and os.path.exists(busy)
        assert lives_on.poll() is None, "the sweep killed what a dead kernel started outside its cells"
    finally:
        lives_on.kill()
        lives_on.wait()
        for path in (empty, busy):
            if os.path.exists(path):
                wait_until(lambda: not open(os.path.join(path, "cgroup.procs")).read().split(), 5, 0.02)
                os.rmdir(path)
