"""The build root: a systemd-nspawn container that runs one program.

One BuildRoot serves all programs of a pipeline. It owns a directory in
STORE/tmp holding the (empty) container root and the template of the
container's /etc; the build tree's /usr (and /bin, /sbin, /lib* where they
are real directories, checked without following symlinks) is bind-mounted
read-only.

Nothing one program can write is seen by a later one: the host makes the
/etc template (see etctemplate.py), the runner's set-up (ldconfig,
sysusers, ...) runs once in it in a container of its own before the first
program, and from then on every program gets it read-only, plus a fresh,
empty /var, /tmp and /root that is removed when the program ends.

Programs run as root of a user namespace: uid 0..65535 inside are an
unprivileged range on the host; the binds of trees, of the program's own
directories and of the API sockets are idmapped mounts (so files keep their
real owners), the libdir and the `osbuild` package are bound read-only
without idmapping (`BuildRoot.binds()` lists every bind as a `Bind`
record); and the container has its own network namespace with only
loopback. Root inside can therefore write the trees it is given but cannot
remount, mknod, load modules, change sysctls or reach the host's network;
privileged work (loop devices, mounting image filesystems) is done
by the host through the APIs (see remoteloop.py). Each container runs in a
pids cgroup of its own (util/pidlimit.py): a program that hits the limit is
stopped and fails. It runs under nspawn's own seccomp filters, installed by
osbuild instead of compiled by nspawn for every container (seccomp.py).
"""

import contextlib
import functools
import os
import random
import signal
import stat
import subprocess
import threading
import time
import uuid
from typing import NamedTuple

import osbuild
from osbuild import emulation, etctemplate, seccomp
from osbuild.api import OsbuildAPI
from osbuild.layout import CONTAINER, HOST_RUNTIME_DIR, USR_DIRS
from osbuild.debugshell import ProgramControl
from osbuild.remoteloop import LoopServer
from osbuild.util import idmap
from osbuild.util.lifetime import contained
from osbuild.util.pidlimit import DEFAULT_MAX_PROCESSES, ProcessLimit, ProcessLimitError
from osbuild.util.workdir import WorkDir, clean_stale

# How a bind is idmapped: always (refused where the filesystem cannot), where
# the filesystem can, never.
IDMAP, IDMAP_IF_POSSIBLE, NO_IDMAP = "idmap", "if-possible", "none"
# The container's uid/gid range: 65536 ids at a random 64 Ki boundary of the
# range systemd-nspawn itself picks from, far above any real user.
UID_RANGE = 0x10000
_UID_BASES = (0x00080000 // UID_RANGE, 0x6FFF0000 // UID_RANGE)
# nspawn refuses to rm its propagation directory when /run is not a tmpfs.
_NSPAWN_NOISE = ('Attempted to remove disk file system under "/run/systemd/nspawn/propagate/',)


class BuildRootError(Exception):
    """The build root cannot be set up on this host; the message says why."""


class Bind(NamedTuple):
    """One mount of the container: host `source` at container path `target`."""

    source: str
    target: str
    readonly: bool = False
    idmap: str = IDMAP
    recursive: bool = True  # also what is mounted below `source`

    def option(self, mounts):
        """The systemd-nspawn option for this bind; `mounts` is an idmap.MountTable."""
        options = []
        if self.idmap == IDMAP:
            if not mounts.supports_idmap(self.source):
                raise BuildRootError(
                    f"{self.source} is on a {mounts.fstype(self.source)} filesystem, which "
                    f"cannot be idmapped: the store and {HOST_RUNTIME_DIR} must be on "
                    f"one of {', '.join(idmap.describe())}")
            options.append("idmap")
        elif self.idmap == IDMAP_IF_POSSIBLE and mounts.supports_idmap(self.source):
            options.append("idmap")
        if not self.recursive:
            options.append("norbind")
        flag = "--bind-ro" if self.readonly else "--bind"
        return f"{flag}={escape_bind(self.source)}:{self.target}" + \
            "".join(":" + o for o in options)


class RunResult:
    """What running one program produced."""

    def __init__(self, returncode, output):
        self.returncode = returncode
        self.output = output
        self.timed_out = False  # stopped by --stage-timeout

    @property
    def success(self):
        """Whether the program exited with status 0."""
        return self.returncode == 0


def escape_bind(path):
    """`path` as systemd-nspawn's --bind= parser reads it back (':' separates fields)."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def tree_dirs(tree, names=USR_DIRS):
    """What each of `names` is in `tree`, looked at without following symlinks:
    {name: ("dir", None) or ("link", target)}; other kinds and missing ones are left out."""
    found = {}
    fd = os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                found[name] = ("dir", None)
            elif stat.S_ISLNK(st.st_mode):
                found[name] = ("link", os.readlink(name, dir_fd=fd))
    finally:
        os.close(fd)
    return found


class BuildRoot(contextlib.AbstractContextManager):
    """Runs programs from `libdir` in containers made from the tree `root`.

    `max_processes` limits the processes of each container (None or 0: no limit);
    `epoch` is every program's SOURCE_DATE_EPOCH (None: not set).
    """
    # pylint: disable=too-many-instance-attributes

    def __init__(self, root, runner, libdir, tmpdir, max_processes=DEFAULT_MAX_PROCESSES,
                 epoch=None):
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        self.root = os.path.abspath(root)
        # SOURCE_DATE_EPOCH of every program (see osbuild/reproducible.py)
        self.epoch = epoch
        self.runner = runner
        self.libdir = os.path.abspath(libdir)
        self.max_processes = max_processes or None
        if self.max_processes:
            try:  # fail before anything runs when the host cannot limit processes
                ProcessLimit(1).close()
            except ProcessLimitError as e:
                raise BuildRootError(str(e)) from e
        # Locked while we live, so a concurrent osbuild never removes it.
        self._workdir = WorkDir(tmpdir, "buildroot-")
        self.dir = self._workdir.path
        self.machine_root = os.path.join(self.dir, "root")
        self.etc = os.path.join(self.dir, "etc")
        self.dev = os.path.join(self.dir, "dev")
        self.uid_base = random.randint(*_UID_BASES) * UID_RANGE
        self._setup = None   # the runner's set-up: None (not yet run) or its RunResult
        try:
            for d in (self.machine_root, self.etc, self.dev):
                os.mkdir(d, 0o755)
            self._usr = tree_dirs(self.root)
            self._prepare_root()
            if self.root == "/":
                etctemplate.from_host(self.etc)
            else:
                etctemplate.from_tree(self.etc, self.root)
        except etctemplate.EtcError as e:
            self.cleanup()
            raise BuildRootError(str(e)) from e
        except BaseException:
            self.cleanup()
            raise

    def _prepare_root(self):
        # Mirror the build tree's merged-/usr symlinks so /bin/sh etc. resolve
        # (inside the container, so they can point nowhere else).
        for name, (kind, target) in self._usr.items():
            dst = os.path.join(self.machine_root, name)
            if kind == "link":
                os.symlink(target, dst)
            else:
                os.mkdir(dst, 0o755)
        # The root is mounted read-only (--read-only): nspawn cannot create
        # its mount points there, so they must exist beforehand.
        for name in ("etc", "usr", "dev", "proc", "sys", "run", "tmp", "var", "root"):
            os.makedirs(os.path.join(self.machine_root, name), exist_ok=True)

    def __exit__(self, *exc):
        self.cleanup()

    def loop_server(self, tree, output_dir):
        """A remoteloop server for a program that gets `tree` at CONTAINER.tree.

        Only files below `output_dir` can be attached. The program also needs
        the bind `(self.dev, CONTAINER.dev)` for the nodes.
        """
        paths = [(CONTAINER.tree, tree)]
        if self._usr.get("usr", ("",))[0] == "dir":   # bound read-only as /usr
            paths.append(("/usr", os.path.join(self.root, "usr")))
        return LoopServer(self.dev, CONTAINER.dev, output_dir=output_dir, work_dir=self.dir,
                          paths=paths)

    def cleanup(self):
        """Remove the build root's directory."""
        if self.dir is not None:
            self._workdir.cleanup()
            self.dir = None

    def binds(self, api_dir, private, etc_writable, binds=(), ro_binds=()):
        """The container's mounts as Bind records, in the order nspawn applies them.

        `private` is the program's own directory (var, tmp, root); only the
        runner's set-up gets the /etc template writable. `binds`/`ro_binds`
        are the program's (host path, container path) pairs.
        """
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        own = [Bind(api_dir, CONTAINER.api)]
        own += [Bind(os.path.join(private, name), "/" + name) for name in ("var", "tmp", "root")]
        etc = Bind(self.etc, "/etc", readonly=not etc_writable)
        # idmap: uid N inside is uid N on disk, so trees keep their real owners.
        records = own + ([etc] if etc_writable else [])
        records += [Bind(src, dst) for src, dst in binds]
        records += ([] if etc_writable else [etc])
        records += [Bind(src, dst, readonly=True) for src, dst in ro_binds]
        # Only read (and mostly world-readable): where idmapping is impossible
        # (say the host's /usr on overlayfs) the files show as owned by nobody.
        # Only real directories: tree_dirs() looked at them with lstat, and
        # committed trees do not change while we run.
        records += [Bind(os.path.join(self.root, name), "/" + name, readonly=True,
                         idmap=IDMAP_IF_POSSIBLE)
                    for name, (kind, _) in self._usr.items() if kind == "dir"]
        # Programs and the package: never idmapped, and without what is mounted
        # below them (the store may live inside the libdir, as in a checkout).
        package = os.path.dirname(os.path.abspath(osbuild.__file__))
        records += [Bind(self.libdir, CONTAINER.lib, readonly=True, idmap=NO_IDMAP,
                         recursive=False),
                    Bind(package, os.path.join(CONTAINER.python, "osbuild"), readonly=True,
                         idmap=NO_IDMAP, recursive=False)]
        return records

    def _nspawn_argv(self, api_dir, private, etc_writable, binds, ro_binds, network,
                     mounts=None, extra=()):
        """systemd-nspawn's command line for one container (see `binds()`), with
        the Bind records `extra` last."""
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        argv = [
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--as-pid2",
            "--link-journal=no", "--console=pipe",
            "--timezone=off", "--resolv-conf=off", "--read-only",
            f"--private-users={self.uid_base}:{UID_RANGE}", "--private-users-ownership=map",
            "--capability=CAP_MAC_ADMIN",
            f"--machine=osbuild-{uuid.uuid4().hex[:16]}",
            f"--directory={self.machine_root}",
            "--setenv=PYTHONPATH=" + CONTAINER.python,
            "--setenv=PYTHONUNBUFFERED=1",
            "--setenv=LC_ALL=C.UTF-8",
            "--setenv=PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        ]
        if self.epoch is not None:
            argv.append(f"--setenv=SOURCE_DATE_EPOCH={int(self.epoch)}")
        if not network:
            argv.append("--private-network")
        mounts = mounts or idmap.MountTable()
        for bind in [*self.binds(api_dir, private, etc_writable, binds, ro_binds), *extra]:
            argv.append(bind.option(mounts))
        return argv

    def _private_dirs(self):
        """A fresh, empty /var, /tmp and /root for one program."""
        workdir = WorkDir(self.dir, "work-")
        for name, mode in (("var", 0o755), ("tmp", 0o1777), ("root", 0o700)):
            path = os.path.join(workdir.path, name)
            os.mkdir(path)
            os.chmod(path, mode)
        return workdir

    def run(self, kind, name, args, binds=(), ro_binds=(), apis=(), monitor=None,
            network=False, on_phase=None, emulate=None, control=None):
        """Run the program `<libdir>/<kind>/<name>` with JSON `args` on stdin.

        `binds`/`ro_binds` are (host path, container path) pairs; `apis` are
        BaseAPI servers to expose next to the osbuild API; `monitor` is called
        with each chunk of output as it arrives; `network` shares the host's
        network instead of a private one with only loopback; `on_phase` is
        called with each phase the program reports (see api.OsbuildAPI);
        `emulate` names an architecture whose binaries the program runs
        (osbuild/emulation.py); `control` (a debugshell.ProgramControl) adds
        debug shells (with the emulator's binds, not its registration) and a
        time limit.
        """
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        setup_output = ""
        if self._setup is None:
            self._setup = self._container(["--setup"], (), (), None, (), monitor, False)
            setup_output = self._setup.output
            if not self._setup.success:
                msg = (f"osbuild: the runner {self.runner} could not set up the build root "
                       f"(exit status {self._setup.returncode})\n")
                if monitor is not None:
                    monitor(msg.encode())
                return RunResult(self._setup.returncode, setup_output + msg)
        try:   # host files, read-only, not idmapped
            emulator, runner_args = emulation.container_setup(emulate)
        except emulation.EmulationError as e:
            raise BuildRootError(str(e)) from e
        extra = [Bind(src, dst, readonly=True, idmap=NO_IDMAP, recursive=False)
                 for src, dst in emulator]
        control = control or ProgramControl()
        if control.shell_before is not None:
            self.shell(control.shell_before, binds, ro_binds, network, extra)
        res = self._container([*runner_args, CONTAINER.program(kind, name)], binds, ro_binds,
                              args, apis, monitor, network, on_phase, extra,
                              timeout=control.timeout)
        if res.timed_out:
            msg = (f"\nosbuild: {kind[:-1]} {name} ran longer than the limit of "
                   f"{control.timeout:g} s (--stage-timeout) and was stopped\n")
            res.output += msg
            if monitor is not None:
                monitor(msg.encode())
        if not res.success and control.shell_on_failure is not None:
            self.shell(control.shell_on_failure, binds, ro_binds, network, extra)
        res.output = setup_output + res.output
        return res

    def shell(self, shell, binds=(), ro_binds=(), network=False, extra=()):
        """Run the debug shell `shell` (a debugshell.Shell) in a container with the
        binds and sandbox a program gets, and wait until it exits."""
        shell.say(shell.banner)
        res = self._container(None, binds, ro_binds, None, (), None, network, extra=extra,
                              shell=shell)
        shell.say(f"shell exited with status {res.returncode}")

    def _container(self, program, binds, ro_binds, args, apis, monitor, network,
                   on_phase=None, extra=(), timeout=None, shell=None):
        """Start the runner with `program` as its arguments in a container with
        the `apis` and, unless `args` is None (the runner's set-up, which alone
        gets /etc writable), the osbuild API handing out `args`. A program
        still running after `timeout` seconds is stopped. With `shell` (a
        debugshell.Shell) the container runs that shell instead."""
        # pylint: disable=too-many-arguments,too-many-positional-arguments,too-many-locals
        # Socket paths are limited to 108 bytes, so they cannot live in the store.
        os.makedirs(HOST_RUNTIME_DIR, mode=0o755, exist_ok=True)
        clean_stale(HOST_RUNTIME_DIR, ("api-",))  # left by osbuild processes that died
        with contextlib.ExitStack() as stack:
            private = self._private_dirs()
            stack.callback(private.cleanup)
            api_workdir = WorkDir(HOST_RUNTIME_DIR, "api-")
            stack.callback(api_workdir.cleanup)
            # the container must not outlive us, nor nspawn (see util/lifetime.py)
            nspawn = self._nspawn_argv(api_workdir.path, private.path,
                                       args is None and shell is None, binds, ro_binds, network,
                                       extra=extra)
            if shell is None:
                nspawn += [CONTAINER.program("runners", self.runner), *program]
            else:
                if shell.interactive:  # nspawn relays through a pty: the terminal stays out
                    nspawn[nspawn.index("--console=pipe")] = "--console=interactive"
                nspawn += [f"--chdir={CONTAINER.tree}", *shell.argv()]
            filters = seccomp.for_options(seccomp.options_key(nspawn),
                                          f"{self.uid_base}:{UID_RANGE}")
            argv = contained(nspawn)
            limit = None
            if self.max_processes:
                try:
                    limit = ProcessLimit(self.max_processes)
                except ProcessLimitError as e:
                    raise BuildRootError(str(e)) from e
                stack.callback(limit.close)
                argv = limit.wrap(argv)
            servers = ([] if args is None else [OsbuildAPI(args, None, on_phase)]) + list(apis)
            returncode, chunks, hit, timed_out = _execute(
                argv, api_workdir.path, servers, monitor, limit, timeout, shell, filters)
        if hit:
            msg = (f"\nosbuild: the program hit the build root's limit of {self.max_processes} "
                   "processes (--max-processes) and was stopped\n").encode()
            chunks.append(msg)
            if monitor is not None:
                monitor(msg)
            returncode = returncode or 1
        res = RunResult(returncode, b"".join(chunks).decode("utf-8", errors="replace"))
        if timed_out:
            res.returncode = res.returncode or 1
            res.timed_out = True
        return res


def _execute(argv, api_dir, servers, monitor, limit, timeout=None, shell=None, filters=None):
    """Run the container command `argv` with the API `servers` in `api_dir`
    (and, given seccomp.Filters `filters`, under them instead of nspawn's own);
    returns (exit status, output chunks, whether the process limit was hit,
    whether it ran out of time and was stopped). The OsbuildAPI among them
    hands out the write end of the log pipe."""
    # pylint: disable=too-many-arguments,too-many-positional-arguments,too-many-locals
    # pylint: disable=too-many-statements,too-many-branches
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    for server in servers:
        if isinstance(server, OsbuildAPI):
            server.output_fd = write_fd
    chunks, errors, hit = [], [], []
    proc = None
    timed_out = False
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    stdin, err_monitor, out_w = subprocess.DEVNULL, None, None
    if shell is not None:   # its input is osbuild's; its output is copied out as it comes
        stdin = shell.stdin_fd
        err_monitor = functools.partial(_write_shell_output, shell.output_fd)
        if shell.interactive:   # nspawn itself talks to the terminal
            out_w = os.dup(shell.output_fd)
    pumps = [threading.Thread(target=_pump, args=(read_fd, chunks, monitor), daemon=True),
             threading.Thread(target=_pump, args=(err_r, errors, err_monitor), daemon=True)]
    done = threading.Event()
    try:
        for server in servers:
            server.start(api_dir)
        for pump in pumps:
            pump.start()
        # The container starts with nspawn's stdio (errors before the runner
        # connects to the osbuild API land there); the program's own
        # output arrives through the log pipe handed out by setup-stdio.
        # the caller's SYSTEMD_SECCOMP=0 must not turn nspawn's filters off
        env = {k: v for k, v in os.environ.items() if k not in seccomp.ENV}
        popen = subprocess.Popen
        if filters is not None:
            env.update(seccomp.ENV)
            try:
                popen = filters.spawner().popen
            except OSError as e:
                raise BuildRootError(f"the build root's seccomp filters: {e.strerror}") from e
        proc = popen(argv, stdin=stdin, stdout=err_w if out_w is None else out_w,
                     stderr=err_w, close_fds=True, start_new_session=True, env=env)
        os.close(err_w)
        err_w = None
        if limit is not None:
            threading.Thread(target=_watch_limit, args=(limit, proc, done, hit),
                             daemon=True).start()
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc, limit)
            returncode = proc.wait()
    finally:
        done.set()
        if proc is not None and proc.poll() is None:
            _terminate(proc)
        for server in servers:
            server.stop()
        os.close(write_fd)
        for fd in (err_w, out_w):
            if fd is not None:
                os.close(fd)
        for pump, fd in zip(pumps, (read_fd, err_r)):
            if pump.ident is not None:
                pump.join(timeout=30)
            if not pump.is_alive():
                os.close(fd)
    if limit is not None and limit.hit():
        hit.append(True)
    if shell is not None:
        return returncode, chunks, False, False
    return returncode, chunks + _filter_noise(errors, monitor), bool(hit), timed_out


def _kill(proc, limit):
    """SIGKILL the container: its session and (with a limit) everything in its cgroup.

    Whatever escaped the session (a daemon that called setsid) dies with the
    PID namespace of util/lifetime.py when its first process is killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if limit is not None:
        limit.kill()


def _write_shell_output(fd, data):
    """Copy a debug shell's output to `fd`, without nspawn's known noise."""
    if _NSPAWN_NOISE[0].encode() in data:
        data = b"".join(line for line in data.splitlines(keepends=True)
                        if not line.startswith(_NSPAWN_NOISE[0].encode()))
    while data:
        data = data[os.write(fd, data):]


def _watch_limit(limit, proc, done, hit):
    """Kill the container as soon as a fork was refused (a fork bomb would
    otherwise go on trying until the end of times)."""
    while not done.wait(0.1):
        if limit.hit():
            hit.append(True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return


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
