"""The kernel-facing magic: ``%%innamespace`` and ``%innamespace``.

Thin by design: it turns options into a :class:`~nsmagic.spec.Namespaces` request, asks
:func:`nsmagic.runner.execute` to run the cell in a child, puts the ``-o`` variables into the
user's namespace, and returns the cell's value for IPython to display.
"""

from __future__ import annotations

import argparse
import keyword
import math
import re

from IPython import get_ipython
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Float, TraitError, Unicode, validate

from . import box as box_module, info, link as link_module, listing, runner
from .errors import OptionError
from .kinds import JOINABLE
from .shell import box_executor, cell_job, compile_cell
from .spec import Namespaces


#: The longest wait nsmagic accepts, about 31 years: finite, and far inside what poll(2) and the
#: clocks can count.
MAX_SECONDS = 1e9
#: The longest a cell's child gets between SIGINT and SIGKILL.
MAX_GRACE = 3600.0


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds")
    return value


def _seconds(text: str) -> float:
    value = _number(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: the timeout must be a positive number of seconds, "
                                         f"at most {MAX_SECONDS:g}")
    return value


def _offset(text: str) -> float:
    """A clock offset in seconds (its range depends on the clock: see nsmagic.spec)."""
    return _number(text)


class _MountPair(argparse.Action):
    """``--bind SRC:DST``, or bubblewrap's two words ``--bind SRC DST``; repeatable."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 1:
            pair = values[0]
        elif len(values) == 2 and ":" not in values[0]:
            pair = f"{values[0]}:{values[1]}"
        else:
            raise argparse.ArgumentError(self, f"expected SRC:DST or SRC DST, not {' '.join(values)!r}")
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), pair])


def _box_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a box name: use letters, digits, '.', '_' or '-' (at most 64), "
            "starting with a letter or digit")
    return text


def _split_options(line: str) -> list[str]:
    import shlex

    try:
        return shlex.split(line)
    except ValueError as e:
        raise UsageError(f"could not read {line!r}: {e}") from None


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more variable names, separated by commas")
    for name in names:
        if not name.isidentifier():
            raise argparse.ArgumentTypeError(f"{name!r} is not a Python variable name")
        if keyword.iskeyword(name):
            raise argparse.ArgumentTypeError(f"{name!r} is a Python keyword, not a variable name")
    return names


class ChildValue:
    """Stands in the kernel for a cell value that could not be pickled: it displays as the
    child displayed it (the child's own mime bundle), but the object itself stayed behind."""

    def __init__(self, bundle: tuple[dict, dict]):
        self.data, self.metadata = bundle

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<a value of the namespaced cell>"))


class NotebookSinks(runner.Sinks):
    """Publishes the child's display data to the notebook as the kernel's own."""

    def display(self, data, metadata, transient, update):
        from IPython.display import publish_display_data

        publish_display_data(data, metadata, transient=transient or None, update=update)

    def clear_output(self, wait):
        from IPython.display import clear_output

        clear_output(wait=wait)

    def explain(self, explanation):
        from IPython.display import display

        display(explanation)

    def iopub(self, msg_type, content, metadata, ident, buffers):
        kernel = getattr(get_ipython(), "kernel", None)
        if kernel is not None:
            kernel.session.send(kernel.iopub_socket, msg_type, content, parent=kernel.get_parent(),
                                ident=ident, buffers=buffers, metadata=metadata)


@magics_class
class InNamespaceMagics(Magics):
    """Run cells in fresh Linux namespaces. Configure with ``%config InNamespaceMagics.<name>``."""

    grace_period = Float(
        1.0,
        help="Seconds an interrupted or timed-out cell's child gets to run its finally blocks "
        "after SIGINT, before SIGKILL ends it and everything in its namespaces.",
    ).tag(config=True)

    default_options = Unicode(
        "",
        help="Options put in front of every cell's own, e.g. '--pid --mount-proc' for a "
        "tutorial where every cell should be PID 1.",
    ).tag(config=True)

    default_timeout = Float(
        0.0, help="A --timeout (seconds) for cells that give none; 0 means no timeout."
    ).tag(config=True)

    @validate("grace_period")
    def _check_grace(self, proposal):
        value = proposal["value"]
        if not (math.isfinite(value) and 0 <= value <= MAX_GRACE):
            raise TraitError(f"grace_period = {value!r}: give seconds from 0 to {MAX_GRACE:g}")
        return value

    @validate("default_timeout")
    def _check_default_timeout(self, proposal):
        value = proposal["value"]
        if not (math.isfinite(value) and 0 <= value <= MAX_SECONDS):
            raise TraitError(f"default_timeout = {value!r}: give seconds from 0 (none) to {MAX_SECONDS:g}")
        return value

    @magic_arguments()
    @argument("-m", "--mount", action="store_true", help="new mount namespace (CLONE_NEWNS)")
    @argument("-u", "--uts", action="store_true", help="new UTS namespace: hostname (CLONE_NEWUTS)")
    @argument("-i", "--ipc", action="store_true", help="new IPC namespace: SysV IPC, POSIX queues (CLONE_NEWIPC)")
    @argument("-n", "--net", action="store_true",
              help="new network namespace: a down lo, no link to the host (CLONE_NEWNET)")
    @argument("-p", "--pid", action="store_true", help="new PID namespace: the cell runs as PID 1 (CLONE_NEWPID)")
    @argument("-U", "--user", action="store_true",
              help="new user namespace; without -r the cell runs as the overflow uid 65534 (CLONE_NEWUSER)")
    @argument("-C", "--cgroup", action="store_true", help="new cgroup namespace (CLONE_NEWCGROUP)")
    @argument("-T", "--time", action="store_true",
              help="new time namespace (CLONE_NEWTIME); see --monotonic and --boottime")
    @argument("-r", "--map-root-user", action="store_true",
              help="be root inside: map uid and gid 0 to the kernel's; implies -U; works without root")
    @argument("--mount-proc", action="store_true",
              help="mount a fresh /proc (implies -m); with -p, /proc and ps show only the namespace's processes")
    @argument("--hostname", metavar="NAME", help="set the hostname inside (implies -u)")
    @argument("--monotonic", metavar="SECONDS", type=_offset, default=0.0,
              help="shift CLOCK_MONOTONIC inside by SECONDS (implies -T)")
    @argument("--boottime", metavar="SECONDS", type=_offset, default=0.0,
              help="shift CLOCK_BOOTTIME inside by SECONDS (implies -T)")
    @argument("--lo", action="store_true", help="bring the loopback interface up inside (implies -n)")
    @argument("--veth", metavar="HOST_CIDR[:CHILD_ADDR]", nargs="?", const="",
              help="a veth pair to the kernel: addresses on both ends, lo up, a default route via the "
              "host end; with no value, a free link-local /30 (implies -n)")
    @argument("--join-net", metavar="TARGET", help="enter an existing network namespace: a path "
              "(/proc/PID/ns/net, /run/netns/NAME), a PID, or a name made with ip netns add")
    @argument("--join-uts", metavar="TARGET", help="enter an existing UTS namespace (path or PID)")
    @argument("--join-ipc", metavar="TARGET", help="enter an existing IPC namespace (path or PID)")
    @argument("--join-mnt", metavar="TARGET", help="enter an existing mount namespace (path or PID)")
    @argument("--join-pid", metavar="TARGET", help="enter an existing PID namespace (path or PID)")
    @argument("--join-user", metavar="TARGET", help="enter an existing user namespace (path or PID)")
    @argument("--memory", metavar="SIZE", help="cgroup memory limit, e.g. 64M")
    @argument("--pids", metavar="N", type=int, help="cgroup limit on the number of processes")
    @argument("--cpus", metavar="FRACTION", type=float, help="cgroup CPU limit, e.g. 0.5 for half a CPU")
    @argument("--tmpfs", metavar="DIR", action="append", default=[], help="mount a fresh tmpfs on DIR (implies -m)")
    @argument("--bind", metavar="SRC:DST", nargs="+", action=_MountPair, default=[],
              help="bind-mount SRC on DST (implies -m); bubblewrap's two words SRC DST work too")
    @argument("--ro-bind", metavar="SRC:DST", nargs="+", action=_MountPair, default=[],
              help="bind-mount SRC on DST read-only (implies -m); or SRC DST")
    @argument("--rootfs", metavar="DIR", help="pivot into the root filesystem prepared in DIR (implies -m)")
    @argument("-f", "--fork", action="store_true",
              help="accepted for unshare(1) habits; the cell always runs in a forked child")
    @argument("-o", "--out", metavar="NAMES", type=_names, action="append", default=[],
              help="comma-separated variables to bring back into the kernel when the cell ends (repeatable)")
    @argument("--explain", action="store_true",
              help="first show each system call made for the cell and the kernel's and the cell's "
              "namespaces side by side")
    @argument("--timeout", metavar="SECONDS", type=_seconds,
              help="kill the cell's child and its namespaces after SECONDS (in a box: interrupt the cell)")
    @argument("--name", metavar="BOX", type=_box_name,
              help="run in box BOX, a container that lives across cells with its own Python state: "
              "the first use makes it with this cell's options, later cells run in it (%%nsls, %%nsstop)")
    @argument("--in", metavar="NAMES", dest="inputs", type=_names, action="append", default=[],
              help="(with --name) comma-separated kernel variables to copy into the box before the cell "
              "(repeatable)")
    @argument("--no-defaults", action="store_true",
              help="leave InNamespaceMagics.default_options out for this cell")
    @argument("code", nargs="*", help="(line magic only) the Python statement to run")
    @line_cell_magic
    def innamespace(self, line: str, cell: str | None = None):
        """Run a cell (or one line) in a child process with fresh Linux namespaces.

        The child is a copy-on-write fork of this kernel: it sees every variable, import and
        function defined so far, its output appears here live, and its final expression is
        the cell's result. Nothing it changes comes back except the variables named with -o.

        Examples::

            %%innamespace --net --pid --mount-proc -o rx
            import os, socket
            print(os.getpid(), socket.if_nameindex())
            rx = open("/proc/net/dev").read()

            %innamespace -r --hostname box socket.gethostname()

        Option letters are those of util-linux unshare(1).
        """
        args, spec, code, shown_source, line_offset, outputs, timeout = self._request(line, cell)
        if args.name is not None:
            result = self._in_box(args, spec, code, shown_source, line_offset, outputs, timeout)
        else:
            if args.inputs:
                raise UsageError("--in copies variables into a box: it goes with --name BOX (a one-shot "
                                 "cell already sees every variable of the kernel)")
            job = cell_job(self.shell, code, shown_source=shown_source, line_offset=line_offset)
            try:
                result = runner.execute(job, spec, outputs=outputs, timeout=timeout,
                                        sinks=NotebookSinks(), grace=self.grace_period,
                                        namespace=self.shell.user_ns, explain=args.explain)
            except OptionError as e:  # a value only a part could check (a missing rootfs, a bad CIDR)
                raise UsageError(str(e)) from None
        if result.values:
            self.shell.push(result.values)
        result.raise_for_errors()
        if result.bundle is not None:
            return ChildValue(result.bundle)
        return result.value

    def _request(self, line: str, cell: str | None):
        """Everything a run needs from the magic's line (and cell), every value checked: a
        :class:`UsageError` naming the option for anything wrong, before any child exists."""
        if cell is None:
            options, code = self._split_line(line)
            shown_source, line_offset = code, 0
        else:
            options, code = line, cell
            shown_source, line_offset = f"%%innamespace {line}\n{cell}", 1
        args = self._parse(options)
        if self.default_options and not args.no_defaults:
            args = self._parse(f"{self.default_options} {options}")
        if cell is not None and args.code:
            raise UsageError(f"unexpected arguments {' '.join(args.code)!r}: %%innamespace takes "
                             "only options on its line; the code goes in the cell")
        if not code.strip():
            raise UsageError("nothing to run: give %innamespace some code after its options")
        try:
            spec = Namespaces(
                mount=args.mount, uts=args.uts, ipc=args.ipc, net=args.net, pid=args.pid,
                user=args.user, cgroup=args.cgroup, time=args.time,
                map_root_user=args.map_root_user, mount_proc=args.mount_proc,
                hostname=args.hostname, monotonic=args.monotonic, boottime=args.boottime,
                lo=args.lo, veth=args.veth, join=self._joins(args),
                memory=args.memory, pids=args.pids, cpus=args.cpus,
                tmpfs=list(args.tmpfs), bind=list(args.bind), ro_bind=list(args.ro_bind), rootfs=args.rootfs,
            )
        except OptionError as e:
            raise UsageError(str(e)) from None
        outputs = [name for group in args.out for name in group]
        timeout = args.timeout or self.default_timeout or None
        return args, spec, code, shown_source, line_offset, outputs, timeout

    def _joins(self, args) -> dict[str, str]:
        """The --join-KIND targets, with a box's name standing for its namespace."""
        joins = {}
        for kind in JOINABLE:
            target = getattr(args, f"join_{kind}")
            if target is None:
                continue
            found = box_module.get(target)
            if found is not None:
                if found.state == box_module.DEAD:
                    raise UsageError(f"--join-{kind} {target}: box {target!r} has ended ({found.death})")
                target = found.ns_path(kind)
            joins[kind] = target
        return joins

    def _in_box(self, args, spec: Namespaces, code: str, shown_source: str, line_offset: int,
                outputs: list[str], timeout):
        """Run the cell in box ``--name``, making it first if it does not exist."""
        inputs = {}
        for name in (n for group in args.inputs for n in group):
            if name not in self.shell.user_ns:
                raise UsageError(f"--in {name}: the kernel has no variable {name!r}")
            inputs[name] = self.shell.user_ns[name]
        found = box_module.get(args.name)
        if found is not None and found.state == box_module.DEAD:  # it ended between cells
            box_module.forget(found)
            raise found.death_error
        if found is not None:
            conflicts = box_module.conflicts(spec, found.spec)
            if conflicts:
                raise UsageError(f"box {args.name!r} was made with {found.spec.describe()}; this cell asks "
                                 f"for {', '.join(conflicts)}. A box's options are fixed when it is made: "
                                 f"drop them (options may be omitted on later cells), or %nsstop {args.name} "
                                 "and make it again")
        prepared = compile_cell(self.shell, code, shown_source=shown_source, line_offset=line_offset)
        try:
            request = box_module.Box.request(prepared, shown_source, inputs=inputs, outputs=outputs,
                                             explain=args.explain and found is not None)
        except Exception as e:
            raise UsageError(f"--in: could not pickle the variables for box {args.name!r}: {e}") from None
        sinks = NotebookSinks()
        try:
            if found is None:
                found = box_module.Box(spec, name=args.name, sinks=sinks, grace=self.grace_period,
                                       timeout=timeout, explain=args.explain, executor=box_executor(self.shell))
            return found.execute(request, timeout=timeout, sinks=sinks, namespace=self.shell.user_ns)
        except OptionError as e:
            raise UsageError(str(e)) from None

    @line_magic
    def nsls(self, line: str = ""):
        """List the live boxes of this kernel: name, host PID (of the process that runs the
        box's cells), state, namespaces, uptime, processes, memory, and the ``nsenter`` line a
        terminal user types to enter the box."""
        if line.strip():
            raise UsageError("%nsls takes no arguments")
        return listing.table(box_module.boxes().values())

    @line_magic
    def nsstop(self, line: str = ""):
        """``%nsstop NAME...`` or ``%nsstop --all``: end boxes and everything in them; their
        links, cgroups and mounts are removed."""
        names = _split_options(line)
        if not names:
            raise UsageError("%nsstop needs the names of boxes to stop, or --all (see %nsls)")
        known = box_module.boxes()
        if names == ["--all"]:
            names = list(known)
        for name in names:
            if name not in known:
                hint = f"live boxes: {', '.join(known)}" if known else "there are no boxes"
                raise UsageError(f"%nsstop {name}: no box is named {name!r} ({hint})")
        for name in names:
            box = known[name]
            pid = box.worker
            box.stop()
            print(f"stopped box {name!r} (pid {pid})")

    @line_magic
    def nslink(self, line: str = ""):
        """``%nslink A B [ADDR_A ADDR_B]``: a veth pair between the network namespaces of boxes A
        and B, both ends up, with the addresses given (CIDR) or a free link-local /30."""
        words = _split_options(line)
        if len(words) not in (2, 4):
            raise UsageError("%nslink takes two box names and optionally an address for each: "
                             "%nslink A B [ADDR_A/PREFIX ADDR_B/PREFIX]")
        known = box_module.boxes()
        for name in words[:2]:
            if name not in known or known[name].state == box_module.DEAD:
                raise UsageError(f"%nslink: no live box is named {name!r} (see %nsls)")
        try:
            return link_module.link(known[words[0]], known[words[1]], *words[2:])
        except OptionError as e:
            raise UsageError(str(e)) from None

    @line_magic
    def nsinfo(self, line: str = ""):
        """Show what this kernel can isolate: every namespace kind, the kernel's own inode,
        whether a fresh one can be made now (probed for real) and whether that needs -r, plus
        the cgroup version and the user-namespace settings, with a hint for what is missing."""
        return info.probe()

    def _parse(self, options: str) -> argparse.Namespace:
        """The meaning of an option line, parsed once per distinct line and kept (at most
        256 lines; the parse is pure, and the result is only read). A notebook repeats the same
        few lines, and argparse walks all of this magic's options: right after the previous
        cell's fork, each object it touches costs the kernel a page fault (docs/performance.md).
        Together with each cell compiled once (nsmagic.source), this keeps a repeated line off
        every cell's path."""
        cache = self.__dict__.setdefault("_parsed", {})
        args = cache.get(options)
        if args is None:
            try:
                args = parse_argstring(self.innamespace, options)
            except ValueError as e:  # shlex: an unbalanced quote
                raise UsageError(f"the option line {options.strip()!r} cannot be split into words "
                                 f"({e}); close the quote, or escape it with a backslash") from None
            if len(cache) >= 256:
                cache.clear()
            cache[options] = args
        return args

    def _split_line(self, line: str) -> tuple[str, str]:
        """Split a line magic into its options and its code, keeping the code verbatim
        (quotes and spacing matter in Python, so it must not go through shlex)."""
        parser = self.innamespace.parser
        pos = 0
        while True:
            m = _TOKEN.match(line, pos)
            if m is None:
                return line, ""
            token = m.group(1)
            if token == "--":
                return line[:m.start(1)], line[m.end():]
            if not token.startswith("-") or token == "-" or _is_number(token):
                return line[:m.start(1)], line[m.start(1):]
            pos = m.end()
            takes = _takes_value(parser, token)
            if takes:
                value = _TOKEN.match(line, pos)
                # An optional value (--veth) is taken only if it looks like one (an address).
                if value is not None and (takes != "?" or value.group(1)[:1].isdigit()):
                    pos = value.end()
                    # bubblewrap's --bind SRC DST: a value without ':' has a second word
                    if takes == "pair" and ":" not in value.group(1):
                        second = _TOKEN.match(line, pos)
                        if second is not None:
                            pos = second.end()


_TOKEN = re.compile(r"\s*(\S+)")


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


class _NegativeNumbers:
    """What argparse asks of its ``_negative_number_matcher``: whether a word beginning with
    ``-`` is a value rather than an option. Its own pattern knows ``-5`` and ``-.5`` but not
    ``-1e12``, which it then reads as an unknown option (``--boottime -1e12``: "expected one
    argument"); no option of this magic looks like a number, so any number is a value. (``-inf``
    still reads as ``-i`` with a value; ``--monotonic=-inf`` gets the range message.)"""

    @staticmethod
    def match(token: str) -> bool:
        return token.startswith("-") and _is_number(token)


if hasattr(InNamespaceMagics.innamespace.parser, "_negative_number_matcher"):  # argparse's, since 2.7
    InNamespaceMagics.innamespace.parser._negative_number_matcher = _NegativeNumbers()


def _long_option(parser: argparse.ArgumentParser, token: str):
    """The action of a long option as argparse reads it: exact, or a unique abbreviation."""
    actions = parser._option_string_actions
    if token in actions:
        return actions[token]
    matches = {actions[o] for o in actions if o.startswith("--") and o.startswith(token)}
    return matches.pop() if len(matches) == 1 else None


def _takes_value(parser: argparse.ArgumentParser, token: str) -> bool | str:
    """Whether *token* is an option whose value is the next token ("?" if it may be)."""
    if token.startswith("--"):
        if "=" in token:
            return False
        action = _long_option(parser, token)
        if action is not None and action.nargs == "?":
            return "?"
        if isinstance(action, _MountPair):
            return "pair"
        return action is not None and action.nargs != 0
    if "=" in token:
        return False
    for i, letter in enumerate(token[1:]):
        action = parser._option_string_actions.get(f"-{letter}")
        if action is not None and action.nargs != 0:
            return i == len(token) - 2  # '-o' alone, or last of a cluster: value is next
    return False

