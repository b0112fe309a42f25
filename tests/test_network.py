"""--lo and --veth: a loopback that works and a veth pair to the kernel, through a real kernel.

Every address used here is link-local (169.254.0.0/16) on a veth pair the test's own cells make;
each test checks that the pair is gone afterwards, also after a crash, a timeout or an interrupt.
"""

import ipaddress
import os
import re
import socket
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import psutil
import pytest

from helpers import Running, wait_until

IP_FREEBIND = 15


def links(pid: int) -> set[str]:
    """The veth ends a process with this pid made that are on the host now."""
    return {name for _, name in socket.if_nameindex() if name.startswith(f"nsm{pid:x}-")}


def free_prefix() -> ipaddress.IPv4Network:
    """A random link-local /30 with no address of the host in it."""
    taken = [ipaddress.ip_interface(a) for a in subprocess.run(
        ["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout.split()
        if re.fullmatch(r"[\d.]+/\d+", a)]
    while True:
        b = int.from_bytes(os.urandom(2), "little") % (64 * 254) + 64  # 169.254.1.0 - 169.254.254.255
        net = ipaddress.IPv4Network((int(ipaddress.IPv4Address("169.254.0.0")) + 4 * b, 30))
        if not net.overlaps(ipaddress.IPv4Network("169.254.169.0/24")) and not any(net.overlaps(t.network) for t in taken):
            return net


@pytest.fixture
def no_leak(kernel):
    """The kernel's veth ends before the test, checked to be the same (none) after it."""
    assert wait_until(lambda: not links(kernel.pid)), links(kernel.pid)
    yield
    assert wait_until(lambda: not links(kernel.pid)), f"left behind: {links(kernel.pid)}"


def ping(address: str) -> int:
    return subprocess.run(["ping", "-c", "1", "-W", "5", address], capture_output=True).returncode


# -- lo -----------------------------------------------------------------------------------------

LO_PROBE = """
import errno, fcntl, socket, struct
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    up = struct.unpack_from('16sH', fcntl.ioctl(s, 0x8913, struct.pack('16sH22x', b'lo', 0)))[1] & 1
try:
    with socket.create_server(('127.0.0.1', 0)) as server, socket.create_connection(server.getsockname(), timeout=5) as c:
        conn, _ = server.accept()
        c.sendall(b'over lo')
        got = conn.recv(100).decode()
        conn.close()
except OSError as e:
    got = errno.errorcode[e.errno]
print(repr((up, got)))
"""


@pytest.mark.kernel
@pytest.mark.root
def test_lo_is_down_in_a_new_net_namespace_and_up_with_lo(kernel):
    assert kernel.value_in("-n", "__import__('os').getpid() != %d" % kernel.pid)
    down = kernel.execute(f"%%innamespace -n{LO_PROBE}").ok()
    assert eval(down.stdout) == (0, "ENETUNREACH")
    up = kernel.execute(f"%%innamespace --lo{LO_PROBE}").ok()
    assert eval(up.stdout) == (1, "over lo")


@pytest.mark.kernel
@pytest.mark.root
def test_lo_alone_does_not_import_pyroute2(fresh_kernel):
    assert fresh_kernel.value_in("--lo", "__import__('socket').if_nameindex()") == [(1, "lo")]
    assert fresh_kernel.value("'pyroute2' in __import__('sys').modules") is False


# -- veth ---------------------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.root
def test_auto_veth_is_a_free_link_local_30_with_a_default_route(kernel, no_leak):
    host, child, names, gateway, pid = kernel.value_in("--veth", """(
        __import__('os').environ['NSMAGIC_VETH_HOST'], __import__('os').environ['NSMAGIC_VETH_CHILD'],
        [n for _, n in __import__('socket').if_nameindex()],
        [l.split() for l in open('/proc/net/route').read().splitlines()[1:] if l.split()[1] == '00000000'],
        __import__('os').getpid())""")
    host, child = ipaddress.IPv4Address(host), ipaddress.IPv4Address(child)
    assert pid != kernel.pid
    net = ipaddress.IPv4Network(f"{host}/30", strict=False)
    assert child in net and child == host + 1 and host == net.network_address + 1
    assert host in ipaddress.IPv4Network("169.254.0.0/16")
    assert host not in ipaddress.IPv4Network("169.254.169.0/24")
    assert names == ["lo", "eth0"]
    [route] = gateway
    assert route[0] == "eth0" and ipaddress.IPv4Address(bytes(reversed(bytes.fromhex(route[2])))) == host


@pytest.mark.kernel
@pytest.mark.root
def test_ping_both_ways_and_http_from_the_host_to_the_child(kernel, no_leak):
    cell = Running(kernel, """%%innamespace --veth --timeout 60
import http.server, os, subprocess
host, child = os.environ['NSMAGIC_VETH_HOST'], os.environ['NSMAGIC_VETH_CHILD']
print('child pings host:', subprocess.run(['ping', '-c', '1', '-W', '5', host], capture_output=True).returncode)
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from netns {os.stat('/proc/self/ns/net').st_ino}".encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer((child, 0), Hello)
print('serving', host, child, server.server_port, flush=True)
server.timeout = 30
server.handle_request()
print('served')""")
    m = cell.wait_for(r"serving (\S+) (\S+) (\d+)")
    host, child, port = m.group(1), m.group(2), int(m.group(3))
    assert ipaddress.IPv4Address(host) in ipaddress.IPv4Network("169.254.0.0/16")
    assert host in {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    assert ping(child) == 0
    body = urllib.request.urlopen(f"http://{child}:{port}/", timeout=10).read().decode()
    assert body.startswith("hello from netns ")
    assert int(body.split()[-1]) != os.stat("/proc/self/ns/net").st_ino
    reply = cell.finish()
    assert reply["status"] == "ok", reply
    assert "child pings host: 0" in cell.text and "served" in cell.text


class _FreeBindServer(HTTPServer):
    """Bound to the host end's address before the pair (and so the address) exists."""

    def server_bind(self):
        self.socket.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        super().server_bind()


@pytest.mark.kernel
@pytest.mark.root
def test_child_reaches_a_server_on_the_host_end(kernel, no_leak):
    net = free_prefix()
    host, child = net.network_address + 1, net.network_address + 2
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.client_address[0])
            self.send_response(200)
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"on host")

        def log_message(self, *args):
            pass

    server = _FreeBindServer((str(host), 0), Handler)
    server.timeout = 30
    thread = threading.Thread(target=server.handle_request)
    thread.start()
    try:
        cell = kernel.execute(f"%%innamespace --veth {host}/30\nimport os, urllib.request\n"
                              f"print(os.environ['NSMAGIC_VETH_CHILD'], urllib.request.urlopen("
                              f"'http://' + os.environ['NSMAGIC_VETH_HOST'] + ':{server.server_port}/', timeout=10).read())").ok()
    finally:
        thread.join(35)
        server.server_close()
    assert cell.stdout.split() == [str(child), "b'on", "host'"]
    assert seen == [str(child)]


@pytest.mark.kernel
@pytest.mark.root
def test_explicit_child_address_and_reuse_in_consecutive_cells(kernel, no_leak):
    net = free_prefix()
    host, child = net.network_address + 2, net.network_address + 1
    for _ in range(3):  # each cell's pair is removed after it; the next must not trip over it
        cell = kernel.execute(f"%%innamespace --veth {host}/30:{child}\nimport os, subprocess\n"
                              "print(os.environ['NSMAGIC_VETH_CHILD'], subprocess.run(['ping', '-c', '1', '-W', '5', "
                              "os.environ['NSMAGIC_VETH_HOST']], capture_output=True).returncode)").ok()
        assert cell.stdout.split() == [str(child), "0"]


@pytest.mark.kernel
@pytest.mark.root
def test_veth_into_a_user_and_pid_namespace(kernel, no_leak):
    # -r -p: the user namespace owns the network namespace and a second fork makes PID 1
    uid, pid, rc = kernel.value_in("-r -p --veth", "(__import__('os').getuid(), __import__('os').getpid(), "
                                   "__import__('subprocess').run(['ping', '-c', '1', '-W', '5', "
                                   "__import__('os').environ['NSMAGIC_VETH_HOST']], capture_output=True).returncode)")
    assert (uid, pid, rc) == (0, 1, 0)


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("value, words", [
    ("999.1.1.1/40", "not an IPv4 address"),
    ("169.254.77.1", "no prefix length"),
    ("169.254.77.1/30:169.254.78.2", "outside 169.254.77.0/30"),
    ("169.254.77.1/30:169.254.77.1", "host end's own"),
    ("169.254.77.1/30:banana", "not an IPv4 address"),
    ("169.254.77.1/32", "no room"),
    ("169.254.77.0/30", "network address"),
    ("169.254.77.3/30", "broadcast address"),
    ("127.0.0.2/30", "not an address a link can have"),
    ("fd00::1/64", "only IPv4"),
])
def test_bad_veth_values_are_usage_errors(kernel, no_leak, value, words):
    cell = kernel.execute(f"%%innamespace --veth {value}\nprint('body ran')")
    assert cell.ename == "UsageError"
    assert "--veth" in cell.evalue and words in cell.evalue, cell.evalue
    assert "body ran" not in cell.stdout


@pytest.mark.kernel
@pytest.mark.root
def test_overlapping_prefix_is_refused_and_interrupt_removes_the_pair(kernel, fresh_kernel, no_leak):
    net = free_prefix()
    holder = Running(fresh_kernel, f"%%innamespace --veth {net.network_address + 1}/30\nimport time\n"
                                   "print('holding', flush=True)\ntime.sleep(60)")
    holder.wait_for("holding")
    assert len(links(fresh_kernel.pid)) == 1  # the host end; the other end is inside
    wider = ipaddress.IPv4Network((int(net.network_address) & ~7, 29))
    cell = kernel.execute(f"%%innamespace --veth {wider.network_address + 6}/29\nprint('body ran')")
    assert cell.ename == "UsageError"
    assert f"overlaps {net}" in cell.evalue and f"nsm{fresh_kernel.pid:x}-" in cell.evalue
    assert "body ran" not in cell.stdout
    assert holder.interrupt()["ename"] == "KeyboardInterrupt"
    assert wait_until(lambda: not links(fresh_kernel.pid)), links(fresh_kernel.pid)


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("options, body, ename", [
    ("--veth", "import os\nos._exit(3)", "ChildDied"),
    ("--veth --timeout 1", "import time\ntime.sleep(30)", "CellTimeout"),
    ("--veth -p", "import ctypes\nctypes.string_at(0)", "ChildDied"),
    ("--veth", "raise ValueError('cell failed')", "ValueError"),
])
def test_pair_is_removed_however_the_cell_ends(kernel, no_leak, options, body, ename):
    cell = kernel.execute(f"%%innamespace {options}\n{body}")
    assert cell.ename == ename
    # the fixture checks the pair is gone; the kernel can still make one
    assert kernel.value_in("--veth", "__import__('os').environ['NSMAGIC_VETH_CHILD'].startswith('169.254.')")


@pytest.mark.kernel
@pytest.mark.root
def test_many_veth_cells_leak_no_fds_or_threads(kernel, no_leak):
    kernel.value_in("--veth", "1")
    proc = psutil.Process(kernel.pid)
    assert wait_until(lambda: not links(kernel.pid))
    fds, threads = proc.num_fds(), proc.num_threads()
    for _ in range(10):
        kernel.value_in("--veth --lo", "1")
    assert wait_until(lambda: not links(kernel.pid))
    assert wait_until(lambda: proc.num_fds() <= fds, 5), (proc.num_fds(), fds)
    # the reaper's clean-up of a pair runs its netlink exchange in a short-lived thread, which
    # may still be finishing when a count is taken: a leak shows as growth that stays
    assert wait_until(lambda: proc.num_threads() <= threads, 5), (proc.num_threads(), threads)


@pytest.mark.root
def test_library_veth_from_a_plain_python_process():
    from nsmagic import Namespaces, run

    before = links(os.getpid())

    def inside():
        return (os.environ["NSMAGIC_VETH_HOST"], [n for _, n in socket.if_nameindex()],
                subprocess.run(["ping", "-c", "1", "-W", "5", os.environ["NSMAGIC_VETH_HOST"]],
                               capture_output=True).returncode)

    host, names, rc = run(inside, namespaces=Namespaces(veth=""))
    assert names == ["lo", "eth0"] and rc == 0
    assert ipaddress.IPv4Address(host) in ipaddress.IPv4Network("169.254.0.0/16")
    assert wait_until(lambda: links(os.getpid()) == before)


# -- rootless -----------------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.rootless
def test_rootless_lo_works_and_veth_says_it_needs_root(rootless_kernel):
    rootless_kernel.execute("%load_ext nsmagic").ok()
    up = rootless_kernel.execute(f"%%innamespace -r --lo{LO_PROBE}").ok()
    assert eval(up.stdout) == (1, "over lo")
    no_r = rootless_kernel.execute("%%innamespace --lo\nprint('body ran')")
    assert no_r.ename == "PrivilegeError" and "-r" in no_r.evalue
    cell = rootless_kernel.execute("%%innamespace -r --veth\nprint('body ran')")
    assert cell.ename == "PrivilegeError"
    assert "--veth" in cell.evalue and "CAP_NET_ADMIN" in cell.evalue and "root" in cell.evalue
    assert "-r --lo" in cell.evalue
    assert "body ran" not in cell.stdout
    assert len(cell.traceback.splitlines()) == 1


@pytest.mark.kernel
@pytest.mark.root
def test_line_magic_takes_veth_with_or_without_a_value(kernel, no_leak):
    net = free_prefix()
    alone = kernel.execute("%innamespace --veth [n for _, n in __import__('socket').if_nameindex()]").ok()
    assert alone.result == {"text/plain": "['lo', 'eth0']"}
    given = kernel.execute(f"%innamespace --veth {net.network_address + 1}/30 __import__('os').environ['NSMAGIC_VETH_CHILD']").ok()
    assert given.result == {"text/plain": repr(str(net.network_address + 2))}


@pytest.mark.kernel
@pytest.mark.root
def test_a_killed_kernel_leaves_no_pair_behind(fresh_kernel):
    import signal

    holder = Running(fresh_kernel, "%%innamespace --veth\nimport time\nprint('holding', flush=True)\ntime.sleep(60)")
    holder.wait_for("holding")
    assert len(links(fresh_kernel.pid)) == 1
    os.kill(fresh_kernel.pid, signal.SIGKILL)  # its child dies with it, and the pair with the child's namespace
    assert wait_until(lambda: not links(fresh_kernel.pid)), links(fresh_kernel.pid)
