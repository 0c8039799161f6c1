"""Which filesystems can be idmapped (the build root binds everything idmapped).

An idmapped bind shows the files of the host directory with their real
owners inside the build root's user namespace and records the real owners
for what the container writes. Linux supports it per filesystem type.
"""

import os
import platform
import re

# filesystem type -> first Linux (major, minor) that idmaps it
SUPPORTED = {"ext4": (5, 12), "xfs": (5, 12), "vfat": (5, 12), "btrfs": (5, 15),
             "f2fs": (5, 18), "erofs": (6, 2), "tmpfs": (6, 3)}


def kernel_version(release=None):
    """(major, minor) of the running (or the given) kernel release."""
    found = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def describe():
    """The supported filesystem types with their minimum kernel, for messages."""
    return [f"{fs} (Linux {v[0]}.{v[1]}+)" for fs, v in SUPPORTED.items()]


class MountTable:
    """A snapshot of this process' mounts (/proc/self/mountinfo)."""

    def __init__(self, mountinfo="/proc/self/mountinfo"):
        self.mounts = []
        with open(mountinfo, encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                self.mounts.append((_unescape(fields[4]), fields[sep + 1]))
        self.kernel = kernel_version()

    def fstype(self, path):
        """The type of the filesystem holding `path` (the longest matching mount point)."""
        path = os.path.realpath(path)
        best, best_type = "", "unknown"
        for point, fstype in self.mounts:
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, best_type = point, fstype
        return best_type

    def supports_idmap(self, path):
        """Whether a bind of `path` can be idmapped on this kernel."""
        needed = SUPPORTED.get(self.fstype(path))
        return needed is not None and self.kernel >= needed


def _unescape(text):
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return text.encode().decode("unicode_escape") if "\\" in text else text
