"""Unit tests of osbuild.objectstore: layout, modes, commits, the digest index."""

import json
import os
import stat

import pytest

from osbuild.objectstore import INDEX_FORMAT, ObjectStore, StoreError
from osbuild.treesum import treesum
from osbuild.util.fs import copy_tree

from hygiene import check_store

ID1, ID2, ID3 = "a1" * 32, "b2" * 32, "c3" * 32
DIRS = ("objects", "refs", "tmp", "sources", "index")


def write(path, data):
    """Write the text `data` to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(data)


def mode(path):
    """The permission bits of `path` (not following a link)."""
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_layout_is_private(tmp_path):
    store = ObjectStore(str(tmp_path / "store"))
    assert mode(store.path) == 0o700
    for d in DIRS:
        assert mode(os.path.join(store.path, d)) == 0o700, d


def test_looser_store_is_fixed_on_open(tmp_path):
    root = tmp_path / "store"
    ObjectStore(str(root))
    for d in DIRS:
        os.chmod(root / d, 0o755)
    os.chmod(root, 0o755)
    ObjectStore(str(root))
    for d in DIRS:
        assert mode(root / d) == 0o700, d
    assert mode(root) == 0o755  # the root may be a directory the user chose and shares


def test_umask_does_not_loosen_or_change_anything(tmp_path):
    old = os.umask(0)
    try:
        store = ObjectStore(str(tmp_path / "store"))
        with store.new(ID1) as obj:
            obj.write()
    finally:
        os.umask(old)
    for d in DIRS:
        assert mode(os.path.join(store.path, d)) == 0o700, d
    old = os.umask(0o077)
    try:
        with store.new(ID2) as obj:
            obj.write()
    finally:
        os.umask(old)
    assert mode(store.resolve_ref(ID1)) == mode(store.resolve_ref(ID2)) == 0o755


def test_store_entries_of_another_user_or_not_directories_are_refused(tmp_path):
    root = tmp_path / "store"
    ObjectStore(str(root))
    os.chown(root / "refs", 65534, 65534)
    with pytest.raises(StoreError, match="belongs to uid 65534"):
        ObjectStore(str(root))
    os.rmdir(root / "refs")
    os.symlink("/etc", root / "refs")
    with pytest.raises(StoreError, match="not a directory"):
        ObjectStore(str(root))


def test_loser_of_a_ref_race_leaves_no_object(tmp_path):
    """Two different trees committed under one id: the first stays, the second is dropped."""
    store = ObjectStore(str(tmp_path / "store"))
    with store.new(ID1) as obj:
        write(os.path.join(obj.write(), "f"), "first")
    first = store.resolve_ref(ID1)
    with store.new(ID1) as obj:
        write(os.path.join(obj.write(), "f"), "second")
        # the object continues from the winner's tree
    assert store.resolve_ref(ID1) == first
    objects, refs = check_store(store.path)
    assert refs == [ID1] and objects == [os.path.basename(first)]
    assert os.listdir(store.tmp) == []


def test_hard_link_structure_is_not_shared(tmp_path):
    """A tree with a copy is never answered with a tree that has a hard link."""
    store = ObjectStore(str(tmp_path / "store"))
    with store.new(ID1) as obj:
        tree = obj.write()
        write(os.path.join(tree, "a"), "data")
        os.link(os.path.join(tree, "a"), os.path.join(tree, "b"))
        times = os.stat(os.path.join(tree, "a")).st_mtime_ns
        os.utime(tree, ns=(times, times))
    with store.new(ID2) as obj:
        tree = obj.write()
        for name in ("a", "b"):
            write(os.path.join(tree, name), "data")
            os.utime(os.path.join(tree, name), ns=(times, times))
        os.utime(tree, ns=(times, times))
    objects, _ = check_store(store.path)
    assert len(objects) == 2
    assert os.stat(os.path.join(store.resolve_ref(ID2), "b")).st_nlink == 1


def test_index_is_written_and_reused_correctly(tmp_path):
    """A copy reuses the digests of files it did not change, and only those."""
    store = ObjectStore(str(tmp_path / "store"))
    with store.new(ID1) as obj:
        tree = obj.write()
        write(os.path.join(tree, "same"), "same")
        write(os.path.join(tree, "changed"), "old!")
    path = store.resolve_ref(ID1)
    with open(os.path.join(store.index, os.path.basename(path)), encoding="utf-8") as f:
        index = json.load(f)
    assert index["format"] == INDEX_FORMAT and set(index["files"]) == {"/same", "/changed"}
    with store.new(ID2, base_id=ID1) as obj:
        tree = obj.write()
        assert set(obj.known) == {"/same", "/changed"}
        changed = os.path.join(tree, "changed")
        st = os.stat(changed)
        write(changed, "new!")  # same size, and the mtime put back: only ctime tells
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    fresh = store.resolve_ref(ID2)
    assert os.path.basename(fresh) == treesum(fresh)
    with open(os.path.join(fresh, "changed"), encoding="utf-8") as f:
        assert f.read() == "new!"


def test_index_of_another_format_is_ignored(tmp_path):
    store = ObjectStore(str(tmp_path / "store"))
    with store.new(ID1) as obj:
        write(os.path.join(obj.write(), "f"), "x")
    name = os.path.basename(store.resolve_ref(ID1))
    # the old format: a bare map of path -> record, with a digest of another scheme
    write(os.path.join(store.index, name), json.dumps({"/f": [0, 0, 1, 0, "0" * 64]}))
    assert store.read_index(name) is None
    with store.new(ID2, base_id=ID1) as obj:
        obj.write()
        assert obj.known is None


def test_snapshot_and_unwritten_commit(tmp_path):
    store = ObjectStore(str(tmp_path / "store"))
    with store.new(ID1) as obj:
        write(os.path.join(obj.write(), "f"), "x")
        store.snapshot(obj, ID2)
    with store.new(ID3, base_id=ID1):
        pass  # nothing written: the same object
    assert store.resolve_ref(ID1) == store.resolve_ref(ID2) == store.resolve_ref(ID3)
    objects, refs = check_store(store.path)
    assert len(objects) == 1 and refs == sorted([ID1, ID2, ID3])


def test_output_copy_is_exact_and_sparse(tmp_path):
    """--output-directory copies content, holes and mtime; a rerun leaves it alone."""
    from osbuild.output import copy_output  # pylint: disable=import-outside-toplevel
    store = ObjectStore(str(tmp_path / "store"))
    with store.new(ID1) as obj:
        image = os.path.join(obj.write(), "disk.raw")
        with open(image, "wb") as f:
            f.truncate(64 << 20)
            f.seek(5 << 20)
            f.write(b"boot")
        os.utime(image, (T_OUT, T_OUT))
    dest = tmp_path / "out"
    assert copy_output(store, ID1, str(dest)) == [str(dest / "disk.raw")]
    copied = dest / "disk.raw"
    with open(copied, "rb") as a, open(os.path.join(store.resolve_ref(ID1), "disk.raw"), "rb") as b:
        assert a.read() == b.read()
    st = os.stat(copied)
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 1 << 20 and st.st_mtime == T_OUT
    inode = st.st_ino
    copy_output(store, ID1, str(dest))
    assert os.stat(copied).st_ino == inode  # unchanged: not copied again
    assert os.listdir(dest) == ["disk.raw"]


T_OUT = 1_200_000_000


def test_copy_tree_whole_and_selected(tmp_path):
    """util.fs.copy_tree, the one tree copy: whole (cp, reflinks) or selected members into
    an existing directory leaving out excluded paths (tar); a failure is one OSError line."""
    src = tmp_path / "src"
    (src / "boot" / "efi").mkdir(parents=True)
    write(str(src / "boot" / "efi" / "x"), "efi")
    write(str(src / "boot" / "k"), "kernel")
    write(str(src / "a.mod"), "mod")
    os.symlink("boot/k", src / "link")
    os.chmod(src / "boot" / "k", 0o4711)
    copy_tree(str(src), str(tmp_path / "whole"))
    assert os.readlink(tmp_path / "whole" / "link") == "boot/k"
    assert mode(str(tmp_path / "whole" / "boot" / "k")) == 0o4711
    part = tmp_path / "part"
    part.mkdir()
    copy_tree(str(src), str(part), exclude=["/boot/efi"], members=["."])
    assert os.listdir(part / "boot") == ["k"]
    only = tmp_path / "only"
    only.mkdir()
    copy_tree(str(src), str(only), members=["a.mod"])
    assert os.listdir(only) == ["a.mod"]
    with pytest.raises(OSError, match="^cannot copy a tree: "):
        copy_tree(str(tmp_path / "missing"), str(tmp_path / "x"))
    with pytest.raises(OSError, match="^cannot copy a tree: .*") as e:
        copy_tree(str(src), str(tmp_path / "nodir"), members=["."])
    assert "\n" not in str(e.value)
