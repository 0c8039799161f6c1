"""systemd-nspawn's seccomp filters, compiled once per boot instead of per container.

nspawn compiles its system call filters with libseccomp every time it starts
a container: about 50 ms, a third of a stage's fixed cost. The filters
depend only on nspawn, its libraries, the kernel and a few options, so
`for_options()` reads them once from a probe container that nspawn set up
the usual way (ptrace's PTRACE_SECCOMP_GET_FILTER, from the host) and keeps
them in HOST_RUNTIME_DIR/seccomp (root's, 0700; keyed by kernel and boot,
checked against the identity of every file nspawn had mapped).

A container is then started with `SYSTEMD_SECCOMP=0` by a thread that
installed the same filters on itself, in the same order and with the same
flags (`Filters.spawner()`): seccomp filters belong to a thread and a child
inherits those of the thread that forked it, so what runs in the container
gets the byte-identical filter stack, nspawn itself runs under it too, and
the rest of osbuild does not. When the
filters cannot be read (no ptrace, an unknown architecture, no filter at
all), `for_options()` returns None and nspawn compiles its own, as before.
"""

import base64
import contextlib
import ctypes
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time

from osbuild.layout import HOST_RUNTIME_DIR, USR_DIRS
from osbuild.metacache import file_identity
from osbuild.util.lifetime import contained
from osbuild.util.workdir import WorkDir, clean_stale

FORMAT = 1
CACHE_DIR = os.path.join(HOST_RUNTIME_DIR, "seccomp")
ENV = {"SYSTEMD_SECCOMP": "0"}   # for nspawn: the filters are already installed
PROBE_SECONDS = 10
# nspawn options that differ between containers but not in their filters
_PER_CONTAINER = ("--machine=", "--directory=", "--bind=", "--bind-ro=", "--setenv=",
                  "--private-users=", "--chdir=", "--console=")
_PROBE_ARGS = ("86399.25",)   # how the probe's sleep is told apart from any other

_PTRACE_DETACH, _PTRACE_SEIZE, _PTRACE_INTERRUPT = 17, 0x4206, 0x4207
_PTRACE_GET_FILTER, _PTRACE_GET_METADATA = 0x420C, 0x420D
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _SECCOMP_SET_MODE_FILTER = 22, 2, 1
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "riscv64": 277, "ppc64le": 358,
                "s390x": 348, "i686": 354, "armv7l": 383}
_ACTIVE = {}


class ProbeError(Exception):
    """The filters could not be read; the message says why."""


class _SockFprog(ctypes.Structure):   # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Metadata(ctypes.Structure):    # struct seccomp_metadata
    _fields_ = [("filter_off", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    libc.syscall.restype = ctypes.c_long
    return libc


class Filters:
    """Seccomp filters as (flags, BPF program bytes), the first installed first."""

    def __init__(self, programs):
        self.programs = [(int(flags), bytes(prog)) for flags, prog in programs]
        if not self.programs or any(not p or len(p) % 8 for _, p in self.programs):
            raise ValueError("no seccomp filters, or a program that is not whole instructions")
        self._libc = _libc()
        self._nr = _SYS_SECCOMP.get(os.uname().machine)
        if self._nr is None and any(flags for flags, _ in self.programs):
            raise ValueError(f"seccomp(2) is not known on {os.uname().machine}")
        self._spawner = None
        self._buffers = [ctypes.create_string_buffer(prog, len(prog)) for _, prog in self.programs]
        self._fprogs = [_SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
                        for (_, prog), buf in zip(self.programs, self._buffers)]

    def install(self):
        """Install the filters on the calling thread (its children and whatever they
        execute inherit them); raises OSError."""
        for (flags, _), fprog in zip(self.programs, self._fprogs):
            if flags:
                res = self._libc.syscall(self._nr, _SECCOMP_SET_MODE_FILTER, flags,
                                         ctypes.byref(fprog))
            else:
                res = self._libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER,
                                       ctypes.byref(fprog), 0, 0)
            if res != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"installing seccomp filters: {os.strerror(err)}")

    def spawner(self):
        """This process's Spawner under these filters (started on first use); raises
        OSError if the filters cannot be installed."""
        if self._spawner is None:
            self._spawner = Spawner(self)
        return self._spawner

    def to_json(self):
        """The programs, as JSON-able lists."""
        return [[flags, base64.b64encode(prog).decode()] for flags, prog in self.programs]


class Spawner:
    """A thread of this process that runs under seccomp Filters and starts processes.

    It lives as long as the process: a child's PR_SET_PDEATHSIG (which
    util/lifetime.py relies on) fires when the thread that forked it ends."""

    def __init__(self, filters):
        self.native_id = None   # the thread's id (the kernel's, as in /proc/self/task)
        self._requests = queue.SimpleQueue()
        started = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(filters, started), daemon=True,
                         name="osbuild-seccomp-spawner").start()
        error = started.get()
        if error is not None:
            raise error

    def _serve(self, filters, started):
        self.native_id = threading.get_native_id()
        try:
            filters.install()
        except OSError as e:
            started.put(e)
            return
        started.put(None)
        while True:
            args, kwargs, reply = self._requests.get()
            try:
                # pylint: disable-next=consider-using-with
                reply.put((subprocess.Popen(*args, **kwargs), None))
            except Exception as e:  # pylint: disable=broad-exception-caught
                reply.put((None, e))   # raised in the caller's thread

    def popen(self, *args, **kwargs):
        """subprocess.Popen(*args, **kwargs), started from the filtered thread."""
        reply = queue.SimpleQueue()
        self._requests.put((args, kwargs, reply))
        proc, error = reply.get()
        if error is not None:
            raise error
        return proc


def options_key(nspawn_argv):
    """The nspawn options of `nspawn_argv` (before its command) that can change its filters."""
    return [arg for arg in nspawn_argv[1:]
            if arg.startswith("--") and not arg.startswith(_PER_CONTAINER)]


def _boot():
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return [os.uname().release, os.uname().machine, f.read().strip()]


def _cache_path(options, nspawn):
    key = json.dumps([FORMAT, _boot(), nspawn, options], separators=(",", ":"))
    return os.path.join(CACHE_DIR, hashlib.sha256(key.encode()).hexdigest() + ".json")


def _private(st):
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _read(path):
    """The Filters kept at `path`, or None if they are missing, not root's own, or stale."""
    try:
        if not _private(os.lstat(CACHE_DIR)):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _private(os.fstat(fd)):
            return None
        with os.fdopen(os.dup(fd), encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != FORMAT or not data.get("files") or \
                any(file_identity(ident[0]) != ident for ident in data["files"]):
            return None
        return Filters((flags, base64.b64decode(prog, validate=True))
                       for flags, prog in data["filters"])
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    finally:
        os.close(fd)


def _write(path, filters, files):
    with contextlib.suppress(FileExistsError):
        os.makedirs(CACHE_DIR, mode=0o700)
    if not _private(os.lstat(CACHE_DIR)):
        raise ProbeError(f"{CACHE_DIR} is not a directory of root's own")
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "files": files, "filters": filters.to_json()}, f)
    os.rename(tmp, path)


def _descendants(root_pid):
    """The host pids of the descendants of `root_pid`, nearest first."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root_pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def _find(root_pid, match):
    """The nearest descendant of `root_pid` for which `match(pid)` is true, or None."""
    for pid in _descendants(root_pid):
        with contextlib.suppress(OSError):
            if match(pid):
                return pid
    return None


def _cmdline_is(cmdline):
    def match(pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read() == cmdline
    return match


def _exe_named(name):
    def match(pid):
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")) == name
    return match


def _mapped_files(pid):
    """The identities of nspawn's executable and the files it has mapped (its libraries)."""
    paths = {os.path.realpath(f"/proc/{pid}/exe")}
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                paths.add(fields[5].rstrip("\n"))
    idents = [file_identity(path) for path in sorted(paths)]
    if None in idents:
        raise ProbeError("a file nspawn has mapped cannot be found")
    return idents


def _dump(pid):
    """The seccomp filters of the process `pid`, the first installed first."""
    libc = _libc()
    if libc.ptrace(_PTRACE_SEIZE, pid, None, None) != 0:
        raise ProbeError(f"ptrace: {os.strerror(ctypes.get_errno())}")
    try:
        libc.ptrace(_PTRACE_INTERRUPT, pid, None, None)
        os.waitpid(pid, 0x40000000)   # __WALL: it is our tracee, not our child
        programs, index = [], 0
        while True:
            count = libc.ptrace(_PTRACE_GET_FILTER, pid, ctypes.c_void_p(index), None)
            if count < 0:
                if ctypes.get_errno() == 2 and index:   # ENOENT: no more filters
                    break
                raise ProbeError(f"PTRACE_SECCOMP_GET_FILTER: {os.strerror(ctypes.get_errno())}")
            buf = ctypes.create_string_buffer(8 * count)
            libc.ptrace(_PTRACE_GET_FILTER, pid, ctypes.c_void_p(index), buf)
            meta = _Metadata(index, 0)
            if libc.ptrace(_PTRACE_GET_METADATA, pid, ctypes.c_void_p(ctypes.sizeof(meta)),
                           ctypes.byref(meta)) < 0:
                raise ProbeError(f"PTRACE_SECCOMP_GET_METADATA: "
                                 f"{os.strerror(ctypes.get_errno())}")
            programs.append((meta.flags, buf.raw))
            index += 1
    finally:
        libc.ptrace(_PTRACE_DETACH, pid, None, None)
    return programs   # index 0 is the oldest (kernel/seccomp.c: get_nth_filter)


def _probe_root(path):
    """A container root with the host's /usr (and /bin, /lib*, ... as the host has them)."""
    binds = []
    for name in USR_DIRS:
        host = os.path.join("/", name)
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(path, name))
        elif os.path.isdir(host):
            os.mkdir(os.path.join(path, name))
            binds.append(f"--bind-ro={host}:{host}")
    for name in ("etc", "var", "tmp", "root", "run", "proc", "sys", "dev"):
        os.mkdir(os.path.join(path, name))
    os.chmod(path, 0o755)
    return binds


def probe(options, private_users):
    """Read the filters nspawn installs in a container with `options`; returns
    (Filters, identities of the files they came from). Raises ProbeError."""
    sleep = shutil.which("sleep", path="/usr/bin:/bin")
    if sleep is None:
        raise ProbeError("no sleep(1) on the host")
    sleep = os.path.realpath(sleep)
    os.makedirs(HOST_RUNTIME_DIR, mode=0o755, exist_ok=True)
    clean_stale(HOST_RUNTIME_DIR, ("work-",))
    root = WorkDir(HOST_RUNTIME_DIR, "work-")
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    try:
        argv = ["systemd-nspawn", *options, f"--private-users={private_users}",
                "--console=pipe", f"--directory={root.path}", *_probe_root(root.path),
                sleep, *_PROBE_ARGS]
        proc = subprocess.Popen(contained(argv), stdin=subprocess.DEVNULL,  # pylint: disable=consider-using-with
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, env=env)
        try:
            cmdline = b"\0".join(os.fsencode(a) for a in (sleep, *_PROBE_ARGS)) + b"\0"
            deadline = time.monotonic() + PROBE_SECONDS
            while (target := _find(proc.pid, _cmdline_is(cmdline))) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace").strip()
                    raise ProbeError(f"the probe container did not start: {err[-300:]}")
                time.sleep(0.002)
            nspawn = _find(proc.pid, _exe_named("systemd-nspawn"))
            if nspawn is None:
                raise ProbeError("no systemd-nspawn process in the probe")
            filters = Filters(_dump(target))
            files = _mapped_files(nspawn)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
    except ValueError as e:
        raise ProbeError(str(e)) from e
    finally:
        root.cleanup()
    return filters, files


def for_options(options, private_users):
    """The Filters nspawn installs with `options` (see options_key), from this
    process's memory, the cache or a probe; None where they cannot be read."""
    key = tuple(options)
    if key not in _ACTIVE:
        _ACTIVE[key] = _load(options, private_users)
    return _ACTIVE[key]


def _load(options, private_users):
    """for_options() without the memory: the cache, else a probe (kept when it worked)."""
    nspawn = shutil.which("systemd-nspawn")
    if nspawn is None:
        return None
    path = _cache_path(options, os.path.realpath(nspawn))
    filters = _read(path)
    if filters is None:
        try:
            filters, files = probe(options, private_users)
        except (ProbeError, OSError):
            return None
        with contextlib.suppress(ProbeError, OSError):
            _write(path, filters, files)
    return filters
