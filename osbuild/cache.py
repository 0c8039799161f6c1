"""Keeping a store within a size: usage tracking, leases and LRU eviction.

What counts. The store's size is the disk usage (allocated blocks; hard
links counted once per object; sparse files by what they allocate) of its
committed objects (`objects/<treesum>` with their `index/` record) and of
the files in the source caches (`sources/<name>/...`, including
`org.osbuild.files/secret-<fp>/`). `tmp/` only holds running builds' work
and is not counted. An object's size is measured once and kept in
`sizes/<treesum>` (committed trees never change).

Last use. An object's last use is the newest modification time of the refs
(`refs/<id>` symlinks) that point at it; a source file's is its own. A build
touches both (lutimes(2) / utime(2): atomic, nothing to repair after a
SIGKILL) for every id of its manifest and every checksum named in it, when
it starts and when it ends.

Leases. Every build holds a lease while it runs: a work directory
`tmp/work-lease-XXXX/` it keeps an flock(2) on, holding `lease.json` with
the ids and checksums of its manifest. Leases are made, and eviction
decides, under the store's commit lock (the flock on `refs/`), so an object
is either leased before eviction looks, or gone before the build looks
for it (and is then rebuilt). A killed build's lock dies with it; its
lease is then ignored and removed by the next `clean_stale`.

Eviction (`shrink`). Least recently used first, objects and source files
on one clock, until the store fits; nothing a live lease names is touched,
so the newest build's results stay even if alone they exceed the limit.
Objects no ref points to (a build killed between rename and symlink) go
first. Each object: its refs are removed first, then its directory is
renamed into a locked work directory under `tmp/`; only after the commit
lock is released is it deleted (several unlink(2) calls in flight) and are
its `index/` and `sizes/` records (caches) removed. A SIGKILL leaves either
a complete object (with or without refs) or a leftover in `tmp/` that the
next run removes; never a dangling ref or a half-deleted object under
`objects/`.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import subprocess
import time

from osbuild import rerun
from osbuild.objectstore import StoreError
from osbuild.programs.checksum import checksum_error
from osbuild.util.fs import remove_tree_parallel
from osbuild.util.workdir import WorkDir

LEASE_PREFIX = "work-lease-"
TRASH_PREFIX = "work-evict-"
LEASE_FILE = "lease.json"
LIMIT_FILE = rerun.LIMIT_FILE
# Entries of a source cache that are work in progress, never evicted.
_BUSY_PREFIXES = ("work-", ".tmp-")

_UNITS = {"": 1, "b": 1,
          "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)[ ]?([A-Za-z]*)")
MAX_SIZE = 2 ** 63 - 1


class SizeError(ValueError):
    """A SIZE that is not a number of bytes, with a known unit, or 'unlimited'."""


def parse_size(text):
    """Bytes of a SIZE: `123`, `500MB` (SI, 1000²), `20GiB` (IEC, 1024³); None for `unlimited`.

    Units are case-insensitive; K/M/G/T alone are refused as ambiguous.
    """
    shown = repr(text[:40]) if isinstance(text, str) else repr(text)
    if not isinstance(text, str):
        raise SizeError(f"SIZE {shown}: expected a string")
    if text.strip().lower() == "unlimited":
        return None
    match = _SIZE_RE.fullmatch(text.strip())
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        hint = ""
        if unit in ("k", "m", "g", "t"):
            hint = f" ({unit.upper()} is ambiguous: say {unit.upper()}iB or {unit.upper()}B)"
        raise SizeError(f"SIZE {shown}: expected bytes, a number with a unit (kB, MB, GB, TB, "
                        f"KiB, MiB, GiB, TiB) or 'unlimited'{hint}")
    number = match.group(1)
    if "." in number and _UNITS[unit] == 1:
        raise SizeError(f"SIZE {shown}: a number of bytes must be whole")
    whole, _, frac = number.partition(".")
    value = int(whole) * _UNITS[unit] + (int(frac) * _UNITS[unit]) // 10 ** len(frac) \
        if frac else int(whole) * _UNITS[unit]
    if value > MAX_SIZE:
        raise SizeError(f"SIZE {shown}: too large (at most {MAX_SIZE} bytes)")
    return value


def format_size(size):
    """`size` bytes for people (IEC units)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # not reached


def disk_usage(path):
    """Allocated bytes of `path` and everything below it (hard links counted once)."""
    try:
        return _walk_usage(path)
    except OSError:  # e.g. paths longer than PATH_MAX a stage made: du(1) copes
        res = subprocess.run(["du", "-s", "-B1", "--", path], capture_output=True, text=True,
                             check=False)
        try:
            return int(res.stdout.split()[0])
        except (IndexError, ValueError):
            raise OSError(f"cannot measure {path[:200]}: "
                          f"{res.stderr.strip()[:200] or 'du failed'}") from None


def _walk_usage(path):
    seen = set()
    total = os.lstat(path).st_blocks * 512
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


# --- the limit a store remembers -------------------------------------------

def read_limit(store):
    """The limit saved in the store by an earlier --cache-max-size, or None."""
    try:
        with open(os.path.join(store.path, LIMIT_FILE), encoding="utf-8") as f:
            value = json.load(f).get("max-size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) \
        and 0 <= value <= MAX_SIZE else None


def save_limit(store, limit):
    """Remember `limit` (None: unlimited) for later builds on this store."""
    path = os.path.join(store.path, LIMIT_FILE)
    if limit is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with WorkDir(store.tmp, "work-limit-") as work:
        tmp = os.path.join(work.path, LIMIT_FILE)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"max-size": limit}, f)
        os.rename(tmp, path)


# --- what a build uses ---------------------------------------------------------

def pipeline_ids(pipeline):
    """Every stage and assembler id of `pipeline` and its build pipelines."""
    ids = []
    while pipeline is not None:
        ids += [stage.id for stage in pipeline.stages]
        if pipeline.assembler:
            ids.append(pipeline.assembler.id)
        pipeline = pipeline.build
    return ids


def checksums_in(*values):
    """Every `ALGO:HEX` checksum found as a key or string anywhere in `values` (JSON)."""
    found = set()
    stack = list(values)
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and len(item) < 200 and checksum_error(item) is None:
            found.add(item)
    return found


def _source_files(store):
    """(path, lstat) of every evictable file in the source caches."""
    files = []
    stack = []
    with contextlib.suppress(FileNotFoundError):
        stack = [os.path.join(store.sources, name) for name in os.listdir(store.sources)]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (NotADirectoryError, FileNotFoundError):
            continue
        for entry in entries:
            if entry.name.startswith(_BUSY_PREFIXES) or ".tmp-" in entry.name:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                files.append((entry.path, st))
    return files


def touch(store, ids, checksums):
    """Record a use of the objects behind `ids` and of the source files named `checksums`."""
    rerun.touch(store.path, ids, source_paths(store, checksums))


def source_paths(store, checksums):
    """The files of the source caches named by `checksums` (a set)."""
    if not checksums:
        return []
    return [path for path, _ in _source_files(store) if os.path.basename(path) in checksums]


class Lease:
    """What a running build uses: nothing of it is evicted until `release()`.

    Held by a locked work directory in `tmp/` (so it dies with the process).
    """

    def __init__(self, store, ids, checksums=()):
        self.store = store
        self.ids = sorted(set(ids))
        self.checksums = sorted(set(checksums))
        with store._locked():  # pylint: disable=protected-access
            self._workdir = WorkDir(store.tmp, LEASE_PREFIX)
            try:
                with open(os.path.join(self._workdir.path, LEASE_FILE), "w",
                          encoding="utf-8") as f:
                    json.dump({"ids": self.ids, "checksums": self.checksums}, f)
                touch(store, self.ids, set(self.checksums))
            except BaseException:
                self._workdir.cleanup()
                raise

    def touch(self):
        """Record a use of everything leased (e.g. when the build is done)."""
        touch(self.store, self.ids, set(self.checksums))

    def release(self):
        """Give up the lease (idempotent)."""
        self._workdir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _held(path):
    """Whether a live process holds the flock of the work directory `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def live_leases(store):
    """(ids, checksums, count) of the leases of running builds (this process' included).

    Call under the commit lock. A live lease that cannot be read stops
    eviction (StoreError): better a full store than a running build broken.
    """
    ids, checksums, count = set(), set(), 0
    for name in sorted(os.listdir(store.tmp)):
        path = os.path.join(store.tmp, name)
        if not name.startswith(LEASE_PREFIX) or not _held(path):
            continue  # a killed build's lease is removed by clean_stale
        try:
            with open(os.path.join(path, LEASE_FILE), encoding="utf-8") as f:
                lease = json.load(f)
            count += 1
            ids.update(str(i) for i in lease["ids"])
            checksums.update(str(c) for c in lease["checksums"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"cannot read the lease {path} of a running build ({e}): "
                             "not evicting anything") from None
    return ids, checksums, count


# --- sizes and eviction --------------------------------------------------------

def _sizes_dir(store):
    path = os.path.join(store.path, "sizes")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    return path


def object_size(store, name):
    """Disk usage of `objects/<name>` plus its index record, measured once and cached."""
    record = os.path.join(_sizes_dir(store), name)
    try:
        with open(record, encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        pass
    size = disk_usage(os.path.join(store.objects, name))
    with contextlib.suppress(OSError):
        size += os.lstat(os.path.join(store.index, name)).st_blocks * 512
    tmp = os.path.join(os.path.dirname(record), f".{name}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(str(size))
        os.rename(tmp, record)
    except OSError:  # best effort: measured again next time
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return size


class Report:
    """What `shrink` found and did (sizes in bytes)."""

    def __init__(self, limit):
        self.limit = limit
        self.before = 0
        self.size = 0
        self.protected = 0  # what live leases kept
        self.objects = 0  # evicted
        self.sources = 0  # evicted source files
        self.freed = 0
        self.evicted = []  # ("object", treesum) or ("source", path), in order

    def as_dict(self):
        """The JSON form."""
        return {"size": self.size, "limit": self.limit, "before": self.before,
                "evicted_objects": self.objects, "evicted_sources": self.sources,
                "freed": self.freed}

    def summary(self):
        """One line for people."""
        limit = "no limit" if self.limit is None else f"limit {format_size(self.limit)}"
        done = f"evicted {self.objects} object(s) and {self.sources} source file(s), " \
               f"{format_size(self.freed)}; " if self.objects or self.sources else ""
        return f"store: {done}{format_size(self.size)} now ({limit})"

    @property
    def over(self):
        """Whether the store is still larger than the limit (only leased content left)."""
        return self.limit is not None and self.size > self.limit


def _scan(store):
    """{treesum: [ref names]} of the objects and the dangling refs."""
    objects = {name: [] for name in os.listdir(store.objects)}
    dangling = []
    for ref in os.listdir(store.refs):
        path = os.path.join(store.refs, ref)
        try:
            target = os.readlink(path)
        except OSError:
            continue  # not a symlink: not ours to judge
        name = os.path.basename(target)
        if target == os.path.join("..", "objects", name) and name in objects \
                and os.path.isdir(os.path.join(store.objects, name)):
            objects[name].append(ref)
        else:
            dangling.append(ref)
    return objects, dangling


def _tidy_records(store):
    """Remove the index and size records of objects that are gone.

    Outside the commit lock: both are caches, so a record a concurrent commit
    just wrote for a re-added tree and this removes costs a re-hash, nothing more.
    """
    objects = set(os.listdir(store.objects))
    old = time.time() - 3600
    for directory in (store.index, _sizes_dir(store)):
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if name.startswith("."):  # a size being written (or a killed writer's)
                    if os.lstat(path).st_mtime < old:
                        os.unlink(path)
                elif name not in objects:
                    os.unlink(path)


def _tidy_dirs(store):
    """Remove empty subdirectories (secret-<fp>/) of the source caches."""
    for cache in os.listdir(store.sources):
        top = os.path.join(store.sources, cache)
        with contextlib.suppress(OSError):
            for name in os.listdir(top):
                if not name.startswith(_BUSY_PREFIXES):
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(top, name))  # only if empty


def shrink(store, limit, own_lease=None):
    """Evict least recently used objects and source files until the store fits `limit`.

    `limit` None only tidies (dangling refs, stale records). Returns a Report.
    Raises StoreError when the store cannot be read or a lease is unreadable.
    """
    report = Report(limit)
    try:
        for name in os.listdir(store.objects):  # measure new objects outside the lock
            with contextlib.suppress(OSError):
                object_size(store, name)
        with store._locked():  # pylint: disable=protected-access
            trash = _evict_locked(store, limit, report, own_lease)
    except OSError as e:
        raise StoreError(f"cannot shrink the store {store.path}: "
                         f"{e.strerror or e}") from None
    if trash is not None:  # the slow part, outside the commit lock
        remove_tree_parallel(trash.path)  # the directory too: its lock is still ours
        trash.cleanup()
    try:
        _tidy_records(store)
    except OSError as e:
        raise StoreError(f"cannot shrink the store {store.path}: "
                         f"{e.strerror or e}") from None
    return report


def _remove_source(path):
    """Remove a cached source file; one that is gone, or a directory there, is left."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.EISDIR:
            raise


def _evict_locked(store, limit, report, own_lease):
    objects, dangling = _scan(store)
    for ref in dangling:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(store.refs, ref))
    leased_ids, leased_sums, leases = live_leases(store)
    candidates = []  # (last use, kind, key, size, refs)
    for name, refs in objects.items():
        size = object_size(store, name)
        report.before += size
        if any(ref in leased_ids for ref in refs):
            report.protected += size
            continue
        last = -1
        for ref in refs:
            with contextlib.suppress(FileNotFoundError):
                last = max(last, os.lstat(os.path.join(store.refs, ref)).st_mtime_ns)
        candidates.append((last, "object", name, size, refs))
    for path, st in _source_files(store):
        size = st.st_blocks * 512
        report.before += size
        if os.path.basename(path) in leased_sums:
            report.protected += size
            continue
        candidates.append((st.st_mtime_ns, "source", path, size, None))
    candidates.sort(key=lambda c: (c[0], c[2]))
    report.size = report.before
    trash = None
    for _, kind, key, size, refs in candidates:
        if limit is None or report.size <= limit:
            break
        if kind == "object":
            for ref in refs:  # refs first: never a ref to a missing object
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(store.refs, ref))
            if trash is None:
                trash = WorkDir(store.tmp, TRASH_PREFIX)
            os.rename(os.path.join(store.objects, key), os.path.join(trash.path, key))
            report.objects += 1
        else:
            _remove_source(key)
            report.sources += 1
        report.evicted.append((kind, key))
        report.size -= size
        report.freed += size
    if leases <= (1 if own_lease is not None else 0):
        _tidy_dirs(store)  # only when no other build could be about to fill one
    return trash
