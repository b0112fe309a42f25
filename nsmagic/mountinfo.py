"""``/proc/PID/mountinfo``, parsed once for every reader (cgroups, mounts, ``%nsinfo``).

A line is ``ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS``
(proc(5)); the optional fields end at a lone ``-``. The kernel writes space, tab, newline and
backslash in paths as three-digit octal escapes (``\\040``), and nothing else: other bytes,
UTF-8 or not, come as they are, and are decoded here the way ``os.fsdecode`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Mount:
    id: str
    parent: str
    #: The directory of the mounted filesystem that is seen at *point* (``/`` unless a bind).
    root: str
    point: str
    options: str
    fstype: str
    source: str
    super_options: str


def parse(text: str) -> list[Mount]:
    """The mounts in the text of a mountinfo file; lines that are not one are skipped."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        mine, theirs = left.split(" "), right.split(" ")
        if not sep or len(mine) < 6 or len(theirs) < 3:
            continue
        out.append(Mount(mine[0], mine[1], unescape(mine[3]), unescape(mine[4]), mine[5],
                         theirs[0], unescape(theirs[1]), theirs[2]))
    return out


def read(pid: int | str = "self") -> list[Mount]:
    """The mounts of process *pid* (this one's by default), as its mount namespace sees them."""
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(text: str) -> str:
    """A path as mountinfo escapes it (``\\040`` for a space), back to itself."""
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: chr(int(m[1], 8)), text)
