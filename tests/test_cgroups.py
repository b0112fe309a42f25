"""--memory, --pids, --cpus: real cgroups on this machine, checked by what they do to a cell.

Every cell that could hurt the machine (a memory hog, a fork loop) first checks in
/proc/self/cgroup that it runs in an nsmagic cgroup, and stops otherwise. Each test counts the
cgroup directories its kernel made, before and after.
"""

import ctypes
import os
import socket
import struct

import pytest

from helpers import Running, wait_until

from nsmagic import Namespaces, OptionError, PrivilegeError, SetupError, run
from nsmagic.environment.cgroups import (Hierarchy, Place, choose, hierarchies, human_size, is_top,
                                         kernel_group, parse_memory, setup_of, v2_place)

ROOT = "/sys/fs/cgroup"


def cgroups_of(pid: int) -> list[str]:
    """The cgroup directories a kernel with this pid made and has not removed."""
    found = []
    for top, dirs, _ in os.walk(ROOT):
        found += [os.path.join(top, d) for d in dirs if d.startswith(f"nsmagic-{pid}-")]
    return found


def settled(pid: int, before: list[str], seconds: float = 5.0) -> list[str]:
    """The kernel's cgroups once the background clean-up of a finished cell is done."""
    wait_until(lambda: cgroups_of(pid) == before, seconds, 0.05)
    return cgroups_of(pid)


#: Cell code: stop unless the cell runs in an nsmagic cgroup of the CONTROLLER's hierarchy.
GUARD = """
import os
assert os.getpid() != {kpid}
_line = [l for l in open('/proc/self/cgroup').read().splitlines()
         if '{controller}' in l.split(':', 2)[1].split(',') or l.startswith('0::')]
if not any('nsmagic-' in l for l in _line):
    raise RuntimeError('not in an nsmagic {controller} cgroup: ' + repr(_line))
"""


def guard(kernel, controller):
    return GUARD.format(kpid=kernel.pid, controller=controller)


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("options", ["", "-p", "-r -p"])
def test_memory_hog_is_killed_and_reported_as_oom(kernel, options):
    before = cgroups_of(kernel.pid)
    cell = kernel.execute(f"%%innamespace {options} --memory 64M\n" + guard(kernel, "memory") + """
print('limited', flush=True)
x = bytearray(300 * 2**20)
print('survived')""")
    assert cell.ename == "ChildDied", cell.traceback
    assert "killed by signal 9" in cell.evalue
    assert "killed by the OOM killer: memory limit 64M" in cell.evalue
    assert cell.stdout == "limited\n"
    assert cgroups_of(kernel.pid) == before
    assert kernel.value("1 + 1") == 2


@pytest.mark.kernel
@pytest.mark.root
def test_cell_under_memory_limit_runs_and_sees_its_limit(kernel):
    before = cgroups_of(kernel.pid)
    limit = kernel.value_in("--memory 64M", """(lambda h: [
        open(os.path.join(x.own, 'memory.max' if x.v2 else 'memory.limit_in_bytes')).read().strip()
        for x in h if 'memory' in x.controllers])(__import__('nsmagic.environment.cgroups').environment.cgroups.hierarchies(
        open('/proc/self/cgroup').read(), open('/proc/self/mountinfo').read()))""".replace("os.", "__import__('os')."))
    assert limit == [str(64 * 2**20)]
    assert settled(kernel.pid, before) == before


@pytest.mark.kernel
@pytest.mark.root
def test_fork_loop_is_stopped_by_the_pids_limit(kernel):
    before = cgroups_of(kernel.pid)
    cell = kernel.execute("%%innamespace -p --pids 20\n" + guard(kernel, "pids") + """
import time
kids = []
try:
    while len(kids) < 100:  # a safety net: the limit stops it at 19
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
finally:
    print('forked', len(kids))""")
    assert cell.ename == "BlockingIOError"
    assert "the pids limit (20) was reached" in cell.traceback
    forked = int(cell.stdout.split()[-1])
    assert 10 <= forked < 20
    assert settled(kernel.pid, before) == before


def busy_loop_rate(kernel, options: str) -> int:
    cell = kernel.execute(f"%%innamespace {options}\n" + """
import time
n, end = 0, time.monotonic() + 1
while time.monotonic() < end:
    n += 1
print(n)""").ok()
    return int(cell.stdout)


@pytest.mark.kernel
@pytest.mark.root
def test_cpu_limit_slows_a_busy_loop(kernel):
    before = cgroups_of(kernel.pid)
    free = max(busy_loop_rate(kernel, "-p") for _ in range(2))
    limited = busy_loop_rate(kernel, "-p --cpus 0.2")
    assert limited / free < 0.45, (limited, free)
    assert settled(kernel.pid, before) == before


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("options, named", [
    ("--memory lots", "--memory"), ("--memory 0", "--memory"), ("--pids 0", "--pids"),
    ("--pids -3", "--pids"), ("--cpus -1", "--cpus"), ("--cpus 1000", "--cpus"),
    ("--memory 64M --cpus 0", "--cpus"),
])
def test_bad_values_fail_before_the_child_starts(kernel, options, named):
    before = cgroups_of(kernel.pid)
    cell = kernel.execute(f"%%innamespace {options}\nprint('body ran')")
    assert cell.ename == "UsageError"
    assert named in cell.evalue
    assert "body ran" not in cell.stdout
    assert cgroups_of(kernel.pid) == before


def test_bad_values_in_the_library_are_option_errors():
    from nsmagic import Namespaces, run
    for spec in (Namespaces(memory="lots"), Namespaces(pids=0), Namespaces(cpus=float("nan")),
                 Namespaces(memory=True), Namespaces(pids=2.5)):
        with pytest.raises(OptionError):
            run(os.getpid, namespaces=spec)


@pytest.mark.kernel
@pytest.mark.root
def test_nothing_is_left_after_a_timeout_or_a_crash(kernel):
    before = cgroups_of(kernel.pid)
    limits = "--memory 64M --pids 50 --cpus 0.5"
    cell = kernel.execute(f"%%innamespace {limits} --timeout 1\nwhile True: pass")
    assert cell.ename == "CellTimeout"
    assert cgroups_of(kernel.pid) == before
    cell = kernel.execute(f"%%innamespace -p {limits}\nimport os\nos._exit(3)")
    assert cell.ename == "ChildDied" and "status 3" in cell.evalue and "OOM" not in cell.evalue
    assert cgroups_of(kernel.pid) == before


@pytest.mark.kernel
@pytest.mark.root
def test_nothing_is_left_after_an_interrupt(fresh_kernel):
    k = fresh_kernel
    before = cgroups_of(k.pid)
    cell = Running(k, "%%innamespace -p --memory 64M --pids 20 --cpus 0.5\n"
                      "import time\nprint('started', flush=True)\ntime.sleep(60)")
    cell.wait_for("started")
    assert len(cgroups_of(k.pid)) > len(before)  # the cell's cgroups exist while it runs
    assert cell.interrupt()["ename"] == "KeyboardInterrupt"
    assert settled(k.pid, before) == before


@pytest.mark.kernel
@pytest.mark.root
def test_processes_that_outlive_the_cell_are_killed_with_its_cgroup(kernel):
    before = cgroups_of(kernel.pid)
    kernel.execute("%%innamespace --pids 10 -o sleeper\n" + guard(kernel, "pids") + """
import subprocess
sleeper = subprocess.Popen(['sleep', '60'], start_new_session=True).pid""").ok()
    sleeper = kernel.value("sleeper")
    assert wait_until(lambda: not _alive(sleeper), 5, 0.05)
    assert settled(kernel.pid, before) == before


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.kernel
@pytest.mark.root
def test_empty_cgroups_of_dead_kernels_are_swept(kernel):
    """A kernel killed while a cell ran cannot clean up; the next cell with limits does."""
    [pids] = [h for h in hierarchies(open(f"/proc/{kernel.pid}/cgroup").read(), open("/proc/self/mountinfo").read())
              if "pids" in h.controllers]
    never_alive = int(open("/proc/sys/kernel/pid_max").read()) + 1
    stale = os.path.join(pids.own if not pids.v2 else os.path.dirname(pids.own), f"nsmagic-{never_alive}-1")
    os.mkdir(stale)
    try:
        kernel.execute("%%innamespace --pids 10\n1").ok()
        assert not os.path.exists(stale)
    finally:
        if os.path.exists(stale):
            os.rmdir(stale)


@pytest.mark.kernel
@pytest.mark.root
def test_cgroups_of_a_killed_kernel_not_yet_reaped_are_swept(kernel):
    """A zombie kernel (its parent has not reaped it yet) is gone: its cells' cgroup and its
    leaf are stale, as the sentinel's sweep counts them (one test, nsmagic.proctree.gone)."""
    [pids] = [h for h in hierarchies(open(f"/proc/{kernel.pid}/cgroup").read(), open("/proc/self/mountinfo").read())
              if "pids" in h.controllers]
    parent = pids.own if not pids.v2 else os.path.dirname(pids.own)
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    stale = [os.path.join(parent, f"nsmagic-{zombie}-{n}") for n in ("1", "kernel")]
    try:
        assert wait_until(lambda: open(f"/proc/{zombie}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", 5, 0.01)
        for path in stale:
            os.mkdir(path)
        kernel.execute("%%innamespace --pids 10\n1").ok()
        assert [p for p in stale if os.path.exists(p)] == []
    finally:
        for path in stale:
            if os.path.exists(path):
                os.rmdir(path)
        os.waitpid(zombie, 0)


@pytest.mark.kernel
@pytest.mark.root
def test_cgroup_namespace_is_rooted_at_the_cells_cgroup(kernel):
    lines = kernel.value_in("-C --memory 64M --pids 20", "open('/proc/self/cgroup').read().splitlines()")
    limited = [line for line in lines if {"memory", "pids"} & set(line.split(":")[1].split(","))]
    assert limited and all(line.endswith(":/") for line in limited)


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.rootless
def test_rootless_without_a_delegated_cgroup_fails_before_the_child_starts(rootless_kernel):
    rootless_kernel.execute("%load_ext nsmagic").ok()
    for options in ("--memory 64M", "-r -p --pids 20"):
        cell = rootless_kernel.execute(f"%%innamespace {options}\nprint('body ran')")
        assert cell.ename == "PrivilegeError", cell.traceback
        assert "not writable" in cell.evalue
        # cgroup v1 (this host's memory and pids) has no delegation; v2 names systemd's where it runs
        assert ("v1" in cell.evalue and "run the kernel as root" in cell.evalue) or "Delegate" in cell.evalue
        assert options.split()[-2] in cell.evalue
        assert "body ran" not in cell.stdout
        assert len(cell.traceback.splitlines()) == 1


# -- the choice of places, with files under a temporary directory standing in for /sys/fs/cgroup

def test_sizes():
    assert parse_memory("64M") == parse_memory("64m") == parse_memory("64MiB") == 64 * 2**20
    assert parse_memory("1.5G") == 3 * 2**29
    assert parse_memory(4096) == 4096
    assert human_size(64 * 2**20) == "64M" and human_size(1000) == "1000 bytes"
    for bad in ("lots", "", "-1M", "12X", 0, -5, True, 1.5):
        with pytest.raises(OptionError, match="--memory"):
            parse_memory(bad)


def _tree(tmp_path, layout: dict[str, dict[str, str]]):
    for rel, files in layout.items():
        d = tmp_path / rel
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text)


def test_hybrid_host_uses_v1_controllers_and_the_kernels_own_cgroup(tmp_path):
    _tree(tmp_path, {"unified": {"cgroup.controllers": "hugetlb\n"}})
    mountinfo = "\n".join([
        f"35 31 0:32 / {tmp_path}/memory rw,relatime - cgroup cgroup rw,memory",
        f"32 31 0:29 / {tmp_path}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct",
        f"39 31 0:36 / {tmp_path}/pids rw,relatime - cgroup cgroup rw,pids",
        f"41 31 0:38 / {tmp_path}/unified rw,relatime - cgroup2 cgroup2 rw",
        "25 1 8:1 / / rw - ext4 /dev/sda1 rw",
    ])
    proc = "8:pids:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/user.slice\n0::/\n"
    found = hierarchies(proc, mountinfo)
    assert Hierarchy(False, frozenset({"memory"}), f"{tmp_path}/memory/process_api/abc", f"{tmp_path}/memory") in found
    assert Hierarchy(False, frozenset({"cpu", "cpuacct"}), f"{tmp_path}/cpu,cpuacct/user.slice",
                     f"{tmp_path}/cpu,cpuacct") in found
    chosen = choose(["memory", "pids", "cpu"], found)
    assert {h.own: c for h, c in chosen.items()} == {
        f"{tmp_path}/memory/process_api/abc": {"memory"}, f"{tmp_path}/pids": {"pids"},
        f"{tmp_path}/cpu,cpuacct/user.slice": {"cpu"}}
    with pytest.raises(SetupError, match="--memory: this machine offers no memory cgroup controller"):
        choose(["memory"], [h for h in found if "memory" not in h.controllers])


def test_pure_v2_in_a_scope_moves_the_kernel_into_a_leaf_first(tmp_path):
    scope = "user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope"
    _tree(tmp_path, {
        "": {"cgroup.controllers": "cpuset cpu io memory pids\n", "cgroup.subtree_control": "cpu io memory pids\n"},
        scope: {"cgroup.controllers": "cpu memory pids\n", "cgroup.subtree_control": "", "cgroup.procs": "812\n",
                "cgroup.type": "domain\n"},
    })
    mountinfo = f"30 23 0:26 / {tmp_path.as_posix().replace(' ', chr(92) + '040')} rw - cgroup2 cgroup2 rw,nsdelegate"
    [h] = hierarchies(f"0::/{scope}\n", mountinfo)
    assert h.v2 and h.controllers == {"cpuset", "cpu", "io", "memory", "pids"} and h.own == f"{tmp_path}/{scope}"
    place = v2_place(h, {"memory", "pids", "cpu"})
    assert place.group == f"{tmp_path}/{scope}" and place.leaf
    assert place.enable == {"memory", "pids", "cpu"} and place.setup == "v2-group"  # root here


def test_pure_v2_after_the_leaf_move_the_cells_go_beside_the_kernels_leaf(tmp_path):
    scope = "system.slice/jupyter.service"
    _tree(tmp_path, {
        scope: {"cgroup.controllers": "memory pids\n", "cgroup.subtree_control": "memory pids\n",
                "cgroup.procs": "", "cgroup.type": "domain\n"},
        f"{scope}/nsmagic-{os.getpid()}-kernel": {"cgroup.procs": f"{os.getpid()}\n", "cgroup.type": "domain\n"},
    })
    for leaf in (f"nsmagic-{os.getpid()}-kernel", "nsmagic-others", "nsmagic-99-kernel"):
        h = Hierarchy(True, frozenset({"memory", "pids"}), f"{tmp_path}/{scope}/{leaf}", str(tmp_path))
        assert kernel_group(h) == f"{tmp_path}/{scope}"
        assert v2_place(h, {"memory"}) == Place("v2-group", f"{tmp_path}/{scope}", frozenset(), False)


def test_pure_v2_names_a_controller_the_parent_does_not_give(tmp_path):
    _tree(tmp_path, {"user.slice/session-3.scope": {"cgroup.controllers": "memory pids\n", "cgroup.type": "domain\n",
                                                    "cgroup.procs": "1\n"}})
    h = Hierarchy(True, frozenset({"cpu", "memory", "pids"}), f"{tmp_path}/user.slice/session-3.scope", str(tmp_path))
    with pytest.raises(PrivilegeError, match=r"--cpus: the cpu controller is not given .*: .*user.slice/"
                                             r"cgroup.subtree_control does not enable it; enable it: echo \+cpu >"):
        v2_place(h, {"memory", "cpu"})


def test_pure_v2_top_cgroup_with_processes_enables_controllers_and_needs_no_leaf(tmp_path):
    _tree(tmp_path, {"": {"cgroup.controllers": "cpu memory pids\n", "cgroup.subtree_control": "cpu\n",
                          "cgroup.procs": "1\n57\n"}})
    h = Hierarchy(True, frozenset({"cpu", "memory", "pids"}), str(tmp_path), str(tmp_path))
    assert is_top(str(tmp_path)) and setup_of(h) == "v2-top"
    assert v2_place(h, {"memory", "pids", "cpu"}) == Place("v2-top", str(tmp_path), frozenset({"memory", "pids"}), False)


def test_pure_v2_a_containers_namespaced_top_is_not_the_top(tmp_path):
    """In a cgroup namespace the container's cgroup shows as / but has a cgroup.type: not exempt."""
    _tree(tmp_path, {"": {"cgroup.controllers": "memory pids\n", "cgroup.subtree_control": "", "cgroup.procs": "1\n",
                          "cgroup.type": "domain\n"}})
    h = Hierarchy(True, frozenset({"memory", "pids"}), str(tmp_path), str(tmp_path))
    assert not is_top(str(tmp_path))
    assert v2_place(h, {"memory"}).leaf


def test_limit_errors_give_advice_that_fits_the_set_up(tmp_path, monkeypatch):
    from nsmagic.environment import cgroups
    group = str(tmp_path)
    ro = cgroups._unwritable_words({"memory"}, group, "v2-read-only")
    assert "read-only" in ro and "docker run --memory" in ro and "as root" not in ro and "Delegate" not in ro
    monkeypatch.setattr(cgroups, "_systemd", lambda: True)
    user = cgroups._unwritable_words({"memory", "pids"}, group, "v2-not-writable")
    assert user.startswith("--memory/--pids: no cgroup this kernel") and "may not write to" in user
    assert "systemd-run --user --scope -p Delegate=yes jupyter lab" in user
    delegated = cgroups._missing_words({"cpu"}, group, "v2-delegated")
    assert "Delegate=cpu cpuset io memory pids" in delegated and "user@.service.d" in delegated
    monkeypatch.setattr(cgroups, "_systemd", lambda: False)
    plain = cgroups._unwritable_words({"memory"}, group, "v2-not-writable")
    assert "Delegate=yes" not in plain and "cgroup.subtree_control, cgroup.threads" in plain
    for words in (ro, user, delegated, plain):
        assert "\n" not in words


@pytest.mark.root
def test_a_library_caller_that_exits_at_once_leaves_no_cgroup():
    """The cell's cgroup is removed in the background; a process that exits right after run()
    removes it at exit instead."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", "import os; from nsmagic import Namespaces, run\n"
                           "print(os.getpid(), flush=True)\n"
                           "run(os.getpid, namespaces=Namespaces(memory='64M', pids=10))"],
                          capture_output=True, text=True, timeout=60, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert cgroups_of(int(done.stdout.split()[0])) == []


class DirectoryWatch:
    """inotify on directories: the names of the entries created in them since the watch began,
    even if removed again (a check that only looked afterwards would miss a made-then-removed one)."""
    IN_CREATE, IN_NONBLOCK, IN_CLOEXEC = 0x100, os.O_NONBLOCK, os.O_CLOEXEC

    def __init__(self, directories):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for d in directories:
            assert libc.inotify_add_watch(self.fd, os.fsencode(d), self.IN_CREATE) >= 0, d

    def created(self) -> list[str]:
        names, data = [], b""
        while True:
            try:
                data += os.read(self.fd, 65536)
            except BlockingIOError:
                break
        while data:
            _, _, _, length = struct.unpack_from("iIII", data)
            names.append(data[16:16 + length].rstrip(b"\0").decode())
            data = data[16 + length:]
        return names

    def close(self):
        os.close(self.fd)


@pytest.mark.root
@pytest.mark.parametrize("bad, words", [
    ({"veth": "300.1.1.1/30"}, "--veth"),
    ({"bind": ["/nonexistent-nsmagic-source:/mnt"]}, "--bind"),
])
def test_a_bad_value_leaves_no_cgroup_made_even_for_a_moment(bad, words):
    """--memory is valid and its part comes first; the later part's bad value is found by its
    check(), before any part's prepare() makes a cgroup directory or a link."""
    mine = hierarchies(open("/proc/self/cgroup").read(), open("/proc/self/mountinfo").read())
    [memory] = [h for h in mine if "memory" in h.controllers]
    watch = DirectoryWatch({memory.own, os.path.dirname(memory.own)})
    links = socket.if_nameindex()
    try:
        with pytest.raises(OptionError, match=words):
            run(os.getpid, namespaces=Namespaces(memory="64M", **bad))
        made = [n for n in watch.created() if n.startswith("nsmagic-")]
    finally:
        watch.close()
    assert made == []
    assert socket.if_nameindex() == links
