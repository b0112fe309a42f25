"""Boxes: containers that live across cells, as warden keeps its containers.

A :class:`Box` is a child made by the same fork-with-namespaces as a one-shot cell, with all its
options, that stays alive after its first cell and runs later cells sent to it (its process runs
:mod:`nsmagic.boxloop`). It keeps its own Python globals: it starts as a copy of the kernel, and
after that the kernel's variables reach it only when sent (``inputs``, ``--in``) and its values
come back only when named (``-o``), as for one-shot cells. The kernel's side of each cell is the
one-shot run's: the same child handle, poll loop and frame dispatch (:mod:`nsmagic.handle`,
:mod:`nsmagic.pump`, :mod:`nsmagic.dispatch`).

Between cells no loop of the kernel's runs for the box, yet its background threads and processes
keep writing and may end: a watcher thread (:class:`_Watcher`) keeps its stream pipes drained
into a bounded backlog, shown at the box's next cell, and notices when the box's process ends.

Channels: the box's streams and control frames come through pipes, as a one-shot child's; the
kernel's side (cells, answers) goes through a Unix socket, because each cell carries a fresh
memfd for its large values (SCM_RIGHTS): a value the kernel has mapped from one cell's memfd
must never change when a later cell writes values.

This module does not import IPython: ``with Box(Namespaces(net=True)) as box: box.run(f)`` works
in any Python program.
"""

from __future__ import annotations

import atexit
import collections
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import fields
from typing import Any, Callable

import cloudpickle

from . import source, syscalls
from .boxloop import Executor, Request, Serve, receive_namespaces, send_run
from .child import PATIENCE, Plan, held_by_kernel, needs_undumpable, two_stage
from .clone import pid_namespace_in_kernel, spawn
from .dispatch import Conversation
from .errors import BoxDied, CellTimeout, OptionError, ProtocolError
from .handle import Child
from .outcome import Result, capture, rebuild
from .environment import annotate_all, build as build_parts, cleanup_all, exit_reason, host_side, needs_host, prepare_all
from .protocol import Kind
from .pump import Pump, StreamDecoder, read_some
from .runner import (Sinks, check_outputs, check_privileges, check_waits, child_of, explanation, open_pipes,
                     stop, worker_pid)
from .spec import Namespaces
from .values import Unpacker

#: Characters of a box's output kept between cells; beyond that the oldest are dropped.
BACKLOG = 1 << 20

IDLE, RUNNING, DEAD = "idle", "running a cell", "dead"


def library_executor(namespace: dict) -> Executor:
    """How a library box runs a request: code in its own globals, or a pickled call."""

    def execute(request: Request, channel) -> Any:
        if request.inputs is not None:
            namespace.update(pickle.loads(request.inputs))
        if request.kind == "code":
            return source.run_prepared(source.loads(request.payload), namespace)
        func, args, kwargs = pickle.loads(request.payload)
        return capture(func, *args, **kwargs)

    return execute


class Box:
    """A long-lived child with its own namespaces and Python state, that runs many cells.

    ``Box(Namespaces(net=True, pid=True))`` starts it (its namespaces made, its environment set
    up); :meth:`run` calls a function in it, :meth:`run_code` runs a code string as a cell (its
    variables stay for the next one); :meth:`stop` ends it and everything in it, and removes
    its links, cgroup and mounts. Usable as a context manager.
    """

    def __init__(self, namespaces: Namespaces | None = None, *, name: str | None = None,
                 globals: dict | None = None, sinks: Sinks | None = None, grace: float = 1.0,
                 timeout: float | None = None, explain: bool = False,
                 executor: Executor | None = None):
        self.spec = namespaces or Namespaces()
        self.name = name or _free_name()
        if get(self.name) is not None:
            raise OptionError(f"there is already a box named {self.name!r}")
        check_waits(timeout, grace)
        self.grace = grace
        self.state = IDLE
        self.death: str | None = None
        #: What using the box after its end raises.
        self.death_error: Exception | None = None
        self.created = time.monotonic()
        self.cells = 0
        self.sinks = sinks or Sinks()
        self.worker = -1
        self._globals = {"__name__": "__main__"} if globals is None else globals
        self._busy = threading.Lock()
        self._io = threading.Lock()  # who reads the pipes now: a cell, or the watcher
        self._backlog: collections.deque = collections.deque()
        self._backlog_size = self._dropped = 0
        self._conversation: Conversation | None = None
        self._started = False
        #: The box's namespaces, ``/proc`` name -> an fd of the kernel's (sent by the box).
        self.ns: dict[str, int] = {}
        #: Whether the box's process is undumpable (child.needs_undumpable): then only root may
        #: open its /proc/PID files, and the kernel uses :attr:`ns` instead.
        self.undumpable = needs_undumpable(self.spec)
        check_privileges(self.spec)
        self.parts = build_parts(self.spec)
        self._start(executor or library_executor(self._globals), timeout, explain)

    # -- start ----------------------------------------------------------------------------------

    def _start(self, executor: Executor, timeout: float | None, explain: bool) -> None:
        prepare_all(self.parts)
        self.child: Child | None = None
        self._kernel_fds: list[int] = []
        log = [] if explain else None
        child_fds: list[int] = []
        try:
            (out_r, out_w), (err_r, err_w), (ctl_r, ctl_w) = open_pipes(3)
            self._commands, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._kernel_fds = [out_r, err_r, ctl_r, self._commands.fileno()]
            child_fds = [out_w, err_w, ctl_w, theirs.detach()]
            for fd in (out_r, err_r, ctl_r):
                syscalls.set_nonblocking(fd)
            held_by_kernel.update(self._kernel_fds)  # no child of the kernel keeps them open
            streams = {out_r: StreamDecoder(lambda text: self._output("stdout", text)),
                       err_r: StreamDecoder(lambda text: self._output("stderr", text))}
            self.streams = [out_r, err_r]
            self._conversation = Conversation(
                self.sinks, self._commands.fileno(), None, lambda: self.worker,
                host_side=self._host_side if needs_host(self.parts) else None,
                explain=(lambda report: self.sinks.explain(
                    explanation(log, report, self.parts, self.child.pid, self.spec))) if explain else None,
                extra={Kind.STARTED: self._on_started})
            plan = Plan(
                spec=self.spec, job=Serve(executor, self.undumpable), outputs=[], kernel_pid=os.getpid(),
                pid_done=pid_namespace_in_kernel(self.spec), stdout=out_w, stderr=err_w, control=ctl_w,
                answers=child_fds[3], memfd=-1, uid=os.geteuid(), gid=os.getegid(), parts=self.parts,
                explain=explain,
            )
            spawn(plan, log, started=self._forked)
            self.child.watch()
            for fd in child_fds:
                os.close(fd)
            child_fds = []
            self.pump = Pump(streams, ctl_r, self._on_frame, self.child.pidfd)
            deadline = None if timeout is None else time.monotonic() + timeout
            if not self.pump.run(lambda: self._started or self.pump.exited, deadline):
                raise CellTimeout(f"box {self.name!r} was not set up within {timeout:g}s, so it was killed")
            if not self._started:
                self.child.signal(signal.SIGKILL)
                status = self.child.reap()
                self._close()
                raise BoxDied(self.name, self.child.pid, status, exit_reason(self.parts, status), starting=True)
            self.state = IDLE
            _registry_add(self)
            _watcher.watch(self)
        except BaseException:
            for fd in child_fds:
                os.close(fd)
            if self.child is not None and not self.child.done:
                self._kill()
            elif self.child is None:
                cleanup_all(self.parts)
            self._close()
            raise
        finally:
            self.sinks.flush()

    def _forked(self, pid: int) -> None:
        self.child = child_of(pid, self.parts)

    def _host_side(self) -> None:
        host_side(self.parts, self.child.pid)

    def _on_started(self, payload: bytes) -> None:
        if self._started:
            raise ProtocolError(f"box {self.name!r} said twice that it started")
        self.ns = receive_namespaces(self._commands)  # sent just before STARTED
        self._kernel_fds += self.ns.values()
        held_by_kernel.update(self.ns.values())
        self._started = True
        self.worker = worker_pid(self.child.pid, two_stage(self.spec, pid_namespace_in_kernel(self.spec)))

    def _on_frame(self, kind: Kind, payload: bytes) -> None:
        if self._conversation is None:
            raise ProtocolError(f"box {self.name!r} sent a {kind.name} frame between cells")
        self._conversation(kind, payload)

    # -- cells ----------------------------------------------------------------------------------

    def run(self, func: Callable, *args, timeout: float | None = None, **kwargs) -> Any:
        """Call ``func(*args, **kwargs)`` in the box and return its value (its exception is
        raised here as itself). *func* and its arguments are pickled (cloudpickle) into the box."""
        payload = cloudpickle.dumps((func, args, kwargs))
        result = self.execute(Request("call", payload), timeout=timeout,
                              namespace=getattr(func, "__globals__", None))
        result.raise_for_errors()
        return result.value

    def run_code(self, code: str, *, inputs: dict | None = None, outputs=(), timeout: float | None = None,
                 filename: str | None = None) -> Result:
        """Run a code string in the box's globals, like a cell: its variables stay for the next
        one. *inputs* are set there first; the variables named in *outputs* come back."""
        filename = filename or f"<{self.name}-{self.cells + 1}>"
        prepared = source.prepare(code, filename=filename)
        result = self.execute(self.request(prepared, code, inputs=inputs, outputs=outputs), timeout=timeout,
                              namespace=self._globals)
        result.raise_for_errors()
        return result

    @staticmethod
    def request(prepared, shown_source: str, *, inputs: dict | None = None, outputs=(),
                explain: bool = False) -> Request:
        """A request to run compiled code (see :mod:`nsmagic.source`) in a box."""
        return Request("code", source.dumps(prepared, shown_source),
                       inputs=cloudpickle.dumps(inputs) if inputs else None,
                       outputs=check_outputs(outputs), explain=explain)

    def execute(self, request: Request, *, timeout: float | None = None, sinks: Sinks | None = None,
                namespace: dict | None = None) -> Result:
        """Run one request in the box and bring back its :class:`~nsmagic.outcome.Result`; the
        cell's own exception is in the result, not raised. A timeout or an interrupt stops the
        cell and leaves the box alive, unless it does not stop within the grace period."""
        check_waits(timeout, self.grace)
        if not self._busy.acquire(blocking=False):
            raise OptionError(f"box {self.name!r} is running another cell; a box runs one cell at a time")
        try:
            self._check_alive()
            return self._execute(request, timeout, sinks, namespace)
        finally:
            self._busy.release()

    def _execute(self, request: Request, timeout, sinks, namespace) -> Result:
        _watcher.unwatch(self)
        self._check_alive()  # it may have ended while the watcher had it
        self.sinks = sinks or Sinks()
        self.state = RUNNING
        self.cells += 1
        self._show_backlog()
        memfd = syscalls.memfd("nsmagic-values")
        unpacker = Unpacker(memfd, namespace)
        conversation = self._conversation = Conversation(
            self.sinks, self._commands.fileno(), unpacker, lambda: self.worker, outputs=request.outputs,
            explain=self._explain_cell if request.explain else None)
        over = lambda: conversation.report is not None or self.pump.exited  # noqa: E731
        try:
            send_run(self._commands, pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL), memfd)
            finished = True
            try:
                finished = self.pump.run(over, None if timeout is None else time.monotonic() + timeout)
            except KeyboardInterrupt:
                self._interrupt(conversation, None)
            if not finished:
                self._interrupt(conversation, timeout)
            if conversation.report is None:
                self._died_in_cell()
            result = rebuild(conversation.report, unpacker, self.worker)
            if result.error is not None:
                annotate_all(self.parts, result.error)
            return result
        except ProtocolError:
            self._kill()
            raise
        finally:
            self._conversation = None
            os.close(memfd)
            self.sinks.flush()
            if self.state is RUNNING:
                self.state = IDLE
                _watcher.watch(self)

    def _explain_cell(self, report: dict) -> None:
        self.sinks.explain(explanation([], report, [], self.child.pid, self.spec))

    def _interrupt(self, conversation: Conversation, timeout: float | None) -> None:
        """Stop the running cell with SIGINT to the box's process alone (its background
        processes are not the cell's); kill the box only if the cell does not stop in time."""
        if self.worker > 0:  # never -1: kill(-1) would signal every process this user may
            try:
                os.kill(self.worker, signal.SIGINT)
            except ProcessLookupError:
                pass
        over = lambda: conversation.report is not None or self.pump.exited  # noqa: E731
        try:
            self.pump.run(over, time.monotonic() + self.grace)
        except KeyboardInterrupt:  # interrupted again: no more waiting
            self._kill()
            raise
        what = "interrupted" if timeout is None else f"ran longer than its timeout of {timeout:g}s"
        if conversation.report is not None:
            if timeout is None:
                raise KeyboardInterrupt
            raise CellTimeout(f"the cell {what} and was stopped; box {self.name!r} is still running, "
                              "with its state")
        if self.pump.exited:
            self._died_in_cell()
        self._kill()
        message = (f"the cell {what}, and box {self.name!r} did not stop within the grace period of "
                   f"{self.grace:g}s, so the box and everything in it were killed")
        if timeout is None:
            self.sinks.stderr(f"nsmagic: {message}\n")
            raise KeyboardInterrupt
        raise CellTimeout(message)

    def _died_in_cell(self):
        self.child.signal(signal.SIGKILL)
        status = self.child.reap()
        self._ended(BoxDied(self.name, self.child.pid, status, exit_reason(self.parts, status)))
        forget(self)
        raise self.death_error

    def _check_alive(self) -> None:
        if self.state is DEAD:
            forget(self)
            raise self.death_error

    # -- output between cells -------------------------------------------------------------------

    def _output(self, stream: str, text: str) -> None:
        if self.state is RUNNING:
            (self.sinks.stdout if stream == "stdout" else self.sinks.stderr)(text)
            return
        self._backlog.append((stream, text))
        self._backlog_size += len(text)
        while self._backlog_size > BACKLOG and len(self._backlog) > 1:
            _, old = self._backlog.popleft()
            self._backlog_size -= len(old)
            self._dropped += len(old)

    def _show_backlog(self) -> None:
        if self._dropped:
            self.sinks.stderr(f"[nsmagic: {self._dropped} characters that box {self.name!r} wrote "
                              "between cells were dropped; the latest follow]\n")
        shown = bool(self._backlog)
        while self._backlog:
            stream, text = self._backlog.popleft()
            (self.sinks.stdout if stream == "stdout" else self.sinks.stderr)(text)
        self._backlog_size = self._dropped = 0
        if shown:  # before the cell's own output, which may go to the other stream
            self.sinks.flush()

    # -- the end ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """End the box and everything in it; its links, cgroup and mounts are removed.

        The box is asked first (the kernel closes its end of the box's socket): it ends what its
        cells left running, as a one-shot child does, and exits; after the grace period, SIGKILL
        to its process group, which ends it and, with ``-p``, its whole PID namespace."""
        with self._busy:
            _watcher.unwatch(self)
            if self.state is DEAD:  # ended by itself (reported at its next use) or stopped
                forget(self)
                return
            self.state = DEAD
            self.death = "stopped"
            self.death_error = OptionError(f"box {self.name!r} was stopped; make a new one (in a notebook, "
                                           f"a cell with --name {self.name} and its options)")
            try:
                self._commands.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if self.child.wait(self.grace + PATIENCE):  # its sweep waits PATIENCE at most
                self.child.reap()
            else:
                stop(self.child, None, None, signal.SIGKILL, 0)
            self._close()
            forget(self)

    def _kill(self) -> None:
        """SIGKILL the box (its group; with -p its PID namespace) and clean up after it."""
        _watcher.unwatch(self)
        stop(self.child, None, None, signal.SIGKILL, 0)
        status = self.child.status
        if self.state is not DEAD:
            self._ended(BoxDied(self.name, self.child.pid, status if status is not None else signal.SIGKILL,
                                "killed by nsmagic"))
        self._close()
        forget(self)

    def _ended(self, error: BoxDied) -> None:
        self.state = DEAD
        self.death = error.how
        self.death_error = error
        self._close()

    def _ended_while_idle(self) -> None:
        """The watcher saw the box's process end between cells."""
        self.pump.drain_streams()
        status = self.child.reap()
        self._ended(BoxDied(self.name, self.child.pid, status, exit_reason(self.parts, status), idle=True))

    def _close(self) -> None:
        for fd in self._kernel_fds:
            held_by_kernel.discard(fd)
        fds, self._kernel_fds = self._kernel_fds, []
        commands = getattr(self, "_commands", None)
        for fd in fds:
            if commands is not None and fd == commands.fileno():
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        if commands is not None:
            commands.close()
        if self.child is not None:
            self.child.close()

    def __enter__(self) -> "Box":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def ns_path(self, kind: str) -> str:
        """A path the kernel may open for the box's namespace *kind* (``net``, ``uts``...)."""
        return f"/proc/{os.getpid()}/fd/{self.ns[kind]}"

    def __repr__(self) -> str:
        return f"<Box {self.name!r} pid {self.worker} {self.state} ({self.spec.describe()})>"


_serial = iter(range(1, 1 << 62))


def _free_name() -> str:
    while True:
        name = f"box-{next(_serial)}"
        if get(name) is None:
            return name

# -- the boxes of this process ------------------------------------------------------------------

_boxes: dict[str, Box] = {}
_owner = os.getpid()


def boxes() -> dict[str, Box]:
    """The boxes this process made, by name (a forked child sees none of its parent's)."""
    if _owner != os.getpid():
        return {}
    return _boxes


def get(name: str) -> Box | None:
    return boxes().get(name)


def _registry_add(box: Box) -> None:
    global _owner
    if _owner != os.getpid():
        _boxes.clear()
        _owner = os.getpid()
    if box.name in _boxes and _boxes[box.name] is not box:
        raise OptionError(f"there is already a box named {box.name!r}")
    _boxes[box.name] = box


def conflicts(given: Namespaces, made: Namespaces) -> list[str]:
    """The options of *given* (a later cell's) that differ from those a box was *made* with;
    options a later cell leaves out are not differences."""
    default = Namespaces()
    out = []
    for f in fields(Namespaces):
        value = getattr(given, f.name)
        if value != getattr(default, f.name) and value != getattr(made, f.name):
            out.append(_spelled(f.name, value))
    return out


def _spelled(field_name: str, value) -> str:
    option = "--" + field_name.replace("_", "-")
    if field_name == "join":
        return " ".join(f"--join-{kind} {target}" for kind, target in value.items())
    if value is True:
        return option
    if isinstance(value, list):
        return " ".join(f"{option} {v}" for v in value)
    return f"{option} {value}"


def forget(box: Box) -> None:
    """Free the name of a box that has ended."""
    if _owner == os.getpid() and _boxes.get(box.name) is box:
        del _boxes[box.name]


def stop_all() -> None:
    """Stop every box of this process (at the kernel's exit, and ``%nsstop --all``)."""
    for box in list(boxes().values()):
        try:
            box.stop()
        except Exception:
            pass


@atexit.register
def _stop_all_at_exit() -> None:
    if _owner == os.getpid():
        stop_all()


class _Watcher:
    """One thread that keeps idle boxes' streams drained and notices their end.

    A box's pipes are read by exactly one thread at a time: by the cell's loop while a cell runs
    (:meth:`unwatch` takes them over, waiting for the watcher to finish what it is doing with
    them), and by this thread between cells."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = 0
        self._fds: dict[int, Box] = {}

    def watch(self, box: Box) -> None:
        with self._lock:
            if self._owner != os.getpid():  # first use, or a forked child holding its parent's
                self._epoll = select.epoll()
                self._fds = {}
                self._owner = os.getpid()
                threading.Thread(target=self._run, args=(self._epoll,), name="nsmagic-boxes", daemon=True).start()
            for fd in (*box.streams, box.child.pidfd):
                self._fds[fd] = box
                self._epoll.register(fd, select.EPOLLIN)

    def unwatch(self, box: Box) -> None:
        with box._io:  # the watcher is not in the middle of reading the box's pipes
            self._forget(box)

    def _run(self, epoll) -> None:
        while True:
            try:
                events = epoll.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                with self._lock:
                    box = self._fds.get(fd)
                if box is None:
                    continue
                with box._io:
                    with self._lock:
                        if self._fds.get(fd) is not box:  # taken over by a cell meanwhile
                            continue
                    try:
                        self._handle(box, fd)
                    except Exception as e:  # one box's trouble must not stop the thread for all
                        self._forget(box)
                        print(f"nsmagic: stopped watching box {box.name!r} between cells: {e}", file=sys.stderr)

    def _handle(self, box: Box, fd: int) -> None:
        if fd == box.child.pidfd:
            self._forget(box)
            box._ended_while_idle()
            return
        data = read_some(fd)
        if data:
            box.pump.streams[fd].feed(data)
        elif data == b"":
            with self._lock:
                self._fds.pop(fd, None)
                self._epoll.unregister(fd)

    def _forget(self, box: Box) -> None:
        with self._lock:
            if self._owner != os.getpid():
                return
            for fd in [fd for fd, b in self._fds.items() if b is box]:
                del self._fds[fd]
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass


_watcher = _Watcher()
