"""Host helper: mount image filesystems and copy trees into them.

Run by the remoteloop server (never inside a build root) through
`lifetime.contained()`, i.e. in private mount and PID namespaces, so the
mounts exist only there and vanish with the process even when it is killed.
SPEC is JSON:

    {"target": "/abs/dir",
     "mounts": [["/dev/loop3", "ext4", "/"], ["/dev/loop4", "xfs", "/boot"]],
     "copies": [[FD, ["/boot/efi"], "/", null], [FD, [], "/boot/grub/i386-pc", ["*.mod"]]]}

Each filesystem is first checked read-only with the host's own fsck (the
build root made it, so the host kernel mounts only what e2fsck/xfs_repair
accept), then mounted in order below `target` (nodev, nosuid, nosymfollow,
so nothing in the image can redirect a path). Each copy is the
directory open as file descriptor FD (inherited), copied below the given
destination with a tar pipe that keeps owners, modes, links, xattrs, ACLs
and SELinux labels, leaving out the listed absolute paths; with patterns,
only the directory's entries whose names match one are copied. Everything
is unmounted (and so written out) before the helper exits; the exit status
says whether all worked.
"""

import fnmatch
import json
import os
import subprocess
import sys

from osbuild.util.fs import copy_tree

# read-only consistency checks; exit status 0 means clean
FSCK = {"ext4": ["e2fsck", "-f", "-n"], "xfs": ["xfs_repair", "-n"]}


def populate(spec):
    """Mount, copy, unmount; returns a list of error messages (empty on success)."""
    target = spec["target"]
    mounted, errors = [], []
    for device, fstype, mountpoint in spec["mounts"]:
        check = subprocess.run(FSCK[fstype] + [device], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, check=False)
        if check.returncode != 0:
            return [f"the {fstype} filesystem for {mountpoint} fails the host's check "
                    f"({' '.join(FSCK[fstype])}): "
                    + " ".join(check.stderr.decode(errors="replace").split()[-20:])]
    try:
        for device, fstype, mountpoint in spec["mounts"]:
            where = os.path.join(target, mountpoint.lstrip("/"))
            os.makedirs(where, exist_ok=True)
            res = subprocess.run(["mount", "-t", fstype, "-o", "nodev,nosuid,nosymfollow",
                                  device, where], check=False)
            if res.returncode != 0:
                return [f"mounting {fstype} for {mountpoint} failed"]
            mounted.append(where)
        for fd, exclude, dest, include in spec["copies"]:
            os.fchdir(fd)
            where = os.path.join(target, dest.lstrip("/"))
            os.makedirs(where, exist_ok=True)
            members = ["."] if include is None else sorted(
                n for n in os.listdir(".") if any(fnmatch.fnmatchcase(n, p) for p in include))
            try:
                if members:
                    copy_tree(".", where, exclude, members)
            except OSError as e:
                errors.append(f"copying the tree into the image failed ({e}; "
                              "is the image large enough?)")
                break
    finally:
        os.chdir("/")
        for where in reversed(mounted):
            if subprocess.run(["umount", where], check=False).returncode != 0:
                errors.append(f"unmounting {where} failed")
    return errors


def main():
    """Entry point: SPEC in argv[1]; errors on stderr; exit status 0 or 1."""
    errors = populate(json.loads(sys.argv[1]))
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
