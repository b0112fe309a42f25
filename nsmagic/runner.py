"""The kernel's side of a run: pipes, the fork, the output pump, and stopping the child.

This module and those under it do not import IPython: :func:`run` and :func:`run_code` work in
any Python program. The magic (:mod:`nsmagic.magics`) is a thin layer on :func:`execute`.

A run is made of four pieces, each in its own module so that boxes (long-lived children that
run many cells, :mod:`nsmagic.box`) use the same ones: the child handle (:mod:`nsmagic.handle`),
the loop that passes on its streams and frames (:mod:`nsmagic.pump`), what each frame means
(:mod:`nsmagic.dispatch`), and the stop ladder (:func:`stop`).
"""

from __future__ import annotations

import errno
import keyword
import os
import signal
import sys
import time
from typing import Any, Callable

from . import explain, source, syscalls
from .child import Channel, Plan, two_stage
from .clone import pid_namespace_in_kernel, spawn
from .dispatch import Conversation
from .errors import CellTimeout, ChildDied, OptionError, PrivilegeError, ProtocolError
from .handle import Child
from .outcome import Outcome, Result, capture, rebuild
from .environment import (annotate_all, build as build_parts, cleanup_all, exit_reason, host_side,
                          needs_host, prepare_all)
from .pump import Pump, StreamDecoder
from .spec import Namespaces
from .syscalls import CAP_SYS_ADMIN, CloneFlag, advice, has_capability
from .values import Unpacker

#: Seconds the kernel waits for a SIGKILLed child to end before it leaves it to the reaper.
KILL_WAIT = 5.0


class Sinks:
    """Where the child's output goes in the calling process.

    This default writes text to ``sys.stdout``/``sys.stderr`` (in a kernel, ipykernel's
    streams, so ``%%capture`` works as for any cell) and shows display data as its
    ``text/plain``; the magic's subclass publishes display data to the notebook instead.

    A stream is flushed after every :attr:`flush_every` characters: ipykernel's streams buffer
    until their next timed flush, and a child printing 50 MB would otherwise pile it all up in
    the kernel's memory. A flush waits for the kernel's IO thread, which is the back-pressure.
    """

    flush_every = 1 << 20
    _unflushed = 0  # class defaults: a subclass need not call __init__
    _written = False

    def _write(self, stream, text: str) -> None:
        stream.write(text)
        self._written = True
        self._unflushed += len(text)
        if self._unflushed >= self.flush_every:
            self._unflushed = 0
            stream.flush()

    def stdout(self, text: str) -> None:
        self._write(sys.stdout, text)

    def stderr(self, text: str) -> None:
        self._write(sys.stderr, text)

    def display(self, data: dict, metadata: dict, transient: dict, update: bool) -> None:
        if "text/plain" in data:
            self.stdout(str(data["text/plain"]) + "\n")

    def clear_output(self, wait: bool) -> None:
        pass

    def iopub(self, msg_type: str, content: dict, metadata: dict, ident, buffers: list) -> None:
        """Send a front-end message made in the child (only a kernel can)."""

    def explain(self, explanation) -> None:
        """Show an :class:`~nsmagic.explain.Explanation` (``--explain``)."""
        self.stdout(repr(explanation) + "\n")

    def input(self, prompt: str, password: bool) -> str:
        if password:
            import getpass
            return getpass.getpass(prompt)
        return input(prompt)

    def flush(self) -> None:
        """Flush what this run wrote, so that it is shown before anything published next.

        Only then: a flush of ipykernel's streams waits for its IO thread (stdout and stderr,
        before and after a run, would be most of an empty cell's cost)."""
        if not self._written:
            return
        self._written = False
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass


def check_outputs(names) -> list[str]:
    out = []
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise OptionError(f"-o {name!r}: not a Python variable name")
        if name not in out:
            out.append(name)
    return out


def check_waits(timeout: float | None, grace: float) -> None:
    """A timeout (None: none) must be a positive, finite number of seconds; a grace period a
    finite one from 0: every wait the kernel makes is bounded."""
    if timeout is not None and not 0 < timeout < float("inf"):
        raise OptionError(f"timeout must be a positive, finite number of seconds, not {timeout!r}")
    if not 0 <= grace < float("inf"):
        raise OptionError(f"grace must be a finite number of seconds from 0, not {grace!r}")


def child_of(pid: int, parts: list) -> Child:
    """The handle of a child just forked, whose clean-up undoes *parts*."""
    return Child(pid, cleanup=(lambda: cleanup_all(parts)) if parts else None)


def check_privileges(spec: Namespaces) -> None:
    """Refuse before forking what the kernel certainly may not do (bubblewrap's rule)."""
    needs_admin = spec.flags & ~CloneFlag.NEWUSER
    if needs_admin and not spec.user and "user" not in spec.join and not has_capability(CAP_SYS_ADMIN):
        raise PrivilegeError(f"{needs_admin.spelled()}: {advice(needs_admin, errno.EPERM, False)}")


def execute(
    job: Callable[[Channel], Outcome],
    spec: Namespaces | None = None,
    *,
    outputs=(),
    timeout: float | None = None,
    sinks: Sinks | None = None,
    grace: float = 1.0,
    namespace: dict | None = None,
    explain: bool = False,
) -> Result:
    """Run *job* in a forked child with the namespaces of *spec* and bring back what it made.

    The job is any callable; it is called in the child (a copy-on-write copy of this process,
    so it can use everything defined so far) with a :class:`~nsmagic.child.Channel` and returns
    an :class:`~nsmagic.outcome.Outcome`. Classes and functions of *namespace* (the job's
    globals) come back by reference, as the kernel's own objects. Raises :class:`PrivilegeError` or :class:`SetupError`
    if the namespaces could not be made, :class:`ChildDied` if the child ended without a report,
    :class:`CellTimeout` after *timeout* seconds, and ``KeyboardInterrupt`` if interrupted; in
    each case the child and everything in its namespaces have been killed and reaped.
    The job's own exception is not raised here: see :meth:`Result.raise_for_errors`.
    """
    spec = spec or Namespaces()
    outputs = check_outputs(outputs)
    check_waits(timeout, grace)
    check_privileges(spec)
    return _Run(job, spec, outputs, timeout, sinks or Sinks(), grace, namespace, explain).run()


def run(func: Callable, *args, namespaces: Namespaces | None = None, timeout: float | None = None,
        **kwargs) -> Any:
    """Call ``func(*args, **kwargs)`` in fresh namespaces and return its value.

    An exception raised by *func* is raised here as itself, with the child's traceback as its
    ``__cause__``. Output the child prints goes to this process's ``sys.stdout``/``sys.stderr``.
    """
    result = execute(lambda channel: capture(func, *args, **kwargs), namespaces, timeout=timeout,
                     namespace=getattr(func, "__globals__", None))
    result.raise_for_errors()
    return result.value


def run_code(code: str, namespaces: Namespaces | None = None, *, globals: dict | None = None,
             outputs=(), timeout: float | None = None, filename: str = "<nsmagic>") -> Result:
    """Execute a code string in fresh namespaces, like a cell: the value of its final expression
    comes back as ``Result.value``, and the variables named in *outputs* as ``Result.values``.

    *globals* (by default a fresh dict) is seen by the code but never changed in this process.
    A ``SyntaxError`` is raised before any child starts. The code's exception is raised here as
    itself; variables that could not come back raise
    :class:`~nsmagic.errors.OutputError` after the others arrived.
    """
    namespace = {} if globals is None else globals
    namespace.setdefault("__name__", "__main__")
    prepared = source.prepare(code, filename=filename)
    result = execute(lambda channel: source.run_prepared(prepared, namespace),
                     namespaces, outputs=outputs, timeout=timeout, namespace=namespace)
    result.raise_for_errors()
    return result


def open_pipes(count: int) -> list[tuple[int, int]]:
    """*count* close-on-exec pipes, ``(read, write)`` each."""
    return [syscalls.pipe() for _ in range(count)]


def stop(child: Child, pump: Pump, conversation: Conversation | None, first: int, grace: float) -> None:
    """Stop *child* and everything in its namespaces, passing on its output meanwhile.

    PID 1 of a PID namespace ignores signals it has no handler for, but the child keeps
    Python's SIGINT handler, so SIGINT first lets the cell's ``finally`` blocks run; after
    *grace* seconds, SIGKILL, which always works and takes the whole namespace with it, though
    only once the child is out of the kernel: one stuck in an uninterruptible call (a dead NFS
    server, a frozen cgroup) is left to the reaper after :data:`KILL_WAIT` seconds, so that the
    kernel goes on.
    """
    if child.done:
        return
    if child.pidfd < 0:  # interrupted between fork and the pump: it has run nothing yet
        child.signal(signal.SIGKILL)
        child.reap()
        return
    if pump is None:  # nothing of it to pass on
        child.signal(signal.SIGKILL)
        if child.wait(KILL_WAIT):
            child.reap()
        else:
            child.leave_to_reaper()
        return
    if conversation is not None:
        conversation.stopping = True
    exited = lambda: pump.exited  # noqa: E731
    try:
        if first == signal.SIGINT and grace > 0:
            child.signal(signal.SIGINT)
            if pump.run(exited, time.monotonic() + grace):
                child.reap()
                return
        child.signal(signal.SIGKILL)
        if pump.run(exited, time.monotonic() + KILL_WAIT):
            child.reap()
        else:
            child.leave_to_reaper()
    except KeyboardInterrupt:  # interrupted again while waiting: no more waiting here
        child.signal(signal.SIGKILL)
        child.leave_to_reaper()
        raise
    except ProtocolError:  # a garbled frame while stopping: it is being killed anyway
        child.signal(signal.SIGKILL)
        child.leave_to_reaper()


class _Run:
    """One one-shot child, from fork to reaping."""

    def __init__(self, job, spec: Namespaces, outputs: list[str], timeout, sinks: Sinks, grace: float,
                 namespace: dict | None, explain: bool = False):
        self.spec, self.outputs, self.sinks, self.grace = spec, outputs, sinks, grace
        self.namespace = namespace
        self.log = [] if explain else None
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.job = job
        self.parts = build_parts(spec)
        self.child: Child | None = None

    def run(self) -> Result:
        prepare_all(self.parts)
        opened: list[int] = []  # every fd of this run, closed at the end whatever happens
        pump = conversation = None
        try:
            (out_r, out_w), (err_r, err_w), (ctl_r, ctl_w), (ans_r, ans_w) = pipes = open_pipes(4)
            opened += [fd for pipe in pipes for fd in pipe]
            memfd = syscalls.memfd("nsmagic-values")
            opened.append(memfd)
            # What the kernel can set up goes before the fork: after it, each page the kernel
            # writes is copied first, while the new child may be waiting for the CPU. The
            # system calls keep the GIL (see nsmagic.syscalls).
            for fd in (out_r, err_r, ctl_r):
                syscalls.set_nonblocking(fd)
            streams = {out_r: StreamDecoder(self.sinks.stdout), err_r: StreamDecoder(self.sinks.stderr)}
            unpacker = Unpacker(memfd, self.namespace)
            conversation = Conversation(
                self.sinks, ans_w, unpacker, self._worker_pid, outputs=self.outputs,
                host_side=self._host_side if needs_host(self.parts) else None,
                explain=self._explain if self.log is not None else None)
            plan = Plan(
                spec=self.spec, job=self.job, outputs=self.outputs, kernel_pid=os.getpid(),
                pid_done=pid_namespace_in_kernel(self.spec), stdout=out_w, stderr=err_w,
                control=ctl_w, answers=ans_r, memfd=memfd, uid=os.geteuid(), gid=os.getegid(),
                namespace=self.namespace, parts=self.parts, explain=self.log is not None,
            )
            spawn(plan, self.log, started=self._started)
            opened.append(self.child.watch())
            for fd in (out_w, err_w, ctl_w, ans_r):  # the child's ends
                opened.remove(fd)
                os.close(fd)
            pump = Pump(streams, ctl_r, conversation, self.child.pidfd)
            if not pump.run(lambda: conversation.report is not None or pump.exited, self.deadline):
                stop(self.child, pump, conversation, signal.SIGINT, self.grace)
                raise CellTimeout(
                    f"the cell ran longer than its timeout of {self.timeout:g}s, so its child "
                    f"(pid {self.child.pid}) and everything in its namespaces were killed"
                )
            if conversation.report is None:
                self._died(pump)
            # The child has said its last word: the reaper waits for its teardown.
            self.child.leave_to_reaper()
            result = rebuild(conversation.report, unpacker, self.child.pid)
            if result.error is not None:
                annotate_all(self.parts, result.error)
            return result
        except KeyboardInterrupt:
            if self.child is not None:
                stop(self.child, pump, conversation, signal.SIGINT, self.grace)
            raise
        except BaseException:
            if self.child is not None:
                stop(self.child, pump, conversation, signal.SIGKILL, 0)
            raise
        finally:
            if pump is not None:
                pump.finish()
            self.sinks.flush()
            for fd in opened:
                os.close(fd)
            if self.child is None:  # no child was made: nothing will clean up after it
                cleanup_all(self.parts)

    def _started(self, pid: int) -> None:
        """Called by spawn() the moment the child exists, so an interrupt cannot lose it."""
        self.child = child_of(pid, self.parts)

    def _died(self, pump: Pump):
        """The child ended without a report: what it started ends with it (the zombie holds the
        group's id), and the parts say if they caused it."""
        self.child.signal(signal.SIGKILL)
        status = self.child.reap()
        raise ChildDied(self.child.pid, status, exit_reason(self.parts, status))

    def _worker_pid(self) -> int:
        """The pid, here, of the process that ran the job: the child, or its only child."""
        return worker_pid(self.child.pid, two_stage(self.spec, pid_namespace_in_kernel(self.spec)))

    def _host_side(self) -> None:
        """The child has made its namespaces and waits: do the parts' kernel-side work."""
        host_side(self.parts, self.child.pid)

    def _explain(self, report: dict) -> None:
        self.sinks.explain(explanation(self.log, report, self.parts, self.child.pid, self.spec))


def worker_pid(pid: int, two_stage: bool) -> int:
    """The pid, in the kernel's view, of the process that runs the cells: the child itself, or
    (two-stage: PID 1 of a namespace the child made) its only child; -1 if unknown."""
    if not two_stage:
        return pid
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1  # unknown: process_vm_readv fails, and the child pushes instead


def explanation(log: list | None, report: dict, parts: list, pid: int, spec: Namespaces) -> "explain.Explanation":
    """The ``--explain`` board: the kernel's calls, the child's steps, and both sides' namespaces."""
    calls = list(log or ())
    for where, call in report["calls"]:
        calls.append((where, call, explain.why(call)))
    for part in parts:
        calls += [("kernel", line, "") for line in part.explain()]
    return explain.Explanation(
        calls=calls, kernel=explain.inodes(), cell=report["inodes"], cell_ids=report["ids"],
        kernel_view_pid=pid, joined=set(spec.join))
