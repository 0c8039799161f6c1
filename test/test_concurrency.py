"""Concurrency: several osbuild processes on one store at the same time.

Overlapping manifests all succeed with correct trees, identical trees are
stored once, a starting osbuild never removes a live build's work
directories (only those of dead ones), refs never change under a reader,
and builds really run in parallel (no global lock).
"""

import json
import multiprocessing
import os
import time
import uuid

import pytest

from osbuild.manifest import load
from osbuild.objectstore import ObjectStore
from osbuild.treesum import treesum

from hygiene import check_store, leftovers, no_leftovers_fixture  # pylint: disable=unused-import
from osbuildproc import finish, start

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def osbuild_popen(store, manifest_path, *extra):
    """Start osbuild from this checkout with --json."""
    return start(store, manifest_path, *extra)


def write(path, desc):
    """Write a manifest; returns its path."""
    path.write_text(json.dumps(desc))
    return path


def tmp_entries(store):
    """What is in STORE/tmp."""
    return sorted(os.listdir(os.path.join(store, "tmp")))


def markers(store, name="started"):
    """Work trees in STORE/tmp that contain the file `name`."""
    tmp = os.path.join(store, "tmp")
    return [d for d in os.listdir(tmp) if os.path.exists(os.path.join(tmp, d, "tree", name))]


def common_stages(token):
    """Stages every manifest of the overlap test shares."""
    return [{"name": "org.osbuild.noop", "options": {"token": token}},
            {"name": "org.osbuild.script",
             "options": {"chroot": False,
                         "script": f": {token}; mkdir -p etc; echo shared > etc/shared; "
                                   "i=0; while [ $i -lt 200 ]; do echo $i > etc/f$i; "
                                   "i=$((i+1)); done"}}]


@pytest.mark.integration
@pytest.mark.parametrize("round_", [1, 2])
def test_overlapping_builds(tmp_path, round_):
    """Three builds at once (two identical, one diverging): all succeed, trees stored once."""
    token = f"overlap-{round_}-{uuid.uuid4().hex}"
    store = tmp_path / "store"
    shared = common_stages(token)
    descs = [{"pipeline": {"stages": shared + [{"name": "org.osbuild.noop", "options": {"a": 1}}]}},
             {"pipeline": {"stages": shared + [{"name": "org.osbuild.noop", "options": {"b": 2}}]}},
             {"pipeline": {"stages": shared + [{"name": "org.osbuild.noop", "options": {"a": 1}}]}}]
    ids = [s.id for s in load(descs[0], REPO).pipeline.stages]
    procs = [osbuild_popen(store, write(tmp_path / f"m{i}.json", desc),
                           "--checkpoint", ids[0], "--checkpoint", ids[1])
             for i, desc in enumerate(descs)]
    results = [finish(p) for p in procs]
    for status, result, stderr in results:
        assert status == 0, stderr
        assert result["success"] is True
    objects, refs = check_store(store)
    tree_ids = {load(d, REPO).pipeline.tree_id for d in descs}
    assert set(refs) == {ids[0], ids[1]} | tree_ids
    # the empty tree of the first stage, and the one tree all later stages share
    assert len(objects) == 2, objects
    for tree_id in tree_ids:
        with open(os.path.join(store, "refs", tree_id, "etc", "shared"), encoding="utf-8") as f:
            assert f.read() == "shared\n"
    assert tmp_entries(store) == []
    assert leftovers(tmp_path, markers=[token]) == {}


@pytest.mark.integration
def test_starting_build_keeps_live_workdirs(tmp_path):
    """A second osbuild starting during a build removes only dead builds' work dirs."""
    token = f"live-{uuid.uuid4().hex}"
    store = tmp_path / "store"
    slow = write(tmp_path / "slow.json", {"pipeline": {"stages": [
        {"name": "org.osbuild.script",
         "options": {"chroot": False,
                     "script": f": {token}; echo slow > slow; touch started; "
                               "i=0; while [ ! -e release ] && [ $i -lt 1200 ]; do "
                               "sleep 0.05; i=$((i+1)); done; "
                               "rm -f started release; cat slow > copy"}}]}})
    quick = write(tmp_path / "quick.json", {"pipeline": {"stages": [
        {"name": "org.osbuild.noop", "options": {"token": token}}]}})
    proc = osbuild_popen(store, slow)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                os.path.isdir(store / "tmp") and markers(store)):
            time.sleep(0.02)
        live = tmp_entries(store)
        assert markers(store), "the slow stage never started"
        # what a build killed earlier would have left: an unlocked work directory
        stale = store / "tmp" / "object-stale"
        os.makedirs(stale / "tree" / "etc")
        quick_status, _, stderr = finish(osbuild_popen(store, quick))
        assert quick_status == 0, stderr
        assert not stale.exists(), "the stale work directory was not removed"
        assert set(live) <= set(tmp_entries(store)), "a live work directory was removed"
        for work in markers(store):
            with open(os.path.join(store, "tmp", work, "tree", "release"), "w", encoding="utf-8"):
                pass
        status, result, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 0, stderr
    with open(os.path.join(store, "refs", result["tree_id"], "copy"), encoding="utf-8") as f:
        assert f.read() == "slow\n"
    assert tmp_entries(store) == []
    check_store(store)


@pytest.mark.integration
def test_builds_run_in_parallel(tmp_path):
    """Two builds on one store run their stages at the same time (no global lock)."""
    token = f"parallel-{uuid.uuid4().hex}"
    store = tmp_path / "store"
    procs = []
    for i in range(2):
        path = write(tmp_path / f"p{i}.json", {"pipeline": {"stages": [
            {"name": "org.osbuild.script",
             "options": {"chroot": False,
                         "script": f": {token} {i}; touch started; sleep 3; rm started"}}]}})
        procs.append(osbuild_popen(store, path))
    both = False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if os.path.isdir(store / "tmp") and len(markers(store)) == 2:
                both = True
                break
            time.sleep(0.02)
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert both, "the two stages never ran at the same time"
    for status, _, stderr in results:
        assert status == 0, stderr


def _commit_many(store_path, object_id, rounds, queue):
    """Child process: commit the same content under the same id `rounds` times."""
    try:
        for i in range(rounds):
            store = ObjectStore(store_path)  # also cleans STORE/tmp, concurrently
            with store.new(object_id) as obj:
                tree = obj.write()
                os.makedirs(os.path.join(tree, "etc"), exist_ok=True)
                for n in range(20):
                    with open(os.path.join(tree, "etc", f"f{n}"), "w", encoding="utf-8") as f:
                        f.write(f"{n}\n")
            path = store.resolve_ref(object_id)
            assert path is not None and treesum(path) == os.path.basename(path), i
            # a second id for the same content in every round
            with store.new(f"{i:064x}") as obj:
                obj.write()
        queue.put(None)
    except Exception as e:  # pylint: disable=broad-exception-caught
        queue.put(f"{type(e).__name__}: {e}")


def test_concurrent_commits_and_cleanups(tmp_path):
    """Three processes commit identical trees under one id while each also cleans STORE/tmp.

    Every commit succeeds (no live work directory is removed by another
    process' clean-up), every ref is complete and every object has a ref.
    """
    store = str(tmp_path / "store")
    ObjectStore(store)
    object_id = "ab" * 32
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_commit_many, args=(store, object_id, 25, queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    errors = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert errors == [None, None, None]
    objects, refs = check_store(store)
    # the 20-file tree once, and one empty tree per id (their root mtimes
    # differ): whichever process lost a race dropped its tree, none is orphaned
    targets = {os.path.basename(os.readlink(os.path.join(store, "refs", r))) for r in refs}
    assert set(objects) == targets
    assert object_id in refs and len(refs) == 26
    assert tmp_entries(store) == []


def test_ref_is_never_replaced(tmp_path):
    """A ref, once there, keeps pointing at the same object (first commit wins)."""
    store = ObjectStore(str(tmp_path / "store"))
    object_id = "cd" * 32
    with store.new(object_id) as obj:
        with open(os.path.join(obj.write(), "a"), "w", encoding="utf-8") as f:
            f.write("first")
    first = store.resolve_ref(object_id)
    with store.new(object_id) as obj:
        with open(os.path.join(obj.write(), "a"), "w", encoding="utf-8") as f:
            f.write("second")
    assert store.resolve_ref(object_id) == first
    # a dangling ref (its object removed by hand) is repaired by the next commit
    os.rename(first, first + ".gone")
    with store.new(object_id) as obj:
        obj.write()
    assert store.resolve_ref(object_id) is not None
    assert os.listdir(os.path.join(store.path, "refs")) == [object_id]
