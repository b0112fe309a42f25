"""A real Jupyter kernel, and the round trip of one cell as a notebook client sees it."""

from __future__ import annotations

import ast
import os
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import KernelManager

#: Run once in every kernel, untimed.
SETUP = """\
%load_ext nsmagic
import gc, os, time

def _bench_status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

def _bench_reset_peak():
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current RSS (Linux >= 4.0)
"""


#: The kernels' own stdout/stderr (warnings, crashes) go here, not into the report.
LOG = Path(__file__).parent / "results" / "kernel.log"


class CellFailed(RuntimeError):
    pass


class Kernel:
    """``with Kernel() as k:`` starts a python3 kernel with nsmagic loaded, and always stops it.

    Cells are sent as a notebook sends them, stored in the history (``store_history``): IPython
    then writes each one from a thread of its own, which nsmagic stops before each fork. The
    history goes to a file of the run's own, so the bench leaves the user's history alone.
    """

    def __init__(self, timeout: float = 60, env: dict | None = None):
        self.timeout = timeout
        self.env = env

    def __enter__(self) -> "Kernel":
        self.km = KernelManager(kernel_name="python3")
        LOG.parent.mkdir(exist_ok=True)
        self.history = tempfile.TemporaryDirectory(prefix="nsmagic-bench-")
        hist_file = os.path.join(self.history.name, "history.sqlite")
        with open(LOG, "a") as log:  # the kernel keeps its own copy of the descriptor
            self.km.start_kernel(stdout=log, stderr=log, env=self.env,
                                 extra_arguments=[f"--HistoryManager.hist_file={hist_file}"])
        try:
            self.kc = self.km.client()
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=self.timeout)
            self.run(SETUP)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.kc.stop_channels()
        finally:
            try:
                self.km.shutdown_kernel(now=True)
            finally:
                self.history.cleanup()

    def run(self, code: str, expressions: dict[str, str] | None = None) -> tuple[float, dict]:
        """Execute *code*; return the round trip in seconds and the *expressions*' values.

        The clock runs from just before the execute_request is sent until the kernel has
        reported idle for it and its execute_reply has arrived. Both are blocking reads on the
        zmq sockets (poll with a timeout, then recv): no sleeping, so no quantisation.
        """
        kc = self.kc
        t0 = time.perf_counter()
        msg_id = kc.execute(code, store_history=True, user_expressions=expressions or {})
        deadline = time.monotonic() + self.timeout
        errors = []
        while True:
            msg = kc.get_iopub_msg(timeout=max(0.001, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                break
            if kind == "error" or (kind == "stream" and msg["content"]["name"] == "stderr"):
                errors.append(msg["content"])
        while True:
            reply = kc.get_shell_msg(timeout=max(0.001, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        elapsed = time.perf_counter() - t0
        content = reply["content"]
        if content["status"] != "ok":
            tb = "\n".join(content.get("traceback", []))
            raise CellFailed(f"{content.get('ename')}: {content.get('evalue')}\n{tb}\n{code[:200]}")
        values = {}
        for name, res in content.get("user_expressions", {}).items():
            if res.get("status") != "ok":
                raise CellFailed(f"{name}: {res.get('ename')}: {res.get('evalue')}")
            values[name] = ast.literal_eval(res["data"]["text/plain"])
        return elapsed, values

    def value(self, expr: str):
        return self.run("", {"v": expr})[1]["v"]

    def timer(self, code: str):
        """A zero-argument function that runs *code* and returns its round trip."""
        return lambda: self.run(code)[0]
