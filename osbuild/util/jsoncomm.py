"""JSON messages with file descriptors over Unix sequenced-packet sockets.

Each message is one packet holding a JSON text. File descriptors travel
alongside as SCM_RIGHTS. A message whose JSON text does not fit in one
packet is written to a sealed memfd that is sent instead, so messages of
any size work.
"""

import json
import os
import socket

# Payloads above this size go through a memfd instead of the packet itself.
INLINE_LIMIT = 32 * 1024
RECV_BUFSIZE = INLINE_LIMIT + 4096
MAX_FDS = 64
_MEMFD_KEY = "__osbuild_memfd__"


class ProtocolError(Exception):
    """The peer sent something that is not a valid message."""


def _read_fd(fd):
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class Socket:
    """A connected (or listening) SOCK_SEQPACKET Unix socket speaking JSON."""

    def __init__(self, sock):
        self.sock = sock

    @classmethod
    def new_server(cls, path, backlog=16):
        """Bind and listen on `path` (an existing file there is replaced)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    def new_client(cls, path):
        """Connect to the server listening on `path`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    def new_pair(cls):
        """A connected pair of sockets."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        return cls(a), cls(b)

    def accept(self):
        """Accept one connection; returns a Socket."""
        conn, _ = self.sock.accept()
        return Socket(conn)

    def fileno(self):
        """The underlying file descriptor."""
        return self.sock.fileno()

    def close(self):
        """Close the socket (idempotent)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, obj, fds=()):
        """Send `obj` as JSON, with the file descriptors `fds`."""
        data = json.dumps(obj).encode("utf-8")
        fds = list(fds)
        memfd = None
        try:
            if len(data) > INLINE_LIMIT:
                memfd = os.memfd_create("osbuild-message", os.MFD_CLOEXEC)
                view = memoryview(data)
                while view:
                    view = view[os.write(memfd, view):]
                data = json.dumps({_MEMFD_KEY: True}).encode("utf-8")
                fds.append(memfd)
            socket.send_fds(self.sock, [data], fds)
        finally:
            if memfd is not None:
                os.close(memfd)

    def recv(self):
        """Receive one message: returns (obj, fds), or (None, []) at end of stream.

        The caller owns the returned file descriptors and must close them.
        """
        data, fds, flags, _ = socket.recv_fds(self.sock, RECV_BUFSIZE, MAX_FDS,
                                              socket.MSG_CMSG_CLOEXEC)
        if not data and not fds:
            return None, []
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ProtocolError("message truncated")
            obj = json.loads(data)
            if isinstance(obj, dict) and obj.get(_MEMFD_KEY):
                if not fds:
                    raise ProtocolError("memfd message without a descriptor")
                memfd = fds.pop()
                try:
                    obj = json.loads(_read_fd(memfd))
                finally:
                    os.close(memfd)
        except (ValueError, ProtocolError) as e:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"invalid message: {e}") from None
        return obj, fds

    def call(self, obj, fds=()):
        """Send a request and wait for its reply; returns (reply, fds)."""
        self.send(obj, fds)
        reply, rfds = self.recv()
        if reply is None:
            raise ProtocolError("connection closed before the reply")
        return reply, rfds
