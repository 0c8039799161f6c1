"""Unit tests of osbuild.treesum: what is and is not part of a tree's identity."""

import hashlib
import json
import os
import subprocess
import time

import pytest

from osbuild.treesum import FileRecord, CHUNK, file_digest, treesum

T = 1_000_000_000  # a fixed mtime (s)


def make(root, files):
    """Create `files` ({relative path: bytes}) under `root` with fixed mtimes; returns root."""
    os.makedirs(root, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    pin(root)
    return root


def pin(root, when=T):
    """Set the mtime of everything below `root` (and root) to `when`."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (when, when), follow_symlinks=False)
    os.utime(root, (when, when))


def reference_digest(path):
    """file_digest computed the slow, obvious way: read everything."""
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(f"chunked-sha256 {CHUNK} {len(data)}\n".encode())
    for i in range(0, len(data), CHUNK):
        digest.update(hashlib.sha256(data[i:i + CHUNK]).digest())
    return digest.hexdigest()


def digest_of(path):
    """treesum's content digest of the file at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return file_digest(fd)
    finally:
        os.close(fd)


def test_same_content_same_sum_regardless_of_creation_order(tmp_path):
    a = make(str(tmp_path / "a"), {"x": b"1", "d/y": b"2", "d/z": b"3"})
    b = make(str(tmp_path / "b"), {"d/z": b"3", "d/y": b"2", "x": b"1"})
    assert treesum(a) == treesum(b)


def test_copy_keeps_the_sum(tmp_path):
    a = make(str(tmp_path / "a"), {"x": b"1" * 5000, "d/y": b"2"})
    os.symlink("x", os.path.join(a, "d", "l"))
    os.link(os.path.join(a, "x"), os.path.join(a, "d", "hard"))
    pin(a)
    subprocess.run(["cp", "-a", a, str(tmp_path / "b")], check=True)
    assert treesum(a) == treesum(str(tmp_path / "b"))


def test_content_mode_owner_xattr_matter(tmp_path):
    a = make(str(tmp_path / "a"), {"x": b"1"})
    base = treesum(a)
    x = os.path.join(a, "x")
    with open(x, "wb") as f:
        f.write(b"2")
    pin(a)
    assert treesum(a) != base
    with open(x, "wb") as f:
        f.write(b"1")
    pin(a)
    assert treesum(a) == base
    os.chmod(x, 0o600)
    assert treesum(a) != base
    os.chmod(x, 0o644)
    os.chown(x, 7, 8)
    assert treesum(a) != base
    os.chown(x, 0, 0)
    os.setxattr(x, "user.k", b"v")
    assert treesum(a) != base


def test_hard_links_are_part_of_the_sum(tmp_path):
    """Two trees that differ only in hard links are different trees."""
    linked = make(str(tmp_path / "linked"), {"a": b"data"})
    os.link(os.path.join(linked, "a"), os.path.join(linked, "b"))
    copied = make(str(tmp_path / "copied"), {"a": b"data", "b": b"data"})
    pin(linked)
    pin(copied)
    assert treesum(linked) != treesum(copied)


def test_hard_link_groups_are_told_apart(tmp_path):
    """{a,b} {c} and {a} {b,c} are different structures of the same files."""
    one = make(str(tmp_path / "one"), {"a": b"x"})
    os.link(os.path.join(one, "a"), os.path.join(one, "b"))
    make(one, {"c": b"x"})
    two = make(str(tmp_path / "two"), {"a": b"x", "b": b"x"})
    os.link(os.path.join(two, "b"), os.path.join(two, "c"))
    pin(one)
    pin(two)
    assert treesum(one) != treesum(two)


def test_link_to_outside_the_tree_is_a_plain_file(tmp_path):
    """Only the links inside the tree are structure: what an assembler sees."""
    plain = make(str(tmp_path / "plain"), {"a": b"data"})
    linked = make(str(tmp_path / "linked"), {"a": b"data"})
    os.link(os.path.join(linked, "a"), str(tmp_path / "outside"))
    pin(linked)
    assert treesum(plain) == treesum(linked)


@pytest.mark.parametrize("what", ["file", "dir", "root", "symlink"])
def test_mtimes_are_part_of_the_sum(tmp_path, what):
    tree = make(str(tmp_path / "t"), {"d/f": b"x"})
    os.symlink("d/f", os.path.join(tree, "l"))
    pin(tree)
    base = treesum(tree)
    path = {"file": "d/f", "dir": "d", "root": "", "symlink": "l"}[what]
    os.utime(os.path.join(tree, path), (T, T + 1), follow_symlinks=False)
    assert treesum(tree) != base
    os.utime(os.path.join(tree, path), ns=(T * 10**9, T * 10**9 + 1), follow_symlinks=False)
    assert treesum(tree) != base  # nanoseconds count


def test_atime_and_ctime_do_not_matter(tmp_path):
    tree = make(str(tmp_path / "t"), {"f": b"x"})
    base = treesum(tree)
    f = os.path.join(tree, "f")
    os.chmod(f, 0o600)
    os.chmod(f, 0o644)  # new ctime
    os.utime(f, (T + 5, T))  # new atime
    assert treesum(tree) == base


def test_sparse_file_digest_is_its_content(tmp_path):
    """Holes read as zeros: a sparse file hashes like the same bytes written densely."""
    size = 5 * CHUNK + 123
    sparse = str(tmp_path / "sparse")
    with open(sparse, "wb") as f:
        f.truncate(size)
        for offset, data in ((0, b"head"), (2 * CHUNK - 2, b"span"), (size - 3, b"end")):
            f.seek(offset)
            f.write(data)
    with open(sparse, "rb") as f:
        content = f.read()
    dense = str(tmp_path / "dense")
    with open(dense, "wb") as f:
        f.write(content)
    assert os.stat(sparse).st_blocks < os.stat(dense).st_blocks  # really sparse
    assert digest_of(sparse) == digest_of(dense) == reference_digest(dense)


@pytest.mark.parametrize("layout", [
    [], [(0, b"a")], [(CHUNK, b"b")], [(CHUNK - 1, b"cd")], [(3 * CHUNK + 7, b"e")],
])
def test_sparse_layouts_match_the_reference(tmp_path, layout):
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.truncate(4 * CHUNK + 11)
        for offset, data in layout:
            f.seek(offset)
            f.write(data)
    assert digest_of(path) == reference_digest(path)


def test_data_position_and_size_matter(tmp_path):
    def sparse(name, size, offset):
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.truncate(size)
            f.seek(offset)
            f.write(b"x")
        return digest_of(path)
    assert sparse("a", 3 * CHUNK, CHUNK) != sparse("b", 3 * CHUNK, CHUNK + 1)
    assert sparse("c", 3 * CHUNK, CHUNK) != sparse("d", 3 * CHUNK + 1, CHUNK)


def test_big_sparse_file_is_cheap(tmp_path):
    """An 8 GiB file with a little data costs what the data costs (was 26 s)."""
    path = str(tmp_path / "big")
    with open(path, "wb") as f:
        f.truncate(8 << 30)
        f.seek(3 << 30)
        f.write(b"y" * 100000)
    start = time.monotonic()
    treesum(str(tmp_path))
    assert time.monotonic() - start < 2


def test_known_digests_are_reused_only_for_unchanged_inodes(tmp_path):
    tree = make(str(tmp_path / "t"), {"f": b"real"})
    seen = {}
    base = treesum(tree, seen=seen)
    record = seen["/f"]
    assert record.digest == digest_of(os.path.join(tree, "f"))
    forged = {"/f": record._replace(digest="0" * 64)}
    assert treesum(tree, known=forged) != base  # trusted while ino, ctime, size agree
    with open(os.path.join(tree, "f"), "r+b") as f:
        f.write(b"fake")  # same size, new ctime
    pin(tree)
    fresh = treesum(tree)
    assert treesum(tree, known=forged) == fresh != base


def test_file_records_read_back_from_json(tmp_path):
    """Records are saved as JSON arrays; only well-formed ones are read back."""
    tree = make(str(tmp_path / "t"), {"f": b"data"})
    seen = {}
    treesum(tree, seen=seen)
    record = seen["/f"]
    st = os.lstat(os.path.join(tree, "f"))
    assert record == FileRecord.of(st, digest_of(os.path.join(tree, "f"))) and record.matches(st)
    assert FileRecord.from_json(json.loads(json.dumps(record))) == record
    for bad in (None, {}, list(record)[:4], list(record) + [1], [True, 1, 1, 1, "d"],
                [1, 1, 1, 1.5, "d"], [1, 1, 1, 1, 7]):
        assert FileRecord.from_json(bad) is None, bad
