"""Inside the VM (see tests/test_vm.py): cgroup limits in each set-up users have on cgroup v2.

Each set-up is made the way systemd and container runtimes make it, then a process of its own
(the stand-in for a Jupyter kernel: the rootless venv's Python with nsmagic, calling
``nsmagic.run`` with ``--memory 64M --pids 20``) is moved into it and run as root or as a user.
The process reports what the cell saw (its cgroup, memory.max, pids.max) as JSON; each test then
checks the limits applied, the cell stayed inside the kernel's own cgroup, and after the process
exited, the tree is as it was found. Runs as root in a throwaway VM: it writes the real
/sys/fs/cgroup, so it refuses to run anywhere else.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import time

import pytest

pytestmark = pytest.mark.vm

ROOT = "/sys/fs/cgroup"
USER = 4242  # a uid with no passwd entry: the kernel of a student, in a delegated cgroup
PYTHON = os.environ.get("NSMAGIC_VM_PYTHON", "")

#: The stand-in kernel: runs one cell with limits and prints what it saw, as JSON.
KERNEL = r"""
import json, os, sys
from nsmagic import Namespaces, run
from nsmagic.environment.cgroups import describe

def own():
    return [l for l in open('/proc/self/cgroup').read().splitlines() if l.startswith('0::')][0][3:]

def look():
    d = '/sys/fs/cgroup' + own()
    return {'path': own(), 'memory.max': open(d + '/memory.max').read().strip(),
            'pids.max': open(d + '/pids.max').read().strip(), 'uid': os.getuid()}

out = {'setup': describe(), 'before': own()}
try:
    out['cell'] = run(look, namespaces=Namespaces(memory='64M', pids=20, **json.loads(sys.argv[1])))
    out['during'] = own()
except Exception as e:
    out['error'] = f'{type(e).__name__}: {e}'
print(json.dumps(out), flush=True)
if sys.argv[2:] == ['die-unwatched']:  # its sentinel killed first: no one cleans up for it
    from nsmagic.sentinel import guard
    os.kill(guard._proc.pid, 9)
    guard._proc.wait()
if sys.argv[2:3] in (['die'], ['die-unwatched']):
    os.kill(os.getpid(), 9)  # a kernel killed: no clean-up at exit
"""


@pytest.fixture(autouse=True, scope="module")
def only_in_the_vm():
    if os.environ.get("NSMAGIC_VM_GUEST") != "1" or not PYTHON:
        pytest.skip("writes the real /sys/fs/cgroup: runs only inside tests/test_vm.py's VM")
    assert os.path.exists(f"{ROOT}/cgroup.controllers") and os.geteuid() == 0


def kernel(group: str | None, *, uid: int = 0, options: dict | None = None, die: str = "",
           wrap: str = "") -> dict:
    """Start the stand-in kernel in *group* (moved there before it starts, as systemd starts a
    service), as *uid*, and return what it printed."""
    inner = [PYTHON, "-c", KERNEL, json.dumps(options or {})] + ([die] if die else [])
    if uid:
        inner = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *inner]
    move = f'echo $$ > {group}/cgroup.procs && ' if group else ""
    script = f'{move}exec {wrap}"$@"'
    done = subprocess.run(["sh", "-c", script, "sh", *inner], capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp"})
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    assert lines, f"no report (status {done.returncode}): {done.stdout}\n{done.stderr}"
    return json.loads(lines[-1])


def snapshot(group: str) -> dict:
    """What a test must find again once the kernel has gone: child cgroups, processes, controllers."""
    return {"children": sorted(d for d in os.listdir(group) if os.path.isdir(os.path.join(group, d))),
            "procs": sorted(open(f"{group}/cgroup.procs").read().split()),
            "subtree_control": open(f"{group}/cgroup.subtree_control").read().split()}


def back_to(group: str, before: dict, wait: float = 60) -> dict:
    """The snapshot of *group* once it is as *before*, or the last one after *wait* seconds: the
    kernel's sentinel moves back into G with it, and lives on there for the moment its last
    sweep takes (seconds on the VM's emulated CPU)."""
    end = time.monotonic() + wait
    while (now := snapshot(group)) != before and time.monotonic() < end:
        time.sleep(0.1)
    return now


def limited(report: dict, group: str) -> None:
    assert "error" not in report, report["error"]
    cell = report["cell"]
    assert cell["memory.max"] == str(64 * 2**20) and cell["pids.max"] == "20", cell
    rel = group[len(ROOT):] or "/"
    assert cell["path"].startswith(rel.rstrip("/") + "/nsmagic-"), (cell["path"], rel)


def enable(group: str, controllers: str = "+memory +pids") -> None:
    with open(f"{group}/cgroup.subtree_control", "w") as f:
        f.write(controllers)


@pytest.fixture
def service():
    """A systemd-like service cgroup, system.slice/nsm-test.service, with a process of its own."""
    enable(ROOT)
    slice_ = f"{ROOT}/system.slice"
    os.makedirs(slice_, exist_ok=True)
    enable(slice_)
    group = f"{slice_}/nsm-test.service"
    os.mkdir(group)
    other = subprocess.Popen(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec sleep 600'])
    _wait_in(group, other.pid)
    try:
        yield group
    finally:
        other.kill()
        other.wait()
        _rmtree(group)


@pytest.fixture
def delegated():
    """A scope delegated to USER as systemd's Delegate=yes does it: the directory and its
    cgroup.procs, cgroup.subtree_control, cgroup.threads chowned; the user's Jupyter server (a
    sleep here) in it too."""
    enable(ROOT)
    user_slice = f"{ROOT}/user.slice"
    os.makedirs(user_slice, exist_ok=True)
    enable(user_slice)
    group = f"{user_slice}/nsm-jupyter.scope"
    os.mkdir(group)
    for path in (group, *(f"{group}/{n}" for n in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"))):
        os.chown(path, USER, USER)
    server = subprocess.Popen(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec setpriv --reuid={USER} '
                                           f'--regid={USER} --clear-groups sleep 600'])
    _wait_in(group, server.pid)
    try:
        yield group
    finally:
        server.kill()
        server.wait()
        _rmtree(group)


def _wait_in(group: str, pid: int) -> None:
    end = time.monotonic() + 30
    while str(pid) not in open(f"{group}/cgroup.procs").read().split():
        assert time.monotonic() < end, f"{pid} never joined {group}"
        time.sleep(0.05)


def _rmtree(group: str) -> None:
    for top, dirs, _ in os.walk(group, topdown=False):
        for d in dirs:
            os.rmdir(os.path.join(top, d))
    os.rmdir(group)


# -- the set-ups

def test_top_cgroup_as_root():
    """A VM or bare machine without systemd, or a container runtime's init: the kernel in /."""
    before = snapshot(ROOT)
    report = kernel(None)
    assert report["setup"].startswith("cgroup v2, the kernel in the top cgroup as root"), report
    limited(report, ROOT)
    assert report["during"] == "/"  # the top is exempt: no leaf move
    assert snapshot(ROOT)["children"] == before["children"]


def test_service_group_as_root(service):
    """Root in a systemd service's cgroup that has another process of the service in it."""
    before = snapshot(service)
    report = kernel(service)
    assert report["setup"].startswith("cgroup v2, root in a service's or container's cgroup"), report
    limited(report, service)
    assert re.fullmatch(r"/system.slice/nsm-test.service/nsmagic-\d+-kernel", report["during"]), report
    assert back_to(service, before) == before  # moved back at exit: the service's process too


@pytest.mark.parametrize("options", [{}, {"user": True, "map_root_user": True, "pid": True}], ids=["plain", "-r -p"])
def test_delegated_scope_as_a_user(delegated, options):
    before = snapshot(delegated)
    report = kernel(delegated, uid=USER, options=options)
    assert report["setup"].startswith("cgroup v2, a cgroup delegated to this user"), report
    limited(report, delegated)
    assert report["cell"]["uid"] == (0 if options else USER)
    assert back_to(delegated, before) == before


def test_a_killed_kernels_sentinel_puts_the_tree_back(delegated):
    before = snapshot(delegated)
    report = kernel(delegated, uid=USER, die="die")
    limited(report, delegated)
    # the sentinel ends the kernel's cells, then undoes the leaf move as the kernel's exit would
    assert back_to(delegated, before) == before


def test_a_killed_kernels_leaf_is_swept_by_the_next(delegated):
    """Its sentinel killed too: the leaf and the controllers stay until the next kernel."""
    before = snapshot(delegated)
    report = kernel(delegated, uid=USER, die="die-unwatched")
    limited(report, delegated)
    left = snapshot(delegated)["children"]
    assert any(d.endswith("-kernel") for d in left)  # no one could clean up
    # the next kernel is started by the Jupyter server, which the leaf move put in nsmagic-others
    limited(kernel(f"{delegated}/nsmagic-others", uid=USER), delegated)
    assert back_to(delegated, before) == before


def test_container_cgroup_namespace_as_root():
    """As runc does it: the container's process in its own cgroup, a cgroup namespace rooted there
    and cgroup2 mounted afresh, so that the cgroup looks like the top but is not exempt."""
    enable(ROOT)
    group = f"{ROOT}/nsm-container"
    os.mkdir(group)
    try:
        report = kernel(group, wrap="unshare --cgroup --mount --propagation private sh -c "
                                    "'umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"' sh ")
        assert report["setup"].startswith("cgroup v2, root in a service's or container's cgroup"), report
        assert report["before"] == "/"
        limited(report, ROOT)  # paths as the container sees them
        assert report["during"].startswith("/nsmagic-")
        assert snapshot(group)["children"] == []
        assert back_to(group, {**snapshot(group), "procs": []})["procs"] == []  # the sentinel ended
    finally:
        _rmtree(group)


def test_a_user_without_delegation_is_told_how_to_get_it():
    """A login session's scope, as logind makes it: root's, with the user's processes in it."""
    enable(ROOT)
    os.makedirs(f"{ROOT}/user.slice", exist_ok=True)
    enable(f"{ROOT}/user.slice")
    group = f"{ROOT}/user.slice/nsm-session.scope"
    os.mkdir(group)
    try:
        report = kernel(group, uid=USER)
    finally:
        os.rmdir(group)
    error = report.get("error", "")
    assert error.startswith("PrivilegeError: --memory/--pids: no cgroup this kernel (uid 4242) may write to"), report
    assert "not writable" in error and "a cgroup this user may not write to" in error
    if not os.path.isdir("/run/systemd/system"):  # no systemd here: Delegate=yes would not help
        assert "Delegate=yes" not in error and "chown it and its cgroup.procs" in error
    assert "\n" not in error


def test_a_read_only_cgroup_mount_as_root_is_not_told_to_run_as_root():
    report = kernel(None, wrap="unshare --mount --propagation private sh -c "
                               "'mount -o remount,bind,ro /sys/fs/cgroup && exec \"$@\"' sh ")
    error = report.get("error", "")
    assert error.startswith("PrivilegeError: --memory/--pids: /sys/fs/cgroup is mounted read-only"), report
    assert "as root" not in error and "Delegate" not in error and "docker run --memory" in error
