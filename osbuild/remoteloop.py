"""The `remoteloop` API: loop devices for programs inside the build root.

A container cannot attach loop devices itself. The assembler sends the host
an open image file and an open directory (its `/dev`) together with an
offset and a size limit; the host attaches a loop device to the image,
creates the device node `loopN` in that directory and answers the name.
When the client is done it asks the host to release the device: the host
flushes it, detaches it and removes the node it created. Whatever is still
attached when the server stops is released then.

Requests and replies (osbuild.util.jsoncomm messages):

    {"method": "attach", "fd": 0, "dir_fd": 1, "offset": N, "sizelimit": N}
        fds [image, directory]  ->  {"devname": "loop3"}
    {"method": "release", "devname": "loop3"}  ->  {}

Any failure is answered as {"error": MESSAGE}.
"""

import contextlib
import os
import threading

from osbuild import api, loop
from osbuild.util import jsoncomm


class LoopServer(api.BaseAPI):
    """Host side: attaches loop devices on behalf of the container."""

    endpoint = "remoteloop"

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._devices = {}   # devname -> (Loop, dir fd or None)

    def _attach(self, msg, fds):
        image_fd = fds[msg["fd"]]
        dir_fd = fds[msg["dir_fd"]]
        offset = msg.get("offset") or 0
        sizelimit = msg.get("sizelimit") or 0
        if not isinstance(offset, int) or not isinstance(sizelimit, int):
            raise loop.LoopError("offset and sizelimit must be integers")
        with loop.LoopControl() as ctl:
            lo = ctl.attach(image_fd, offset=offset, sizelimit=sizelimit, autoclear=True)
        try:
            created = lo.mknod(dir_fd)
        except (OSError, loop.LoopError):
            _detach(lo)
            raise
        node_dir = os.dup(dir_fd) if created else None
        with self._lock:
            self._devices[lo.devname] = (lo, node_dir)
        return {"devname": lo.devname}

    def _release(self, devname):
        with self._lock:
            entry = self._devices.pop(devname, None)
        if entry is None:
            raise loop.LoopError(f"{devname!r} is not a device of this server")
        _release_entry(entry)
        return {}

    def _message(self, msg, fds, sock):
        try:
            method = msg.get("method") if isinstance(msg, dict) else None
            if method == "attach":
                reply = self._attach(msg, fds)
            elif method == "release":
                reply = self._release(msg.get("devname"))
            else:
                reply = {"error": f"unknown request: {msg!r}"}
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

    def __init__(self, path=os.path.join(api.API_DIR, "remoteloop")):
        self.path = path

    @contextlib.contextmanager
    def device(self, fd, offset=None, sizelimit=None, dev_dir="/dev"):
        """Attach the open image `fd`; yields the device node's path.

        The node is created in `dev_dir`. On leaving the context the host
        flushes and detaches the device and removes the node.
        """
        try:
            sock = jsoncomm.Socket.new_client(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise loop.LoopError(f"no remoteloop API at {self.path} "
                                 "(assemblers run through osbuild)") from None
        with sock:
            dir_fd = os.open(dev_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                req = {"method": "attach", "fd": 0, "dir_fd": 1,
                       "offset": offset or 0, "sizelimit": sizelimit or 0}
                reply, rfds = sock.call(req, [fd, dir_fd])
            finally:
                os.close(dir_fd)
            for extra in rfds:
                os.close(extra)
            if "error" in reply:
                raise loop.LoopError(reply["error"])
            devname = reply["devname"]
            try:
                yield os.path.join(dev_dir, devname)
            finally:
                reply, rfds = sock.call({"method": "release", "devname": devname})
                for extra in rfds:
                    os.close(extra)
                if "error" in reply:
                    raise loop.LoopError(reply["error"])
