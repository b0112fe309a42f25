"""Nothing a cell started outlives its kernel: a small watcher process, one per kernel.

The hazard: a child dies with the kernel (its parent-death signal), but what the cell started
(a ``setsid`` daemon, a double fork, or simply a child of its own) is then handed to init and
runs on, holding the cell's namespaces, its veth pair and its cgroup. The child is its cell's
subreaper (see nsmagic.child), so while it *lives*, every process the cell started, however it
detached, is its descendant; the tree falls apart only when it dies.

So a child whose kernel has a sentinel does not die with the kernel: its parent-death signal is
SIGSTOP, which cannot be caught, blocked or ignored (and reaches PID 1 of a PID namespace too,
because it comes from an ancestor namespace). Frozen, it still holds its tree together: orphans
keep coming to it, and as it cannot reap them their pids cannot be reused. The sentinel, a
separate process in a session of its own (out of reach of the kernel's process-group signals),
holds a pidfd of the kernel and one of each live child, which each child made by nsmagic.clone's
spawn (a long-lived box as well as a cell's) hands over itself before it asks for SIGSTOP
(:meth:`Guard.watch_self`). When the kernel's pidfd fires it walks each
frozen child's tree from the top, stopping every process before listing its children (a fork
racing a SIGSTOP either is listed or is restarted by Linux and never happens), kills them all,
then the child, and finally sweeps what dead kernels left on the host (cgroups and veth pairs
named for a pid that is gone). No cgroup is needed, so it works rootless and on cgroup v1; the
cost per cell is one pidfd handed over a socket.

Where the sentinel cannot be started (or has died), children keep SIGKILL as their
parent-death signal, as before: never frozen without someone to end them.

The sentinel is this file run by path (``python -I -S sentinel.py FD KERNEL_PID``), importing only
the standard library and its sibling nsmagic/proctree.py while it watches; nsmagic itself is
imported only for the sweep, after the kernel died.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import sys
import time

if __package__:
    from .proctree import children, gone
else:  # run by path, as the sentinel (``-I``: nsmagic is not on sys.path): its sibling file
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # last: the standard library wins
    from proctree import children, gone
    del sys.path[-1]

#: The parent-death signal a child forked now should ask for (read in the child after the fork).
death_signal = signal.SIGKILL

#: How long the sentinel works on one frozen tree (a process stuck in an uninterruptible call
#: dies only when the call returns; it is left to init after this).
PATIENCE = 3.0


#: The process that imported nsmagic (the kernel). A child forked from it (a nested run) starts
#: no sentinel of its own: it is inside a tree that the kernel's sentinel ends.
_HOME = os.getpid()


class Guard:
    """The kernel's side: starts the sentinel once and hands it each child."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc = None
        self._failed = False

    def arm(self) -> bool:
        """Before a fork: make sure a sentinel watches this process; set :data:`death_signal`."""
        global death_signal
        alive = os.getpid() == _HOME and (self._alive() or (not self._failed and self.start()))
        death_signal = signal.SIGSTOP if alive else signal.SIGKILL
        return alive

    def start(self) -> bool:
        """Start the sentinel (also done by ``%load_ext``, so that the first cell does not wait)."""
        import subprocess

        if os.getpid() != _HOME:
            return False
        if self._alive():
            return True
        self._forget()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # The sweep imports nsmagic and pyroute2 under -I -S, where neither an editable
            # install's finder nor PYTHONPATH applies: the directory holding this package
            # first, then the kernel's own path.
            home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {"NSMAGIC_SENTINEL_PATH": os.pathsep.join([home, *(p for p in sys.path if p)]),
                   "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), start_new_session=True, cwd="/", env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # Ready once it holds a pidfd of this process (a kernel killed before that moment
            # would otherwise go unwatched); it says so with one byte.
            ours.settimeout(10)
            if ours.recv(1) != b"1":
                raise OSError("the sentinel did not start")
            ours.setblocking(False)
        except (OSError, socket.timeout):
            ours.close()
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()
                self._proc = None
            self._failed = True  # not retried on every cell; children keep SIGKILL
            return False
        finally:
            theirs.close()
        self._sock = ours
        return True

    def watch_self(self) -> bool:
        """In a child, first thing: hand the sentinel a pidfd of this very process, and say
        whether it now holds one. Only then may the child ask for SIGSTOP as its parent-death
        signal: a child frozen unseen would stay frozen. (The kernel handing the child over after
        ``fork()`` returned left a moment, the kernel killed in it, with a frozen child no one
        knew; done by the child before its ``prctl``, there is none.)"""
        if death_signal != signal.SIGSTOP or self._sock is None:
            return False
        try:
            pidfd = os.pidfd_open(os.getpid())
        except OSError:
            return False
        try:
            socket.send_fds(self._sock, [b"w"], [pidfd], socket.MSG_DONTWAIT)
            return True
        except OSError:  # full or gone: the child keeps SIGKILL; the next arm() finds out
            return False
        finally:
            os.close(pidfd)

    def _alive(self) -> bool:
        if self._sock is None:
            return False
        ready = select.poll()
        ready.register(self._sock, select.POLLHUP)
        return not ready.poll(0)

    def _forget(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._proc is not None:
            self._proc.poll()  # reaped, if it died
        self._sock, self._proc = None, None


guard = Guard()


# -- the sentinel process ------------------------------------------------------------------------


def _main(sock_fd: int, kernel_pid: int) -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    # Non-blocking: socket.recv_fds drops its flags argument (MSG_DONTWAIT), and a blocking read
    # would wait for the next child instead of watching the kernel. EOF cannot be relied on to
    # end it: a frozen child may still hold a copy of the kernel's end.
    sock.setblocking(False)
    # The kernel's pid comes from the kernel: getppid() alone would name init or a subreaper if
    # the kernel died before this line, and that would be watched forever. While the kernel
    # lives it is our parent, so its pid cannot have been reused: a pidfd opened while getppid()
    # still names it is the kernel's.
    try:
        kernel = os.pidfd_open(kernel_pid)
    except OSError:  # gone already (and reaped)
        kernel = -1
    if kernel < 0 or os.getppid() != kernel_pid:  # the kernel died before we held it
        _end_all([], sock)
        return
    sock.send(b"1")
    poller = select.poll()
    poller.register(kernel, select.POLLIN)
    poller.register(sock, select.POLLIN)
    watched: dict[int, int] = {}  # pidfd -> pidfd (kept open: it pins the process)
    _sweep_aside()  # what kernels that died earlier left
    while True:
        for fd, events in poller.poll():
            if fd == kernel:
                _end_all(list(watched), sock)
                return
            if fd == sock.fileno():
                if not _receive(sock, poller, watched) and events & (select.POLLHUP | select.POLLERR):
                    poller.unregister(sock)  # the kernel closed its end (it is exiting)
            else:  # a child exited by itself
                poller.unregister(fd)
                watched.pop(fd, None)
                os.close(fd)


def _sweep_aside() -> None:
    """Sweep in a grandchild handed to init, so that the sentinel neither waits for it nor
    keeps the memory of the imports the sweep needs."""
    middle = os.fork()
    if middle == 0:
        try:
            if os.fork() == 0:
                try:
                    _sweep()
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.waitpid(middle, 0)


def _receive(sock: socket.socket, poller, watched: dict) -> bool:
    got = False
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 4)
        except (BlockingIOError, InterruptedError):
            return got
        except OSError:
            return got
        if not msg and not fds:
            return got
        got = True
        for fd in fds:
            watched[fd] = fd
            poller.register(fd, select.POLLIN)


def _end_all(watched: list[int], sock: socket.socket) -> None:
    """The kernel is gone: end every tree it left, then sweep."""
    pending: dict = {}
    _receive(sock, select.poll(), pending)  # children handed over just before the end
    for pidfd in watched + list(pending):
        end_tree(pidfd)
    _sweep()


def end_tree(pidfd: int, patience: float = PATIENCE) -> None:
    """Stop the process of *pidfd* and every descendant, top down, then kill them all."""
    root = _pid_of(pidfd)
    if root <= 0:
        return
    _send(pidfd, signal.SIGSTOP)
    held: dict[int, int] = {}  # pid -> pidfd
    deadline = time.monotonic() + patience
    try:
        while True:
            grew = False
            for parent in [root, *held]:
                for pid in children(parent):
                    if pid in held:
                        continue
                    try:
                        fd = os.pidfd_open(pid)
                    except OSError:
                        continue
                    # Its parent is stopped and cannot reap it, so the pid is still this child's
                    # (checked all the same: a parent that could not be stopped may have reaped).
                    if _parent_of(pid) != parent:
                        os.close(fd)
                        continue
                    _send(fd, signal.SIGSTOP)
                    held[pid] = fd
                    grew = True
            if not grew or time.monotonic() > deadline:
                break
        for fd in held.values():
            _send(fd, signal.SIGKILL)
        _send(pidfd, signal.SIGKILL)
        waiting = select.poll()
        waiting.register(pidfd, select.POLLIN)
        waiting.poll(max(0, int((deadline - time.monotonic()) * 1000)) + 1000)
    finally:
        for fd in held.values():
            os.close(fd)


def _send(pidfd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except OSError:
        pass


def _pid_of(pidfd: int) -> int:
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


# -- sweeping what dead kernels left -----------------------------------------------------------

_LINK = re.compile(r"nsm([0-9a-f]+)-[0-9a-f]+")


def stale_cgroups() -> list[str]:
    """cgroups nsmagic made for a kernel that is gone (its cells' and its leaf, see
    :func:`nsmagic.environment.cgroups.stale`), beside or under this process's own."""
    from nsmagic.environment.cgroups import hierarchies, stale

    with open("/proc/self/cgroup") as f, open("/proc/self/mountinfo") as g:
        found = hierarchies(f.read(), g.read())
    return sorted({path for h in found for parent in {h.own, os.path.dirname(h.own)} for path in stale(parent)})


def stale_links() -> list[str]:
    """Host ends of veth pairs nsmagic made (``nsm<kernel pid in hex>-<n>``) whose kernel is gone."""
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return []
    return sorted(n for n in names if (m := _LINK.fullmatch(n)) and gone(int(m[1], 16)))


def sweep() -> list[str]:
    """Remove what dead kernels left: their cgroups (killing what is still in a cell's) and their
    veth pairs. Returns what could not be removed (it belongs to another user, or is busy)."""
    from nsmagic.environment.cgroups import put_back, remove

    failed = []
    try:
        groups = stale_cgroups()
    except OSError:  # no /proc/self/cgroup: nothing to sweep
        groups = []
    leaves = []
    for path in groups:
        if path.endswith("-kernel"):
            leaves.append(path)  # after the cells' cgroups beside it are gone
            continue
        try:
            remove(path)
        except OSError:
            failed.append(path)
    for path in leaves:
        # A dead kernel's leaf move is undone as its exit would have: its leaf may still hold
        # this sentinel, or what the kernel started outside its cells.
        parent, name = os.path.split(path)
        try:
            put_back(parent, int(name.split("-")[1]))
        except (OSError, ValueError):
            pass
        if os.path.isdir(path):
            try:
                remove(path)  # another kernel still uses the controllers: only an empty leaf goes
            except OSError:
                failed.append(path)
    links = stale_links()
    if links:
        failed += _delete_links(links)
    return failed


def _sweep() -> None:
    path = os.environ.get("NSMAGIC_SENTINEL_PATH")
    if path:
        sys.path[:0] = [p for p in path.split(os.pathsep) if p not in sys.path]
    try:
        sweep()
    except Exception:  # nothing to report to: the kernel is gone, and the next sweep tries again
        pass


def _delete_links(names: list[str]) -> list[str]:
    failed = []
    try:
        from pyroute2 import IPRoute
    except ImportError:
        IPRoute = None
    if IPRoute is not None:
        try:
            with IPRoute() as ipr:
                for name in names:
                    try:
                        ipr.link("del", ifname=name)
                    except Exception:
                        failed.append(name)
            return failed
        except Exception:
            pass
    import subprocess

    for name in names:
        if subprocess.run(["ip", "link", "del", name], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0:
            failed.append(name)
    return failed


if __name__ == "__main__":
    _main(int(sys.argv[1]), int(sys.argv[2]))
