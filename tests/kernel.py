"""A real Jupyter kernel for the tests, and a way to run one cell and see everything it sent.

Modelled on ipykernel's own ``tests/utils.py``: every iopub message of a request is collected
until the kernel reports idle, so a test can check what a notebook would have shown.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

from jupyter_client.manager import KernelManager


@dataclass
class Cell:
    """What one execute request produced, as a notebook would have received it."""

    reply: dict
    messages: list = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    @property
    def ename(self) -> str | None:
        return self.reply["content"].get("ename")

    @property
    def evalue(self) -> str | None:
        return self.reply["content"].get("evalue")

    def of_type(self, msg_type: str) -> list:
        return [m for m in self.messages if m["msg_type"] == msg_type]

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == name
        )

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def stderr(self) -> str:
        return self.stream("stderr")

    @property
    def result(self) -> dict | None:
        results = self.of_type("execute_result")
        return results[-1]["content"]["data"] if results else None

    @property
    def error(self) -> dict | None:
        errors = self.of_type("error")
        return errors[-1]["content"] if errors else None

    @property
    def traceback(self) -> str:
        return "\n".join(self.reply["content"].get("traceback", []))

    def ok(self) -> "Cell":
        """The cell itself, after checking that it succeeded (with its traceback if not)."""
        assert self.status == "ok", f"{self.ename}: {self.evalue}\n{self.traceback}\n{self.stderr}"
        return self


class Kernel:
    """A started kernel and its blocking client."""

    def __init__(self, km: KernelManager, timeout: float = 60):
        self.km = km
        self.kc = km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=timeout)

    @classmethod
    def start(cls, **kw) -> "Kernel":
        km = KernelManager(kernel_name="python3")
        km.start_kernel(**kw)
        return cls(km)

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def execute(self, code: str, timeout: float = 60, stdin=None) -> Cell:
        """Run *code* and wait for its reply and for the kernel to go idle.

        ``stdin`` answers input requests: a callable taking the prompt, or ``None`` to refuse
        them (the request is then reported to the kernel as not allowed).
        """
        msg_id = self.kc.execute(code, allow_stdin=stdin is not None)
        cell = Cell(reply={})
        deadline = time.monotonic() + timeout

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell did not finish in {timeout}s: {code[:80]!r}")
            return remaining

        while True:
            if stdin is not None:
                try:
                    req = self.kc.stdin_channel.get_msg(timeout=0)
                    self.kc.input(stdin(req["content"]["prompt"]))
                except queue.Empty:
                    pass
            try:
                msg = self.kc.iopub_channel.get_msg(timeout=min(left(), 0.05 if stdin else 1.0))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            msg["received"] = time.monotonic()
            if msg["msg_type"] == "status":
                if msg["content"]["execution_state"] == "idle":
                    break
            else:
                cell.messages.append(msg)
        while not cell.reply:
            try:
                reply = self.kc.shell_channel.get_msg(timeout=left())
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                cell.reply = reply
        return cell

    def value(self, expr: str):
        """Evaluate *expr* in the kernel and return its ``repr`` parsed back as a literal."""
        import ast

        cell = self.execute(f"print(repr({expr}))").ok()
        return ast.literal_eval(cell.stdout.strip())

    def value_in(self, options: str, expr: str):
        """Evaluate *expr* in a ``%%innamespace OPTIONS`` cell and return it as a literal."""
        import ast

        cell = self.execute(f"%%innamespace {options}\nprint(repr({expr}))").ok()
        return ast.literal_eval(cell.stdout.strip())

    def control(self, kind: str, content: dict, timeout: float = 30) -> dict:
        """Send a control request (e.g. ``create_subshell_request``) and return its reply's content."""
        return self._request(self.kc.control_channel, self.kc.session.msg(kind, content), timeout)

    def execute_in_subshell(self, subshell: str, code: str, timeout: float = 60) -> dict:
        """Run *code* in an ipykernel subshell (a thread of its own) and return the reply's content."""
        msg = self.kc.session.msg("execute_request", {
            "code": code, "silent": False, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})
        msg["header"]["subshell_id"] = subshell
        return self._request(self.kc.shell_channel, msg, timeout)

    @staticmethod
    def _request(channel, msg: dict, timeout: float) -> dict:
        """Send *msg* on *channel* and return the content of the reply to it."""
        channel.send(msg)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = channel.get_msg(timeout=left)
            except queue.Empty:
                break
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return reply["content"]
        raise TimeoutError(f"no reply to {msg['msg_type']} in {timeout}s")

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
