"""Pieces tested on their own, without a kernel: framing, option checks, flags, advice, the
history guard, the GIL-keeping system calls and the child's sweep (in real forked processes)."""

import errno
from contextlib import contextmanager

import pytest

from nsmagic import CloneFlag, Namespaces, OptionError, ProtocolError
from nsmagic.protocol import FrameReader, Kind, parse_setup_record, setup_record
from nsmagic.runner import check_outputs
from nsmagic.source import ends_with_semicolon
from nsmagic.syscalls import advice
import nsmagic.protocol as protocol


def frame(kind, payload):
    import os
    r, w = os.pipe()
    protocol.send(w, kind, payload)
    os.close(w)
    data = os.read(r, 1 << 16)
    os.close(r)
    return data


def test_frames_survive_any_split():
    data = frame(Kind.DISPLAY, b"abc") + frame(Kind.DONE, b"x" * 1000)
    for cut in range(len(data) + 1):
        reader = FrameReader()
        frames = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert frames == [(Kind.DISPLAY, b"abc"), (Kind.DONE, b"x" * 1000)]
        reader.eof()


def test_eof_inside_a_frame_is_a_protocol_error():
    reader = FrameReader()
    reader.feed(frame(Kind.DONE, b"12345")[:-2])
    with pytest.raises(ProtocolError, match="cut off"):
        reader.eof()


def test_unknown_frame_kind_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="unknown kind"):
        FrameReader().feed(b"\x63" + (0).to_bytes(8, "big"))


def test_setup_record_round_trip():
    assert parse_setup_record(setup_record("unshare(CLONE_NEWNET)", 1, "no: é")) == ("unshare(CLONE_NEWNET)", 1, "no: é")
    with pytest.raises(ProtocolError):
        parse_setup_record(b"garbage")


def test_implications_follow_unshare():
    spec = Namespaces(map_root_user=True, pid=True, mount_proc=True, hostname="h", monotonic=5)
    assert spec.flags == (CloneFlag.NEWUSER | CloneFlag.NEWPID | CloneFlag.NEWNS | CloneFlag.NEWUTS
                          | CloneFlag.NEWTIME)
    with pytest.raises(OptionError, match="needs -p"):
        Namespaces(map_root_user=True, mount_proc=True)
    assert Namespaces().flags == CloneFlag(0)
    assert Namespaces.from_flags(CloneFlag.NEWNET | CloneFlag.NEWPID).describe() == "-n -p"


@pytest.mark.parametrize("name", ["", "x" * 65, "a\0b"])
def test_bad_hostnames(name):
    with pytest.raises(OptionError):
        Namespaces(hostname=name)


def test_output_names_checked_and_deduplicated():
    assert check_outputs(["a", "b", "a"]) == ["a", "b"]
    with pytest.raises(OptionError, match="1abc"):
        check_outputs(["1abc"])


def test_flags_spelled_as_in_man_pages():
    assert (CloneFlag.NEWNET | CloneFlag.NEWPID).spelled() == "CLONE_NEWPID|CLONE_NEWNET"


def test_advice_teaches():
    text = advice(CloneFlag.NEWNET, errno.EPERM, in_user_ns=False)
    assert "CAP_SYS_ADMIN" in text and "-r" in text and "network" in text
    assert "max_user_namespaces" in advice(CloneFlag.NEWNET, errno.EPERM, in_user_ns=True)
    assert "/proc/sys/user/max_net_namespaces" in advice(CloneFlag.NEWNET, errno.ENOSPC, in_user_ns=False)


@pytest.mark.parametrize("code, hidden", [("1;", True), ("x = 1\nx ;  # note", True), ("1", False),
                                          ("'a;'", False), ("f(';')", False)])
def test_semicolon_detection(code, hidden):
    assert ends_with_semicolon(code) is hidden


def test_line_magic_split_keeps_code_verbatim():
    from IPython.testing.globalipapp import get_ipython
    from nsmagic.magics import InNamespaceMagics

    magics = InNamespaceMagics(shell=get_ipython())
    assert magics._split_line('-n -o a,b --hostname h print("x  y")') == ('-n -o a,b --hostname h ', 'print("x  y")')
    assert magics._split_line("-ro x  f(1)") == ("-ro x  ", "f(1)")
    assert magics._split_line("-n -- -x") == ("-n ", " -x")
    assert magics._split_line("--timeout=3 -1 + 2") == ("--timeout=3 ", "-1 + 2")
    assert magics._split_line("--veth print(1)") == ("--veth ", "print(1)")
    assert magics._split_line("--veth 10.1.1.1/30 f()") == ("--veth 10.1.1.1/30 ", "f()")


def test_an_option_line_is_parsed_once_and_its_lists_are_never_shared():
    from IPython.testing.globalipapp import get_ipython
    from nsmagic.magics import InNamespaceMagics

    magics = InNamespaceMagics(shell=get_ipython())
    first = magics._parse(" -m --tmpfs /a -o x")
    assert magics._parse(" -m --tmpfs /a -o x") is first
    assert magics._parse(" -m --tmpfs /b -o x").tmpfs == ["/b"]
    assert first.tmpfs == ["/a"] and first.out == [["x"]]


def test_a_rerun_cell_is_compiled_once_and_still_quoted_in_tracebacks():
    import linecache

    from nsmagic.source import prepare, run_prepared

    name = "<nsmagic-test-cache>"
    first = prepare("x = 1\n1/0", filename=name, shown_source="%%cell\nx = 1\n1/0", line_offset=1)
    assert prepare("x = 1\n1/0", filename=name, line_offset=0).body is not first.body
    linecache.cache.pop(name)  # as IPython's own cache clean-up may do between runs
    again = prepare("x = 1\n1/0", filename=name, shown_source="%%cell\nx = 1\n1/0", line_offset=1)
    assert again.body is first.body
    outcome = run_prepared(again, {})
    assert isinstance(outcome.error, ZeroDivisionError)
    assert "line 3" in "".join(outcome.traceback) and "1/0" in "".join(outcome.traceback)


def _pack_all(values):
    import os

    from nsmagic.values import Packer

    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)  # as nsmagic makes it
    packer = Packer(fd)
    return fd, packer, [packer.pack(v) for v in values]


def test_values_are_pulled_out_of_the_packing_process():
    import os

    import numpy as np

    from nsmagic.values import OUT_OF_BAND, Unpacker

    values = [42, "x" * (2 * OUT_OF_BAND), {"k": [1, 2]}, np.arange(1_000_000)]
    fd, packer, packed = _pack_all(values)
    try:
        assert packed[0].inline is not None and packed[1].inline is None  # big pickles are parked
        assert packed[3].buffers and packed[3].inline is not None  # the array's data went out of band
        parked = packer.parked()
        assert len(parked.pieces) == 2 and parked.size >= 8_000_000 + 2 * OUT_OF_BAND
        unpacker = Unpacker(fd)
        assert unpacker.pull(os.getpid(), parked)  # this process stands in for the child
        assert os.fstat(fd).st_size == 0  # nothing went through the memfd
        back = [unpacker.unpack(p) for p in packed]
        assert back[:3] == values[:3] and (back[3] == values[3]).all()
        back[3][0] = -1  # writable, and the kernel's own copy
        assert back[3][0] == -1 and values[3][0] == 0
    finally:
        os.close(fd)


def test_large_pulls_are_split_evenly_without_losing_a_byte():
    from nsmagic.values import _split

    mib = 1 << 20
    pieces = [(0, 10_000, 100 * mib + 5), (200 * mib, 7, 3 * mib), (300 * mib, 99, 64)]
    for k in (1, 2, 3, 8):
        groups = _split(pieces, k)
        assert len(groups) == k
        flat = [p for g in groups for p in g]
        assert sum(n for *_, n in flat) == sum(n for *_, n in pieces)
        for (h1, t1, n1), (h2, t2, n2) in zip(flat, flat[1:]):  # cuts keep both addresses in step
            assert (h2 - h1, t2 - t1) == (n1, n1) or (h2, t2) in {(h, t) for h, t, _ in pieces}
        sizes = [sum(n for *_, n in g) for g in groups]
        assert max(sizes) <= sum(sizes) / k + 2 * mib  # even, up to a huge page


def test_a_big_array_is_pulled_by_several_threads_intact():
    import os

    import numpy as np

    from nsmagic.values import Unpacker

    big = np.arange(12_000_000, dtype=np.int64)  # 96 MB: one thread per CPU, up to three
    fd, packer, packed = _pack_all([big])
    try:
        unpacker = Unpacker(fd)
        assert unpacker.pull(os.getpid(), packer.parked())
        assert (unpacker.unpack(packed[0]) == big).all()
    finally:
        os.close(fd)


def test_values_are_pushed_through_the_memfd_when_they_cannot_be_pulled():
    import os

    import numpy as np

    from nsmagic.values import Unpacker

    values = [np.arange(100_000), bytes(range(256)) * 1000]
    fd, packer, packed = _pack_all(values)
    try:
        unpacker = Unpacker(fd)
        assert not unpacker.pull(2 ** 22 + 12345, packer.parked())  # no such process
        packer.push()
        assert os.fstat(fd).st_size >= 800_000 + 256_000
        back = [unpacker.unpack(p) for p in packed]
        assert (back[0] == values[0]).all() and back[1] == values[1]
        back[0][0] = -1  # writable: a private copy-on-write mapping
        assert back[0][0] == -1
    finally:
        os.close(fd)


@pytest.mark.root
def test_unload_and_reload_the_extension():
    from IPython.testing.globalipapp import get_ipython

    from nsmagic.magics import InNamespaceMagics

    ip = get_ipython()
    ip.run_line_magic("load_ext", "nsmagic")
    ip.run_line_magic("unload_ext", "nsmagic")
    assert not {"innamespace", "nsinfo"} & set(ip.magics_manager.magics["line"])
    assert "innamespace" not in ip.magics_manager.magics["cell"]
    ip.run_line_magic("load_ext", "nsmagic")
    assert sum(isinstance(c, InNamespaceMagics) for c in ip.configurables) == 1
    assert ip.run_line_magic("innamespace", "-p __import__('os').getpid()") == 1


def test_a_history_thread_that_misses_its_stop_is_still_stopped_before_a_fork(tmp_path):
    import threading
    import time

    from IPython.core.history import HistoryManager
    from IPython.testing.globalipapp import get_ipython

    from nsmagic.shell import stop_saving_threads

    manager = HistoryManager(shell=get_ipython(), hist_file=tmp_path / "history.sqlite")
    thread = manager.save_thread
    assert thread is not None and thread.is_alive()
    if not (hasattr(HistoryManager, "_restart_thread_if_stopped") and hasattr(thread, "_stop_now")):
        # IPython 8: nothing stops its thread at a fork, so it has no lost wake-up; nsmagic
        # must leave it alone (stopping it would lose the history it has yet to write)
        stop_saving_threads()
        try:
            assert thread.is_alive(), "nsmagic stopped a history thread that is not the one it guards"
        finally:
            thread.stop()
        return

    clearing = threading.Event()

    class LateClear(threading.Event):
        """IPython's lost wake-up, every time: the thread clears its event only after a stop
        has set it (it had checked for a stop just before)."""

        def clear(self):
            clearing.set()
            while not thread._stop_now:
                time.sleep(0.001)
            time.sleep(0.05)
            super().clear()

    woken, thread.save_flag = thread.save_flag, LateClear()
    woken.set()  # a cell was stored: the thread wakes, finds no stop, and goes to clear
    thread.save_flag.set()  # (or it was still starting, and now waits on the new event)
    assert clearing.wait(5)
    start = time.monotonic()
    stop_saving_threads()  # IPython's own stop() would now wait forever in join()
    assert not thread.is_alive()
    assert manager.save_thread is None
    assert time.monotonic() - start < 5
    manager._restart_thread_if_stopped()  # as IPython does at the next stored cell
    assert manager.save_thread is not None and manager.save_thread.is_alive()
    manager.close()


def test_the_gil_keeping_system_calls_do_what_their_os_counterparts_do():
    import os

    from nsmagic import syscalls

    r, w = syscalls.pipe()
    syscalls.set_nonblocking(r)
    memfd = syscalls.memfd("nsmagic-test")
    ns = syscalls.open_readonly("/proc/thread-self/ns/pid")
    try:
        assert not os.get_blocking(r) and os.get_blocking(w)
        assert not any(os.get_inheritable(fd) for fd in (r, w, memfd, ns))  # all close on exec
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
        assert os.readlink(f"/proc/self/fd/{memfd}") == "/memfd:nsmagic-test (deleted)"
        assert os.readlink(f"/proc/self/fd/{ns}") == os.readlink("/proc/self/ns/pid")
        with pytest.raises(FileNotFoundError, match="/nonexistent"):
            syscalls.open_readonly("/nonexistent")
    finally:
        for fd in (r, w, memfd, ns):
            os.close(fd)


@contextmanager
def _sweeper(body):
    """Fork a process that runs ``body(write)``: it starts a leftover, writes its pid as the
    first line, sweeps, and writes what it saw. Yields the leftover's pid and a reader of the
    next line (None if none came within its timeout). Whatever happens, the sweeper is killed
    and reaped and the leftover is killed (psutil checks it is still the same process)."""
    import os
    import select

    import psutil

    from nsmagic.clone import fork

    r, w = os.pipe()
    pid = fork()  # (without Python 3.12's warning about forking this multi-threaded process)
    if pid == 0:
        try:
            os.close(r)
            body(lambda text: os.write(w, text.encode() + b"\n"))
        finally:
            os._exit(0)
    os.close(w)
    lines = os.fdopen(r, "rb")
    leftover = None
    try:
        leftover = psutil.Process(int(lines.readline()))

        def next_line(timeout):
            return lines.readline().decode() if select.select([lines], [], [], timeout)[0] else None

        yield leftover.pid, next_line
    finally:
        lines.close()
        os.kill(pid, 9)  # if it hung
        os.waitpid(pid, 0)
        if leftover is not None:
            try:
                leftover.kill()
            except psutil.Error:
                pass


@pytest.mark.root
def test_the_childs_sweep_leaves_what_it_may_not_kill_rather_than_hang():
    """A leftover of another user (root's sleep under a sweeper that became nobody): kill() is
    refused, and the sweep must return instead of waiting for it forever."""
    import os
    import subprocess
    import time

    from nsmagic import child

    def body(write):
        write(str(subprocess.Popen(["sleep", "600"]).pid))
        os.setgid(65534)
        os.setuid(65534)
        start = time.monotonic()
        child.end_leftovers()
        write(str(time.monotonic() - start))

    with _sweeper(body) as (sleeper, next_line):
        took = next_line(20)
        assert took is not None, "the sweep hung on a process it may not kill"
        assert float(took) < 5
        assert os.path.exists(f"/proc/{sleeper}")  # left to init, not killed


@pytest.mark.root
def test_the_childs_sweep_waits_no_longer_than_its_patience():
    """A leftover whose death takes longer than the sweep's patience (here: none, and a heap to
    tear down) is left dying to init; a sweep that waited for it would have reaped it."""
    import subprocess
    import sys
    import time

    from nsmagic import child
    from nsmagic.syscalls import set_child_subreaper
    from processes import wait_gone

    def body(write):
        set_child_subreaper()
        heap = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(256 << 20); "
                                 "b[::4096] = b'x' * len(b[::4096]); print(flush=True); time.sleep(600)"],
                                stdout=subprocess.PIPE)
        write(str(heap.pid))
        heap.stdout.readline()
        start = time.monotonic()
        child.end_leftovers(patience=0)
        took = time.monotonic() - start
        with open(f"/proc/{heap.pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0].decode()  # Z: it had ended
        write(f"{state} {took}")

    with _sweeper(body) as (heap, next_line):
        seen = next_line(30)
        assert seen is not None, "the sweep hung"
        state, took = seen.split()
        assert float(took) < 1
        assert state != "Z", "the sweep waited for the leftover's end"
        assert wait_gone([heap]) == [], "the leftover was not killed"


def test_one_table_names_every_namespace_kind_once():
    from nsmagic import kinds
    assert {k.flag for k in kinds.KINDS} == set(CloneFlag)
    assert [k.proc for k in kinds.KINDS] == ["mnt", "uts", "ipc", "net", "pid", "user", "cgroup", "time"]
    assert kinds.JOINABLE == ("mnt", "uts", "ipc", "net", "pid", "user")
    import os
    for k in kinds.KINDS:  # each /proc name is the kernel's own
        assert os.path.exists(f"/proc/self/ns/{k.proc}") or k.proc == "time"
        assert Namespaces(**{k.field: True}).flags == k.flag
        assert Namespaces.from_flags(k.flag).describe() == k.letter


def test_mountinfo_lines_are_parsed_with_optional_fields_and_escapes():
    from nsmagic.mountinfo import parse, read
    text = ("36 35 98:0 /mnt1 /mnt\\040two\\134x rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n"
            "37 36 0:5 / /tmp\\011tab rw - tmpfs tmp\\040fs rw\n"
            "not a mount line\n")
    a, b = parse(text)
    assert (a.id, a.parent, a.root, a.point, a.options) == ("36", "35", "/mnt1", "/mnt two\\x", "rw,noatime")
    assert (a.fstype, a.source, a.super_options) == ("ext3", "/dev/root", "rw,errors=continue")
    assert (b.point, b.source) == ("/tmp\ttab", "tmp fs")
    assert any(m.point == "/" for m in read())


def test_the_library_never_imports_ipython():
    """run, run_code, execute and everything under them work without IPython: only
    nsmagic.shell and nsmagic.magics touch it, and shell only once a shell hands it a cell."""
    import subprocess
    import sys
    script = ("import sys, nsmagic, nsmagic.runner, nsmagic.clone, nsmagic.child, nsmagic.environment, "
              "nsmagic.shell, nsmagic.info\n"
              "from nsmagic import run, run_code, execute\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('IPython', 'ipykernel', 'traitlets')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("asked, kind, named", [
    ({"net": True}, "net", "-n/--net and --join-net in one cell: -n/--net makes a fresh network namespace"),
    ({"hostname": "box"}, "uts", "--hostname and --join-uts in one cell: --hostname makes a fresh UTS"),
    ({"lo": True}, "net", "--lo and --join-net in one cell"),
    ({"lo": True, "veth": ""}, "net", "--lo, --veth and --join-net in one cell: --lo, --veth make"),
    ({"mount_proc": True, "pid": True}, "mnt", "--mount-proc and --join-mnt in one cell"),
    ({"bind": ["/a:/b"]}, "mnt", "--bind and --join-mnt in one cell"),
    ({"mount": True, "tmpfs": ["/t"]}, "mnt", "-m/--mount, --tmpfs and --join-mnt"),
    ({"map_root_user": True}, "user", "-r/--map-root-user and --join-user in one cell"),
    ({"boottime": 5}, "user", None),
])
def test_a_fresh_namespace_and_a_joined_one_are_refused_naming_the_options_typed(asked, kind, named):
    if named is None:
        Namespaces(join={kind: "1"}, **asked)  # no conflict: --boottime asks for a time namespace
        return
    with pytest.raises(OptionError) as e:
        Namespaces(join={kind: "1"}, **asked)
    assert str(e.value).startswith(named), str(e.value)
    assert "drop one of them" in str(e.value)


def test_signal_names_are_in_our_words():
    import signal

    from nsmagic.errors import ChildDied

    crashed = ChildDied(7, signal.SIGSEGV)  # a wait status: killed by SIGSEGV
    assert (crashed.signal, crashed.exitcode) == (signal.SIGSEGV, None)
    assert "(pid 7) was killed by signal 11 (SIGSEGV, segmentation fault) before" in str(crashed)
    exited = ChildDied(7, 3 << 8, reason="the OOM killer")  # exited with status 3
    assert (exited.signal, exited.exitcode) == (None, 3)
    assert "exited with status 3: the OOM killer before the cell finished" in str(exited)
    assert "(SIGUSR1)" in str(ChildDied(7, signal.SIGUSR1))  # a signal without words of ours


def test_plain_keeps_plain_data_as_is_and_converts_the_rest_as_jupyters_json_would():
    import datetime
    from fractions import Fraction

    from nsmagic.plain import plain

    data = {"text/plain": "x", "n": [1, 2.5, None, True, b"\x00"], "t": (1, "a")}
    assert plain(data, "d") is data  # the common case costs one walk, no copy
    when = datetime.datetime(2026, 12, 2, 13, 0, tzinfo=datetime.timezone.utc)
    assert plain({"when": when, "q": Fraction(1, 4), "s": {3}, 7: b"\x00\x01", "g": (i for i in [1])}, "d") == {
        "when": "2026-12-02T13:00:00Z", "q": 0.25, "s": [3], "7": "AAE=", "g": [1]}
    with pytest.raises(TypeError, match=r"^d holds a value Jupyter cannot send .* travels as JSON"):
        plain({"o": object()}, "d")
