"""How the child is made: glibc's fork() with the ``CLONE_NEW*`` flags applied around it.

Container runtimes start a container's first process with one call,
``clone(child_fn, stack, CLONE_NEWNET|CLONE_NEWPID|...|SIGCHLD, arg)``. nsmagic makes the same
process, but from a live, multi-threaded Python kernel, where a raw clone through ctypes is
unsafe: Python bytecode would run in the child before ``PyOS_AfterFork_Child()`` (the child can
then wait forever for a GIL owned by a thread that does not exist, which a soak of a few hundred
cells hits), and glibc's fork handlers (malloc arenas, the cached thread id) would be skipped.

glibc's ``fork()``, which ``os.fork()`` calls, *is* the clone(2) system call with those handlers,
so nsmagic uses it and applies the flags where Linux allows each:

* ``CLONE_NEWPID``: ``unshare`` in the kernel's calling thread just before the fork (it changes
  only that thread's ``pid_for_children``), ``setns`` back right after, so the child is PID 1
  and the kernel's later ``!cmd`` are not born in a dead namespace.
* ``CLONE_NEWNET|NEWNS|NEWUTS|NEWIPC|NEWCGROUP``: ``unshare`` in the child, before any user code.
* ``CLONE_NEWUSER`` and ``CLONE_NEWTIME``: only possible in a single-threaded process, which the
  kernel never is and the child always is, so the child makes them (and the PID namespace
  after a user namespace, followed by a second fork so that PID 1 is born in it).
  ``CLONE_NEWTIME`` cannot be passed to clone() at all: 0x80 lands in the exit-signal byte.

The result is the process a runtime's clone() would make, minus the hazards.
"""

from __future__ import annotations

import _signal
import os
import queue
import select
import signal
import sys
import threading
import warnings

from . import child as child_module
from .sentinel import guard
from .errors import PrivilegeError
from .shell import stop_saving_threads
from .syscalls import CloneFlag, advice, open_readonly, setns, unshare


def pid_namespace_in_kernel(spec) -> bool:
    """Whether the kernel's thread makes the PID namespace itself (it cannot when a user
    namespace must own it, joined or new, because only a single-threaded process can enter
    or make that)."""
    return spec.pid and not spec.user and "user" not in spec.join


def spawn(plan: "child_module.Plan", log: list | None = None, started=None) -> int:
    """Fork the child described by *plan*; return its pid. The child never returns here.

    *started* is called with the pid as soon as the child exists, before anything else can go
    wrong, so that the caller can always stop it. With a *log*, the kernel's own system calls
    are noted there for ``--explain``."""
    note = log.append if log is not None else (lambda entry: None)
    stop_saving_threads()  # while an interrupt can still stop the wait (see nsmagic.shell)
    if threading.current_thread() is not threading.main_thread():
        return _forker.call(_spawn, plan, note, log, started)
    with _interrupt_deferred():
        return _spawn(plan, note, log, started)


class _Forker:
    """The thread that forks for every thread but the main one.

    Linux sends a child its parent-death signal when the *thread* that forked it ends, not the
    process (prctl(2), PR_SET_PDEATHSIG). A cell sent from another thread (an ipykernel
    subshell, a library caller's worker thread) may make a child that outlives that thread (a
    box), which would then be frozen by its SIGSTOP (see nsmagic.sentinel) while the kernel
    lives. The main thread lives as long as the process, and so does this one (a daemon thread,
    started at the first such fork, anew in a forked process). Forks from other threads wait
    for it one at a time; none of them can be interrupted anyway (only the main thread gets
    KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue | None = None
        self._owner = -1

    def call(self, fn, *args):
        with self._lock:
            if self._owner != os.getpid():
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._jobs,), name="nsmagic-forker",
                                 daemon=True).start()
                self._owner = os.getpid()
            jobs = self._jobs
        done, outcome = threading.Event(), {}
        jobs.put((fn, args, outcome, done))
        done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    @staticmethod
    def _serve(jobs: "queue.SimpleQueue") -> None:
        while True:
            fn, args, outcome, done = jobs.get()
            try:
                outcome["value"] = fn(*args)
            except BaseException as e:  # handed to the caller, whose fork it was
                outcome["error"] = e
            finally:
                done.set()
                del fn, args, outcome, done  # nothing of a finished fork kept alive here


_forker = _Forker()


def _spawn(plan, note, log, started) -> int:
    saved = None
    # The child's parent-death signal: SIGSTOP if a sentinel will end its tree. Before the
    # unshare below: a sentinel started after it would be born in the new PID namespace.
    guard.arm()
    try:
        _signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # (no enum wrapper: see child)
        if plan.pid_done:
            saved = open_readonly("/proc/thread-self/ns/pid")
            try:
                unshare(CloneFlag.NEWPID)
            except OSError as e:
                raise PrivilegeError(
                    f"unshare(CLONE_NEWPID) failed: {e.strerror}; {advice(CloneFlag.NEWPID, e.errno, False)}"
                ) from None
            note(("kernel", "unshare(CLONE_NEWPID)",
                  "in the kernel's own thread: only its next child is born in the new PID namespace"))
        pid = _fork()
        if pid == 0:
            try:
                child_module.main(plan)
            finally:
                os._exit(child_module.EXIT_INTERNAL)
        if started is not None:
            started(pid)
        # No setpgid(pid, pid) here: the child makes a session of its own (see child._rewire),
        # which it could not if this made it a group leader first. Until it has, a signal to
        # its group falls back to the child alone (handle.Child.signal), which has started nothing.
        if log is not None:
            note(("kernel", f"fork() = {pid}",
                  "glibc's fork is clone(CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD): a copy-on-write copy of the kernel"))
        if saved is not None:
            note(("kernel", "setns(<own PID namespace>, CLONE_NEWPID)",
                  "the kernel's thread goes back to making children in its own PID namespace"))
        return pid
    finally:
        try:
            if saved is not None:
                try:
                    setns(saved, CloneFlag.NEWPID)
                finally:
                    os.close(saved)
        finally:  # whatever failed: a kernel thread that holds off SIGINT can never be interrupted
            _signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class _interrupt_deferred:
    """Hold an interrupt of the main thread back until the child's pid has been handed over.

    Blocking SIGINT in the forking thread is not enough in a multi-threaded kernel: another
    thread then receives the signal, and Python raises KeyboardInterrupt in the main thread at
    its next bytecode, which can be the one right after ``fork()`` returns, before anyone has
    kept the pid: the child would run on unseen and stay a zombie. So for these few lines the
    main thread's SIGINT handler only takes note, and the real one runs once the pid is known.
    (Other threads never receive KeyboardInterrupt, so there is nothing to hold back there.)
    """

    def __enter__(self):
        self.handler = None
        self.frames: list = []
        if threading.current_thread() is threading.main_thread():
            handler = _signal.getsignal(signal.SIGINT)
            if callable(handler):
                _signal.signal(signal.SIGINT, lambda signum, frame: self.frames.append(frame))
                self.handler = handler
        return self

    def __exit__(self, kind, value, tb):
        if self.handler is not None:
            _signal.signal(signal.SIGINT, self.handler)
            if self.frames and kind is None:
                self.handler(signal.SIGINT, self.frames[0])  # default_int_handler raises
        return False


def fork() -> int:
    """``os.fork()`` for the kernel's own short-lived probes (``%nsinfo``), with IPython's
    history thread first stopped safely (see nsmagic.shell) and without 3.12's warning."""
    stop_saving_threads()
    return _fork()


def _fork() -> int:
    """``os.fork()``, without Python 3.12's DeprecationWarning about forking a multi-threaded
    process: the child never returns to the code of the threads it lost; it runs the cell and
    _exits. Older Pythons do not warn, so the filters are left alone there: right after the
    fork, each object either process touches costs it a page copy."""
    if sys.version_info < (3, 12):
        return os.fork()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


class Reaper:
    """Collects children whose report has already been read.

    A child's teardown (a network namespace, a large copy-on-write heap) takes milliseconds the
    cell need not wait for, so the kernel returns as soon as the report is in and this thread
    does the ``waitpid``. It waits for all of them at once, each a pidfd in one epoll set, so
    that a child slow to end (a process stuck in the kernel, which not even SIGKILL ends until
    its call returns) holds up no other child's reaping and clean-up. The kernel adds a child
    to the set without waking the thread, which runs only when a child has ended.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = 0  # the process whose thread and epoll set these are

    def reap(self, pid: int, then=None) -> None:
        """Wait for *pid* in the background, then call *then* (a clean-up)."""
        with self._lock:
            if self._owner != os.getpid() or not self._thread.is_alive():
                # First use, or a forked child (a nested run) holding its parent's, whose epoll
                # set it shares: start afresh rather than collect the parent's children.
                self._epoll = select.epoll()
                self._waiting: dict[int, tuple] = {}  # pidfd -> (pid, then)
                self._thread = threading.Thread(target=self._run, args=(self._epoll, self._waiting),
                                                name="nsmagic-reaper", daemon=True)
                self._thread.start()
                self._owner = os.getpid()
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # out of descriptors (or gone already): wait on a thread of its own
                threading.Thread(target=_collect, args=(pid, then), daemon=True).start()
                return
            self._waiting[pidfd] = (pid, then)
            self._epoll.register(pidfd, select.EPOLLIN)

    @staticmethod
    def _run(epoll, waiting: dict) -> None:
        while True:
            for pidfd, _ in epoll.poll():
                # Unregistered before closing: a forked child may hold a copy of the pidfd,
                # which would keep it in the set under a number this process reuses.
                epoll.unregister(pidfd)
                pid, then = waiting.pop(pidfd)
                os.close(pidfd)
                _collect(pid, then)


def _collect(pid: int, then) -> None:
    try:
        os.waitpid(pid, 0)  # it has ended: this does not block
    except ChildProcessError:
        pass
    if then is not None:
        then()


reaper = Reaper()
