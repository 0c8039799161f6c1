"""Reproducible builds: the build's timestamp, clamping mtimes, ids-derived UUIDs.

One timestamp, the *source epoch* (seconds since 1970, UTC), stands for
"when" everything a build writes was made. It is `SOURCE_DATE_EPOCH` from
osbuild's environment when set (an override), else the pipeline's
`source-epoch`, else DEFAULT_EPOCH; never the clock. Every program
gets it as `SOURCE_DATE_EPOCH` in its environment, and after each program the
host clamps modification times newer than the epoch down to it
(`clamp_mtimes`), so files a stage wrote "now" look the same in every build.

A source epoch other than DEFAULT_EPOCH is part of every stage and assembler
id of its pipeline (another epoch is another tree); with the default the ids
are the original osbuild's.

Programs (stages, assemblers) use `epoch()` and `derive_uuid()`/`derive_bytes()`
to make their output a function of their input only: a filesystem UUID or
hash seed derived from the options (or the tree's content), never random.
Standard library only: this module also runs inside build roots.
"""

import hashlib
import json
import os
import stat

# The timestamp of a pipeline without `source-epoch` and without
# SOURCE_DATE_EPOCH: 2020-01-01T00:00:00Z (the original osbuild's days).
DEFAULT_EPOCH = 1577836800
ENV = "SOURCE_DATE_EPOCH"
# Latest accepted epoch: 9999-12-31 (what every filesystem and tar can store).
MAX_EPOCH = 253402214400


class EpochError(ValueError):
    """A source epoch that is not a usable timestamp; the message says why."""


def check_epoch(value, where, now):
    """`value` as a source epoch (an int from 0 to `now`); raises EpochError naming `where`."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_EPOCH:
        raise EpochError(f"{where}: {json.dumps(value)[:40]} is not a timestamp "
                         "(whole seconds since 1970-01-01 UTC)")
    if value > now:
        # clamping only reaches files newer than the epoch: one in the future
        # would leave the build's own times in the tree
        raise EpochError(f"{where}: {value} is in the future (now is {int(now)})")
    return value


def epoch():
    """The source epoch a program runs with (`SOURCE_DATE_EPOCH`), DEFAULT_EPOCH without one."""
    value = os.environ.get(ENV, "")
    return int(value) if value.isascii() and value.isdigit() else DEFAULT_EPOCH


def derive_bytes(size, *parts):
    """`size` bytes (at most 64) determined by the JSON-serializable `parts` alone."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha512(b"osbuild-derive\0" + text.encode()).digest()[:size]


def derive_uuid(*parts):
    """A random-looking (version 4 layout) UUID determined by `parts` alone.

    E.g. `derive_uuid(options, "root-fs")` for a filesystem whose options
    give no UUID: the same options give the same UUID in every build.
    """
    import uuid  # pylint: disable=import-outside-toplevel  # (imports platform: not on the warm path)
    return uuid.UUID(bytes=derive_bytes(16, *parts), version=4)


def clamp_mtimes(tree, limit):
    """Set the atime and mtime of every entry of `tree` whose mtime is after `limit` to `limit`.

    Walks with directory fds opened O_NOFOLLOW and changes symlinks themselves
    (never what they point to), so a hostile tree cannot make the host touch
    anything outside it. Returns the number of entries changed.
    """
    limit_ns = limit * 1_000_000_000
    times = (limit_ns, limit_ns)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    changed = 0
    # depth-first, one open fd per level: (directory fd, its remaining entries)
    stack = [_opened(os.open(tree, flags))]
    try:
        while stack:
            fd, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                # the directory itself last: changing entries does not touch its mtime
                if os.fstat(fd).st_mtime_ns > limit_ns:
                    os.utime(fd, ns=times)
                    changed += 1
                os.close(stack.pop()[0])
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                try:
                    stack.append(_opened(os.open(entry.name, flags, dir_fd=fd)))
                except NotADirectoryError:  # replaced since it was listed
                    pass
            elif st.st_mtime_ns > limit_ns:
                os.utime(entry.name, ns=times, dir_fd=fd, follow_symlinks=False)
                changed += 1
    finally:
        for fd, _ in stack:
            os.close(fd)
    return changed


def _opened(fd):
    try:
        with os.scandir(fd) as it:
            return fd, iter(sorted(it, key=lambda e: e.name))
    except BaseException:
        os.close(fd)
        raise
