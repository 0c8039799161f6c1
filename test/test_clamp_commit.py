"""Clamping mtimes in the commit's walk (treesum(clamp=...)) is clamp_mtimes, walked once."""

import os
import shutil

from osbuild.reproducible import clamp_mtimes
from osbuild.treesum import treesum

EPOCH = 1577836800
OLD = EPOCH - 1000
NOW_NS = (EPOCH + 10**6) * 10**9


def make_tree(root, outside):
    """A tree with entries older and newer than EPOCH, a hard link and links leading outside."""
    os.makedirs(root / "etc" / "deep")
    (root / "etc" / "new").write_text("new")
    (root / "etc" / "old").write_text("old")
    os.utime(root / "etc" / "old", (OLD, OLD))
    (root / "etc" / "deep" / "file").write_text("x")
    os.link(root / "etc" / "new", root / "hardlink")
    os.symlink(str(outside), root / "out")          # a directory of the host
    os.symlink(str(outside / "victim"), root / "victim")
    os.utime(root / "out", ns=(NOW_NS, NOW_NS), follow_symlinks=False)
    for d in (root / "etc" / "deep", root / "etc", root):
        os.utime(d, ns=(NOW_NS, NOW_NS))


def mtimes(root):
    """{relative path: mtime ns} of every entry of `root` (links not followed)."""
    found = {"": os.lstat(root).st_mtime_ns}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            found[os.path.relpath(path, root)] = os.lstat(path).st_mtime_ns
    return found


def test_commit_walk_clamps_like_clamp_mtimes(tmp_path):
    """Same tree hash and the same mtimes as clamp_mtimes then treesum; older times stay."""
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "victim").write_text("host file")
    os.utime(outside / "victim", ns=(NOW_NS, NOW_NS))
    os.utime(outside, ns=(NOW_NS, NOW_NS))
    one, two = tmp_path / "one", tmp_path / "two"
    make_tree(one, outside)
    shutil.copytree(one, two, symlinks=True)   # copies mtimes; re-link the hard link
    os.unlink(two / "hardlink")
    os.link(two / "etc" / "new", two / "hardlink")
    for d in (two / "etc" / "deep", two / "etc", two):
        os.utime(d, ns=(NOW_NS, NOW_NS))
    os.utime(two / "out", ns=(NOW_NS, NOW_NS), follow_symlinks=False)
    assert mtimes(one) == mtimes(two)

    clamp_mtimes(str(one), EPOCH)
    separate = treesum(str(one))
    folded = treesum(str(two), clamp=EPOCH)
    assert folded == separate
    assert mtimes(two) == mtimes(one)
    assert mtimes(two)["etc/old"] == OLD * 10**9
    assert max(mtimes(two).values()) == EPOCH * 10**9
    # never followed out of the tree
    assert os.stat(outside / "victim").st_mtime_ns == NOW_NS
    assert os.stat(outside).st_mtime_ns == NOW_NS


def test_commit_walk_without_clamp_changes_nothing(tmp_path):
    """Without `clamp` the walk only reads: later mtimes stay and the hash differs."""
    outside = tmp_path / "host"
    outside.mkdir()
    tree = tmp_path / "tree"
    make_tree(tree, outside)
    before = mtimes(tree)
    plain = treesum(str(tree))
    assert mtimes(tree) == before
    assert treesum(str(tree), clamp=EPOCH) != plain
