"""Trees as zstd-compressed tar archives, and safe unpacking of untrusted ones.

`pack()` writes everything the store keeps (owners, modes, xattrs, ACLs, hard
links, nanosecond mtimes) with GNU tar in a deterministic form: names sorted,
no atime/ctime, so the same tree gives the same bytes.

`unpack()` is for archives from elsewhere. It first reads the whole archive
with Python's tarfile and refuses it unless every member is a plain directory,
regular file, symlink, hard link to an earlier regular file or FIFO, named by
a relative path without `..`, not below a symlink or a non-directory, named
once, and the total size stays under a cap. Only then does GNU tar extract it
(itself refusing absolute and `..` names and deferring symlinks that point out
of the tree), as root, so owners and xattrs are restored.
"""

import os
import subprocess
import tarfile

MAX_TREE_BYTES = 64 << 30
_TAR_META = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]


class ArchiveError(Exception):
    """An archive that cannot or must not be unpacked; the message says why."""


def pack(tree, archive, level=3):
    """Write the tree at `tree` to the zstd tar file `archive`."""
    cmd = ["tar", "--create", "--format=pax", "--sort=name", *_TAR_META,
           "--pax-option=delete=atime,delete=ctime",
           f"--use-compress-program=zstd -q -T0 -{level}",
           "--file", archive, "--directory", tree, "."]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ArchiveError(f"tar failed packing {tree}: {proc.stderr.strip()[:500]}")


def _clean_name(name, what):
    if name in (".", "./"):
        return "."
    if name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ArchiveError(f"unsafe {what} {name[:200]!r}")
    return name


class _Checker:
    """State of the member-by-member check."""

    def __init__(self, max_bytes):
        self.kinds = {}
        self.total = 0
        self.max_bytes = max_bytes

    def check(self, member):
        """Raise ArchiveError unless `member` is safe to extract after the earlier ones."""
        name = _clean_name(member.name, "member name")
        if name in self.kinds:
            raise ArchiveError(f"member {name[:200]!r} appears twice")
        if name == "." and not member.isdir():
            raise ArchiveError("the archive's root is not a directory")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            kind = self.kinds.get(parent)
            if kind is not None and kind != "dir":
                raise ArchiveError(f"member {name[:200]!r} lies below {kind} {parent[:200]!r}")
        if member.isdir():
            kind = "dir"
        elif member.isreg():
            kind = "file"
            self.total += member.size
            if self.total > self.max_bytes:
                raise ArchiveError(f"unpacked size exceeds {self.max_bytes} bytes")
        elif member.issym():
            kind = "symlink"
        elif member.islnk():
            target = _clean_name(member.linkname, "hard link target")
            if self.kinds.get(target) != "file":
                raise ArchiveError(f"hard link {name[:200]!r} to {target[:200]!r}, "
                                   "which is not an earlier regular file")
            kind = "file"
        elif member.isfifo():
            kind = "fifo"
        elif member.isdev():
            raise ArchiveError(f"device node {name[:200]!r}")
        else:
            raise ArchiveError(f"member {name[:200]!r} of unsupported type {member.type!r}")
        self.kinds[name] = kind


def check(archive, max_bytes=MAX_TREE_BYTES):
    """Read all of `archive` and raise ArchiveError if it is not safe to unpack."""
    checker = _Checker(max_bytes)
    with subprocess.Popen(["zstd", "-q", "-d", "-c", archive], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL) as proc:
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    checker.check(member)
            while proc.stdout.read(1 << 16):  # tar's padding: let zstd finish cleanly
                pass
        except (tarfile.TarError, EOFError, UnicodeError) as e:
            raise ArchiveError(f"not a valid tar archive: {e}") from None
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.wait()
    if proc.returncode != 0:
        raise ArchiveError(f"not a valid zstd stream: {err[:300]}")
    if "." not in checker.kinds:
        raise ArchiveError("the archive has no root directory entry")


def unpack(archive, dest, max_bytes=MAX_TREE_BYTES):
    """Check the untrusted zstd tar `archive`, then extract it into the empty directory `dest`."""
    check(archive, max_bytes)
    if os.listdir(dest):
        raise ArchiveError(f"{dest} is not empty")
    cmd = ["tar", "--extract", "--same-owner", "--same-permissions", *_TAR_META,
           "--delay-directory-restore", "--warning=no-timestamp",
           "--use-compress-program=zstd -q", "--file", archive, "--directory", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ArchiveError(f"tar failed: {proc.stderr.strip()[:500]}")
