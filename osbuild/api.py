"""Host side of the APIs a containerised program talks to, and the client calls.

Every API is a Unix SOCK_SEQPACKET socket in the build root's API directory
(`/run/osbuild/api/<endpoint>` inside the container). The socket is bound
before the container starts, so a program never races its server.
"""

import os
import select
import threading

from osbuild.util import jsoncomm

API_DIR = "/run/osbuild/api"


class BaseAPI:
    """A threaded server for one API endpoint.

    Subclasses set `endpoint` and implement `_message(msg, fds, sock)`, which
    handles one request and answers it with `sock.send(...)`. The request's
    file descriptors are closed after `_message` returns.
    """

    endpoint = None

    def __init__(self):
        self._server = None
        self._thread = None
        self._wake_r = self._wake_w = None
        self._workers = []
        self.path = None

    def start(self, api_dir):
        """Bind the endpoint socket inside `api_dir` and start serving."""
        self.path = os.path.join(api_dir, self.endpoint)
        self._server = jsoncomm.Socket.new_server(self.path)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name=f"api-{self.endpoint}",
                                        daemon=True)
        self._thread.start()
        return self.path

    def stop(self):
        """Stop serving and wait for the handlers to finish.

        Also safe after a `start()` that was interrupted half-way (Ctrl-C).
        """
        thread, self._thread = self._thread, None
        if thread is not None and thread.ident is not None:
            os.write(self._wake_w, b"x")
            thread.join()
        for worker in self._workers:
            worker.join(timeout=10)
        self._workers = []
        if self._server is not None:
            self._server.close()
            self._server = None
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _serve(self):
        while True:
            ready, _, _ = select.select([self._server.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            conn = self._server.accept()
            worker = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True)
            self._workers.append(worker)
            worker.start()

    def _serve_connection(self, conn):
        with conn:
            while True:
                try:
                    msg, fds = conn.recv()
                except (jsoncomm.ProtocolError, OSError):
                    return
                if msg is None:
                    return
                try:
                    self._message(msg, fds, conn)
                except OSError:
                    return
                finally:
                    for fd in fds:
                        os.close(fd)

    def _message(self, msg, fds, sock):
        raise NotImplementedError


class OsbuildAPI(BaseAPI):
    """The `osbuild` endpoint: hands a program its arguments and log fds.

    `setup-stdio` answers with three descriptors: a memfd holding the JSON
    arguments (for stdin) and the write end of the log pipe twice (stdout,
    stderr).
    """

    endpoint = "osbuild"

    def __init__(self, args, output_fd):
        super().__init__()
        self.args = args
        self.output_fd = output_fd

    def _message(self, msg, fds, sock):
        if not isinstance(msg, dict) or msg.get("method") != "setup-stdio":
            sock.send({"error": f"unknown request: {msg!r}"})
            return
        memfd = os.memfd_create("osbuild-arguments", os.MFD_CLOEXEC)
        try:
            data = jsoncomm.json.dumps(self.args).encode("utf-8")
            view = memoryview(data)
            while view:
                view = view[os.write(memfd, view):]
            os.lseek(memfd, 0, os.SEEK_SET)
            sock.send({"type": "fds"}, [memfd, self.output_fd, self.output_fd])
        finally:
            os.close(memfd)


def setup_stdio(path=os.path.join(API_DIR, "osbuild")):
    """Client call: replace this process' stdin/stdout/stderr with the host's."""
    with jsoncomm.Socket.new_client(path) as sock:
        reply, fds = sock.call({"method": "setup-stdio"})
        try:
            if reply.get("type") != "fds" or len(fds) != 3:
                raise RuntimeError(f"setup-stdio failed: {reply!r}")
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
        finally:
            for fd in fds:
                os.close(fd)
