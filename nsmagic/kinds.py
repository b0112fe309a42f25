"""The eight kinds of Linux namespace, tabled once: every module that names, flags, spells or
opens a namespace reads it from here.

Each kind has the field of :class:`~nsmagic.spec.Namespaces` that asks for it, unshare(1)'s
letter and long option, its file under ``/proc/PID/ns``, its ``CLONE_NEW*`` flag, the words
messages use for it, and whether ``--join-KIND`` may enter an existing one (nsenter(1)'s six:
a cgroup or time namespace is entered by nsenter too, but nsmagic does not offer it). ``KINDS``
is in the order of the man pages and ``/proc/PID/ns``'s listing, which displays follow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CloneFlag(enum.IntFlag):
    """The ``CLONE_NEW*`` flags of clone(2), unshare(2) and setns(2)."""

    NEWTIME = 0x00000080
    NEWNS = 0x00020000
    NEWCGROUP = 0x02000000
    NEWUTS = 0x04000000
    NEWIPC = 0x08000000
    NEWUSER = 0x10000000
    NEWPID = 0x20000000
    NEWNET = 0x40000000

    def spelled(self) -> str:
        """``CLONE_NEWNET|CLONE_NEWPID``, as the man pages write it."""
        return "|".join(f"CLONE_{f.name}" for f in CloneFlag if f in self) or "0"


@dataclass(frozen=True)
class Kind:
    #: The :class:`~nsmagic.spec.Namespaces` field that asks for a new one: ``"mount"``.
    field: str
    #: unshare(1)'s short and long options: ``"-m"``, ``"--mount"``.
    letter: str
    option: str
    #: The file under ``/proc/PID/ns`` (and the KIND of ``--join-KIND``): ``"mnt"``.
    proc: str
    flag: CloneFlag
    #: Words for messages: "a new {words} namespace".
    words: str
    #: Whether ``--join-{proc}`` enters an existing one.
    joinable: bool

    @property
    def options(self) -> str:
        """``-m/--mount``: both spellings, for messages about what the user typed."""
        return f"{self.letter}/{self.option}"


KINDS: tuple[Kind, ...] = (
    Kind("mount", "-m", "--mount", "mnt", CloneFlag.NEWNS, "mount", True),
    Kind("uts", "-u", "--uts", "uts", CloneFlag.NEWUTS, "UTS (hostname)", True),
    Kind("ipc", "-i", "--ipc", "ipc", CloneFlag.NEWIPC, "IPC", True),
    Kind("net", "-n", "--net", "net", CloneFlag.NEWNET, "network", True),
    Kind("pid", "-p", "--pid", "pid", CloneFlag.NEWPID, "PID", True),
    Kind("user", "-U", "--user", "user", CloneFlag.NEWUSER, "user", True),
    Kind("cgroup", "-C", "--cgroup", "cgroup", CloneFlag.NEWCGROUP, "cgroup", False),
    Kind("time", "-T", "--time", "time", CloneFlag.NEWTIME, "time", False),
)

BY_FIELD = {k.field: k for k in KINDS}
BY_PROC = {k.proc: k for k in KINDS}
BY_FLAG = {k.flag: k for k in KINDS}
#: The kinds ``--join-KIND`` takes, by their ``/proc/PID/ns`` name.
JOINABLE = tuple(k.proc for k in KINDS if k.joinable)
