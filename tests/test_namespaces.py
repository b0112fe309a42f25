"""Each namespace flag, checked through a real kernel by what can be observed from inside.

Cells that change something (a mount, a hostname) first assert that they run in another
process than the kernel, so a broken magic could never change this machine.
"""

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.root]

NS = ["mnt", "uts", "ipc", "net", "pid", "user", "cgroup", "time"]
FLAG_OF = {"-m": "mnt", "-u": "uts", "-i": "ipc", "-n": "net", "-p": "pid", "-U": "user",
           "-C": "cgroup", "-T": "time"}

INODES = "{k: os.readlink(f'/proc/self/ns/{k}') for k in %r}" % NS
# PID and time namespaces made for children show in pid_for_children/time_for_children of the
# process that made them, and as the process's own for the children themselves.


@pytest.mark.parametrize("flag", list(FLAG_OF))
def test_each_flag_makes_exactly_its_namespace(kernel, flag):
    kernel_ns = kernel.value(INODES.replace("os.", "__import__('os')."))
    inside = kernel.value_in(flag, INODES.replace("os.", "__import__('os')."))
    fresh = {k for k in NS if inside[k] != kernel_ns[k]}
    assert fresh == {FLAG_OF[flag]}, f"{flag} made {fresh}"


def test_all_flags_together(kernel):
    kernel_ns = kernel.value(INODES.replace("os.", "__import__('os')."))
    inside = kernel.value_in("-m -u -i -n -p -U -C -T", INODES.replace("os.", "__import__('os')."))
    assert all(inside[k] != kernel_ns[k] for k in NS)


def test_uts_hostname_inside_only(kernel):
    before = kernel.value("__import__('socket').gethostname()")
    cell = kernel.execute(f"""%%innamespace --hostname nsmagic-box
import os, socket
assert os.getpid() != {kernel.pid}
print(socket.gethostname())""").ok()
    assert cell.stdout.strip() == "nsmagic-box"
    assert kernel.value("__import__('socket').gethostname()") == before != "nsmagic-box"


def test_pid_namespace_runs_cell_as_pid_1(kernel):
    assert kernel.value_in("-p", "__import__('os').getpid()") == 1


def test_mount_proc_lists_only_the_namespace(kernel):
    cell = kernel.execute("""%%innamespace -p --mount-proc
import os
print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
!ps -e -o pid= | wc -l""").ok()
    pids_line, ps_count = cell.stdout.strip().splitlines()
    assert eval(pids_line) == [1]
    # ps itself and the shell that IPython runs it in, plus PID 1.
    assert int(ps_count) <= 4
    assert len([p for p in kernel.value("__import__('os').listdir('/proc')") if p.isdigit()]) > 4


def test_mount_proc_does_not_show_on_host(kernel):
    before = kernel.value("open('/proc/self/mountinfo').read().count(' /proc ')")
    kernel.execute("%%innamespace --mount-proc\nopen('/proc/self/mountinfo').read()").ok()
    assert kernel.value("open('/proc/self/mountinfo').read().count(' /proc ')") == before


def test_net_namespace_has_only_lo(kernel):
    assert kernel.value_in("-n", "__import__('socket').if_nameindex()") == [(1, "lo")]
    assert len(kernel.value("__import__('socket').if_nameindex()")) >= 1


def test_ipc_namespace_hides_kernel_message_queue(kernel):
    qid = kernel.value("""(lambda c: c.CDLL(None, use_errno=True).msgget(0, 0o1600))(__import__('ctypes'))""")
    assert qid >= 0
    try:
        listed = "lambda: [int(l.split()[1]) for l in open('/proc/sysvipc/msg').readlines()[1:]]"
        assert qid in kernel.value(f"({listed})()")
        assert qid not in kernel.value_in("-i", f"({listed})()")
        assert qid in kernel.value_in("-n", f"({listed})()")  # not asked for: shared
    finally:
        kernel.execute(f"__import__('ctypes').CDLL(None).msgctl({qid}, 0, None)").ok()


def test_mount_namespace_tmpfs_invisible_outside(kernel, tmp_path):
    target = tmp_path / "inside"
    target.mkdir()
    cell = kernel.execute(f"""%%innamespace -m
import os
assert os.getpid() != {kernel.pid}
!mount -t tmpfs nsmagic-test {target}
open('{target}/marker', 'w').write('x')
print(os.listdir('{target}'), '{target}' in open('/proc/self/mountinfo').read())""").ok()
    assert cell.stdout.strip() == "['marker'] True"
    assert not any(target.iterdir())
    assert str(target) not in open("/proc/self/mountinfo").read()


def test_user_namespace_without_map_is_overflow_uid(kernel):
    assert kernel.value_in("-U", "(__import__('os').getuid(), __import__('os').getgid())") == (65534, 65534)


def test_map_root_user_is_root_inside(kernel):
    uid_map = kernel.value_in("-r", "open('/proc/self/uid_map').read().split()")
    assert uid_map == ["0", str(kernel.value("__import__('os').geteuid()")), "1"]
    assert kernel.value_in("-r", "open('/proc/self/setgroups').read().strip()") == "deny"
    assert kernel.value_in("-r -p -n --mount-proc", "(__import__('os').getuid(), __import__('os').getpid())") == (0, 1)


def test_cgroup_namespace_root_is_own_cgroup(kernel):
    lines = kernel.value_in("-C", "open('/proc/self/cgroup').read().splitlines()")
    assert all(line.endswith(":/") for line in lines)


def test_time_namespace_shifts_monotonic_not_wall_clock(kernel):
    cell = kernel.execute("""import time
_t0 = time.monotonic(), time.time()""").ok()
    inside = kernel.value_in("--monotonic 86400 --boottime 3600",
                             "(__import__('time').monotonic() - _t0[0], __import__('time').time() - _t0[1],"
                             " __import__('time').clock_gettime(__import__('time').CLOCK_BOOTTIME)"
                             " - __import__('time').monotonic())")
    mono_shift, wall_shift, _ = inside
    assert 86400 <= mono_shift < 86400 + 30
    assert 0 <= wall_shift < 30
    assert cell.status == "ok"


def test_flags_not_asked_for_stay_shared(kernel):
    kernel_ns = kernel.value(INODES.replace("os.", "__import__('os')."))
    inside = kernel.value_in("-n", INODES.replace("os.", "__import__('os')."))
    assert {k for k in NS if inside[k] == kernel_ns[k]} == set(NS) - {"net"}


def test_kernel_pid_namespace_restored_after_cell(kernel):
    """The kernel unshares CLONE_NEWPID in its own thread; afterwards its own children must be
    born in its own PID namespace again, or every later !cmd would fail."""
    kernel.execute("%innamespace -p pass").ok()
    cell = kernel.execute("""import os
print(os.readlink('/proc/thread-self/ns/pid_for_children') == os.readlink('/proc/self/ns/pid'))
!echo still-works""").ok()
    assert cell.stdout.split() == ["True", "still-works"]
