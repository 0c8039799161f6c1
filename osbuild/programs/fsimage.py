"""Helpers for assemblers that make and fill filesystem images.

Used by org.osbuild.qemu and org.osbuild.rawfs inside the build root
(imported through PYTHONPATH there), so only the standard library is used
and the programs run are the build root's.
"""

import contextlib
import os
import re
import stat
import struct
import subprocess
import tempfile

from osbuild import reproducible
from osbuild.util.fs import copy_range, data_extents


class ToolError(Exception):
    """A program from the build root is missing or failed; the message is shown to the user."""


def run(argv, **kwargs):
    """Run a command from the build root; failures become ToolError."""
    try:
        return subprocess.run(argv, check=True, **kwargs)
    except FileNotFoundError:
        raise ToolError(f"'{argv[0]}' is missing from the build root") from None
    except subprocess.CalledProcessError as e:
        raise ToolError(f"'{' '.join(argv)}' failed with exit status {e.returncode}") from None


def mke2fs_version():
    """(major, minor) of the build root's e2fsprogs, (0, 0) if unknown."""
    res = subprocess.run(["mke2fs", "-V"], capture_output=True, text=True, check=False)
    found = re.search(r"mke2fs (\d+)\.(\d+)", res.stdout + res.stderr)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def mkfs_fat_invariant():
    """Whether the build root's mkfs.fat has --invariant (dosfstools 4.2)."""
    res = subprocess.run(["mkfs.fat", "--help"], capture_output=True, text=True, check=False)
    return "--invariant" in res.stdout + res.stderr


def mkfs_argv(fstype, uuid):
    """The mkfs command line (without device) for an ext4 or xfs filesystem with `uuid`.

    ext4 is made without the incompat features GRUB 2.06 refuses
    (metadata_csum_seed, orphan_file) when this mke2fs knows them.
    """
    if fstype == "xfs":
        return ["mkfs.xfs", "-q", "-f", "-m", f"uuid={uuid}"]
    if fstype != "ext4":
        raise ValueError(f"mkfs_argv: unsupported filesystem type {fstype!r}")
    argv = ["mkfs.ext4", "-q", "-F", "-U", uuid]
    version = mke2fs_version()
    off = ["metadata_csum_seed"] if version >= (1, 43) else []
    off += ["orphan_file"] if version >= (1, 47) else []
    if off:
        argv += ["-O", ",".join("^" + f for f in off)]
    return argv


def mkfs_into(argv, image_fd, offset, size, tmpdir, fill=None):
    """Run `argv` + [file] on a fresh sparse file of `size` bytes, then copy its data
    into the open image at `offset`.

    mkfs programs get a regular file, not a block device: inside the build
    root's user namespace ioctls like BLKBSZSET (mkfs.xfs) are not allowed.
    `fill(fd, path)`, if given, writes into the new filesystem before it is
    copied. Programs run with the build's clock (see build_env).
    """
    # pylint: disable=too-many-arguments,too-many-positional-arguments
    fd, path = tempfile.mkstemp(prefix=".mkfs-", dir=tmpdir)
    try:
        os.ftruncate(fd, size)
        run(argv + [path], stdout=subprocess.DEVNULL, env=build_env())
        if fill is not None:
            fill(fd, path)
        copy_sparse(fd, image_fd, offset, size)
    finally:
        os.close(fd)
        os.unlink(path)


def copy_sparse(src_fd, dst_fd, offset, size):
    """Copy the data (not the holes) of the first `size` bytes of `src_fd` into
    `dst_fd` at `offset`."""
    for start, end in data_extents(src_fd, size):
        copy_range(src_fd, dst_fd, start, end, offset + start)


# Names debugfs(8) can take between double quotes: printable, no quote, no backslash.
_DEBUGFS_SAFE = re.compile(r'[^"\\\x00-\x1f\x7f]*')


class UnsafeName(ValueError):
    """A path that cannot be written into a debugfs command; the caller falls back."""


def debugfs_quote(path):
    """`path` as one debugfs argument, or UnsafeName."""
    if not _DEBUGFS_SAFE.fullmatch(path):
        raise UnsafeName(f"{path!r} cannot be named in a debugfs command")
    return f'"{path}"'


def ext4_used_inodes(fd, offset=0):
    """The numbers of the inodes in use in the ext4 filesystem at `offset` of `fd`."""
    sb = os.pread(fd, 1024, offset + 1024)
    inodes_count, _, _, _, _, _, log_block = struct.unpack_from("<7I", sb, 0)
    per_group = struct.unpack_from("<I", sb, 40)[0]
    incompat = struct.unpack_from("<I", sb, 96)[0]
    desc_size = struct.unpack_from("<H", sb, 254)[0] if incompat & 0x80 else 32
    block = 1024 << log_block
    groups = -(-inodes_count // per_group)
    table = os.pread(fd, groups * desc_size, offset + (1 if block > 1024 else 2) * block)
    used = []
    for group in range(groups):
        desc = table[group * desc_size:(group + 1) * desc_size]
        if struct.unpack_from("<H", desc, 0x12)[0] & 0x1:       # INODE_UNINIT: none used
            continue
        bitmap = struct.unpack_from("<I", desc, 4)[0]
        if desc_size >= 64:
            bitmap |= struct.unpack_from("<I", desc, 0x24)[0] << 32
        bits = os.pread(fd, per_group // 8, offset + bitmap * block)
        base = group * per_group + 1
        for i, byte in enumerate(bits):
            if byte:
                used += [base + i * 8 + b for b in range(8) if byte >> b & 1]
    return used


def _debugfs(image, commands, tmpdir, image_fd=None):
    """Run the debugfs `commands` (lines) read-write on the filesystem in `image`
    (which may name `image_fd` as /proc/self/fd/N)."""
    if not commands:
        return
    with tempfile.NamedTemporaryFile("w", dir=tmpdir, prefix=".debugfs-", suffix=".cmd",
                                     encoding="utf-8", errors="surrogateescape") as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        try:
            res = subprocess.run(["debugfs", "-w", "-f", script.name, image],
                                 capture_output=True, text=True, errors="replace",
                                 check=False, env=build_env(),
                                 pass_fds=() if image_fd is None else (image_fd,))
        except FileNotFoundError:
            raise ToolError("'debugfs' is missing from the build root") from None
    # debugfs exits 0 even when a command fails; it reports failures on stderr
    problems = [line for line in res.stderr.splitlines()
                if line.strip() and not line.startswith("debugfs ")
                and not line.startswith("Allocated inode")]
    if res.returncode != 0 or problems:
        raise ToolError(f"debugfs failed: {' '.join(problems)[-400:]}")


def _attributes(path, st):
    """debugfs commands giving the inode at `path` the mode, owner and mtime of `st`."""
    name = debugfs_quote(path)
    return [f"sif {name} mode 0{st.st_mode:o}", f"sif {name} uid {st.st_uid}",
            f"sif {name} gid {st.st_gid}", f"sif {name} mtime {int(st.st_mtime)}"]


def _xattrs(src, dest, tmpdir):
    """debugfs commands copying the extended attributes of `src` onto `dest`."""
    commands = []
    for attr in sorted(os.listxattr(src, follow_symlinks=False)):
        value = os.getxattr(src, attr, follow_symlinks=False)
        fd, path = tempfile.mkstemp(prefix=".xattr-", dir=tmpdir)
        with open(fd, "wb") as f:
            f.write(value)
        commands.append(f"ea_set -f {debugfs_quote(path)} {debugfs_quote(dest)} "
                        f"{debugfs_quote(attr)}")
    return commands


def _removal(src, below):
    """debugfs commands emptying the directory `below` (relative to `src`), children first."""
    commands = []
    top = os.path.join(src, below.lstrip("/"))
    for root, dirs, files in os.walk(top, topdown=False):
        rel = "/" + os.path.relpath(root, src)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            commands.append(f"rm {debugfs_quote(os.path.join(rel, name))}")
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                commands.append(f"rmdir {debugfs_quote(os.path.join(rel, name))}")
    return commands


def real_directory(tree, below):
    """`tree`/`below` if every component of `below` is a directory, not a link; None if one
    is missing; raises UnsafeName if one is something else."""
    path = os.path.abspath(tree)
    for name in [n for n in below.split("/") if n]:
        path = os.path.join(path, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if name in (".", "..") or not stat.S_ISDIR(st.st_mode):
            raise UnsafeName(f"{below} is not a directory reached without symbolic links")
    return path


def plan_ext4(src, holes, extra, tmpdir):
    """The debugfs commands that finish a filesystem made with `mkfs.ext4 -d src`.

    `holes` are directories (absolute, within the filesystem) where other
    filesystems are mounted: they are left empty (created when missing).
    `extra` are {"path": DIR, "dest": DIR, "include": [PATTERNS]} copies of
    files from the build root into the filesystem; entries that the tree
    has already are left as the tree has them. The root directory gets
    `src`'s mode, owner, mtime and extended attributes (mke2fs leaves it at
    its defaults). Raises UnsafeName for names debugfs cannot be given.
    """
    import fnmatch  # pylint: disable=import-outside-toplevel
    commands = []
    for hole in holes:
        if real_directory(src, hole) is not None:
            commands += _removal(src, hole)
        else:
            commands += _mkdirs(src, hole)
    for copy in extra:
        dest = copy["dest"]
        commands += _mkdirs(src, dest)
        for name in sorted(os.listdir(copy["path"])):
            path = os.path.join(copy["path"], name)
            if not any(fnmatch.fnmatchcase(name, p) for p in copy["include"]) or \
                    not os.path.isfile(path) or \
                    os.path.lexists(os.path.join(src, dest.lstrip("/"), name)):
                continue
            target = os.path.join(dest, name)
            commands += [f"write {debugfs_quote(path)} {debugfs_quote(target)}",
                         f"sif {debugfs_quote(target)} mode 0{os.stat(path).st_mode:o}"]
    return commands + _xattrs(src, "/", tmpdir) + _attributes("/", os.lstat(src))


def _mkdirs(src, path):
    """debugfs mkdir commands for the components of `path` that `src` lacks."""
    commands, current = [], ""
    for name in [n for n in path.split("/") if n]:
        current += "/" + name
        if real_directory(src, current) is None:
            commands.append(f"mkdir {debugfs_quote(current)}")
    return commands


def mkfs_ext4_from(argv, src, image_fd, part, tmpdir, commands=()):
    """Make an ext4 filesystem holding the tree `src` with `argv` (from mkfs_argv) and put
    it into the open image at `part` = (offset, size), without mounting anything.

    mke2fs copies the tree itself (-d: owners, modes, hard and symbolic
    links, device nodes, extended attributes, so ACLs and SELinux labels);
    debugfs then runs `commands` (from plan_ext4). The result depends only on
    the tree and the options: the clock is the build's timestamp, the
    directory hash seed is the filesystem UUID, and the access and change
    times of every inode are set to the timestamp (the tree's own depend on
    when the store wrote it).
    """
    # pylint: disable=too-many-arguments,too-many-positional-arguments
    offset, size = part
    epoch = reproducible.epoch()
    uuid = argv[argv.index("-U") + 1]

    # mke2fs and debugfs write at `offset` of the image itself (unix_io's offset
    # option): no scratch file to copy in
    device = f"/proc/self/fd/{image_fd}"
    try:
        run(argv + ["-E", f"hash_seed={uuid},offset={offset}", "-d", src, device,
                    f"{size // 1024}k"], stdout=subprocess.DEVNULL, env=build_env(),
            pass_fds=(image_fd,))
    except ToolError as e:
        if "mkfs.ext4" not in str(e):
            raise
        raise ToolError("copying the tree into the image failed (see the mkfs.ext4 messages; "
                        "is the image large enough?)") from None
    device += f"?offset={offset}"
    before = ext4_used_inodes(image_fd, offset)
    _debugfs(device, list(commands), tmpdir, image_fd)
    after = ext4_used_inodes(image_fd, offset)
    # inodes of removed entries keep their old times: clear them
    gone = sorted(set(before) - set(after))
    _debugfs(device, [f"clri <{ino}>" for ino in gone] +
             [f"sif <{ino}> {field} {epoch}" for ino in after
              if ino == 2 or ino >= 11 for field in ("atime", "ctime")], tmpdir, image_fd)


def build_env():
    """The environment for filesystem tools: their clock is the build's timestamp."""
    epoch = str(reproducible.epoch())
    return dict(os.environ, E2FSPROGS_FAKE_TIME=epoch, SOURCE_DATE_EPOCH=epoch)


def tree_bytes(tree, skip=()):
    """Bytes allocated by the files below `tree`, not descending into the paths in `skip`."""
    total = 0
    for root, dirs, files in os.walk(tree):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
