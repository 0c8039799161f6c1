"""Crash safety: builds killed at any moment, stages and containers killed.

After a SIGKILL of osbuild, of a stage or of the container: nothing under
objects/ or refs/ is incomplete (every object hashes to its name, every ref
points at an object), no process, mount or loop device of the build is
left, the next run removes the dead build's work directories under
STORE/tmp and rebuilds the same tree. Also: file descriptors do not grow
over 100 builds in one process.
"""

import contextlib
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from osbuild import etctemplate
from osbuild import __main__ as cli
from osbuild.manifest import load
from osbuild.treesum import treesum

from hygiene import (RUNTIME_DIR, check_store, leftovers, loops_backed_under,  # pylint: disable=unused-import
                     no_leftovers_fixture, open_fds, processes_mentioning)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def osbuild_cmd(store, manifest_path, *extra):
    """The command line of osbuild from this checkout."""
    return [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(store), "--json",
            *extra, str(manifest_path)]


def write_manifest(path, desc):
    """Write `desc` as JSON to `path`; returns the path."""
    path.write_text(json.dumps(desc))
    return path


def crash_manifest(token, sleep=1.0):
    """Four stages with real content, so that kills hit stages, copies and commits."""
    fill = (f": {token}; mkdir -p data; i=0; while [ $i -lt 300 ]; do echo $i > data/f$i; "
            f"i=$((i+1)); done; ln -s /etc/passwd data/host-passwd; touch started; sleep {sleep}")
    return {"pipeline": {"stages": [
        {"name": "org.osbuild.noop", "options": {"token": token}},
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": fill}},
        {"name": "org.osbuild.noop", "options": {"after": 1}},
        # mtimes are part of a tree's identity: pinned, so that rebuilds compare equal
        {"name": "org.osbuild.script",
         "options": {"chroot": False,
                     "script": f": {token}; echo hi > greeting; "
                               "find . -exec touch -h -d @1000000000 {} +"}},
    ]}}


def stage_ids(desc):
    """The stage ids of a manifest's pipeline."""
    return [s.id for s in load(desc, REPO).pipeline.stages]


def build(store, manifest_path, *extra, timeout=600):
    """Run osbuild to the end; returns (exit status, parsed JSON result or None, stderr)."""
    proc = subprocess.run(osbuild_cmd(store, manifest_path, *extra), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = None
    return proc.returncode, result, proc.stderr


def tmp_entries(store):
    """What is in STORE/tmp."""
    path = os.path.join(store, "tmp")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _has_marker(store):
    tmp = os.path.join(store, "tmp")
    return any(os.path.exists(os.path.join(tmp, d, "tree", "started"))
               for d in tmp_entries(store))


def _ref_count(store):
    refs = os.path.join(store, "refs")
    return len(os.listdir(refs)) if os.path.isdir(refs) else 0


# When to kill osbuild: a delay after start, or as soon as the store shows an event.
MOMENTS = {
    "at-start": lambda store, t: t > 0.05,
    "store-created": lambda store, t: os.path.isdir(os.path.join(store, "tmp")),
    "first-workdir": lambda store, t: any(e.startswith("object-") for e in tmp_entries(store)),
    "stage-running": lambda store, t: _has_marker(store),
    "first-commit": lambda store, t: _ref_count(store) >= 1,
    "second-commit": lambda store, t: _ref_count(store) >= 2,
    "after-0.7s": lambda store, t: t > 0.7,
    "after-1.1s": lambda store, t: t > 1.1,
    "after-1.5s": lambda store, t: t > 1.5,
}


@pytest.fixture(name="reference", scope="module")
def reference_fixture(tmp_path_factory):
    """The crash manifest built once without interruption: (token, tree treesum)."""
    token = f"crash-{uuid.uuid4().hex}"
    base = tmp_path_factory.mktemp("reference")
    path = write_manifest(base / "manifest.json", crash_manifest(token, sleep=0))
    status, result, stderr = build(base / "store", path)
    assert status == 0, stderr
    tree = os.path.join(base, "store", "refs", result["tree_id"])
    return token, treesum(tree)


@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_sigkill_osbuild(tmp_path, reference, moment):
    """SIGKILL of osbuild at a moment: store stays complete, next run cleans and rebuilds."""
    token, expected = reference
    store = tmp_path / "store"
    path = write_manifest(tmp_path / "manifest.json", crash_manifest(token, sleep=0))
    ids = stage_ids(crash_manifest(token, sleep=0))
    # checkpoints make the build commit three times, so kills can land near commits
    argv = osbuild_cmd(store, path, "--checkpoint", ids[0], "--checkpoint", ids[1])
    # pylint: disable-next=consider-using-with  # killed and waited for below
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    try:
        while proc.poll() is None and not MOMENTS[moment](str(store), time.monotonic() - start):
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the container dies with osbuild; nothing else is left either
    assert leftovers(tmp_path, markers=[token]) == {}
    check_store(store)
    # the next run removes the dead build's work directories and rebuilds the same tree
    status, result, stderr = build(store, path)
    assert status == 0, stderr
    assert tmp_entries(store) == []
    objects, refs = check_store(store)
    assert result["tree_id"] in refs
    assert treesum(os.path.join(store, "refs", result["tree_id"])) == expected
    assert len(objects) <= 3
    assert leftovers(tmp_path, markers=[token]) == {}


def test_next_run_removes_stale_workdirs(tmp_path, reference):
    """A build killed while a stage runs leaves work dirs; any next osbuild run removes them."""
    token, _ = reference
    store = tmp_path / "store"
    path = write_manifest(tmp_path / "manifest.json", crash_manifest(token, sleep=30))
    # pylint: disable-next=consider-using-with  # killed and waited for below
    proc = subprocess.Popen(osbuild_cmd(store, path), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _has_marker(str(store)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _has_marker(str(store)), "the stage never started"
    finally:
        proc.kill()
        proc.wait()
    stale = tmp_entries(store)
    assert any(e.startswith("object-") for e in stale) and \
        any(e.startswith("buildroot-") for e in stale), stale
    assert leftovers(tmp_path, markers=[token]) == {}
    dead_api_dirs = _unlocked_api_dirs()
    assert dead_api_dirs, "the killed build left no API directory in /run/osbuild"
    # an unrelated, cached build on the same store is enough to clean the store up
    other = write_manifest(tmp_path / "other.json", {"pipeline": {}})
    status, _, stderr = build(store, other)
    assert status == 0, stderr
    assert tmp_entries(store) == []
    check_store(store)
    # the next container run cleans /run/osbuild
    noop = write_manifest(tmp_path / "noop.json", {"pipeline": {"stages": [
        {"name": "org.osbuild.noop", "options": {"token": token}}]}})
    status, _, stderr = build(store, noop)
    assert status == 0, stderr
    assert not [d for d in dead_api_dirs if os.path.exists(d)]


def _unlocked_api_dirs():
    """API directories in /run/osbuild whose owner is gone (nobody holds their lock)."""
    found = []
    for name in os.listdir(RUNTIME_DIR) if os.path.isdir(RUNTIME_DIR) else []:
        path = os.path.join(RUNTIME_DIR, name)
        if not name.startswith("api-"):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            found.append(path)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    return found


def test_sigkill_stage(tmp_path):
    """A stage killed by SIGKILL fails the build cleanly; a fixed manifest then builds."""
    token = f"stage-{uuid.uuid4().hex}"
    store = tmp_path / "store"
    stages = [{"name": "org.osbuild.script", "options": {"chroot": False,
                                                         "script": f": {token}; echo one > one"}},
              {"name": "org.osbuild.script",
               "options": {"chroot": False, "script": f": {token}; echo two > two; kill -KILL $$"}}]
    path = write_manifest(tmp_path / "manifest.json", {"pipeline": {"stages": stages}})
    status, result, _ = build(store, path)
    assert status == 1
    assert result["success"] is False
    assert [s["success"] for s in result["stages"]] == [True, False]
    objects, refs = check_store(store)
    assert refs == [] and objects == []
    assert tmp_entries(store) == []
    assert leftovers(tmp_path, markers=[token]) == {}
    stages[1]["options"]["script"] = f": {token}; echo two > two"
    write_manifest(path, {"pipeline": {"stages": stages}})
    status, result, stderr = build(store, path)
    assert status == 0, stderr
    with open(os.path.join(store, "refs", result["tree_id"], "two"), encoding="utf-8") as f:
        assert f.read() == "two\n"


def _children(pid):
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:  # children of every thread, not only the main one's
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="utf-8") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return children


def _descendants(pid):
    todo, found = [pid], []
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


@pytest.mark.parametrize("victim", ["systemd-nspawn", "container-init", "stage"])
def test_sigkill_container(tmp_path, victim):
    """SIGKILL of nspawn, of the container's init or of the stage: the build fails at once,
    every process of the container is gone, the store stays complete and tmp/ empty."""
    token = f"container-{uuid.uuid4().hex}"
    store = tmp_path / "store"
    script = f": {token}; touch started; sleep 60"
    path = write_manifest(tmp_path / "manifest.json", {"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": script}}]}})
    # pylint: disable-next=consider-using-with  # killed and waited for below
    proc = subprocess.Popen(osbuild_cmd(store, path), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _has_marker(str(store)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _has_marker(str(store)), "the stage never started"
        tree = _descendants(proc.pid)
        if victim == "systemd-nspawn":
            targets = [p for p in tree if _comm(p) == "systemd-nspawn"]
        elif victim == "container-init":
            targets = [p for p in tree if _comm(p) == "(sd-stubinit)"]
        else:
            targets = [p for p, argv in processes_mentioning(token) if "/bin/sh" in argv]
        assert len(targets) == 1, [(p, _comm(p)) for p in tree]
        killed = time.monotonic()
        os.kill(targets[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - killed < 20, "osbuild waited for the dead container"
    assert proc.returncode == 1, stderr
    result = json.loads(stdout)
    assert result["success"] is False and result["stages"][-1]["success"] is False
    assert leftovers(tmp_path, markers=[token]) == {}
    assert check_store(store) == ([], [])
    assert tmp_entries(store) == []


QEMU_OPTIONS = {"format": "raw", "size": 64 * 1024 * 1024,
                "bootloader": {"type": "none"},
                "partitions": [{"start": 2048, "filesystem": {
                    "type": "ext4", "uuid": "6e4ff95f-f662-45ee-a82a-bdf44a2d0b75",
                    "mountpoint": "/"}}]}


def test_sigkill_while_loop_device_attached(tmp_path):
    """osbuild killed while the assembler holds a loop device: the device is detached."""
    if not os.path.exists(os.path.join(REPO, "assemblers", "org.osbuild.qemu")):
        pytest.skip("no qemu assembler")
    token = f"loop-{uuid.uuid4().hex}"
    store = tmp_path / "store"
    fill = f": {token}; i=0; while [ $i -lt 2000 ]; do echo $i > f$i; i=$((i+1)); done"
    path = write_manifest(tmp_path / "manifest.json", {"pipeline": {
        "stages": [{"name": "org.osbuild.script", "options": {"chroot": False, "script": fill}}],
        "assembler": {"name": "org.osbuild.qemu",
                      "options": dict(QEMU_OPTIONS, filename=f"{token}.img")}}})
    # pylint: disable-next=consider-using-with  # killed and waited for below
    proc = subprocess.Popen(osbuild_cmd(store, path), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen = False
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if loops_backed_under(tmp_path, markers=[token]):
                seen = True
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if not seen:
        pytest.skip("the assembler finished before a loop device could be seen")
    assert leftovers(tmp_path, markers=[token], timeout=20) == {}
    check_store(store)
    status, _, stderr = build(store, path)
    assert status == 0, stderr
    assert tmp_entries(store) == []
    assert leftovers(tmp_path, markers=[token]) == {}


def test_fds_do_not_grow_over_100_builds(tmp_path):
    """100 consecutive builds in one process (25 run a container) leak no descriptor."""
    store = tmp_path / "store"
    path = tmp_path / "manifest.json"
    counts, threads = [], []
    for i in range(100):
        # every 4th build runs a container, the others are satisfied from the store
        write_manifest(path, {"pipeline": {"stages": [
            {"name": "org.osbuild.noop", "options": {"build": i // 4}}]}})
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(["--libdir", REPO, "--store", str(store), "--json", str(path)])
        assert status == 0, err.getvalue()
        result = json.loads(out.getvalue())
        assert len(result["stages"]) == (1 if i % 4 == 0 else 0)
        counts.append(open_fds())
        threads.append(threading.active_count())
    # the first builds may open things for good (e.g. caches); after that: flat
    assert counts[-1] <= counts[4], counts
    assert threads[-1] <= threads[4], threads
    assert tmp_entries(store) == []
    assert leftovers(tmp_path) == {}


def test_disk_full(tmp_path):
    """The store's disk fills up while copying a tree: one clear error, nothing
    incomplete committed, work directories removed, and the store still usable."""
    small = tmp_path / "small"
    small.mkdir()
    # room for the build root's /etc (the allow-listed part of the host's) and one
    # 8 MB tree, not for two
    template = tmp_path / "etc-template"
    template.mkdir()
    etctemplate.from_host(str(template))
    etc_kib = int(subprocess.run(["du", "-sk", str(template)], capture_output=True, text=True,
                                 check=False).stdout.split()[0])
    size_kib = 12 * 1024 + etc_kib * 13 // 10 + 1024
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(small)],
                   check=True)
    try:
        store = small / "store"
        stages = [{"name": "org.osbuild.script",
                   "options": {"chroot": False, "script": "head -c 8M /dev/zero > big"}},
                  {"name": "org.osbuild.noop", "options": {"after": "big"}}]
        desc = {"pipeline": {"stages": stages}}
        path = write_manifest(tmp_path / "manifest.json", desc)
        ids = stage_ids(desc)
        # the checkpoint commits the 8 MB tree; the next stage needs a copy of it
        status, result, stderr = build(store, path, "--checkpoint", ids[0])
        assert status == 1
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("osbuild: "), stderr
        # --json: the same message as a JSON result (issue 14)
        assert result == {"success": False, "error": lines[0][len("osbuild: "):]}, result
        assert "No space left on device" in lines[0] and "internal error" not in lines[0]
        objects, refs = check_store(store)
        assert refs == [ids[0]] and len(objects) == 1
        assert tmp_entries(store) == []
        # a build that fits still works on the same store
        small_desc = {"pipeline": {"stages": [{"name": "org.osbuild.noop", "options": {}}]}}
        status, _, stderr = build(store, write_manifest(tmp_path / "small.json", small_desc))
        assert status == 0, stderr
        check_store(store)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_interrupted_workdir_creation_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C while a work directory is being created and locked removes it again."""
    from osbuild.util import workdir  # pylint: disable=import-outside-toplevel
    calls = []

    def interrupted_flock(_fd, op):
        calls.append(op)
        raise KeyboardInterrupt

    monkeypatch.setattr(workdir.fcntl, "flock", interrupted_flock)
    with pytest.raises(KeyboardInterrupt):
        workdir.WorkDir(str(tmp_path), "object-")
    assert calls and os.listdir(tmp_path) == []


def test_object_on_missing_base_leaves_nothing(tmp_path):
    """An Object whose base is not in the store raises, and leaves no work directory."""
    from osbuild.objectstore import ObjectStore, Object, StoreError  # pylint: disable=import-outside-toplevel
    store = ObjectStore(str(tmp_path / "store"))
    with pytest.raises(StoreError):
        Object(store, "0" * 64)
    assert tmp_entries(store.path) == []


def test_sigkill_while_the_host_fills_an_image(tmp_path):
    """osbuild killed while the host's populate helper copies the tree into a mounted image
    (xfs: ext4 and vfat are written without the host): the helper dies too, its private
    mounts go with it and the loop devices detach."""
    token = f"populate{uuid.uuid4().hex[:12]}"
    store = tmp_path / "store"
    stages = [{"name": "org.osbuild.script", "options": {
        "chroot": False,
        "script": f"mkdir -p boot/grub && head -c 400M /dev/urandom > blob  # {token}"}}]
    desc = {"pipeline": {"stages": stages, "assembler": {"name": "org.osbuild.qemu", "options": {
        "format": "raw", "filename": f"{token}.img", "size": 1 << 30, "root_fs_type": "xfs",
        "root_fs_uuid": "6e4ff95f-f662-45ee-a82a-bdf44a2d0b75", "bootloader": {"type": "none"}}}}}
    path = write_manifest(tmp_path / "manifest.json", desc)
    argv = [a for a in osbuild_cmd(store, path) if a != "--json"]
    # pylint: disable-next=consider-using-with  # killed and waited for below
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "copying the tree" in line:
                break
        deadline = time.monotonic() + 10
        while not _copying(store) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _copying(store), "".join(seen[-20:])
        assert proc.poll() is None, "".join(seen[-20:])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    time.sleep(0.1)   # the helper and its tar die with osbuild, long before the copy ends
    assert processes_mentioning("osbuild.executables.populate") == []
    assert not _copying(store)
    deadline = time.monotonic() + 15
    while loops_backed_under(tmp_path, markers=[token]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(tmp_path, markers=[token]) == {}
    check_store(store)


def _copying(store):
    """Whether the host's tar is extracting into an image mounted below the store."""
    return any("tar --extract" in argv for _, argv in processes_mentioning(str(store)))
