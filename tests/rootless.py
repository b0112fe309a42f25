"""A real Jupyter kernel running as an unprivileged user, to test nsmagic's rootless behaviour.

The tests run as root, which may create any namespace; rootless behaviour (a user namespace is
needed first) can only be observed from a process without privileges.  `RootlessEnv` sets one up
and removes it again:

* a user ``nsmagic-test`` made with ``useradd`` (reused, and then not deleted, if it already
  exists), with its own home and Jupyter/IPython dirs in a temp dir;
* a fresh venv of Debian's ``/usr/bin/python3``, because the project Python lives under /root
  (mode 700) where the user cannot execute it.  It gets `REQUIREMENTS` plus nsmagic itself,
  installed non-editable from a copy of the repo: the copy is readable wherever the repo lives
  and the build's ``build/`` and ``*.egg-info`` stay out of the repo.  No cache is kept between
  sessions, so the kernel always runs the current source; the set-up takes 10-25 s here;
* kernels started through jupyter_client, which hands ``user=``/``group=``/``extra_groups=`` to
  ``subprocess.Popen``; ``extra_groups=[]`` drops root's supplementary groups.

Everything lives under one ``tempfile.mkdtemp()`` directory that is deleted at the end, together
with the user if this session created it (after killing whatever still runs as that user: only
our kernels ran as it).  Not safe for two sessions at once (e.g. pytest-xdist): they share the
user name.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from traitlets import Int

from kernel import Kernel

REPO = Path(__file__).resolve().parent.parent
USER = os.environ.get("NSMAGIC_TEST_USER", "nsmagic-test")  # distinct names let two suites run at once
SYSTEM_PYTHON = "/usr/bin/python3"
REQUIREMENTS = ("ipykernel", "jupyter_client", "cloudpickle", "traitlets", "ipython")
KERNEL_NAME = "nsmagic-rootless"
#: Left out of the copy of the repo that gets installed: VCS data, caches, build output.
SOURCE_IGNORE = shutil.ignore_patterns(
    ".git", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".venv", "venv", "build", "dist", "*.egg-info",
)


def unavailable_reason() -> str | None:
    """Why this machine cannot run rootless tests, or None if it can."""
    if os.geteuid() != 0:
        return "rootless tests need root, to create the unprivileged user"
    for tool in ("useradd", "userdel"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
            return f"rootless tests need {tool} (Debian package passwd)"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"rootless tests need {SYSTEM_PYTHON}, which another user can execute"
    return None


class RootlessKernel(Kernel):
    """A `Kernel` whose process runs as *user*, with the venv interpreter *python*."""

    def __init__(self, km: KernelManager, user: pwd.struct_passwd, python: Path, **kw):
        super().__init__(km, **kw)
        self.user = user
        self.python = python


class _UserKernelManager(KernelManager):
    """A KernelManager whose connection file the kernel's user can read.

    jupyter_client writes it as the caller (root) with mode 0600, just before launching.
    """

    owner_uid = Int()
    owner_gid = Int()

    def write_connection_file(self, **kw) -> None:
        super().write_connection_file(**kw)
        os.chown(self.connection_file, self.owner_uid, self.owner_gid)


class RootlessEnv:
    """The user and venv for rootless kernels: a context manager that builds and removes them.

    ``with RootlessEnv() as env:`` then ``env.kernel()`` (a context manager) or
    ``env.start_kernel()`` for as many kernels as needed; starting one takes about a second.
    """

    def __init__(self, repo: Path = REPO, user: str = USER):
        self.repo = Path(repo)
        self.user_name = user
        self._stack = ExitStack()
        self._kernels: list[RootlessKernel] = []

    def __enter__(self) -> "RootlessEnv":
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            for kernel in self._kernels:
                if kernel.km.has_kernel:  # started with start_kernel() and never shut down
                    kernel.shutdown()
        finally:
            self._stack.close()

    def _setup(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nsmagic-rootless-"))
        self._stack.callback(shutil.rmtree, self.root, ignore_errors=True)
        self.root.chmod(0o755)  # mkdtemp makes it 0700; the user must reach the venv
        self.home = self.root / "home"
        self.user, created = _ensure_user(self.user_name, self.home)
        if created:
            self._stack.callback(_remove_user, self.user)
        for sub in (".ipython", ".jupyter", ".local/share/jupyter", "runtime"):
            (self.home / sub).mkdir(parents=True)
        for path in (self.home, *self.home.rglob("*")):
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.home.chmod(0o700)
        source = shutil.copytree(self.repo, self.root / "src", ignore=SOURCE_IGNORE)
        self.python = _build_venv(self.root / "venv", [*REQUIREMENTS, str(source)])
        self.kernel_dirs = [str(self.root / "kernels")]
        spec_dir = self.root / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [str(self.python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "nsmagic rootless",
            "language": "python",
        }))

    @property
    def env(self) -> dict[str, str]:
        """The kernel's whole environment: nothing of root's leaks in."""
        home = str(self.home)
        return {
            "HOME": home,
            "USER": self.user.pw_name,
            "LOGNAME": self.user.pw_name,
            "PATH": f"{self.python.parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
            "IPYTHONDIR": f"{home}/.ipython",
            "JUPYTER_CONFIG_DIR": f"{home}/.jupyter",
            "JUPYTER_DATA_DIR": f"{home}/.local/share/jupyter",
            "JUPYTER_RUNTIME_DIR": f"{home}/runtime",
        }

    def start_kernel(self, timeout: float = 60) -> RootlessKernel:
        """Start a kernel as the user and wait until it answers.

        The caller shuts it down; leaving the env shuts down any it forgot.
        """
        km = _UserKernelManager(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=KernelSpecManager(
                kernel_dirs=self.kernel_dirs, ensure_native_kernel=False
            ),
            connection_file=str(self.home / "runtime" / f"kernel-{os.urandom(6).hex()}.json"),
            owner_uid=self.user.pw_uid,
            owner_gid=self.user.pw_gid,
        )
        km.start_kernel(
            user=self.user.pw_uid,
            group=self.user.pw_gid,
            extra_groups=[],
            env=self.env,
            cwd=str(self.home),
        )
        try:
            kernel = RootlessKernel(km, self.user, self.python, timeout=timeout)
        except BaseException:
            km.shutdown_kernel(now=True)
            raise
        self._kernels.append(kernel)
        return kernel

    @contextmanager
    def kernel(self, timeout: float = 60) -> Iterator[RootlessKernel]:
        kernel = self.start_kernel(timeout)
        try:
            yield kernel
        finally:
            kernel.shutdown()


def _ensure_user(name: str, home: Path) -> tuple[pwd.struct_passwd, bool]:
    """The user *name*, created (without a password, login shell or mail) if missing.

    Returns the passwd entry and whether it was created here.
    """
    try:
        user, created = pwd.getpwnam(name), False
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--home-dir", str(home),
             "--shell", "/usr/sbin/nologin", "--user-group", name],
            check=True, env=_sbin_env(),
        )
        user, created = pwd.getpwnam(name), True
    if user.pw_uid == 0 or user.pw_gid == 0:
        raise RuntimeError(f"user {name} is privileged (uid {user.pw_uid}, gid {user.pw_gid})")
    return user, created


def _remove_user(user: pwd.struct_passwd, timeout: float = 10) -> None:
    """Kill what still runs as *user* (only our kernels' leftovers can), then delete the user."""
    deadline = time.monotonic() + timeout
    while pids := _pids_of(user.pw_uid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {user.pw_name} survived SIGKILL: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    subprocess.run(["userdel", user.pw_name], check=True, env=_sbin_env())


def _pids_of(uid: int) -> list[int]:
    """Processes whose real, effective, saved or filesystem uid is *uid* (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(
                line.split(":\t", 1) for line in (entry / "status").read_text().splitlines()
            )
        except (OSError, ValueError):
            continue
        if fields.get("State", "").startswith("Z"):
            continue  # already dead; its parent reaps it
        if str(uid) in fields.get("Uid", "").split():
            pids.append(int(entry.name))
    return pids


def _build_venv(path: Path, requirements: list[str]) -> Path:
    """A venv of `SYSTEM_PYTHON` at *path* with *requirements*; returns its python.

    Built as root with pip's configured index, with umask 022 so the user can read every file.
    ``-I`` keeps root's ``PYTHONPATH``/``PYTHONHOME`` (e.g. from pyenv) out of Debian's Python.
    """
    run = dict(check=True, umask=0o022, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        subprocess.run([SYSTEM_PYTHON, "-I", "-m", "venv", str(path)], **run)
        python = path / "bin" / "python"
        subprocess.run(
            [str(python), "-I", "-m", "pip", "install", "--quiet", *requirements], **run
        )
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"building the rootless venv failed: {e.cmd}\n{e.output}") from None
    return python


def _sbin_env() -> dict[str, str]:
    """Our environment with the sbin dirs on PATH, where useradd and userdel live."""
    return {**os.environ, "PATH": f"/usr/sbin:/sbin:{os.environ.get('PATH', '/usr/bin:/bin')}"}
