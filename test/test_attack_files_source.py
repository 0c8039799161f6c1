"""Attacks on the org.osbuild.files source from a hostile manifest, against real builds.

The manifest names what to download; the host runs curl as root. A manifest
must not read host files (file:// URLs, redirects to them), learn their
digests from error messages, fill the store's disk (endless or huge bodies),
leave partial downloads behind after a SIGKILL, or get content that was
fetched with a secret without having that secret.
"""

import hashlib
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time

import pytest

from hygiene import leftovers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = "org.osbuild.files"
MiB = 1 << 20  # pylint: disable=invalid-name  # the unit's name

pytestmark = pytest.mark.integration


def sha(data):
    """`sha256:<hex>` of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Server:
    """HTTP(S) on 127.0.0.1: static `files`, `/endless`, `/big`, `/half`, `/to-file`.

    `/endless` streams a chunked body without end (up to `endless_cap` bytes),
    `/big` declares and sends `big_size` bytes, `/half` declares `half_size`
    bytes, sends half and then waits for `release`. `sent` counts body bytes.
    """

    def __init__(self, context=None):
        self.files = {}
        self.sent = 0
        self.endless_cap = 256 * MiB
        self.big_size = 64 * MiB
        self.half_size = 8 * MiB
        self.half_sent = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            """The routes above."""

            protocol_version = "HTTP/1.1"

            def do_GET(self):  # pylint: disable=invalid-name
                """Serve one GET."""
                try:
                    server.serve(self)
                except OSError:
                    pass

            def log_message(self, *args):  # pylint: disable=arguments-differ
                """Quiet."""

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        scheme = "https" if context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def _write(self, handler, data):
        handler.wfile.write(data)
        self.sent += len(data)

    def serve(self, h):
        """Answer the request of handler `h`."""
        chunk = b"x" * MiB
        if h.path == "/endless":
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            while self.sent < self.endless_cap:
                self._write(h, b"%x\r\n%s\r\n" % (len(chunk), chunk))
            h.wfile.write(b"0\r\n\r\n")
        elif h.path in ("/big", "/half"):
            size = self.big_size if h.path == "/big" else self.half_size
            h.send_response(200)
            h.send_header("Content-Length", str(size))
            h.end_headers()
            for _ in range(size // MiB // (2 if h.path == "/half" else 1)):
                self._write(h, chunk)
            if h.path == "/half":
                h.wfile.flush()
                self.half_sent.set()
                self.release.wait(120)
        elif h.path == "/to-file":
            h.send_response(302)
            h.send_header("Location", "file:///etc/shadow")
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif h.path.lstrip("/") in self.files:
            data = self.files[h.path.lstrip("/")]
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            self._write(h, data)
        else:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()

    def close(self):
        """Stop serving."""
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(name="server")
def server_fixture():
    """A plain HTTP attack server."""
    srv = Server()
    yield srv
    srv.close()


def manifest(urls):
    """A build copying `urls`' checksums into the tree (stage org.osbuild.files-test)."""
    return {"pipeline": {"stages": [{"name": "org.osbuild.files-test",
                                     "options": {"checksums": list(urls), "path": "/files"}}]},
            "sources": {FILES: {"urls": urls}}}


def build(tmp_path, store, mf, *args, env=None, timeout=600):
    """Run osbuild --json on `mf`; returns (returncode, result, stdout + stderr)."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(mf))
    proc = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
                           str(store), "--json", *map(str, args), str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(os.environ, **(env or {})))
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = None
    return proc.returncode, result, proc.stdout + proc.stderr


def failure(result):
    """The failing stage's output (the source's error)."""
    assert result is not None and result["success"] is False
    return result["stages"][-1]["output"]


def cache_files(store):
    """{relative path: size} of every file in the files source's cache."""
    top = store / "sources" / FILES
    found = {}
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, top)] = os.path.getsize(path)
    return found


def test_file_urls_cannot_read_host_files(tmp_path, server):
    """file:// URLs (and redirects to file://) are refused: a host file with a known
    checksum never reaches the tree, and no error tells the digest of a host file."""
    secret = tmp_path / "host-only"
    secret.write_bytes(b"host secret\n")
    os.chmod(secret, 0o600)
    with open("/etc/shadow", "rb") as f:
        shadow_digest = sha(f.read())
    store = tmp_path / "store"
    known = sha(secret.read_bytes())
    wrong = sha(b"a guess")
    cases = [{known: f"file://{secret}"}, {known: f"FILE://localhost{secret}"},
             {wrong: "file:///etc/shadow"}, {wrong: f"{server.url}/to-file"}]
    for urls in cases:
        rc, result, text = build(tmp_path, store, manifest(urls))
        assert rc == 1, text
        message = failure(result)
        assert shadow_digest not in text and shadow_digest[7:] not in text
        assert "Traceback" not in text
        assert not os.path.exists(store / "refs" / result["stages"][-1]["id"])
        if "file" in next(iter(urls.values())).lower()[:4]:
            assert "only http and https" in message, message
    assert known not in cache_files(store) and wrong not in cache_files(store)
    assert leftovers(tmp_path) == {}


def test_mismatch_does_not_tell_the_digest(tmp_path, server):
    """Content that does not match its checksum is dropped; the error does not tell
    what its digest is (no hash oracle, e.g. for a service on the host's loopback)."""
    server.files["x"] = b"content the manifest does not know\n"
    store = tmp_path / "store"
    rc, result, text = build(tmp_path, store, manifest({sha(b"guess"): f"{server.url}/x"}))
    assert rc == 1
    assert "checksum mismatch" in failure(result)
    assert sha(server.files["x"])[7:] not in text
    assert cache_files(store) == {}


def test_endless_and_huge_bodies_are_capped(tmp_path, server):
    """An endless chunked body and a huge declared one stop at the size limit: the
    build fails quickly with a clear message and the cache holds nothing of them."""
    store = tmp_path / "store"
    env = {"OSBUILD_SOURCES_MAX_FILE_SIZE": str(4 * MiB)}
    for path in ("/endless", "/big"):
        server.sent = 0
        start = time.monotonic()
        rc, result, text = build(tmp_path, store, manifest({sha(path.encode()): server.url + path}),
                                 env=env)
        assert rc == 1, text
        assert f"larger than the limit of {4 * MiB} bytes" in failure(result)
        assert server.sent < 64 * MiB
        assert time.monotonic() - start < 120
        assert cache_files(store) == {}
    rc, result, text = build(tmp_path, store, manifest({sha(b"a"): f"{server.url}/a"}),
                             env={"OSBUILD_SOURCES_MAX_FILE_SIZE": "lots"})
    assert rc == 1 and "OSBUILD_SOURCES_MAX_FILE_SIZE must be" in failure(result)
    assert leftovers(tmp_path) == {}


def test_killed_download_leaves_no_partial_file(tmp_path, server):
    """SIGKILL during a large download: the partial file is in a work directory
    nobody holds a lock on, and the next run removes it at once."""
    store = tmp_path / "store"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest({sha(b"never"): f"{server.url}/half"})))
    # pylint: disable-next=consider-using-with
    proc = subprocess.Popen([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
                             str(store), "--json", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert server.half_sent.wait(300), "the download never started"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                size >= server.half_size // 4 for size in cache_files(store).values()):
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.release.set()
    time.sleep(1)   # curl and the source program die with osbuild
    partial = [p for p, size in cache_files(store).items() if size >= server.half_size // 4]
    assert partial and all(p.startswith("work-") for p in partial), cache_files(store)
    server.files["small"] = b"small\n"
    rc, _, text = build(tmp_path, store, manifest({sha(b"small\n"): f"{server.url}/small"}))
    assert rc == 0, text
    assert cache_files(store) == {sha(b"small\n"): 6}
    assert leftovers(tmp_path) == {}


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(name="tls_server")
def tls_server_fixture(tmp_path):
    """HTTPS requiring a client certificate; yields (server, secrets dict)."""
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=attack CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj",
                 f"/CN={who}", cwd=d)
        extra = ["-extfile", "san.ext"] if who == "server" else []
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.crt", "-days", "2", *extra, cwd=d)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "server.crt", d / "server.key")
    ctx.load_verify_locations(d / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED
    srv = Server(ctx)
    secrets = {"cdn": {"ssl_client_cert": (d / "client.crt").read_text(),
                       "ssl_client_key": (d / "client.key").read_text(),
                       "ssl_ca_cert": (d / "ca.crt").read_text()}}
    yield srv, secrets
    srv.close()


def test_entitled_content_not_served_without_the_secret(tmp_path, tls_server, server):
    """Content fetched with a secret is cached apart: a later manifest that names its
    checksum without the secret (or without --secrets) does not get it from the cache."""
    tls, secrets = tls_server
    data = b"entitled content\n"
    tls.files["pkg.rpm"] = data
    checksum = sha(data)
    store = tmp_path / "store"
    secrets_file = tmp_path / "secrets.json"
    secrets_file.write_text(json.dumps(secrets))
    os.chmod(secrets_file, 0o600)
    entitled = {checksum: {"url": f"{tls.url}/pkg.rpm", "secrets": {"name": "cdn"}}}
    rc, result, text = build(tmp_path, store, manifest(entitled), "--secrets", secrets_file)
    assert rc == 0, text
    tree = store / "refs" / result["tree_id"]
    assert (tree / "files" / checksum).read_bytes() == data
    served = tls.sent
    # the same checksum without the secret: from the entitled server, from elsewhere,
    # with and without --secrets given to the build
    attempts = [({checksum: f"{tls.url}/pkg.rpm"}, ()),
                ({checksum: f"{server.url}/missing"}, ()),
                ({checksum: f"{server.url}/missing"}, ("--secrets", secrets_file))]
    for urls, args in attempts:
        rc, result, text = build(tmp_path, store, {**manifest(urls), "pipeline": {"stages": [
            {"name": "org.osbuild.files-test",
             "options": {"checksums": [checksum], "path": "/stolen"}}]}}, *args)
        assert rc == 1, text
        assert "cannot fetch" in failure(result)
    # the secret's holder still gets it from the cache, without another download
    rc, result, text = build(tmp_path, store, {**manifest(entitled), "pipeline": {"stages": [
        {"name": "org.osbuild.files-test",
         "options": {"checksums": [checksum], "path": "/again"}}]}}, "--secrets", secrets_file)
    assert rc == 0, text
    assert tls.sent == served
    assert leftovers(tmp_path) == {}
