"""Paths and files inside a tree that a stage modifies.

A tree is a root file system: its symbolic links mean what they would mean
on the booted system. `chase` resolves a path the way the kernel would with
the tree as `/` (like mkosi's `chase()` and debos' `RestrictedPath`): an
absolute link starts again at the tree's root and `..` never climbs above
it, so no link in the tree leads a stage's write outside of it. The
resolution is done on path strings; it is safe while nothing else changes
the tree, which holds for a stage (one program at a time per tree).
"""

import errno
import os
import stat

from osbuild.programs import ProgramError

MAX_LINKS = 40   # the kernel's limit (ELOOP)


def _parts(path):
    return [p for p in path.split("/") if p not in ("", ".")]


def chase(tree, path):
    """The absolute path inside `tree` that `path` (relative to the tree's root) leads to.

    Every symbolic link on the way is followed inside the tree, the last
    component's too. Components that do not exist are kept as they are.
    Raises `ProgramError` after more than MAX_LINKS links (a loop).
    """
    todo = list(reversed(_parts(path)))
    done = []
    links = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if done:
                done.pop()
            continue
        try:
            st = os.lstat(os.path.join(tree, *done, part))
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not stat.S_ISLNK(st.st_mode):
            done.append(part)
            continue
        links += 1
        if links > MAX_LINKS:
            raise ProgramError(f"/{path.lstrip('/')}: {os.strerror(errno.ELOOP)}")
        target = os.readlink(os.path.join(tree, *done, part))
        if target.startswith("/"):
            done = []
        todo.extend(reversed(_parts(target)))
    return "/" + "/".join(done)


def resolve_in_tree(tree, path):
    """The host path of `path` inside `tree`, all links resolved inside the tree (`chase`)."""
    inside = chase(tree, path)
    return os.path.join(tree, inside[1:]) if inside != "/" else tree


def in_tree(tree, path):
    """The host path of `path` inside `tree` with its directory resolved inside the tree.

    The last component is not followed: `write_file` on the result replaces
    a link there instead of writing through it.
    """
    head, tail = os.path.split("/" + path.lstrip("/"))
    if tail in ("", ".", ".."):
        return resolve_in_tree(tree, path)
    return os.path.join(resolve_in_tree(tree, head), tail)


def write_file(path, data, mode=0o644, uid=None, gid=None):
    """Atomically replace `path` with `data` (str or bytes), creating its directory.

    The content goes to a new temporary file beside `path` (never through a
    symbolic link) that is renamed over it, so readers see the old or the
    new file, and a failure leaves neither a partial file nor the temporary
    one. `mode` is exact (the umask does not apply); `uid`/`gid` set the owner.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.osbuild-{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_db(tree, name):
    """The tree's `/etc/<name>` (passwd or group) as {name: fields}."""
    entries = {}
    path = os.path.join(tree, "etc", name)
    if not os.path.exists(path):
        raise ProgramError(f"the tree has no /etc/{name} (install the base system first)")
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            if len(fields) >= 3 and fields[0] and not fields[0].startswith(("+", "-", "#")):
                entries[fields[0]] = fields
    return entries
