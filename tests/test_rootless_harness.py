"""The rootless kernel fixture gives what the rootless tests rely on.

An unprivileged kernel with nsmagic installed, which may create namespaces only together with a
user namespace, and that only from a single-threaded process (the kernel itself has threads).
"""

import errno
from pathlib import Path

import pytest

pytestmark = [pytest.mark.rootless, pytest.mark.kernel, pytest.mark.root]

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

LIBC = "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True)"


def test_kernel_runs_as_the_unprivileged_user(rootless_kernel):
    user = rootless_kernel.user
    assert user.pw_uid != 0
    rootless_kernel.execute("import os").ok()
    ids = rootless_kernel.value("(os.getuid(), os.geteuid(), os.getgid(), os.getegid())")
    assert ids == (user.pw_uid, user.pw_uid, user.pw_gid, user.pw_gid)
    assert 0 not in rootless_kernel.value("os.getgroups()")
    status = Path(f"/proc/{rootless_kernel.pid}/status").read_text()
    assert f"Uid:\t{user.pw_uid}\t{user.pw_uid}\t" in status


def test_kernel_uses_the_venv_with_nsmagic_installed(rootless_kernel):
    rootless_kernel.execute("import sys, cloudpickle, traitlets, IPython, nsmagic").ok()
    assert rootless_kernel.value("sys.executable") == str(rootless_kernel.python)
    where = rootless_kernel.value("nsmagic.__file__")  # None if nsmagic has no __init__.py
    venv = str(rootless_kernel.python.parent.parent)
    assert where and where.startswith(venv + "/"), f"nsmagic imported from {where!r}"


def test_net_namespace_without_user_namespace_is_refused(rootless_kernel):
    rootless_kernel.execute(LIBC).ok()
    result = rootless_kernel.value(f"(libc.unshare({CLONE_NEWNET}), ctypes.get_errno())")
    assert result == (-1, errno.EPERM)


def test_net_namespace_inside_user_namespace_works_in_a_forked_child(rootless_kernel):
    rootless_kernel.execute(LIBC).ok()
    code = f"""
pid = os.fork()
if pid == 0:
    try:
        os._exit(0 if libc.unshare({CLONE_NEWUSER | CLONE_NEWNET}) == 0 else ctypes.get_errno())
    finally:
        os._exit(255)
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
"""
    rootless_kernel.execute(code).ok()
    assert rootless_kernel.value("status") == 0
