"""Host side of the APIs a containerised program talks to, and the client calls.

Every API is a Unix SOCK_SEQPACKET socket in the build root's API directory
(`/run/osbuild/api/<endpoint>` inside the container). The socket is bound
before the container starts, so a program never races its server.
"""

import json
import os
import re
import select
import threading
import time

from osbuild.layout import CONTAINER
from osbuild.util import jsoncomm


# Connections one server serves at a time; more are answered with an error
# and closed. A program needs one or two.
MAX_CONNECTIONS = 32
# How much of a bad request an error reply quotes.
_QUOTE = 200


def quote(value):
    """A short printable form of a client's value for an error message."""
    text = repr(value)
    return text if len(text) <= _QUOTE else text[:_QUOTE] + "..."


class BaseAPI:
    """A threaded server for one API endpoint.

    Subclasses set `endpoint` and implement `_message(msg, fds, sock)`, which
    handles one request and answers it with `sock.send(...)`. The request's
    file descriptors are closed after `_message` returns.

    Clients are not trusted: at most MAX_CONNECTIONS are served at once, a
    message jsoncomm refuses is answered with a one-line {"error": ...},
    and so is any failure of a handler; nothing reaches the host's stderr.
    """

    endpoint = None

    def __init__(self):
        self._server = None
        self._thread = None
        self._wake_r = self._wake_w = None
        self._workers = {}      # thread -> its connection
        self._workers_lock = threading.Lock()
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

        Connections still open are shut down, so a client that never hangs
        up does not hold the host. Also safe after a `start()` that was
        interrupted half-way (Ctrl-C).
        """
        thread, self._thread = self._thread, None
        if thread is not None and thread.ident is not None:
            os.write(self._wake_w, b"x")
            thread.join()
        with self._workers_lock:
            workers = list(self._workers.items())
        for worker, conn in workers:
            conn.shutdown()
            worker.join(timeout=10)
        with self._workers_lock:
            self._workers.clear()
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

    @property
    def connections(self):
        """How many connections are being served now."""
        with self._workers_lock:
            return len(self._workers)

    def _serve(self):
        while True:
            ready, _, _ = select.select([self._server.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                conn = self._server.accept()
            except OSError:         # the client went away, or no fds left (EMFILE)
                time.sleep(0.01)
                continue
            with self._workers_lock:
                busy = len(self._workers) >= MAX_CONNECTIONS
                if not busy:
                    worker = threading.Thread(target=self._serve_connection, args=(conn,),
                                              name=f"api-{self.endpoint}-conn", daemon=True)
                    self._workers[worker] = conn
            if busy:
                with conn:
                    _send_quietly(conn, {"error": f"{self.endpoint}: too many connections "
                                                  f"(at most {MAX_CONNECTIONS})"})
                continue
            worker.start()

    def _serve_connection(self, conn):
        try:
            with conn:
                self._converse(conn)
        finally:
            with self._workers_lock:
                self._workers.pop(threading.current_thread(), None)

    def _converse(self, conn):
        while True:
            try:
                msg, fds = conn.recv()
            except jsoncomm.ProtocolError as e:
                if not _send_quietly(conn, {"error": f"{self.endpoint}: {e}"}):
                    return
                continue
            except OSError:
                return
            if msg is None:
                return
            try:
                self._message(msg, fds, conn)
            except OSError:
                return
            except Exception as e:  # pylint: disable=broad-exception-caught
                # a handler's bug must not print a traceback on the host nor kill the build
                if not _send_quietly(conn, {"error": f"{self.endpoint}: cannot handle "
                                                     f"{quote(msg)}: {type(e).__name__}: {e}"}):
                    return
            finally:
                for fd in fds:
                    os.close(fd)

    def _message(self, msg, fds, sock):
        raise NotImplementedError


def _send_quietly(conn, reply):
    """Send `reply`; False when the client is gone."""
    try:
        conn.send(reply)
        return True
    except OSError:
        return False


# Phases one program run may report, and how a phase's name looks.
MAX_PHASES = 32
PHASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


class OsbuildAPI(BaseAPI):
    """The `osbuild` endpoint: hands a program its arguments and log fds.

    `setup-stdio` answers with three descriptors: a memfd holding the JSON
    arguments (for stdin) and the write end of the log pipe twice (stdout,
    stderr). `{"method": "phase", "name": NAME}` reports that the program
    entered a phase (`phase()` is the client call): `on_phase(NAME)` is
    called for at most MAX_PHASES names matching PHASE_RE; others are refused.
    """

    endpoint = "osbuild"

    def __init__(self, args, output_fd, on_phase=None):
        super().__init__()
        self.args = args
        self.output_fd = output_fd
        self.on_phase = on_phase
        self._phases = 0
        self._lock = threading.Lock()

    def _phase(self, msg, sock):
        name = msg.get("name")
        if set(msg) != {"method", "name"} or not isinstance(name, str) \
                or not PHASE_RE.fullmatch(name):
            sock.send({"error": "phase: expected {\"method\": \"phase\", \"name\": NAME} "
                                f"with a NAME matching {PHASE_RE.pattern}"})
            return
        with self._lock:
            self._phases += 1
            allowed = self._phases <= MAX_PHASES
        if not allowed:
            sock.send({"error": f"phase: at most {MAX_PHASES} phases per program"})
            return
        if self.on_phase is not None:
            self.on_phase(name)
        sock.send({})

    def _message(self, msg, fds, sock):
        if isinstance(msg, dict) and msg.get("method") == "phase":
            self._phase(msg, sock)
            return
        if not isinstance(msg, dict) or msg.get("method") != "setup-stdio":
            sock.send({"error": f"unknown request: {quote(msg)}"})
            return
        memfd = jsoncomm.sealed_memfd(json.dumps(self.args).encode("utf-8"), "osbuild-arguments")
        try:
            sock.send({"type": "fds"}, [memfd, self.output_fd, self.output_fd])
        finally:
            os.close(memfd)


def setup_stdio(path=CONTAINER.socket("osbuild")):
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


def phase(name, path=CONTAINER.socket("osbuild")):
    """Client call: tell the host (its monitor) that this program enters phase `name`.

    Best effort: a host that cannot be told (too many phases, no API) does
    not fail the program.
    """
    try:
        with jsoncomm.Socket.new_client(path) as sock:
            _, fds = sock.call({"method": "phase", "name": name})
            for fd in fds:
                os.close(fd)
    except OSError:
        pass
