"""The vm tier: nsmagic on the machines users have, tested for real inside a throwaway VM that
boots Debian's stock kernel with a pure cgroup v2 hierarchy (../shared/vm/run-in-vm).

One boot runs the guest modules (tests/vm/guest_*.py) with pytest as root inside the VM; their
JUnit report comes back through a shared directory, and each guest case is a test here:

* guest_cgroups: --memory/--pids in each set-up (the top cgroup as root, a service's cgroup, a
  scope delegated to a user with and without -r, a container's cgroup namespace, a user without
  delegation, a read-only cgroup mount), made as systemd and container runtimes make them;
* guest_kernel: a real Jupyter kernel of an unprivileged user in a delegated scope, with
  `-r -n -p --mount-proc --memory 64M --pids 20`; -r with user namespaces switched off by the
  sysctl; a subset of test_rootless.py on the stock kernel.

The rootless venv (Debian's python3 with ipykernel and nsmagic) is built here, on the host, where
pip can reach its index; the guest sees it read-only.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import rootless

# The one boot and everything in it count against the first test's timeout.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parent.parent
RUN_IN_VM = REPO.parent / "shared" / "vm" / "run-in-vm"  # in CI too: shared/ is beside the clone

EXPECTED = [
    "guest_cgroups::test_top_cgroup_as_root",
    "guest_cgroups::test_service_group_as_root",
    "guest_cgroups::test_delegated_scope_as_a_user[plain]",
    "guest_cgroups::test_delegated_scope_as_a_user[-r -p]",
    "guest_cgroups::test_a_killed_kernels_sentinel_puts_the_tree_back",
    "guest_cgroups::test_a_killed_kernels_leaf_is_swept_by_the_next",
    "guest_cgroups::test_container_cgroup_namespace_as_root",
    "guest_cgroups::test_a_user_without_delegation_is_told_how_to_get_it",
    "guest_cgroups::test_a_read_only_cgroup_mount_as_root_is_not_told_to_run_as_root",
    "guest_kernel::test_a_real_kernel_cell_with_limits_as_a_user",
    "guest_kernel::test_a_real_kernel_cell_over_its_memory_limit_is_oom_killed",
    "guest_kernel::test_nsinfo_names_the_delegated_set_up",
    "guest_kernel::test_r_where_user_namespaces_are_switched_off",
    "guest_kernel::test_map_root_user_with_net_works_as_root_inside",
    "guest_kernel::test_rootless_container_pid_mount_proc_uts",
    "guest_kernel::test_large_values_come_back_read_straight_from_the_child",
    "guest_kernel::test_time_namespace_rootless",
    "guest_kernel::test_a_students_cell_leaves_nothing_running",
]


def unavailable_reason() -> str | None:
    if not RUN_IN_VM.exists():
        return f"the vm tier needs {RUN_IN_VM} (shared/ beside the repository)"
    vng = Path(os.environ.get("NSVM_VENV", "/opt/nsmagic-vm")) / "bin" / "vng"
    if not vng.exists() or shutil.which("qemu-system-x86_64") is None or not glob.glob("/boot/vmlinuz-*"):
        return f"run-in-vm is not set up here: run {RUN_IN_VM} --setup (as .ci/run does)"
    return rootless.unavailable_reason()  # the same user, venv and Debian python3, in the guest


@pytest.fixture(scope="module")
def guest():
    """Boot the VM once, run the guest modules, and return {case: (outcome, details)}."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = Path(tempfile.mkdtemp(prefix="nsmagic-vm-"))
    try:
        out.chmod(0o755)  # the guest's unprivileged users run the venv from here
        source = shutil.copytree(REPO, out / "src", ignore=rootless.SOURCE_IGNORE)
        python = rootless._build_venv(out / "venv", [*rootless.REQUIREMENTS, str(source)])
        with open(out / "vm.log", "w+") as log_file:  # tail it to follow the guest
            done = subprocess.run(
                [str(RUN_IN_VM), "--cpus", "2", "--memory", "2G", "--rw", str(out), "--",
                 str(REPO / "tests" / "vm" / "run-guest"), str(REPO), str(out), sys.executable, str(python)],
                stdout=log_file, stderr=subprocess.STDOUT, timeout=2100)
            log_file.seek(0)
            log = log_file.read()
        report = out / "guest.xml"
        if not report.exists():
            pytest.fail(f"the guest wrote no report (run-in-vm status {done.returncode}):\n{log[-6000:]}")
        yield _cases(report), log
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _cases(report: Path) -> dict[str, tuple[str, str]]:
    cases = {}
    for case in ET.parse(report).iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        outcome, details = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, details = child.tag, (child.get("message") or "") + "\n" + (child.text or "")
        cases[f"{module}::{case.get('name')}"] = (outcome, details)
    return cases


@pytest.mark.parametrize("case", EXPECTED)
def test_in_the_vm(guest, case):
    cases, log = guest
    assert case in cases, f"{case} did not run in the guest; it ran {sorted(cases)}\n{log[-4000:]}"
    outcome, details = cases[case]
    assert outcome == "passed", f"{case}: {outcome}\n{details}"


def test_the_guest_ran_nothing_unexpected(guest):
    cases, _ = guest
    assert sorted(cases) == sorted(EXPECTED)
