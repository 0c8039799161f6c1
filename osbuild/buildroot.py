"""The build root: a systemd-nspawn container that runs one program.

One BuildRoot serves all programs of a pipeline. It owns a directory in
STORE/tmp holding the (empty) container root and the container's /etc,
/var and /tmp; the build tree's /usr (and /bin, /sbin, /lib* where they are
real directories) is bind-mounted read-only. The runner populates /etc once
for the whole build root, not once per program.

Programs run as root of a user namespace: uid 0..65535 inside are an
unprivileged range on the host, every bind is an idmapped mount (so files
keep their real owners), and the container has its own network namespace
with only loopback. Root inside can therefore write the trees it is given
but cannot remount, mknod, load modules, change sysctls or reach the host's
network; privileged work (loop devices, mounting image filesystems) is done
by the host through the APIs (see remoteloop.py).
"""

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
import uuid

import osbuild
from osbuild.api import OsbuildAPI
from osbuild.remoteloop import LoopServer
from osbuild.util import idmap
from osbuild.util.lifetime import contained
from osbuild.util.workdir import WorkDir, clean_stale

RUNTIME_DIR = "/run/osbuild"
CONTAINER_LIBDIR = "/run/osbuild/lib"
CONTAINER_PYTHON = "/run/osbuild/python"
CONTAINER_TREE = "/run/osbuild/tree"
CONTAINER_DEV = "/run/osbuild/dev"  # where the host creates loop device nodes
# The container's uid/gid range: 65536 ids at a random 64 Ki boundary of the
# range systemd-nspawn itself picks from, far above any real user.
UID_RANGE = 0x10000
_UID_BASES = (0x00080000 // UID_RANGE, 0x6FFF0000 // UID_RANGE)
# nspawn refuses to rm its propagation directory when /run is not a tmpfs.
_NSPAWN_NOISE = ('Attempted to remove disk file system under "/run/systemd/nspawn/propagate/',)
_USR_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")


class BuildRootError(Exception):
    """The build root cannot be set up on this host; the message says why."""


class RunResult:
    """What running one program produced."""

    def __init__(self, returncode, output):
        self.returncode = returncode
        self.output = output

    @property
    def success(self):
        """Whether the program exited with status 0."""
        return self.returncode == 0


class BuildRoot(contextlib.AbstractContextManager):
    """Runs programs from `libdir` in containers made from the tree `root`."""

    def __init__(self, root, runner, libdir, tmpdir):
        self.root = os.path.abspath(root)
        self.runner = runner
        self.libdir = os.path.abspath(libdir)
        # Locked while we live, so a concurrent osbuild never removes it.
        self._workdir = WorkDir(tmpdir, "buildroot-")
        self.dir = self._workdir.path
        self.machine_root = os.path.join(self.dir, "root")
        self.etc = os.path.join(self.dir, "etc")
        self.var = os.path.join(self.dir, "var")
        self.tmp = os.path.join(self.dir, "tmp")
        self.home = os.path.join(self.dir, "home")  # root's $HOME, /root
        self.dev = os.path.join(self.dir, "dev")
        self.uid_base = random.randint(*_UID_BASES) * UID_RANGE
        for d in (self.machine_root, self.etc, self.var, self.tmp, self.home, self.dev):
            os.mkdir(d, 0o755)
        os.chmod(self.tmp, 0o1777)
        os.chmod(self.home, 0o700)
        self._prepare_root()

    def _prepare_root(self):
        # Mirror the build tree's merged-/usr symlinks so /bin/sh etc. resolve.
        for name in _USR_DIRS:
            src = os.path.join(self.root, name)
            dst = os.path.join(self.machine_root, name)
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            elif os.path.isdir(src):
                os.mkdir(dst, 0o755)
        # systemd-nspawn wants an os-release file to accept the directory.
        os.makedirs(os.path.join(self.machine_root, "etc"), exist_ok=True)
        os.makedirs(os.path.join(self.machine_root, "usr"), exist_ok=True)
        # The root is mounted read-only (--read-only): nspawn cannot create
        # its mount points there, so they must exist beforehand.
        for name in ("dev", "proc", "sys", "run", "tmp", "var", "root"):
            os.makedirs(os.path.join(self.machine_root, name), exist_ok=True)

    def __exit__(self, *exc):
        self.cleanup()

    def loop_server(self, tree, output_dir):
        """A remoteloop server for a program that gets `tree` at CONTAINER_TREE.

        Only files below `output_dir` can be attached. The program also needs
        the bind `(self.dev, CONTAINER_DEV)` for the nodes.
        """
        paths = [(CONTAINER_TREE, tree)]
        usr = os.path.join(self.root, "usr")
        if os.path.isdir(usr) and not os.path.islink(usr):   # bound read-only as /usr
            paths.append(("/usr", usr))
        return LoopServer(self.dev, CONTAINER_DEV, output_dir=output_dir, work_dir=self.dir,
                          paths=paths)

    def cleanup(self):
        """Remove the build root's directory."""
        if self.dir is not None:
            self._workdir.cleanup()
            self.dir = None

    def _nspawn_argv(self, api_dir, binds, ro_binds, network):
        argv = [
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--as-pid2",
            "--link-journal=no", "--console=pipe",
            "--timezone=off", "--resolv-conf=off", "--read-only",
            f"--private-users={self.uid_base}:{UID_RANGE}", "--private-users-ownership=map",
            "--capability=CAP_MAC_ADMIN",
            f"--machine=osbuild-{uuid.uuid4().hex[:16]}",
            f"--directory={self.machine_root}",
            "--setenv=PYTHONPATH=" + CONTAINER_PYTHON,
            "--setenv=PYTHONUNBUFFERED=1",
            "--setenv=LC_ALL=C.UTF-8",
            "--setenv=PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        ]
        if not network:
            argv.append("--private-network")
        binds = [(self.etc, "/etc"), (self.var, "/var"), (self.tmp, "/tmp"),
                 (self.home, "/root"), (api_dir, "/run/osbuild/api"),
                 *binds]
        # idmap: uid N inside is uid N on disk, so trees keep their real owners.
        mounts = idmap.MountTable()
        for src, _ in binds + list(ro_binds):
            if not mounts.supports_idmap(src):
                raise BuildRootError(f"{src} is on a {mounts.fstype(src)} filesystem, which "
                                     "cannot be idmapped: the store and /run/osbuild must be on "
                                     f"one of {', '.join(idmap.describe())}")
        argv += [f"--bind={src}:{dst}:idmap" for src, dst in binds]
        argv += [f"--bind-ro={src}:{dst}:idmap" for src, dst in ro_binds]
        # Only read (and mostly world-readable): where idmapping is impossible
        # (say the host's /usr on overlayfs) the files show as owned by nobody.
        shared = [(os.path.join(self.root, name), "/" + name) for name in _USR_DIRS
                  if os.path.isdir(os.path.join(self.root, name))
                  and not os.path.islink(os.path.join(self.root, name))]
        shared.append((os.path.join(self.root, "etc"), "/run/osbuild/buildroot-etc"))
        argv += [f"--bind-ro={src}:{dst}" + (":idmap" if mounts.supports_idmap(src) else "")
                 for src, dst in shared]
        # Programs and the package: never idmapped, and without what is mounted
        # below them (the store may live inside the libdir, as in a checkout).
        argv += [f"--bind-ro={self.libdir}:{CONTAINER_LIBDIR}:norbind",
                 f"--bind-ro={os.path.dirname(os.path.abspath(osbuild.__file__))}:"
                 f"{CONTAINER_PYTHON}/osbuild:norbind"]
        return argv

    def run(self, kind, name, args, binds=(), ro_binds=(), apis=(), monitor=None,
            network=False):  # pylint: disable=too-many-arguments
        """Run the program `<libdir>/<kind>/<name>` with JSON `args` on stdin.

        `binds`/`ro_binds` are (host path, container path) pairs; `apis` are
        BaseAPI servers to expose next to the osbuild API; `monitor` is called
        with each chunk of output as it arrives; `network` shares the host's
        network instead of a private one with only loopback.
        """
        # Socket paths are limited to 108 bytes, so they cannot live in the store.
        os.makedirs(RUNTIME_DIR, mode=0o755, exist_ok=True)
        clean_stale(RUNTIME_DIR, ("api-",))  # left by osbuild processes that died
        api_workdir = WorkDir(RUNTIME_DIR, "api-")
        try:
            # the container must not outlive us, nor nspawn (see util/lifetime.py)
            argv = contained(self._nspawn_argv(api_workdir.path, binds, ro_binds, network) + [
                f"{CONTAINER_LIBDIR}/runners/{self.runner}", f"{CONTAINER_LIBDIR}/{kind}/{name}"])
        except BaseException:
            api_workdir.cleanup()
            raise
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        servers = [OsbuildAPI(args, write_fd), *apis]
        chunks, errors = [], []
        proc = None
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pumps = [threading.Thread(target=_pump, args=(read_fd, chunks, monitor), daemon=True),
                 threading.Thread(target=_pump, args=(err_r, errors, None), daemon=True)]
        try:
            for server in servers:
                server.start(api_workdir.path)
            for pump in pumps:
                pump.start()
            # The container starts with nspawn's stdio (errors before the runner
            # connects to the osbuild API land there); the program's own
            # output arrives through the log pipe handed out by setup-stdio.
            # pylint: disable-next=consider-using-with
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err_w,
                                    stderr=err_w, close_fds=True, start_new_session=True)
            os.close(err_w)
            err_w = None
            returncode = proc.wait()
        finally:
            if proc is not None and proc.poll() is None:
                _terminate(proc)
            for server in servers:
                server.stop()
            os.close(write_fd)
            if err_w is not None:
                os.close(err_w)
            for pump, fd in zip(pumps, (read_fd, err_r)):
                if pump.ident is not None:
                    pump.join(timeout=30)
                if not pump.is_alive():
                    os.close(fd)
            api_workdir.cleanup()
        chunks += _filter_noise(errors, monitor)
        output = b"".join(chunks).decode("utf-8", errors="replace")
        return RunResult(returncode, output)


def _pump(fd, chunks, monitor):
    """Copy output from `fd` until every writer has closed it."""
    while True:
        data = os.read(fd, 65536)
        if not data:
            return
        chunks.append(data)
        if monitor is not None:
            monitor(data)


def _filter_noise(chunks, monitor):
    """Drop nspawn's known harmless complaints; pass the rest on."""
    lines = b"".join(chunks).decode("utf-8", errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(_NSPAWN_NOISE)]
    data = "".join(kept).encode()
    if data and monitor is not None:
        monitor(data)
    return [data] if data else []


def _terminate(proc):
    """Stop the container: SIGTERM to nspawn, then SIGKILL to its session."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()


def stream_monitor(data):
    """A monitor that writes program output to this process' stdout."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
