"""What a namespaced cell looks like in a notebook: streams, results, errors, crashes, values,
options, interrupts and timeouts, all through a real kernel's messages."""

import ast
import os
import time

import psutil
import pytest

from helpers import MAPPED_MEMFDS, Running, wait_until
from processes import descendants, kill_sleepers, wait_gone

pytestmark = [pytest.mark.kernel, pytest.mark.root]


# -- output ---------------------------------------------------------------------------------

def test_output_streams_live_without_flush(kernel):
    cell = kernel.execute("%%innamespace -n -p\nimport time\nprint('first')\ntime.sleep(2)\nprint('second')").ok()
    streams = [m for m in cell.of_type("stream") if m["content"]["name"] == "stdout"]
    first = next(m for m in streams if "first" in m["content"]["text"])
    second = next(m for m in streams if "second" in m["content"]["text"])
    assert second["received"] - first["received"] >= 1.5


def test_fd_level_output_of_subprocesses_in_order(kernel):
    cell = kernel.execute("""%%innamespace -n
import os, subprocess
print('one')
os.system('echo two')
subprocess.run(['echo', 'three'])
!echo four
print('five')""").ok()
    assert cell.stdout.replace("\r\n", "\n").split() == ["one", "two", "three", "four", "five"]


def test_kernel_output_around_a_line_magic_keeps_its_place_and_is_not_repeated(kernel):
    cell = kernel.execute("""import sys
print('kernel before', end=' ')
print('kernel err', file=sys.stderr)
%innamespace -u print('child')
print('kernel after')""").ok()
    assert cell.stdout == "kernel before child\nkernel after\n"
    assert cell.stderr == "kernel err\n"


def test_stderr_is_its_own_stream(kernel):
    cell = kernel.execute("%%innamespace -n\nimport sys, os\nprint('to err', file=sys.stderr)\nos.system('echo fd2 >&2')").ok()
    assert cell.stderr.split() == ["to", "err", "fd2"]
    assert cell.stdout == ""


def test_invalid_utf8_is_replaced(kernel):
    cell = kernel.execute("%%innamespace\nimport os\nos.write(1, b'ok \\xff\\xfe end\\n')").ok()
    assert cell.stdout == "ok \ufffd\ufffd end\n"


def test_multibyte_character_split_across_writes(kernel):
    cell = kernel.execute("%%innamespace\nimport os\nb = 'é€'.encode()\nfor i in range(len(b)):\n    os.write(1, b[i:i+1])").ok()
    assert cell.stdout == "é€"


# -- results --------------------------------------------------------------------------------

def test_final_expression_is_the_cell_result(kernel):
    cell = kernel.execute("%%innamespace -n -p\nimport os\nos.getpid() * 42").ok()
    assert cell.result == {"text/plain": "42"}
    assert kernel.value("_") == 42


def test_semicolon_hides_the_result(kernel):
    cell = kernel.execute("%%innamespace -n\n6 * 7;").ok()
    assert cell.result is None


def test_unpicklable_result_is_shown_as_the_child_shows_it(kernel):
    cell = kernel.execute("%%innamespace\n(i for i in range(3))").ok()
    assert cell.result["text/plain"].startswith("<generator object")


def test_line_magic_keeps_code_verbatim(kernel):
    cell = kernel.execute('%innamespace -u --hostname  two-spaces   "a  b" + __import__("socket").gethostname()').ok()
    assert cell.result == {"text/plain": "'a  btwo-spaces'"}


def test_magics_and_shell_escapes_work_inside(kernel):
    kernel_cwd = kernel.value("__import__('os').getcwd()")
    cell = kernel.execute("%%innamespace -m\n%cd /tmp\nimport os\nfiles = !ls /\nprint(os.getcwd(), 'proc' in files)").ok()
    assert cell.stdout.strip().endswith("/tmp True")
    assert kernel.value("__import__('os').getcwd()") == kernel_cwd


def test_child_sees_kernel_state_but_cannot_change_it(kernel):
    kernel.execute("shared = [1, 2, 3]\ndef double(x): return 2 * x").ok()
    cell = kernel.execute("%%innamespace -n\nshared.append(4)\nprint(double(len(shared)))").ok()
    assert cell.stdout.strip() == "8"
    assert kernel.value("shared") == [1, 2, 3]


def test_display_data_reaches_the_notebook(kernel):
    cell = kernel.execute("""%%innamespace -n
from IPython.display import HTML, display
print('before')
display(HTML('<b>bold</b>'))
print('after')""").ok()
    kinds = [(m["msg_type"], m["content"].get("text") or m["content"].get("data")) for m in cell.messages
             if m["msg_type"] in ("stream", "display_data")]
    assert kinds == [("stream", "before\n"),
                     ("display_data", {"text/html": "<b>bold</b>", "text/plain": "<IPython.core.display.HTML object>"}),
                     ("stream", "after\n")]


# -- errors ---------------------------------------------------------------------------------

def test_exception_fails_cell_with_its_own_class_and_line(kernel):
    cell = kernel.execute("%%innamespace -n\nx = 1\ny = 0\nx / y")
    assert (cell.status, cell.ename, cell.evalue) == ("error", "ZeroDivisionError", "division by zero")
    assert "line 4" in cell.traceback and "x / y" in cell.traceback


def test_syntax_error_is_shown_like_a_plain_cells_and_starts_no_child(kernel):
    cell = kernel.execute("%%innamespace -n\nprint('ran')\nx = (1,")
    assert cell.ename == "SyntaxError"
    assert "line 3" in cell.traceback
    assert "ran" not in cell.stdout


def test_system_exit_in_the_cell_is_shown_as_in_a_plain_cell(kernel):
    cell = kernel.execute("%%innamespace -n\nraise SystemExit('bye')")
    assert (cell.ename, cell.evalue) == ("SystemExit", "bye")
    assert "AttributeError" not in cell.traceback + cell.stderr
    assert kernel.value("1 + 1") == 2


def test_exception_can_be_caught_by_code_running_the_magic(kernel):
    kernel.execute("class TutorialError(Exception): pass").ok()
    cell = kernel.execute("""try:
    get_ipython().run_cell_magic('innamespace', '-n', 'raise TutorialError("inside")')
except TutorialError as e:
    print('caught', type(e).__name__, e)""").ok()
    assert cell.stdout.strip() == "caught TutorialError inside"


@pytest.mark.parametrize("code, words", [
    ("import os; os._exit(3)", "exited with status 3"),
    ("import ctypes; ctypes.string_at(0)", "signal 11 (SIGSEGV, segmentation fault)"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "signal 9 (SIGKILL, killed)"),
])
def test_child_that_dies_fails_the_cell_and_kernel_lives(kernel, code, words):
    kernel.execute("computed_before = 41").ok()
    # Not -p: PID 1 of a PID namespace cannot even SIGKILL itself.
    cell = kernel.execute(f"%%innamespace -n\nprint('started')\n{code}")
    assert cell.ename == "ChildDied"
    assert words in cell.evalue
    assert "started" in cell.stdout
    assert len(cell.traceback.splitlines()) == 1, "one-line message, no deep traceback"
    assert kernel.value("computed_before + 1") == 42


# -- values back (-o) -----------------------------------------------------------------------

def test_out_values_arrive_in_the_kernel(kernel):
    kernel.execute("%%innamespace -n -p -o pid_inside,ifaces -o square\nimport os, socket\n"
                   "pid_inside = os.getpid()\nifaces = socket.if_nameindex()\ndef square(v): return v * v").ok()
    assert kernel.value("(pid_inside, ifaces, square(7))") == (1, [(1, "lo")], 49)


def test_large_buffer_comes_back_intact_and_writable(kernel):
    cell = kernel.execute("%%innamespace -u -o blob\nblob = bytearray(range(256)) * (40 * 4096)").ok()
    assert cell.status == "ok"
    assert kernel.value("(len(blob), bytes(blob[:3]), blob[-1])") == (256 * 40 * 4096, b"\x00\x01\x02", 255)
    kernel.execute("blob[0] = 7").ok()
    assert kernel.value("blob[0]") == 7




@pytest.mark.parametrize("options", ["-u", "-r -p"])  # the child itself; PID 1 under the child
def test_large_values_are_copied_out_of_the_child_not_through_a_file(kernel, options):
    import numpy as np

    kernel.execute("import numpy as np\nbig = text = None").ok()
    before = kernel.value(MAPPED_MEMFDS)
    kernel.execute(f"%%innamespace {options} -o big,text\n"
                   "big = np.arange(3_000_000, dtype=np.int64)\ntext = 'ab' * 100_000").ok()
    assert kernel.value("(int(big.sum()), bool(big.flags.writeable), text[-3:], len(text))") == (
        int(np.arange(3_000_000).sum()), True, "bab", 200_000)
    assert kernel.value(MAPPED_MEMFDS) == before  # read with process_vm_readv, no memfd mapped


def test_unpicklable_and_missing_values_are_named_and_others_arrive(kernel):
    kernel.execute("good = None").ok()
    cell = kernel.execute("%%innamespace -n -o good,gen,nowhere\ngood = 'arrived'\ngen = (i for i in range(3))")
    assert cell.ename == "OutputError"
    assert "'gen'" in cell.evalue and "generator" in cell.evalue
    assert "'nowhere'" in cell.evalue and "not defined" in cell.evalue
    assert kernel.value("good") == "arrived"


def test_values_assigned_before_an_exception_still_arrive(kernel):
    cell = kernel.execute("%%innamespace -n -o partial\npartial = 'kept'\nraise RuntimeError('later')")
    assert cell.ename == "RuntimeError"
    assert kernel.value("partial") == "kept"


# -- options --------------------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    ("--bogus", "unrecognized arguments: --bogus"),
    ("--timeout -1", "positive number of seconds"),
    ("--timeout soon", "not a number of seconds"),
    ("-o 1abc", "'1abc' is not a Python variable name"),
    ("--hostname " + "h" * 65, "at most 64"),
    ("-n extra words", "unexpected arguments"),
])
def test_bad_options_are_usage_errors_and_never_run_the_body(kernel, tmp_path, options, words):
    marker = tmp_path / "ran"
    cell = kernel.execute(f"%%innamespace {options}\nopen({str(marker)!r}, 'w').write('x')")
    assert cell.ename == "UsageError"
    assert words in cell.evalue
    assert not marker.exists()


def test_fork_flag_is_accepted_like_unshare(kernel):
    assert kernel.value_in("-fp", "__import__('os').getpid()") == 1


def test_no_defaults_leaves_the_default_options_out_for_one_cell(kernel):
    kernel.execute("%config InNamespaceMagics.default_options = '-p'").ok()
    try:
        assert kernel.value_in("", "__import__('os').getpid()") == 1
        assert kernel.value_in("--no-defaults", "__import__('os').getpid()") != 1
        cell = kernel.execute("%innamespace --no-defaults -u print(__import__('os').getpid() != 1)")
        assert cell.ok().stdout == "True\n"
    finally:
        kernel.execute("%config InNamespaceMagics.default_options = ''").ok()


def test_configurable_default_options(kernel):
    kernel.execute("%config InNamespaceMagics.default_options = '-p'").ok()
    try:
        assert kernel.value_in("", "__import__('os').getpid()") == 1
    finally:
        kernel.execute("%config InNamespaceMagics.default_options = ''").ok()
    assert kernel.value_in("", "__import__('os').getpid()") != 1


# -- interrupts and timeouts ----------------------------------------------------------------

def _start_sleeper(k, options: str, body: str = "time.sleep(60)") -> Running:
    cell = Running(k, f"%%innamespace {options}\nimport os, subprocess, time\n"
                      "helper = subprocess.Popen(['sleep', '600'])\n"
                      "detached = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
                      f"print('started', flush=True)\n{body}")
    cell.wait_for("started")
    return cell


@pytest.mark.parametrize("options", ["-n", "-n -p --mount-proc", "-r -p"])
def test_interrupt_kills_child_and_everything_in_its_namespace(fresh_kernel, options):
    cell = _start_sleeper(fresh_kernel, options)
    victims = [p.pid for p in descendants(fresh_kernel.pid)]
    assert len(victims) >= 3, "the child and its two sleeps"
    t0 = time.monotonic()
    reply = cell.interrupt()
    try:
        assert reply["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - t0 < 10
        assert wait_gone(victims) == []
    finally:
        kill_sleepers(victims)
    assert fresh_kernel.value("1 + 1") == 2


def test_interrupt_kills_a_cell_that_ignores_sigint(fresh_kernel):
    cell = _start_sleeper(fresh_kernel, "-p", "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)")
    victims = [p.pid for p in descendants(fresh_kernel.pid)]
    assert cell.interrupt()["ename"] == "KeyboardInterrupt"
    assert wait_gone(victims) == []


def test_an_interrupt_the_instant_fork_returns_still_stops_and_reaps_the_child(fresh_kernel):
    k = fresh_kernel
    # The interrupt is raised as the kernel's fork returns, before the pid could be kept: the
    # kernel's thread holds SIGINT off, so another thread takes the signal and Python raises it
    # at the next bytecode. Only the kernel's side is patched; the child runs as usual.
    k.execute("""import os, signal, time, nsmagic.clone as _clone
_plain_fork = _clone._fork
def _fork_then_interrupt():
    pid = _plain_fork()
    if pid:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # Python runs the handler when this returns
    return pid
_clone._fork = _fork_then_interrupt""").ok()
    try:
        cell = k.execute("%%innamespace -p\nimport time\ntime.sleep(30)", timeout=30)
    finally:
        k.execute("_clone._fork = _plain_fork").ok()
    assert cell.ename == "KeyboardInterrupt"
    assert wait_gone([p.pid for p in descendants(k.pid)]) == []
    assert descendants(k.pid) == []  # not even a zombie
    assert k.value_in("-p", "__import__('os').getpid()") == 1


def test_timeout_kills_child_and_says_so(kernel):
    t0 = time.monotonic()
    cell = kernel.execute("%%innamespace -p --timeout 1\nimport subprocess, time\n"
                          "subprocess.Popen(['sleep', '600'])\nprint('working')\ntime.sleep(60)")
    elapsed = time.monotonic() - t0
    assert cell.ename == "CellTimeout"
    assert "timeout of 1s" in cell.evalue
    assert "working" in cell.stdout
    assert elapsed < 1 + 1 + 5  # timeout + grace + slack
    assert [p for p in descendants(kernel.pid) if p.name() == "sleep"] == []


FREEZER = "/sys/fs/cgroup/freezer"


@pytest.fixture
def frozen_cgroup():
    """A cgroup v1 freezer cgroup of the test's own: a process frozen in it ends on SIGKILL only
    once thawed, as one stuck in an uninterruptible call does."""
    if not os.path.isdir(FREEZER):
        # (cgroup v2's freezer will not do: it lets SIGKILL through, so it cannot hold a killed process)
        pytest.skip("this test needs the cgroup v1 freezer (mounted on the machine the tests run on)")
    path = f"{FREEZER}/nsmagic-test-{os.getpid()}"
    os.mkdir(path)
    try:
        yield path
    finally:
        with open(f"{path}/freezer.state", "w") as f:
            f.write("THAWED")
        wait_until(lambda: not _members(path), 10, 0.05)
        os.rmdir(path)


def _members(cgroup: str) -> list[int]:
    with open(f"{cgroup}/cgroup.procs") as f:
        return [int(pid) for pid in f.read().split()]


def test_a_child_sigkill_cannot_end_yet_is_left_to_the_reaper(fresh_kernel, frozen_cgroup):
    k = fresh_kernel
    k.execute("import nsmagic.runner\nnsmagic.runner.KILL_WAIT = 0.5\n"
              "%config InNamespaceMagics.grace_period = 0.2").ok()
    t0 = time.monotonic()
    cell = k.execute(f"%%innamespace -n --timeout 1\nimport os, time\n"
                     f"assert os.getpid() != {k.pid}, 'must not freeze the kernel'\n"
                     f"open('{frozen_cgroup}/cgroup.procs', 'w').write(str(os.getpid()))\n"
                     f"open('{frozen_cgroup}/freezer.state', 'w').write('FROZEN')\ntime.sleep(60)")
    assert cell.ename == "CellTimeout"
    assert time.monotonic() - t0 < 1 + 0.2 + 0.5 + 3, "the kernel waited for a child it cannot end"
    frozen = _members(frozen_cgroup)
    assert len(frozen) == 1 and frozen[0] != k.pid
    # The kernel goes on, and a later child is reaped while the frozen one still waits.
    later = k.value_in("-n", "__import__('os').getpid()")
    assert wait_gone([later]) == [], "the reaper waited for the frozen child first"
    assert psutil.pid_exists(frozen[0])
    with open(f"{frozen_cgroup}/freezer.state", "w") as f:
        f.write("THAWED")
    assert wait_gone(frozen) == [], "the killed child, thawed, was never reaped"


def test_finally_blocks_run_on_interrupt(fresh_kernel):
    cell = Running(fresh_kernel, "%%innamespace -p\nimport time\ntry:\n    print('in', flush=True)\n"
                                 "    time.sleep(60)\nfinally:\n    print('cleaned up', flush=True)")
    cell.wait_for("in")
    assert cell.interrupt()["ename"] == "KeyboardInterrupt"
    assert "cleaned up" in cell.text, cell.text


# -- input ----------------------------------------------------------------------------------

def test_input_is_answered_through_the_notebook(kernel):
    cell = kernel.execute("%%innamespace -n\nname = input('who? ')\nprint('hello', name)",
                          stdin=lambda prompt: "student" if prompt == "who? " else "?").ok()
    assert "hello student" in cell.stdout


def test_input_without_a_frontend_fails_at_once(kernel):
    t0 = time.monotonic()
    cell = kernel.execute("%%innamespace -n\ninput('who? ')")
    assert cell.ename == "EOFError"
    assert "input() is not available" in cell.evalue
    assert time.monotonic() - t0 < 10


def test_no_zombie_after_cells(kernel):
    for options in ("-n", "-p", "-r -p", ""):
        kernel.execute(f"%%innamespace {options}\npass").ok()
    time.sleep(0.5)
    zombies = [p for p in descendants(kernel.pid) if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []


_LEAVE_RUNNING = """\
import os, subprocess
in_group = subprocess.Popen(['sleep', '600']).pid
own_session = subprocess.Popen(['sleep', '600'], start_new_session=True).pid
orphan = int(subprocess.run(['sh', '-c', 'setsid sleep 600 >/dev/null 2>&1 & echo $!'],
                            capture_output=True, text=True).stdout)
print(repr((os.getpid(), in_group, own_session, orphan)), flush=True)
"""


@pytest.mark.parametrize("options", ["", "-n", "-U", "-u -i -m"])
def test_processes_a_cell_leaves_running_end_with_it(kernel, options):
    cell = kernel.execute(f"%%innamespace {options}\n{_LEAVE_RUNNING}").ok()
    child, *left = ast.literal_eval(cell.stdout.strip())
    try:
        assert child != kernel.pid and len(set(left)) == 3
        assert wait_gone(left) == [], "a process the cell started outlived it"
        # the child itself is reaped off the cell's path, by the kernel's reaper thread
        assert wait_until(lambda: not [p for p in descendants(kernel.pid) if _zombie(p)]), \
            [p for p in descendants(kernel.pid) if _zombie(p)]
    finally:
        kill_sleepers(left)


def _zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_processes_of_a_cell_that_crashed_end_with_it(kernel):
    cell = kernel.execute(f"%%innamespace -n\n{_LEAVE_RUNNING}os._exit(3)")
    assert cell.ename == "ChildDied"
    child, in_group, *detached = ast.literal_eval(cell.stdout.strip())
    try:
        assert child != kernel.pid
        assert wait_gone([in_group]) == [], "the crashed cell's process group outlived it"
    finally:  # what left the group went to init with the child's death (use -p for those)
        kill_sleepers([in_group, *detached])


def test_a_cell_still_waits_for_its_own_children(kernel):
    cell = kernel.execute("%%innamespace -n\nimport os, subprocess\npid = os.fork()\n"
                          "if pid == 0:\n    os._exit(5)\n"
                          "print(subprocess.run(['sh', '-c', 'exit 7']).returncode, "
                          "os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))").ok()
    assert cell.stdout.split() == ["7", "5"]


def test_a_class_redefined_in_the_cell_comes_back_as_the_cells(kernel):
    kernel.execute("class Shape:\n    sides = 3").ok()
    kernel.execute("%%innamespace -n -o made\nclass Shape:\n    sides = 4\nmade = Shape()").ok()
    assert kernel.value("(made.sides, Shape.sides, type(made) is Shape)") == (4, 3, False)
    kernel.execute("%%innamespace -n -o kept\nkept = Shape()").ok()
    assert kernel.value("type(kept) is Shape") is True
