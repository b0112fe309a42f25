"""IPython's history-saving thread, stopped safely before each fork.

IPython 9 stops the thread that writes its history database before any fork
(``os.register_at_fork(before=HistoryManager._stop_thread)``), so that no child inherits it in
the middle of an SQLite write, and starts a new one when the next cell is stored. Its stop sets
the thread's event and joins the thread. But the thread clears that event after checking for a
stop and before writing: a stop that lands in between is lost, the thread waits again, and the
join waits forever, inside ``os.fork()``. Any forking cell can hit it; nsmagic forks for every
cell, and so hung the kernel for good about once in 1,000 to 9,000 cells here when two other
threads kept the GIL busy.

So nsmagic stops the thread itself just before forking, in the same way, except that it keeps
waking the thread until it has gone, and it waits in short slices that an interrupt can break.
IPython's own hook then finds nothing to stop, and IPython starts a new thread at the next cell,
as it would have anyway. Nothing is done unless IPython is already imported and is a version
that restarts the thread after a fork (with any other, the thread is left to IPython).
"""

from __future__ import annotations

import sys
import threading


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
