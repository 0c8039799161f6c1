"""The `sources` API: stages ask for content by checksum, the host fetches it.

A stage sends `{"source": NAME, "checksums": [...]}` on the `sources` socket.
`SourcesServer` (host side) runs the source program `LIBDIR/sources/NAME` on
the host with `{"options", "checksums", "cache", "output", "secrets"}` as JSON
on its stdin. The program makes every checksum available as
`OUTPUT/NAME/<checksum>` and prints one JSON object: `{}` on success or
`{"error": MESSAGE}`. The server answers the stage with `{}` or
`{"error": MESSAGE}`; the stage then reads the content from
`/run/osbuild/sources/NAME/`, where the output directory is mounted
read-only. `get()` is the one-call client for stages.

Secrets. Source programs run on the host and get the parsed `--secrets`
(the files source fetches with client certificates). A source never writes
secret material into its output; instead its reply may name, per checksum,
the secret that goes with it: `{"secrets": {CHECKSUM: SECRET_NAME}}`. A
stage that asks for them (`"secrets": true` in its request, see
`get_secrets()`) receives each named secret's `ssl_client_cert`,
`ssl_client_key` and `ssl_ca_cert` as sealed memfds, and only if the
server was made with `stage_secrets=True`, which the pipeline sets only for
programs that declare `STAGE_SECRETS = True` (dnf, yum).
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

from osbuild import api, credentials
from osbuild.layout import CONTAINER
from osbuild.programs.checksum import checksum_error
from osbuild.util import jsoncomm
from osbuild.util.lifetime import contained

SOURCES_DIR = CONTAINER.sources
API_PATH = CONTAINER.socket("sources")

# Source program names: reverse-domain names, never a path.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)+$")

# How much of a misbehaving program's output ends up in an error message.
MAX_QUOTE = 2000
# Progress reports of a source program: the largest one read, the most bytes
# one may claim, and how often the monitor hears of them at most.
MAX_PROGRESS_MESSAGE = 512
MAX_PROGRESS_BYTES = 1 << 50
PROGRESS_INTERVAL = 0.5


def _secret_strings(secrets):
    """All string leaves of the secrets (to scrub them from messages)."""
    found = []
    stack = [secrets]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and len(item) >= 4:
            found.append(item)
            # each line of a multi-line secret (a PEM key), should one be quoted alone
            found.extend(line.strip() for line in item.splitlines()
                         if len(line.strip()) >= 16 and not line.startswith("-----"))
    # longest first, so a secret containing another one is removed whole
    return sorted(set(found), key=len, reverse=True)


def _quote(text):
    text = text.strip()
    if len(text) > MAX_QUOTE:
        text = text[:MAX_QUOTE] + f"... ({len(text) - MAX_QUOTE} more characters)"
    return text


def _original_shape(args, kwargs):
    """Split the original's leading `socket_address` off SourcesServer's arguments.

    The shapes differ in the second argument: `options` (an object or None)
    now, `libdir` (a path) in the original.
    """
    if "socket_address" in kwargs:
        return args, kwargs.pop("socket_address")
    if len(args) >= 2 and isinstance(args[1], (str, os.PathLike)):
        return args[1:], os.fspath(args[0])
    return args, None


class SourcesServer(api.BaseAPI):
    """Host side of the `sources` endpoint.

    `libdir` holds `sources/<name>` programs, `options` is the manifest's
    `sources` object, `cache` the directory of the per-source caches
    (`STORE/sources`), `output` the per-stage-run directory the container sees
    read-only at `/run/osbuild/sources`, `secrets` the parsed `--secrets`
    (for the source programs); `stage_secrets` whether the stage may receive
    the secrets its sources name.
    """

    endpoint = "sources"

    def __init__(self, *args, **kwargs):
        """`(libdir, options, cache, output, secrets=None, stage_secrets=False, remote=None)`,
        or the original osbuild's `(socket_address, libdir, options, cache, output,
        secrets=None)`.

        In the original shape the server is used as a context manager that
        binds `socket_address` on entry.
        """
        super().__init__()
        args, self.socket_address = _original_shape(args, kwargs)
        self._setup(*args, **kwargs)

    def _setup(self, libdir, options, cache, output, secrets=None, stage_secrets=False,
               remote=None, monitor=None):
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        self.monitor = monitor  # an osbuild.monitor.Monitor told of download progress
        self.stage_secrets = stage_secrets
        self.libdir = os.path.abspath(libdir)
        self.options = options or {}
        self.cache = os.path.abspath(cache)
        self.output = os.path.abspath(output)
        self.secrets = secrets
        self._scrub = _secret_strings(secrets)
        self.remote = remote  # osbuild.remote.Remote or None
        # one lock per source name, so runs of the same source never overlap
        self._locks = ({}, threading.Lock())

    def __enter__(self):
        if self.socket_address is not None:
            # the original's shape: serve at exactly `socket_address`
            self.endpoint = os.path.basename(self.socket_address)
            self.start(os.path.dirname(os.path.abspath(self.socket_address)))
        return self

    def _lock(self, name):
        locks, guard = self._locks
        with guard:
            return locks.setdefault(name, threading.Lock())

    def scrub(self, text):
        """Replace every secret value in `text` with `***`."""
        for secret in self._scrub:
            text = text.replace(secret, "***")
        return text

    def _program(self, name):
        """Path of the source program `name`, or raise ValueError."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"invalid source name {str(name)[:200]!r}")
        directory = os.path.join(self.libdir, "sources")
        path = os.path.join(directory, name)
        if (os.path.islink(path) or not os.path.isfile(path)
                or os.path.dirname(os.path.realpath(path)) != os.path.realpath(directory)):
            raise ValueError(f"unknown source {name!r} (no program {path})")
        return path

    def fetch(self, name, checksums):
        """Run source `name` for `checksums`; raises ValueError/RuntimeError on failure.

        Returns `{checksum: secret name}` for the checksums that go with a secret.
        """
        program = self._program(name)
        if not isinstance(checksums, list):
            raise ValueError("'checksums' must be a list of strings")
        for checksum in checksums:
            err = checksum_error(checksum)
            if err:
                raise ValueError(err)
        cache = os.path.join(self.cache, name)
        output = os.path.join(self.output, name)
        os.makedirs(cache, mode=0o700, exist_ok=True)
        os.makedirs(output, mode=0o755, exist_ok=True)
        os.chmod(output, 0o755)
        request = {
            "options": self.options.get(name) or {},
            "checksums": checksums,
            "cache": cache,
            "output": output,
            "secrets": self.secrets,
        }
        env = dict(os.environ)
        pkgroot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkgroot + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with self._lock(name):
            missing = []
            if self.remote is not None:  # what the remote has need not be downloaded
                self.remote.fetch_sources(name, checksums, cache, request["options"])
                missing = [c for c in checksums if not os.path.isfile(os.path.join(cache, c))]
            channel = ProgressChannel(self.monitor, name, len(checksums))
            with channel:
                if channel.fd is not None:
                    request["progress"] = channel.fd
                # contained: the program and its children (curl, ...) die with osbuild
                # pylint: disable-next=consider-using-with
                proc = subprocess.Popen(contained([sys.executable, program]), text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, cwd="/",
                                        pass_fds=[] if channel.fd is None else [channel.fd])
                channel.started()
                with proc:
                    out, err = proc.communicate(json.dumps(request))
            named = self._check(name, subprocess.CompletedProcess(proc.args, proc.returncode,
                                                                  out, err), checksums)
            channel.done()
            if self.remote is not None:  # share what this host had to download
                self.remote.upload_sources(name, [c for c in missing if c not in named], cache,
                                           request["options"])
        return named

    def _check(self, name, proc, checksums):
        stdout, stderr = proc.stdout, _quote(self.scrub(proc.stderr))
        try:
            reply = json.loads(stdout)
        except ValueError:
            printed = _quote(self.scrub(stdout)) or "nothing"
            msg = (f"source {name} did not print a JSON reply (exit status {proc.returncode}); "
                   f"it printed: {printed}")
            if stderr:
                msg += f"; stderr: {stderr}"
            raise RuntimeError(msg) from None
        if not isinstance(reply, dict):
            raise RuntimeError(f"source {name} printed {_quote(self.scrub(stdout))} "
                               "instead of a JSON object")
        if "error" in reply:
            raise RuntimeError(f"source {name}: {self.scrub(str(reply['error']))}")
        if proc.returncode != 0:
            raise RuntimeError(f"source {name} failed with exit status {proc.returncode}"
                               + (f": {stderr}" if stderr else ""))
        named = reply.get("secrets", {})
        if not isinstance(named, dict) or not all(
                c in checksums and isinstance(n, str) for c, n in named.items()):
            raise RuntimeError(f"source {name}: 'secrets' in its reply must map requested "
                               "checksums to secret names")
        return named

    def secret_fds(self, named):
        """Memfds of the secrets in `named` {checksum: name}: returns (reply part, fds)."""
        fds, by_name, reply = [], {}, {}
        try:
            for checksum, name in sorted(named.items()):
                if name not in by_name:
                    mat = credentials.material(self.secrets, name, checksum)
                    by_name[name] = {}
                    for key, data in sorted(mat.items()):
                        fds.append(credentials.memfd(f"osbuild-{key}", data))
                        by_name[name][key] = len(fds) - 1
                reply[checksum] = by_name[name]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return reply, fds

    def _message(self, msg, fds, sock):
        keys = set(msg) if isinstance(msg, dict) else set()
        if not {"source", "checksums"} <= keys <= {"source", "checksums", "secrets"} \
                or msg.get("secrets", False) not in (True, False):
            sock.send({"error": "invalid sources request: expected "
                                '{"source": NAME, "checksums": [...]} '
                                '(and optionally "secrets": true)'})
            return
        secret_fds = []
        try:
            named = self.fetch(msg["source"], msg["checksums"])
            reply = {}
            if msg.get("secrets") and named:
                if not self.stage_secrets:
                    checksum, name = sorted(named.items())[0]
                    raise ValueError(f"{checksum} needs the secret {name!r}; only programs that "
                                     "declare STAGE_SECRETS receive secrets")
                reply["secrets"], secret_fds = self.secret_fds(named)
        except (ValueError, RuntimeError, OSError, credentials.SecretError) as e:
            sock.send({"error": self.scrub(str(e))})
            return
        try:
            sock.send(reply, secret_fds)
        finally:
            for fd in secret_fds:
                os.close(fd)


class ProgressChannel:
    """Host side of a source program's progress reports, passed on to a monitor.

    The program gets one end of a SOCK_SEQPACKET socket pair (its request's
    `progress` is the descriptor number) and sends datagrams
    `{"files_done": N, "bytes_done": N, "bytes_total": N or null}` (see
    `Progress`). Reports are untrusted: a datagram that is too long, is not
    such an object or claims impossible numbers is dropped, and the monitor
    hears at most one report every PROGRESS_INTERVAL seconds (plus the
    first and the last), each of the same few fields.
    """

    def __init__(self, monitor, source, files_total):
        self.monitor = monitor
        self.source = source
        self.files_total = files_total
        self.fd = None
        self._ours = self._thread = None
        self._started = time.monotonic()
        self._last = None           # the last accepted report (files, bytes, total)
        self._sent = 0.0            # when the monitor last heard of one

    def __enter__(self):
        if self.monitor is not None:
            self._ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.fd = theirs.detach()
            self._thread = threading.Thread(target=self._read, daemon=True,
                                            name=f"progress-{self.source}")
        return self

    def started(self):
        """The program runs (and holds its end): close ours, start reading."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self._thread.start()

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._thread is not None and self._thread.ident is not None:
            self._thread.join(timeout=10)
        if self._ours is not None:
            self._ours.close()
            self._ours = None

    def done(self):
        """The program succeeded: every file is there (told only if it downloaded any)."""
        if self._last is not None:
            _, done, total = self._last
            self._tell(self.files_total, max(done, total or 0), total, force=True)

    def _read(self):
        while True:
            try:
                data, _, flags, _ = self._ours.recvmsg(MAX_PROGRESS_MESSAGE)
            except OSError:
                return
            if not data:
                return
            if flags & socket.MSG_TRUNC:
                continue
            report = self._parse(data)
            if report is not None:
                self._tell(*report)

    def _parse(self, data):
        try:
            msg = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        if not isinstance(msg, dict) or set(msg) != {"files_done", "bytes_done", "bytes_total"}:
            return None
        files, done, total = msg["files_done"], msg["bytes_done"], msg["bytes_total"]
        def count(value, most):
            return type(value) is int and 0 <= value <= most  # pylint: disable=unidiomatic-typecheck
        if not count(files, self.files_total) or not count(done, MAX_PROGRESS_BYTES) or \
                total is not None and not count(total, MAX_PROGRESS_BYTES):
            return None
        if total is not None and done > total:
            total = None
        return files, done, total

    def _tell(self, files, done, total, force=False):
        from osbuild.monitor import DownloadProgress  # pylint: disable=import-outside-toplevel
        now = time.monotonic()
        first = self._last is None
        self._last = (files, done, total)
        if not (force or first) and now - self._sent < PROGRESS_INTERVAL:
            return
        self._sent = now
        rate = done / max(now - self._started, 0.001)
        self.monitor.download(DownloadProgress(self.source, files, self.files_total, done, total,
                                               rate))


class Progress:
    """Client side for a source program: report its downloads to the host.

    `args` is the program's request; without a `progress` descriptor in it
    (no monitor), reports go nowhere. Reporting never fails the program.
    """

    def __init__(self, args):
        fd = args.get("progress") if isinstance(args, dict) else None
        self.sock = None
        if type(fd) is int:  # pylint: disable=unidiomatic-typecheck
            try:
                self.sock = socket.socket(fileno=fd)
            except OSError:
                self.sock = None

    def report(self, files_done, bytes_done, bytes_total=None):
        """`files_done` of the requested files are there, `bytes_done` bytes fetched
        (of `bytes_total`, None while unknown)."""
        if self.sock is None:
            return
        msg = {"files_done": files_done, "bytes_done": bytes_done, "bytes_total": bytes_total}
        try:
            self.sock.send(json.dumps(msg).encode())
        except OSError:
            self.close()

    def close(self):
        """Stop reporting."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def get(source, checksums, api_path=API_PATH, sources_dir=SOURCES_DIR):
    """Ask the host for `checksums` of `source`; return the directory holding them.

    Each checksum is then a file `<directory>/<checksum>`. Raises RuntimeError
    with the host's message when the content cannot be provided.
    """
    with jsoncomm.Socket.new_client(api_path) as sock:
        reply, fds = sock.call({"source": source, "checksums": list(checksums)})
        for fd in fds:
            os.close(fd)
    if not isinstance(reply, dict):
        raise RuntimeError(f"sources: unexpected reply {reply!r}")
    if "error" in reply:
        raise RuntimeError(f"sources: {reply['error']}")
    return os.path.join(sources_dir, source)


def get_secrets(source, checksums, api_path=API_PATH, sources_dir=SOURCES_DIR):
    """Like `get()`, also receiving the secrets that go with the checksums.

    Returns `(directory, {checksum: {key: fd}})`: `key` is one of
    `credentials.KEYS`, `fd` a read-only memfd the caller owns and must
    close (a program opens it as `/proc/self/fd/N`). Only programs that
    declare `STAGE_SECRETS = True` get secrets; others get an error.
    """
    with jsoncomm.Socket.new_client(api_path) as sock:
        reply, fds = sock.call({"source": source, "checksums": list(checksums),
                                "secrets": True})
    try:
        if not isinstance(reply, dict):
            raise RuntimeError(f"sources: unexpected reply {reply!r}")
        if "error" in reply:
            raise RuntimeError(f"sources: {reply['error']}")
        result = {}
        for checksum, keys in reply.get("secrets", {}).items():
            result[checksum] = {}
            for key, index in keys.items():
                if key not in credentials.KEYS or not 0 <= index < len(fds):
                    raise RuntimeError("sources: malformed secrets in the reply")
                result[checksum][key] = fds[index]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    used = {fd for keys in result.values() for fd in keys.values()}
    for fd in fds:
        if fd not in used:
            os.close(fd)
    return os.path.join(sources_dir, source), result


def read_json(source, checksums, **kwargs):
    """Like `get()`, for sources whose outputs are JSON files: return {checksum: value}."""
    directory = get(source, checksums, **kwargs)
    result = {}
    for checksum in checksums:
        with open(os.path.join(directory, checksum), encoding="utf-8") as f:
            result[checksum] = json.load(f)
    return result
