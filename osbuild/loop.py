"""Loop devices through their ioctls.

`LoopControl` hands out free loop devices (`/dev/loop-control`); `Loop` is
one attached device. A device is attached with `LOOP_CONFIGURE` (file, offset,
size limit and flags in one step) and falls back to `LOOP_SET_FD` followed by
`LOOP_SET_STATUS64` on kernels without it. Direct I/O is never enabled, so
backing files on tmpfs work.
"""

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time

# <linux/loop.h>
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

# <linux/fs.h>
BLKFLSBUF = 0x1261

# struct loop_info64: device, inode, rdevice, offset, sizelimit (u64),
# number, encrypt_type, encrypt_key_size, flags (u32), file_name[64],
# crypt_name[64], encrypt_key[32], init[2] (u64).
_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
# struct loop_config: fd, block_size (u32), info, reserved[8] (u64).
_CONFIG = struct.Struct("=II" + _INFO64.format[1:] + "8Q")

_BUSY_RETRIES = 64


class LoopError(Exception):
    """A loop device could not be set up."""


class LoopInfo:
    """The configuration of an attached loop device (struct loop_info64)."""

    def __init__(self, offset=0, sizelimit=0, flags=0, number=0, file_name=b""):
        self.offset = offset
        self.sizelimit = sizelimit
        self.flags = flags
        self.number = number
        self.file_name = file_name

    def pack(self):
        """The binary struct loop_info64."""
        return _INFO64.pack(0, 0, 0, self.offset, self.sizelimit, 0, 0, 0, self.flags,
                            self.file_name[:63], b"", b"", 0, 0)

    @classmethod
    def unpack(cls, data):
        """Parse a binary struct loop_info64."""
        fields = _INFO64.unpack(data)
        return cls(offset=fields[3], sizelimit=fields[4], flags=fields[8], number=fields[5],
                   file_name=fields[9].rstrip(b"\0"))

    @property
    def autoclear(self):
        """Whether the device detaches itself on its last close."""
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)


class Loop:
    """One loop device, opened read-write by minor number."""

    def __init__(self, minor, dev_dir="/dev"):
        self.minor = minor
        self.devname = f"loop{minor}"
        path = os.path.join(dev_dir, self.devname)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            # devtmpfs normally creates the node; make it like losetup does.
            with contextlib.suppress(FileExistsError):
                os.mknod(path, stat.S_IFBLK | 0o660, os.makedev(7, minor))
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fileno(self):
        """The open device's file descriptor."""
        if self.fd is None:
            raise ValueError("loop device is closed")
        return self.fd

    @property
    def rdev(self):
        """The device number (major, minor combined)."""
        return os.fstat(self.fileno()).st_rdev

    def close(self):
        """Close the device (an autoclear device detaches on its last close)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def configure(self, backing_fd, offset=0, sizelimit=0, autoclear=True, read_only=False):
        """Attach `backing_fd` with the given offset and size limit in one step.

        Raises OSError (EBUSY when the device is already in use).
        """
        flags = (LO_FLAGS_AUTOCLEAR if autoclear else 0) | (LO_FLAGS_READ_ONLY if read_only else 0)
        info = LoopInfo(offset=offset, sizelimit=sizelimit, flags=flags)
        fields = _INFO64.unpack(info.pack())
        config = _CONFIG.pack(backing_fd, 0, *fields, *([0] * 8))
        try:
            fcntl.ioctl(self.fileno(), LOOP_CONFIGURE, config)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTTY):
                raise
            # Kernel before 5.8: two steps.
            self.set_fd(backing_fd)
            try:
                self.set_status(offset=offset, sizelimit=sizelimit, autoclear=autoclear,
                                read_only=read_only)
            except OSError:
                self.clear_fd()
                raise

    def set_fd(self, backing_fd):
        """LOOP_SET_FD: attach `backing_fd`."""
        fcntl.ioctl(self.fileno(), LOOP_SET_FD, backing_fd)

    def set_status(self, offset=0, sizelimit=0, autoclear=True, read_only=False):
        """LOOP_SET_STATUS64: set offset, size limit and flags.

        The kernel answers EAGAIN while it still has cached pages of the old
        geometry; that is retried for a short while.
        """
        flags = (LO_FLAGS_AUTOCLEAR if autoclear else 0) | (LO_FLAGS_READ_ONLY if read_only else 0)
        data = LoopInfo(offset=offset, sizelimit=sizelimit, flags=flags).pack()
        for attempt in range(50):
            try:
                fcntl.ioctl(self.fileno(), LOOP_SET_STATUS64, data)
                return
            except OSError as e:
                if e.errno != errno.EAGAIN or attempt == 49:
                    raise
                time.sleep(0.02)

    def get_status(self):
        """LOOP_GET_STATUS64: the current LoopInfo (ENXIO when not attached)."""
        buf = bytearray(_INFO64.size)
        fcntl.ioctl(self.fileno(), LOOP_GET_STATUS64, buf)
        return LoopInfo.unpack(bytes(buf))

    def flush(self):
        """Write the device's cached blocks through to the backing file (BLKFLSBUF).

        Without this, detaching can lose blocks still held in the page cache
        of the block device. The backing file itself is not forced to disk:
        readers of the file see its page cache.
        """
        fcntl.ioctl(self.fileno(), BLKFLSBUF, 0)

    def clear_fd(self):
        """LOOP_CLR_FD: detach (deferred by the kernel while others use it)."""
        fcntl.ioctl(self.fileno(), LOOP_CLR_FD, 0)

    def mknod(self, dir_fd, mode=0o600):
        """Create this device's node `loopN` in the directory `dir_fd`.

        Returns True when the node was created, False when an identical
        node already existed. A different file of that name is an error.
        """
        rdev = self.rdev
        try:
            os.mknod(self.devname, stat.S_IFBLK | mode, rdev, dir_fd=dir_fd)
            return True
        except FileExistsError:
            st = os.stat(self.devname, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                return False
            raise LoopError(f"{self.devname} exists in the device directory "
                            "and is not that loop device") from None


class LoopControl:
    """/dev/loop-control: finds free loop devices."""

    def __init__(self, dev_dir="/dev"):
        self.dev_dir = dev_dir
        self.fd = os.open(os.path.join(dev_dir, "loop-control"), os.O_RDWR | os.O_CLOEXEC)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close /dev/loop-control."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def get_unbound(self):
        """The minor number of a free loop device (allocated if needed)."""
        if self.fd is None:
            raise ValueError("loop control is closed")
        return fcntl.ioctl(self.fd, LOOP_CTL_GET_FREE)

    def attach(self, backing_fd, offset=0, sizelimit=0, autoclear=True, read_only=False):
        """Attach `backing_fd` to a free loop device and return its `Loop`.

        Another process may grab the same free device between the query and
        the attach (EBUSY); then the next free one is tried.
        """
        for value in (offset, sizelimit):
            if type(value) is not int or not 0 <= value < 1 << 63:  # pylint: disable=unidiomatic-typecheck
                raise LoopError(f"offset and size limit must be integers in [0, 2**63), "
                                f"not {value!r}")
        for _ in range(_BUSY_RETRIES):
            lo = Loop(self.get_unbound(), self.dev_dir)
            try:
                lo.configure(backing_fd, offset=offset, sizelimit=sizelimit,
                             autoclear=autoclear, read_only=read_only)
                return lo
            except OSError as e:
                lo.close()
                if e.errno != errno.EBUSY:
                    raise LoopError(f"cannot attach loop device {lo.devname}: "
                                    f"{os.strerror(e.errno)}") from None
            except BaseException:
                lo.close()
                raise
        raise LoopError("no free loop device: all candidates were busy")
