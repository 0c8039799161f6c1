"""Helpers for assemblers that make and fill filesystem images.

Used by org.osbuild.qemu and org.osbuild.rawfs inside the build root
(imported through PYTHONPATH there), so only the standard library is used
and the programs run are the build root's.
"""

import contextlib
import os
import re
import subprocess

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


def tree_bytes(tree, skip=()):
    """Bytes allocated by the files below `tree`, not descending into the paths in `skip`."""
    total = 0
    for root, dirs, files in os.walk(tree):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def copy_tree(tree, target, exclude=()):
    """Copy `tree` into the mounted filesystem(s) below `target` with a tar pipe.

    Owners, modes, hard and symbolic links, device nodes, xattrs, ACLs and
    SELinux labels are kept. `exclude` holds absolute paths within the tree
    to leave out. Returns False when either tar failed (tar has printed why).
    """
    excludes = ["--anchored"] + [f"--exclude=.{path}" for path in exclude] if exclude else []
    with subprocess.Popen(["tar", "--create", "--file", "-", "--directory", tree, *TAR_KEEP,
                           *excludes, "."], stdout=subprocess.PIPE) as packer:
        unpack = subprocess.run(["tar", "--extract", "--file", "-", "--directory", target,
                                 "--preserve-permissions", "--same-owner", *TAR_KEEP],
                                stdin=packer.stdout, check=False)
        packer.stdout.close()
    return packer.returncode == 0 and unpack.returncode == 0
