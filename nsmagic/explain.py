"""``--explain``: an exact account of what nsmagic did for a cell, shown before its output.

What a teacher would otherwise draw on the board: each system call in the order it was made,
in which process, and why; then the kernel's and the cell's namespaces side by side, so the
student sees which ones are new (the inode differs) and which are shared.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field

from .kinds import KINDS

#: /proc/self/ns names, in the table's order.
_NAMES = tuple(k.proc for k in KINDS)


def inodes() -> dict[str, str]:
    """This process's namespaces, as ``/proc/self/ns`` names them (``net:[4026531840]``)."""
    out = {}
    for name in _NAMES:
        try:
            out[name] = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            out[name] = "-"
    return out


@dataclass
class Explanation:
    #: (where, system call, why), in the order they happened.
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    kernel: dict[str, str] = field(default_factory=dict)
    cell: dict[str, str] = field(default_factory=dict)
    #: The cell's pid, uid and gid as it sees them, and its pid as the kernel sees it.
    cell_ids: tuple[int, int, int] = (0, 0, 0)
    kernel_view_pid: int = 0
    #: Kinds entered with --join-* (named as in /proc/self/ns), shown as "joined", not "new".
    joined: set[str] = field(default_factory=set)

    def _rows(self):
        for name in _NAMES:
            k, c = self.kernel.get(name, "-"), self.cell.get(name, "-")
            yield name, k, c, "shared" if k == c else "joined" if name in self.joined else "new"

    def _repr_html_(self) -> str:
        calls = "".join(
            f"<tr><td>{html.escape(w)}</td><td><code>{html.escape(c)}</code></td><td>{html.escape(n)}</td></tr>"
            for w, c, n in self.calls
        )
        table = "".join(
            f"<tr><td><code>{n}</code></td><td><code>{html.escape(k)}</code></td>"
            f"<td><code>{html.escape(c)}</code></td><td>{'<b>new</b>' if s == 'new' else s}</td></tr>"
            for n, k, c, s in self._rows()
        )
        pid, uid, gid = self.cell_ids
        return (
            "<details open><summary><b>nsmagic --explain</b>: what was done for this cell</summary>"
            "<table><thead><tr><th>where</th><th>system call</th><th>why</th></tr></thead>"
            f"<tbody>{calls}</tbody></table>"
            f"<p>The cell runs as pid {pid}, uid {uid}, gid {gid}; the kernel's child is pid {self.kernel_view_pid}.</p>"
            "<table><thead><tr><th>namespace</th><th>kernel</th><th>cell</th><th></th></tr></thead>"
            f"<tbody>{table}</tbody></table></details>"
        )

    def __repr__(self) -> str:
        lines = ["nsmagic --explain: what was done for this cell"]
        width = max((len(c) for _, c, _ in self.calls), default=0)
        for where, call, note in self.calls:
            lines.append(f"  [{where:<6}] {call:<{width}}  {note}".rstrip())
        pid, uid, gid = self.cell_ids
        lines.append(f"The cell runs as pid {pid}, uid {uid}, gid {gid}; "
                     f"the kernel's child is pid {self.kernel_view_pid}.")
        lines.append(f"  {'namespace':<9} {'kernel':<22} {'cell':<22}")
        for name, k, c, s in self._rows():
            lines.append(f"  {name:<9} {k:<22} {c:<22} {s}")
        return "\n".join(lines)


#: Why each system call is made, for the account.
WHY = {
    "unshare(CLONE_NEWUSER)": "a new user namespace first, so it owns every namespace made after it",
    "setgroups": "unprivileged gid maps require setgroups to be denied first",
    "uid_map": "uid 0 inside is the kernel's uid outside",
    "gid_map": "gid 0 inside is the kernel's gid outside",
    "MS_REC|MS_PRIVATE": "mount propagation made private, so no mount inside shows on the host",
    '"proc"': "a /proc of the namespace's own (with a PID namespace: only its processes)",
    "sethostname": "the hostname of the new UTS namespace",
    "timens_offsets": "clock offsets, set before any process enters the time namespace",
    "time_for_children": "enter the new time namespace",
    "fork()": "a new PID namespace holds only the children made after it: this fork makes its PID 1",
    "SIOCSIFFLAGS": "bring lo up (ip link set lo up): a new network namespace starts with it down",
    "setns(": "enter an existing namespace, as nsenter(1) does",
    "PR_SET_CHILD_SUBREAPER": "no new PID 1 will end what the cell leaves running, so this process does: orphans come back to it",
}


def why(call: str) -> str:
    for key, text in WHY.items():
        if key in call:
            return text
    if call.startswith("unshare("):
        return "new namespaces for this process"
    return ""
