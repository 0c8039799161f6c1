"""Issue 12, the object store part: hostile manifests against the store.

Each test performs the attack against real builds (as root) and checks that
the host is untouched: no other user reaches a setuid file a stage made, a
manifest's output never depends on what another manifest built in the same
store, concurrent builds leave no orphaned objects, and a full output disk
leaves nothing half-written and names the right path.
"""

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time

import pytest

from osbuild.manifest import load
from osbuild.objectstore import ObjectStore
from osbuild.output import copy_output

from hygiene import check_store, no_leftovers_fixture  # pylint: disable=unused-import
from osbuildproc import finish, start

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SUID = "cp /bin/dash suidsh; chown 0:0 suidsh; chmod 4755 suidsh"


def osbuild(store, desc, *extra, umask=None):
    """Start osbuild --json on the manifest `desc` (a dict); returns the Popen."""
    path = os.path.join(os.path.dirname(str(store)), f"manifest-{time.monotonic_ns()}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(desc, f)
    return start(store, path, *extra, umask=umask)


def build(store, desc, *extra, **kw):
    """Run osbuild to the end; asserts success; returns the JSON result."""
    status, result, stderr = finish(osbuild(store, desc, *extra, **kw))
    assert status == 0, stderr
    return result


def script(text):
    """A script stage."""
    return {"name": "org.osbuild.script", "options": {"chroot": False, "script": text}}


def as_nobody(*argv):
    """Run `argv` as uid/gid 65534 without groups, from a shell of that user.

    (setpriv itself must not exec the target: it still holds root's view of
    the file system when it does, which no real local user has.)
    """
    return subprocess.run(NOBODY + ["/bin/sh", "-c", 'exec "$@"', "sh", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


def assert_unreachable(path):
    """`path` is a setuid-root shell (checked as root) that nobody cannot run."""
    st = os.lstat(path)
    assert st.st_uid == 0 and st.st_mode & 0o4000, f"{path} is not setuid root: the attack failed"
    res = as_nobody(path, "-p", "-c", "id -u")
    assert res.returncode != 0 and res.stdout.strip() != "0", \
        f"an unprivileged user ran {path}: {res.stdout!r}"
    assert "Permission denied" in res.stderr, res.stderr


@pytest.fixture(name="shared_dir")
def shared_dir_fixture():
    """A directory every user can traverse (unlike pytest's tmp_path), removed after."""
    path = tempfile.mkdtemp(prefix="osbuild-attack-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(name="store")
def store_fixture(shared_dir):
    """A store root made by the user, traversable by all: only osbuild's modes protect it."""
    path = os.path.join(shared_dir, "store")
    os.mkdir(path, 0o755)
    assert as_nobody("test", "-x", path).returncode == 0
    return path


@pytest.mark.integration
def test_setuid_shell_from_the_store(store):
    """A stage makes a setuid-root shell: no other user reaches it while it is built
    (STORE/tmp) or once committed (refs/, objects/), even with osbuild run under umask 0."""
    desc = {"stages": [script(f"{SUID}; touch made; sleep 3")]}
    proc = osbuild(store, desc, umask=0)
    try:
        deadline = time.monotonic() + 120
        building = None
        while building is None and proc.poll() is None and time.monotonic() < deadline:
            tmp = os.path.join(store, "tmp")
            for entry in os.listdir(tmp) if os.path.isdir(tmp) else []:
                if os.path.exists(os.path.join(tmp, entry, "tree", "made")):
                    building = os.path.join(tmp, entry, "tree", "suidsh")
            time.sleep(0.05)
        assert building is not None, "the stage never ran"
        assert_unreachable(building)
    finally:
        status, result, stderr = finish(proc)
    assert status == 0, stderr
    ref = os.path.join(store, "refs", result["tree_id"])
    assert_unreachable(os.path.join(ref, "suidsh"))
    assert_unreachable(os.path.join(os.path.realpath(ref), "suidsh"))


@pytest.mark.integration
def test_looser_store_is_fixed_up_on_open(store):
    """A store an older osbuild made with traversable modes is closed on the next run."""
    desc = {"stages": [script(SUID)]}
    result = build(store, desc)
    for d in ("objects", "refs", "tmp", "sources", "index"):
        os.chmod(os.path.join(store, d), 0o755)
    ref = os.path.join(store, "refs", result["tree_id"])
    build(store, desc)  # warm: runs nothing, but opens the store
    assert_unreachable(os.path.join(ref, "suidsh"))
    assert_unreachable(os.path.join(os.path.realpath(ref), "suidsh"))


def test_output_copies_give_nobody_setuid(shared_dir):
    """An output holding a setuid-root file and a tree with one: the copy in the
    output directory runs with nobody's privileges, and the tree is not reachable."""
    store = ObjectStore(os.path.join(shared_dir, "store"))
    output_id = "5e" * 32
    with store.new(output_id) as obj:
        out = obj.write()
        for path in (os.path.join(out, "image"), os.path.join(out, "tree", "suidsh")):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copy("/bin/dash", path)
            os.chown(path, 0, 0)
            os.chmod(path, 0o4755)
        os.chmod(os.path.join(out, "tree"), 0o755)
    dest = os.path.join(shared_dir, "out")
    copy_output(store, output_id, dest)
    res = as_nobody(os.path.join(dest, "image"), "-p", "-c", "id -u")
    assert res.returncode == 0 and res.stdout.strip() == "65534", res
    assert not os.stat(os.path.join(dest, "image")).st_mode & 0o6000
    # the tree is copied as it is (setuid kept) where only root can reach it
    assert os.stat(os.path.join(dest, "tree", "suidsh")).st_mode & 0o4000
    assert_unreachable(os.path.join(dest, "tree", "suidsh"))


def tar_members(path):
    """What a tar output says about each member (not atime/ctime, which tar adds itself)."""
    members = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isreg() else None
            members[m.name] = (m.type, m.linkname, m.mode, m.uid, m.gid, m.mtime, data)
    return members


TAR = {"name": "org.osbuild.tar", "options": {"filename": "tree.tar"}}
PIN = "touch -d @1000000000 a b ."


@pytest.mark.integration
@pytest.mark.parametrize("first,second", [
    # differ only in hard links (mtimes pinned alike)
    (f"echo data > a; ln a b; {PIN}", f"echo data > a; cp a b; {PIN}"),
    (f"echo data > a; cp a b; {PIN}", f"echo data > a; ln a b; {PIN}"),
    # differ only in mtimes
    ("echo data > a; echo data > b; touch -d @1000000000 a b .",
     "echo data > a; echo data > b; touch -d @1500000000 a b ."),
], ids=["link-then-copy", "copy-then-link", "mtimes"])
def test_no_cache_poisoning_across_manifests(shared_dir, first, second):
    """Two manifests whose trees differ only in hard links or only in mtimes, built into
    one store: the second's output is what it is when built in a fresh store."""
    shared = os.path.join(shared_dir, "shared")
    fresh = os.path.join(shared_dir, "fresh")
    build(shared, {"pipeline": {"stages": [script(first)], "assembler": TAR}})
    desc = {"pipeline": {"stages": [script(second)], "assembler": TAR}}
    poisoned = build(shared, desc)
    clean = build(fresh, desc)
    assert poisoned["output_id"] == clean["output_id"]
    got = tar_members(os.path.join(shared, "refs", poisoned["output_id"], "tree.tar"))
    want = tar_members(os.path.join(fresh, "refs", clean["output_id"], "tree.tar"))
    assert got == want
    objects, refs = check_store(shared)
    assert len(refs) == 4 and len(objects) == 4


@pytest.mark.integration
def test_concurrent_builds_leave_no_orphans(tmp_path):
    """Eight builds of one manifest at once: every object in the store has a ref."""
    store = tmp_path / "store"
    desc = {"pipeline": {"stages": [script("echo x > f; sleep 1")], "assembler": TAR}}
    procs = [osbuild(store, desc) for _ in range(8)]
    results = [finish(p) for p in procs]
    for status, _, stderr in results:
        assert status == 0, stderr
    objects, refs = check_store(store)
    pipeline = load(desc, REPO).pipeline
    assert set(refs) == {pipeline.tree_id, pipeline.output_id}
    targets = {os.path.basename(os.readlink(os.path.join(store, "refs", r))) for r in refs}
    assert set(objects) == targets
    assert os.listdir(os.path.join(store, "tmp")) == []


@pytest.fixture(name="full_fs")
def full_fs_fixture(tmp_path):
    """A 1 MiB tmpfs."""
    path = tmp_path / "full"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.integration
def test_output_directory_on_a_full_disk(tmp_path, full_fs):
    """A 3 MB output into a 1 MiB filesystem: one line naming the output path, exit 1,
    a JSON result, the earlier copy intact, no partial file, the store complete."""
    store = tmp_path / "store"
    out = full_fs / "out"
    out.mkdir()
    (out / "tree.tar").write_text("the previous image")
    desc = {"pipeline": {"stages": [script("head -c 3000000 /dev/urandom > big")],
                         "assembler": TAR}}
    status, result, stderr = finish(osbuild(store, desc, "--output-directory", str(out)))
    assert status == 1
    assert result is not None and result["success"] is False, result
    lines = stderr.strip().splitlines()
    assert lines == [f"osbuild: cannot write output {out}/tree.tar: "
                     "No space left on device"], stderr
    assert os.listdir(out) == ["tree.tar"]
    assert (out / "tree.tar").read_text() == "the previous image"
    objects, refs = check_store(store)
    assert len(objects) == 2 and len(refs) == 2
    # with room, the same run places the output
    small = {"pipeline": {"stages": [script("echo small > f")], "assembler": TAR}}
    status, result, stderr = finish(osbuild(store, small, "--output-directory", str(out)))
    assert status == 0, stderr
    assert os.listdir(out) == ["tree.tar"]
    assert "./f" in tar_members(out / "tree.tar")


@pytest.mark.integration
def test_tree_nested_too_deeply(tmp_path):
    """A stage nests 1500 directories: a one-line error naming the problem, exit 1,
    nothing committed, nothing left in STORE/tmp."""
    store = tmp_path / "store"
    deep = "i=0; while [ $i -lt 1500 ]; do mkdir d; cd d; i=$((i+1)); done"
    status, result, stderr = finish(osbuild(store, {"stages": [script(deep)]}))
    assert status == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("osbuild: cannot commit "), stderr
    assert "nested more than 1000 directories deep" in lines[0] and "Traceback" not in stderr
    assert result == {"success": False, "error": lines[0][len("osbuild: "):]}   # --json
    assert check_store(store) == ([], [])
    assert os.listdir(store / "tmp") == []
