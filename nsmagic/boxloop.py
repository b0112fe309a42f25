"""What a box's process runs: a small daemon that waits for cells and runs them, one at a time.

This is warden's model (its ``wshd`` is the container's first process, which reaps orphans and
runs what it is sent), in Python: the box is made by the same fork-with-namespaces as a one-shot
cell (:mod:`nsmagic.child` sets it up), then, instead of running one job and exiting, it says
STARTED and serves RUN requests from the kernel until the kernel closes its end or the box is
killed. Its Python globals live on between cells: that is the point of a box.

Between cells the box ignores SIGINT (an interrupt meant for a cell that has just ended must
not kill the box) and reaps the children that ended, since it is the reaper of what its cells
started (PID 1 of its PID namespace, or a subreaper): a process a cell left running keeps
running, and one that ended does not stay a zombie. Cells run with Python's SIGINT handler, so
the kernel interrupts a cell by signalling this process alone (not its group: the box's own
background processes are not the cell's).
"""

from __future__ import annotations

import _signal
import os
import pickle
import signal
import socket
from dataclasses import dataclass, field
from typing import Callable

from . import protocol
from .child import Channel, explain_steps, send_report
from .outcome import Outcome, failed
from .kinds import KINDS
from .protocol import Kind
from .syscalls import set_undumpable


@dataclass
class Request:
    """One cell for a box, as the kernel sends it."""

    #: "code" (a compiled cell: nsmagic.source.dumps) or "call" (a pickled (func, args, kwargs)).
    kind: str
    payload: bytes
    #: Variables to set in the box's globals before the cell (``--in``): a cloudpickled dict.
    inputs: bytes | None = None
    #: Names to bring back (``-o``).
    outputs: list[str] = field(default_factory=list)
    explain: bool = False


#: Runs one request in the box: ``(request, channel) -> Outcome``.
Executor = Callable[[Request, Channel], Outcome]


class Serve:
    """The job of a box's process: serve cells until told to stop. Returns None, so that the
    child reports nothing more when it ends."""

    #: The box makes itself undumpable (child._seal_off's rule), but only once it has handed the
    #: kernel its namespaces: an unprivileged kernel may not open /proc/PID/ns/* of an
    #: undumpable process, and needs them for %nsls, %nslink and --join-KIND BOX.
    seals_itself = True

    def __init__(self, executor: Executor, undumpable: bool = False):
        self.executor = executor
        self.undumpable = undumpable

    def __call__(self, channel: Channel) -> None:
        commands = socket.socket(fileno=channel.answers)
        _signal.signal(signal.SIGINT, _signal.SIG_IGN)
        send_namespaces(commands)
        if self.undumpable:
            set_undumpable()
        protocol.send(channel.control, Kind.STARTED)
        try:
            while True:
                reap_ended()
                _signal.signal(signal.SIGCHLD, _reap_on_signal)  # while idle only: see reap_ended
                try:
                    got = receive_run(commands)
                finally:
                    _signal.signal(signal.SIGCHLD, _signal.SIG_DFL)
                if got is None:
                    return None  # the kernel closed its end: the box is stopped
                payload, memfd = got
                try:
                    request: Request = pickle.loads(payload)
                    if request.explain:
                        explain_steps(channel, [])
                    _signal.signal(signal.SIGINT, _signal.default_int_handler)
                    try:
                        outcome = self.executor(request, channel)
                    except BaseException as e:  # the request itself (its --in values, a pickled
                        outcome = failed(e)     # call that cannot load here): the cell's error
                    finally:
                        _signal.signal(signal.SIGINT, _signal.SIG_IGN)
                    send_report(channel, memfd, outcome, request.outputs, outcome.namespace)
                finally:
                    os.close(memfd)
        finally:
            commands.detach()  # the fd is the channel's; the child's exit closes it


def send_namespaces(commands: socket.socket) -> None:
    """Hand the kernel an fd of each of this process's namespaces, with their ``/proc`` names
    (SCM_RIGHTS): the box's namespaces, however its /proc may later be guarded."""
    names, fds = [], []
    try:
        for kind in KINDS:
            try:
                fds.append(os.open(f"/proc/self/ns/{kind.proc}", os.O_RDONLY | os.O_CLOEXEC))
                names.append(kind.proc)
            except OSError:  # a kind this Linux does not have
                pass
        socket.send_fds(commands, [" ".join(names).encode()], fds)
    finally:
        for fd in fds:
            os.close(fd)


def receive_namespaces(commands: socket.socket) -> dict[str, int]:
    """The kernel's side of :func:`send_namespaces`: ``/proc`` name -> fd."""
    data, fds, _, _ = socket.recv_fds(commands, 256, len(KINDS))
    names = data.decode("ascii", "replace").split()
    if len(names) != len(fds) or not set(names) <= {kind.proc for kind in KINDS}:
        for fd in fds:
            os.close(fd)
        raise protocol.ProtocolError("a box sent its namespaces garbled")
    return dict(zip(names, fds))


def receive_run(commands: socket.socket) -> tuple[bytes, int] | None:
    """Wait for the next RUN frame and the memfd sent with it; None when the kernel has closed
    its end."""
    while True:
        try:
            header, fds, _, _ = socket.recv_fds(commands, protocol.HEADER_SIZE, 1)
            break
        except InterruptedError:
            continue
    if not header:
        for fd in fds:
            os.close(fd)
        return None
    if len(header) < protocol.HEADER_SIZE:
        header += protocol.read_exact(commands.fileno(), protocol.HEADER_SIZE - len(header))
    kind, length = protocol.parse_header(header)
    if kind is not Kind.RUN or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise protocol.ProtocolError(f"a box expected a RUN frame with its memfd, not {kind!r}")
    return protocol.read_exact(commands.fileno(), length), fds[0]


def send_run(commands: socket.socket, payload: bytes, memfd: int) -> None:
    """The kernel's side of :func:`receive_run`: the header carries the memfd (SCM_RIGHTS)."""
    header = protocol.header(Kind.RUN, len(payload))
    sent = socket.send_fds(commands, [header], [memfd])
    if sent < len(header):
        commands.sendall(header[sent:])
    commands.sendall(payload)


def _reap_on_signal(signum, frame) -> None:
    reap_ended()


def reap_ended() -> None:
    """Collect every child of the box that has ended (orphans come to the box as their parents
    die), without waiting for the ones still running.

    Only between cells: during a cell, ``subprocess`` waits for its own children, and a child
    reaped here would look to it as if it had exited with status 0. For the same reason a
    ``Popen`` kept across cells and ended between them reports status 0: read its status in
    the cell that waits for it."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
