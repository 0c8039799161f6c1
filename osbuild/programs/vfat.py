"""Copy a directory tree into a vfat filesystem image with mtools.

vfat holds only directories and regular files. The tree comes from stages,
so it may hold symbolic links pointing anywhere the copying program can
see (a host file bound into the build root): mtools would copy the target's
content. Here the tree is walked without following links, and only regular
files and directories are handed to mtools, by their own paths; symbolic
links and special files are left out with a warning. Used by assemblers in
the build root (standard library and the build root's mtools only).
"""

import os
import stat
import subprocess
import sys

from osbuild.programs import fsimage


def _mtools(argv, image):
    fsimage.run([argv[0], "-i", image, *argv[1:]], stdin=subprocess.DEVNULL,
                env=dict(fsimage.build_env(), MTOOLS_SKIP_CHECK="1"))


def plan(src, warn):
    """Walk `src` without following links: (directories, {directory: [files]}).

    Both are relative to `src` ("" is `src` itself), parents first. Each
    left-out entry is reported through `warn(message)`.
    """
    dirs, files = [], {}
    pending = [""]
    while pending:
        rel = pending.pop(0)
        files[rel] = []
        with os.scandir(os.path.join(src, rel) if rel else src) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                path = os.path.join(rel, entry.name)
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    dirs.append(path)
                    pending.append(path)
                elif stat.S_ISREG(mode):
                    files[rel].append(path)
                elif stat.S_ISLNK(mode):
                    warn(f"vfat: leaving out the symbolic link /{path} -> "
                         f"{os.readlink(entry.path)} (vfat cannot hold links)")
                else:
                    warn(f"vfat: leaving out /{path}, which is neither a file nor a directory")
    return dirs, files


def real_directory(tree, below):
    """`tree`/`below` if every component of `below` is a directory, not a link; else None."""
    path = os.path.abspath(tree)
    for name in [n for n in below.split("/") if n]:
        if name in (".", ".."):
            return None
        path = os.path.join(path, name)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        except FileNotFoundError:
            return None
    return path


def copy_to_vfat(tree, image, below="/", warn=None):
    """Copy the contents of `tree`'s directory `below` into the vfat filesystem in `image`.

    `image` is a file or device holding an (unmounted) vfat filesystem.
    Contents, names and modification times are copied; see the module for
    what is left out. When `below` is missing, or reached only through a
    symbolic link, nothing is copied (with a warning for a link). The
    tree must not change meanwhile (it is read-only to assemblers). Raises
    fsimage.ToolError when mtools fails.
    """
    if warn is None:
        def warn(message):
            print(message, file=sys.stderr)
    src = real_directory(tree, below)
    if src is None:
        if os.path.lexists(os.path.join(tree, below.lstrip("/"))):
            warn(f"vfat: {below} in the tree is not a directory reached without symbolic "
                 "links: nothing copied to its filesystem")
        return
    dirs, files = plan(src, warn)
    for chunk in _chunks(dirs):
        _mtools(["mmd", "-D", "o", *(f"::/{d}" for d in chunk)], image)
    for rel, names in files.items():
        for chunk in _chunks(names):
            _mtools(["mcopy", "-p", "-m", "-Q", "-D", "o",
                     *(os.path.join(src, n) for n in chunk), f"::/{rel}/" if rel else "::/"],
                    image)


def _chunks(items, size=500):
    """`items` in slices short enough for one command line."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
