"""The library under the magic, used from plain Python (this pytest process), no IPython."""

import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from nsmagic import (CellTimeout, ChildDied, Namespaces, OutputError, Result, Sinks, execute, run,
                     run_code)
from nsmagic.outcome import Outcome
from helpers import wait_until
from processes import kill_sleepers, wait_gone

pytestmark = [pytest.mark.root]


def test_run_returns_the_functions_value_from_fresh_namespaces():
    pid, host, ifaces, net = run(lambda: (os.getpid(), socket.gethostname(), socket.if_nameindex(),
                                          os.readlink("/proc/self/ns/net")),
                                 namespaces=Namespaces(pid=True, net=True, hostname="lib-box"))
    assert (pid, host, ifaces) == (1, "lib-box", [(1, "lo")])
    assert net != os.readlink("/proc/self/ns/net")
    assert socket.gethostname() != "lib-box"


class LibraryError(Exception):
    pass


def _fail():
    raise LibraryError("from the child")


def test_run_raises_the_functions_exception_as_itself_with_child_traceback():
    with pytest.raises(LibraryError, match="from the child") as info:
        run(_fail, namespaces=Namespaces(net=True))
    assert "_fail" in str(info.value.__cause__)
    assert "raise LibraryError" in str(info.value.__cause__)


def test_run_code_returns_final_expression_and_outputs():
    result = run_code("import os\nx = os.getpid()\ny = [x] * 3\nx + 41", Namespaces(pid=True), outputs=["y"])
    assert isinstance(result, Result)
    assert (result.value, result.values) == (42, {"y": [1, 1, 1]})


def test_run_code_globals_are_seen_but_not_changed():
    env = {"items": [1, 2]}
    assert run_code("items.append(3)\nlen(items)", globals=env).value == 3
    assert env["items"] == [1, 2]


def test_run_code_missing_output_raises_after_others_arrive():
    with pytest.raises(OutputError, match="'absent'") as info:
        run_code("present = 1", outputs=["present", "absent"])
    assert info.value.arrived == ["present"]


def test_child_death_is_reported_with_its_status():
    with pytest.raises(ChildDied, match="exited with status 7"):
        run(os._exit, 7)


def _start_detached_sleeper() -> tuple[int, int]:
    return os.getpid(), subprocess.Popen(["sleep", "600"], start_new_session=True).pid


def test_what_the_function_left_running_ends_with_it():
    child, sleeper = run(_start_detached_sleeper, namespaces=Namespaces(net=True))
    try:
        assert child != os.getpid()
        assert wait_gone([sleeper]) == [], "the child's detached process outlived it"
    finally:
        kill_sleepers([sleeper])


def _fill_the_pid_namespace_then_hang(duration: str, started: str) -> None:
    """Two processes in the namespace, one of them detached into a session of its own, both
    exec'd (Popen returns after the exec), then a hang that only the timeout ends."""
    for detached in (False, True):
        subprocess.Popen(["sleep", duration], start_new_session=detached)
    with open(started, "w") as f:
        f.write("2")
    time.sleep(60)


def _ours(duration: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.info["cmdline"] == ["sleep", duration]:
            found.append(proc)
    return found


def test_timeout_kills_the_whole_pid_namespace(tmp_path):
    duration = f"600.{secrets.randbelow(10**6):06d}"  # a command line no other process has
    started = tmp_path / "started"
    t0 = time.monotonic()
    try:
        with pytest.raises(CellTimeout, match="timeout of 2s"):
            run(_fill_the_pid_namespace_then_hang, duration, str(started),
                namespaces=Namespaces(pid=True), timeout=2)
        assert time.monotonic() - t0 < 30  # ended by the timeout, not by the cell's sleep
        assert started.read_text() == "2", "the cell never started its processes"
        assert wait_until(lambda: not _ours(duration), 5), f"left running: {_ours(duration)}"
    finally:
        for proc in _ours(duration):
            proc.kill()


def test_execute_with_own_sinks_and_job():
    class Collect(Sinks):
        def __init__(self):
            self.out, self.shown = [], []

        def stdout(self, text):
            self.out.append(text)

        def display(self, data, metadata, transient, update):
            self.shown.append(data)

    def job(channel):
        print("streamed")
        channel.display({"text/plain": "shown"})
        return Outcome(value=os.getpid())

    sinks = Collect()
    result = execute(job, Namespaces(pid=True), sinks=sinks)
    assert result.value == 1 and "".join(sinks.out) == "streamed\n" and sinks.shown == [{"text/plain": "shown"}]


def test_nested_run_inside_a_child():
    """A child is single-threaded, so it may itself make user namespaces directly."""
    inner = run(lambda: run(lambda: (os.getuid(), os.getpid()), namespaces=Namespaces(user=True, pid=True)),
                namespaces=Namespaces(pid=True))
    assert inner == (65534, 1)


def test_output_the_caller_had_not_flushed_is_shown_once_and_first():
    script = textwrap.dedent("""
        import io, os, sys
        sys.stdout = io.TextIOWrapper(open(os.dup(1), "wb"), write_through=False)  # block-buffered
        print("pending")
        from nsmagic import run
        run(lambda: print("child"))
        sys.stdout.flush()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "pending\nchild\n"


def test_more_large_buffers_than_one_system_call_can_take_all_arrive():
    import numpy as np

    arrays = run(lambda: [np.full(8192, float(i)) for i in range(1100)])  # 1100 pieces of 64 KiB
    assert len(arrays) == 1100
    assert all(a.shape == (8192,) and (a == i).all() for i, a in enumerate(arrays))
