"""nsmagic in a kernel run by an unprivileged user, as students often run JupyterLab."""

import pytest

from helpers import MAPPED_MEMFDS
from processes import kill_sleepers, wait_gone

pytestmark = [pytest.mark.rootless, pytest.mark.kernel, pytest.mark.root]


def test_net_without_user_namespace_fails_with_advice(student):
    cell = student.execute("%%innamespace --net\nprint('body ran')")
    assert cell.ename == "PrivilegeError"
    assert "CAP_SYS_ADMIN" in cell.evalue and "-r" in cell.evalue and "network" in cell.evalue
    assert "body ran" not in cell.stdout
    assert len(cell.traceback.splitlines()) == 1


def test_map_root_user_with_net_works_as_root_inside(student):
    inside = student.value_in("-r --net", "(os.getuid(), os.getgid(), socket.if_nameindex())")
    assert inside == (0, 0, [(1, "lo")])
    assert student.value("os.getuid()") == student.user.pw_uid


def test_map_root_user_maps_to_the_students_ids(student):
    uid_map = student.value_in("-r", "open('/proc/self/uid_map').read().split()")
    gid_map = student.value_in("-r", "open('/proc/self/gid_map').read().split()")
    assert uid_map == ["0", str(student.user.pw_uid), "1"]
    assert gid_map == ["0", str(student.user.pw_gid), "1"]


def test_rootless_container_pid_mount_proc_uts(student):
    cell = student.execute("""%%innamespace -r -p -n -u -i --mount-proc --hostname student-box
print(os.getpid(), socket.gethostname(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))""").ok()
    assert cell.stdout.split() == ["1", "student-box", "[1]"]




def test_large_values_come_back_read_straight_from_the_child(student):
    student.execute("%%innamespace -r -p -o blob\nblob = bytes(range(256)) * 4096").ok()
    assert student.value("(len(blob), blob[:3], blob[-1])") == (256 * 4096, b"\x00\x01\x02", 255)
    assert student.value(MAPPED_MEMFDS) == 0


def test_large_values_of_a_child_the_kernel_may_not_read_come_through_the_memfd(student):
    # A process that is not dumpable may not be read by an unprivileged one, even its parent.
    before = student.value(MAPPED_MEMFDS)
    student.execute("""%%innamespace -r -o blob2
import ctypes
assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE, 0
blob2 = bytes(range(256)) * 4096""").ok()
    assert student.value("(len(blob2), blob2[:3], blob2[-1])") == (256 * 4096, b"\x00\x01\x02", 255)
    assert student.value(MAPPED_MEMFDS) == before + 1


def test_user_namespace_alone_runs_as_overflow_uid(student):
    assert student.value_in("-U", "os.getuid()") == 65534


def test_time_namespace_rootless(student):
    shift = student.value_in("-r --monotonic 1000",
                             "__import__('time').monotonic() - float(open('/proc/uptime').read().split()[0])")
    assert 990 < shift < 1010


def test_pid_namespace_alone_is_refused_before_the_child_starts(student):
    cell = student.execute("%%innamespace -p\nprint('body ran')")
    assert cell.ename == "PrivilegeError"
    assert "PID" in cell.evalue and "-r" in cell.evalue
    assert "body ran" not in cell.stdout


def test_nsinfo_tells_a_student_what_needs_r(student):
    text = student.execute("%nsinfo").ok().result["text/plain"]
    rows = {line.split()[0]: line for line in text.splitlines()[2:10]}
    assert rows["user"].split()[3] == "yes"
    for name in ("mnt", "uts", "ipc", "net", "pid", "cgroup", "time"):
        assert "with -r" in rows[name] and "add -r" in rows[name]
    assert f"uid {student.user.pw_uid}" in text


def test_explain_rootless_shows_the_maps(student):
    cell = student.execute("%%innamespace --explain -r -n\nprint('x')").ok()
    text = cell.of_type("display_data")[0]["content"]["data"]["text/plain"]
    uid, gid = student.user.pw_uid, student.user.pw_gid
    assert f'write("/proc/self/uid_map", "0 {uid} 1")' in text
    assert f'write("/proc/self/gid_map", "0 {gid} 1")' in text
    assert 'write("/proc/self/setgroups", "deny")' in text
    assert text.index("setgroups") < text.index("gid_map")


def test_a_students_cell_leaves_nothing_running(student):
    cell = student.execute("%%innamespace -r -n\nimport os, subprocess\n"
                           "print(os.getpid(), subprocess.Popen(['sleep', '600'], start_new_session=True).pid)").ok()
    child, sleeper = map(int, cell.stdout.split())
    try:
        assert child != student.pid
        assert wait_gone([sleeper]) == [], "the student's cell left its sleep running"
    finally:
        kill_sleepers([sleeper])
