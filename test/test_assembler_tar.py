"""org.osbuild.tar and org.osbuild.rawfs, built through osbuild from a real tree."""

import os
import subprocess
import tarfile

import pytest

from assemblerlib import (assert_failed, assert_same_tree, attached, blkid, committed_files,
                          loops_on, manifest, mounted, mounts_under, output_file, tree_path,
                          tree_stage)
from conftest import run_osbuild

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

MIB = 1024 * 1024
UUID = "76a22bf4-f153-4541-b6c7-0332c0dfaeac"
MAGIC = {"none": None, "gzip": b"\x1f\x8b", "xz": b"\xfd7zXZ", "zstd": b"\x28\xb5\x2f\xfd"}


@pytest.fixture(name="store", scope="module")
def store_fixture(tmp_path_factory):
    """One store for the module: the tree is built once."""
    return tmp_path_factory.mktemp("tar-assembler") / "store"


def build(store, name, options, blob_mib=1):
    """Build the test tree and assemble it with assembler `name`."""
    return run_osbuild(manifest([tree_stage(blob_mib=blob_mib)], name, options), store)


@pytest.mark.parametrize("compression", ["none", "gzip", "xz", "zstd"])
def test_tar(store, tmp_path, compression):
    """Members keep owners, modes, links, devices, xattrs, ACLs and labels."""
    filename = f"tree-{compression}.tar"
    res = build(store, "org.osbuild.tar", {"filename": filename, "compression": compression})
    archive = output_file(store, res, filename)
    assert os.listdir(os.path.dirname(archive)) == [filename]
    with open(archive, "rb") as f:
        head = f.read(6)
    if MAGIC[compression]:
        assert head.startswith(MAGIC[compression])
    plain = archive
    if compression == "zstd":           # Python's tarfile has no zstd
        plain = str(tmp_path / "plain.tar")
        subprocess.run(["zstd", "-q", "-d", archive, "-o", plain], check=True)

    with tarfile.open(plain) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
    # etc/hard and etc/hello are one inode: the first in name order carries it.
    hello, hard = members["etc/hard"], members["etc/hello"]
    assert hello.isreg() and hard.islnk() and hard.linkname == "./etc/hard"
    assert (hello.uid, hello.gid, hello.mode) == (12, 34, 0o640)
    assert hello.pax_headers["SCHILY.xattr.user.osbuild"] == "test"
    assert hello.pax_headers["RHT.security.selinux"] == "system_u:object_r:etc_t:s0"
    assert "user:1001:r--" in hello.pax_headers["SCHILY.acl.access"]
    assert members["etc/link"].issym() and members["etc/link"].linkname == "hello"
    assert members["usr/bin/suid"].mode == 0o4755
    assert members["var/tmp"].mode == 0o1777
    assert members["usr/bin/fifo"].isfifo()

    # Unpacked again, it is the same tree.
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run(["tar", "--extract", "--file", archive, "--directory", str(out),
                    "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--selinux",
                    "--preserve-permissions", "--same-owner"], check=True)
    assert_same_tree(tree_path(store, res), str(out))


@pytest.mark.parametrize("options,message", [
    ({"filename": "a/b.tar"}, "filename"),
    ({"filename": "x.tar", "compression": "bzip3"}, "compression"),
    ({"compression": "gzip"}, "filename"),
], ids=["slash", "unknown-compression", "no-filename"])
def test_tar_bad_input(store, options, message):
    """Schema errors name the option; nothing is committed."""
    res = build(store, "org.osbuild.tar", options)
    assert res.returncode == 1
    assert message in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert committed_files(store, os.path.basename(options.get("filename", "x"))) == []


@pytest.mark.parametrize("fstype,size", [("ext4", 32 * MIB), ("xfs", 300 * MIB)])
def test_rawfs(store, fstype, size):
    """A bare filesystem image with the uuid and size, holding exactly the tree."""
    filename = f"osbt-root.{fstype}"
    res = build(store, "org.osbuild.rawfs", {"filename": filename, "root_fs_uuid": UUID,
                                             "root_fs_type": fstype, "size": size})
    image = output_file(store, res, filename)
    assert os.stat(image).st_size == size
    assert os.listdir(os.path.dirname(image)) == [filename]
    with attached(image) as dev:
        probe = blkid(dev)
        assert (probe["TYPE"], probe["UUID"]) == (fstype, UUID)
        with mounted(dev) as mnt:
            assert_same_tree(tree_path(store, res), mnt)
    assert loops_on(filename) == [] and mounts_under(store) == []


@pytest.mark.parametrize("size,message", [(4 * MIB, "increase size"),
                                          (8 * MIB, "copying the tree")],
                         ids=["early-check", "filesystem-full"])
def test_rawfs_tree_too_large(store, size, message):
    """Too small: a clear error, no image, no loop device or mount left behind."""
    filename = f"osbt-small-{size}.img"
    res = build(store, "org.osbuild.rawfs", {"filename": filename, "root_fs_uuid": UUID,
                                             "size": size}, blob_mib=7)
    assert_failed(store, res, message, filename)
