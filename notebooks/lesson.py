"""Small helpers shared by the tutorial notebooks (01-08), so that each notebook shows namespaces,
not plumbing.  ``%load_ext lesson`` registers ``%%needs``; the functions are imported with
``from lesson import *``.

Everything here runs in the kernel *before* a cell forks, so a namespaced cell sees these
functions too (its child is a copy of the kernel).
"""

from __future__ import annotations

import os
import re

__all__ = ["NS_KINDS", "ns_ids", "new_namespaces", "capabilities", "cgroup_memory", "host_pid"]

NS_KINDS = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")

#: A few capability bits worth naming in a lesson (linux/capability.h).
CAPABILITY_NAMES = {
    0: "CAP_CHOWN", 6: "CAP_SETGID", 7: "CAP_SETUID", 12: "CAP_NET_ADMIN", 13: "CAP_NET_RAW",
    18: "CAP_SYS_CHROOT", 19: "CAP_SYS_PTRACE", 21: "CAP_SYS_ADMIN", 27: "CAP_MKNOD",
}


def ns_ids() -> dict[str, str]:
    """Namespace kind -> the link in /proc/self/ns, e.g. 'net:[4026531833]'."""
    return {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in NS_KINDS}


def new_namespaces(reference: dict[str, str]) -> list[str]:
    """The kinds in which this process's namespaces differ from *reference* (an earlier ns_ids())."""
    return [kind for kind, link in ns_ids().items() if link != reference[kind]]


def capabilities() -> tuple[int, list[str]]:
    """This process's effective capabilities: how many bits are set, and the named ones among them."""
    with open("/proc/self/status") as f:
        eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)$", f.read(), re.M).group(1), 16)
    return bin(eff).count("1"), [name for bit, name in CAPABILITY_NAMES.items() if eff >> bit & 1]


def _cgroup_dir(controller: str) -> str | None:
    """This process's cgroup directory for *controller* (v1), or its v2 directory."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in lines:
        if controller in controllers.split(","):
            return f"/sys/fs/cgroup/{controller}{path}"
    for hierarchy, controllers, path in lines:
        if hierarchy == "0" and controllers == "":
            return f"/sys/fs/cgroup{path}"
    return None


def cgroup_memory() -> tuple[int | None, int | None]:
    """(bytes used, limit in bytes or None) of this process's memory cgroup, v1 or v2.

    Read inside a cell without ``-C``: with a cgroup namespace, /proc/self/cgroup says '/'.
    """
    d = _cgroup_dir("memory")
    for used, limit in (("memory.current", "memory.max"),
                        ("memory.usage_in_bytes", "memory.limit_in_bytes")):
        try:
            with open(f"{d}/{used}") as u, open(f"{d}/{limit}") as m:
                value, cap = int(u.read()), m.read().strip()
        except (OSError, TypeError):
            continue
        return value, None if cap == "max" or int(cap) >= 1 << 62 else int(cap)
    return None, None


def host_pid() -> int:
    """This process's PID as the host sees it, read from the host's /proc (a cell with -p but
    without --mount-proc still has it): /proc/self points at the PID in /proc's own namespace."""
    return int(os.readlink("/proc/self"))


def load_ipython_extension(ipython) -> None:
    """``%load_ext lesson``: registers ``%%needs``."""
    from IPython.core.magic import register_cell_magic

    @register_cell_magic
    def needs(line, cell):
        """``%%needs NAME reason...``: run the rest of the cell only if the variable NAME is true;
        otherwise print "skipped: reason" instead of failing.  The rest of the cell may begin
        with a cell magic of its own (``%%innamespace ...``)."""
        name, _, reason = line.strip().partition(" ")
        if not ipython.user_ns.get(name):
            print(f"skipped: {reason.strip()}")
            return None
        first, _, body = cell.partition("\n")
        if first.startswith("%%"):
            magic, _, args = first[2:].partition(" ")
            return ipython.run_cell_magic(magic, args, body)
        return ipython.ex(ipython.transform_cell(cell))
