"""A student's view: JupyterLab in a headless Chromium runs the first tutorial with Run All.

JupyterLab is started on a free loopback port with a random token, serving a temp copy of
notebooks/ (so the stored notebooks are never touched); Debian's ``chromium``, driven by
Playwright with its ``executable_path`` (Playwright's own browser download is never used), opens
``01-clone.ipynb`` with its outputs cleared, runs Run > Run All Cells, waits until every code cell
has its execution count, and checks in the page what the cells print.  The page is saved as a
screenshot: to ``$NSMAGIC_SCREENSHOT`` when set (``NSMAGIC_SCREENSHOT=docs/screenshot.png``
refreshes the README's), else into the test's temp dir.

Needs: ``pip install -e ".[lab]"`` (jupyterlab, playwright) and ``apt install chromium``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "01-clone.ipynb"

#: What the page must show once Run All is done (cells of 01-clone.ipynb).
EXPECTED = [
    r"hostname inside:\s+warden-0",
    r"queues in the kernel: 0",
    r"interfaces inside: \[\(1, 'lo'\)",
    r"NEWTIME:\s+the monotonic clock is \+24\.00 hours",
    r"in the kernel: \{'handle': 'warden-0', 'cells': 1",
    r"The cell runs as pid 1",
    r"hello from warden-0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on loopback serving a copy of notebooks/ with cleared outputs:
    yields its base URL with the token."""
    import jupyterlab  # noqa: F401  (in the test extra: a missing install is a failure, not a skip)

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt install chromium (or deselect with -m 'not browser')")
    root = tmp_path_factory.mktemp("lab")
    work = root / "notebooks"
    shutil.copytree(REPO / "notebooks", work, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    nb = nbformat.read(work / NOTEBOOK, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nbformat.write(nb, work / NOTEBOOK)
    # settings of this server only: no news pop-up over the page, and every cell in the page (not
    # only those in view), so that all can be checked
    settings = root / "settings" / "@jupyterlab"
    for extension, name, values in (
        ("apputils-extension", "notification", {"fetchNews": "false"}),
        ("notebook-extension", "tracker", {"windowingMode": "none"}),
    ):
        (settings / extension).mkdir(parents=True, exist_ok=True)
        (settings / extension / f"{name}.jupyterlab-settings").write_text(json.dumps(values))
    port, token = _free_port(), os.urandom(16).hex()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTERLAB_WORKSPACES_DIR": str(root / "ws")}
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         f"--LabApp.user_settings_dir={root / 'settings'}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", token
    finally:
        # the server and the kernels it started: its own session, which it made (start_new_session)
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        log.close()


def test_run_all_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    base, token = lab
    shot = Path(os.environ.get("NSMAGIC_SCREENSHOT") or tmp_path / "screenshot.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}&reset")
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=60_000)
            try:  # JupyterLab asks which kernel to start for a notebook opened by URL
                page.get_by_role("button", name="Select", exact=True).click(timeout=15_000)
            except PlaywrightTimeout:
                pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            count = sum(c.cell_type == "code" for c in nbformat.read(REPO / "notebooks" / NOTEBOOK, as_version=4).cells)
            prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
            try:
                page.wait_for_function(
                    """n => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                              return p.length === n && p.every(e => /\\[\\d+\\]/.test(e.textContent)); }""",
                    arg=count, timeout=60_000,
                )
            except Exception:
                page.screenshot(path=str(tmp_path / "failed.png"))
                raise AssertionError(f"Run All did not finish; the page: {tmp_path / 'failed.png'}; prompts: "
                                     f"{prompts.all_text_contents()}") from None
            numbers = [int(re.search(r"\d+", t).group()) for t in prompts.all_text_contents()]
            assert numbers == list(range(1, count + 1))

            outputs = "\n".join(page.locator(".jp-OutputArea-output").all_text_contents())
            for pattern in EXPECTED:
                assert re.search(pattern, outputs), f"not in the page: {pattern}\n{outputs[:3000]}"
            assert not re.search(r"Traceback|PrivilegeError|UsageError|ChildDied", outputs)

            # the picture for the README: the file browser closed, the five-flag cell in view
            page.locator(".jp-SideBar.jp-mod-left li[data-id='filebrowser']").click()
            page.wait_for_timeout(500)
            heading = page.locator(".jp-MarkdownCell").filter(has_text="All five at once").first
            page.mouse.move(640, 450)
            for _ in range(3):  # the notebook lays out cells as they come into view: scroll, look again
                page.mouse.wheel(0, heading.bounding_box()["y"] - 100)
                page.wait_for_timeout(400)
            page.mouse.move(1270, 500)  # off the text: no hover marks in the picture
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
