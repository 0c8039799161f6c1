"""The `remoteloop` API: loop devices and image filesystems for the build root.

A container (an unprivileged user namespace) can neither attach loop devices
nor mount filesystems. The assembler sends the host an open image file with
an offset and a size limit; the host attaches a loop device to it and creates
its node `loopN` in the build root's device directory (`/run/osbuild/dev`
inside), answering the node's path. The assembler makes filesystems on such
devices with its own tools, then asks the host to populate them: the host
mounts them (in a private mount namespace of a helper process, see
osbuild/executables/populate.py) and copies directories of the container into them
with its own tar. Only paths below the directories the server was given
(the tree and the build root's /usr, both read-only to the container) can be
copied, and they are resolved without following symbolic links. On
release the host flushes and detaches the device and removes its node;
whatever is still attached when the server stops is released then.

The assembler is not trusted (its tools come from a manifest-made build
tree). An image must be a regular file below the server's output directory,
found again there without following links, and open read-write; offset
and size limit are non-negative multiples of 512 within the file; at most
MAX_DEVICES (16) devices are attached at once per server, i.e. per
assembler run. No failure leaves a device attached.

Requests and replies (osbuild.util.jsoncomm messages):

    {"method": "attach", "fd": 0, "offset": N, "sizelimit": N}
        fds [image]  ->  {"devname": "loop3", "path": "/run/osbuild/dev/loop3"}
    {"method": "populate",
     "mounts": [{"devname": "loop3", "fstype": "ext4", "mountpoint": "/"}, ...],
     "copies": [{"path": "/run/osbuild/tree", "exclude": ["/boot/efi"]},
                {"path": "/usr/lib/grub/i386-pc", "dest": "/boot/grub/i386-pc",
                 "include": ["*.mod", "*.lst"]}, ...]}  ->  {}

A copy puts the directory's contents below `dest` (default "/") of the
mounted filesystems, leaving out the `exclude` paths; with `include` only
the directory's entries whose names match one of the patterns.
    {"method": "release", "devname": "loop3"}  ->  {}

Any failure is answered as {"error": MESSAGE}.
"""

import contextlib
import fcntl
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import threading

from osbuild import api, loop
from osbuild.layout import CONTAINER
from osbuild.util import jsoncomm
from osbuild.util.lifetime import contained

POPULATE_FSTYPES = ("ext4", "xfs")
# Loop devices one server (one assembler run) may hold at once.
MAX_DEVICES = 16
# Directories one populate request may copy.
MAX_COPIES = 64
# Offsets and sizes are in whole sectors.
SECTOR = 512
# Entries of the output directory searched for an image before giving up.
MAX_OUTPUT_ENTRIES = 10000
_MOUNTPOINT_RE = re.compile(r"^/([^/\0]+(/[^/\0]+)*)?$")


class LoopServer(api.BaseAPI):
    """Host side: attaches loop devices and fills filesystems for the container.

    `dev_dir` is the host directory that appears as `node_dir` in the
    container; `paths` are (container directory, host directory) pairs that
    `populate` may copy from; `work_dir` holds the helper's mount points.
    """

    endpoint = "remoteloop"

    def __init__(self, dev_dir, node_dir=None, *, output_dir, paths=(), work_dir=None):
        super().__init__()
        self.dev_dir = dev_dir
        self.node_dir = node_dir or dev_dir
        self.output_dir = output_dir
        self.paths = [(os.path.normpath(c), h) for c, h in paths]
        self.work_dir = work_dir
        self._lock = threading.Lock()
        self._devices = {}   # devname -> (Loop, dir fd or None)
        self._attaching = 0  # attaches in progress, counted against MAX_DEVICES

    def _image(self, fds, msg):
        """The request's image fd and its geometry, checked; raises LoopError."""
        index = msg.get("fd")
        # pylint: disable-next=unidiomatic-typecheck
        if type(index) is not int or not 0 <= index < len(fds):
            raise loop.LoopError("'fd' must index the request's descriptors, "
                                 f"not {api.quote(index)}")
        fd = fds[index]
        st = image_stat(fd, self.output_dir)
        offset, sizelimit = msg.get("offset", 0), msg.get("sizelimit", 0)
        for name, value in (("offset", offset), ("sizelimit", sizelimit)):
            # pylint: disable-next=unidiomatic-typecheck
            if type(value) is not int or value < 0 or value % SECTOR:
                raise loop.LoopError(f"{name} must be a non-negative multiple of {SECTOR}, "
                                     f"not {api.quote(value)}")
        if offset >= st.st_size or offset + sizelimit > st.st_size:
            raise loop.LoopError(f"offset {offset} and sizelimit {sizelimit} do not lie within "
                                 f"the image ({st.st_size} bytes)")
        return fd, offset, sizelimit

    def _attach(self, msg, fds):
        image_fd, offset, sizelimit = self._image(fds, msg)
        with self._lock:
            if len(self._devices) + self._attaching >= MAX_DEVICES:
                raise loop.LoopError(f"at most {MAX_DEVICES} loop devices may be attached "
                                     "at once")
            self._attaching += 1
        try:
            return self._attach_device(image_fd, offset, sizelimit)
        finally:
            with self._lock:
                self._attaching -= 1

    def _attach_device(self, image_fd, offset, sizelimit):
        with loop.LoopControl() as ctl:
            lo = ctl.attach(image_fd, offset=offset, sizelimit=sizelimit, autoclear=True)
        dir_fd = None
        try:
            dir_fd = os.open(self.dev_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if not lo.mknod(dir_fd):
                os.close(dir_fd)
                dir_fd = None
        except BaseException:
            if dir_fd is not None:
                os.close(dir_fd)
            _detach(lo)
            raise
        with self._lock:
            self._devices[lo.devname] = (lo, dir_fd)
        return {"devname": lo.devname, "path": os.path.join(self.node_dir, lo.devname)}

    def _release(self, devname):
        with self._lock:
            entry = self._devices.pop(devname, None)
        if entry is None:
            raise loop.LoopError(f"{devname!r} is not a device of this server")
        _release_entry(entry)
        return {}

    def _open_source(self, path):
        """An O_PATH fd of the container directory `path`, resolved without following links."""
        if not isinstance(path, str) or not path.startswith("/"):
            raise loop.LoopError(f"populate: {path!r} is not an absolute path")
        parts = path.split("/")
        if any(p in (".", "..") for p in parts):
            raise loop.LoopError(f"populate: {path!r} is not a normalized path")
        path = os.path.normpath(path)
        for container, host in self.paths:
            if path == container or path.startswith(container.rstrip("/") + "/"):
                rel = os.path.relpath(path, container)
                break
        else:
            raise loop.LoopError(f"populate: {path} is not below a directory it may copy")
        fd = os.open(host, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in ([] if rel == "." else rel.split("/")):
                nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError as e:
            os.close(fd)
            raise loop.LoopError(f"populate: {path} is not a directory ({e.strerror})") from None
        return fd

    def _populate(self, msg):
        mounts, copies = msg.get("mounts"), msg.get("copies")
        if not isinstance(mounts, list) or not mounts or not isinstance(copies, list):
            raise loop.LoopError("populate needs a list of mounts and a list of copies")
        if len(mounts) > MAX_DEVICES or len(copies) > MAX_COPIES:
            raise loop.LoopError(f"populate takes at most {MAX_DEVICES} mounts and "
                                 f"{MAX_COPIES} copies")
        spec_mounts = []
        with self._lock:
            devices = dict(self._devices)
        for m in mounts:
            if not isinstance(m, dict) or m.get("devname") not in devices:
                raise loop.LoopError(f"populate: {m!r} does not name a device of this server")
            if m.get("fstype") not in POPULATE_FSTYPES:
                raise loop.LoopError(f"populate: cannot mount filesystem type {m.get('fstype')!r}")
            if not isinstance(m.get("mountpoint"), str) or \
                    not _MOUNTPOINT_RE.match(m["mountpoint"]) or \
                    ".." in m["mountpoint"].split("/"):
                raise loop.LoopError(f"populate: bad mountpoint {m.get('mountpoint')!r}")
            lo = devices[m["devname"]][0]
            spec_mounts.append([os.path.join("/dev", lo.devname), m["fstype"], m["mountpoint"]])
        if spec_mounts[0][2] != "/":
            raise loop.LoopError("populate: the first mount must be '/'")
        fds = []
        try:
            spec_copies = []
            for c in copies:
                if not isinstance(c, dict):
                    raise loop.LoopError(f"populate: bad copy {c!r}")
                exclude = c.get("exclude") or []
                if not isinstance(exclude, list) or \
                        not all(isinstance(e, str) and _MOUNTPOINT_RE.match(e) for e in exclude):
                    raise loop.LoopError(f"populate: bad exclude list {exclude!r}")
                dest = c.get("dest", "/")
                if not isinstance(dest, str) or not _MOUNTPOINT_RE.match(dest) or \
                        ".." in dest.split("/"):
                    raise loop.LoopError(f"populate: bad destination {dest!r}")
                include = c.get("include")
                if include is not None and (not isinstance(include, list) or not all(
                        isinstance(i, str) and i and "/" not in i for i in include)):
                    raise loop.LoopError(f"populate: bad include list {include!r}")
                fds.append(self._open_source(c.get("path")))
                spec_copies.append([fds[-1], exclude, dest, include])
            with tempfile.TemporaryDirectory(prefix="populate-", dir=self.work_dir) as target:
                spec = {"target": target, "mounts": spec_mounts, "copies": spec_copies}
                res = _run_helper(spec, fds)
            if res.returncode != 0:
                tail = res.stderr.decode("utf-8", errors="replace").strip().splitlines()[-5:]
                raise loop.LoopError("populate: " + "; ".join(tail or ["the helper failed"]))
        finally:
            for fd in fds:
                os.close(fd)
        return {}

    def _message(self, msg, fds, sock):
        try:
            method = msg.get("method") if isinstance(msg, dict) else None
            if method == "attach":
                reply = self._attach(msg, fds)
            elif method == "populate":
                reply = self._populate(msg)
            elif method == "release":
                reply = self._release(msg.get("devname"))
            else:
                reply = {"error": f"unknown request: {api.quote(msg)}"}
        except (OSError, loop.LoopError, KeyError, IndexError, TypeError) as e:
            reply = {"error": f"remoteloop: {e}"}
        sock.send(reply)

    def stop(self):
        """Stop serving, then flush and detach every device still attached."""
        super().stop()
        with self._lock:
            entries = list(self._devices.values())
            self._devices.clear()
        for entry in entries:
            _release_entry(entry)

    @property
    def devices(self):
        """Names of the devices currently attached through this server."""
        with self._lock:
            return sorted(self._devices)


def image_stat(fd, output_dir):
    """fstat of `fd` if it is a regular file below `output_dir` open for reading and
    writing; raises LoopError otherwise.

    The file is found again from `output_dir` without following symbolic
    links (same device and inode), so a client cannot have the host attach
    a file it merely opened elsewhere (a host file, a device, a memfd).
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise loop.LoopError("the image is not a regular file")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_PATH) != os.O_RDWR:
        raise loop.LoopError("the image is not open for reading and writing")
    seen = 0
    for _, _, files, dir_fd in os.fwalk(output_dir, follow_symlinks=False):
        for name in files:
            seen += 1
            if seen > MAX_OUTPUT_ENTRIES:
                raise loop.LoopError(f"the output directory has more than {MAX_OUTPUT_ENTRIES} "
                                     "files")
            with contextlib.suppress(OSError):
                entry = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (entry.st_dev, entry.st_ino) == (st.st_dev, st.st_ino) and \
                        stat.S_ISREG(entry.st_mode):
                    return st
    raise loop.LoopError("the image is not a file in the output directory")


def _run_helper(spec, fds):
    """Run osbuild.executables.populate in private mount and PID namespaces that die with us.

    Killing osbuild kills the helper (and with it its tar processes, being
    PID 1 of its namespace), and the mounts vanish with the namespace.
    """
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "PYTHONPATH": package_parent}
    argv = contained([sys.executable, "-S", "-m", "osbuild.executables.populate", json.dumps(spec)])
    return subprocess.run(argv, env=env, pass_fds=fds, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)


def _detach(lo):
    """Flush, detach and close a loop device; best effort."""
    try:
        with contextlib.suppress(OSError):
            lo.flush()
        with contextlib.suppress(OSError):
            lo.clear_fd()
    finally:
        lo.close()


def _release_entry(entry):
    lo, node_dir = entry
    try:
        _detach(lo)
    finally:
        if node_dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(lo.devname, dir_fd=node_dir)
            os.close(node_dir)


class LoopClient:  # pylint: disable=too-few-public-methods
    """Container side: asks the host for loop devices over `path`."""

    def __init__(self, path=CONTAINER.socket("remoteloop")):
        self.path = path

    def _connect(self):
        try:
            return jsoncomm.Socket.new_client(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise loop.LoopError(f"no remoteloop API at {self.path} "
                                 "(assemblers run through osbuild)") from None

    @contextlib.contextmanager
    def device(self, fd, offset=None, sizelimit=None):
        """Attach the open image `fd`; yields the device node's path.

        On leaving the context the host flushes and detaches the device and
        removes the node.
        """
        with self._connect() as sock:
            req = {"method": "attach", "fd": 0, "offset": offset or 0,
                   "sizelimit": sizelimit or 0}
            reply = _call(sock, req, [fd])
            devname = reply["devname"]
            try:
                yield reply["path"]
            finally:
                _call(sock, {"method": "release", "devname": devname})

    def populate(self, mounts, copies):
        """Have the host mount and fill filesystems on attached devices.

        `mounts` are (device path, fstype, mountpoint) with "/" first;
        `copies` are dicts with "path" and optionally "exclude", "dest",
        "include" (see the module's description).
        """
        req = {"method": "populate",
               "mounts": [{"devname": os.path.basename(dev), "fstype": fstype, "mountpoint": mnt}
                          for dev, fstype, mnt in mounts],
               "copies": list(copies)}
        with self._connect() as sock:
            _call(sock, req)


def _call(sock, req, fds=None):
    reply, rfds = sock.call(req, fds or [])
    for extra in rfds:
        os.close(extra)
    if "error" in reply:
        raise loop.LoopError(reply["error"])
    return reply
