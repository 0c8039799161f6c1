"""Where things are inside a build root's container: the `/run/osbuild/...` paths.

One object, `CONTAINER`, holds every path a program sees (as attributes);
the host side (buildroot.py, pipeline.py, api.py, sources.py) and the
programs' client calls all read them from here. `HOST_RUNTIME_DIR` is the
host directory of the API sockets (their paths are limited to 108 bytes, so
they cannot live in the store).
"""

import os

HOST_RUNTIME_DIR = "/run/osbuild"
# The directories of a container's root that come from the build tree (or the host).
USR_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")


class ContainerLayout:
    """The container's paths below `root` (a plain class: typing costs every program
    2-3 ms of start-up)."""

    __slots__ = ("root",)

    def __init__(self, root="/run/osbuild"):
        self.root = root

    @property
    def api(self):
        """Directory of the API sockets (`api/osbuild`, `api/sources`, ...)."""
        return os.path.join(self.root, "api")

    @property
    def lib(self):
        """The libdir: stages/ assemblers/ sources/ runners/ (read-only)."""
        return os.path.join(self.root, "lib")

    @property
    def python(self):
        """On PYTHONPATH: holds the host's `osbuild` package (read-only)."""
        return os.path.join(self.root, "python")

    @property
    def tree(self):
        """The tree a stage modifies, or the assembler reads."""
        return os.path.join(self.root, "tree")

    @property
    def sources(self):
        """What the sources API fetched for a stage: `sources/NAME/CHECKSUM` (read-only)."""
        return os.path.join(self.root, "sources")

    @property
    def output(self):
        """The assembler's output directory."""
        return os.path.join(self.root, "output")

    @property
    def dev(self):
        """Where the host creates loop device nodes for the assembler."""
        return os.path.join(self.root, "dev")

    @property
    def emulator(self):
        """qemu's user-mode emulators of the host (read-only; osbuild/emulation.py)."""
        return os.path.join(self.root, "emulator")

    def socket(self, endpoint):
        """The path of an API endpoint's socket."""
        return os.path.join(self.api, endpoint)

    def program(self, kind, name):
        """The path of a program (`kind` is stages, assemblers, sources or runners)."""
        return os.path.join(self.lib, kind, name)


CONTAINER = ContainerLayout()
