"""The machines users have: the Linux version gate and the words for user namespaces switched off
(pure: the settings are given; the VM tier switches them for real, tests/vm/)."""

import pytest


# -- the Linux version gate at %load_ext, and the words for user namespaces switched off

def test_linux_version_gate_names_the_kernel_and_the_fix():
    from nsmagic import linux
    assert linux.version("6.1.0-13-amd64") == (6, 1) and linux.version("5.15.153.1-microsoft-standard-WSL2") == (5, 15)
    assert linux.version("weird") is None and linux.missing("weird") == []
    assert linux.refusal("6.1.0-13-amd64", True) is None
    line = linux.refusal("4.19.0-27-amd64", False)
    assert "Linux 5.3 or later" in line and "4.19.0-27-amd64" in line and "\n" not in line
    assert "macOS" in linux.refusal("23.1.0", False, "Darwin")
    assert linux.missing("6.1.0") == []
    old = linux.missing("5.4.0-150-generic")
    assert [m.split(" (")[0] for m in old] == ["time namespaces", "cgroup.kill"]
    assert linux.refusal("4.18.0-553.el8_10.x86_64", True) is None  # a backport counts, not the number
    linux.check()  # this machine runs cells


def test_user_namespaces_switched_off_are_named_with_their_fix(monkeypatch):
    import errno
    from nsmagic import syscalls
    settings = {}
    monkeypatch.setattr(syscalls, "_setting", lambda path, key=None: settings.get((path, key)))
    assert syscalls.userns_switched_off(errno.EPERM) is None
    settings[("/proc/sys/user/max_user_namespaces", None)] = "0"
    line = syscalls.advice(syscalls.CloneFlag.NEWUSER, errno.ENOSPC, False)
    assert "user.max_user_namespaces = 0" in line and "sysctl -w user.max_user_namespaces=" in line
    settings.clear()
    settings[("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", None)] = "1"
    line = syscalls.advice(syscalls.CloneFlag.NEWNET, errno.EPERM, True)  # -r -n: the second unshare
    assert "AppArmor" in line and "kernel.apparmor_restrict_unprivileged_userns=0" in line
    settings.clear()
    settings[("/proc/self/status", "Seccomp:")] = "2"
    for err in (errno.EPERM, errno.ENOSYS):
        line = syscalls.advice(syscalls.CloneFlag.NEWUSER, err, False)
        assert "seccomp" in line and "seccomp=unconfined" in line and errno.errorcode[err] in line
    settings.clear()
    assert "CAP_SYS_ADMIN" in syscalls.advice(syscalls.CloneFlag.NEWNET, errno.EPERM, False)


@pytest.mark.root
def test_nsinfo_names_the_cgroup_set_up_it_finds_here():
    from nsmagic import info
    from nsmagic.environment.cgroups import SETUPS
    found = info.probe()
    assert found.cgroup_setup in SETUPS.values() or found.cgroup_setup.startswith("no memory cgroup")
    assert f"cgroup limits: {found.cgroup_setup}" in repr(found)
    assert "cgroup limits" in found._repr_html_()
