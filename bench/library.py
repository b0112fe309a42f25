"""Target 3: the library's run() in a plain Python process, against the usual command-line tools."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

from nsmagic import CloneFlag, Namespaces, run
from nsmagic.syscalls import setns, unshare

from . import floor
from .core import floor_note, Verdict, at_least, at_most, interleave, median, ms, say

SPEC = Namespaces(uts=True, ipc=True, pid=True, mount=True, net=True)


def nsmagic_run():
    assert run(lambda: 1, namespaces=SPEC) == 1


def fork_pipe():
    assert floor.fork_pipe() == 1


def bwrap_cmd():
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bwrap is not installed"
    cmd = [bwrap, "--unshare-all", "--dev-bind", "/", "/", "true"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"bwrap does not work here: {done.stderr.strip()[:120]}"
    return (lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)), ""


def unshare_python(path: str, site: bool):
    """``unshare ... python -c``, with the interpreter's site start-up or without it (``-S``).

    Without is the baseline the target is judged on: the start-up hooks of site-packages belong
    to an environment, not to Python, and here they would flatter nsmagic. Its own editable
    install adds a .pth hook that imports pathlib and importlib.util at every start, and a
    machine may add others (a proxy's certificates)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    # sys.executable, not a `python3` found on PATH, which may be a shell shim (pyenv)
    cmd = [unshare, "-u", "-i", "-p", "-m", "-n", "-f", sys.executable, *([] if site else ["-S"]), "-c",
           f"open({path!r}, 'w').write(repr(1))"]

    def go():
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            assert f.read() == "1"
        os.unlink(path)
    return go


def in_child(op) -> float:
    """Seconds that *op* takes in a freshly forked child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            t = time.perf_counter()
            op()
            os.write(w, struct.pack("d", time.perf_counter() - t))
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 8)
    os.close(r)
    os.waitpid(pid, 0)
    return struct.unpack("d", data)[0]


def spare_net_namespaces(n: int) -> list[int]:
    """What a pool would hold: network namespaces made ahead by a thread (a network namespace
    belongs to a thread, so the thread can unshare and end)."""
    fds: list[int] = []

    def make():
        for _ in range(n):
            unshare(CloneFlag.NEWNET)
            fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    return fds


def net_namespace_costs(n: int) -> dict:
    """Making a network namespace in the child, against entering one made ahead (the saving a
    pool of namespaces could offer at most)."""
    spares = iter(spare_net_namespaces(n + 1))
    made, entered = interleave(lambda: in_child(lambda: unshare(CloneFlag.NEWNET)),
                               lambda: in_child(lambda: setns(next(spares), CloneFlag.NEWNET)),
                               n=n, timer=lambda fn: fn())
    for fd in spares:
        os.close(fd)
    return {"unshare": made, "setns": entered}


def sample(n: int) -> dict:
    """Interleaved times of each way that works here; bwrap's absence is recorded, not raised."""
    nsmagic_run()  # warm up
    bwrap, why = bwrap_cmd()
    with tempfile.TemporaryDirectory() as tmp:
        fns = {"nsmagic": nsmagic_run, "fork": fork_pipe, "bwrap": bwrap,
               "unshare": unshare_python(os.path.join(tmp, "value"), site=False),
               "unshare_site": unshare_python(os.path.join(tmp, "value"), site=True)}
        fns = {k: f for k, f in fns.items() if f}
        times = dict(zip(fns, interleave(*fns.values(), n=n)))
    return {"times": times, "bwrap_missing": why, "netns": net_namespace_costs(n)}


def library(quick: bool) -> list[Verdict]:
    """Measured in a fresh interpreter that imports only nsmagic: the library's real setting,
    without this process's jupyter_client, zmq threads and larger heap."""
    n = 30 if quick else 200
    done = subprocess.run([sys.executable, "-m", "bench.library", str(n)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"python -m bench.library failed:\n{done.stderr[-2000:]}")
    got = json.loads(done.stdout)
    times, why = got["times"], got["bwrap_missing"]
    bwrap, unshare = "bwrap" in times, "unshare" in times
    med = {k: median(v) for k, v in times.items()}
    say("  library medians: " + ", ".join(f"{k} {ms(v)}" for k, v in med.items()))
    ns = med["nsmagic"]
    made, entered = median(got["netns"]["unshare"]), median(got["netns"]["setns"])
    out = []
    name = "run(lambda: 1, -u -i -p -m -n) vs bwrap"
    floor_what, floor_time = "a bare fork and pipe plus unshare(CLONE_NEWNET)", med["fork"] + made
    if bwrap:
        floor = floor_note(floor_what, floor_time / med["bwrap"], 0.6)
        out.append(at_most(name, f"{ms(med['bwrap'])} (`bwrap --unshare-all --dev-bind / / true`)",
                           ms(ns), ns / med["bwrap"], 0.6,
                           note="; ".join(filter(None, [f"median of {n} interleaved", floor]))))
    else:
        out.append(Verdict(name, "unavailable", ms(ns), None, "<= 0.6x", None, note=why))
    if unshare:
        out.append(at_least("run(lambda: 1) vs unshare + python -S -c", f"{ms(med['unshare'])} "
                            "(`unshare -uipmnf python -S -c`, value via a file)", ms(ns),
                            med["unshare"] / ns, 10, what="x faster",
                            note="; ".join(filter(None, [
                                "-S: the interpreter's own start, without the start-up hooks of "
                                "this environment's site-packages (see the next row)",
                                floor_note(floor_what, med["unshare"] / floor_time, 10, faster=True)]))))
        out.append(Verdict("run(lambda: 1) vs unshare + python -c, with this environment's site",
                           f"{ms(med['unshare_site'])} (`unshare -uipmnf python -c`)", ms(ns),
                           med["unshare_site"] / ns, "(information)", None,
                           note="ratio = times faster; what a user's `python3 -c` costs here: .pth hooks in site-packages "
                           "(nsmagic's editable install has one) add to every start"))
    else:
        out.append(Verdict("run(lambda: 1) vs unshare + python -S -c", "unavailable", ms(ns), None,
                           ">= 10x faster", None, note="unshare(1) is not installed"))
    out.append(Verdict("floor: os.fork + pipe + small pickle, reaped by a thread", ms(med["fork"]), ms(ns),
                       ns / med["fork"], "(information)", None, note="ratio = nsmagic / bare fork"))
    out.append(Verdict("a network namespace: setns into one made ahead vs unshare in the child",
                       f"{ms(made)} (unshare(CLONE_NEWNET))", ms(entered), entered / made, "(information)",
                       None, note="the most a pool of spare namespaces could save per -n cell; see the "
                       "README for why nsmagic keeps none"))
    return out


if __name__ == "__main__":
    json.dump(sample(int(sys.argv[1])), sys.stdout)
