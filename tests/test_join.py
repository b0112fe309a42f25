"""--join-*: entering existing namespaces with setns(2), like nsenter(1), through a real kernel.

The namespaces joined here are made by the tests (``ip netns add``, ``unshare``, another nsmagic
cell) and removed by them; the processes holding them are ended by their PID.
"""

import os
import secrets
import subprocess
from contextlib import contextmanager

import psutil
import pytest

from nsmagic import mountinfo

from helpers import Running, wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.root]


def inode(path: str) -> int:
    return os.stat(path).st_ino


def is_mount_point(path: str) -> bool:
    """From mountinfo: os.path.ismount misses a directory bind-mounted onto itself."""
    return any(m.point == path for m in mountinfo.read())


@pytest.fixture
def netns():
    """A network namespace made with ``ip netns add``, deleted after the test."""
    name = f"nsmtest-{secrets.token_hex(4)}"
    existed, mounted = os.path.isdir("/run/netns"), is_mount_point("/run/netns")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)
        # The first `ip netns add` also makes /run/netns a shared mount point, and keeps it.
        if not mounted and is_mount_point("/run/netns") and not os.listdir("/run/netns"):
            subprocess.run(["umount", "/run/netns"], check=True)
        if not existed and os.path.isdir("/run/netns") and not os.listdir("/run/netns"):
            os.rmdir("/run/netns")
    assert not os.path.exists(f"/run/netns/{name}")
    assert is_mount_point("/run/netns") == mounted


@contextmanager
def unshared(options: list[str], setup: str = ""):
    """A Python process in new namespaces made by unshare(1), after *setup* ran in it; yields
    its PID as the host sees it. Ended, by PID, afterwards."""
    code = f"import os, socket, subprocess, sys, time\n{setup}\nprint('ready', flush=True)\ntime.sleep(120)"
    proc = subprocess.Popen(["unshare", *options, "/usr/bin/python3", "-c", code],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        inner = psutil.Process(proc.pid).children() if "--fork" in options else []
        yield inner[0].pid if inner else proc.pid
    finally:
        inner = psutil.Process(proc.pid).children()
        proc.kill()
        proc.wait()
        for p in inner:
            p.kill()
        psutil.wait_procs(inner, timeout=10)


def open_fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


def no_more_fds_than(pid: int, before: int, seconds: float = 5.0) -> bool:
    """Whether the kernel's open fds drop back to *before* (its own come and go, e.g. zmq's)."""
    return wait_until(lambda: open_fds(pid) <= before, seconds, 0.05)


# -- net ----------------------------------------------------------------------------------------

def test_join_net_by_ip_netns_name_and_by_path(kernel, netns):
    theirs = inode(f"/run/netns/{netns}")
    assert theirs != inode("/proc/self/ns/net")
    probe = "(__import__('os').stat('/proc/self/ns/net').st_ino, __import__('socket').if_nameindex())"
    assert kernel.value_in(f"--join-net {netns}", probe) == (theirs, [(1, "lo")])
    assert kernel.value_in(f"--join-net /run/netns/{netns}", probe) == (theirs, [(1, "lo")])
    assert kernel.value("__import__('os').stat('/proc/self/ns/net').st_ino") != theirs


def test_changes_in_a_joined_namespace_outlive_the_cell(kernel, netns):
    lo_up = ("__import__('fcntl').ioctl(__import__('socket').socket(), 0x8913, b'lo' + bytes(38))[16] & 1")
    assert kernel.value_in(f"--join-net {netns}", lo_up) == 0
    kernel.execute(f"%%innamespace --join-net {netns}\nimport subprocess\n"
                   "subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)").ok()
    assert kernel.value_in(f"--join-net {netns}", lo_up) == 1


# -- uts ----------------------------------------------------------------------------------------

def test_join_uts_of_a_process_made_by_unshare(kernel):
    name = f"nsmtest-{secrets.token_hex(3)}"
    with unshared(["--uts"], f"socket.sethostname({name!r})") as pid:
        assert kernel.value_in(f"--join-uts {pid}", "__import__('socket').gethostname()") == name
        assert kernel.value_in(f"--join-uts /proc/{pid}/ns/uts", "__import__('socket').gethostname()") == name
    assert kernel.value("__import__('socket').gethostname()") != name


def test_join_uts_of_another_nsmagic_cell(kernel, fresh_kernel):
    holder = Running(fresh_kernel, "%%innamespace --hostname nsmtest-box\nimport os, time\n"
                                   "print('pid', os.getpid(), flush=True)\ntime.sleep(60)")
    pid = int(holder.wait_for(r"pid (\d+)").group(1))
    assert kernel.value_in(f"--join-uts {pid}", "__import__('socket').gethostname()") == "nsmtest-box"
    assert holder.interrupt()["ename"] == "KeyboardInterrupt"


# -- user, pid, mnt, ipc: a small container made by unshare -------------------------------------

@pytest.fixture(scope="module")
def container(tmp_path_factory):
    """``unshare -r -p -f -m -i -u``: root inside, PID 1, a private tmpfs with a marker file,
    a SysV message queue, its own hostname. Yields (pid, the tmpfs directory)."""
    directory = tmp_path_factory.mktemp("nsmtest-mnt")
    setup = (f"subprocess.run(['mount', '-t', 'tmpfs', 'nsmtest', {str(directory)!r}], check=True)\n"
             f"open({str(directory / 'marker')!r}, 'w').write('inside')\n"
             "subprocess.run(['ipcmk', '-Q'], check=True, capture_output=True)\n"
             "socket.sethostname('nsmtest-container')")
    with unshared(["--user", "--map-root-user", "--pid", "--fork", "--mount", "--ipc", "--uts"], setup) as pid:
        yield pid, directory
    assert not (directory / "marker").exists()


def test_join_user_makes_the_cell_root_of_that_namespace(kernel, container):
    pid, _ = container
    ino, uid, uid_map = kernel.value_in(f"--join-user {pid}", "(__import__('os').stat('/proc/self/ns/user').st_ino, "
                                        "__import__('os').getuid(), open('/proc/self/uid_map').read().split())")
    assert ino == inode(f"/proc/{pid}/ns/user") != inode("/proc/self/ns/user")
    assert (uid, uid_map) == (0, ["0", "0", "1"])


def test_join_pid_runs_the_cell_inside_that_pid_namespace(kernel, container):
    pid, _ = container
    assert kernel.value_in("", "__import__('os').getpid() != %d" % kernel.pid)
    ino, own = kernel.value_in(f"--join-pid {pid}", "(__import__('os').stat('/proc/self/ns/pid').st_ino, __import__('os').getpid())")
    assert ino == inode(f"/proc/{pid}/ns/pid")
    assert 1 < own < 100  # numbered inside the container, whose PID 1 is its Python


def test_join_mnt_sees_the_containers_private_mount(kernel, container):
    pid, directory = container
    assert not (directory / "marker").exists()
    assert kernel.value_in(f"--join-mnt {pid}", f"open({str(directory / 'marker')!r}).read()") == "inside"


def test_join_ipc_sees_the_containers_message_queue(kernel, container):
    pid, _ = container
    queues = "len(open('/proc/sysvipc/msg').read().splitlines()) - 1"
    outside = kernel.value(queues)
    assert kernel.value_in(f"--join-ipc {pid}", queues) == 1
    assert kernel.value_in(f"--join-ipc {pid}", "__import__('os').stat('/proc/self/ns/ipc').st_ino") == inode(f"/proc/{pid}/ns/ipc")
    assert kernel.value(queues) == outside


def test_join_several_at_once_like_nsenter(kernel, container):
    pid, directory = container
    got = kernel.value_in(f"--join-user {pid} --join-uts {pid} --join-mnt {pid} --join-ipc {pid} --join-pid {pid} --net",
                          f"(__import__('os').getuid(), __import__('socket').gethostname(), "
                          f"__import__('os').path.exists({str(directory / 'marker')!r}), __import__('socket').if_nameindex())")
    assert got == (0, "nsmtest-container", True, [(1, "lo")])


# -- errors and leaks ---------------------------------------------------------------------------

def _missing_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


@pytest.mark.parametrize("options, words", [
    ("--join-net nsmtest-no-such-name", "no network namespace named 'nsmtest-no-such-name'"),
    (f"--join-uts {_missing_pid()}", f"no process with PID {_missing_pid()}"),
    ("--join-uts /proc/self/ns/net", "is a net namespace, not a uts one; use --join-net"),
    ("--join-net /etc/hostname", "/etc/hostname is not a namespace file"),
    ("--join-mnt /nonexistent/nsmtest", "/nonexistent/nsmtest does not exist"),
    ("--join-ipc foo", "give a path (/proc/PID/ns/ipc) or a PID"),
    ("--join-net 1 --net", "-n/--net and --join-net in one cell"),
    ("--join-uts 1 --hostname box", "--hostname and --join-uts in one cell"),
])
def test_bad_targets_are_usage_errors_naming_the_option(kernel, options, words):
    option = options.split()[0]
    kernel.execute(f"%%innamespace {options}\npass")  # first-time costs (IPython's lazy imports) first
    before = open_fds(kernel.pid)
    cell = kernel.execute(f"%%innamespace {options}\nprint('body ran')")
    assert cell.ename == "UsageError"
    assert option in cell.evalue and words in cell.evalue, cell.evalue
    assert "body ran" not in cell.stdout
    assert no_more_fds_than(kernel.pid, before)


def test_namespace_fds_are_closed_however_the_cell_ends(kernel, netns):
    kernel.value_in(f"--join-net {netns}", "1")
    before = open_fds(kernel.pid)
    for _ in range(3):  # a leak would add an fd per cell and joined kind
        assert kernel.execute(f"%%innamespace --join-net {netns} --join-uts /etc/hostname\n1").ename == "UsageError"
        assert kernel.execute(f"%%innamespace --join-net {netns} --join-ipc {os.getpid()}\nimport os\nos._exit(3)").ename == "ChildDied"
        assert kernel.execute(f"%%innamespace --join-net {netns} --timeout 0.5\nimport time\ntime.sleep(30)").ename == "CellTimeout"
        assert kernel.execute(f"%%innamespace --join-net {netns}\n1/0").ename == "ZeroDivisionError"
    assert no_more_fds_than(kernel.pid, before)


# -- rootless -----------------------------------------------------------------------------------

@pytest.mark.rootless
def test_rootless_joins_its_own_user_namespace_and_what_it_owns(rootless_kernel):
    k = rootless_kernel
    k.execute("%load_ext nsmagic\nimport os, subprocess, time\n"
              "holder = subprocess.Popen(['unshare', '-r', '-n', '-u', 'sleep', '120'])\n"
              "while os.readlink(f'/proc/{holder.pid}/ns/uts') == os.readlink('/proc/self/ns/uts'): time.sleep(0.01)").ok()
    try:
        pid = k.value("holder.pid")
        refused = k.execute(f"%%innamespace --join-net {pid}\nprint('body ran')")
        assert refused.ename == "PrivilegeError"
        assert "setns" in refused.evalue and "--join-net" in refused.evalue and "--join-user" in refused.evalue
        assert "body ran" not in refused.stdout
        got = k.value_in(f"--join-user {pid} --join-net {pid}",
                         "(os.getuid(), os.stat('/proc/self/ns/net').st_ino)")
        assert got == (0, k.value(f"os.stat('/proc/{pid}/ns/net').st_ino"))
        other = k.execute("%%innamespace --join-uts 1\nprint('body ran')")
        assert other.ename == "PrivilegeError" and "--join-uts 1" in other.evalue
    finally:
        k.execute("holder.kill(); holder.wait()").ok()
