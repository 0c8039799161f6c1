"""Work directories that belong to a live process, and removal of dead ones.

A `WorkDir` is a fresh directory (e.g. under `STORE/tmp`) on which its
creator holds an exclusive `flock(2)` for as long as it uses it. The lock
lives and dies with the open file description: when the process exits for
any reason, SIGKILL included, the kernel drops it. `clean_stale()` removes
the directories under a parent that nobody holds a lock on, i.e. the
leftovers of dead processes, and never touches those of live ones.

Race between creating and locking: the creator makes the directory, then
takes the lock (blocking) and checks that the path still names the inode it
locked. A cleaner only removes what it could lock itself, while holding the
lock, so a directory it removes before its creator locked it is noticed by
the creator, which simply makes another one.
"""

import contextlib
import fcntl
import os
import secrets

from osbuild.util.fs import remove_tree

# Names of directories made by WorkDir; clean_stale() touches nothing else.
PREFIXES = ("object-", "buildroot-", "sources-", "api-", "work-")


def _remove(path):
    remove_tree(path)


class WorkDir:
    """A new directory `parent/<prefix>XXXXXXXX`, locked until `cleanup()`."""

    def __init__(self, parent, prefix="work-"):
        if not prefix.startswith(PREFIXES):
            raise ValueError(f"work directory prefix {prefix!r} is not one of {PREFIXES}")
        while True:
            # like tempfile.mkdtemp, but a Ctrl-C right after mkdir(2) is handled below
            path = os.path.join(parent, prefix + secrets.token_hex(6))
            fd = None
            try:
                try:
                    os.mkdir(path, 0o700)
                except FileExistsError:
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                now = os.lstat(path)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    break
            except FileNotFoundError:
                if fd is None and not os.path.isdir(parent):
                    raise
                # a cleaner was quicker than us: make another
            except BaseException:
                # e.g. KeyboardInterrupt: do not leave the directory behind
                if fd is not None:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.rmdir(path)
                raise
            if fd is not None:
                os.close(fd)
        self.path = path
        self._fd = fd

    def cleanup(self):
        """Remove the directory, then release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            _remove(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


def clean_stale(parent, prefixes=PREFIXES):
    """Remove the work directories in `parent` whose owner is gone.

    Returns the list of removed paths. Directories locked by a live process,
    entries that are not WorkDir directories and a missing `parent` are left
    alone.
    """
    removed = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        if not name.startswith(prefixes):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone already, or not a directory
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            with contextlib.suppress(OSError):
                _remove(path)
                removed.append(path)
        finally:
            os.close(fd)
    return removed
