"""The content-addressed object store and its copy-on-write objects.

Layout (DESIGN 1.5)::

    STORE/objects/<treesum>/   committed trees, named by content hash
    STORE/refs/<id>            symlink -> ../objects/<treesum>
    STORE/tmp/                 work directories of objects being built
    STORE/sources/<name>/      each source's private cache

Nothing half-built is ever visible under objects/ or refs/: a tree is
finished in STORE/tmp and then renamed into place, and a ref is one
symlink(2), created complete or not at all and never replaced while it
resolves (only a dangling one is, via rename(2); see `ObjectStore._link`).
"""

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile

from osbuild.treesum import FileRecord, TreeError, treesum
from osbuild.util.fs import copy_tree, remove_tree
from osbuild.util.workdir import WorkDir, clean_stale

# Object ids are file names under refs/: the ids osbuild computes are hex,
# but (as in the original) any name that is a single safe path component
# (no control characters either) works. 251 leaves room for the "ref-"
# prefix of the temporary link.
_MAX_ID = 251
# Version of STORE/index/* records: the file digest scheme of treesum.
INDEX_FORMAT = 2


class StoreError(Exception):
    """The store cannot be used (not a directory, not writable, bad id)."""


def _check_id(object_id):
    if not isinstance(object_id, str) or object_id in ("", ".", "..") or "/" in object_id \
            or any(ord(c) < 32 or ord(c) == 127 for c in object_id) \
            or len(object_id.encode("utf-8", "surrogateescape")) > _MAX_ID:
        shown = object_id[:100] if isinstance(object_id, str) else object_id
        raise StoreError(f"invalid object id: {shown!r}")


def _private_dir(path):
    """Make `path` a directory only its owner (this process' user) can enter.

    Committed trees keep what stages made, setuid-root programs included:
    nobody else may reach them. A store made with looser modes (an older
    osbuild, a umask of 0) is fixed up here, on every open.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"store entry {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StoreError(f"store entry {path} belongs to uid {st.st_uid}, "
                         f"not to uid {os.geteuid()} running osbuild")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _carry_over(index, tree):
    """Digest records for the fresh copy `tree` of a tree whose records are `index`.

    A copy keeps sizes and modification times, so a file that matches its
    original in both is the same content under a new inode and ctime.
    """
    if not index:
        return None
    known = {}
    for path, value in index.items():
        record = FileRecord.from_json(value)
        try:
            st = os.lstat(tree + path)
        except (OSError, TypeError):
            continue
        if record is not None and stat.S_ISREG(st.st_mode) and \
                (record.size, record.mtime_ns) == (st.st_size, st.st_mtime_ns):
            known[path] = FileRecord.of(st, record.digest)
    return known


def _empty_tree(path):
    """Create an empty tree whose root mode does not depend on the umask."""
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)


class Object:
    """A tree being built, starting from a committed object or from nothing.

    The base tree is copied only when `write()` is first called; until then
    `path` is the base object itself (read-only by convention).
    """

    def __init__(self, store, base_id=None):
        self.store = store
        # Locked while this process lives; a later run removes it if we die.
        self._workdir = WorkDir(store.tmp, "object-")
        self.workdir = self._workdir.path
        self._tree = os.path.join(self.workdir, "tree")
        self._base = None
        self._writable = False
        # Content digests of files of the writable tree (see treesum.treesum).
        self.known = None
        try:
            self._set_base(base_id)
        except BaseException:
            self._workdir.cleanup()  # the caller never gets an Object to clean up
            raise

    def _set_base(self, base_id):
        if base_id is not None and not self.store.contains(base_id):
            raise StoreError(f"base object {base_id} is not in the store")
        self._base = base_id
        self._writable = False
        self.known = None

    @property
    def base(self):
        """The id of the committed object this tree starts from, or None."""
        return self._base

    @property
    def path(self):
        """A readable view of the current tree."""
        if self._writable:
            return self._tree
        if self._base is not None:
            return self.store.resolve_ref(self._base)
        if not os.path.isdir(self._tree):
            _empty_tree(self._tree)
        return self._tree

    def write(self):
        """Return the writable tree, copying the base first if needed."""
        if not self._writable:
            if self._base is not None:
                if os.path.lexists(self._tree):
                    remove_tree(self._tree)
                base = self.store.resolve_ref(self._base)
                copy_tree(base, self._tree)
                self.known = _carry_over(self.store.read_index(base), self._tree)
            elif not os.path.isdir(self._tree):
                _empty_tree(self._tree)
            self._writable = True
        return self._tree

    def rebase(self, base_id):
        """Forget the current tree and start again from `base_id`."""
        if os.path.lexists(self._tree):
            remove_tree(self._tree)
        self._set_base(base_id)

    def cleanup(self):
        """Remove the work directory (idempotent)."""
        if self.workdir is not None:
            self._workdir.cleanup()
            self.workdir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


class ObjectStore:
    """The store at `path`; creates its layout on first use."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.objects = os.path.join(self.path, "objects")
        self.refs = os.path.join(self.path, "refs")
        self.tmp = os.path.join(self.path, "tmp")
        self.sources = os.path.join(self.path, "sources")
        # Content digests of committed trees' files: a cache that lets a copy
        # of a tree be hashed without reading the files it did not change.
        self.index = os.path.join(self.path, "index")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise StoreError(f"store path {self.path} exists and is not a directory")
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            for d in (self.objects, self.refs, self.tmp, self.sources, self.index):
                _private_dir(d)
            # a known prefix: if we die right here, the next run removes it
            WorkDir(self.tmp, "work-probe-").cleanup()
        except OSError as e:
            raise StoreError(f"cannot use store {self.path}: {e.strerror}") from None
        # Work directories of builds that died (SIGKILL, power loss, ...).
        clean_stale(self.tmp)

    @contextlib.contextmanager
    def _locked(self):
        """Hold the store's commit lock (an flock on refs/)."""
        fd = os.open(self.refs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def contains(self, object_id):
        """Whether a committed object is registered under `object_id`."""
        return object_id is not None and self.resolve_ref(object_id) is not None

    def resolve_ref(self, object_id):
        """The path of the tree behind `object_id`, or None."""
        _check_id(object_id)
        ref = os.path.join(self.refs, object_id)
        if os.path.islink(ref) and os.path.isdir(ref):
            return os.path.realpath(ref)
        return None

    @contextlib.contextmanager
    def new(self, object_id, base_id=None):
        """Yield a new Object; commit it under `object_id` if the block succeeds."""
        _check_id(object_id)
        obj = Object(self, base_id)
        try:
            yield obj
            self.commit(obj, object_id)
        finally:
            obj.cleanup()

    def commit(self, obj, object_id, clamp=None):
        """Commit `obj`'s tree under `object_id`; `obj` then continues from it.

        With `clamp` (seconds), later mtimes are clamped to it while the tree
        is hashed (see treesum.treesum).

        A tree identical to one already stored is dropped and only the ref
        is added. When another build registered `object_id` first (builds
        of one manifest running at once), its tree is kept and ours is
        dropped: no object is ever left without a ref.
        """
        _check_id(object_id)
        if not obj._writable and obj.base is not None:  # pylint: disable=protected-access
            tree, seen = None, None
            target = os.path.basename(self.resolve_ref(obj.base))
        else:
            tree, seen = obj.path, {}
            try:
                target = treesum(tree, known=obj.known, seen=seen, clamp=clamp)
            except TreeError as e:
                raise StoreError(f"cannot commit {object_id}: {e}") from None
        # One step under the lock: of builds racing for one id, only the
        # first adds its tree; the others' trees are dropped with their work dirs.
        with self._locked():
            if self.resolve_ref(object_id) is None:
                if tree is not None:
                    self._add(tree, target, seen, obj.workdir)
                self._link(object_id, target, obj.workdir)
        obj.rebase(object_id)

    def _add(self, tree, target, seen, workdir):
        """Rename `tree` to objects/<target> unless an identical tree is there."""
        try:
            os.rename(tree, os.path.join(self.objects, target))
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        else:
            self._write_index(target, seen, workdir)

    def read_index(self, tree_path):
        """The file digest records saved for a committed tree, or None."""
        path = os.path.join(self.index, os.path.basename(tree_path))
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            return None  # another digest scheme (older osbuild): not reusable
        files = index.get("files")
        return files if isinstance(files, dict) else None

    def _write_index(self, target, seen, workdir):
        """Save the digest records of a freshly committed tree (best effort).

        The file is written in the object's work directory (removed with it,
        even after a crash) and renamed into place.
        """
        try:
            with tempfile.NamedTemporaryFile("w", dir=workdir or self.tmp, prefix="index-",
                                             delete=False, encoding="utf-8") as f:
                json.dump({"format": INDEX_FORMAT, "files": seen}, f)
            os.rename(f.name, os.path.join(self.index, target))
        except OSError:
            pass

    def snapshot(self, obj, object_id):
        """Commit a copy of `obj`'s current tree under `object_id`."""
        _check_id(object_id)
        with Object(self) as copy:
            os.rmdir(copy.write())
            copy_tree(obj.path, copy.write())
            self.commit(copy, object_id)

    def _link(self, object_id, target, tmpdir):
        """Point refs/<object_id> at objects/<target>, atomically.

        symlink(2) creates the link complete or not at all. When another
        process registered the id first, its (equally valid) ref is kept, so
        a ref never changes under a concurrent reader; only a dangling ref
        is replaced, via a temporary link in our work directory and rename(2).
        """
        ref = os.path.join(self.refs, object_id)
        link = os.path.join("..", "objects", target)
        try:
            os.symlink(link, ref)
            return
        except FileExistsError:
            if self.resolve_ref(object_id) is not None:
                return
        tmp = os.path.join(tmpdir or self.tmp, f"ref-{object_id}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(link, tmp)
        os.rename(tmp, ref)
