"""Helpers for assemblers that make and fill filesystem images.

Used by org.osbuild.qemu and org.osbuild.rawfs inside the build root
(imported through PYTHONPATH there), so only the standard library is used
and the programs run are the build root's; `copy_tree` is used on the host
by osbuild.util.populate.
"""

import contextlib
import errno
import os
import re
import subprocess
import tempfile

# tar options that keep owners, modes, xattrs, ACLs and SELinux labels
TAR_KEEP = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--selinux"]


class ToolError(Exception):
    """A program from the build root is missing or failed; the message is shown to the user."""


def run(argv, **kwargs):
    """Run a command from the build root; failures become ToolError."""
    try:
        return subprocess.run(argv, check=True, **kwargs)
    except FileNotFoundError:
        raise ToolError(f"'{argv[0]}' is missing from the build root") from None
    except subprocess.CalledProcessError as e:
        raise ToolError(f"'{' '.join(argv)}' failed with exit status {e.returncode}") from None


def mke2fs_version():
    """(major, minor) of the build root's e2fsprogs, (0, 0) if unknown."""
    res = subprocess.run(["mke2fs", "-V"], capture_output=True, text=True, check=False)
    found = re.search(r"mke2fs (\d+)\.(\d+)", res.stdout + res.stderr)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def mkfs_argv(fstype, uuid):
    """The mkfs command line (without device) for an ext4 or xfs filesystem with `uuid`.

    ext4 is made without the incompat features GRUB 2.06 refuses
    (metadata_csum_seed, orphan_file) when this mke2fs knows them.
    """
    if fstype == "xfs":
        return ["mkfs.xfs", "-q", "-f", "-m", f"uuid={uuid}"]
    if fstype != "ext4":
        raise ValueError(f"mkfs_argv: unsupported filesystem type {fstype!r}")
    argv = ["mkfs.ext4", "-q", "-F", "-U", uuid]
    version = mke2fs_version()
    off = ["metadata_csum_seed"] if version >= (1, 43) else []
    off += ["orphan_file"] if version >= (1, 47) else []
    if off:
        argv += ["-O", ",".join("^" + f for f in off)]
    return argv


def mkfs_into(argv, image_fd, offset, size, tmpdir):
    """Run `argv` + [file] on a fresh sparse file of `size` bytes, then copy its data
    into the open image at `offset`.

    mkfs programs get a regular file, not a block device: inside the build
    root's user namespace ioctls like BLKBSZSET (mkfs.xfs) are not allowed.
    """
    fd, path = tempfile.mkstemp(prefix=".mkfs-", dir=tmpdir)
    try:
        os.ftruncate(fd, size)
        run(argv + [path], stdout=subprocess.DEVNULL)
        copy_sparse(fd, image_fd, offset, size)
    finally:
        os.close(fd)
        os.unlink(path)


def copy_sparse(src_fd, dst_fd, offset, size):
    """Copy the data (not the holes) of the first `size` bytes of `src_fd` into
    `dst_fd` at `offset`."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:     # only a hole is left
                return
            raise
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        while start < end:
            copied = os.copy_file_range(src_fd, dst_fd, end - start,
                                        offset_src=start, offset_dst=offset + start)
            if copied == 0:
                raise OSError(errno.EIO, "short copy while writing a filesystem into the image")
            start += copied
        pos = end


def tree_bytes(tree, skip=()):
    """Bytes allocated by the files below `tree`, not descending into the paths in `skip`."""
    total = 0
    for root, dirs, files in os.walk(tree):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def copy_tree(tree, target, exclude=(), members=(".",)):
    """Copy `tree` into the mounted filesystem(s) below `target` with a tar pipe.

    Owners, modes, hard and symbolic links, device nodes, xattrs, ACLs and
    SELinux labels are kept. `exclude` holds absolute paths within the tree
    to leave out; `members` are the entries of `tree` to copy (all of it).
    Returns False when either tar failed (tar has printed why).
    """
    excludes = ["--anchored"] + [f"--exclude=.{path}" for path in exclude] if exclude else []
    with subprocess.Popen(["tar", "--create", "--file", "-", "--directory", tree, *TAR_KEEP,
                           *excludes, "--", *members], stdout=subprocess.PIPE) as packer:
        unpack = subprocess.run(["tar", "--extract", "--file", "-", "--directory", target,
                                 "--preserve-permissions", "--same-owner", *TAR_KEEP],
                                stdin=packer.stdout, check=False)
        packer.stdout.close()
    return packer.returncode == 0 and unpack.returncode == 0
