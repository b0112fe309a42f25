"""The channel from the child to the kernel: nothing that comes through it runs in the kernel
unless it is a value the user asked for, in a report only nsmagic's child could have written."""

from __future__ import annotations

import os
import pickle
import struct
import textwrap
import uuid

import pytest

from nsmagic import Namespaces, ProtocolError, run_code
from nsmagic import protocol
from nsmagic.outcome import Outcome, Report, decode_report, make_report
from nsmagic.protocol import MAX_FRAME, FrameReader, Kind
from nsmagic.values import Packed, Packer, Parked, Unpacker


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / f"pwned-{uuid.uuid4().hex}"
    yield str(path)
    assert not path.exists(), "a payload ran in this process"


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!BQ", kind, len(payload)) + payload


# -- framing ---------------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_it_is_buffered():
    reader = FrameReader()
    with pytest.raises(ProtocolError, match="announced a message of"):
        reader.feed(struct.pack("!BQ", Kind.DISPLAY, MAX_FRAME + 1))  # the header alone


@pytest.mark.parametrize("kind", [0, int(Kind.ANSWER), 11, 255])
def test_frames_of_unknown_kinds_and_the_kernels_own_are_refused(kind):
    with pytest.raises(ProtocolError, match="unknown kind"):
        FrameReader().feed(_frame(kind, b""))


def test_frames_split_anywhere_still_arrive_whole():
    data = _frame(Kind.DISPLAY, protocol.dumps({"a": 1})) + _frame(Kind.READY, b"")
    reader = FrameReader()
    frames = [f for b in data for f in reader.feed(bytes([b]))]
    assert frames == [(Kind.DISPLAY, protocol.dumps({"a": 1})), (Kind.READY, b"")]
    assert reader.pending() == 0


def test_sending_more_than_the_limit_says_what_to_do_instead():
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="-o"):
            protocol.send(w, Kind.DISPLAY, bytes(MAX_FRAME + 1))
    finally:
        os.close(r), os.close(w)


# -- control payloads are plain data ------------------------------------------------------------


def test_control_payloads_are_plain_data(marker):
    plain = {"data": {"text/plain": "x", "image/png": b"\x89PNG"}, "n": [1, 2.5, None, True], "t": (1,)}
    assert protocol.load(protocol.dumps(plain)) == plain
    with pytest.raises(ProtocolError, match="not plain data"):
        protocol.load(pickle.dumps(_Payload(marker)))
    with pytest.raises(ProtocolError, match="not plain data"):
        protocol.load(pickle.dumps({"data": [_Payload(marker)]}, protocol=0))


@pytest.mark.parametrize("garbage", [b"", b"\x80", b"\x80\x05garbage", os.urandom(64), b"cos\nsystem\n."])
def test_garbage_payloads_are_a_protocol_error(garbage):
    with pytest.raises(ProtocolError):
        protocol.load(garbage)


def _report(value=41, outputs=("x",), secret=protocol.SECRET) -> bytes:
    packer = Packer(-1)
    report = make_report(Outcome(value=value, namespace={"x": 1}), list(outputs), packer)
    return protocol.dumps(report.plain(secret))


def test_a_report_round_trips_as_plain_data():
    report = decode_report(_report(), ["x"])
    assert isinstance(report, Report) and report.has_result and set(report.values) == {"x"}


def test_a_report_without_the_kernels_secret_is_refused(marker):
    forged = list(pickle.loads(_report(secret=os.urandom(16))))
    forged[1] = (pickle.dumps(_Payload(marker)), None, [])  # the "value": a pickle that runs code
    with pytest.raises(ProtocolError, match="not written by nsmagic's child"):
        decode_report(pickle.dumps(tuple(forged)), ["x"])


def test_a_report_naming_values_not_asked_for_is_refused():
    with pytest.raises(ProtocolError, match="not asked for"):
        decode_report(_report(outputs=("x",)), [])


@pytest.mark.parametrize("field, bad", [(1, ("not bytes", None, [])), (1, (b"x", (0, 1), [])),
                                        (1, (None, (-1, 5), [])), (7, (10, [(8, 0, 4)])),
                                        (7, (10, [(0, 0, -1)])), (6, ("E", "v", [1], "t", None))])
def test_a_garbled_report_is_a_protocol_error(field, bad):
    report = list(pickle.loads(_report()))
    report[field] = bad
    with pytest.raises(ProtocolError, match="garbled"):
        decode_report(pickle.dumps(tuple(report)), ["x"])


# -- the out-of-band area ---------------------------------------------------------------------


def test_pieces_outside_the_area_are_never_copied():
    unpacker = Unpacker(-1)
    with pytest.raises(ValueError, match="outside"):
        unpacker.pull(os.getpid(), Parked(4096, [(4000, 0, 200)]))
    with pytest.raises(ValueError, match="outside"):
        Parked.from_plain((4096, [(4096, 0, 1)]))


def test_spans_outside_the_memfd_are_refused_and_the_memfd_is_sealed():
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, pickle.dumps(b"x" * 100))
        unpacker = Unpacker(fd)
        assert unpacker.unpack(Packed(None, (0, os.fstat(fd).st_size))) == b"x" * 100
        with pytest.raises(ValueError, match="of a"):
            unpacker.unpack(Packed(None, (0, 1 << 20)))
        with pytest.raises(ValueError, match="of a"):
            unpacker.unpack(Packed(b"", None, [(10, 1 << 30)]))
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # sealed: no SIGBUS under the kernel's mapping
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"y", 0)
    finally:
        os.close(fd)


# -- the order rule and garbled frames, in real children -------------------------------------

#: In a cell: the child's control pipe (the cell's own code can reach it; programs it runs cannot).
CONTROL = "import builtins; control = builtins.input.__self__.control\n"


def _run(code: str, **kw):
    return run_code(textwrap.dedent(code), globals={"frame": _frame, "Kind": Kind, "protocol": protocol},
                    **kw)


@pytest.mark.root
@pytest.mark.parametrize("written", [
    "b'garbage that is not a frame'",
    "frame(99, b'')",
    "frame(int(Kind.DISPLAY), b'not a pickle')",
    "frame(int(Kind.PUSHED), b'')",
    "frame(int(Kind.READY), b'')",
    "frame(int(Kind.DONE), protocol.dumps((b'0' * 16,) + (None,) * 7))",
    "struct.pack('!BQ', int(Kind.DISPLAY), 1 << 40)",
])
def test_a_garbled_or_forged_frame_ends_the_cell_with_a_protocol_error(written):
    with pytest.raises(ProtocolError) as info:
        _run(CONTROL + f"import os, struct, time\nos.write(control, {written})\ntime.sleep(30)\n",
             namespaces=Namespaces(pid=True), timeout=60)
    assert "\n" not in str(info.value)


@pytest.mark.root
def test_anything_after_the_final_report_is_a_protocol_error():
    code = CONTROL + textwrap.dedent("""\
        import os
        from nsmagic.outcome import Outcome, make_report
        from nsmagic.values import Packer
        done = protocol.dumps(make_report(Outcome(value=1), [], Packer(-1)).plain(protocol.SECRET))
        os.write(control, frame(int(Kind.DONE), done) + frame(int(Kind.CLEAR_OUTPUT), protocol.dumps(False)))
        import time; time.sleep(30)
        """)
    with pytest.raises(ProtocolError, match="after its final report"):
        _run(code, timeout=60)


@pytest.mark.root
def test_a_frame_cut_off_by_the_childs_exit_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="cut off"):
        _run(CONTROL + "import os\nos.write(control, frame(int(Kind.DISPLAY), b'x' * 100)[:50])\nos._exit(0)\n")


# -- the attack of issue 13, on a real kernel ------------------------------------------------------

#: Run by the cell as a separate program: finds the cell's control pipe through /proc/$PPID/fd
#: and writes a forged final report whose value is a pickle that creates MARKER.
ATTACK = r'''
import os, pickle, struct, sys
fd, marker = int(sys.argv[1]), sys.argv[2]
class P:
    def __reduce__(self):
        return (os.system, ("touch " + marker,))
value = pickle.dumps(P())
forged = (b"0" * 16, (value, None, []), None, True, {}, {}, None, None)  # a report's shape
for payload in (pickle.dumps(forged), value):  # as plain data, and as a bare pickle
    try:
        with open(f"/proc/{os.getppid()}/fd/{fd}", "wb", buffering=0) as pipe:
            pipe.write(struct.pack("!BQ", 5, len(payload)) + payload)
        print("written", flush=True)
    except OSError as e:
        print("refused:", e.strerror, flush=True)
'''


def _attack_cell(options: str, marker: str) -> str:
    return textwrap.dedent(f"""\
        %%innamespace {options}
        import builtins, subprocess, sys, time
        subprocess.run([sys.executable, "-c", {ATTACK!r}, str(builtins.input.__self__.control), {marker!r}])
        time.sleep(5)
        print("the cell went on")
        """)


@pytest.mark.kernel
@pytest.mark.root
def test_a_program_run_by_a_root_cell_cannot_run_code_in_the_kernel_through_the_pipe(kernel, marker):
    # Root without -U is the host's root: it can open the pipe, but the kernel runs nothing it wrote.
    cell = kernel.execute(_attack_cell("-n -p --mount-proc", marker))
    assert cell.ename == "ProtocolError" and "not written by nsmagic's child" in cell.evalue
    assert len(cell.traceback.splitlines()) == 1
    assert "the cell went on" not in cell.stdout
    assert not os.path.exists(marker)
    assert kernel.execute("1 + 1").ok().result == {"text/plain": "2"}


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("options", ["-r -p -n --mount-proc", "-r"])
def test_a_program_in_a_user_namespace_cannot_even_open_the_pipe(kernel, marker, options):
    cell = kernel.execute(_attack_cell(options, marker)).ok()
    assert cell.stdout.split("\n")[:2] == ["refused: Permission denied"] * 2
    assert "the cell went on" in cell.stdout
    assert not os.path.exists(marker)


# -- what the cell and its programs hold ---------------------------------------------------------

FDS = ("sorted((fd, os.readlink(f'/proc/self/fd/{fd}')) for fd in map(int, os.listdir('/proc/self/fd')) "
       "if os.path.exists(f'/proc/self/fd/{fd}'))")


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("options", ["", "-n", "-r -p"])
def test_the_cell_holds_none_of_the_kernels_descriptors_and_its_programs_only_0_1_2(kernel, options):
    kernel.execute("import os, subprocess, sys").ok()
    held = kernel.value_in(options, FDS)
    kinds = {target.split(":")[0] if ":" in target else target for fd, target in held if fd > 2}
    assert "socket" not in kinds and not any(t.endswith(".sqlite") or "history" in t for _, t in held)
    assert kinds <= {"pipe", "/memfd", "/dev/null", "anon_inode", f"/proc/{'1' if '-p' in options else ''}"} | {
        t for _, t in held if t.startswith("/proc/")}
    programs = kernel.value_in(options, "subprocess.run([sys.executable, '-c', 'import os; print(sorted(map(int, os.listdir(\"/proc/self/fd\"))))'], capture_output=True, text=True).stdout")
    assert programs.strip() == "[0, 1, 2, 3]"  # 3: the listing's own
    shell = kernel.execute(f"%%innamespace {options}\n!ls /proc/self/fd").ok()
    assert shell.stdout.split() == ["0", "1", "2", "3"]


@pytest.mark.root
@pytest.mark.parametrize("kind, value", [(Kind.DISPLAY, {"data": {}}), (Kind.IOPUB, {"msg_type": "x", "evil": 1}),
                                         (Kind.INPUT, ("prompt",)), (Kind.DISPLAY, [1, 2])])
def test_a_message_of_the_wrong_shape_is_a_protocol_error_not_a_traceback(kind, value):
    with pytest.raises(ProtocolError, match="wrong shape"):
        _run(CONTROL + f"import os, time\nos.write(control, frame({int(kind)}, protocol.dumps({value!r})))\n"
             "time.sleep(30)\n", namespaces=Namespaces(pid=True), timeout=60)
