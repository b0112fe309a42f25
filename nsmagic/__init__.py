"""nsmagic: run a Jupyter cell inside fresh Linux namespaces.

In a notebook::

    %load_ext nsmagic

    %%innamespace --net --pid --mount-proc -o rx
    import os, socket
    print(os.getpid(), socket.if_nameindex())
    rx = open("/proc/net/dev").read()

Without IPython, :func:`run` calls a function and :func:`run_code` runs a code string in a child
with the namespaces of a :class:`Namespaces` request.
"""

from .linux import check_system

check_system()  # before the modules that load Linux's system calls: one line on macOS, not a traceback

from .box import Box  # noqa: E402
from .errors import (  # noqa: E402
    BoxDied,
    CellError,
    CellTimeout,
    ChildDied,
    NsmagicError,
    OptionError,
    OutputError,
    PrivilegeError,
    ProtocolError,
    SetupError,
)
from .outcome import Result  # noqa: E402
from .runner import Sinks, execute, run, run_code
from .spec import Namespaces
from .syscalls import CloneFlag

__version__ = "0.1.0"

__all__ = [
    "Box", "BoxDied", "CellError", "CellTimeout", "ChildDied", "CloneFlag", "Namespaces", "NsmagicError",
    "OptionError", "OutputError", "PrivilegeError", "ProtocolError", "Result", "SetupError",
    "Sinks", "execute", "run", "run_code", "load_ipython_extension",
]


def load_ipython_extension(ipython) -> None:
    """``%load_ext nsmagic``: register ``%%innamespace``, and start the kernel's sentinel (which
    also sweeps what kernels that died left behind: see nsmagic.sentinel)."""
    from .linux import check
    from .magics import InNamespaceMagics
    from .sentinel import guard

    check()  # one line on a Linux too old for any cell, not a traceback in the first one

    ipython.register_magics(InNamespaceMagics)
    guard.start()


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext nsmagic``: stop the boxes and remove the magics again."""
    from .box import stop_all
    from .magics import InNamespaceMagics

    stop_all()
    for kind, names in InNamespaceMagics.magics.items():
        for name in names:
            ipython.magics_manager.magics[kind].pop(name, None)
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, InNamespaceMagics)]
