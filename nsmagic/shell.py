"""Every touch of IPython's internals, in one module: the rest of nsmagic (``run``, ``run_code``,
``execute``, the runner, the child, clone) never imports IPython, and works without it.

Nothing here imports IPython at module level. What runs at every fork (the history thread's
stop, the shell's fit to a new root) looks IPython up in ``sys.modules`` and does nothing if it
is not loaded; what needs a shell (a notebook cell's job) is given one by the magic.

- **A notebook cell in the child** (:func:`cell_job`): the child has a full copy of the shell,
  so IPython syntax (``!cmd``, ``%magic``), the user's namespace and IPython's traceback
  formatting all work as in the kernel. What cannot work is ipykernel's way of publishing (zmq
  sockets owned by threads the child does not have), so the shell's display publisher is
  replaced by one that sends display data through nsmagic's pipe.
- **The history thread, stopped safely before each fork** (:func:`stop_saving_threads`).
- **A root filesystem** (:func:`preload`, :func:`fit_shell`): what IPython loads lazily is
  loaded before pivot_root, and ``!cmd`` is pointed at the new root's shell.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Callable

from .errors import cell_error
from .outcome import Outcome
from .source import Prepared, prepare, run_prepared

if TYPE_CHECKING:
    from .child import Channel


@functools.cache
def _publisher_class():
    """The publisher's class, made on first use: its base is IPython's, which only a kernel that
    runs notebook cells has loaded."""
    from IPython.core.displaypub import DisplayPublisher

    class ChildDisplayPublisher(DisplayPublisher):
        """Sends ``display()``, ``update_display`` and ``clear_output`` to the kernel, which
        publishes them unchanged, so the notebook receives the same messages as from a plain cell.

        Made in the kernel, once per shell: a traitlets object is costly to build in a fresh fork,
        where every page it touches is copied, and only a child ever sets its channel, so the
        kernel's copy never changes. The child gives it its channel.
        """

        channel: Channel | None = None

        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            self.channel.display(data, metadata, transient, update)

        def clear_output(self, wait=False):
            self.channel.clear_output(wait)

    return ChildDisplayPublisher


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
    _publisher(shell)  # made here, in the kernel (see _publisher_class)
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


def _publisher(shell):
    publisher = _publishers.get(shell)
    if publisher is None:
        publisher = _publishers[shell] = _publisher_class()(shell=shell)
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


# -- the history thread, stopped safely before each fork ------------------------------------
#
# IPython 9 stops the thread that writes its history database before any fork
# (``os.register_at_fork(before=HistoryManager._stop_thread)``), so that no child inherits it in
# the middle of an SQLite write, and starts a new one when the next cell is stored. Its stop sets
# the thread's event and joins the thread. But the thread clears that event after checking for a
# stop and before writing: a stop that lands in between is lost, the thread waits again, and the
# join waits forever, inside ``os.fork()``. Any forking cell can hit it; nsmagic forks for every
# cell, and so would sooner or later hang a kernel for good (sooner when other threads keep the
# GIL busy: see the soak tests).
#
# So nsmagic stops the thread itself just before forking, in the same way, except that it keeps
# waking the thread until it has gone, and it waits in short slices that an interrupt can break.
# IPython's own hook then finds nothing to stop, and IPython starts a new thread at the next cell,
# as it would have anyway. Nothing is done unless IPython is already imported and is a version
# that restarts the thread after a fork (with any other, the thread is left to IPython).

def stop_saving_threads() -> None:
    """Stop every live history-saving thread of this process, the way IPython's fork hook
    would, but without the chance of waiting forever."""
    history = sys.modules.get("IPython.core.history")
    manager_class = getattr(history, "HistoryManager", None)
    if not all(hasattr(manager_class, name) for name in ("_restart_thread_if_stopped", "_stop_save_thread")):
        return
    for manager in list(getattr(manager_class, "_instances", ())):
        thread = getattr(manager, "save_thread", None)
        flag = getattr(thread, "save_flag", None)
        if thread is None or not isinstance(flag, threading.Event) or not hasattr(thread, "_stop_now"):
            continue  # not the thread this module was written for: leave it to IPython
        if thread is threading.current_thread():
            continue
        thread._stop_now = True
        while thread.is_alive():
            flag.set()
            thread.join(0.01)
        manager._stop_save_thread()  # the thread is gone: only IPython's bookkeeping is left


# -- a root filesystem ---------------------------------------------------------------------

_preloaded = False


def preload() -> None:
    """Import in the kernel, once, what a notebook cell may need only after pivot_root, when
    no module can be imported any more that was not imported before.

    IPython loads some of its machinery on first use: the modules that colour a traceback
    (pygments' style and lexer; a cell that raised would die in the formatting instead of
    failing with its own exception) and, since IPython 9, pexpect, which runs ``!cmd``."""
    global _preloaded
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if _preloaded or shell is None:
        return
    try:
        import pexpect  # noqa: F401  (imported for later: `!cmd` after pivot_root needs it loaded)
    except ImportError:  # not installed: nothing to load
        pass
    formatter = shell.InteractiveTB
    kept = formatter.__dict__.get("tb", preload)  # %debug debugs the last one it formatted
    try:
        raise RuntimeError("nsmagic warms up IPython's traceback formatting")
    except RuntimeError as e:
        formatter.structured_traceback(type(e), e, e.__traceback__, tb_offset=0)
    finally:
        if kept is preload:
            formatter.__dict__.pop("tb", None)
        else:
            formatter.tb = kept
    _preloaded = True


def fit_shell() -> None:
    """Make ``!cmd`` use the root filesystem's shell: IPython runs commands with ``$SHELL`` and
    caches its host path after the first use, both of which may not exist here."""
    shell = os.environ.get("SHELL")
    if shell and not os.access(shell, os.X_OK):
        if os.access("/bin/sh", os.X_OK):
            os.environ["SHELL"] = "/bin/sh"
        else:
            del os.environ["SHELL"]
    handler = getattr(getattr(sys.modules.get("IPython.utils._process_posix"), "system", None), "__self__", None)
    if handler is not None and hasattr(handler, "_sh"):
        handler._sh = None
