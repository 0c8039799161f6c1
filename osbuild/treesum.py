"""Deterministic content hash of a filesystem tree: the identity of a store object.

The hash covers everything an assembler can write out of a tree: for every
entry of a canonical (name-sorted, depth-first) walk its path, type,
permission bits, owner, extended attributes, modification time (ns) and
content (file data, link target or device number), and the hard-link
structure (a later path of an inode met before names the first path of its
group). It does not depend on inode numbers, ctimes, atimes or readdir order,
and never follows symbolic links.

File content is hashed in 1 MiB chunks (see `file_digest`): chunks that lie
entirely in a hole are not read, so a sparse file costs what its data costs.
A hole and written zeros are the same content: every assembler reads files
(tar without --sparse, tar into a mounted image), so both give the same
output.

Hashing file contents is what costs; a caller that knows the digests of
files it has not changed since (by inode, ctime and size, which no stage can
forge) passes them in `known` and gets them reused.
"""

import errno
import hashlib
import json
import os
import stat
from typing import NamedTuple

from osbuild.util.fs import data_extents

# Changes whenever what the hash covers changes, so old and new sums never meet.
FORMAT = b"osbuild-treesum-2\n"
CHUNK = 1 << 20
# Files at least this big are hashed by several threads (same digest).
PARALLEL_SIZE = 64 * CHUNK
_ZERO_CHUNK = hashlib.sha256(bytes(CHUNK)).digest()
# Deeper trees are refused (no real OS tree comes near; each level holds an fd).
MAX_DEPTH = 1000


class TreeError(Exception):
    """The tree cannot be hashed (nested too deeply)."""


def _xattrs(name, dir_fd):
    try:
        path = f"/proc/self/fd/{dir_fd}/{name}" if name else f"/proc/self/fd/{dir_fd}"
        names = sorted(os.listxattr(path, follow_symlinks=False))
        return {n: os.getxattr(path, n, follow_symlinks=False).hex() for n in names}
    except OSError:
        return {}


def _chunk_digests(fd, size):
    """Yield the SHA-256 of every CHUNK-sized piece of the file, last one short."""
    count = (size + CHUNK - 1) // CHUNK
    done = 0  # chunks already yielded
    for start, end in data_extents(fd, size):
        first, last = start // CHUNK, (end + CHUNK - 1) // CHUNK
        if last <= done:
            continue
        for i in range(done, first):
            yield _zero_digest(i, size)
        for i in range(max(first, done), last):
            length = min(CHUNK, size - i * CHUNK)
            data = os.pread(fd, length, i * CHUNK)
            if len(data) != length:
                raise OSError(errno.EIO, "file changed size while it was hashed")
            yield hashlib.sha256(data).digest()
        done = last
    for i in range(done, count):
        yield _zero_digest(i, size)


def _zero_digest(index, size):
    length = min(CHUNK, size - index * CHUNK)
    return _ZERO_CHUNK if length == CHUNK else hashlib.sha256(bytes(length)).digest()


def file_digest(fd):
    """The content digest of the regular file open as `fd`.

    SHA-256 over the size and the SHA-256 of each 1 MiB chunk, so it is a
    function of the bytes read alone; chunks inside holes are not read.
    """
    size = os.fstat(fd).st_size
    digest = hashlib.sha256(f"chunked-sha256 {CHUNK} {size}\n".encode())
    chunks = _parallel_chunk_digests(fd, size) if size >= PARALLEL_SIZE and \
        (os.cpu_count() or 1) > 1 else _chunk_digests(fd, size)
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _parallel_chunk_digests(fd, size):
    """What _chunk_digests yields, computed by one thread per CPU (pread and
    SHA-256 release the GIL): a big image is hashed at the speed of all cores."""
    import concurrent.futures  # pylint: disable=import-outside-toplevel
    count = (size + CHUNK - 1) // CHUNK
    data = set()
    for start, end in data_extents(fd, size):
        data.update(range(start // CHUNK, (end + CHUNK - 1) // CHUNK))

    def chunk_digest(i):
        if i not in data:
            return _zero_digest(i, size)
        length = min(CHUNK, size - i * CHUNK)
        piece = os.pread(fd, length, i * CHUNK)
        if len(piece) != length:
            raise OSError(errno.EIO, "file changed size while it was hashed")
        return hashlib.sha256(piece).digest()

    with concurrent.futures.ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
        yield from pool.map(chunk_digest, range(count), chunksize=16)


def _file_digest(name, dir_fd):
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return file_digest(fd)
    finally:
        os.close(fd)


class FileRecord(NamedTuple):
    """What a walk learnt about one regular file: its content digest and the
    stat fields that tell whether the file is still the one it was computed for.

    Saved as a JSON array (STORE/index, see objectstore.py).
    """

    inode: int
    ctime_ns: int
    size: int
    mtime_ns: int
    digest: str

    @classmethod
    def of(cls, st, digest):
        """The record of the file `st` describes, with content `digest`."""
        return cls(st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns, digest)

    @classmethod
    def from_json(cls, value):
        """A record read back from JSON, or None when `value` is not one."""
        if not isinstance(value, list) or len(value) != 5 or not isinstance(value[4], str) or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in value[:4]):
            return None
        return cls(*value)

    def matches(self, st):
        """Whether `st` is still the very file (same inode, ctime and size)."""
        return (self.inode, self.ctime_ns, self.size) == (st.st_ino, st.st_ctime_ns, st.st_size)


def _content_digest(st, name, dir_fd, path, known, seen):
    record = known.get(path) if known else None
    if record is not None and record.matches(st):
        digest = record.digest
    else:
        digest = _file_digest(name, dir_fd)
    if seen is not None:
        seen[path] = FileRecord.of(st, digest)
    return digest


class _Walk:
    """One walk over a tree, feeding `digest`."""

    def __init__(self, known, seen, clamp=None):
        self.digest = hashlib.sha256(FORMAT)
        self.clamp = clamp  # ns: later mtimes are set to it before they are hashed
        self.known = known
        self.seen = seen
        self.inodes = {}  # (dev, ino) of multiply linked non-directories -> first path

    def add(self, path, entry):
        """Feed one entry."""
        self.digest.update(json.dumps([path, entry], sort_keys=True).encode())
        self.digest.update(b"\n")

    def entry(self, st, name, dir_fd, path):
        """The description of one entry (not the root)."""
        fmt = stat.S_IFMT(st.st_mode)
        if not stat.S_ISDIR(fmt) and st.st_nlink > 1:
            first = self.inodes.setdefault((st.st_dev, st.st_ino), path)
            if first != path:  # same inode: everything else is the first path's
                return {"link": first}
        entry = _metadata(st)
        entry["xattrs"] = _xattrs(name, dir_fd)
        if stat.S_ISREG(fmt):
            entry["size"] = st.st_size
            entry["sha256"] = _content_digest(st, name, dir_fd, path, self.known, self.seen)
        elif stat.S_ISLNK(fmt):
            entry["target"] = os.readlink(name, dir_fd=dir_fd)
        elif stat.S_ISCHR(fmt) or stat.S_ISBLK(fmt):
            entry["rdev"] = st.st_rdev
        return entry

    def walk(self, root_fd):
        """Feed every entry below the directory `root_fd`, depth first, by name."""
        stack = [(root_fd, "", iter(_names(root_fd)))]
        try:
            while stack:
                dir_fd, prefix, names = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    if dir_fd != root_fd:
                        os.close(dir_fd)
                    continue
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if self.clamp is not None and st.st_mtime_ns > self.clamp:
                    os.utime(name, ns=(self.clamp, self.clamp), dir_fd=dir_fd,
                             follow_symlinks=False)
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                path = prefix + "/" + name
                self.add(path, self.entry(st, name, dir_fd, path))
                if stat.S_ISDIR(st.st_mode):
                    if len(stack) >= MAX_DEPTH:
                        raise TreeError(f"{path} is nested more than {MAX_DEPTH} directories deep")
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=dir_fd)
                    try:
                        stack.append((sub, path, iter(_names(sub))))
                    except BaseException:
                        os.close(sub)
                        raise
        finally:
            for dir_fd, _, _ in stack:
                if dir_fd != root_fd:
                    os.close(dir_fd)


def _names(dir_fd):
    with os.scandir(dir_fd) as it:
        return sorted(e.name for e in it)


def _metadata(st):
    return {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "type": stat.S_IFMT(st.st_mode), "mtime": st.st_mtime_ns}


def treesum(path, known=None, seen=None, clamp=None):
    """Return the hex SHA-256 content hash of the tree rooted at `path`.

    With `clamp` (seconds since 1970), every entry whose mtime is later is
    first given that atime and mtime, as `reproducible.clamp_mtimes` would:
    one walk instead of two.

    `known` maps a regular file's path (relative, with a leading "/") to its
    FileRecord; files that still match are not read again. If `seen` is a
    dict, it receives the FileRecord of every regular file of the tree.
    """
    walk = _Walk(known, seen, None if clamp is None else clamp * 1_000_000_000)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if walk.clamp is not None and st.st_mtime_ns > walk.clamp:
            os.utime(fd, ns=(walk.clamp, walk.clamp))
            st = os.fstat(fd)
        root = _metadata(st)
        root["xattrs"] = _xattrs("", fd)
        walk.add("", root)
        walk.walk(fd)
    finally:
        os.close(fd)
    return walk.digest.hexdigest()
