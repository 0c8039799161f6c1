"""Where a program puts a big scratch file: in memory when it fits with room to spare.

A file that is written once, read once and deleted (a raw image before it
is converted, an unpacked package before dpkg reads it) costs a disk
filesystem its journal, write-back and, on delete, discards. A tmpfs only
copies pages. The build root's /dev/shm is a tmpfs of its own, private to the
container and gone with it, so nothing is left behind even when the program
is killed.
"""

import os

MEMORY_DIR = "/dev/shm"
MIB = 1 << 20
# what is left to the page cache of everything else the build writes meanwhile
RESERVE = 512 * MIB


def available_memory(meminfo="/proc/meminfo"):
    """The kernel's estimate of memory available without swapping, bytes (0 if unknown)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def is_tmpfs(path, mounts="/proc/self/mounts"):
    """Whether `path` is itself the mount point of a tmpfs."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            found = None
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == path:
                    found = fields[2]   # the last mount on a path is the one seen
            return found == "tmpfs"
    except OSError:
        return False


def free_bytes(path):
    """Bytes an unprivileged writer may still use on the filesystem of `path` (0 if unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def memory_dir(nbytes, path=MEMORY_DIR):
    """`path` when it is a tmpfs that holds `nbytes` with a tenth to spare and the
    machine has twice `nbytes` (plus RESERVE) available; otherwise None."""
    if nbytes <= 0 or not is_tmpfs(path):
        return None
    if nbytes + nbytes // 10 > free_bytes(path):
        return None
    if 2 * nbytes + RESERVE > available_memory():
        return None
    return path


def memory_budget(nbytes):
    """How much of `nbytes` of scratch files may go to a tmpfs: at most half of the
    memory available beyond RESERVE."""
    return max(0, min(nbytes, (available_memory() - RESERVE) // 2))
