"""The hooks every part of a cell's environment has (see :mod:`nsmagic.environment`)."""

from __future__ import annotations


class Part:
    """One piece of a child's environment. Subclasses override the hooks they need."""

    #: Whether :meth:`host` must run; the child then waits for the kernel before the cell runs.
    needs_host = False

    def check(self) -> None:
        """Check the part's values and raise OptionError (or PrivilegeError) for a bad one. It
        reads what it must (a path's type, the kernel's capabilities) and changes nothing: every
        part's check runs before any part's prepare, so a bad value never leaves a thing made."""

    def prepare(self) -> None:
        pass

    def before_unshare(self) -> None:
        pass

    def host(self, pid: int) -> None:
        pass

    def inside(self) -> None:
        pass

    def explain(self) -> list[str]:
        return []

    def cleanup(self) -> None:
        pass

    def exit_reason(self, status: int) -> str | None:
        """Words for how the child ended, if this part caused it (an OOM kill); else None."""
        return None

    def annotate(self, error: BaseException) -> str | None:
        """A note for the cell's exception, if this part caused it (a refused fork); else None."""
        return None
