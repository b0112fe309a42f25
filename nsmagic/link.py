"""``%nslink A B``: a veth pair between two boxes' network namespaces, as ``ip link add ... type
veth peer ... netns`` would make it, both ends up and addressed.

Each end is named after the box at its other end (in box ``web`` the link to box ``client`` is
``client``), so ``ip addr`` inside a box reads like a map. Without addresses, a free link-local
/30 is chosen (169.254.0.0/16, as ``--veth`` chooses), one that neither box nor the host uses.

Who may make it: a veth pair needs CAP_NET_ADMIN over both network namespaces. A kernel run as
root has it everywhere. An unprivileged kernel has it only over namespaces owned by a user
namespace it owns, and only from inside that user namespace: two boxes made with ``-r`` each
have a user namespace of their own, siblings, and no process has rights over both. So rootless,
make the second box join the first one's user namespace (``--join-user web``): one user
namespace, two network namespaces, and the kernel's helper enters it to make the pair. The pair
goes away with either box's network namespace: nothing is left to remove.
"""

from __future__ import annotations

import array
import errno
import fcntl
import ipaddress
import os
import signal
import socket
import struct
from dataclasses import dataclass

from .environment import network
from .errors import OptionError, PrivilegeError, SetupError
from .syscalls import CloneFlag, setns


@dataclass
class Link:
    a: str
    b: str
    ifname_a: str
    ifname_b: str
    addr_a: ipaddress.IPv4Interface
    addr_b: ipaddress.IPv4Interface

    def __repr__(self) -> str:
        return (f"linked box {self.a!r} ({self.ifname_a} {self.addr_a}) <-> box {self.b!r} "
                f"({self.ifname_b} {self.addr_b})")

    def _repr_html_(self) -> str:
        return (f"<p>linked box <b>{self.a}</b> (<code>{self.ifname_a} {self.addr_a}</code>) &harr; "
                f"box <b>{self.b}</b> (<code>{self.ifname_b} {self.addr_b}</code>)</p>")


def link(a, b, addr_a: str | None = None, addr_b: str | None = None) -> Link:
    """Link boxes *a* and *b* (:class:`nsmagic.box.Box`) with a veth pair."""
    if a is b:
        raise OptionError(f"%nslink: box {a.name!r} cannot be linked to itself")
    for box in (a, b):
        if not box.spec.net and "net" not in box.spec.join:
            raise OptionError(f"%nslink: box {box.name!r} has no network namespace of its own (it shares "
                              "the kernel's); make it with -n")
    wanted = _parse(addr_a, addr_b) if addr_a is not None else None
    name_a, name_b = _ifname(b.name), _ifname(a.name)
    fd_a, fd_b = a.ns["net"], b.ns["net"]  # the boxes' own: the kernel holds them
    user = _common_user_namespace(a, b)
    taken = _in(fd_a, user, _networks) + _in(fd_b, user, _networks) + _host_networks()
    ip_a, ip_b = wanted if wanted is not None else network._free_link_local([(n, "") for n in taken])
    for net in taken:
        if wanted is not None and net.overlaps(ip_a.network):
            raise OptionError(f"%nslink: {ip_a.network} overlaps {net}, which a box or the host uses; "
                              "choose another prefix, or give no addresses to pick a free link-local /30")

    def make(ipr):
        try:
            ipr.link("add", ifname=name_a, kind="veth", peer={"ifname": name_b, "net_ns_fd": fd_b})
        except network._NetlinkError as e:
            if e.code == errno.EEXIST:
                raise OptionError(f"%nslink: box {a.name!r} already has a link named {name_a!r}: "
                                  f"boxes {a.name!r} and {b.name!r} are linked already") from None
            raise _error(a, b, e) from None
        _configure(ipr, name_a, ip_a)

    _in(fd_a, user, make)
    _in(fd_b, user, lambda ipr: _configure(ipr, name_b, ip_b))
    return Link(a.name, b.name, name_a, name_b, ip_a, ip_b)


def _ifname(box_name: str) -> str:
    """An interface name (at most 15 bytes, no '/' or space) for the link to *box_name*."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in box_name)[:15]
    return name if name not in ("lo", ".", "..") else f"to-{name}"[:15]


def _configure(ipr, ifname: str, ip: ipaddress.IPv4Interface) -> None:
    index = ipr.link_lookup(ifname=ifname)[0]
    ipr.addr("add", index=index, address=str(ip.ip), prefixlen=ip.network.prefixlen)
    ipr.link("set", index=index, state="up")
    _sync_operstate(ifname)


def _sync_operstate(ifname: str) -> None:
    """Have Linux bring the link's operational state up to date now.

    The end brought up second has its carrier at once (traffic flows), but Linux updates the
    state that ``ip link`` shows from a deferred work item, up to a second later: until then it
    reads ``NO-CARRIER ... state DOWN``, which would confuse a student who looks right away.
    ETHTOOL_GLINK, asked in the link's own network namespace, syncs that state first."""
    value = array.array("I", [_ETHTOOL_GLINK, 0])
    ifreq = struct.pack("16sP", ifname.encode(), value.buffer_info()[0]).ljust(40, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, _SIOCETHTOOL, ifreq)
    except OSError:
        pass  # only what is shown lags; the link works


_SIOCETHTOOL, _ETHTOOL_GLINK = 0x8946, 0x0000000A


def _networks(ipr) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(f"{a.get('address')}/{a['prefixlen']}", strict=False)
            for a in ipr.addr("dump", family=2)]


def _host_networks() -> list[ipaddress.IPv4Network]:
    network._pyroute2()
    return [n for n, _ in network.Network._netlink(network._host_networks)]


def _parse(addr_a: str, addr_b: str) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    try:
        ip_a, ip_b = ipaddress.IPv4Interface(addr_a), ipaddress.IPv4Interface(addr_b)
    except ValueError as e:
        raise OptionError(f"%nslink: {e}; give each address with its prefix, e.g. 10.0.0.1/24 10.0.0.2/24") from None
    if "/" not in addr_a or "/" not in addr_b:
        raise OptionError("%nslink: give each address with its prefix length (CIDR), e.g. 10.0.0.1/24 10.0.0.2/24")
    if ip_a.network != ip_b.network:
        raise OptionError(f"%nslink: {ip_a} and {ip_b} are not in one network; the two ends of a link "
                          "need addresses in the same one")
    if ip_a.ip == ip_b.ip:
        raise OptionError(f"%nslink: both ends cannot have the address {ip_a.ip}")
    for ip in (ip_a, ip_b):
        first, last = network._usable(ip.network)
        if not first <= ip.ip <= last:
            raise OptionError(f"%nslink: {ip.ip} is the network or broadcast address of {ip.network}")
    return ip_a, ip_b


def _common_user_namespace(a, b) -> int | None:
    """None as root (the kernel's own rights reach everywhere); otherwise an fd of the user
    namespace that owns both boxes' network namespaces, or a PrivilegeError that says how to
    get one."""
    network._pyroute2()
    if os.geteuid() == 0:
        return None
    ids = [os.fstat(box.ns["user"]).st_ino for box in (a, b)]
    if ids[0] != ids[1]:
        raise PrivilegeError(
            f"%nslink: boxes {a.name!r} and {b.name!r} are each in a user namespace of their own, and a "
            "veth pair between them needs CAP_NET_ADMIN over both, which only a process in a common "
            f"user namespace has (or root). Make the second box join the first one's: "
            f"%%innamespace --name {b.name} -n --join-user {a.name} ... (then %nslink again)")
    return a.ns["user"]


def _in(net_fd: int, user_fd: int | None, fn):
    """``fn(ipr)`` with a netlink socket in the network namespace *net_fd*: in a thread of the
    kernel as root, or, in a user namespace *user_fd*, in a forked helper (only a process with
    one thread may enter a user namespace)."""
    if user_fd is None:
        return network.Network._netlink(fn, netns=net_fd)
    return _in_helper(net_fd, user_fd, fn)


def _in_helper(net_fd: int, user_fd: int, fn):
    import pickle

    from .clone import fork

    read, write = os.pipe()
    try:
        pid = fork()
    except BaseException:
        os.close(read)
        os.close(write)
        raise
    if pid == 0:  # the helper: enter, do, report, _exit
        try:
            os.close(read)
            setns(user_fd, CloneFlag.NEWUSER)
            result = network.Network._netlink(fn, netns=net_fd)
            payload = pickle.dumps((True, result))
        except BaseException as e:
            try:
                payload = pickle.dumps((False, e))
            except Exception:
                payload = pickle.dumps((False, SetupError(f"%nslink: {type(e).__name__}: {e}")))
        try:
            os.write(write, payload)
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    try:
        while chunk := os.read(read, 1 << 16):
            chunks.append(chunk)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(read)
        while True:  # it has ended or been killed: the wait is short, and not left to chance
            try:
                os.waitpid(pid, 0)
                break
            except KeyboardInterrupt:
                continue
            except ChildProcessError:
                break
    ok, value = pickle.loads(b"".join(chunks))
    if not ok:
        raise value
    return value


def _error(a, b, e) -> Exception:
    text = f"%nslink: creating a veth pair between boxes {a.name!r} and {b.name!r} failed: {os.strerror(e.code)}"
    if e.code in (errno.EPERM, errno.EACCES):
        return PrivilegeError(f"{text} (it needs CAP_NET_ADMIN over both boxes' network namespaces)")
    return SetupError(text)

