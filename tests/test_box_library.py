"""nsmagic.Box without IPython: names, requests the box cannot load, the end."""

import os

import pytest

from nsmagic import Box, BoxDied, Namespaces, OptionError
from processes import wait_gone

pytestmark = pytest.mark.root


def test_a_second_box_of_the_same_name_is_refused_before_anything_starts():
    with Box(Namespaces(uts=True), name="twice") as first:
        children = set(os.listdir("/proc"))
        with pytest.raises(OptionError, match="already a box named 'twice'"):
            Box(Namespaces(uts=True), name="twice")
        assert first.run(os.getpid) == first.worker
        new = [p for p in set(os.listdir("/proc")) - children if p.isdigit()]
        assert all(open(f"/proc/{p}/stat").read().split()[3] != str(os.getpid()) for p in new
                   if os.path.exists(f"/proc/{p}/stat")), "the refused box started a child"


def test_a_call_the_box_cannot_load_is_the_cells_error_and_the_box_lives():
    class Local:  # pickled by value... but made unloadable below
        def __reduce__(self):
            return (_explode, ())

    with Box(Namespaces(pid=True)) as box:
        box.run_code("kept = 'still here'")
        with pytest.raises(RuntimeError, match="cannot be loaded here"):
            box.run(len, Local())
        assert box.run_code("kept").value == "still here"


def _explode():
    raise RuntimeError("cannot be loaded here")


def test_using_a_stopped_box_says_so():
    box = Box(Namespaces(net=True))
    pid = box.worker
    box.stop()
    assert wait_gone([pid]) == []
    with pytest.raises(OptionError, match="was stopped"):
        box.run_code("1")
    box.stop()  # twice is harmless


def test_a_box_that_ended_between_cells_is_reported_once():
    box = Box(Namespaces(pid=True))
    os.kill(box.worker, 9)
    assert wait_gone([box.worker]) == []
    with pytest.raises(BoxDied, match="between cells|during this cell"):
        for _ in range(50):  # the watcher may not have seen it yet: then the cell sees it
            box.run_code("1")
    box.stop()


def test_a_box_made_in_a_thread_that_ended_lives_on():
    """Linux sends the parent-death signal when the forking *thread* ends: a box made from a
    worker thread (an ipykernel subshell is one) must not be frozen when that thread is gone."""
    import threading

    made = []
    maker = threading.Thread(target=lambda: made.append(Box(Namespaces(pid=True))))
    maker.start()
    maker.join()
    [box] = made
    try:
        state = open(f"/proc/{box.worker}/stat").read().rpartition(")")[2].split()[0]
        assert state != "T", "the box was frozen when the thread that made it ended"
        box.run_code("kept = 41", timeout=30)
        assert box.run_code("kept + 1", timeout=30).value == 42
    finally:
        box.stop()
