"""The tutorial notebooks: stored executed, and runnable top to bottom as root and as a student.

* Pure: every stored notebook (the series and the tour) is a real run: every code cell has its
  outputs and an execution count, in order 1..n; only cells tagged ``raises-exception`` hold an
  error; each notebook of the series has 10-25 cells, opens with a capability check and closes
  with a summary.
* ``notebook`` + ``root``: each notebook of the series runs headless (nbclient, a real kernel) as
  root, from a temp copy; nbclient fails on an error in any cell not tagged ``raises-exception``.
  (The tour's root run, with a test per section, is tests/test_tour.py.)
* ``notebook`` + ``rootless``: the series and the tour as an unprivileged user (tests/rootless.py's
  user and venv; ``NSMAGIC_TEST_USER`` names the user), where steps that need root print a note.
  ``NSMAGIC_NOTEBOOK_OUT=DIR`` keeps each executed copy there, as ``student-NAME.ipynb``.

Both runs also check a few outputs per notebook: what each lesson says its cells show.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import nbformat
import pytest

import rootless

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SERIES = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))
STORED = [*SERIES, NOTEBOOKS / "tour.ipynb"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: Per notebook, (pattern, who) pairs that must match its outputs: who is "root", "user" or "both".
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "tour": [
        (r"not root: every cell below gets -r", "user"),
        (r"skipped: needs root here: a veth pair", "user"),
        (r"pid with default_options '-r --pid --mount-proc': 1\b", "user"),
    ],
    "01-clone": [
        (r"hostname inside:\s+warden-0", "both"),
        (r"queues inside: 1\b", "both"),
        (r"queues in the kernel: 0\b", "both"),
        (r"interfaces inside: \[\(1, 'lo'\)", "both"),
        (r"mounts named lesson01 in the kernel: 0", "both"),
        (r"namespaces that differ from the kernel's: \['ipc', 'mnt', 'net', 'pid', 'uts'", "root"),
        (r"NEWTIME:\s+the monotonic clock is \+24\.00 hours", "both"),
        (r"in the kernel: \{'handle': 'warden-0', 'cells': 1", "both"),
        (r"The cell runs as pid 1", "both"),
    ],
    "02-uts-ipc": [
        (r"hostname inside: lesson02", "both"),
        (r"the kernel's hostname is still", "both"),
        (r"joined: hostname held", "both"),
        (r"queues the cell sees: 0\b", "both"),
        (r"the kernel still sees its queue: True", "both"),
    ],
    "03-pid": [
        (r"getpid\(\) inside: 1\b", "both"),
        (r"NSpid:\s+\d+\s+1\b", "both"),
        (r"the orphan's parent is now: 1\b", "both"),
        (r"still running after PID 1 exited: False", "both"),
    ],
    "04-mounts": [
        (r"propagation of / inside: private", "both"),
        (r"written through the bind: .*hello from inside", "both"),
        (r"writing through --ro-bind: OSError.*Read-only file system", "both"),
        (r"/ holds: \['bin', 'dev', 'etc', 'proc', 'tmp'\]", "both"),
        (r"removed: True", "both"),
    ],
    "05-network": [
        (r"connecting to 127\.0\.0\.1: OSError Network is unreachable", "both"),
        (r"lo is up; a TCP connection", "both"),
        (r"skipped: needs root here: a veth pair", "user"),
        (r"1 received|64 bytes from 169\.254\.", "both"),
        (r"GET http://169\.254\.\d+\.\d+:8080/ -> hello from web, pid 1", "both"),
        (r"\"GET / HTTP/1\.1\" 200", "both"),
        (r"enter: nsenter -t \d+", "root"),  # a student's -r box is undumpable: root enters it
        (r"enter: sudo nsenter -t \d+ -U", "user"),
        (r"a one-shot cell in web's network namespace: \['lo', 'client'\]", "both"),
        (r"stopped box 'web'", "both"),
    ],
    "06-users": [
        (r"-U alone: uid 65534", "both"),
        (r"-r: uid 0\b", "both"),
        (r"sethostname on the host's UTS namespace: PermissionError", "both"),
        (r"capabilities inside: 4\d of them, including .*CAP_SYS_ADMIN", "both"),
        (r"capabilities of the kernel: 0 of them", "user"),
    ],
    "07-cgroups": [
        (r"killed by the OOM killer: memory limit 64M", "root"),
        (r"skipped: needs", "user"),
        (r"the pids limit stopped the cell at \d+ processes", "root"),
        (r"cgroup namespace: the cell sees its cgroup as /", "both"),
    ],
    "08-container": [
        (r"created: pid 1 on warden-0 - / holds \['bin', 'dev', 'etc', 'proc', 'tmp', 'www'\]", "both"),
        (r"PRETTY_NAME=\"warden-style busybox\"", "both"),
        (r"the server is still running: True", "both"),
        (r"the kernel, on the host, fetched: hello from inside the container", "root"),
        (r"needs root here: a veth pair to the host", "user"),
        (r"it fetched: hello from inside the container", "both"),
        (r"of 128\.0 MiB", "root"),
        (r"stopped box 'warden-0'", "both"),
        (r"removed: True", "both"),
    ],
}


def _load_tool():
    path = REPO / "tools" / "run-notebooks"
    loader = importlib.machinery.SourceFileLoader("run_notebooks", str(path))
    spec = importlib.util.spec_from_loader("run_notebooks", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _text(nb) -> str:
    """Every output of the notebook as text, streams and plain-text results alike."""
    return "\n".join(_text_of(c) for c in nb.cells if c.get("outputs"))


def _text_of(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type == "error":
            parts.append(f"{o.ename}: {o.evalue}")
        else:
            parts.append(str(o.get("data", {}).get("text/plain", "")))
    return ANSI.sub("", "\n".join(parts)).replace("\r\n", "\n")


def _check_errors_only_where_tagged(nb, name: str) -> None:
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        errors = [o for o in c.outputs if o.output_type == "error"]
        if "raises-exception" not in c.metadata.get("tags", []):
            assert not errors, f"{name}: an error in an untagged cell: {c.source[:200]!r}: {errors[0].evalue if errors else ''}"
        # nsmagic must not spill tracebacks of its own into a cell
        assert "nsmagic/" not in "".join(o.get("text", "") for o in c.outputs), c.source


def _check_expected(nb, name: str, who: str) -> None:
    text = _text(nb)
    for pattern, whom in EXPECTED.get(name, []):
        if whom in ("both", who):
            assert re.search(pattern, text, re.M), (
                f"{name} as {who}: no output matches {pattern!r}; the outputs, cell by cell:\n"
                + "\n".join(f"[{i}] {c.source[:60]!r}: {_text_of(c)[:300]!r}"
                             for i, c in enumerate(nb.cells) if c.cell_type == "code"))


# -- pure: the stored notebooks ------------------------------------------------------------------


def test_the_series_is_there():
    names = [p.stem for p in SERIES]
    assert names == ["01-clone", "02-uts-ipc", "03-pid", "04-mounts", "05-network", "06-users",
                     "07-cgroups", "08-container"], names


@pytest.mark.parametrize("path", STORED, ids=lambda p: p.stem)
def test_stored_notebook_is_executed(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: execution counts {counts}: run tools/run-notebooks"
    silent = [c.source[:60] for c in code if not c.outputs]
    assert not silent, f"{path.name}: code cells without outputs: {silent}"
    _check_errors_only_where_tagged(nb, path.stem)


@pytest.mark.parametrize("path", SERIES, ids=lambda p: p.stem)
def test_series_notebook_shape(path):
    nb = nbformat.read(path, as_version=4)
    assert 10 <= len(nb.cells) <= 25, f"{path.name} has {len(nb.cells)} cells"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "%load_ext nsmagic" in first_code.source and "ROOT" in first_code.source
    assert any(c.cell_type == "code" and c.source.startswith("%nsinfo") for c in nb.cells[:4])
    assert nb.cells[-1].cell_type == "markdown" and nb.cells[-1].source.startswith("## Summary")


@pytest.mark.parametrize("path", SERIES, ids=lambda p: p.stem)
def test_stored_outputs_say_what_the_lesson_says(path):
    """The stored copies were executed as root: their outputs match the root run's checks."""
    _check_expected(nbformat.read(path, as_version=4), path.stem, "root")


# -- executed as root ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series_copy(tmp_path_factory):
    """The notebooks directory copied, so a run never overwrites the stored notebooks."""
    target = tmp_path_factory.mktemp("notebooks") / "notebooks"
    shutil.copytree(NOTEBOOKS, target, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    return target


@pytest.mark.notebook
@pytest.mark.root
@pytest.mark.parametrize("path", SERIES, ids=lambda p: p.stem)
def test_runs_as_root(path, series_copy):
    if os.geteuid() != 0:
        pytest.skip("this run is the root one; the rootless run is test_runs_as_a_student")
    nb = _load_tool().execute(series_copy / path.name, timeout=120)
    _check_errors_only_where_tagged(nb, path.stem)
    _check_expected(nb, path.stem, "root")


# -- executed as an unprivileged user -------------------------------------------------------------


@pytest.fixture(scope="module")
def student():
    """A RootlessEnv whose venv also has what the lessons use (matplotlib), and a copy of the
    notebooks in the user's home."""
    reason = rootless.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with rootless.RootlessEnv() as env:
        subprocess.run([str(env.python), "-I", "-m", "pip", "install", "--quiet", "matplotlib"],
                       check=True, umask=0o022, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        work = env.home / "notebooks"
        shutil.copytree(NOTEBOOKS, work, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        for p in (work, *work.rglob("*")):
            os.chown(p, env.user.pw_uid, env.user.pw_gid)
        yield env, work


def _user_kernel_manager(env):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import Int

    class UserAsyncKernelManager(AsyncKernelManager):
        """As rootless._UserKernelManager, for nbclient (which drives an async manager)."""

        owner_uid = Int()
        owner_gid = Int()

        def write_connection_file(self, **kw) -> None:
            super().write_connection_file(**kw)
            os.chown(self.connection_file, self.owner_uid, self.owner_gid)

    return UserAsyncKernelManager(
        kernel_name=rootless.KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=env.kernel_dirs, ensure_native_kernel=False),
        connection_file=str(env.home / "runtime" / f"kernel-{os.urandom(6).hex()}.json"),
        owner_uid=env.user.pw_uid,
        owner_gid=env.user.pw_gid,
    )


@pytest.mark.notebook
@pytest.mark.rootless
@pytest.mark.parametrize("path", STORED, ids=lambda p: p.stem)
def test_runs_as_a_student(path, student):
    from jupyter_core.utils import run_sync

    env, work = student
    km = _user_kernel_manager(env)
    try:
        nb = _load_tool().execute(work / path.name, timeout=120, km=km, user=env.user.pw_uid,
                                  group=env.user.pw_gid, extra_groups=[], env=env.env)
    finally:
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)
    if os.environ.get("NSMAGIC_NOTEBOOK_OUT"):  # keep the student's run, to read it
        nbformat.write(nb, Path(os.environ["NSMAGIC_NOTEBOOK_OUT"]) / f"student-{path.name}")
    _check_errors_only_where_tagged(nb, path.stem)
    _check_expected(nb, path.stem, "user")
    # the lessons' temp dirs are removed by the lessons themselves
    assert not [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("lesson")
                and os.stat(os.path.join(tempfile.gettempdir(), p)).st_uid == env.user.pw_uid]
