"""How a notebook cell runs inside the child, with the kernel's own IPython shell.

The child has a full copy of the shell, so IPython syntax (``!cmd``, ``%magic``), the user's
namespace and IPython's traceback formatting all work as in the kernel. What cannot work is
ipykernel's way of publishing (zmq sockets owned by threads the child does not have), so the
shell's display publisher is replaced by one that sends display data through nsmagic's pipe.
"""

from __future__ import annotations

import sys
from typing import Callable

from IPython.core.displaypub import DisplayPublisher

from .child import Channel
from .outcome import Outcome
from .source import run_source


class ChildDisplayPublisher(DisplayPublisher):
    """Sends ``display()``, ``update_display`` and ``clear_output`` to the kernel, which
    publishes them unchanged, so the notebook receives the same messages as from a plain cell."""

    def __init__(self, channel: Channel, **kw):
        super().__init__(**kw)
        self.channel = channel

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
        self.channel.display(data, metadata, transient, update)

    def clear_output(self, wait=False):
        self.channel.clear_output(wait)


def cell_job(shell, code: str, *, shown_source: str, line_offset: int) -> Callable[[Channel], Outcome]:
    """The job that runs *code* as a cell in the child.

    *shown_source* and *line_offset* place the code in the cell the student sees (for a cell
    magic, after its ``%%innamespace`` line), so tracebacks name the right line.
    """

    def job(channel: Channel) -> Outcome:
        shell.display_pub = ChildDisplayPublisher(channel, shell=shell)
        number = shell.execution_count
        try:
            transformed = shell.transform_cell(code)
        except Exception as e:  # IPython's own input transformers refused the cell
            return Outcome(error=e, traceback=_render(shell)(type(e), e, None), namespace=shell.user_ns)
        filename = shell.compile.cache(transformed, number, raw_code=shown_source)
        outcome = run_source(
            transformed, shell.user_ns, filename=filename, flags=shell.compile.flags,
            shown_source=shown_source, line_offset=line_offset, render_traceback=_render(shell),
            formatter=lambda value: shell.display_formatter.format(value),
        )
        _show_open_figures()
        return outcome

    return job


def _render(shell):
    def render(etype, value, tb):
        if issubclass(etype, SyntaxError):
            return shell.SyntaxTB.structured_traceback(etype, value, [])
        return shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=0)

    return render


def _show_open_figures() -> None:
    """A plain cell shows the matplotlib figures it leaves open (the inline backend's
    post-execute hook does it); that hook does not run in the child, so do its work here."""
    inline = sys.modules.get("matplotlib_inline.backend_inline")
    if inline is None or "matplotlib.pyplot" not in sys.modules:
        return
    import matplotlib

    if "inline" in matplotlib.get_backend():
        try:
            inline.flush_figures()
        except Exception as e:  # a broken figure must not cost the cell its result
            print(f"nsmagic: could not show the open figures: {e}", file=sys.stderr)
