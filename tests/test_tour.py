"""The tour notebook runs headless, and its outputs show what its markdown says they show.

The notebook is executed once per session with nbclient, as `jupyter execute` would, in a real
kernel; cells tagged ``raises-exception`` may fail (nbclient lets them), every other cell must
succeed. Each test then reads the outputs of one cell, found by its ``check-*`` tag.
"""

from __future__ import annotations

import ast
import base64
import importlib.util
import ipaddress
import os
import re
import socket
import struct
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from processes import kill_sleepers

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "tour.ipynb"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: The cells that must fail, and how.
EXPECTED_ERRORS = {
    "check-timeout": "CellTimeout",
    "check-output-error": "OutputError",
    "check-cell-error": "OSError",
    "check-memory": "ChildDied",
}

NS_KINDS = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")


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


def _leftovers(kernel_pid: int) -> list[str]:
    """Host-side things nsmagic makes for a cell of that kernel (veth host ends, cgroups), still there."""
    found = [name for _, name in socket.if_nameindex() if name.startswith(f"nsm{kernel_pid:x}-")]
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(top, d) for d in dirs if d.startswith(f"nsmagic-{kernel_pid}-")]
    return found


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


def outputs_of(nb, tag: str, kind: str) -> list:
    return [o for o in cell(nb, tag).outputs if o.output_type == kind]


def kernel_pid(nb) -> int:
    return int(line_value(stdout(nb, "check-kernel"), "pid:"))


def kernel_namespaces(nb) -> dict[str, str]:
    """The kernel's namespaces as section 1 printed them: kind -> 'net:[4026531833]'."""
    found = dict(re.findall(r"^/proc/self/ns/(\w+)\s+-> (\S+)$", stdout(nb, "check-kernel"), re.M))
    assert sorted(found) == sorted(NS_KINDS)
    return found


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


@pytest.mark.notebook
@pytest.mark.root
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


@pytest.mark.notebook
@pytest.mark.root
def test_the_host_is_as_before(executed, host_before):
    assert socket.gethostname() == host_before["hostname"]
    assert _mount_points() == host_before["mounts"]
    assert _message_queues() == host_before["queues"]
    assert _tour_dirs() == host_before["tour_dirs"]
    # the veth pair and the cgroups made for the cells of section 18 are gone
    assert _leftovers(kernel_pid(executed)) == []


# -- one test per section -------------------------------------------------------------------------


@pytest.mark.notebook
@pytest.mark.root
def test_kernel_view(executed):
    out = stdout(executed, "check-kernel")
    assert int(line_value(out, "pid:")) > 1
    assert line_value(out, "hostname:") == socket.gethostname()
    for kind in NS_KINDS:
        assert re.search(rf"^/proc/self/ns/{kind}\s+-> {kind}:\[\d+\]$", out, re.M), kind


@pytest.mark.notebook
@pytest.mark.root
def test_first_cell_is_a_child_in_the_kernels_namespaces(executed):
    out = stdout(executed, "check-first")
    child, kernel = re.search(r"child pid: (\d+)\s+kernel pid: (\d+)", out).groups()
    assert child != kernel
    assert line_value(out, "new namespaces:") == "[]"
    assert result(executed, "check-first") == "True"


#: The devices Linux makes in every new network namespace while their tunnel module is loaded
#: (sit, ipip, ip6_tunnel, ip6_gre, ip_gre, ip_vti, ip6_vti): down, with no address, no way out.
TUNNEL_DEVICES = {"sit0", "tunl0", "ip6tnl0", "ip6gre0", "gre0", "gretap0", "erspan0", "ip_vti0", "ip6_vti0"}


@pytest.mark.notebook
@pytest.mark.root
def test_net_has_only_lo_and_it_is_down(executed):
    out = stdout(executed, "check-net")
    assert line_value(out, "new namespaces:") == "['net']"
    names = [name for _, name in ast.literal_eval(line_value(out, "interfaces:"))]
    assert "lo" in names
    assert set(names) - {"lo"} <= TUNNEL_DEVICES, names  # a real link leaked in otherwise
    assert ast.literal_eval(line_value(out, "states:")) == {name: "DOWN" for name in names}
    listed = {m[1]: m[2] for m in re.finditer(r"^(\S+?)(?:@\S+)?\s+(\S+)", out.split("states:")[1], re.M)}
    assert listed == {name: "DOWN" for name in names}, out  # from !ip -brief link


@pytest.mark.notebook
@pytest.mark.root
def test_pid_without_mount_proc_sees_the_hosts_proc(executed):
    pid, seen = ast.literal_eval(result(executed, "check-pid-no-proc"))
    assert pid == 1
    assert seen > 1


@pytest.mark.notebook
@pytest.mark.root
def test_pid_with_mount_proc_is_pid_1_alone(executed):
    out = stdout(executed, "check-pid")
    assert line_value(out, "my pid:").startswith("1 ")
    assert line_value(out, "pids in /proc:") == "[1]"
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\s+\d+\s+\S", line)]
    pids = {int(r[0]): (int(r[1]), r[2]) for r in rows}
    assert pids[1][0] == 0 and pids[1][1].startswith("python")
    assert "ps" in {comm for _, comm in pids.values()}
    assert max(pids) < 10  # only the namespace's own processes


@pytest.mark.notebook
@pytest.mark.root
def test_what_a_cell_leaves_running_ends_with_it(executed):
    started = line_value(stdout(executed, "check-leftover"), "started pid")
    try:
        assert started.endswith("left it running")
        assert line_value(stdout(executed, "check-leftover-gone"), "still running after the cell:") == "False"
    finally:
        kill_sleepers([int(started.split()[0])])


@pytest.mark.notebook
@pytest.mark.root
def test_hostname_inside_and_unchanged_in_the_kernel(executed):
    out = stdout(executed, "check-hostname")
    assert line_value(out, "hostname inside:") == "box"
    assert re.search(r"^box$", out, re.M)  # from !hostname
    assert line_value(out, "after sethostname:") == "renamed-inside"
    assert line_value(stdout(executed, "check-hostname-kernel"), "hostname in the kernel:") == socket.gethostname()


@pytest.mark.notebook
@pytest.mark.root
def test_line_magic_value(executed):
    assert result(executed, "check-line-magic") == "'box'"


@pytest.mark.notebook
@pytest.mark.root
def test_ipc_queue_visible_only_in_the_kernel(executed):
    kernel = stdout(executed, "check-ipc-kernel")
    assert line_value(kernel, "the kernel sees our queue:") == "True"
    inside = stdout(executed, "check-ipc")
    assert line_value(inside, "queues seen inside:") == "[]"
    assert line_value(inside, "the child sees our queue:") == "False"
    assert line_value(stdout(executed, "check-ipc-cleanup"), "queue removed:") == "True"


@pytest.mark.notebook
@pytest.mark.root
def test_mount_only_inside(executed):
    inside = stdout(executed, "check-mount")
    assert re.search(r"/nsmagic-tour-\S+\s+tour-tmpfs\s+tmpfs", inside)  # from !findmnt
    assert line_value(inside, "files inside:") == "['hello.txt']"
    kernel = stdout(executed, "check-mount-kernel")
    assert line_value(kernel, "mounted in the kernel:") == "False"
    assert line_value(kernel, "files in the kernel:") == "[]"


@pytest.mark.notebook
@pytest.mark.root
def test_user_namespace_is_the_overflow_user(executed):
    out = stdout(executed, "check-user")
    assert line_value(out, "uid, gid inside:") == "65534 65534"
    assert line_value(out, "uid_map:") == "''"
    assert line_value(out, "new namespaces:") == "['user']"


@pytest.mark.notebook
@pytest.mark.root
def test_map_root_user_is_root_inside(executed):
    out = stdout(executed, "check-root")
    assert line_value(out, "uid, gid inside:") == "0 0"
    assert line_value(out, "uid_map:").split() == ["0", str(os.getuid()), "1"]
    assert "uid=0(root)" in out  # from !id


@pytest.mark.notebook
@pytest.mark.root
def test_cgroup_namespace_is_rooted_at_slash(executed):
    lines = [line for line in stdout(executed, "check-cgroup").splitlines() if re.match(r"^\d+:", line)]
    assert lines
    assert all(line.endswith(":/") for line in lines), lines


@pytest.mark.notebook
@pytest.mark.root
def test_time_namespace_shifts_monotonic_and_boottime_only(executed):
    out = stdout(executed, "check-time-kernel")
    shift = {clock: float(line_value(out, f"{clock}:").split("=")[1].split()[0])
             for clock in ("monotonic", "boottime", "wall")}
    for clock, expected in (("monotonic", 86400), ("boottime", 3600), ("wall", 0)):
        assert abs(shift[clock] - expected) < 5, shift  # the two readings are a cell apart
    inside_uptime = float(line_value(stdout(executed, "check-time"), "uptime inside:").split()[0])
    kernel_uptime = float(line_value(out, "uptime in the kernel:").split()[0])
    assert abs(inside_uptime - kernel_uptime - 3600) < 5


@pytest.mark.notebook
@pytest.mark.root
def test_outputs_come_back_and_nothing_else(executed):
    # -o brings values back silently: the cell shows its own print, and no Out[]
    assert [o.output_type for o in cell(executed, "check-out").outputs] == ["stream"]
    out = stdout(executed, "check-out-kernel")
    assert line_value(out, "the child's pid was") == "1"
    assert line_value(out, "interfaces it saw:") == "['lo']"
    assert line_value(out, "is 'scratch' defined in the kernel?") == "False"


@pytest.mark.notebook
@pytest.mark.root
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


@pytest.mark.notebook
@pytest.mark.root
def test_timeout_kills_the_cell_after_its_finally_ran(executed):
    err = error(executed, "check-timeout")
    assert err is not None and err.ename == "CellTimeout"
    assert "timeout of 1s" in err.evalue
    out = stdout(executed, "check-timeout")
    assert "sleeping for a minute..." in out
    assert "finally: the child got SIGINT" in out
    assert "KeyboardInterrupt" not in stderr(executed, "check-timeout")


@pytest.mark.notebook
@pytest.mark.root
def test_unpicklable_output_names_the_variable(executed):
    err = error(executed, "check-output-error")
    assert err is not None and err.ename == "OutputError"
    assert "'squares_gen'" in err.evalue and "generator" in err.evalue
    assert "Arrived: squares_list" in err.evalue
    assert result(executed, "check-output-error-kernel") == "[0, 1, 4, 9, 16]"


@pytest.mark.notebook
@pytest.mark.root
def test_cell_exception_comes_back_as_itself(executed):
    err = error(executed, "check-cell-error")
    assert err is not None and err.ename == "OSError"
    assert "Network is unreachable" in err.evalue
    traceback = ANSI.sub("", "\n".join(err.traceback))
    assert re.search(r"----> 3 socket\.create_connection", traceback)  # the cell's own line 3


@pytest.mark.notebook
@pytest.mark.root
def test_flags(executed):
    out = stdout(executed, "check-flags")
    assert line_value(out, "options:") == "-m -u -n -p --mount-proc"
    assert line_value(out, "flags:").endswith("= 0x64020000")


@pytest.mark.notebook
@pytest.mark.root
def test_library_run(executed):
    value = ast.literal_eval(result(executed, "check-run"))
    assert value == {"pid": 1, "hostname": "lib", "interfaces": [(1, "lo")]}


@pytest.mark.notebook
@pytest.mark.root
def test_library_run_code(executed):
    out = stdout(executed, "check-run-code")
    assert line_value(out, "value:") == "1   values: {'answer': 42}"
    assert line_value(out, "caught in the kernel:") == "OSError [Errno 101] Network is unreachable"
    flags = stdout(executed, "check-from-flags")
    assert line_value(flags, "options:") == "-u -n   flags: CLONE_NEWUTS|CLONE_NEWNET"
    assert result(executed, "check-from-flags") == "'flags'"


@pytest.mark.notebook
@pytest.mark.root
def test_settings_default_options(executed):
    out = stdout(executed, "check-settings")
    assert line_value(out, "pid with default_options '--pid --mount-proc':") == "1"
    pid, kernel = re.search(r"pid with no default options: (\d+) \(kernel: (\d+) \)", out).groups()
    assert pid not in ("1", kernel)


# -- the newer features: %nsinfo, --explain, rich output, containers from scratch ------------------


@pytest.mark.notebook
@pytest.mark.root
def test_nsinfo_is_the_first_cell_after_load_ext(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code[0].source.startswith("%load_ext nsmagic")
    assert code[1].source.strip() == "%nsinfo"
    assert "check-nsinfo" in code[1].metadata.get("tags", [])


@pytest.mark.notebook
@pytest.mark.root
def test_nsinfo_lists_every_kind_with_the_kernels_namespace(executed):
    out, = outputs_of(executed, "check-nsinfo", "execute_result")
    text, html = out.data["text/plain"], out.data["text/html"]
    assert "what this kernel (uid 0) can isolate" in text
    for kind, link in kernel_namespaces(executed).items():
        row = re.search(rf"^{kind}\s+-\w\s+(\S+)\s+(yes|with -r|no)\b", text, re.M)
        assert row, (kind, text)
        assert row.groups() == (link, "yes"), row.group(0)  # the kernel runs as root: everything works
        assert f"<td><code>{kind}</code></td>" in html and f"<code>{link}</code>" in html
    assert re.search(r"^cgroups: (v1|v2|hybrid)", text, re.M)


@pytest.mark.notebook
@pytest.mark.root
def test_explain_shows_the_calls_and_the_namespaces(executed):
    shown = outputs_of(executed, "check-explain", "display_data")
    assert len(shown) == 1
    text, html = shown[0].data["text/plain"], shown[0].data["text/html"]
    calls = re.findall(r"^  \[(\w+)\s*\] (\S.*?)  ", text, re.M)  # (where, system call), in order
    made = [call for _, call in calls]
    where = dict((call, place) for place, call in calls)
    assert where["unshare(CLONE_NEWPID)"] == "kernel"
    assert where['sethostname("box")'] == "child"
    assert where['mount("proc", "/proc", "proc", MS_NOSUID|MS_NODEV|MS_NOEXEC)'] == "child"
    fork = next(call for call in made if call.startswith("fork() = "))
    assert where[fork] == "kernel"
    # the PID namespace is made before the fork, the others in the child after it
    assert made.index("unshare(CLONE_NEWPID)") < made.index(fork) < made.index('sethostname("box")')
    child = re.search(r"fork\(\) = (\d+)", text).group(1)
    assert f"The cell runs as pid 1, uid 0, gid 0; the kernel's child is pid {child}." in text
    kernel = kernel_namespaces(executed)
    for kind in NS_KINDS:
        row = re.search(rf"^  {kind}\s+(\S+)\s+(\S+)\s+(new|shared)$", text, re.M)
        assert row, (kind, text)
        assert row.group(1) == kernel[kind]
        expected = "new" if kind in ("mnt", "uts", "net", "pid") else "shared"
        assert row.group(3) == expected, row.group(0)
        assert (row.group(1) != row.group(2)) == (expected == "new")
    assert "<code>unshare(CLONE_NEWPID)</code>" in html and "<b>new</b>" in html
    # the account comes first, then the cell's own output
    outputs = cell(executed, "check-explain").outputs
    assert outputs[0].output_type == "display_data"
    assert line_value(stdout(executed, "check-explain"), "pid") == "1 on box with new namespaces: ['mnt', 'net', 'pid', 'uts']"


@pytest.mark.notebook
@pytest.mark.root
def test_rich_output_from_inside(executed):
    outputs = cell(executed, "check-rich").outputs
    shown = [o for o in outputs if o.output_type == "display_data"]
    htmls = [o.data["text/html"] for o in shown if "text/html" in o.data]
    assert htmls == ["<b>Hello from PID 1</b>, in a network namespace with <code>lo</code> only"]
    pngs = [o.data["image/png"] for o in shown if "image/png" in o.data]
    if importlib.util.find_spec("matplotlib") is None:
        assert pngs == []
    else:
        assert len(pngs) == 1
        png = base64.b64decode(pngs[0])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
        assert width <= 300 and height <= 200, (width, height)  # figsize=(4, 2.5) at 72 dpi
        assert outputs.index(next(o for o in shown if "image/png" in o.data)) > outputs.index(shown[0])
    bar = stderr(executed, "check-rich")
    if importlib.util.find_spec("tqdm") is None:
        assert bar == ""
    else:
        assert "inside: 100%" in bar and "20/20" in bar


@pytest.mark.notebook
@pytest.mark.root
def test_lo_makes_127_0_0_1_work(executed):
    out = stdout(executed, "check-lo")
    assert ast.literal_eval(line_value(out, "states:")) == {"lo": "UP"}
    assert line_value(out, "127.0.0.1 works:") == "hello over lo"


@pytest.mark.notebook
@pytest.mark.root
def test_veth_links_the_cell_to_the_host(executed):
    out = stdout(executed, "check-veth")
    assert [name for _, name in ast.literal_eval(line_value(out, "interfaces:"))] == ["lo", "eth0"]
    host, child = re.search(r"host end: (\S+)\s+cell end: (\S+)", out).groups()
    host, child = ipaddress.ip_address(host), ipaddress.ip_address(child)
    assert host != child and host in ipaddress.ip_network("169.254.0.0/16")
    assert ipaddress.ip_network(f"{child}/30", strict=False) == ipaddress.ip_network(f"{host}/30", strict=False)
    assert re.search(rf"^eth0\S*\s+UP\s+{re.escape(str(child))}/30", out, re.M)  # from !ip -brief address
    assert re.search(r"^lo\s+\S+\s+127\.0\.0\.1/8", out, re.M)
    assert "1 packets transmitted, 1 received" in out or f"the host end answered: {host}" in out


@pytest.mark.notebook
@pytest.mark.root
def test_memory_limit_ends_in_the_oom_killer(executed):
    err = error(executed, "check-memory")
    assert err is not None and err.ename == "ChildDied"
    assert "killed by signal 9" in err.evalue
    assert "killed by the OOM killer: memory limit 64M" in err.evalue
    held = [int(n) for n in re.findall(r"(\d+) MiB", stdout(executed, "check-memory"))]
    assert held and held[0] == 8
    assert max(held) < 64  # holding 64 MiB of its own would be over the limit


@pytest.mark.notebook
@pytest.mark.root
def test_pids_limit_stops_forks(executed):
    out = stdout(executed, "check-pids")
    started = int(re.search(r"started (\d+) of 20 sleep processes", out).group(1))
    assert 1 <= started < 10  # the cell itself is one of the 10
    assert line_value(out, "fork refused:").startswith("BlockingIOError [Errno 11]")


@pytest.mark.notebook
@pytest.mark.root
def test_tmpfs_and_ro_bind(executed):
    out = stdout(executed, "check-mounts")
    assert re.search(r"^/tmp/nsmagic-tour-\S+/view\s+\S+\s+ro,", out, re.M)  # from !findmnt
    assert re.search(r"^/tmp/nsmagic-tour-\S+/scratch\s+tmpfs\s+rw,", out, re.M)
    assert line_value(out, "in view:") == "['notes.txt'] -> written by the kernel"
    assert line_value(out, "writing in view:") == "EROFS Read-only file system"
    assert line_value(out, "in scratch:") == "['temp.txt']"
    kernel = stdout(executed, "check-mounts-kernel")
    assert line_value(kernel, "data in the kernel:") == "['notes.txt']"
    assert line_value(kernel, "view in the kernel:") == "[]"
    assert line_value(kernel, "scratch in the kernel:") == "[]"


@pytest.mark.notebook
@pytest.mark.root
def test_rootfs_is_the_cells_whole_world(executed):
    out = stdout(executed, "check-rootfs")
    assert line_value(out, "/ holds:") == "['bin', 'dev', 'proc', 'tmp']   hostname: box"
    assert line_value(out, "the kernel's interpreter file exists here:") == "False"
    if os.access("/bin/busybox", os.X_OK):  # busybox-static: installed here and in CI
        lines = out.splitlines()
        assert ["bin", "dev", "proc", "tmp"] in [line.split() for line in lines]  # from !ls /
        assert "box" in lines  # from !hostname
        rows = [line.split(None, 2) for line in lines if re.match(r"^\s*\d+\s", line)]
        pids = {int(pid): command for pid, _, command in rows}  # from !ps
        assert "python" in pids[1]
        assert any(command.startswith("{ps}") or command.startswith("ps") for command in pids.values())
        assert max(pids) < 10  # only the container's own processes
    assert line_value(stdout(executed, "check-rootfs-cleanup"), "removed:") == "True"
