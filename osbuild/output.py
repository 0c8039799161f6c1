"""Copying an assembler's output out of the store (`--output-directory`).

Each member of the output is written under a fresh name in the target
directory (created with O_EXCL, so nothing planted there is followed) and
renamed over its final name only when it is complete; on any error the
partial copy is removed and the error names the final path.

What an assembler made is untrusted: copied files lose their setuid and
setgid bits, and a copied directory is made mode 0700 (its content is kept
as it is, setuid programs included, where no other user can reach it).
"""

import contextlib
import errno
import os
import secrets
import shutil
import stat
import tempfile

from osbuild.util.fs import data_extents


_PRIVILEGE = stat.S_ISUID | stat.S_ISGID


class OutputError(Exception):
    """An output could not be written to the output directory."""


def _mode(st):
    return stat.S_IMODE(st.st_mode) & ~_PRIVILEGE


def _unchanged(st, dst):
    """Whether `dst` is an earlier copy of the file `st` describes."""
    try:
        other = os.lstat(dst)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(other.st_mode) and other.st_size == st.st_size \
        and other.st_mtime_ns == st.st_mtime_ns and stat.S_IMODE(other.st_mode) == _mode(st)


def _copy_range(src, dst, start, end):
    """Copy bytes [start, end) of `src` to the same place in `dst` (fds)."""
    fast = True
    while start < end:
        count = min(end - start, 1 << 24)
        if fast:
            try:
                done = os.copy_file_range(src, dst, count, start, start)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                fast = False  # another filesystem: plain reads and writes
                continue
        else:
            data = os.pread(src, min(count, 1 << 20), start)
            done = os.pwrite(dst, data, start) if data else 0
        if done == 0:
            raise OSError(errno.EIO, "the file changed while it was copied")
        start += done


def _copy_file(src, st, directory, name):
    """Copy the regular file `src` to a new temporary file in `directory`; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".osbuild-tmp", dir=directory)
    try:
        with open(src, "rb") as f:
            for start, end in data_extents(f.fileno(), st.st_size):
                _copy_range(f.fileno(), fd, start, end)
        os.ftruncate(fd, st.st_size)
        os.fchmod(fd, _mode(st))
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return tmp


def _copy_symlink(src, directory, name):
    target = os.readlink(src)
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.osbuild-tmp")
        with contextlib.suppress(FileExistsError):  # symlink(2) never follows
            os.symlink(target, tmp)
            return tmp


def _copy_dir(src, directory, name):
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".osbuild-tmp", dir=directory)
    try:
        shutil.copytree(src, tmp, symlinks=True, dirs_exist_ok=True)
        os.chmod(tmp, 0o700)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _place(tmp, dst, is_dir):
    """Rename the finished copy `tmp` over `dst`."""
    if is_dir and os.path.isdir(dst) and not os.path.islink(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def copy_output(store, output_id, directory):
    """Copy every member of the output `output_id` into `directory`; returns their paths.

    Raises OutputError naming the path that could not be written.
    """
    src = store.resolve_ref(output_id)
    if src is None:
        raise OutputError(f"output {output_id} is not in the store")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {directory}: {e.strerror}") from None
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        dst = os.path.join(directory, name)
        st = os.lstat(path)
        tmp = None
        try:
            if stat.S_ISREG(st.st_mode):
                if not _unchanged(st, dst):
                    tmp = _copy_file(path, st, directory, name)
                    os.replace(tmp, dst)
            elif stat.S_ISDIR(st.st_mode):
                tmp = _copy_dir(path, directory, name)
                _place(tmp, dst, True)
            elif stat.S_ISLNK(st.st_mode):
                tmp = _copy_symlink(path, directory, name)
                os.replace(tmp, dst)
            else:
                raise OutputError(f"output {name} is not a file, directory or symlink")
        except OSError as e:
            if tmp is not None:
                _discard(tmp)
            raise OutputError(f"cannot write output {dst}: {e.strerror or e}") from None
        copied.append(dst)
    return copied


def _discard(tmp):
    with contextlib.suppress(OSError):
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)
        elif os.path.lexists(tmp):
            os.unlink(tmp)
