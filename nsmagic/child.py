"""What runs inside the child, from the instant after fork() to its ``os._exit``.

The child is a copy of the kernel: every variable is there, and so is ipykernel's machinery,
which must not be used. Its ``sys.stdout`` would try to send through a zmq socket that in a new
network namespace points at another loopback, and ``session.send`` from a fork is dropped. So
the first thing the child does, before anything can print, is point fds 0/1/2 at its own pipes
and rebind ``sys.stdout``/``sys.stderr``.

The child always ends in ``os._exit`` (as ``multiprocessing.popen_fork`` does): falling through
would make a second, confused kernel, and atexit handlers would delete the real kernel's files.
"""

from __future__ import annotations

import _signal
import builtins
import gc
import errno as errno_module
import getpass
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from . import protocol, sentinel, steps
from .explain import inodes
from .outcome import Outcome, make_report
from .plain import plain
from .proctree import children
from .protocol import Kind
from .spec import Namespaces
from .syscalls import set_child_subreaper, set_parent_death_signal, set_undumpable
from .values import Packer

#: Exit statuses of a child that could not even report (seen only if reporting itself failed).
EXIT_SETUP_FAILED = 121
EXIT_INTERNAL = 122


@dataclass
class Plan:
    """Everything the child needs, prepared by the kernel before the fork."""

    spec: Namespaces
    job: Callable[["Channel"], Outcome]
    outputs: list[str]
    kernel_pid: int
    pid_done: bool
    stdout: int
    stderr: int
    control: int
    answers: int
    memfd: int
    uid: int
    gid: int
    #: The namespace the job's code runs in, whose classes and functions travel back by reference.
    namespace: dict | None = None
    #: The environment's parts (see nsmagic.environment).
    parts: list = field(default_factory=list)
    #: Whether to report each step for ``--explain``.
    explain: bool = False


class Channel:
    """The child's end of the control pipe, for jobs that need to talk to the notebook."""

    def __init__(self, control: int, answers: int):
        self.control = control
        self.answers = answers

    @staticmethod
    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass

    def display(self, data: dict, metadata: dict | None = None, transient: dict | None = None,
                update: bool = False) -> None:
        """Publish display data in its place among the streams.

        Stream bytes and frames travel through different pipes, so the child flushes, sends the
        frame and waits for the kernel's acknowledgement: the kernel has then passed on every
        byte written before the frame and none written after it.
        """
        message = plain({"data": data, "metadata": metadata or {}, "transient": transient or {}},
                        "the display's data or metadata")
        self.flush()
        protocol.send_obj(self.control, Kind.DISPLAY, {**message, "update": bool(update)})
        protocol.recv_blocking(self.answers)

    def clear_output(self, wait: bool = False) -> None:
        self.flush()
        protocol.send_obj(self.control, Kind.CLEAR_OUTPUT, bool(wait))
        protocol.recv_blocking(self.answers)

    def iopub(self, msg_type: str, content: dict, metadata: dict | None = None, ident=None,
              buffers=None) -> None:
        """Have the kernel send a message to the front end for us (a widget's comm traffic)."""
        message = plain({"msg_type": msg_type, "content": content, "metadata": metadata or {}},
                        f"the {msg_type} message")
        self.flush()
        protocol.send_obj(self.control, Kind.IOPUB, {
            **message, "ident": ident, "buffers": [bytes(b) for b in buffers or ()],
        })
        protocol.recv_blocking(self.answers)

    def ask(self, prompt: str = "", password: bool = False) -> str:
        """Ask the notebook for a line of input, through the kernel's own stdin channel."""
        self.flush()
        protocol.send_obj(self.control, Kind.INPUT, (str(prompt), password))
        kind, payload = protocol.recv_blocking(self.answers)
        ok, text = protocol.load(payload)
        if not ok:
            raise EOFError(text)
        return text


def main(plan: Plan) -> None:
    """The child's whole life. Never returns."""
    status = EXIT_INTERNAL
    try:
        _rewire(plan)
        for part in plan.parts:
            part.before_unshare()
        if two_stage(plan.spec, plan.pid_done):
            _become_middle_or_worker(plan)
        else:
            steps.enter_namespaces(plan.spec, plan.uid, plan.gid, pid_done=plan.pid_done)
            _wait_for_kernel(plan)
            _set_up_inside(plan)
        status = _work(plan)
    except steps.StepFailed as e:
        _report_setup_failure(plan, e)
        status = EXIT_SETUP_FAILED
    except KeyboardInterrupt:  # the kernel is stopping us and reports that itself
        status = 128 + signal.SIGINT
    except BaseException:
        try:
            import traceback
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        if _adopting:
            end_leftovers()
        os._exit(status)


def two_stage(spec: Namespaces, pid_done: bool) -> bool:
    """Whether the cell runs in a grandchild (PID 1 of a namespace the child made or joined),
    with the child staying behind only to pass on how it ended."""
    return bool(spec.pid and not pid_done) or "pid" in spec.join


def _make_stdio():
    """The child's text streams on fds 0/1/2, made once in the kernel and never written there:
    each child inherits them empty, and building them in a fresh fork would cost more."""
    return (open(0, "r", closefd=False),
            open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False),
            open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False))


_inherited: list = []

#: The kernel's own ends of the channels of its boxes: a child closes them first, or it would
#: keep a box's socket open after the kernel closed it (and the box would never see the end).
held_by_kernel: set[int] = set()

try:
    _stdio = _make_stdio()
except OSError:  # fds 0-2 closed in this process (a daemon): make them in each child instead
    _stdio = None


def _rewire(plan: Plan) -> None:
    """Own stdio and signals before anything else can run."""
    # Every object inherited from the kernel goes to the permanent generation, so the child's
    # garbage collections never write to (and so copy) the kernel's pages (see gc.freeze).
    gc.freeze()
    # SIGSTOP under a sentinel (see there), once the sentinel holds this child: never frozen unseen.
    set_parent_death_signal(signal.SIGSTOP if sentinel.guard.watch_self() else signal.SIGKILL)
    if not plan.pid_done and os.getppid() != plan.kernel_pid:  # the kernel died before prctl()
        os._exit(EXIT_INTERNAL)
    # A session of its own, not only a process group: a stopped group leader in its parent's
    # session gets SIGHUP and SIGCONT from Linux when the parent dies (POSIX's orphaned
    # process group rule), which would undo the SIGSTOP that keeps its tree for the sentinel.
    try:
        os.setsid()
    except OSError:
        pass
    for fd in held_by_kernel:
        try:
            os.close(fd)
        except OSError:
            pass
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(plan.stdout, 1)
    os.dup2(plan.stderr, 2)
    for fd in (devnull, plan.stdout, plan.stderr):
        os.close(fd)
    # The kernel's own streams stay referenced, so that no finalizer flushes what they still
    # hold (the kernel shows that) into this child's pipes, or sends it from here.
    _inherited.append((sys.stdin, sys.stdout, sys.stderr))
    sys.stdin, sys.stdout, sys.stderr = _stdio or _make_stdio()
    channel = Channel(plan.control, plan.answers)
    builtins.input = channel.ask
    getpass.getpass = lambda prompt="Password: ", stream=None: channel.ask(prompt, password=True)
    # _signal: the C functions under signal's wrappers, whose enum conversions would write to
    # (and so copy) dozens of the kernel's pages in every child.
    _signal.signal(signal.SIGINT, _signal.default_int_handler)
    _signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if plan.explain:
        steps.log = []


def _become_middle_or_worker(plan: Plan) -> None:
    """A PID namespace owned by a new user (or time) namespace must be made here, in the
    single-threaded child; its PID 1 is then our own child (the worker), and we stay behind
    only to pass on how it ended."""
    steps.enter_namespaces(plan.spec, plan.uid, plan.gid, pid_done=False)
    _wait_for_kernel(plan)
    steps.record("fork()")
    worker = os.fork()
    if worker == 0:
        set_parent_death_signal(signal.SIGKILL)
        steps.where = "PID 1"
        _set_up_inside(plan)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in (0, 1, 2, plan.control, plan.answers, plan.memfd):
        if fd >= 0:
            os.close(fd)
    _drop_inherited_fds(())
    while True:
        try:
            _, status = os.waitpid(worker, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        if -code != signal.SIGKILL:  # its action cannot be set, and is always the default
            signal.signal(-code, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {-code})
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def _wait_for_kernel(plan: Plan) -> None:
    """Let the kernel do its side of the parts (a veth end moved in, a cgroup joined) while
    no cell code has run yet."""
    if any(part.needs_host for part in plan.parts):
        protocol.send(plan.control, Kind.READY)
        _, answer = protocol.recv_blocking(plan.answers)
        if answer:  # the kernel failed and reports it itself
            os._exit(EXIT_SETUP_FAILED)


def _set_up_inside(plan: Plan) -> None:
    _adopt_orphans()
    steps.set_up_inside(plan.spec)
    for part in plan.parts:
        part.inside()


#: Whether this process is the subreaper of what the cell starts (see _adopt_orphans).
_adopting = False


def _adopt_orphans() -> None:
    """Make this process the reaper of every process the cell starts, however it detaches.

    A cell's processes end with it, as a container's end with its first process: otherwise a
    ``subprocess.Popen`` the cell never waited for would run on, orphaned and out of the
    notebook's reach, holding the cell's namespaces alive. PID 1 of a new PID namespace gets
    this from Linux (its exit kills the namespace); any other child asks for it here, as
    ``docker run --init`` does, and :func:`end_leftovers` ends them."""
    global _adopting
    _adopting = os.getpid() != 1  # set either way: a nested run's child inherits the flag
    if _adopting:
        set_child_subreaper()
        steps.record("prctl(PR_SET_CHILD_SUBREAPER, 1)")


#: Seconds a child waits for what it killed to end before it leaves the rest to init: a process
#: stuck in an uninterruptible call (an unreachable NFS server) dies only when the call returns,
#: and until this child exits, the kernel's reaper waits for it.
PATIENCE = 2.0


def end_leftovers(patience: float = PATIENCE) -> None:
    """Kill and reap whatever the cell left running, down to the last descendant (orphans come
    to us as their parents die). Never waits long on what it cannot end: a process it may not
    signal (one that made itself another user), cannot see (no readable /proc) or that does not
    die within *patience* seconds is left to init."""
    _signal.signal(signal.SIGINT, _signal.SIG_IGN)  # the cell is over, however it ended
    deadline = time.monotonic() + patience
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass  # reaped one that had already ended
        except ChildProcessError:
            return  # no children left
        dying = []
        for pid in children():  # this process's, in the /proc it sees
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                dying.append(fd)
            except OSError:
                os.close(fd)
        if not dying:
            return
        poller = select.poll()
        for fd in dying:
            poller.register(fd, select.POLLIN)
        try:
            ended = poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))
        finally:
            for fd in dying:
                os.close(fd)
        if not ended or time.monotonic() >= deadline:
            return


def _drop_inherited_fds(keep) -> None:
    """Replace every descriptor inherited from the kernel (its ZeroMQ sockets, its history
    database, other runs' pipes) with /dev/null, keeping 0, 1, 2 and *keep*: the cell's process
    then holds nothing of the kernel's, and what it starts inherits only 0, 1 and 2 (each
    replacement is close-on-exec, as nsmagic's own descriptors are). Replaced rather than
    closed: kernel objects copied into the child still hold the numbers, and a number closed
    under them could be reused by a file the cell opens, which one of them might then close
    or write to."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: every number up to the limit, as subprocess does
        fds = range(3, os.sysconf("SC_OPEN_MAX"))
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    keep = {0, 1, 2, null, *keep}
    for fd in fds:
        if fd not in keep:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:  # not open (the listing's own descriptor)
                pass
    os.close(null)


def _seal_off(plan: Plan) -> None:
    """Just before the cell's code runs: keep only nsmagic's descriptors, and in a user
    namespace or a --rootfs, make this process undumpable, so that the programs the cell runs
    (root in that namespace) cannot open its /proc/PID/fd and write into nsmagic's pipes. (The
    kernel then may not read this process's memory unless it is root, and values come back
    through the memfd instead.)"""
    _drop_inherited_fds((plan.control, plan.answers, plan.memfd))
    if getattr(plan.job, "seals_itself", False):  # a box: first it hands the kernel its namespaces
        return
    if needs_undumpable(plan.spec):
        set_undumpable()


def needs_undumpable(spec: Namespaces) -> bool:
    """Whether the programs a cell runs would be root over it (a user namespace, or a --rootfs
    whose programs are not the host's), so that its process must be undumpable."""
    return bool(spec.user or "user" in spec.join or spec.rootfs is not None)


def _work(plan: Plan) -> int:
    _seal_off(plan)
    channel = Channel(plan.control, plan.answers)
    if plan.explain:
        explain_steps(channel, steps.log)
    outcome = plan.job(channel)
    if outcome is None:  # a box: it reported each of its cells itself
        return 0
    _signal.signal(signal.SIGINT, _signal.SIG_IGN)  # the cell is over: nothing left to interrupt
    send_report(channel, plan.memfd, outcome, plan.outputs, plan.namespace)
    return 0


def explain_steps(channel: Channel, calls) -> None:
    """Show the steps done and this process's namespaces (``--explain``); wait until shown."""
    protocol.send_obj(channel.control, Kind.EXPLAIN, {
        "calls": calls or [], "inodes": inodes(), "ids": (os.getpid(), os.getuid(), os.getgid()),
    })
    protocol.recv_blocking(channel.answers)


def send_report(channel: Channel, memfd: int, outcome: Outcome, outputs: list[str], namespace) -> None:
    """Send the cell's report; if it has large pieces, stay until the kernel has them."""
    packer = Packer(memfd, namespace)
    report = make_report(outcome, outputs, packer)
    channel.flush()
    protocol.send_obj(channel.control, Kind.DONE, report.plain(protocol.SECRET))
    if report.parked is not None:  # the kernel copies them out of this process: stay until it has
        try:
            _, answer = protocol.recv_blocking(channel.answers)
        except EOFError:  # the kernel gave up on this cell
            return
        if answer == b"push":
            packer.push()
            protocol.send(channel.control, Kind.PUSHED)


def _report_setup_failure(plan: Plan, e: "steps.StepFailed") -> None:
    try:
        protocol.send(plan.control, Kind.SETUP_FAILED, protocol.setup_record(e.step, e.errno, e.message))
    except OSError as err:
        if err.errno != errno_module.EPIPE:
            raise


def _warm_report_path() -> None:
    """Run here, in the kernel, the pure code with which every child packs its result.

    Python 3.11 rewrites a function's bytecode in place once the function has run a few times
    (later versions count per instruction). A child runs this code once, so it would do that
    rewriting itself, and copy each page it writes, in every cell."""
    packer = Packer(-1)
    for _ in range(10):
        protocol.dumps(make_report(Outcome(value=1), [], packer).plain(protocol.SECRET))


_warm_report_path()
