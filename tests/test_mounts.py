"""--tmpfs, --bind, --ro-bind and --rootfs, checked through real kernels by what a cell sees
inside and what the host still sees afterwards.

Every cell first asserts that it runs in another process than the kernel. Every test that
mounts compares the kernel's mounts (its /proc/self/mountinfo, the host's mount namespace) before
and after, also after a crash and a timeout: all of these mounts live in the cell's own mount
namespace and must die with it.
The root filesystem is built here from Debian's statically linked busybox (busybox-static).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from nsmagic import Namespaces, OptionError, run
from nsmagic.environment import prepare_all
from nsmagic.environment.mounts import Mounts

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ls", "ps", "hostname", "cat", "mount")
#: The host's mounts (mount points, from the kernel's /proc/self/mountinfo) where a leaked one
#: of ours would appear: / and the trees the tests mount on. Not all of them: other tests on
#: this machine add and remove mounts elsewhere (/run/netns) at the same time.
WHERE = ("/tmp/", "/proc", "/dev", "/mnt", "/srv")
MOUNTS = ("sorted(p for p in (l.split()[4] for l in open('/proc/self/mountinfo')) "
          f"if p == '/' or p.startswith({WHERE!r}))")


def make_rootfs(parent: Path) -> Path:
    """A tiny root filesystem: busybox and its applets in /bin, mount points, and /var/run as
    an absolute link to /run (which must resolve inside the root filesystem, not on the host)."""
    if not os.access(BUSYBOX, os.X_OK):
        missing = f"{BUSYBOX} is missing: apt-get install busybox-static"
        if os.environ.get("CI"):  # .ci/run installs it: its absence there is a broken CI
            pytest.fail(missing)
        pytest.skip(missing)
    root = parent / "rootfs"
    for sub in ("bin", "proc", "dev", "tmp", "mnt", "srv", "run", "var"):
        (root / sub).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "var" / "run").symlink_to("/run")
    return root


def sections(out: str, *names: str) -> list[str]:
    """A cell's output cut at its ``-- name`` lines: what came before the first, then each part."""
    parts = []
    for name in names:
        head, out = out.split(f"-- {name}\n")
        parts.append(head)
    return parts + [out]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def rootfs():
    """Under a mode-755 temp dir, so that the rootless kernel's user can reach it too."""
    parent = Path(tempfile.mkdtemp(prefix="nsmagic-rootfs-"))
    parent.chmod(0o755)
    try:
        yield make_rootfs(parent)
    finally:
        shutil.rmtree(parent)


@pytest.fixture
def mounts_unchanged(kernel):
    """Checks that the host has the same mounts (where ours could appear) after the test as before."""
    before = kernel.value(MOUNTS)
    yield
    assert kernel.value(MOUNTS) == before


def guard(kernel) -> str:
    return f"import os\nassert os.getpid() != {kernel.pid}\n"


# -- tmpfs and binds, as root ----------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.root
def test_tmpfs_is_fresh_and_writable_inside_and_invisible_on_host(kernel, tmp_path, mounts_unchanged):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "host.txt").write_text("host")
    cell = kernel.execute(f"""%%innamespace --tmpfs {scratch}
{guard(kernel)}
print(sorted(os.listdir({str(scratch)!r})))
open({str(scratch / 'inside.txt')!r}, 'w').write('inside')
print(sorted(os.listdir({str(scratch)!r})))
print(oct(os.stat({str(scratch)!r}).st_mode & 0o7777))
print(any(l.split()[4] == {str(scratch)!r} and ' - tmpfs ' in l for l in open('/proc/self/mountinfo')))""").ok()
    assert cell.stdout.split("\n")[:4] == ["[]", "['inside.txt']", "0o1777", "True"]
    assert sorted(os.listdir(scratch)) == ["host.txt"]


@pytest.mark.kernel
@pytest.mark.root
def test_ro_bind_refuses_writes_and_leaves_source_unchanged(kernel, tmp_path, mounts_unchanged):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a.txt").write_text("host")
    cell = kernel.execute(f"""%%innamespace --ro-bind {src}:{dst}
{guard(kernel)}
import errno
print(open({str(dst / 'a.txt')!r}).read())
for path in ({str(dst / 'a.txt')!r}, {str(dst / 'new.txt')!r}):
    try:
        open(path, 'w').write('changed')
    except OSError as e:
        print(errno.errorcode[e.errno])""").ok()
    assert cell.stdout.split() == ["host", "EROFS", "EROFS"]
    assert tree(src) == ["a.txt"] and (src / "a.txt").read_text() == "host"
    assert tree(dst) == []


@pytest.mark.kernel
@pytest.mark.root
def test_ro_bind_is_read_only_all_the_way_down(kernel, tmp_path, mounts_unchanged):
    """/dev has mounts under it (/dev/shm, a tmpfs the host can write): bound read-only, every
    one of them is read-only inside."""
    dst = tmp_path / "devcopy"
    dst.mkdir()
    assert kernel.value("__import__('os').path.ismount('/dev/shm')")
    cell = kernel.execute(f"""%%innamespace --ro-bind /dev:{dst}
{guard(kernel)}
import errno
print(os.path.ismount({str(dst / 'shm')!r}))
try:
    open({str(dst / 'shm' / 'nsmagic-test')!r}, 'w')
except OSError as e:
    print(errno.errorcode[e.errno])""").ok()
    assert cell.stdout.split() == ["True", "EROFS"]
    assert not os.path.exists("/dev/shm/nsmagic-test")


@pytest.mark.kernel
@pytest.mark.root
def test_ro_bind_keeps_the_flags_the_source_had(kernel, tmp_path, mounts_unchanged):
    """A --tmpfs is nosuid,nodev; a read-only bind of it stays nosuid,nodev (inside a user
    namespace a remount that dropped them would be refused)."""
    fresh, view = tmp_path / "fresh", tmp_path / "view"
    fresh.mkdir()
    view.mkdir()
    cell = kernel.execute(f"""%%innamespace --tmpfs {fresh} --ro-bind {fresh}:{view}
{guard(kernel)}
flags = os.statvfs({str(view)!r}).f_flag
print(bool(flags & os.ST_RDONLY), bool(flags & os.ST_NOSUID), bool(flags & os.ST_NODEV))
print(bool(os.statvfs({str(fresh)!r}).f_flag & os.ST_RDONLY))""").ok()
    assert cell.stdout.split() == ["True", "True", "True", "False"]


@pytest.mark.kernel
@pytest.mark.root
def test_read_write_bind_writes_into_the_source(kernel, tmp_path, mounts_unchanged):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a.txt").write_text("host")
    cell = kernel.execute(f"""%%innamespace --bind {src}:{dst}
{guard(kernel)}
open({str(dst / 'new.txt')!r}, 'w').write('from the cell')
print(sorted(os.listdir({str(dst)!r})))""").ok()
    assert cell.stdout.strip() == "['a.txt', 'new.txt']"
    assert (src / "new.txt").read_text() == "from the cell"
    assert tree(dst) == []


@pytest.mark.kernel
@pytest.mark.root
def test_bind_of_a_file_onto_a_file(kernel, tmp_path, mounts_unchanged):
    src, dst = tmp_path / "src.txt", tmp_path / "dst.txt"
    src.write_text("source")
    dst.write_text("destination")
    assert kernel.value_in(f"--ro-bind {src}:{dst}", f"open({str(dst)!r}).read()") == "source"
    assert dst.read_text() == "destination"


@pytest.mark.root
def test_library_api_takes_lists(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def inside():
        assert os.getpid() != parent
        (scratch / "x").write_text("x")
        return os.listdir(scratch)

    parent = os.getpid()
    assert run(inside, namespaces=Namespaces(tmpfs=[str(scratch)])) == ["x"]
    assert os.listdir(scratch) == []
    with pytest.raises(OptionError, match="--tmpfs: expected a list"):
        run(inside, namespaces=Namespaces(tmpfs=str(scratch)))


# -- a root filesystem, as root -----------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.root
def test_rootfs_is_a_container_from_scratch(kernel, rootfs, mounts_unchanged):
    host_name = kernel.value("__import__('socket').gethostname()")
    before = tree(rootfs)
    cell = kernel.execute(f"""%%innamespace -p --mount-proc --rootfs {rootfs} --hostname box
{guard(kernel)}
import sys
print(sorted(os.listdir('/')), os.getcwd(), os.path.exists(sys.executable))
print('-- ls')
!ls /
print('-- ps')
!ps
print('-- hostname')
!hostname
print('-- dev'); print(sorted(os.listdir('/dev')), len(open('/dev/urandom', 'rb').read(8)))
open('/dev/null', 'w').write('gone')""").ok()
    out = cell.stdout.replace("\r\n", "\n")
    python, ls, ps, hostname, dev = sections(out, "ls", "ps", "hostname", "dev")
    entries = sorted(os.listdir(rootfs))
    assert python.strip() == f"{entries} / False"
    assert sorted(ls.split()) == entries
    ps_lines = ps.strip().splitlines()
    assert ps_lines[0].split()[0] == "PID"
    pids = [int(line.split()[0]) for line in ps_lines[1:]]
    assert 1 in pids and len(pids) <= 3, ps  # the cell, the shell, ps
    assert hostname.strip() == "box"
    assert dev.strip().startswith("['fd', 'full', 'null', 'ptmx', 'pts', 'random', 'shm', 'stderr'")
    assert dev.strip().endswith(" 8")
    assert kernel.value("__import__('socket').gethostname()") == host_name != "box"
    assert tree(rootfs) == before


@pytest.mark.kernel
@pytest.mark.root
def test_rootfs_binds_and_tmpfs_are_paths_inside_it(kernel, rootfs, tmp_path, mounts_unchanged):
    data, conf = tmp_path / "data", tmp_path / "conf"
    data.mkdir()
    conf.mkdir()
    (data / "d.txt").write_text("data")
    (conf / "c.txt").write_text("conf")
    before = tree(rootfs)
    cell = kernel.execute(f"""%%innamespace --rootfs {rootfs} --bind {data}:/mnt --ro-bind {conf}:srv --tmpfs /var/run
{guard(kernel)}
import errno
print(sorted(os.listdir('/mnt')), sorted(os.listdir('/srv')))
open('/mnt/written.txt', 'w').write('through the bind')
open('/var/run/pid', 'w').write('1')
print(os.listdir('/run'))
try:
    open('/srv/c.txt', 'w')
except OSError as e:
    print(errno.errorcode[e.errno])""").ok()
    assert cell.stdout.split("\n")[:3] == ["['d.txt'] ['c.txt']", "['pid']", "EROFS"]
    assert (data / "written.txt").read_text() == "through the bind"
    assert tree(conf) == ["c.txt"]
    assert tree(rootfs) == before  # /var/run -> /run resolved inside the rootfs, in its namespace


@pytest.mark.kernel
@pytest.mark.root
def test_rootfs_what_the_cell_can_and_cannot_do(fresh_kernel, rootfs):
    """Loaded modules keep working, a new import cannot find the host's files, and an exception
    (formatted by IPython, which loads pygments on first use) still comes back as itself."""
    kernel = fresh_kernel
    kernel.execute("import json, sys").ok()
    assert not kernel.value("'tabnanny' in sys.modules")
    cell = kernel.execute(f"""%%innamespace -p --rootfs {rootfs} -o encoded
{guard(kernel)}
encoded = json.dumps({{'in': 'rootfs'}})
try:
    import tabnanny
except ImportError as e:
    print(type(e).__name__)
1 / 0""")
    assert cell.ename == "ZeroDivisionError"
    assert cell.stdout.split() == ["ModuleNotFoundError"]
    assert kernel.value("encoded") == '{"in": "rootfs"}'
    assert kernel.value("'tabnanny' in sys.modules") is False


# -- nothing is left behind ----------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("ending, ename", [
    ("os._exit(3)", "ChildDied"),
    ("os.kill(os.getpid(), 9)", "ChildDied"),
    ("import time\ntime.sleep(30)", "CellTimeout"),
])
def test_no_mount_survives_a_crash_or_timeout(kernel, rootfs, tmp_path, ending, ename, mounts_unchanged):
    src = tmp_path / "src"
    src.mkdir()
    options = f"--timeout 2 --rootfs {rootfs} --tmpfs /tmp --bind {src}:/mnt --ro-bind {src}:/srv"
    cell = kernel.execute(f"""%%innamespace {options}
{guard(kernel)}
print(len(open('/proc/self/mountinfo').read().splitlines()))
{ending}""", timeout=30)
    assert cell.ename == ename
    assert int(cell.stdout.split()[0]) >= 7  # /, /proc, /dev and its binds, /tmp, /mnt, /srv
    assert tree(src) == []


# -- bad values ----------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.parametrize("options, words", [
    ("--rootfs /nonexistent-nsmagic", ["--rootfs", "does not exist"]),
    ("--rootfs {tmp}", ["--rootfs", "no /proc directory", "root filesystem"]),
    ("--rootfs /", ["--rootfs", "host's own root"]),
    ("--bind /nonexistent-nsmagic:/mnt", ["--bind", "/nonexistent-nsmagic does not exist"]),
    ("--bind nocolon", ["--bind nocolon", "SRC:DST"]),
    ("--ro-bind {tmp}:{tmp}:{tmp}", ["--ro-bind", "SRC:DST"]),
    ("--ro-bind {tmp}:/nonexistent-nsmagic", ["--ro-bind", "destination /nonexistent-nsmagic does not exist"]),
    ("--bind {tmp}/file:{tmp}", ["--bind", "source is not a directory but the destination is one"]),
    ("--tmpfs /nonexistent-nsmagic", ["--tmpfs", "does not exist", "create it first"]),
    ("--tmpfs {tmp}/file", ["--tmpfs", "is not a directory"]),
    ("--tmpfs /", ["--tmpfs", "cannot mount over /", "--rootfs"]),
    ("--rootfs {rootfs} --bind {tmp}:/nonexistent-nsmagic", ["--bind", "does not exist in the root filesystem"]),
])
def test_bad_values_are_usage_errors_before_the_child_starts(kernel, rootfs, tmp_path, options, words,
                                                             mounts_unchanged):
    (tmp_path / "file").write_text("")
    options = options.format(tmp=tmp_path, rootfs=rootfs)
    cell = kernel.execute(f"%%innamespace {options}\nprint('body ran')")
    assert cell.ename == "UsageError", cell.evalue
    for word in words:
        assert word in cell.evalue
    assert "body ran" not in cell.stdout


@pytest.mark.kernel
@pytest.mark.root
def test_bind_root_on_root_without_rootfs_is_the_hosts_root_read_write(kernel, tmp_path, mounts_unchanged):
    """bubblewrap's --bind / / with no --rootfs: accepted, the cell's / is the host's with its
    mounts (nothing is mounted over it), writable, in a mount namespace of its own."""
    (tmp_path / "t").mkdir()
    cell = kernel.execute(f"%%innamespace --bind / / --tmpfs {tmp_path}/t\n"  # bubblewrap's words
                          f"import os\nassert os.getpid() != {kernel.pid}\n"
                          f"open('{tmp_path}/from-the-cell', 'w').write('x')\n"
                          "print(os.stat('/proc/self/ns/mnt').st_ino != "
                          f"os.stat('/proc/{kernel.pid}/ns/mnt').st_ino, sorted(os.listdir('/')) == {sorted(os.listdir('/'))!r})")
    assert cell.ok().stdout == "True True\n"
    assert (tmp_path / "from-the-cell").read_text() == "x"


def test_bind_root_on_root_mounts_nothing(tmp_path):
    part = Mounts(Namespaces(bind=["/:/", f"{tmp_path}:{tmp_path}"]))
    prepare_all([part])
    assert [m.target for m in part.mounts] == [str(tmp_path)]
    with pytest.raises(OptionError, match="cannot mount over /"):  # --ro-bind / / still cannot be honoured
        prepare_all([Mounts(Namespaces(ro_bind=["/:/"]))])


@pytest.mark.kernel
@pytest.mark.root
def test_a_destination_hidden_by_another_mount_fails_naming_the_step(kernel, tmp_path, mounts_unchanged):
    """/a/b exists on the host, but the tmpfs on /a (mounted first, being the parent) hides it."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    cell = kernel.execute(f"%%innamespace --bind {tmp_path}:{tmp_path}/a/b --tmpfs {tmp_path}/a\nprint('body ran')")
    assert cell.ename == "SetupError"
    assert f"mount --rbind {tmp_path} {tmp_path}/a/b failed: No such file or directory" in cell.evalue
    assert "body ran" not in cell.stdout


def test_mounts_are_made_parents_first_and_explained(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    part = Mounts(Namespaces(bind=[f"{tmp_path}:{tmp_path}/a/b"], tmpfs=[f"{tmp_path}/a"]))
    prepare_all([part])
    assert [m.target for m in part.mounts] == [f"{tmp_path}/a", f"{tmp_path}/a/b"]
    assert part.explain() == [f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {tmp_path}/a",
                              f"mount --rbind {tmp_path} {tmp_path}/a/b"]


# -- rootless --------------------------------------------------------------------------------

@pytest.fixture
def student_dir(student):
    """A directory the student owns, under a temp dir the student can reach."""
    parent = Path(tempfile.mkdtemp(prefix="nsmagic-mounts-"))
    parent.chmod(0o755)
    mine = parent / "mine"
    mine.mkdir()
    os.chown(mine, student.user.pw_uid, student.user.pw_gid)
    try:
        yield mine
    finally:
        shutil.rmtree(parent)


def host_mounts() -> list[str]:
    """As MOUNTS, seen by this process, which is in the host's mount namespace too."""
    return eval(MOUNTS)


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.rootless
def test_rootless_tmpfs_and_binds(student, student_dir):
    src, dst, ro, scratch = (student_dir / name for name in ("src", "dst", "ro", "scratch"))
    for path in (src, dst, ro, scratch):
        path.mkdir()
        os.chown(path, student.user.pw_uid, student.user.pw_gid)
    before = host_mounts()
    cell = student.execute(f"""%%innamespace -r --tmpfs {scratch} --bind {src}:{dst} --ro-bind /dev:{ro}
assert os.getpid() != {student.pid}
import errno
open({str(scratch / 'x')!r}, 'w').write('x')
open({str(dst / 'y')!r}, 'w').write('y')
print(os.listdir({str(scratch)!r}), os.path.ismount({str(ro / 'shm')!r}))
for path in ({str(ro / 'nsmagic-test')!r}, {str(ro / 'shm' / 'nsmagic-test')!r}):
    try:
        open(path, 'w')
    except OSError as e:
        print(errno.errorcode[e.errno])""").ok()
    assert cell.stdout.split("\n")[:3] == ["['x'] True", "EROFS", "EROFS"]
    assert tree(scratch) == [] and tree(ro) == [] and tree(dst) == []
    assert (src / "y").read_text() == "y" and (src / "y").stat().st_uid == student.user.pw_uid
    assert host_mounts() == before


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.rootless
def test_rootless_rootfs(student, rootfs):
    before = host_mounts()
    cell = student.execute(f"""%%innamespace -r -p --mount-proc --rootfs {rootfs} --hostname box
assert os.getpid() != {student.pid}
print(sorted(os.listdir('/')), os.getuid())
print('-- ls')
!ls /
print('-- ps')
!ps
print('-- hostname')
!hostname""").ok()
    out = cell.stdout.replace("\r\n", "\n")
    python, ls, ps, hostname = sections(out, "ls", "ps", "hostname")
    entries = sorted(os.listdir(rootfs))
    assert python.strip() == f"{entries} 0"
    assert sorted(ls.split()) == entries
    assert len(ps.strip().splitlines()) <= 4, ps
    assert hostname.strip() == "box"
    cell = student.execute(f"%%innamespace -r -p --rootfs {rootfs}\nassert os.getpid() != {student.pid}\n1 / 0")
    assert cell.ename == "ZeroDivisionError"
    assert host_mounts() == before


@pytest.mark.kernel
@pytest.mark.root
@pytest.mark.rootless
def test_rootless_rootfs_without_pid_namespace_binds_the_hosts_proc(student, rootfs):
    """Linux allows a fresh /proc only to the owner of the PID namespace: without -p, the
    cell's /proc is the host's, bound."""
    host_pids = len([p for p in os.listdir("/proc") if p.isdigit()])
    seen = student.value_in(f"-r --rootfs {rootfs}",
                            "(sorted(os.listdir('/')), len([p for p in os.listdir('/proc') if p.isdigit()]))")
    assert seen[0] == sorted(os.listdir(rootfs))
    assert seen[1] > host_pids // 2 > 1
