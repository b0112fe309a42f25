"""The Linux versions nsmagic needs, checked once at ``%load_ext`` so that an older kernel gets
one clear line there, never a traceback from deep inside the first cell.

Every cell needs pidfds (Linux 5.3): the kernel waits for its child on a pidfd, so that a reused
pid is never signalled. Other features are needed only by some options, and fail there with
their own words (time namespaces) or have a fallback (``cgroup.kill``). The gate probes
``pidfd_open`` rather than trusting the version number: distributions backport features (an
enterprise kernel may call itself 4.18 and have pidfds), and the number is only used to word the
message.
"""

from __future__ import annotations

import errno
import os
import re

from .errors import SetupError

#: (version, feature, what uses it, what happens on an older kernel). Kept in step with the
#: README's "Linux versions" table.
FEATURES = [
    ((3, 8), "unprivileged user namespaces", "-r, -U", "-r fails with advice"),
    ((4, 6), "cgroup namespaces", "-C", "-C fails with advice"),
    ((4, 15), "cgroup v2 cpu controller", "--cpus on cgroup v2", "--cpus fails with advice"),
    ((5, 3), "pidfd_open, and poll on a pidfd", "every cell", "%load_ext refuses, in one line"),
    ((5, 6), "time namespaces", "-T, --monotonic, --boottime", "those options fail with advice"),
    ((5, 14), "cgroup.kill", "--memory, --pids, --cpus clean-up", "the cgroup's processes are killed one by one"),
]
REQUIRED = (5, 3)


def version(release: str) -> tuple[int, int] | None:
    """(major, minor) from a release string such as ``6.1.0-13-amd64``; None if unreadable."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m[1]), int(m[2])) if m else None


def missing(release: str) -> list[str]:
    """The features of :data:`FEATURES` that a kernel calling itself *release* predates."""
    have = version(release)
    if have is None:
        return []
    return [f"{feature} (Linux {v[0]}.{v[1]}, for {uses})" for v, feature, uses, _ in FEATURES if have < v]


def refusal(release: str, has_pidfd: bool, system: str = "Linux") -> str | None:
    """The one line ``%load_ext`` shows when this kernel cannot run cells, else None."""
    if system != "Linux":
        return (f"nsmagic needs Linux: namespaces and cgroups are Linux's, and this kernel runs on "
                f"{system}; run Jupyter in a Linux VM or container (on macOS: Docker Desktop, "
                f"Podman machine, Lima)")
    if has_pidfd:
        return None
    need = f"{REQUIRED[0]}.{REQUIRED[1]}"
    return (f"nsmagic needs Linux {need} or later (pidfd_open, used by every cell); this kernel "
            f"is {release}: run Jupyter on a newer Linux (a current distribution, or a VM)")


def check_system() -> None:
    """Raise a one-line :class:`SetupError` on a system that is not Linux (run at import)."""
    uname = os.uname()
    if uname.sysname != "Linux":
        raise SetupError(refusal(uname.release, False, uname.sysname))


def check() -> None:
    """Raise a one-line :class:`SetupError` if this Linux cannot run nsmagic's cells."""
    try:
        os.close(os.pidfd_open(os.getpid()))
        has = True
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        has = False
    except AttributeError:  # a Python built without it (before 3.9, or not on Linux)
        has = False
    line = refusal(os.uname().release, has, os.uname().sysname)
    if line:
        raise SetupError(line)
