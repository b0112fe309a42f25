"""Inside the VM (see tests/test_vm.py): a real Jupyter kernel of an unprivileged user on the
stock kernel, as a student runs one: started by the Jupyter server (here the test runner) in a
scope delegated to the user, as `systemd-run --user --scope -p Delegate=yes jupyter lab` gives.
Its cells use -r with cgroup limits; then user namespaces are switched off by the sysctl; then a
focused subset of tests/test_rootless.py runs on the same kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import rootless
from test_rootless import (  # noqa: F401  (collected here, on the stock kernel; `student` is conftest's)
    test_a_students_cell_leaves_nothing_running,
    test_large_values_come_back_read_straight_from_the_child,
    test_map_root_user_with_net_works_as_root_inside,
    test_rootless_container_pid_mount_proc_uts,
    test_time_namespace_rootless,
)

pytestmark = pytest.mark.vm

ROOT = "/sys/fs/cgroup"
SCOPE = f"{ROOT}/user.slice/nsm-lab.scope"


@pytest.fixture(scope="session")
def rootless_kernel():
    """The student's kernel, born in a delegated scope together with its Jupyter server."""
    if os.environ.get("NSMAGIC_VM_GUEST") != "1":
        pytest.skip("writes the real /sys/fs/cgroup: runs only inside tests/test_vm.py's VM")
    venv_python = Path(os.environ["NSMAGIC_VM_PYTHON"])  # built on the host: the guest has no network
    rootless._build_venv = lambda path, requirements: venv_python
    with rootless.RootlessEnv() as env:
        for group in (ROOT, os.path.dirname(SCOPE)):
            os.makedirs(group, exist_ok=True)
            with open(f"{group}/cgroup.subtree_control", "w") as f:
                f.write("+memory +pids")
        os.mkdir(SCOPE)
        for path in (SCOPE, *(f"{SCOPE}/{n}" for n in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"))):
            os.chown(path, env.user.pw_uid, env.user.pw_gid)
        with open(f"{SCOPE}/cgroup.procs", "w") as f:  # the server (this runner) joins the scope
            f.write(str(os.getpid()))
        with env.kernel(timeout=900) as kernel:
            yield kernel


@pytest.fixture(scope="module")
def lab(rootless_kernel):
    rootless_kernel.execute("%load_ext nsmagic", timeout=300).ok()
    return rootless_kernel


def test_a_real_kernel_cell_with_limits_as_a_user(lab):
    cell = lab.execute("""%%innamespace -r -n -p --mount-proc --memory 64M --pids 20
import os
path = [l for l in open('/proc/self/cgroup').read().splitlines() if l.startswith('0::')][0][3:]
print(repr((os.getpid(), os.getuid(), path, open('/sys/fs/cgroup' + path + '/memory.max').read().strip(),
            open('/sys/fs/cgroup' + path + '/pids.max').read().strip())))""", timeout=300).ok()
    pid, uid, path, memory_max, pids_max = eval(cell.stdout)
    assert (pid, uid, memory_max, pids_max) == (1, 0, str(64 * 2**20), "20")
    assert path.startswith("/user.slice/nsm-lab.scope/nsmagic-"), path
    kernel_cgroup = lab.value("open('/proc/self/cgroup').read().strip()")
    assert kernel_cgroup == f"0::/user.slice/nsm-lab.scope/nsmagic-{lab.pid}-kernel"


def test_a_real_kernel_cell_over_its_memory_limit_is_oom_killed(lab):
    cell = lab.execute("""%%innamespace -r -n -p --mount-proc --memory 64M --pids 20
print('limited', flush=True)
x = bytearray(300 * 2**20)
print('survived')""", timeout=300)
    assert cell.ename == "ChildDied", cell.traceback
    assert "killed by the OOM killer: memory limit 64M" in cell.evalue
    assert cell.stdout == "limited\n"


def test_nsinfo_names_the_delegated_set_up(lab):
    text = lab.execute("%nsinfo", timeout=300).ok().result["text/plain"]
    assert "cgroup limits: cgroup v2, a cgroup delegated to this user" in text, text


def test_r_where_user_namespaces_are_switched_off(lab):
    path = "/proc/sys/user/max_user_namespaces"
    saved = open(path).read()
    with open(path, "w") as f:
        f.write("0")
    try:
        cell = lab.execute("%%innamespace -r -n\nprint('body ran')", timeout=300)
    finally:
        with open(path, "w") as f:
            f.write(saved)
    assert cell.ename in ("PrivilegeError", "SetupError"), cell.traceback
    assert "user.max_user_namespaces = 0" in cell.evalue and "sysctl -w user.max_user_namespaces=" in cell.evalue
    assert "body ran" not in cell.stdout
    assert len(cell.traceback.splitlines()) == 1
    lab.execute("%%innamespace -r -n\nprint('back')", timeout=300).ok()  # and back on
