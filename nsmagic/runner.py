"""The kernel's side of a run: pipes, the fork, the output pump, and stopping the child.

This module and those under it do not import IPython: :func:`run` and :func:`run_code` work in
any Python program. The magic (:mod:`nsmagic.magics`) is a thin layer on :func:`execute`.

One loop in the calling thread waits on everything the child can do: write to stdout or stderr,
send a frame (display data, a question for ``input()``, its report), or exit (a pidfd). Nothing
sleeps or polls on a timer, and the pipes are always drained, so a child printing 50 MB never
blocks on a full pipe while the kernel waits for something else.
"""

from __future__ import annotations

import codecs
import errno
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import explain, protocol, source, syscalls
from .child import Channel, Plan, two_stage
from .clone import pid_namespace_in_kernel, reaper, spawn
from .errors import CellTimeout, ChildDied, OptionError, PrivilegeError, ProtocolError, SetupError
from .outcome import Outcome, Result, capture, decode_report, rebuild
from .parts import annotate_all, build as build_parts, cleanup_all, prepare_all
from .protocol import FrameReader, Kind
from .spec import Namespaces
from .syscalls import CAP_SYS_ADMIN, CloneFlag, advice, has_capability
from .values import Unpacker

_CHUNK = 1 << 16
#: poll(2) takes an int of milliseconds: a longer wait is made of several.
_POLL_MAX_MS = (1 << 31) - 1

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
        before and after a run, cost an empty cell about 1.3 ms)."""
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
        if not isinstance(name, str) or not name.isidentifier():
            raise OptionError(f"-o {name!r}: not a Python variable name")
        if name not in out:
            out.append(name)
    return out


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
    if timeout is not None and not 0 < timeout < float("inf"):
        raise OptionError(f"timeout must be a positive, finite number of seconds, not {timeout!r}")
    if not 0 <= grace < float("inf"):
        raise OptionError(f"grace must be a finite number of seconds from 0, not {grace!r}")
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


@dataclass
class _Pipe:
    read: int
    write: int


def _pipe() -> _Pipe:
    return _Pipe(*syscalls.pipe())


class _Run:
    """One child, from fork to reaping."""

    def __init__(self, job, spec: Namespaces, outputs: list[str], timeout, sinks: Sinks, grace: float,
                 namespace: dict | None, explain: bool = False):
        self.spec, self.outputs, self.sinks, self.grace = spec, outputs, sinks, grace
        self.namespace = namespace
        self.log = [] if explain else None
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.job = job
        self.parts = build_parts(spec)
        self.pid = 0
        self.pidfd = -1
        self.settled = False
        self.reaped = False
        self.reader = FrameReader()
        self.decoders = {}
        self.unpacker: Unpacker | None = None
        self.pushed = None  # a report whose pieces the child is writing into the memfd
        self.readied = False

    def run(self) -> Result:
        prepare_all(self.parts)
        opened: list[int] = []  # every fd of this run, closed at the end whatever happens
        try:
            out, err, ctl, ans = _pipe(), _pipe(), _pipe(), _pipe()
            opened += [out.read, out.write, err.read, err.write, ctl.read, ctl.write, ans.read, ans.write]
            memfd = syscalls.memfd("nsmagic-values")
            opened.append(memfd)
            # What the kernel can set up goes before the fork: after it, each page the kernel
            # writes is copied first, while the new child may be waiting for the CPU. The
            # system calls keep the GIL (see nsmagic.syscalls).
            self.out, self.err, self.ctl, self.ans = out.read, err.read, ctl.read, ans.write
            for fd in (self.out, self.err, self.ctl):
                syscalls.set_nonblocking(fd)
            self.decoders = {
                out.read: (codecs.getincrementaldecoder("utf-8")("replace"), self.sinks.stdout),
                err.read: (codecs.getincrementaldecoder("utf-8")("replace"), self.sinks.stderr),
            }
            self.unpacker = Unpacker(memfd, self.namespace)
            plan = Plan(
                spec=self.spec, job=self.job, outputs=self.outputs, kernel_pid=os.getpid(),
                pid_done=pid_namespace_in_kernel(self.spec), stdout=out.write, stderr=err.write,
                control=ctl.write, answers=ans.read, memfd=memfd, uid=os.geteuid(), gid=os.getegid(),
                namespace=self.namespace, parts=self.parts, explain=self.log is not None,
            )
            spawn(plan, self.log, started=self._started)
            self.pidfd = os.pidfd_open(self.pid)
            opened.append(self.pidfd)
            for fd in (out.write, err.write, ctl.write, ans.read):  # the child's ends
                opened.remove(fd)
                os.close(fd)
            report = self._pump()
            result = rebuild(report, self.unpacker, self.pid)
            if result.error is not None:
                annotate_all(self.parts, result.error)
            return result
        except KeyboardInterrupt:
            self._stop(signal.SIGINT)
            raise
        except BaseException:
            self._stop(signal.SIGKILL)
            raise
        finally:
            self._flush_decoders()
            self.sinks.flush()
            for fd in opened:
                os.close(fd)
            if not self.pid:  # no child was made: nothing will clean up after it
                cleanup_all(self.parts)

    def _started(self, pid: int) -> None:
        """Called by spawn() the moment the child exists, so an interrupt cannot lose it."""
        self.pid = pid

    # -- the pump ---------------------------------------------------------------------------

    def _pump(self):
        poller = select.poll()
        for fd in (self.out, self.err, self.ctl, self.pidfd):
            poller.register(fd, select.POLLIN)
        while True:
            wait_ms = -1
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    self._stop(signal.SIGINT)
                    raise CellTimeout(
                        f"the cell ran longer than its timeout of {self.timeout:g}s, so its child "
                        f"(pid {self.pid}) and everything in its namespaces were killed"
                    )
                wait_ms = min(max(1, int(left * 1000)), _POLL_MAX_MS)
            events = poller.poll(wait_ms)
            # Streams first: what the child wrote before a frame must be shown before it.
            for fd, _ in sorted(events, key=lambda e: e[0] in (self.ctl, self.pidfd)):
                if fd in self.decoders:
                    if not self._read_stream(fd):
                        poller.unregister(fd)
                elif fd == self.ctl:
                    data = self._read(self.ctl)
                    if data == b"":
                        poller.unregister(self.ctl)
                        self.reader.eof()
                        continue
                    report = self._frames(data)
                    if report is not None:
                        return report
                elif fd == self.pidfd:
                    report = self._child_exited()
                    if report is not None:
                        return report

    def _read(self, fd: int) -> bytes | None:
        try:
            return os.read(fd, _CHUNK)
        except BlockingIOError:
            return None

    def _read_stream(self, fd: int) -> bool:
        """Pass on what is in one stream pipe; False at end of file."""
        data = self._read(fd)
        if data is None:
            return True
        if not data:
            return False
        decoder, sink = self.decoders[fd]
        text = decoder.decode(data)
        if text:
            sink(text)
        return True

    def _drain_streams(self) -> None:
        for fd in list(self.decoders):
            while True:
                data = self._read(fd)
                if not data:
                    break
                decoder, sink = self.decoders[fd]
                text = decoder.decode(data)
                if text:
                    sink(text)

    def _flush_decoders(self) -> None:
        for decoder, sink in self.decoders.values():
            text = decoder.decode(b"", final=True)
            if text:
                sink(text)

    def _frames(self, data: bytes):
        # The order rule: READY once (only if a part needs the host); after a DONE whose pieces
        # must be pushed, only PUSHED; DONE, PUSHED and SETUP_FAILED are final, and nothing may
        # follow a final frame. Any breach is a ProtocolError, and run() then kills the child.
        frames = self.reader.feed(data)
        for i, (kind, payload) in enumerate(frames):
            self._drain_streams()
            if self.pushed is not None and kind is not Kind.PUSHED:
                raise ProtocolError(f"the child sent {kind.name} while it should be writing its values; "
                                    "the pipe was written by something else, and the cell was stopped")
            if kind is Kind.DONE:
                report = decode_report(payload, self.outputs)
                if report.parked is not None and not self._fetch(report.parked):
                    self.pushed = report
                    continue
                return self._final(report, frames[i + 1:])
            if kind is Kind.PUSHED:
                if self.pushed is None:
                    raise ProtocolError("the child sent PUSHED out of order; the cell was stopped")
                return self._final(self.pushed, frames[i + 1:])
            if kind is Kind.SETUP_FAILED:
                error = _setup_error(*protocol.parse_setup_record(payload))
                self._final(None, frames[i + 1:])
                raise error
            if kind is Kind.READY:
                if self.readied or not any(part.needs_host for part in self.parts):
                    raise ProtocolError("the child sent READY out of order; the cell was stopped")
                self.readied = True
                self._host_side()
            elif kind is Kind.EXPLAIN:
                self._explain(protocol.load(payload))
            elif kind is Kind.IOPUB:
                self.sinks.iopub(**protocol.load(payload))
                self._reply(b"")
            if kind is Kind.DISPLAY:
                msg = protocol.load(payload)
                self.sinks.display(msg["data"], msg["metadata"], msg["transient"], msg["update"])
                self._reply(b"")
            elif kind is Kind.CLEAR_OUTPUT:
                self.sinks.clear_output(protocol.load(payload))
                self._reply(b"")
            elif kind is Kind.INPUT:
                self._answer(*protocol.load(payload))
        return None

    def _final(self, report, rest: list):
        """The child's last word: nothing may follow it."""
        if rest or self.reader.pending():
            raise ProtocolError(f"the child sent more after its final report ({rest[0][0].name if rest else 'part of a message'}); "
                                "the pipe was written by something else, and the cell was stopped")
        self._settle()
        return report

    def _fetch(self, parked) -> bool:
        """Copy the child's large pieces straight out of its memory, then let it go; False if
        it must write them into the memfd instead (it has been asked to)."""
        try:
            pulled = self.unpacker.pull(self._worker_pid(), parked)
        except BaseException:
            self._reply(b"")  # interrupted: the child need not wait, and is stopped anyway
            raise
        self._reply(b"" if pulled else b"push")
        return pulled

    def _worker_pid(self) -> int:
        """The pid, here, of the process that ran the job: the child, or its only child."""
        if not two_stage(self.spec, pid_namespace_in_kernel(self.spec)):
            return self.pid
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return -1  # unknown: process_vm_readv fails, and the child pushes instead

    def _host_side(self) -> None:
        """The child has made its namespaces and waits: do the parts' kernel-side work."""
        try:
            for part in self.parts:
                if part.needs_host:
                    part.host(self.pid)
        except BaseException:
            self._reply(b"no")
            raise
        self._reply(b"")

    def _explain(self, report: dict) -> None:
        calls = list(self.log)
        for where, call in report["calls"]:
            calls.append((where, call, explain.why(call)))
        for part in self.parts:
            calls += [("kernel", line, "") for line in part.explain()]
        self.sinks.explain(explain.Explanation(
            calls=calls, kernel=explain.inodes(), cell=report["inodes"], cell_ids=report["ids"],
            kernel_view_pid=self.pid, joined=set(self.spec.join)))
        self._reply(b"")

    def _answer(self, prompt: str, password: bool) -> None:
        self.sinks.flush()
        try:
            reply = (True, self.sinks.input(prompt, password))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            reply = (False, f"input() is not available here: {type(e).__name__}: {e}")
        self._reply(protocol.dumps(reply))

    def _reply(self, payload: bytes) -> None:
        try:
            protocol.send(self.ans, Kind.ANSWER, payload)
        except BrokenPipeError:  # the child is gone; its exit is noticed by the pidfd
            pass

    def _child_exited(self):
        """The pidfd fired. A report sent just before the exit is still in the pipe."""
        while True:
            data = self._read(self.ctl)
            if not data:
                if data == b"":
                    self.reader.eof()  # died in the middle of a frame: a ProtocolError
                break
            report = self._frames(data)
            if report is not None:
                return report
        self._drain_streams()
        self.settled = True
        self._signal(signal.SIGKILL)  # what it started ends with it (the zombie holds the group's id)
        status = self._reap()
        reasons = [r for r in (p.exit_reason(status) for p in self.parts) if r]
        raise ChildDied(self.pid, status, reasons[0] if reasons else None)

    def _settle(self) -> None:
        """The child has said its last word: let the reaper wait for its teardown, and then
        clean up after it."""
        if not self.settled:
            self.settled = True
            self._leave_to_reaper()

    def _leave_to_reaper(self) -> None:
        reaper.reap(self.pid, lambda: cleanup_all(self.parts) if self.parts else None)

    def _reap(self) -> int:
        """Wait for the child here, then clean up after it; its wait status."""
        try:
            _, status = os.waitpid(self.pid, 0)
            self.reaped = True
        finally:
            cleanup_all(self.parts)
        return status

    # -- stopping -----------------------------------------------------------------------------

    def _stop(self, first: int) -> None:
        """Stop the child and everything in its namespaces, then reap it.

        PID 1 of a PID namespace ignores signals it has no handler for, but the child keeps
        Python's SIGINT handler, so SIGINT first lets the cell's ``finally`` blocks run; after
        the grace period, SIGKILL, which always works and takes the whole namespace with it,
        though only once the child is out of the kernel: one stuck in an uninterruptible call
        (a dead NFS server, a frozen cgroup) is left to the reaper after :data:`KILL_WAIT`
        seconds, so that the kernel goes on.
        """
        if self.settled or not self.pid:
            return
        self.settled = True
        if self.pidfd < 0:  # interrupted between fork and the pump: it has run nothing yet
            self._signal(signal.SIGKILL)
            self._reap()
            return
        try:
            if first == signal.SIGINT and self.grace > 0:
                self._signal(signal.SIGINT)
                if self._wait_exit(self.grace):
                    return
            self._signal(signal.SIGKILL)
            if not self._wait_exit(KILL_WAIT):
                self._leave_to_reaper()
        except KeyboardInterrupt:  # interrupted again while waiting: no more waiting here
            if not self.reaped:
                self._signal(signal.SIGKILL)
                self._leave_to_reaper()
            raise

    def _signal(self, sig: int) -> None:
        """Signal the child's process group (itself and what it started), once."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:  # not yet (or no longer) a group leader
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def _wait_exit(self, seconds: float) -> bool:
        """Wait for the child's exit, still passing on its output; reap it and say if it went."""
        end = time.monotonic() + seconds
        poller = select.poll()
        for fd in (self.out, self.err, self.ctl, self.pidfd):
            poller.register(fd, select.POLLIN)
        while (left := end - time.monotonic()) > 0:
            for fd, _ in poller.poll(min(max(1, int(left * 1000)), _POLL_MAX_MS)):
                if fd == self.pidfd:
                    self._drain_streams()
                    self._reap()
                    return True
                if fd in self.decoders:
                    if not self._read_stream(fd):
                        poller.unregister(fd)
                elif fd == self.ctl and self._read(self.ctl) == b"":
                    poller.unregister(self.ctl)
        return False


def _setup_error(step: str, err: int, message: str) -> Exception:
    text = f"{step} failed: {message}"
    exc = PrivilegeError(text) if err in (errno.EPERM, errno.EACCES) else SetupError(text)
    exc.errno = err
    return exc
