"""Copying and removing whole trees; the data regions of sparse files."""

import collections
import errno
import functools
import os
import shutil
import subprocess
import tempfile


# tar options that keep owners, modes, xattrs, ACLs and SELinux labels
TAR_KEEP = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--selinux"]


def _failed(what, stderr):
    """The one-line OSError of a failed copy (e.g. disk full), which the CLI reports."""
    lines = stderr.decode(errors="replace").strip().splitlines() or [f"{what} failed"]
    return OSError(f"cannot copy a tree: {lines[-1][:500]}")


def copy_tree(src, dst, exclude=None, members=None):
    """Copy the tree `src` to `dst`, keeping owners, modes, links, device nodes,
    xattrs, ACLs and SELinux labels; raises OSError (one line) when it fails.

    Without `exclude` and `members`, `dst` must not exist yet and reflinks
    are used where the filesystem supports them (cp). Otherwise `dst` is an
    existing directory (a mounted filesystem) that a tar pipe fills:
    `exclude` are absolute paths within the tree to leave out, `members`
    the entries of `src` to copy (default: all of it).
    """
    if exclude is None and members is None:
        res = subprocess.run(["cp", "--reflink=auto", "-a", "--", src, dst], check=False,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if res.returncode != 0:
            raise _failed("cp", res.stderr)
        return
    excludes = ["--anchored"] + [f"--exclude=.{path}" for path in exclude] if exclude else []
    # the messages go to files: a pipe nobody reads yet could block a tar
    with tempfile.TemporaryFile() as pack_err, tempfile.TemporaryFile() as unpack_err:
        with subprocess.Popen(["tar", "--create", "--file", "-", "--directory", src, *TAR_KEEP,
                               *excludes, "--", *(members or ["."])], stdout=subprocess.PIPE,
                              stderr=pack_err) as packer:
            unpack = subprocess.run(["tar", "--extract", "--file", "-", "--directory", dst,
                                     "--preserve-permissions", "--same-owner", *TAR_KEEP],
                                    stdin=packer.stdout, stderr=unpack_err, check=False)
            packer.stdout.close()
        for proc, err in ((unpack, unpack_err), (packer, pack_err)):
            if proc.returncode != 0:
                err.seek(0)
                raise _failed("tar", err.read(1 << 16))


def remove_tree(path):
    """Remove `path` recursively, even where a stage left it unwritable."""
    if not os.path.lexists(path):
        return
    def onerror(_func, failed, _exc):
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                shutil.rmtree(failed)
            else:
                os.unlink(failed)
        except OSError:
            pass
    # chattr +i files would make this fail; stages are not expected to leave them.
    try:
        shutil.rmtree(path, onerror=onerror)
    except RecursionError:
        pass  # nested deeper than Python's stack: rm below copes
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", "--", path], check=False)


def _apply_all(remove, paths):
    for path in paths:
        try:
            remove(path)
        except OSError:
            pass  # left to remove_tree


def remove_tree_parallel(path, workers=8):
    """Remove `path` like `remove_tree`, with several unlink(2)/rmdir(2) calls in flight.

    On storage where each metadata update waits on the device, this is several
    times faster for a tree of many files. Nothing is followed: symbolic
    links are removed, not entered.
    """
    if not os.path.lexists(path):
        return
    files, dirs = [], collections.defaultdict(list)
    try:
        stack = [(path, 0)]
        while stack:
            directory, depth = stack.pop()
            dirs[depth].append(directory)
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, depth + 1))
                    else:
                        files.append(entry.path)
    except OSError:
        pass  # whatever could not be listed is left to remove_tree
    # only here: most runs never remove a big tree
    from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel
    with ThreadPoolExecutor(workers) as pool:
        chunk = 256
        unlink_all = functools.partial(_apply_all, os.unlink)
        list(pool.map(unlink_all, [files[i:i + chunk] for i in range(0, len(files), chunk)]))
        for depth in sorted(dirs, reverse=True):  # deepest first: each level empties the next
            level = dirs[depth]
            rmdir_all = functools.partial(_apply_all, os.rmdir)
            list(pool.map(rmdir_all, [level[i:i + 64] for i in range(0, len(level), 64)]))
    remove_tree(path)  # what the fast path left (odd modes, races)


def data_extents(fd, size):
    """Yield (start, end) of the regions of the first `size` bytes of `fd` that may
    hold data (SEEK_DATA/SEEK_HOLE); the rest are holes, which read as zeros."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            if e.errno != errno.EINVAL:
                raise
            start, end = pos, size  # the filesystem cannot tell: all data
        yield start, end
        pos = end


def copy_range(src_fd, dst_fd, start, end, dst_start=None):
    """Copy bytes [start, end) of `src_fd` into `dst_fd` at `dst_start` (default: the
    same place): in the kernel where it can (copy_file_range), else by reads and
    writes (between filesystems it does not join, a tmpfs and a disk)."""
    shift = 0 if dst_start is None else dst_start - start
    fast = True
    while start < end:
        count = min(end - start, 1 << 24)
        if fast:
            try:
                done = os.copy_file_range(src_fd, dst_fd, count, start, start + shift)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                fast = False
                continue
        else:
            data = os.pread(src_fd, min(count, 1 << 20), start)
            done = os.pwrite(dst_fd, data, start + shift) if data else 0
        if done == 0:
            raise OSError(errno.EIO, "the file changed while it was copied")
        start += done
