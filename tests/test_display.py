"""Everything a plain cell can show, a namespaced cell shows: the same messages, mime types and
metadata, in the same order; huge and broken output; capture; %nsinfo; --explain."""

import os
import re

import psutil
import pytest

from nsmagic.info import cgroup_version

pytestmark = [pytest.mark.kernel, pytest.mark.root]


def shown(cell, kinds=("stream", "display_data", "update_display_data", "clear_output", "execute_result")):
    out = []
    for m in cell.messages:
        if m["msg_type"] in kinds:
            c = m["content"]
            out.append((m["msg_type"], c.get("text") or c.get("data") or c.get("wait"),
                        c.get("metadata"), c.get("transient")))
    return out


RICH = """from IPython.display import HTML, Markdown, JSON, display
class Tagged:
    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": "tagged", "application/x-nsmagic": "yes"}, {"application/x-nsmagic": {"k": 1}}
print("before")
display(HTML("<b>bold</b>"), metadata={"isolated": True})
display(Markdown("*md*"))
display(Tagged())
print("after")
"""


def test_rich_display_is_the_same_as_a_plain_cells(kernel):
    plain = shown(kernel.execute(RICH).ok())
    inside = shown(kernel.execute("%%innamespace -n -p\n" + RICH).ok())
    assert inside == plain
    assert [kind for kind, *_ in inside] == ["stream", "display_data", "display_data", "display_data", "stream"]


NUMPY_METADATA = """import datetime, numpy as np
from IPython.display import HTML, display
display(HTML("<b>m</b>"), metadata={"scale": np.float64(1.5), "n": np.int64(3), "on": np.bool_(True),
        "shape": np.arange(3), "day": datetime.date(2026, 12, 2), "pair": (1, 2)})
"""


def test_display_metadata_holding_numpy_values_comes_as_a_plain_cells_would(kernel):
    """Control frames are plain data, so the child converts what Jupyter's JSON would convert."""
    plain = kernel.execute(NUMPY_METADATA.replace('"on": np.bool_(True)', '"on": True')).ok()
    inside = kernel.execute("%%innamespace -n\n" + NUMPY_METADATA).ok()
    assert shown(inside) == shown(plain)
    assert shown(inside)[0][2] == {"scale": 1.5, "n": 3, "on": True, "shape": [0, 1, 2],
                                   "day": "2026-12-02", "pair": [1, 2]}


def test_display_metadata_json_cannot_hold_fails_in_the_cell_and_the_next_cell_works(kernel):
    cell = kernel.execute("%%innamespace -n\nfrom IPython.display import HTML, display\n"
                          "display(HTML('x'), metadata={'o': object()})")
    assert cell.error["ename"] == "TypeError", cell.error
    assert "travels as JSON" in cell.error["evalue"] and "object" in cell.error["evalue"]
    assert kernel.execute("%%innamespace -n\nprint('still here')").ok().stdout == "still here\n"


def test_every_cell_displays_through_one_publisher_that_the_kernel_never_wires(kernel):
    for i in range(3):
        cell = kernel.execute(f"%%innamespace -u\nfrom IPython.display import HTML, display\n"
                              f"display(HTML('<i>{i}</i>'))").ok()
        assert [(k, d["text/html"]) for k, d, *_ in shown(cell)] == [("display_data", f"<i>{i}</i>")]
    # built once, in the kernel; only the children plug their channel into it
    assert kernel.value("[p.channel for p in __import__('nsmagic.shell').shell._publishers.values()]") == [None]
    assert kernel.value("type(get_ipython().display_pub).__name__") != "ChildDisplayPublisher"


def test_dataframes_look_the_same_as_in_a_plain_cell(kernel):
    code = "import pandas as pd\ndf = pd.DataFrame({'ns': ['net', 'pid'], 'new': [True, False]})\ndisplay(df)\ndf"
    plain = kernel.execute(code).ok()
    inside = kernel.execute("%%innamespace -n\n" + code).ok()
    assert shown(inside) == shown(plain)
    assert "<table" in inside.result["text/html"]
    assert [k for k, *_ in shown(inside)] == ["display_data", "execute_result"]


def test_update_display_and_clear_output(kernel):
    cell = kernel.execute("""%%innamespace -n
from IPython.display import HTML, display, clear_output
handle = display(HTML("<p>one</p>"), display_id=True)
handle.update(HTML("<p>two</p>"))
clear_output(wait=True)
print("done")""").ok()
    kinds = shown(cell)
    assert [k for k, *_ in kinds] == ["display_data", "update_display_data", "clear_output", "stream"]
    first, update = kinds[0], kinds[1]
    assert first[3]["display_id"] == update[3]["display_id"]
    assert update[1]["text/html"] == "<p>two</p>"
    assert kinds[2][1] is True


def test_matplotlib_figures_show_as_images(kernel):
    kernel.execute("%matplotlib inline").ok()
    cell = kernel.execute("""%%innamespace -n
import matplotlib.pyplot as plt
plt.plot([1, 2, 3])
plt.show()
plt.figure()
plt.bar([1, 2], [3, 4])""").ok()  # the second figure is left open, as cells often do
    images = [m for m in cell.of_type("display_data") if "image/png" in m["content"]["data"]]
    assert len(images) == 2
    assert cell.result is not None  # the BarContainer, as in a plain cell


def test_tqdm_text_bar_and_carriage_returns(kernel):
    cell = kernel.execute("""%%innamespace -n
from tqdm import tqdm
for i in tqdm(range(5), mininterval=0):
    pass
print('progress\\rdone')""").ok()
    assert "100%" in cell.stderr and "\r" in cell.stderr
    assert cell.stdout == "progress\rdone\n"


def test_widget_progress_bar_shows_and_updates_from_the_child(kernel):
    cell = kernel.execute("%%innamespace -n -p\nfrom tqdm.notebook import tqdm\nfor i in tqdm(range(3)):\n    pass").ok()
    opened = {m["content"]["comm_id"]: m["content"] for m in cell.of_type("comm_open")}
    assert opened and all(c["target_name"] == "jupyter.widget" for c in opened.values())
    view = next(m["content"]["data"]["application/vnd.jupyter.widget-view+json"]
                for m in cell.of_type("display_data"))
    assert view["model_id"] in opened
    bars = [cid for cid, c in opened.items() if c["data"]["state"]["_model_name"] == "FloatProgressModel"]
    updates = [m["content"]["data"]["state"] for m in cell.of_type("comm_msg") if m["content"]["comm_id"] in bars]
    assert {"value": 3.0} in updates
    assert cell.stderr == ""


def test_fifty_megabytes_of_output_finish_and_memory_stays_bounded(fresh_kernel):
    before = psutil.Process(fresh_kernel.pid).memory_info().rss
    cell = fresh_kernel.execute("%%innamespace -n\nimport sys\nline = 'x' * 1023 + '\\n'\n"
                                "for i in range(50 * 1024):\n    sys.stdout.write(line)", timeout=300).ok()
    assert len(cell.stdout) == 50 * 2**20
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", open(f"/proc/{fresh_kernel.pid}/status").read()).group(1)) * 1024
    # IPython 9 keeps every cell's stream output in its history (history_manager.outputs), a
    # plain cell's too; beyond that, the kernel must not pile the output up.
    count = cell.reply["content"]["execution_count"]
    kept = fresh_kernel.value(f"sum(len(s) for o in getattr(get_ipython().history_manager, 'outputs', {{}})"
                              f".get({count}, []) for s in o.bundle.get('stream', []))")
    assert hwm - before < kept + 40 * 2**20, "the kernel must not hold the output in memory"


def test_capture_magic_captures_a_namespaced_cell(kernel):
    cell = kernel.execute("""%%capture captured
%%innamespace -n
from IPython.display import HTML, display
print('hidden from the notebook')
display(HTML('<i>x</i>'))""").ok()
    assert shown(cell) == []
    assert kernel.value("captured.stdout") == "hidden from the notebook\n"
    assert kernel.value("[o.data['text/html'] for o in captured.outputs]") == ["<i>x</i>"]


def test_capture_output_context_manager(kernel):
    cell = kernel.execute("""from IPython.utils.capture import capture_output
with capture_output() as cap:
    get_ipython().run_cell_magic('innamespace', '-p', 'import os; print(os.getpid())')
print(repr(cap.stdout))""").ok()
    assert cell.stdout.strip() == "'1\\n'"


def test_nsinfo_reports_this_machine(kernel):
    cell = kernel.execute("%nsinfo").ok()
    html, text = cell.result["text/html"], cell.result["text/plain"]
    for name in ("mnt", "uts", "ipc", "net", "pid", "user", "cgroup", "time"):
        assert os.readlink(f"/proc/{kernel.pid}/ns/{name}") in html
        row = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert row.split()[3] == "yes"  # root: every kind can be made directly
        assert row.split()[4] == open(f"/proc/sys/user/max_{name}_namespaces").read().strip()
    assert cgroup_version() in text
    assert open("/proc/sys/user/max_user_namespaces").read().strip() in text


def test_explain_says_who_ends_the_cells_processes(kernel):
    def calls(options):
        cell = kernel.execute(f"%%innamespace --explain {options}\npass").ok()
        return cell.of_type("display_data")[0]["content"]["data"]["text/plain"]
    assert "prctl(PR_SET_CHILD_SUBREAPER, 1)" in calls("-n")
    assert "PR_SET_CHILD_SUBREAPER" not in calls("-n -p")  # PID 1's exit ends them


def test_explain_comes_first_and_is_exact(kernel):
    cell = kernel.execute("%%innamespace --explain -n -p --hostname ex\nprint('cell output')").ok()
    kinds = [m["msg_type"] for m in cell.messages if m["msg_type"] in ("stream", "display_data")]
    assert kinds == ["display_data", "stream"]
    text = cell.of_type("display_data")[0]["content"]["data"]["text/plain"]
    assert "unshare(CLONE_NEWPID)" in text and "unshare(CLONE_NEWUTS|CLONE_NEWNET)" in text
    assert 'sethostname("ex")' in text and "fork() = " in text
    kernel_net = os.readlink(f"/proc/{kernel.pid}/ns/net")
    net_row = next(line for line in text.splitlines() if line.strip().startswith("net "))
    assert kernel_net in net_row and net_row.rstrip().endswith("new")
    ipc_row = next(line for line in text.splitlines() if line.strip().startswith("ipc "))
    assert ipc_row.rstrip().endswith("shared")
    assert "<table>" in cell.of_type("display_data")[0]["content"]["data"]["text/html"]
