"""The floor of any fork-based design: fork, the child runs a body and pickles a small value into
a pipe, the parent reads it (one read: a write of under PIPE_BUF bytes arrives whole) and leaves
the child to a reaper thread, as nsmagic does (waiting for the child's exit would add its
teardown). The library target calls it; the kernel target runs this same source in the kernel."""

import os
import pickle
import queue
import threading

_dead: queue.SimpleQueue = queue.SimpleQueue()
_reaper: list = []


def _reap_forever():
    while True:
        os.waitpid(_dead.get(), 0)


def fork_pipe(body: str = ""):
    if not _reaper:
        _reaper.append(threading.Thread(target=_reap_forever, daemon=True))
        _reaper[0].start()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if body:
                exec(body, {})
            os.write(w, pickle.dumps(1))
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 65536)
    os.close(r)
    _dead.put(pid)
    return pickle.loads(data)
