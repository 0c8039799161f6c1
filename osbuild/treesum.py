"""Deterministic content hash of a filesystem tree.

The hash covers, for every entry in a canonical (name-sorted) walk: its
path, type, permission bits, owner, extended attributes and content (file
data, link target or device number). It does not depend on timestamps,
inode numbers or readdir order, and never follows symbolic links.

Hashing file contents is what costs; a caller that knows the digests of
files it has not changed since (by inode, ctime and size, which no stage can
forge) passes them in `known` and gets them reused.
"""

import hashlib
import json
import os
import stat

_CHUNK = 1 << 20


def _xattrs(name, dir_fd):
    try:
        path = f"/proc/self/fd/{dir_fd}/{name}" if name else f"/proc/self/fd/{dir_fd}"
        names = sorted(os.listxattr(path, follow_symlinks=False))
        return {n: os.getxattr(path, n, follow_symlinks=False).hex() for n in names}
    except OSError:
        return {}


def _file_digest(name, dir_fd):
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        digest = hashlib.sha256()
        while True:
            data = os.read(fd, _CHUNK)
            if not data:
                return digest.hexdigest()
            digest.update(data)
    finally:
        os.close(fd)


def _content_digest(st, name, dir_fd, path, known, seen):
    record = known.get(path) if known else None
    if record and record[:3] == [st.st_ino, st.st_ctime_ns, st.st_size]:
        digest = record[4]
    else:
        digest = _file_digest(name, dir_fd)
    if seen is not None:
        seen[path] = [st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns, digest]
    return digest


def _entry(st, name, dir_fd, path, known, seen):
    fmt = stat.S_IFMT(st.st_mode)
    entry = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
             "type": fmt, "xattrs": _xattrs(name, dir_fd)}
    if stat.S_ISREG(fmt):
        entry["size"] = st.st_size
        entry["sha256"] = _content_digest(st, name, dir_fd, path, known, seen)
    elif stat.S_ISLNK(fmt):
        entry["target"] = os.readlink(name, dir_fd=dir_fd)
    elif stat.S_ISCHR(fmt) or stat.S_ISBLK(fmt):
        entry["rdev"] = st.st_rdev
    return entry


def _walk(digest, dir_fd, prefix, known, seen):
    with os.scandir(dir_fd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        path = prefix + "/" + name
        entry = _entry(st, name, dir_fd, path, known, seen)
        digest.update(json.dumps([path, entry], sort_keys=True).encode())
        digest.update(b"\n")
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dir_fd)
            try:
                _walk(digest, sub, path, known, seen)
            finally:
                os.close(sub)


def treesum(path, known=None, seen=None):
    """Return the hex SHA-256 content hash of the tree rooted at `path`.

    `known` maps a regular file's path (relative, with a leading "/") to
    `[inode, ctime_ns, size, mtime_ns, sha256]`; files that still match are
    not read again. If `seen` is a dict, it receives that record for every
    regular file of the tree.
    """
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        root = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
        digest.update(json.dumps(["", root], sort_keys=True).encode() + b"\n")
        _walk(digest, fd, "", known, seen)
    finally:
        os.close(fd)
    return digest.hexdigest()
