"""The pieces of a child's environment beyond bare namespaces: joined namespaces, a network,
cgroup limits, mounts.

A namespace alone the child can make by itself. These pieces need the kernel's help or need to
be undone: a veth pair has a host end, a cgroup is a directory on the host that must be removed,
a joined namespace is opened by path. Each is a :class:`Part`, and every part goes through the
same life, driven by :mod:`nsmagic.runner` and :mod:`nsmagic.child`:

==================  =============  ==========================================================
hook                runs in        for
==================  =============  ==========================================================
``check()``         kernel         check values, changing nothing; every part's check runs
                                   before any part's prepare, so a bad value makes nothing
``prepare()``       kernel         make host resources; before fork, so a failure never starts
                                   a child
``before_unshare``  child          setns() into joined namespaces, join a cgroup: before new
                                   namespaces are made
``host(pid)``       kernel         while the child waits, its namespaces made and no cell code
                                   run yet: move a veth end in
``inside()``        the cell's     configure from inside: addresses, routes, mounts
                    process
``explain()``       kernel         lines for ``--explain``: what this part did
``cleanup()``       kernel         after the child is reaped, also after a crash, an interrupt
                                   or a timeout: remove what ``prepare``/``host`` made
``exit_reason()``   kernel         words for how the child died, if this part caused it
``annotate()``      kernel         a note for the cell's exception, if this part caused it
==================  =============  ==========================================================

A hook that fails raises :class:`~nsmagic.errors.OptionError` (``check``, for bad values),
:class:`~nsmagic.errors.PrivilegeError` or :class:`~nsmagic.errors.SetupError` in the kernel,
and :class:`~nsmagic.errors.StepFailed` in the child.
"""

from __future__ import annotations

import sys

from ..spec import Namespaces
from .base import Part
from .cgroups import CgroupLimits
from .join import JoinNamespaces
from .mounts import Mounts
from .network import Network

__all__ = ["Part", "build", "prepare_all", "annotate_all", "cleanup_all"]


def build(spec: Namespaces) -> list[Part]:
    """The parts *spec* asks for, in the order their hooks must run."""
    parts: list[Part] = []
    if spec.join:
        parts.append(JoinNamespaces(spec))
    if spec.memory is not None or spec.pids is not None or spec.cpus is not None:
        parts.append(CgroupLimits(spec))
    if spec.lo or spec.veth is not None:
        parts.append(Network(spec))
    if spec.tmpfs or spec.bind or spec.ro_bind or spec.rootfs is not None:
        parts.append(Mounts(spec))
    return parts


def prepare_all(parts: list[Part]) -> None:
    """Check every part's values, then prepare each part; if one fails, clean up those already
    prepared and re-raise."""
    for part in parts:
        part.check()
    done: list[Part] = []
    try:
        for part in parts:
            done.append(part)
            part.prepare()
    except BaseException:
        cleanup_all(done)
        raise


def annotate_all(parts: list[Part], error: BaseException) -> None:
    """Add the parts' notes to the cell's exception, where plain Python and the notebook show them."""
    for part in parts:
        note = part.annotate(error)
        if not note:
            continue
        if hasattr(error, "add_note"):
            error.add_note(note)
        shown = getattr(error, "_render_traceback_", None)
        if shown is not None:
            try:
                error._render_traceback_ = lambda shown=shown, note=note: [*shown(), note]
            except (AttributeError, TypeError):
                pass


def exit_reason(parts: list[Part], status: int) -> str | None:
    """Words for how a child ended, from the first part that caused it (an OOM kill), or None."""
    for part in parts:
        reason = part.exit_reason(status)
        if reason:
            return reason
    return None


def host_side(parts: list[Part], pid: int) -> None:
    """The kernel's side of each part, while the child *pid* waits (a veth end moved in)."""
    for part in parts:
        if part.needs_host:
            part.host(pid)


def needs_host(parts: list[Part]) -> bool:
    return any(part.needs_host for part in parts)


def cleanup_all(parts: list[Part]) -> None:
    """Undo every part, in reverse order; a failure is reported and does not stop the others."""
    for part in reversed(parts):
        try:
            part.cleanup()
        except Exception as e:
            print(f"nsmagic: could not clean up after the cell ({type(part).__name__}): {e}", file=sys.stderr)
