"""A limit on the number of processes a command and all its descendants may have.

Each `ProcessLimit` is a cgroup of its own in the `pids` controller (cgroup
v1 `/sys/fs/cgroup/pids`, or a cgroup v2 hierarchy with `pids` enabled)
with `pids.max` set. The command is started through a tiny shell that moves
itself into the cgroup and then execs it, so everything it starts is
counted, whatever uid it runs as inside its user namespace (RLIMIT_NPROC
counts per uid and would let a container use each of its 65536 uids).
Forks beyond the limit fail with EAGAIN; `hit()` tells whether that
happened. The cgroup files belong to the host's root, so a container's
root cannot move itself out or raise the limit.

Cgroups are named `osbuild/<pid>-<token>`; those of processes that no
longer exist are removed when a new one is made.
"""

import contextlib
import os
import secrets
import signal
import time

_PARENT = "osbuild"
# Default of --max-processes: processes (and threads) of one build root.
DEFAULT_MAX_PROCESSES = 2048


class ProcessLimitError(Exception):
    """No process limit can be set up on this host; the message says why."""


def _mounts():
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4:
                yield fields[1].replace("\\040", " "), fields[2], fields[3].split(",")


def find_hierarchy():
    """The mount point of a writable cgroup hierarchy with the pids controller, or None."""
    for mountpoint, fstype, opts in _mounts():
        if fstype == "cgroup" and "pids" in opts and os.access(mountpoint, os.W_OK):
            return mountpoint
    for mountpoint, fstype, _ in _mounts():
        if fstype != "cgroup2" or not os.access(mountpoint, os.W_OK):
            continue
        with contextlib.suppress(OSError):
            with open(os.path.join(mountpoint, "cgroup.controllers"), encoding="ascii") as f:
                if "pids" in f.read().split():
                    return mountpoint
    return None


def _enable_v2(path):
    """cgroup v2: children of `path` get the pids controller (no-op on v1)."""
    control = os.path.join(path, "cgroup.subtree_control")
    if os.path.exists(control):
        with open(control, "w", encoding="ascii") as f:
            f.write("+pids")


def _clean_stale(parent):
    for name in os.listdir(parent):
        pid = name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):  # not empty (still dying): next time
                os.rmdir(os.path.join(parent, name))
        except PermissionError:
            pass


class ProcessLimit:
    """A pids cgroup allowing at most `limit` processes (and threads)."""

    def __init__(self, limit, hierarchy=None):
        hierarchy = hierarchy or find_hierarchy()
        if hierarchy is None:
            raise ProcessLimitError("no writable cgroup hierarchy with the pids controller "
                                    "(/sys/fs/cgroup/pids or cgroup v2 with pids) to limit "
                                    "the build root's processes; pass --max-processes 0 to "
                                    "build without a limit")
        self.limit = limit
        parent = os.path.join(hierarchy, _PARENT)
        try:
            _enable_v2(hierarchy)
            os.makedirs(parent, exist_ok=True)
            _enable_v2(parent)
            _clean_stale(parent)
            self.path = os.path.join(parent, f"{os.getpid()}-{secrets.token_hex(6)}")
            os.mkdir(self.path)
        except OSError as e:
            raise ProcessLimitError(f"cannot create a pids cgroup under {parent}: "
                                    f"{e.strerror}") from e
        try:
            with open(os.path.join(self.path, "pids.max"), "w", encoding="ascii") as f:
                f.write(str(limit))
        except OSError as e:
            self.close()
            raise ProcessLimitError(f"cannot set pids.max in {self.path}: {e.strerror}") from e

    def wrap(self, argv):
        """`argv`, started inside the cgroup."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"',
                os.path.join(self.path, "cgroup.procs"), *argv]

    def hit(self):
        """Whether a fork was refused because of the limit."""
        try:
            with open(os.path.join(self.path, "pids.events"), encoding="ascii") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "max":
                        return int(value) > 0
        except (OSError, ValueError):
            pass
        return False

    def kill(self):
        """SIGKILL every process in the cgroup (those forked meanwhile too)."""
        # cgroup v2 kills atomically; v1 needs rounds until nothing is left.
        with contextlib.suppress(OSError):
            with open(os.path.join(self.path, "cgroup.kill"), "w", encoding="ascii") as f:
                f.write("1")
            return
        for _ in range(1000):
            try:
                with open(os.path.join(self.path, "cgroup.procs"), encoding="ascii") as f:
                    pids = [int(line) for line in f if line.strip()]
            except (OSError, ValueError):
                return
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def close(self, timeout=10):
        """Remove the cgroup; waits (up to `timeout` s) for the last processes to be reaped."""
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return  # removed by _clean_stale of a later run
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
