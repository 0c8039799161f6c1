"""--cache-max-size and --gc: LRU eviction that keeps the newest and running builds' work.

Real builds under a small limit (what is kept, in LRU order), a running
build's objects surviving another build's eviction, SIGKILL at every step of
an eviction leaving a consistent store that the next build uses, source
caches counted and evicted, disk usage by allocated blocks, bad SIZE values.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_osbuild
from hygiene import check_store, no_leftovers_fixture  # pylint: disable=unused-import
from test_sources import server_fixture, sha  # pylint: disable=unused-import

from osbuild import cache
from osbuild.manifest import load
from osbuild.objectstore import ObjectStore
from osbuild.treesum import treesum

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024


def blob_manifest(name, mib=1, extra=()):
    """A manifest whose tree holds `name`: `mib` MiB of random data."""
    script = f"head -c {mib * MIB} /dev/urandom > {name}"
    stages = [{"name": "org.osbuild.script", "options": {"chroot": False, "script": script}}]
    return {"pipeline": {"stages": stages + list(extra)}}


def tree_id(desc):
    """The tree id of a manifest."""
    return load(desc).pipeline.tree_id


def build(tmp_path, store, desc, *args):
    """Build `desc` (as its own manifest file) with --json; returns the result."""
    path = tmp_path / f"m-{tree_id(desc)[:12]}.json"
    path.write_text(json.dumps(desc))
    return run_osbuild(str(path), store, *args)


def refs(store):
    """The ids in the store."""
    return set(os.listdir(os.path.join(store, "refs")))


# --- SIZE values ---------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("0", 0), ("123", 123), ("500MB", 500 * 1000 ** 2), ("20GiB", 20 * 1024 ** 3),
    ("1.5KiB", 1536), ("2 kB", 2000), ("3tib", 3 * 1024 ** 4), ("7B", 7),
    ("unlimited", None), ("Unlimited", None)])
def test_parse_size(text, value):
    """Bytes, SI (powers of 1000) and IEC (powers of 1024) units, unlimited."""
    assert cache.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1M", "5G", "12XB", "1.5", "lots", "1e9",
                                  "0x10", "GiB", "1 2GiB", "99999999999TiB"])
def test_parse_size_rejects(text):
    """Anything else is a SizeError naming the value."""
    with pytest.raises(cache.SizeError, match="SIZE"):
        cache.parse_size(text)


@pytest.mark.parametrize("text", ["1M", "-5GiB", "big"])
def test_bad_size_cli(tmp_path, text):
    """A bad --cache-max-size: one line, exit 1, a JSON result, and no store made."""
    store = tmp_path / "store"
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(blob_manifest("a")))
    for as_json in (False, True):
        res = run_osbuild(str(manifest), store, f"--cache-max-size={text}", json_output=as_json)
        assert res.returncode == 1
        assert "Traceback" not in res.stderr
        assert res.stderr.startswith("osbuild: --cache-max-size: SIZE")
        assert len(res.stderr.strip().splitlines()) == 1
        if as_json:
            assert res.json["success"] is False and "--cache-max-size" in res.json["error"]
    assert not store.exists()


def test_gc_usage_errors(tmp_path):
    """--gc takes no manifest and needs a limit; a missing store is not created."""
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(store), "--json"]
    res = subprocess.run(cmd + ["--gc", "--cache-max-size", "1GiB"], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 1 and "does not exist" in json.loads(res.stdout)["error"]
    ObjectStore(str(store))
    for extra, message in ((["--gc"], "needs --cache-max-size"),
                           (["--gc", "--cache-max-size", "1GiB", "m.json"], "takes no MANIFEST")):
        res = subprocess.run(cmd + extra, cwd=REPO, capture_output=True, text=True, check=False)
        assert res.returncode == 1, res.stderr
        assert message in json.loads(res.stdout)["error"]
        assert len(res.stderr.strip().splitlines()) == 1


# --- sizes ---------------------------------------------------------------------

def test_disk_usage_blocks_and_links(tmp_path):
    """Allocated blocks, not apparent sizes: a sparse file counts what it holds,
    a hard-linked file counts once."""
    tree = tmp_path / "tree"
    tree.mkdir()
    base = cache.disk_usage(str(tree))
    with open(tree / "sparse", "wb") as f:
        f.truncate(512 * MIB)
        f.seek(100 * MIB)
        f.write(b"x" * 4096)
    sparse = cache.disk_usage(str(tree)) - base
    assert 4096 <= sparse < MIB
    (tree / "data").write_bytes(os.urandom(2 * MIB))
    with_data = cache.disk_usage(str(tree))
    assert 2 * MIB <= with_data - base - sparse < 2 * MIB + 64 * 1024
    os.link(tree / "data", tree / "link")
    os.mkdir(tree / "sub")
    os.link(tree / "data", tree / "sub" / "link2")
    assert cache.disk_usage(str(tree)) - with_data < 64 * 1024  # the new directory only


# --- builds under a limit ------------------------------------------------------

@pytest.mark.integration
def test_lru_eviction_over_builds(tmp_path):
    """Several builds under a 2.5 MiB limit (1 MiB each): least recently used go first,
    a rebuild that is served from the store counts as a use, the newest always stays."""
    store = str(tmp_path / "store")
    one, two, three = (blob_manifest(n) for n in ("one", "two", "three"))
    limit = ["--cache-max-size", "2.5MiB"]
    for desc in (one, two):
        res = build(tmp_path, store, desc, *limit)
        assert res.returncode == 0, res.stderr
    assert refs(store) == {tree_id(one), tree_id(two)}
    time.sleep(0.01)
    res = build(tmp_path, store, one)  # nothing runs: a use of `one`; the limit is remembered
    assert res.returncode == 0 and res.json["stages"] == []
    res = build(tmp_path, store, three)
    assert res.returncode == 0, res.stderr
    assert refs(store) == {tree_id(one), tree_id(three)}  # two was least recently used
    objects, _ = check_store(store)
    assert len(objects) == 2
    assert sorted(os.listdir(os.path.join(store, "index"))) == objects  # no stale record
    # a build larger than the limit alone: kept whole (stage checkpoint too), with a warning
    big = blob_manifest("big", mib=3, extra=[{"name": "org.osbuild.noop", "options": {"n": 1}}])
    first = load(big).pipeline.stages[0].id
    res = build(tmp_path, store, big, "--checkpoint", first)
    assert res.returncode == 0 and res.json["success"], res.stderr
    assert "more than its limit" in res.stderr
    assert refs(store) == {tree_id(big), first}
    with open(os.path.join(store, "refs", tree_id(big), "big"), "rb") as f:
        assert len(f.read()) == 3 * MIB
    # shrink without building, down to nothing: the store stays consistent
    res = subprocess.run([sys.executable, "-m", "osbuild", "--store", store, "--gc",
                          "--cache-max-size", "0", "--json"], cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["success"] and report["size"] == 0 and report["evicted_objects"] == 1
    assert check_store(store) == ([], [])
    assert os.listdir(os.path.join(store, "index")) == []
    assert os.listdir(os.path.join(store, "sizes")) == []


@pytest.mark.integration
def test_running_build_keeps_its_objects(tmp_path):
    """Another build's eviction (limit 0) leaves a running build's base and result alone."""
    store = str(tmp_path / "store")
    base = blob_manifest("base")
    base_id = tree_id(base)
    assert build(tmp_path, store, base).returncode == 0
    wait = {"name": "org.osbuild.script", "options": {"chroot": False, "script":
            "touch started; while [ ! -e go ]; do sleep 0.1; done; rm started go"}}
    slow = blob_manifest("base", extra=[wait])
    path = tmp_path / "slow.json"
    path.write_text(json.dumps(slow))
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", store, "--json",
           str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,  # pylint: disable=consider-using-with
                            stderr=subprocess.PIPE, text=True)
    try:
        tmp = os.path.join(store, "tmp")
        deadline = time.monotonic() + 300
        waiting = []
        while not waiting:
            assert proc.poll() is None and time.monotonic() < deadline, "slow build did not start"
            waiting = [d for d in os.listdir(tmp)
                       if os.path.exists(os.path.join(tmp, d, "tree", "started"))]
            time.sleep(0.1)
        # the base is the least recently used object, and the limit leaves room for nothing
        res = build(tmp_path, store, blob_manifest("other"), "--cache-max-size", "0")
        assert res.returncode == 0, res.stderr
        assert base_id in refs(store), "the running build's base was evicted"
        assert tree_id(blob_manifest("other")) in refs(store), "the newest result was evicted"
        check_store(store)
        with open(os.path.join(tmp, waiting[0], "tree", "go"), "w", encoding="utf-8"):
            pass
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out)["success"]
    assert tree_id(slow) in refs(store)
    check_store(store)


@pytest.mark.integration
def test_source_files_count_in_real_builds(tmp_path, server):
    """Downloaded files count: under 4.5 MiB, three builds of 1 MiB tree + 1 MiB download
    each leave the two newest builds' trees and files; the oldest file is fetched again."""
    store = str(tmp_path / "store")
    blobs = {name: os.urandom(MIB) for name in "abc"}
    urls = {name: {sha(blob): server.add(name, blob)} for name, blob in blobs.items()}
    descs = {name: {"pipeline": {"stages": [{"name": "org.osbuild.files-test", "options": {
        "checksums": list(urls[name]), "path": "/srv"}}]},
        "sources": {"org.osbuild.files": {"urls": urls[name]}}} for name in "abc"}
    for name in "abc":
        res = build(tmp_path, store, descs[name], "--cache-max-size", "4.5MiB")
        assert res.returncode == 0, res.stderr
    cached = os.path.join(store, "sources", "org.osbuild.files")
    assert sorted(os.listdir(cached)) == sorted([*urls["b"], *urls["c"]])
    assert refs(store) == {tree_id(descs["b"]), tree_id(descs["c"])}
    assert server.count("a") == 1
    res = build(tmp_path, store, descs["a"])
    assert res.returncode == 0 and server.count("a") == 2
    assert sorted(os.listdir(cached)) == sorted([*urls["a"], *urls["c"]])
    check_store(store)


@pytest.mark.integration
def test_eviction_never_follows_a_trees_links(tmp_path):
    """A stage's links to host paths (a directory, a file; hard links) are measured and
    removed as links: eviction leaves what they point at alone. Paths longer than
    PATH_MAX do not stop eviction."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "keep").write_bytes(os.urandom(MIB))
    (tmp_path / "file").write_text("keep me")
    script = (f"ln -s {victim} dirlink; ln -s {victim}/sub/keep filelink; ln -s {tmp_path}/file f; "
              f"mkdir -p a/b; ln -s {victim}/sub a/b/sub; ln -s ../../.. a/b/up; "
              "head -c 65536 /dev/urandom > data; ln data hard; "
              # deeper than PATH_MAX (4096): measured and removed all the same
              "python3 -c \"import os\nfor i in range(30):\n    os.mkdir('d' * 200); "
              "os.chdir('d' * 200)\n\"")
    desc = {"pipeline": {"stages": [{"name": "org.osbuild.script",
                                     "options": {"chroot": False, "script": script}}]}}
    store = str(tmp_path / "store")
    assert build(tmp_path, store, desc).returncode == 0
    obj = os.path.realpath(os.path.join(store, "refs", tree_id(desc)))
    assert cache.object_size(ObjectStore(store), os.path.basename(obj)) < 512 * 1024
    res = subprocess.run([sys.executable, "-m", "osbuild", "--store", store, "--gc",
                          "--cache-max-size", "0"], cwd=REPO, capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(obj) and check_store(store) == ([], [])
    assert len((victim / "sub" / "keep").read_bytes()) == MIB
    assert (tmp_path / "file").read_text() == "keep me"


# --- SIGKILL during eviction ---------------------------------------------------

def _shrink_and_die_at(store_path, step):
    """In a child: shrink to 0, SIGKILL itself at the `step`-th unlink/rename/rmdir."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            calls = [0]

            def dying(real):
                def call(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return call
            os.unlink = dying(os.unlink)
            os.rename = dying(os.rename)
            os.rmdir = dying(os.rmdir)
            cache.shrink(ObjectStore(store_path), 0)
        finally:
            os._exit(0)  # pylint: disable=protected-access
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


@pytest.mark.integration
def test_sigkill_during_eviction(tmp_path):
    """Killed at each step of an eviction, the store has no dangling ref, no partial object
    and no stale record; the next open removes the leftovers and a build works again."""
    pristine = str(tmp_path / "pristine")
    descs = [blob_manifest(f"f{i}", extra=[{"name": "org.osbuild.script", "options": {
        "chroot": False, "script": f"mkdir d; for i in $(seq 40); do echo $i > d/$i; done # {i}"}}])
        for i in range(3)]
    for desc in descs:
        first = load(desc).pipeline.stages[0].id
        assert build(tmp_path, pristine, desc, "--checkpoint", first).returncode == 0
    assert len(refs(pristine)) == 6
    store = str(tmp_path / "store")
    step, killed = 1, 0
    while True:
        shutil.rmtree(store, ignore_errors=True)
        subprocess.run(["cp", "-a", pristine, store], check=True)
        if not _shrink_and_die_at(store, step):
            break  # the eviction finished before this step
        killed += 1
        check_store(store)  # complete objects, refs that resolve
        ObjectStore(store)  # the next run's open removes the dead eviction's work dirs
        assert not [d for d in os.listdir(os.path.join(store, "tmp"))
                    if d.startswith(cache.TRASH_PREFIX)]
        cache.shrink(ObjectStore(store), None)  # tidies: records only of objects there
        objects, _ = check_store(store)
        assert set(os.listdir(os.path.join(store, "index"))) <= set(objects)
        step += 1 if step < 30 else 25
    assert killed >= 12  # 6 refs + 6 renames at least, then the deletion
    # a store killed mid-way serves a rebuild correctly
    shutil.rmtree(store)
    subprocess.run(["cp", "-a", pristine, store], check=True)
    assert _shrink_and_die_at(store, 8)
    for desc in descs:
        res = build(tmp_path, store, desc)
        assert res.returncode == 0 and res.json["success"], res.stderr
        tree = os.path.join(store, "refs", tree_id(desc))
        assert sorted(os.listdir(os.path.join(tree, "d")), key=int) == [str(i) for i in
                                                                       range(1, 41)]
        assert os.path.getsize(os.path.join(tree, [n for n in os.listdir(tree)
                                                   if n.startswith("f")][0])) == MIB
        assert treesum(os.path.realpath(tree)) == os.path.basename(os.path.realpath(tree))


# --- source caches -------------------------------------------------------------

def _source_file(store, relpath, size, mtime):
    path = os.path.join(store.sources, relpath)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    os.utime(path, (mtime, mtime))
    return path


def test_sources_count_and_leases_protect(tmp_path):
    """Source files (also under secret-<fp>/) count and are evicted oldest first; a live
    lease's checksums and ids are never evicted; work in progress is never touched."""
    store = ObjectStore(str(tmp_path / "store"))
    sums = [f"sha256:{i:064x}" for i in range(4)]
    now = time.time()
    old = _source_file(store, f"org.osbuild.files/{sums[0]}", MIB, now - 400)
    secret = _source_file(store, f"org.osbuild.files/secret-abc/{sums[1]}", MIB, now - 300)
    leased = _source_file(store, f"org.osbuild.files/{sums[2]}", MIB, now - 500)
    new = _source_file(store, f"org.osbuild.files/{sums[3]}", MIB, now - 100)
    busy = _source_file(store, "org.osbuild.files/work-1234/partial", MIB, now - 900)
    with store.new("a" * 64) as obj:
        with open(os.path.join(obj.write(), "f"), "wb") as f:
            f.write(os.urandom(MIB))
    os.utime(os.path.join(store.refs, "a" * 64), ns=(0, 0), follow_symlinks=False)
    with cache.Lease(store, ["a" * 64], [sums[2]]) as lease:
        os.utime(leased, (now - 500, now - 500))  # the lease touched it: make it old again
        os.utime(os.path.join(store.refs, "a" * 64), ns=(0, 0), follow_symlinks=False)
        report = cache.shrink(store, int(3.5 * MIB))
        assert report.before >= 5 * MIB
        assert [os.path.basename(k) for _, k in report.evicted] == [sums[0], sums[1]]
        assert not os.path.exists(old) and not os.path.exists(secret)
        assert os.path.exists(leased) and os.path.exists(new) and os.path.exists(busy)
        assert not report.over
        report = cache.shrink(store, 0)
        assert [os.path.basename(k) for _, k in report.evicted] == [sums[3]]
        assert os.path.exists(leased) and store.contains("a" * 64)
        assert report.over and report.size >= 2 * MIB  # leased content alone exceeds it
        assert os.path.isdir(os.path.dirname(secret))  # a live lease: directories stay
        lease.touch()
    assert cache.live_leases(store) == (set(), set(), 0)
    report = cache.shrink(store, 0)
    assert not os.path.exists(leased) and not os.path.exists(new)
    assert not store.contains("a" * 64) and os.listdir(store.objects) == []
    assert not os.path.exists(os.path.dirname(secret))  # empty secret-<fp>/ removed
    assert os.path.exists(busy)


def test_killed_builds_lease_is_ignored(tmp_path):
    """A lease whose holder died (SIGKILL) protects nothing and is removed on open."""
    store = ObjectStore(str(tmp_path / "store"))
    with store.new("b" * 64) as obj:
        with open(os.path.join(obj.write(), "f"), "w", encoding="utf-8") as f:
            f.write("x")
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        cache.Lease(store, ["b" * 64])
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert [d for d in os.listdir(store.tmp) if d.startswith(cache.LEASE_PREFIX)]
    assert cache.live_leases(store)[2] == 0
    cache.shrink(store, 0)
    assert not store.contains("b" * 64)
    ObjectStore(store.path)
    assert not [d for d in os.listdir(store.tmp) if d.startswith(cache.LEASE_PREFIX)]


def test_unreadable_live_lease_stops_eviction(tmp_path):
    """A live lease that cannot be read: nothing is evicted, a StoreError says why."""
    store = ObjectStore(str(tmp_path / "store"))
    with store.new("c" * 64) as obj:
        obj.write()
    with cache.Lease(store, []) as lease:
        path = os.path.join(lease._workdir.path, cache.LEASE_FILE)  # pylint: disable=protected-access
        with open(path, "w", encoding="utf-8") as f:
            f.write("{")
        with pytest.raises(cache.StoreError, match="lease"):
            cache.shrink(store, 0)
    assert store.contains("c" * 64)
