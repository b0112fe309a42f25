"""How a notebook cell runs inside the child, with the kernel's own IPython shell.

The child has a full copy of the shell, so IPython syntax (``!cmd``, ``%magic``), the user's
namespace and IPython's traceback formatting all work as in the kernel. What cannot work is
ipykernel's way of publishing (zmq sockets owned by threads the child does not have), so the
shell's display publisher is replaced by one that sends display data through nsmagic's pipe.
"""

from __future__ import annotations

import sys
import weakref
from typing import Callable

from IPython.core.displaypub import DisplayPublisher

from .child import Channel
from .errors import cell_error
from .outcome import Outcome
from .source import Prepared, prepare, run_prepared


class ChildDisplayPublisher(DisplayPublisher):
    """Sends ``display()``, ``update_display`` and ``clear_output`` to the kernel, which
    publishes them unchanged, so the notebook receives the same messages as from a plain cell.

    Made in the kernel (a traitlets object costs ten times more to build in a fresh fork, where
    every page it touches is copied), once per shell: building one takes about 0.15 ms in a
    kernel just after the previous cell's fork, and only a child ever sets its channel, so the
    kernel's copy never changes. The child gives it its channel.
    """

    channel: Channel | None = None

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
        self.channel.display(data, metadata, transient, update)

    def clear_output(self, wait=False):
        self.channel.clear_output(wait)


def cell_job(shell, code: str, *, shown_source: str, line_offset: int) -> Callable[[Channel], Outcome]:
    """The job that runs *code* as a cell in the child (see :func:`compile_cell`)."""
    prepared = compile_cell(shell, code, shown_source=shown_source, line_offset=line_offset)
    return lambda channel: run_cell(shell, prepared, channel)


def compile_cell(shell, code: str, *, shown_source: str, line_offset: int) -> Prepared:
    """IPython's input transformation (``!cmd``, ``%magic``) and compiling, done in the kernel
    before the fork: a syntax error then never starts a child, and both run warm in the kernel
    but cold (several milliseconds) in a child. *shown_source* and *line_offset* place the code
    in the cell the student sees (for a cell magic, after its ``%%innamespace`` line), so
    tracebacks name the right line.
    """
    transformed = shell.transform_cell(code)
    filename = shell.compile.cache(transformed, shell.execution_count, raw_code=shown_source)
    try:
        prepared = prepare(transformed, filename=filename, flags=shell.compile.flags,
                           shown_source=shown_source, line_offset=line_offset)
    except SyntaxError as e:
        # Shown as a plain cell shows it; IPython would print a SyntaxError raised by a magic
        # with the magic's own frames.
        raise cell_error("SyntaxError", str(e), shell.SyntaxTB.structured_traceback(SyntaxError, e, [])) from None
    _publisher(shell)  # made here, in the kernel (see ChildDisplayPublisher)
    return prepared


def run_cell(shell, prepared: Prepared, channel: Channel) -> Outcome:
    """Run compiled cell code in the child (a one-shot child or a box), with the shell's
    display going through *channel*."""
    publisher = _publisher(shell)
    publisher.channel = channel
    shell.display_pub = publisher
    _forward_kernel_messages(shell, channel)
    outcome = run_prepared(prepared, shell.user_ns, render_traceback=_render(shell),
                           formatter=lambda value: shell.display_formatter.format(value))
    _show_open_figures()
    return outcome


def box_executor(shell):
    """How a notebook's box runs a cell: in its own copy of the shell, whose user namespace is
    the box's globals; ``--in`` values are set there first."""
    import pickle

    from .source import loads

    def execute(request, channel) -> Outcome:
        if request.inputs is not None:
            shell.user_ns.update(pickle.loads(request.inputs))
        return run_cell(shell, loads(request.payload), channel)

    return execute


_publishers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _publisher(shell) -> ChildDisplayPublisher:
    publisher = _publishers.get(shell)
    if publisher is None:
        publisher = _publishers[shell] = ChildDisplayPublisher(shell=shell)
    return publisher


def _forward_kernel_messages(shell, channel: Channel) -> None:
    """Widgets (ipywidgets, ``tqdm.notebook``) talk to the front end through comm messages that
    ipykernel sends on its IOPub socket, which a fork may not use (the session drops them). Route
    them through the kernel instead, which sends them as its own; a widget made in the cell then
    shows and updates live. Messages *from* the front end to such a widget cannot reach the
    child: buttons and sliders made inside do not call back."""
    kernel = getattr(shell, "kernel", None)
    session = getattr(kernel, "session", None)
    if session is None or getattr(session.send, "nsmagic_forward", False):
        return  # done already: a box runs many cells in one process
    iopub, send = kernel.iopub_socket, session.send

    def forward(stream, msg_or_type, content=None, parent=None, ident=None, buffers=None,
                track=False, header=None, metadata=None):
        if stream is iopub and isinstance(msg_or_type, str):
            channel.iopub(msg_or_type, content or {}, metadata, ident, buffers)
            return None
        return send(stream, msg_or_type, content, parent, ident, buffers, track, header, metadata)

    forward.nsmagic_forward = True
    session.send = forward


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
