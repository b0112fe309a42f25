"""Boxes: containers that live across cells (``--name``, ``--in``, ``%nsls``, ``%nsstop``, ``%nslink``).

Real kernels, real namespaces: each test makes its own boxes and stops them, by name, even when
it fails (``boxes`` fixture).
"""

import os
import signal
import threading

import psutil
import pytest

from helpers import wait_until
from kernel import Kernel
from processes import wait_gone

pytestmark = [pytest.mark.kernel, pytest.mark.root]


@pytest.fixture
def boxes(kernel):
    """The shared kernel, with every box a test made stopped afterwards."""
    yield kernel
    kernel.execute("%nsstop --all")


def worker(k, name: str) -> int:
    return k.value(f"__import__('nsmagic.box').box.get({name!r}).worker")


def test_state_lives_across_three_cells_and_kernel_variables_need_in(boxes):
    k = boxes
    k.execute("%%innamespace --name st -n -p --mount-proc\nimport os\ncount = 1\nos.getpid()").ok()
    k.execute("%%innamespace --name st\ncount += 1").ok()
    cell = k.execute("%%innamespace --name st\ncount += 1\n(count, os.getpid())").ok()
    assert cell.result["text/plain"] == "(3, 1)"
    k.execute("made_later = 'kernel value'").ok()
    cell = k.execute("%%innamespace --name st\nmade_later")
    assert cell.ename == "NameError"
    cell = k.execute("%%innamespace --name st --in made_later\nmade_later.upper()").ok()
    assert cell.result["text/plain"] == "'KERNEL VALUE'"
    # the kernel's own variables are untouched by the box
    assert k.value("'count' in globals()") is False


def test_outputs_and_final_expression(boxes):
    k = boxes
    k.execute("%%innamespace --name out -u --hostname inbox\nimport socket\nname = socket.gethostname()").ok()
    cell = k.execute("%%innamespace --name out -o name,doubled\ndoubled = [name] * 2\nlen(doubled)").ok()
    assert cell.result["text/plain"] == "2"
    assert k.value("(name, doubled)") == ("inbox", ["inbox", "inbox"])
    big = k.execute("%%innamespace --name out -o arr\nimport numpy as np\narr = np.arange(1_000_000)").ok()
    assert big.status == "ok" and k.value("int(arr.sum())") == 499999500000


def test_exception_interrupt_and_timeout_leave_the_box_usable(boxes, ):
    k = boxes
    k.execute("%%innamespace --name sturdy -p\nkept = 'still here'").ok()
    cell = k.execute("%%innamespace --name sturdy\nclass Oops(Exception): pass\nraise Oops('inside')")
    assert cell.ename == "Oops" and "inside" in cell.evalue
    cell = k.execute("%%innamespace --name sturdy --timeout 1\nimport time\ntime.sleep(60)", timeout=30)
    assert cell.ename == "CellTimeout" and "still running" in cell.evalue
    threading.Timer(1.5, k.km.interrupt_kernel).start()
    cell = k.execute("%%innamespace --name sturdy\nimport time\ntry:\n    time.sleep(60)\n"
                     "finally:\n    print('finally ran')", timeout=30)
    assert cell.ename == "KeyboardInterrupt" and "finally ran" in cell.stdout
    cell = k.execute("%%innamespace --name sturdy\nkept").ok()
    assert cell.result["text/plain"] == "'still here'"


def test_a_box_that_will_not_stop_is_killed_and_says_so(boxes):
    k = boxes
    k.execute("%config InNamespaceMagics.grace_period = 0.5").ok()
    try:
        k.execute("%%innamespace --name stubborn\npass").ok()
        cell = k.execute("%%innamespace --name stubborn --timeout 1\nimport signal, time\n"
                         "signal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)", timeout=30)
        assert cell.ename == "CellTimeout" and "were killed" in cell.evalue and "'stubborn'" in cell.evalue
        cell = k.execute("%%innamespace --name stubborn\n'new box'").ok()  # the name is free again
    finally:
        k.execute("%config InNamespaceMagics.grace_period = 1.0").ok()


def test_background_process_lives_between_cells_and_ends_with_nsstop(boxes):
    k = boxes
    cell = k.execute("%%innamespace --name bg -n\nimport subprocess, os\n"
                     "p = subprocess.Popen(['sleep', '600'])\n"
                     "d = subprocess.Popen(['setsid', 'sleep', '600'])\nprint(p.pid, d.pid)").ok()
    pids = [int(p) for p in cell.stdout.split()]
    k.execute("%%innamespace --name bg\nimport time\ntime.sleep(0.2)").ok()
    assert all(psutil.pid_exists(p) for p in pids)
    cell = k.execute("%%innamespace --name bg\np.poll() is None").ok()
    assert cell.result["text/plain"] == "True"
    k.execute("%nsstop bg").ok()
    assert wait_gone(pids) == []


def test_nsls_shows_name_pid_state_and_nsenter_line(boxes):
    k = boxes
    k.execute("%%innamespace --name listed -n -u -p\npass").ok()
    pid = worker(k, "listed")
    cell = k.execute("%nsls").ok()
    text, page = cell.result["text/plain"], cell.result["text/html"]
    assert "listed" in text and str(pid) in text and "idle" in text
    assert f"nsenter -t {pid} -u -n -p" in text and "nsenter" in page
    net = os.readlink(f"/proc/{pid}/ns/net").split(":")[1]
    assert net in text
    # the nsenter line really enters the box: same network namespace as the box's process
    import subprocess
    out = subprocess.run(["nsenter", "-t", str(pid), "-n", "readlink", "/proc/self/ns/net"],
                         capture_output=True, text=True, check=True).stdout
    assert net in out


def test_server_in_one_box_answers_a_client_in_another_over_nslink(boxes):
    k = boxes
    k.execute("%%innamespace --name web -n --lo\nimport http.server, threading\n"
              "srv = http.server.ThreadingHTTPServer(('0.0.0.0', 8080), http.server.SimpleHTTPRequestHandler)\n"
              "threading.Thread(target=srv.serve_forever, daemon=True).start()").ok()
    k.execute("%%innamespace --name client -n --lo\npass").ok()
    cell = k.execute("lk = %nslink web client\nlk").ok()
    assert "169.254." in cell.result["text/plain"]
    # both ends read as up at once (Linux updates what ip shows lazily; %nslink syncs it)
    cell = k.execute("%%innamespace --name client\n!ip -brief link show web").ok()
    assert " UP " in cell.stdout and "NO-CARRIER" not in cell.stdout
    cell = k.execute("%%innamespace --name client --in lk\nimport urllib.request\n"
                     "urllib.request.urlopen(f'http://{lk.addr_a.ip}:8080/', timeout=10).status").ok()
    assert cell.result["text/plain"] == "200"
    # the server's access log, written between cells, shows at the web box's next cell
    cell = k.execute("%%innamespace --name web\npass").ok()
    assert '"GET / HTTP/1.1" 200' in cell.stderr
    cell = k.execute("%nslink web client 10.1 10.2")
    assert cell.ename == "UsageError"


def test_output_beyond_the_backlog_between_cells_is_dropped_with_a_note(boxes, tmp_path):
    k = boxes
    go, done = tmp_path / "go", tmp_path / "done"
    k.execute("import nsmagic.box\nsaved_backlog = nsmagic.box.BACKLOG\nnsmagic.box.BACKLOG = 1000").ok()
    try:
        # 200 KB, more than a pipe holds: "done" is written only once the kernel has read most of
        # it into the box's backlog, so the oldest lines must have been dropped by then
        k.execute(f"%%innamespace --name chatty -n\nimport os, threading, time\n"
                  "def chatter():\n"
                  f"    while not os.path.exists({str(go)!r}):\n"
                  "        time.sleep(0.01)\n"
                  "    for i in range(2000):\n"
                  "        print(f'line {i:04d} ' + 'x' * 90, flush=True)\n"
                  "    print('last line', flush=True)\n"
                  f"    open({str(done)!r}, 'w').close()\n"
                  "threading.Thread(target=chatter, daemon=True).start()").ok()
        go.touch()  # the cell is over: what the thread prints now comes between cells
        assert wait_until(done.exists, seconds=60)
        cell = k.execute("%%innamespace --name chatty\nprint('the next cell')").ok()
        assert "characters that box 'chatty' wrote between cells were dropped" in cell.stderr, cell.stderr
        assert "line 0000 " not in cell.stdout  # the oldest went
        assert cell.stdout.rstrip().endswith("last line\nthe next cell"), cell.stdout[-300:]  # the latest came
    finally:
        k.execute("nsmagic.box.BACKLOG = saved_backlog").ok()


def test_one_shot_cell_joins_a_box_by_name(boxes):
    k = boxes
    k.execute("%%innamespace --name holder -u --hostname held-box\npass").ok()
    cell = k.execute("%%innamespace --join-uts holder\nimport socket\nsocket.gethostname()").ok()
    assert cell.result["text/plain"] == "'held-box'"


def test_a_dead_box_is_reported_and_remade(boxes):
    k = boxes
    k.execute("%%innamespace --name fragile -p\nx = 1").ok()
    cell = k.execute("%%innamespace --name fragile\nimport os\nos._exit(3)")
    assert cell.ename == "BoxDied" and "'fragile'" in cell.evalue and "status 3" in cell.evalue
    cell = k.execute("%%innamespace --name fragile\n'x' in globals()").ok()
    assert cell.result["text/plain"] == "False"  # a new box
    # killed from outside between cells: the next use says so, then the name is free
    os.kill(worker(k, "fragile"), signal.SIGKILL)
    assert wait_until(lambda: "dead" in k.execute("%nsls").ok().result["text/plain"], step=0.2)
    cell = k.execute("%%innamespace --name fragile\npass")
    assert cell.ename == "BoxDied" and "between cells" in cell.evalue and "SIGKILL" in cell.evalue
    k.execute("%%innamespace --name fragile\npass").ok()


def test_usage_errors_name_the_box_and_the_option(boxes):
    k = boxes
    k.execute("%%innamespace --name fixed -n\npass").ok()
    cell = k.execute("%%innamespace --name fixed -p\nprint('body ran')")
    assert cell.ename == "UsageError" and "'fixed'" in cell.evalue and "--pid" in cell.evalue
    assert "body ran" not in cell.stdout
    k.execute("%%innamespace --name fixed -n\npass").ok()  # the same option again is fine
    cell = k.execute("%%innamespace --in x\npass")
    assert cell.ename == "UsageError" and "--name" in cell.evalue
    cell = k.execute("%nsstop nosuchbox")
    assert cell.ename == "UsageError" and "nosuchbox" in cell.evalue
    cell = k.execute("%%innamespace --name 'bad name'\npass")
    assert cell.ename == "UsageError"


def test_box_output_is_live_and_display_works(boxes):
    k = boxes
    cell = k.execute("%%innamespace --name show\nfrom IPython.display import display, HTML\n"
                     "print('before')\ndisplay(HTML('<b>boxed</b>'))\nprint('after')").ok()
    assert cell.stdout == "before\nafter\n"
    kinds = [m["msg_type"] for m in cell.messages if m["msg_type"] in ("stream", "display_data")]
    assert kinds == ["stream", "display_data", "stream"]
    cell = k.execute("%%innamespace --name show\nname = input('who? ')\nname", stdin=lambda prompt: "ada").ok()
    assert cell.result["text/plain"] == "'ada'"
    cell = k.execute("%%innamespace --name show\n!echo from a program").ok()  # fd-level streams
    assert cell.stdout.replace("\r\n", "\n") == "from a program\n"  # as IPython shows !cmd
    cell = k.execute("%%innamespace --name shown --explain -u\npass").ok()  # made: its set-up steps
    board = cell.of_type("display_data")[0]["content"]["data"]["text/plain"]
    assert "unshare(CLONE_NEWUTS)" in board
    cell = k.execute("%%innamespace --name shown --explain\npass").ok()  # later: its namespaces
    board = cell.of_type("display_data")[0]["content"]["data"]["text/plain"]
    assert "uts" in board and "new" in board


def test_sigkill_of_the_kernel_leaves_no_process_of_any_box():
    k = Kernel.start()
    try:
        k.execute("%load_ext nsmagic").ok()
        k.execute("%%innamespace --name a -p -n\nimport subprocess\n"
                  "p = subprocess.Popen(['sleep', '600'])").ok()
        k.execute("%%innamespace --name b -p\nimport subprocess\n"
                  "q = subprocess.Popen(['setsid', 'sleep', '600'])").ok()
        pids = [p.pid for p in psutil.Process(k.pid).children(recursive=True)]
        assert len(pids) >= 4
        os.kill(k.pid, signal.SIGKILL)
        assert wait_gone(pids, 10) == []
    finally:
        k.shutdown()


def test_library_box_without_ipython():
    from nsmagic import Box, Namespaces

    with Box(Namespaces(pid=True, uts=True, hostname="libbox")) as box:
        assert box.run(os.getpid) == 1
        box.run_code("import socket\nseen = socket.gethostname()")
        result = box.run_code("seen.upper()", outputs=["seen"])
        assert result.value == "LIBBOX" and result.values == {"seen": "libbox"}
        assert box.run_code("given * 2", inputs={"given": 21}).value == 42
        with pytest.raises(ZeroDivisionError):
            box.run_code("1 / 0")
        pid = box.worker
    assert wait_gone([pid]) == []


def test_library_box_run_after_stop_says_it_was_stopped():
    from nsmagic import Box, Namespaces, OptionError

    box = Box(Namespaces(uts=True))
    try:
        assert box.run(int, "42") == 42
    finally:
        box.stop()
    with pytest.raises(OptionError, match="was stopped"):  # a stopped box is not a dead one
        box.run(int, "42")
    with pytest.raises(OptionError, match="was stopped"):  # and says so every time
        box.run(int, "42")


@pytest.mark.rootless
def test_rootless_box_keeps_state_and_links_in_one_user_namespace(rootless_kernel):
    k = rootless_kernel
    k.execute("%load_ext nsmagic").ok()
    try:
        cell = k.execute("%%innamespace --name home -r -n -p --mount-proc --lo\nimport os\n"
                         "visits = [os.getpid(), os.getuid()]\nsorted(os.listdir('/proc'))[:0]").ok()
        cell = k.execute("%%innamespace --name home\nimport os\nvisits.append(len([p for p in os.listdir('/proc') "
                         "if p.isdigit()]))\nvisits").ok()
        assert cell.result["text/plain"] == "[1, 0, 1]"
        # a program the box runs (root in the box's user namespace) cannot reach the box's
        # channel through /proc/1/fd: the box's process is undumpable, as a -r cell's is
        cell = k.execute("%%innamespace --name home\nimport subprocess\nsubprocess.run(['sh', '-c', "
                         "'ls /proc/1/fd >/dev/null 2>&1 && echo open || echo refused'], "
                         "capture_output=True, text=True).stdout.strip()").ok()
        assert cell.result["text/plain"] == "'refused'"
        listed = k.execute("%nsls").ok().result["text/plain"]  # read from the kernel's own fds
        assert "net:[" in listed and "?" not in listed.split("enter:")[0]
        # two boxes in sibling user namespaces cannot be linked; the error says how
        k.execute("%%innamespace --name other -r -n --lo\npass").ok()
        cell = k.execute("%nslink home other")
        assert cell.ename == "PrivilegeError" and "--join-user home" in cell.evalue
        # one user namespace, two network namespaces: the link works rootless
        k.execute("%%innamespace --name peer -n --lo --join-user home\nimport os\nos.getuid()").ok()
        cell = k.execute("lk = %nslink home peer\nlk").ok()
        cell = k.execute("%%innamespace --name home\nimport socket, threading\n"
                         "srv = socket.create_server(('0.0.0.0', 7000))\n"
                         "threading.Thread(target=lambda: srv.accept()[0].sendall(b'hello from home'), daemon=True).start()").ok()
        cell = k.execute("%%innamespace --name peer --in lk\nimport socket\n"
                         "socket.create_connection((str(lk.addr_a.ip), 7000), timeout=10).recv(100)").ok()
        assert cell.result["text/plain"] == "b'hello from home'"
    finally:
        k.execute("%nsstop --all")


@pytest.mark.parametrize("how", ["shutdown", "restart"])
def test_boxes_end_with_the_kernel_and_leave_no_link(how):
    k = Kernel.start()
    try:
        k.execute("%load_ext nsmagic").ok()
        k.execute("%%innamespace --name s1 -n --veth\nimport subprocess\n"
                  "p = subprocess.Popen(['setsid', 'sleep', '600'])").ok()
        k.execute("%%innamespace --name s2 -p\nimport subprocess\nq = subprocess.Popen(['sleep', '600'])").ok()
        pids = [p.pid for p in psutil.Process(k.pid).children(recursive=True)]
        links = k.value("sorted(__import__('nsmagic.environment.network').environment.network._ours)")
        assert len(pids) >= 4 and links
        if how == "shutdown":
            k.km.shutdown_kernel(now=False)
        else:
            k.km.restart_kernel(now=False)
        assert wait_gone(pids, 10) == []
        import subprocess
        shown = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert not any(f"{name}@" in shown or f" {name}:" in shown for name in links)
    finally:
        if k.km.has_kernel:
            k.shutdown()
        else:
            k.kc.stop_channels()


def test_a_box_made_in_a_subshell_lives_on_after_the_subshell_is_deleted(boxes):
    """An ipykernel subshell runs its cells in a thread of its own, and Linux sends the
    parent-death signal when the forking thread ends: the box must not be frozen then."""
    k = boxes
    subshell = k.control("create_subshell_request", {})["subshell_id"]
    reply = k.execute_in_subshell(subshell, "%%innamespace --name sub -p\nx = 41")
    assert reply["status"] == "ok", reply
    assert k.control("delete_subshell_request", {"subshell_id": subshell})["status"] == "ok"
    pid = worker(k, "sub")
    state = psutil.Process(pid).status()
    assert state != psutil.STATUS_STOPPED, "the box was frozen when its subshell's thread ended"
    cell = k.execute("%%innamespace --name sub --timeout 30\nprint(x + 1)").ok()
    assert cell.stdout == "42\n"
