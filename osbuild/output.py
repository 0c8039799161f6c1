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
import os
import secrets
import shutil
import stat
import tempfile

from osbuild.util.fs import copy_range, copy_tree, data_extents


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


def _copy_file(src, st, directory, name):
    """Copy the regular file `src` to a new temporary file in `directory`; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".osbuild-tmp", dir=directory)
    try:
        with open(src, "rb") as f:
            for start, end in data_extents(f.fileno(), st.st_size):
                copy_range(f.fileno(), fd, start, end)
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


def _strip_privileges(tree):
    """Drop setuid/setgid bits and file capabilities from every regular file of `tree`."""
    for top, _dirs, files in os.walk(tree):
        for name in files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if st.st_mode & _PRIVILEGE:
                    os.fchmod(fd, _mode(st))
                with contextlib.suppress(OSError):  # ENODATA: none, the usual case
                    os.removexattr(fd, "security.capability")
            finally:
                os.close(fd)


def export_object(store, object_id, directory):
    """Copy the object `object_id` (a tree or an output) to `directory`/`object_id`.

    The copy keeps owners, modes, links and xattrs, except that no file keeps
    a setuid or setgid bit or file capabilities; it is made in a fresh
    directory of mode 0700 beside its final name and replaces what is there
    only when complete. Returns the path; raises OutputError naming what
    could not be written.
    """
    src = store.resolve_ref(object_id)
    if src is None:
        raise OutputError(f"object {object_id} is not in the store")
    dst = os.path.join(directory, object_id)
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{object_id[:32]}.", suffix=".osbuild-tmp",
                               dir=directory)
    except OSError as e:
        raise OutputError(f"cannot create output directory {directory}: {e.strerror}") from None
    try:
        copy = os.path.join(tmp, "copy")
        copy_tree(src, copy)
        _strip_privileges(copy)
        os.chmod(copy, 0o700)
        if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.path.islink(dst)):
            os.unlink(dst)   # a file or a symlink there is replaced, never followed
        _place(copy, dst, True)
        os.rmdir(tmp)
    except OSError as e:
        _discard(tmp)
        raise OutputError(f"cannot write export {dst}: {e.strerror or e}") from None
    except BaseException:
        _discard(tmp)
        raise
    return dst
