"""A network for the cell: ``lo`` up (``--lo``) and a veth pair to the kernel (``--veth``).

A new network namespace has only ``lo``, and it is down, as with ``unshare -n``. ``--lo`` brings
it up from inside with one ``ioctl(SIOCSIFFLAGS)``, which a root inside a user namespace may do,
so it works rootless. A veth pair needs CAP_NET_ADMIN in the *host's* namespace, where one end
lives, so ``--veth`` needs a kernel run as root.

The kernel does all the netlink work, with pyroute2, and the child none: pyroute2 is slow to
import and builds an asyncio loop per socket, neither of which a fresh fork should pay for, and
from the kernel it also works when a new user namespace owns the child's network namespace.
``check()`` checks the values and ``prepare()`` chooses the addresses against those on the host,
so a bad or clashing value never starts a child. ``host(pid)`` makes the pair with its inner end born in
the child's namespace as ``eth0`` (moving an existing link there waits for an RCU grace period;
making it there does not), addresses and raises the host end, then configures ``eth0`` and the
default route through a netlink socket opened *in* the child's namespace: a thread of the kernel
enters it with setns(2) (a network namespace belongs to a thread, not to the process), opens the
socket and ends. pyroute2's sync API cannot run in a thread whose asyncio loop is running, which
a Jupyter kernel's main thread is, so every netlink exchange runs in such a short-lived thread.

Deleting the host end deletes the pair, and so does the end of the child's network namespace:
even a kernel killed mid-cell leaves nothing behind, since its child dies with it.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import itertools
import os
import socket
import struct
import threading

from ..errors import OptionError, PrivilegeError, SetupError
from ..spec import Namespaces
from ..steps import do
from ..syscalls import CloneFlag, has_capability, setns
from .base import Part

CAP_NET_ADMIN = 12
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
#: The child's end of the pair, as it is named inside.
CHILD_IFNAME = "eth0"
#: Link-local space for an automatic pair, without the first and last /24 (RFC 3927 reserves
#: them) and without 169.254.169.0/24, where clouds serve instance metadata (169.254.169.254).
_AUTO_SPACE = ipaddress.IPv4Network("169.254.0.0/16")
_AUTO_AVOID = [ipaddress.IPv4Network(n) for n in ("169.254.0.0/24", "169.254.169.0/24", "169.254.255.0/24")]
#: How long a new pair waits for the pair of an earlier cell that used the same addresses and
#: whose clean-up is still in flight (the reaper removes it after the child's exit).
_WAIT_FOR_OURS = 5.0

_serial = itertools.count(1)
#: Host ends made by this process and not yet removed, with their networks.
_ours: dict[str, ipaddress.IPv4Network] = {}
_ours_changed = threading.Condition()

_IPRoute = None


def _pyroute2():
    """pyroute2's IPRoute, imported on first use in the kernel (a slow import, which a cell without --veth never pays)."""
    global _IPRoute, _NetlinkError
    if _IPRoute is None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        _IPRoute, _NetlinkError = IPRoute, NetlinkError
    return _IPRoute


class _NetlinkError(Exception):
    """Stands for pyroute2's NetlinkError until pyroute2 is imported."""

    code = 0


class Network(Part):
    def __init__(self, spec: Namespaces):
        self.lo = spec.lo or spec.veth is not None
        self.veth = spec.veth
        self.needs_host = spec.veth is not None
        self.host_ip: ipaddress.IPv4Interface | None = None
        self.child_ip: ipaddress.IPv4Interface | None = None
        self.host_ifname: str | None = None
        self.wanted: tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface] | None = None

    # -- kernel, before fork ----------------------------------------------------------------

    def check(self) -> None:
        if self.veth is None:
            return
        if not has_capability(CAP_NET_ADMIN):
            raise PrivilegeError(
                f"--veth needs CAP_NET_ADMIN on the host (a kernel run as root) to create a veth "
                f"pair there, which this kernel (uid {os.geteuid()}) does not have; without root, "
                "-r --lo gives the cell a network namespace with a working loopback (but no link "
                "to the host)"
            )
        self.wanted = _parse(self.veth) if self.veth else None

    def prepare(self) -> None:
        if self.veth is None:
            return
        _pyroute2()
        self.host_ip, self.child_ip = self._netlink(lambda ipr: _choose(ipr, self.wanted, self.veth))

    # -- kernel, while the child waits --------------------------------------------------------

    def host(self, pid: int) -> None:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._netlink(lambda ipr: self._make_pair(ipr, fd))
        finally:
            os.close(fd)

    def _make_pair(self, ipr, netns_fd: int) -> None:
        """Make the pair with its inner end born in the child's namespace (moving it there
        later would wait for an RCU grace period), then configure each end."""
        for _ in range(16):
            name = f"nsm{os.getpid():x}-{next(_serial) % 0x100000:x}"
            try:
                ipr.link("add", ifname=name, kind="veth", peer={"ifname": CHILD_IFNAME, "net_ns_fd": netns_fd})
            except _NetlinkError as e:
                if e.code == errno.EEXIST:
                    continue
                raise _kernel_error("creating a veth pair", e) from None
            break
        else:
            raise SetupError("--veth: could not find a free name for a veth pair (nsm...)")
        self.host_ifname = name
        with _ours_changed:
            _ours[name] = self.host_ip.network
        step = f"configuring the host end {name}"
        try:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=index, address=str(self.host_ip.ip), prefixlen=self.host_ip.network.prefixlen)
            ipr.link("set", index=index, state="up")
            step = f"configuring {CHILD_IFNAME} inside the child"
            setns(netns_fd, CloneFlag.NEWNET)  # this thread only; it ends after
            with _IPRoute() as inner:
                index = inner.link_lookup(ifname=CHILD_IFNAME)[0]
                inner.addr("add", index=index, address=str(self.child_ip.ip), prefixlen=self.child_ip.network.prefixlen)
                inner.link("set", index=index, state="up")
                inner.route("add", dst="0.0.0.0/0", gateway=str(self.host_ip.ip), oif=index)
        except _NetlinkError as e:
            raise _kernel_error(step, e) from None

    # -- the cell's process -----------------------------------------------------------------

    def inside(self) -> None:
        if self.lo:
            _bring_up("lo")
        if self.veth is not None:
            os.environ["NSMAGIC_VETH_HOST"] = str(self.host_ip.ip)
            os.environ["NSMAGIC_VETH_CHILD"] = str(self.child_ip.ip)

    # -- kernel, after ----------------------------------------------------------------------

    def explain(self) -> list[str]:
        """The kernel's netlink requests, as the ``ip`` commands a student would type (CHILD: the
        child's network namespace, which a thread of the kernel entered for the last three)."""
        if self.host_ifname is None:
            return []
        h, c = self.host_ifname, CHILD_IFNAME
        return [
            f"ip link add {h} type veth peer {c} netns CHILD",
            f"ip addr add {self.host_ip} dev {h}",
            f"ip link set {h} up",
            f"ip -n CHILD addr add {self.child_ip} dev {c}",
            f"ip -n CHILD link set {c} up",
            f"ip -n CHILD route add default via {self.host_ip.ip}",
        ]

    def cleanup(self) -> None:
        host, self.host_ifname = self.host_ifname, None
        if host is None:
            return
        try:
            self._netlink(lambda ipr: _delete(ipr, host))
        finally:
            with _ours_changed:
                _ours.pop(host, None)
                _ours_changed.notify_all()

    @staticmethod
    def _netlink(fn, netns: int | None = None):
        """``fn(ipr)`` in a thread of its own, where pyroute2 may run its asyncio loop; with
        *netns* (an fd), the thread first enters that network namespace (setns is per thread,
        and the thread ends after), so the socket is made there."""
        box: dict = {}

        def work():
            try:
                if netns is not None:
                    setns(netns, CloneFlag.NEWNET)
                with _IPRoute() as ipr:
                    box["value"] = fn(ipr)
            except BaseException as e:
                box["error"] = e

        worker = threading.Thread(target=work, name="nsmagic-netlink", daemon=True)
        worker.start()
        interrupted = False
        while worker.is_alive():  # an interrupt waits for the exchange (milliseconds) to end
            try:
                worker.join()
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt
        if "error" in box:
            raise box["error"]
        return box.get("value")


def _delete(ipr, ifname: str) -> None:
    try:
        ipr.link("del", ifname=ifname)
    except _NetlinkError as e:
        if e.code not in (errno.ENODEV, errno.ENOENT):  # gone with the child's namespace
            raise


def _kernel_error(what: str, e) -> Exception:
    text = f"--veth: {what} failed: {os.strerror(e.code)}"
    if e.code in (errno.EPERM, errno.EACCES):
        return PrivilegeError(f"{text} (it needs CAP_NET_ADMIN on the host; run the kernel as root)")
    return SetupError(text)


def _bring_up(ifname: str) -> None:
    """IFF_UP on *ifname*: what ``ip link set lo up`` does, without netlink or an exec."""
    def up():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = struct.pack("16sH22x", ifname.encode(), 0)
            flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", ifname.encode(), flags | IFF_UP))

    do(f"ioctl(SIOCSIFFLAGS, {ifname}, IFF_UP)", up,
       hints=f" (bringing {ifname} up needs CAP_NET_ADMIN in the network namespace; -r gives it rootless)")


# -- addresses ----------------------------------------------------------------------------------

def _parse(value: str) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """``HOST_CIDR[:CHILD_ADDR]`` -> the two ends' addresses, with the prefix of HOST_CIDR."""
    def bad(why: str) -> OptionError:
        return OptionError(f"--veth {value}: {why}; e.g. --veth 169.254.77.1/30 or "
                           "--veth 169.254.77.1/30:169.254.77.2, or --veth alone for a free pair")

    if value.count(":") > 1:
        raise bad("only IPv4 addresses are supported")
    host_text, _, child_text = value.strip().partition(":")
    if "/" not in host_text:
        raise bad(f"{host_text!r} has no prefix length")
    try:
        host = ipaddress.IPv4Interface(host_text)
    except ValueError:
        raise bad(f"{host_text!r} is not an IPv4 address with a prefix length") from None
    net = host.network
    if host.ip.is_multicast or host.ip.is_unspecified or host.ip.is_loopback:
        raise bad(f"{host.ip} is not an address a link can have")
    if net.num_addresses == 1:
        raise bad(f"a /{net.prefixlen} has no room for the child's address (use /30 or shorter)")
    first, last = _usable(net)
    if not first <= host.ip <= last:
        raise bad(f"{host.ip} is the {'network' if host.ip == net.network_address else 'broadcast'} "
                  f"address of {net}")
    if child_text:
        try:
            child = ipaddress.IPv4Address(child_text)
        except ValueError:
            raise bad(f"{child_text!r} is not an IPv4 address") from None
        if child not in net:
            raise bad(f"the child's address {child} is outside {net}")
        if child == host.ip:
            raise bad(f"the child's address {child} is the host end's own")
        if not first <= child <= last:
            raise bad(f"{child} is the network or broadcast address of {net}")
    else:
        child = host.ip + 1 if host.ip < last else first
    return host, ipaddress.IPv4Interface(f"{child}/{net.prefixlen}")


def _usable(net: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The first and last address an interface may have (a /31 has no broadcast, RFC 3021)."""
    if net.prefixlen >= 31:
        return net.network_address, net.broadcast_address
    return net.network_address + 1, net.broadcast_address - 1


def _host_networks(ipr) -> list[tuple[ipaddress.IPv4Network, str]]:
    """Every IPv4 network that has an address on the host, with its interface's name."""
    names = {link["index"]: link.get("ifname") for link in ipr.link("dump")}
    out = []
    for addr in ipr.addr("dump", family=socket.AF_INET):
        net = ipaddress.IPv4Network(f"{addr.get('address')}/{addr['prefixlen']}", strict=False)
        out.append((net, names.get(addr["index"], f"#{addr['index']}")))
    return out


def _choose(ipr, wanted, value: str):
    """The two ends' addresses: *wanted* if the host does not use its network, else a free pair."""
    if wanted is None:
        return _free_link_local(_host_networks(ipr))
    _check_unused(ipr, wanted[0].network, value)
    return wanted


def _check_unused(ipr, net: ipaddress.IPv4Network, value: str) -> None:
    """Refuse a network that overlaps one on the host: its routes would take the host's
    traffic. One of our own earlier pairs is waited for, since its removal is under way."""
    clashes = [(n, name) for n, name in _host_networks(ipr) if n.overlaps(net)]
    mine = [name for _, name in clashes if name in _ours]
    if clashes and len(mine) == len(clashes):
        with _ours_changed:
            _ours_changed.wait_for(lambda: not any(name in _ours for name in mine), _WAIT_FOR_OURS)
        clashes = [(n, name) for n, name in _host_networks(ipr) if n.overlaps(net)]
    if clashes:
        taken, name = clashes[0]
        raise OptionError(
            f"--veth {value}: {net} overlaps {taken} on the host's {name}; choose another prefix, "
            "or give --veth no value to pick a free link-local one"
        )


def _free_link_local(taken) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """A random /30 of 169.254.0.0/16 that overlaps nothing on the host.

    Random (from os.urandom, which leaves the notebook's own ``random`` state alone) so that
    kernels side by side rarely pick the same one.
    """
    avoid = _AUTO_AVOID + [n for n, _ in taken]
    count = _AUTO_SPACE.num_addresses // 4
    start = int.from_bytes(os.urandom(4), "little") % count
    for i in range(count):
        net = ipaddress.IPv4Network((int(_AUTO_SPACE.network_address) + 4 * ((start + i) % count), 30))
        if not any(net.overlaps(a) for a in avoid):
            return (ipaddress.IPv4Interface(f"{net.network_address + 1}/30"),
                    ipaddress.IPv4Interface(f"{net.network_address + 2}/30"))
    raise SetupError("--veth: every link-local /30 in 169.254.0.0/16 is in use; give addresses explicitly")
