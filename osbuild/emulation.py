"""User-mode emulation of a foreign architecture for one program's build root.

A stage that declares `STAGE_EMULATION = True` accepts the option
`emulation` naming an architecture of `ARCHES` (say "aarch64"); while it
runs, binaries of that architecture in its tree (maintainer scripts, the
tree's own dpkg) execute under qemu's user-mode emulator.

The manifest only chooses a key of `ARCHES`: the magic, the mask, the flags
and the interpreter are osbuild's. The interpreter is the host's statically
linked `qemu-<arch>-static` (package qemu-user-static), bound read-only into
the container. The runner registers it (see `register`) in a binfmt_misc
instance it mounts inside the container: binfmt_misc is per user namespace
(Linux 6.7 and later) and every container has a user namespace of its own,
so the registration is seen by that one program only and goes away with it;
the host's registrations are never read or written. Flag F makes the kernel
open the interpreter at registration, so it works in chroots of the tree.
"""

import ctypes
import errno
import os

from osbuild.layout import CONTAINER

# Where the host looks for the interpreters (a test points it elsewhere).
INTERPRETER_DIR = "/usr/bin"
CONTAINER_BINFMT = "/proc/sys/fs/binfmt_misc"
PACKAGE = "qemu-user-static"
# The only flags ever registered: F (open the interpreter now).
FLAGS = "F"


class EmulationError(Exception):
    """Emulation cannot be set up (or was asked for wrongly); the message says why."""


class Arch:
    """An emulated architecture: its ELF magic and mask and qemu's interpreter."""

    def __init__(self, name, machines, magic, mask):
        self.name = name
        self.machines = machines     # os.uname().machine values that run it natively
        self.magic = magic
        self.mask = mask
        self.interpreter = f"qemu-{name}-static"

    def registration(self, interpreter):
        """The line written to binfmt_misc's `register` file."""
        def hexed(data):
            return "".join(f"\\x{b:02x}" for b in data)
        return (f":osbuild-{self.name}:M:0:{hexed(self.magic)}:{hexed(self.mask)}:"
                f"{interpreter}:{FLAGS}")


# 64-bit little-endian ELF, e_machine EM_AARCH64 (183), executables and shared objects
ARCHES = {
    "aarch64": Arch("aarch64", ("aarch64", "arm64"),
                    b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
                    b"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff"
                    b"\xfe\xff\xff\xff"),
}


def lookup(name):
    """The Arch for `name`, or an EmulationError naming the supported ones."""
    if not isinstance(name, str) or name not in ARCHES:
        shown = repr(name)[:60]
        raise EmulationError(f"cannot emulate architecture {shown}: supported are "
                             f"{', '.join(sorted(ARCHES))}")
    return ARCHES[name]


def is_native(name, machine=None):
    """Whether this host runs `name`'s binaries itself (no emulation needed)."""
    return (machine or os.uname().machine) in lookup(name).machines


def host_interpreter(name):
    """The host path of `name`'s interpreter; an EmulationError saying what to install."""
    arch = lookup(name)
    path = os.path.join(INTERPRETER_DIR, arch.interpreter)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise EmulationError(f"emulating {name} needs {path}, which is missing: "
                             f"install {PACKAGE} (apt-get install {PACKAGE})")
    return path


def check(name):
    """Raise an EmulationError now if `name` cannot be emulated on this host."""
    if not is_native(name):
        host_interpreter(name)
        probe_kernel()


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def probe_kernel():
    """Refuse (EmulationError) unless this kernel mounts binfmt_misc per user namespace.

    Tried in a child process with a user and mount namespace of its own, so
    nothing of it is visible on the host.
    """
    libc = _libc()
    clone_newns, clone_newuser = 0x00020000, 0x10000000
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 99
        try:
            if libc.unshare(clone_newuser | clone_newns) != 0:
                code = 100 + ctypes.get_errno()
            else:
                code = _mount_binfmt("/tmp", libc, raise_error=False)
        finally:
            os._exit(code)  # pylint: disable=protected-access
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 99:
        raise EmulationError("probing binfmt_misc in a user namespace failed")
    if code >= 100:
        raise EmulationError("cannot create a user namespace to register the emulator in "
                             f"({os.strerror(code - 100)})")
    if code:
        _refuse(code)


def container_setup(name):
    """(read-only binds, runner arguments) a program emulating `name` needs.

    Empty when the host runs `name` natively.
    """
    if name is None or is_native(name):
        return [], []
    arch = lookup(name)
    target = os.path.join(CONTAINER.emulator, arch.interpreter)
    return [(host_interpreter(name), target)], ["--emulate", arch.name]


def _refuse(err):
    if err in (errno.EPERM, errno.ENODEV, errno.EINVAL):
        raise EmulationError("the kernel cannot mount binfmt_misc inside a user namespace "
                             f"({os.strerror(err)}): emulation needs Linux 6.7 or later "
                             "with CONFIG_BINFMT_MISC")
    raise EmulationError(f"mounting binfmt_misc failed: {os.strerror(err)}")


def _mount_binfmt(target, libc=None, raise_error=True):
    """Mount this user namespace's binfmt_misc at `target`; the errno (0: done)."""
    libc = libc or _libc()
    ms_nosuid, ms_nodev, ms_noexec = 2, 4, 8
    err = 0
    if libc.mount(b"binfmt_misc", target.encode(), b"binfmt_misc",
                  ms_nosuid | ms_nodev | ms_noexec, None) != 0:
        err = ctypes.get_errno()
        if raise_error:
            _refuse(err)
    return err


def register(name):
    """In the container (the runner, before the program): register `name`'s interpreter.

    Mounts this user namespace's own binfmt_misc instance at CONTAINER_BINFMT
    (its usual place, where nothing of the host's is mounted in a container).
    """
    arch = lookup(name)
    interpreter = os.path.join(CONTAINER.emulator, arch.interpreter)
    if not os.path.isfile(interpreter):
        raise EmulationError(f"{interpreter} is missing in the build root")
    _mount_binfmt(CONTAINER_BINFMT)
    try:
        fd = os.open(os.path.join(CONTAINER_BINFMT, "register"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, arch.registration(interpreter).encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise EmulationError(f"registering {interpreter} with binfmt_misc failed: "
                             f"{e.strerror}") from None
