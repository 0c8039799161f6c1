"""JSON messages with file descriptors over Unix sequenced-packet sockets.

Each message is one packet holding a JSON text. File descriptors travel
alongside as SCM_RIGHTS. A message whose JSON text does not fit in one
packet is written to a memfd, sealed against any change, that is sent
instead, so messages of any size work.

The peer is not trusted: a received message is refused (ProtocolError)
when its packet is truncated, it carries more than MAX_FDS descriptors,
its body descriptor is not a sealed memfd or is larger than the socket's
`max_size`, or its JSON nests more than nesting.MAX_DEPTH levels (checked
before parsing, so the parser never recurses that deep). Servers accept
requests of at most MAX_REQUEST bytes; clients accept replies of at most
MAX_REPLY bytes.
"""

import fcntl
import json
import os
import socket
import stat

from osbuild.util import nesting

# Payloads above this size go through a memfd instead of the packet itself.
INLINE_LIMIT = 32 * 1024
RECV_BUFSIZE = INLINE_LIMIT + 4096
# Descriptors one message may carry (including a memfd body).
MAX_FDS = 8
# Largest message a server accepts from a client, and a client from the host.
MAX_REQUEST = 4 * 1024 * 1024
MAX_REPLY = 256 * 1024 * 1024
_MEMFD_KEY = "__osbuild_memfd__"
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK


class ProtocolError(Exception):
    """The peer sent something that is not a valid message."""


def sealed_memfd(data, name="osbuild-message"):
    """A new memfd holding `data`, positioned at 0 and sealed against any change.

    The caller owns (and must close) the returned descriptor.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_sealed(fd, max_size):
    """The contents of the sealed memfd `fd`; ProtocolError for anything else.

    Sealing guarantees the size cannot change while it is read, so a peer
    cannot hand over an endless file (a pipe, /dev/zero) or grow it later.
    """
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:     # EINVAL: a file that cannot carry seals, so no memfd
        seals, st = 0, None
    if st is None or not stat.S_ISREG(st.st_mode) or seals & _SEALS != _SEALS:
        raise ProtocolError("the message body is not a sealed memfd")
    if st.st_size > max_size:
        raise ProtocolError(f"the message body has {st.st_size} bytes "
                            f"(at most {max_size} are accepted)")
    chunks, pos = [], 0
    while pos < st.st_size:
        data = os.pread(fd, min(1 << 20, st.st_size - pos), pos)
        if not data:
            break
        chunks.append(data)
        pos += len(data)
    return b"".join(chunks)


def decode(data, max_depth=nesting.MAX_DEPTH):
    """Parse one JSON message text; ProtocolError when it is too deep or invalid."""
    if nesting.text_depth(data, stop=max_depth) > max_depth:
        raise ProtocolError(f"nested too deeply (more than {max_depth} levels)")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"not JSON ({e})") from None


class Socket:
    """A connected (or listening) SOCK_SEQPACKET Unix socket speaking JSON.

    `max_size` bounds the messages this end accepts: MAX_REPLY for clients
    (the host's replies), MAX_REQUEST for connections a server accepted.
    """

    def __init__(self, sock, max_size=MAX_REPLY):
        self.sock = sock
        self.max_size = max_size

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
        return cls(sock, MAX_REQUEST)

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
        """Accept one connection; returns a Socket that accepts requests (MAX_REQUEST)."""
        conn, _ = self.sock.accept()
        return Socket(conn, MAX_REQUEST)

    def fileno(self):
        """The underlying file descriptor."""
        return self.sock.fileno()

    def shutdown(self):
        """Wake anyone blocked receiving on this socket (end of stream for them)."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
                memfd = sealed_memfd(data)
                data = json.dumps({_MEMFD_KEY: True}).encode("utf-8")
                fds.append(memfd)
            socket.send_fds(self.sock, [data], fds)
        finally:
            if memfd is not None:
                os.close(memfd)

    def recv(self):
        """Receive one message: returns (obj, fds), or (None, []) at end of stream.

        The caller owns the returned file descriptors and must close them.
        A bad message raises ProtocolError (its descriptors closed); the
        connection stays usable for the next one.
        """
        data, fds, flags, _ = socket.recv_fds(self.sock, RECV_BUFSIZE, MAX_FDS,
                                              socket.MSG_CMSG_CLOEXEC)
        if not data and not fds and not flags:
            return None, []
        try:
            if flags & socket.MSG_TRUNC:
                raise ProtocolError(f"packet larger than {RECV_BUFSIZE} bytes")
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} file descriptors")
            obj = decode(data)
            if isinstance(obj, dict) and obj.get(_MEMFD_KEY):
                if not fds:
                    raise ProtocolError("memfd message without a descriptor")
                memfd = fds.pop()
                try:
                    obj = decode(read_sealed(memfd, self.max_size))
                finally:
                    os.close(memfd)
        except ProtocolError as e:
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
