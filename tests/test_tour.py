"""The tour notebook runs headless, and its outputs show what its markdown says they show.

The notebook is executed once per session with nbclient, as `jupyter execute` would, in a real
kernel; cells tagged ``raises-exception`` may fail (nbclient lets them), every other cell must
succeed. Each test then reads the outputs of one cell, found by its ``check-*`` tag.
"""

from __future__ import annotations

import ast
import os
import re
import socket
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "tour.ipynb"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: The cells that must fail, and how.
EXPECTED_ERRORS = {
    "check-timeout": "CellTimeout",
    "check-output-error": "OutputError",
    "check-cell-error": "OSError",
}


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def _message_queues() -> set[int]:
    with open("/proc/sysvipc/msg") as f:
        next(f)
        return {int(line.split()[1]) for line in f}


def _tour_dirs() -> set[str]:
    import tempfile

    tmp = tempfile.gettempdir()
    return {name for name in os.listdir(tmp) if name.startswith("nsmagic-tour-")}


@pytest.fixture(scope="module")
def host_before():
    """What the notebook must leave as it found it, read before it runs."""
    return {
        "hostname": socket.gethostname(),
        "mounts": _mount_points(),
        "queues": _message_queues(),
        "tour_dirs": _tour_dirs(),
    }


@pytest.fixture(scope="module")
def executed(host_before):
    if os.geteuid() != 0:
        pytest.skip("the tour creates namespaces without -r, which needs root")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    return nb


def cell(nb, tag: str):
    found = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(found) == 1, f"expected one cell tagged {tag!r}, found {len(found)}"
    return found[0]


def stdout(nb, tag: str) -> str:
    """The cell's stdout, with the pty's CRLF of ``!cmd`` output (as in any kernel) made LF."""
    text = "".join(o.text for o in cell(nb, tag).outputs if o.output_type == "stream" and o.name == "stdout")
    return text.replace("\r\n", "\n")


def stderr(nb, tag: str) -> str:
    return "".join(o.text for o in cell(nb, tag).outputs if o.output_type == "stream" and o.name == "stderr")


def result(nb, tag: str) -> str:
    results = [o for o in cell(nb, tag).outputs if o.output_type == "execute_result"]
    assert len(results) == 1, f"cell {tag!r} has no Out[]: {cell(nb, tag).outputs}"
    return results[0].data["text/plain"]


def error(nb, tag: str):
    errors = [o for o in cell(nb, tag).outputs if o.output_type == "error"]
    return errors[0] if errors else None


def line_value(text: str, label: str) -> str:
    """The rest of the line that starts with *label*."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(label):
            return line[len(label):].strip()
    raise AssertionError(f"no line starting with {label!r} in:\n{text}")


# -- the notebook as stored ---------------------------------------------------------------------


def test_stored_notebook_is_small_and_tagged():
    assert NOTEBOOK.stat().st_size < 200_000
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    failing = {t for c in nb.cells if "raises-exception" in c.metadata.get("tags", [])
               for t in c.metadata["tags"] if t.startswith("check-")}
    assert failing == set(EXPECTED_ERRORS)


# -- the run as a whole ------------------------------------------------------------------------


def test_only_the_tagged_cells_failed(executed):
    for c in executed.cells:
        if c.cell_type != "code":
            continue
        tags = c.metadata.get("tags", [])
        errors = [o for o in c.outputs if o.output_type == "error"]
        if "raises-exception" in tags:
            expected = next(EXPECTED_ERRORS[t] for t in tags if t in EXPECTED_ERRORS)
            assert [e.ename for e in errors] == [expected], c.source
        else:
            assert not errors, c.source
        # nsmagic must not spill its own tracebacks (e.g. a child's KeyboardInterrupt) into cells
        assert "nsmagic/" not in "".join(o.get("text", "") for o in c.outputs), c.source


def test_the_host_is_as_before(executed, host_before):
    assert socket.gethostname() == host_before["hostname"]
    assert _mount_points() == host_before["mounts"]
    assert _message_queues() == host_before["queues"]
    assert _tour_dirs() == host_before["tour_dirs"]


# -- one test per section -------------------------------------------------------------------------


def test_kernel_view(executed):
    out = stdout(executed, "check-kernel")
    assert int(line_value(out, "pid:")) > 1
    assert line_value(out, "hostname:") == socket.gethostname()
    for kind in ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"):
        assert re.search(rf"^/proc/self/ns/{kind}\s+-> {kind}:\[\d+\]$", out, re.M), kind


def test_first_cell_is_a_child_in_the_kernels_namespaces(executed):
    out = stdout(executed, "check-first")
    child, kernel = re.search(r"child pid: (\d+)\s+kernel pid: (\d+)", out).groups()
    assert child != kernel
    assert line_value(out, "new namespaces:") == "[]"
    assert result(executed, "check-first") == "True"


def test_net_has_only_lo_and_it_is_down(executed):
    out = stdout(executed, "check-net")
    assert line_value(out, "new namespaces:") == "['net']"
    assert ast.literal_eval(line_value(out, "interfaces:")) == [(1, "lo")]
    assert ast.literal_eval(line_value(out, "states:")) == {"lo": "DOWN"}
    assert re.search(r"^lo\s+DOWN", out, re.M)  # from !ip -brief link


def test_pid_without_mount_proc_sees_the_hosts_proc(executed):
    pid, seen = ast.literal_eval(result(executed, "check-pid-no-proc"))
    assert pid == 1
    assert seen > 1


def test_pid_with_mount_proc_is_pid_1_alone(executed):
    out = stdout(executed, "check-pid")
    assert line_value(out, "my pid:").startswith("1 ")
    assert line_value(out, "pids in /proc:") == "[1]"
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\s+\d+\s+\S", line)]
    pids = {int(r[0]): (int(r[1]), r[2]) for r in rows}
    assert pids[1][0] == 0 and pids[1][1].startswith("python")
    assert "ps" in {comm for _, comm in pids.values()}
    assert max(pids) < 10  # only the namespace's own processes


def test_hostname_inside_and_unchanged_in_the_kernel(executed):
    out = stdout(executed, "check-hostname")
    assert line_value(out, "hostname inside:") == "box"
    assert re.search(r"^box$", out, re.M)  # from !hostname
    assert line_value(out, "after sethostname:") == "renamed-inside"
    assert line_value(stdout(executed, "check-hostname-kernel"), "hostname in the kernel:") == socket.gethostname()


def test_line_magic_value(executed):
    assert result(executed, "check-line-magic") == "'box'"


def test_ipc_queue_visible_only_in_the_kernel(executed):
    kernel = stdout(executed, "check-ipc-kernel")
    assert line_value(kernel, "the kernel sees our queue:") == "True"
    inside = stdout(executed, "check-ipc")
    assert line_value(inside, "queues seen inside:") == "[]"
    assert line_value(inside, "the child sees our queue:") == "False"
    assert line_value(stdout(executed, "check-ipc-cleanup"), "queue removed:") == "True"


def test_mount_only_inside(executed):
    inside = stdout(executed, "check-mount")
    assert re.search(r"/nsmagic-tour-\S+\s+tour-tmpfs\s+tmpfs", inside)  # from !findmnt
    assert line_value(inside, "files inside:") == "['hello.txt']"
    kernel = stdout(executed, "check-mount-kernel")
    assert line_value(kernel, "mounted in the kernel:") == "False"
    assert line_value(kernel, "files in the kernel:") == "[]"


def test_user_namespace_is_the_overflow_user(executed):
    out = stdout(executed, "check-user")
    assert line_value(out, "uid, gid inside:") == "65534 65534"
    assert line_value(out, "uid_map:") == "''"
    assert line_value(out, "new namespaces:") == "['user']"


def test_map_root_user_is_root_inside(executed):
    out = stdout(executed, "check-root")
    assert line_value(out, "uid, gid inside:") == "0 0"
    assert line_value(out, "uid_map:").split() == ["0", str(os.getuid()), "1"]
    assert "uid=0(root)" in out  # from !id


def test_cgroup_namespace_is_rooted_at_slash(executed):
    lines = [line for line in stdout(executed, "check-cgroup").splitlines() if re.match(r"^\d+:", line)]
    assert lines
    assert all(line.endswith(":/") for line in lines), lines


def test_time_namespace_shifts_monotonic_and_boottime_only(executed):
    out = stdout(executed, "check-time-kernel")
    shift = {clock: float(line_value(out, f"{clock}:").split("=")[1].split()[0])
             for clock in ("monotonic", "boottime", "wall")}
    for clock, expected in (("monotonic", 86400), ("boottime", 3600), ("wall", 0)):
        assert abs(shift[clock] - expected) < 5, shift  # the two readings are a cell apart
    inside_uptime = float(line_value(stdout(executed, "check-time"), "uptime inside:").split()[0])
    kernel_uptime = float(line_value(out, "uptime in the kernel:").split()[0])
    assert abs(inside_uptime - kernel_uptime - 3600) < 5


def test_outputs_come_back_and_nothing_else(executed):
    assert cell(executed, "check-out").outputs == []
    out = stdout(executed, "check-out-kernel")
    assert line_value(out, "the child's pid was") == "1"
    assert line_value(out, "interfaces it saw:") == "['lo']"
    assert line_value(out, "is 'scratch' defined in the kernel?") == "False"


def test_changes_inside_stay_inside(executed):
    inside = stdout(executed, "check-isolation")
    assert "inside: counter = 101" in inside
    assert "'written by the child'" in inside
    assert "cwd = /tmp" in inside
    assert re.search(r"^/tmp$", inside, re.M)  # from %cd and !pwd
    kernel = stdout(executed, "check-isolation-kernel")
    assert "kernel: counter = 1 " in kernel
    assert "'written by the child'" not in kernel
    assert f"cwd = {NOTEBOOK.parent}" in kernel


def test_timeout_kills_the_cell_after_its_finally_ran(executed):
    err = error(executed, "check-timeout")
    assert err is not None and err.ename == "CellTimeout"
    assert "timeout of 1s" in err.evalue
    out = stdout(executed, "check-timeout")
    assert "sleeping for a minute..." in out
    assert "finally: the child got SIGINT" in out
    assert "KeyboardInterrupt" not in stderr(executed, "check-timeout")


def test_unpicklable_output_names_the_variable(executed):
    err = error(executed, "check-output-error")
    assert err is not None and err.ename == "OutputError"
    assert "'squares_gen'" in err.evalue and "generator" in err.evalue
    assert "Arrived: squares_list" in err.evalue
    assert result(executed, "check-output-error-kernel") == "[0, 1, 4, 9, 16]"


def test_cell_exception_comes_back_as_itself(executed):
    err = error(executed, "check-cell-error")
    assert err is not None and err.ename == "OSError"
    assert "Network is unreachable" in err.evalue
    traceback = ANSI.sub("", "\n".join(err.traceback))
    assert re.search(r"----> 3 socket\.create_connection", traceback)  # the cell's own line 3


def test_flags(executed):
    out = stdout(executed, "check-flags")
    assert line_value(out, "options:") == "-m -u -n -p --mount-proc"
    assert line_value(out, "flags:").endswith("= 0x64020000")


def test_library_run(executed):
    value = ast.literal_eval(result(executed, "check-run"))
    assert value == {"pid": 1, "hostname": "lib", "interfaces": [(1, "lo")]}


def test_library_run_code(executed):
    out = stdout(executed, "check-run-code")
    assert line_value(out, "value:") == "1   values: {'answer': 42}"
    assert line_value(out, "caught in the kernel:") == "OSError [Errno 101] Network is unreachable"
    flags = stdout(executed, "check-from-flags")
    assert line_value(flags, "options:") == "-u -n   flags: CLONE_NEWUTS|CLONE_NEWNET"
    assert result(executed, "check-from-flags") == "'flags'"


def test_settings_default_options(executed):
    out = stdout(executed, "check-settings")
    assert line_value(out, "pid with default_options '--pid --mount-proc':") == "1"
    pid, kernel = re.search(r"pid with no default options: (\d+) \(kernel: (\d+) \)", out).groups()
    assert pid not in ("1", kernel)
