"""Turn a program's file-system syncs into no-ops (what eatmydata does, without a library).

A stage that writes a tree the host commits afterwards gains nothing from
fsync: the tree is thrown away if the build fails, and the image written from
it is what has to reach the disk. dpkg syncs its database after every state
change of every package, and starts write-back of every file it unpacks,
even with --force-unsafe-io: about 13,000 calls for the Debian image.

`install()` adds a seccomp filter to the calling thread that answers fsync,
fdatasync, sync, syncfs and sync_file_range with success without running
them. Everything the thread starts afterwards inherits it. A filter can
only narrow what its process may do, so this gives the program nothing it
did not have.
"""

import ctypes
import os
import struct

_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _PR_SET_NO_NEW_PRIVS = 22, 2, 38
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_NR, _ARCH = 0, 4   # offsets in struct seccomp_data
# machine -> (AUDIT_ARCH_*, numbers of fsync, fdatasync, sync, syncfs, sync_file_range)
SYNC_CALLS = {
    "x86_64": (0xC000003E, (74, 75, 162, 306, 277)),
    "aarch64": (0xC00000B7, (82, 83, 81, 267, 84)),
}


class _SockFprog(ctypes.Structure):   # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _insn(code, k, jt=0, jf=0):
    return struct.pack("=HBBI", code, jt, jf, k)


def program(machine):
    """The BPF program for `machine` (os.uname().machine) as bytes, or None when
    its system call numbers are not known here."""
    if machine not in SYNC_CALLS:
        return None
    arch, calls = SYNC_CALLS[machine]
    n = len(calls)
    insns = [_insn(_LD_W_ABS, _ARCH),
             _insn(_JEQ_K, arch, jt=0, jf=n + 1),     # another ABI: allow
             _insn(_LD_W_ABS, _NR)]
    for i, nr in enumerate(calls):
        insns.append(_insn(_JEQ_K, nr, jt=n - i, jf=0))
    insns += [_insn(_RET_K, _RET_ALLOW), _insn(_RET_K, _RET_ERRNO | 0)]
    return b"".join(insns)


def install(machine=None):
    """Install the filter on the calling thread. Returns False, changing nothing,
    when the machine is not known here; raises OSError when the kernel refuses it."""
    prog = program(machine or os.uname().machine)
    if prog is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        # without CAP_SYS_ADMIN the kernel wants no_new_privs first
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0):
            err = ctypes.get_errno()
            raise OSError(err, f"installing the no-sync filter: {os.strerror(err)}")
    return True
