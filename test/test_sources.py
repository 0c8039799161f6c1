"""Tests for the sources: org.osbuild.files, org.osbuild.dnf and the sources API.

Files are served by HTTP(S) servers on 127.0.0.1 started by the tests; the
source programs run as real subprocesses (with curl), and the API over a real
Unix socket in-process.
"""

import glob
import hashlib
import http.server
import json
import os
import pathlib
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import hypothesis
import pytest

from osbuild import sources
from osbuild.programs.checksum import HASH_LENGTHS, checksum_error
from osbuild.util import jsoncomm
from osbuild.util.workdir import WorkDir

from pki import make_pki

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = os.path.join(REPO, "sources", "org.osbuild.files")
DNF = os.path.join(REPO, "sources", "org.osbuild.dnf")


def sha(data, algo="sha256"):
    """`algo:hexdigest` of bytes."""
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


class FileServer:
    """A threaded HTTP(S) server on 127.0.0.1 serving bytes from a dict.

    Counts requests per path, tracks the peak number of concurrent requests,
    can delay answers, fail a path with 503 a number of times, and scan all
    process argument lists for marker strings while a request is in flight.
    """

    def __init__(self, ssl_context=None):
        self.files = {}
        self.requests = {}
        self.fail_times = {}
        self.delay = 0.0
        self.active = 0
        self.peak = 0
        self.markers = []
        self.markers_seen = set()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            """Serves server.files."""

            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # pylint: disable=arguments-differ
                pass

            def do_GET(self):  # pylint: disable=invalid-name
                """Answer one GET."""
                with server.lock:
                    server.requests[self.path] = server.requests.get(self.path, 0) + 1
                    server.active += 1
                    server.peak = max(server.peak, server.active)
                    fail = server.fail_times.get(self.path, 0)
                    if fail:
                        server.fail_times[self.path] = fail - 1
                try:
                    if server.markers:
                        server.scan_cmdlines()
                    if server.delay:
                        time.sleep(server.delay)
                    data = server.files.get(self.path)
                    if fail:
                        self.send_response(503)
                        data = b"try again"
                    elif data is None:
                        self.send_response(404)
                        data = b"not found"
                    else:
                        self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with server.lock:
                        server.active -= 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if ssl_context else "http"
        self.base = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def scan_cmdlines(self):
        """Record which markers appear in any process' argument list."""
        for path in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                with open(path, "rb") as f:
                    cmdline = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            for marker in self.markers:
                if marker in cmdline:
                    self.markers_seen.add(marker)

    def add(self, name, data):
        """Serve `data` at /name; return its URL."""
        self.files["/" + name] = data
        return f"{self.base}/{name}"

    def count(self, name):
        """How many requests reached /name."""
        return self.requests.get("/" + name, 0)

    def close(self):
        """Stop the server."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(name="server")
def server_fixture():
    """A plain HTTP file server on 127.0.0.1."""
    srv = FileServer()
    yield srv
    srv.close()


def run_source(program, options, checksums, cache, output, secrets=None, env=None):
    # pylint: disable=too-many-arguments,too-many-positional-arguments
    """Run a source program as osbuild does; return (returncode, reply, stdout, stderr)."""
    request = {"options": options, "checksums": checksums, "cache": str(cache),
               "output": str(output), "secrets": secrets}
    proc = subprocess.run([sys.executable, program], input=json.dumps(request),
                          capture_output=True, text=True, check=False, timeout=300,
                          env=dict(os.environ, **(env or {})))
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        reply = None
    return proc.returncode, reply, proc.stdout, proc.stderr


def cache_entries(cache):
    """Everything in a cache directory (including hidden temporaries)."""
    if not os.path.isdir(cache):
        return []
    return sorted(os.listdir(cache))


# --- org.osbuild.files -------------------------------------------------------

def test_files_success_all_algorithms(server, tmp_path):
    """sha256/sha384/sha512 files are fetched, verified, cached and linked."""
    blobs = {f"f{i}": os.urandom(1000 + i) for i in range(3)}
    urls = {}
    for (name, data), algo in zip(blobs.items(), ("sha256", "sha384", "sha512")):
        urls[sha(data, algo)] = server.add(name, data)
    cache, out = tmp_path / "cache", tmp_path / "out"
    rc, reply, _, err = run_source(FILES, {"urls": urls}, list(urls), cache, out)
    assert rc == 0, (reply, err)
    assert reply == {}
    for checksum, url in urls.items():
        name = url.rsplit("/", 1)[1]
        assert (out / checksum).read_bytes() == blobs[name]
        assert (cache / checksum).read_bytes() == blobs[name]
        assert server.count(name) == 1
    # no temporaries left behind
    assert cache_entries(cache) == sorted(urls)


def test_files_url_object_form_and_no_file_scheme(server, tmp_path):
    """`{"url": ...}` entries work; file:// (a host file) is refused, and not read."""
    checksum = sha(b"remote content")
    urls = {checksum: {"url": server.add("data.bin", b"remote content")}}
    rc, reply, _, _ = run_source(FILES, {"urls": urls}, [checksum], tmp_path / "c", tmp_path / "o")
    assert (rc, reply) == (0, {})
    assert (tmp_path / "o" / checksum).read_bytes() == b"remote content"
    src = tmp_path / "data.bin"
    src.write_bytes(b"local content")
    checksum = sha(b"local content")
    for url in (f"file://{src}", f"FILE://{src}", f"ftp://127.0.0.1/{src}", "http:/x"):
        rc, reply, _, _ = run_source(FILES, {"urls": {checksum: url}}, [checksum],
                                     tmp_path / "c", tmp_path / "o")
        assert rc == 1 and "only http and https" in reply["error"], url
    assert not (tmp_path / "o" / checksum).exists()


def test_files_cache_reuse_no_second_request(server, tmp_path):
    """Content already in the cache is not requested again."""
    data = os.urandom(5000)
    checksum = sha(data)
    urls = {checksum: server.add("pkg.rpm", data)}
    cache = tmp_path / "cache"
    rc, _, _, _ = run_source(FILES, {"urls": urls}, [checksum], cache, tmp_path / "o1")
    assert rc == 0
    assert server.count("pkg.rpm") == 1
    # the server forgets the file: the second run must not need it
    del server.files["/pkg.rpm"]
    rc, reply, _, err = run_source(FILES, {"urls": urls}, [checksum], cache, tmp_path / "o2")
    assert (rc, reply) == (0, {}), err
    assert server.count("pkg.rpm") == 1
    assert (tmp_path / "o2" / checksum).read_bytes() == data
    # the output is a hard link to the cache entry when on the same filesystem
    assert os.stat(tmp_path / "o2" / checksum).st_ino == os.stat(cache / checksum).st_ino


def test_files_parallel_many(server, tmp_path):
    """Many files are downloaded concurrently (bounded) by one curl."""
    n = 40
    server.delay = 0.15
    urls = {}
    for i in range(n):
        data = f"file number {i}\n".encode() * (i + 1)
        urls[sha(data)] = server.add(f"p{i}", data)
    start = time.monotonic()
    rc, reply, _, err = run_source(FILES, {"urls": urls}, list(urls), tmp_path / "c",
                                   tmp_path / "o",
                                   env={"OSBUILD_SOURCES_MAX_PARALLEL": "8"})
    elapsed = time.monotonic() - start
    assert (rc, reply) == (0, {}), err
    assert len(os.listdir(tmp_path / "o")) == n
    assert 1 < server.peak <= 8
    # sequentially this takes n * delay = 6 s
    assert elapsed < n * server.delay / 2
    assert all(server.count(f"p{i}") == 1 for i in range(n))


def test_files_transient_failure_retried(server, tmp_path):
    """A 503 is retried and the download then succeeds."""
    data = b"flaky"
    checksum = sha(data)
    urls = {checksum: server.add("flaky", data)}
    server.fail_times["/flaky"] = 1
    rc, reply, _, err = run_source(FILES, {"urls": urls}, [checksum], tmp_path / "c",
                                   tmp_path / "o")
    assert (rc, reply) == (0, {}), err
    assert server.count("flaky") == 2


def test_files_persistent_503_gives_up(server, tmp_path):
    """A server that keeps failing is tried a bounded number of times."""
    checksum = sha(b"never")
    urls = {checksum: server.add("down", b"never")}
    server.fail_times["/down"] = 100
    rc, reply, _, _ = run_source(FILES, {"urls": urls}, [checksum], tmp_path / "c", tmp_path / "o")
    assert rc == 1
    assert "HTTP error 503" in reply["error"]
    assert server.count("down") == 3
    assert cache_entries(tmp_path / "c") == []


def test_files_unknown_checksum(server, tmp_path):
    """A checksum not in urls fails with a clear message."""
    known = sha(b"a")
    unknown = sha(b"b")
    urls = {known: server.add("a", b"a")}
    rc, reply, _, _ = run_source(FILES, {"urls": urls}, [known, unknown], tmp_path / "c",
                                 tmp_path / "o")
    assert rc == 1
    assert reply["error"].startswith(f"unknown checksum {unknown}")
    assert server.count("a") == 0


@pytest.mark.parametrize("checksum,message", [
    ("md5:" + "0" * 32, "unsupported checksum algorithm 'md5'"),
    ("sha1:" + "0" * 40, "unsupported checksum algorithm 'sha1'"),
    ("sha256:" + "0" * 63, "malformed checksum"),
    ("sha256:" + "G" * 64, "malformed checksum"),
    ("sha256:" + "A" * 64, "malformed checksum"),
    ("0" * 64, "malformed checksum"),
    ("../../etc/passwd", "malformed checksum"),
    ("sha256:../../../etc/passwd", "malformed checksum"),
    ("sha256/../../x:00", "malformed checksum"),
    ("", "malformed checksum"),
    (42, "is not a string"),
])
def test_files_bad_checksums(tmp_path, checksum, message):
    """Malformed, unsupported and path-like checksums are refused before anything happens."""
    urls = {}
    if isinstance(checksum, str):
        urls[checksum] = "http://127.0.0.1:1/x"
    rc, reply, _, _ = run_source(FILES, {"urls": urls}, [checksum], tmp_path / "c", tmp_path / "o")
    assert rc == 1
    assert message in reply["error"]
    assert cache_entries(tmp_path / "c") == []
    assert not os.path.exists(tmp_path / "etc")


def test_files_404(server, tmp_path):
    """A missing URL fails (not retried) and nothing enters the cache."""
    checksum = sha(b"gone")
    url = f"{server.base}/gone"
    rc, reply, _, _ = run_source(FILES, {"urls": {checksum: url}}, [checksum], tmp_path / "c",
                                 tmp_path / "o")
    assert rc == 1
    assert f"{checksum}: {url}: HTTP error 404" in reply["error"]
    assert server.count("gone") == 1
    assert cache_entries(tmp_path / "c") == []
    assert not (tmp_path / "o" / checksum).exists()


def test_files_connection_refused(tmp_path):
    """A refused connection fails with curl's reason."""
    checksum = sha(b"x")
    url = "http://127.0.0.1:1/x"
    rc, reply, _, _ = run_source(FILES, {"urls": {checksum: url}}, [checksum], tmp_path / "c",
                                 tmp_path / "o")
    assert rc == 1
    assert url in reply["error"]
    assert "connect" in reply["error"].lower()
    assert cache_entries(tmp_path / "c") == []


def test_files_hash_mismatch_rejected(server, tmp_path):
    """Content with the wrong hash is rejected and never enters the cache."""
    good = sha(b"expected content")
    urls = {good: server.add("evil", b"tampered content")}
    rc, reply, _, _ = run_source(FILES, {"urls": urls}, [good], tmp_path / "c", tmp_path / "o")
    assert rc == 1
    assert "checksum mismatch" in reply["error"]
    assert sha(b"tampered content") not in reply["error"]  # no digest of fetched content
    assert cache_entries(tmp_path / "c") == []
    assert not (tmp_path / "o" / good).exists()


def test_files_partial_failure_keeps_good_ones(server, tmp_path):
    """Good files of a failed request are cached; the bad one is not."""
    good = sha(b"good")
    bad = sha(b"bad")
    urls = {good: server.add("good", b"good"), bad: server.add("bad", b"not bad")}
    rc, reply, _, _ = run_source(FILES, {"urls": urls}, [good, bad], tmp_path / "c", tmp_path / "o")
    assert rc == 1
    assert bad in reply["error"] and good not in reply["error"]
    assert cache_entries(tmp_path / "c") == [good]


@pytest.mark.parametrize("options,message", [
    ({"urls": []}, "options.urls must be an object"),
    ({"urls": {}, "mirror": 1}, "unknown option(s): mirror"),
    ({"urls": {"CS": 42}}, "must be a URL string or an object"),
    ({"urls": {"CS": {"href": "x"}}}, "unknown key(s) href"),
    ({"urls": {"CS": "gopher://x/y"}}, "unsupported URL"),
    ({"urls": {"CS": "http://x/\ny"}}, "invalid character"),
    ({"urls": {"CS": {"url": "http://x/", "secrets": "rhsm"}}},
     "must be an object with a string 'name'"),
])
def test_files_bad_options(tmp_path, options, message):
    """Bad option shapes give one-line errors."""
    checksum = sha(b"x")
    options = json.loads(json.dumps(options).replace('"CS"', f'"{checksum}"'))
    rc, reply, _, err = run_source(FILES, options, [checksum], tmp_path / "c", tmp_path / "o")
    assert rc == 1, err
    assert message in reply["error"]
    assert "\n" not in reply["error"]
    assert "Traceback" not in err


def test_files_invalid_input_json():
    """Garbage on stdin is reported, not a traceback."""
    proc = subprocess.run([sys.executable, FILES], input="{nope", capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"].startswith("invalid arguments")
    assert "Traceback" not in proc.stderr


def test_files_url_with_quotes_is_escaped(server, tmp_path):
    """Quotes and backslashes in a URL cannot inject curl config lines."""
    data = b"quoted"
    checksum = sha(data)
    server.files['/a"b\\c'] = data
    url = f'{server.base}/a"b\\c'
    rc, reply, _, err = run_source(FILES, {"urls": {checksum: url}}, [checksum], tmp_path / "c",
                                   tmp_path / "o")
    # curl may normalise the path; what matters is no config injection and a clean result
    assert rc in (0, 1), err
    assert isinstance(reply, dict)
    evil = f'{server.base}/x"\noutput = "/tmp/pwned'
    rc, reply, _, _ = run_source(FILES, {"urls": {checksum: evil}}, [checksum], tmp_path / "c2",
                                 tmp_path / "o2")
    assert rc == 1 and "invalid character" in reply["error"]
    assert not os.path.exists("/tmp/pwned")


# --- HTTPS with client certificates (secrets) ---------------------------------

@pytest.fixture(name="pki", scope="module")
def pki_fixture(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"), "osbuild test CA", "entitled-client")


@pytest.fixture(name="tls_server")
def tls_server_fixture(pki):
    """An HTTPS server that requires a client certificate signed by the test CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED
    srv = FileServer(ctx)
    yield srv
    srv.close()


def test_files_client_certificate_secret_paths(tls_server, pki, tmp_path):
    """A URL naming a secret is fetched with its client certificate (host paths)."""
    data = b"entitled package"
    checksum = sha(data)
    url = tls_server.add("entitled.rpm", data)
    secrets = {"org.osbuild.rhsm": {"ssl_client_cert": str(pki / "client.crt"),
                                    "ssl_client_key": str(pki / "client.key"),
                                    "ssl_ca_cert": str(pki / "ca.crt")}}
    # FILES is on the source program's argv: a positive control for the scan
    tls_server.markers = [str(pki / "client.key"), str(pki / "client.crt"), FILES]
    urls = {checksum: {"url": url, "secrets": {"name": "org.osbuild.rhsm"}}}
    rc, reply, out, err = run_source(FILES, {"urls": urls}, [checksum], tmp_path / "c",
                                     tmp_path / "o",
                                     secrets=secrets)
    assert (rc, reply) == (0, {}), err
    assert (tmp_path / "o" / checksum).read_bytes() == data
    # the request reached the server while curl ran: no process had the secrets on argv
    assert tls_server.count("entitled.rpm") == 1
    assert tls_server.markers_seen == {FILES}
    assert "client.key" not in out + err


def test_files_client_certificate_secret_pem(tls_server, pki, tmp_path):
    """Secrets given as PEM text work, and never show up in argv or the cache."""
    data = b"entitled via pem"
    checksum = sha(data)
    url = tls_server.add("pem.rpm", data)
    key_pem = (pki / "client.key").read_text()
    secrets = {"ent": {"ssl_client_cert": (pki / "client.crt").read_text(),
                       "ssl_client_key": key_pem,
                       "ssl_ca_cert": (pki / "ca.crt").read_text()}}
    key_body = key_pem.splitlines()[1]
    tls_server.markers = [key_body, FILES]
    urls = {checksum: {"url": url, "secrets": {"name": "ent"}}}
    cache = tmp_path / "c"
    rc, reply, _, err = run_source(FILES, {"urls": urls}, [checksum], cache, tmp_path / "o",
                                   secrets=secrets)
    assert (rc, reply) == (0, {}), err
    assert tls_server.markers_seen == {FILES}
    # no key files; the content is cached apart, under the secret's fingerprint
    [secret_dir] = cache_entries(cache)
    assert secret_dir.startswith("secret-")
    assert cache_entries(cache / secret_dir) == [checksum]


def test_files_client_certificate_required(tls_server, pki, tmp_path):
    """Without the secret the entitled server refuses, and the message names no secret."""
    data = b"entitled"
    checksum = sha(data)
    url = tls_server.add("e.rpm", data)
    urls = {checksum: {"url": url, "secrets": {"name": "org.osbuild.rhsm"}}}
    rc, reply, _, _ = run_source(FILES, {"urls": urls}, [checksum], tmp_path / "c", tmp_path / "o",
                                 secrets={})
    assert rc == 1
    assert "needs the secret 'org.osbuild.rhsm', which was not provided" in reply["error"]
    # a secret without a client certificate: the TLS handshake fails
    secrets = {"org.osbuild.rhsm": {"ssl_ca_cert": str(pki / "ca.crt")}}
    rc, reply, _, _ = run_source(FILES, {"urls": urls}, [checksum], tmp_path / "c", tmp_path / "o",
                                 secrets=secrets)
    assert rc == 1
    assert url in reply["error"]
    assert str(pki) not in reply["error"]
    assert cache_entries(tmp_path / "c") == []


# --- org.osbuild.dnf ---------------------------------------------------------

def test_dnf_repo_config(tmp_path):
    """The dnf source writes each repository's configuration as JSON."""
    cs1, cs2 = sha(b"repomd-1"), sha(b"repomd-2")
    repos = {cs1: {"baseurl": "http://127.0.0.1/repo", "gpgkey": "-----BEGIN PGP...",
                   "sslverify": False},
             cs2: {"metalink": "https://example/metalink?repo=x"}}
    rc, reply, _, err = run_source(DNF, {"repos": repos}, [cs1, cs2], tmp_path / "c",
                                   tmp_path / "o")
    assert (rc, reply) == (0, {}), err
    assert json.loads((tmp_path / "o" / cs1).read_text()) == dict(repos[cs1], checksum=cs1)
    assert json.loads((tmp_path / "o" / cs2).read_text()) == dict(repos[cs2], checksum=cs2)


def test_dnf_secrets_never_written(tmp_path, pki):
    """A repository's secret is only named (in the reply and the JSON), never written."""
    checksum = sha(b"repomd")
    repos = {checksum: {"baseurl": "https://cdn/repo", "secrets": {"name": "rhsm"}}}
    key = (pki / "client.key").read_text()
    secrets = {"rhsm": {"ssl_client_key": key, "ssl_client_cert": str(pki / "client.crt")}}
    rc, reply, out, err = run_source(DNF, {"repos": repos}, [checksum], tmp_path / "c",
                                     tmp_path / "o", secrets=secrets)
    assert (rc, reply) == (0, {"secrets": {checksum: "rhsm"}}), err
    assert json.loads((tmp_path / "o" / checksum).read_text()) == {
        "checksum": checksum, "baseurl": "https://cdn/repo", "secrets": "rhsm"}
    assert os.listdir(tmp_path / "o") == [checksum]
    assert not os.path.exists(tmp_path / "c")
    assert key.splitlines()[1] not in out + err


@pytest.mark.parametrize("repos,checksum,message", [
    ({}, "CS", "unknown repository checksum"),
    ({"CS": {"gpgkey": "k"}}, "CS", "needs one of baseurl, metalink, mirrorlist"),
    ({"CS": {"baseurl": "u", "enabled": 1}}, "CS", "unknown key(s) enabled"),
    ({"CS": {"baseurl": "u", "secrets": {"name": "x"}}}, "CS", "needs the secret 'x'"),
    ({}, "../../etc/passwd", "malformed checksum"),
    ({}, "md5:" + "0" * 32, "unsupported checksum algorithm"),
])
def test_dnf_bad_input(tmp_path, repos, checksum, message):
    """Bad dnf source input fails with a clear message."""
    cs = sha(b"repomd")
    repos = json.loads(json.dumps(repos).replace('"CS"', f'"{cs}"'))
    checksum = cs if checksum == "CS" else checksum
    rc, reply, _, err = run_source(DNF, {"repos": repos}, [checksum], tmp_path / "c",
                                   tmp_path / "o")
    assert rc == 1, err
    assert message in reply["error"]


# --- the sources API (SourcesServer + get) -----------------------------------

def fake_libdir(tmp_path, programs):
    """A libdir with `sources/<name>` programs given as Python source text."""
    libdir = tmp_path / "lib"
    (libdir / "sources").mkdir(parents=True)
    for name in ("org.osbuild.files", "org.osbuild.dnf"):
        shutil.copy(os.path.join(REPO, "sources", name), libdir / "sources" / name)
    for name, text in programs.items():
        path = libdir / "sources" / name
        path.write_text("#!/usr/bin/python3\n" + text)
        path.chmod(0o755)
    os.symlink(os.path.join(REPO, "osbuild"), libdir / "sources" / "osbuild")
    (libdir / "stages").mkdir()
    (libdir / "stages" / "org.osbuild.noop").write_text("#!/usr/bin/python3\n")
    return libdir


class Api:
    """A running SourcesServer with its directories."""

    def __init__(self, tmp_path, options, programs=None, secrets=None):
        tmp_path = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
        self.libdir = fake_libdir(tmp_path, programs or {})
        self.cache = tmp_path / "store" / "sources"
        self.output = tmp_path / "run-sources"
        self.output.mkdir()
        self.api_dir = tmp_path / "api"
        self.api_dir.mkdir()
        self.server = sources.SourcesServer(self.libdir, options, self.cache, self.output, secrets)
        self.path = self.server.start(str(self.api_dir))

    def get(self, source, checksums):
        """Client call with host paths."""
        return sources.get(source, checksums, api_path=self.path, sources_dir=str(self.output))

    def call(self, msg):
        """Send a raw request, return the reply."""
        with jsoncomm.Socket.new_client(self.path) as sock:
            reply, _ = sock.call(msg)
        return reply


@pytest.fixture(name="api")
def api_fixture(tmp_path):
    """Factory for running SourcesServers, stopped after the test."""
    servers = []

    def make(options, programs=None, secrets=None):
        a = Api(tmp_path, options, programs, secrets)
        servers.append(a)
        return a

    yield make
    for a in servers:
        a.server.stop()


def test_api_end_to_end(server, api):
    """A request over the socket runs the files source on the host."""
    data = os.urandom(3000)
    checksum = sha(data)
    a = api({"org.osbuild.files": {"urls": {checksum: server.add("x", data)}}})
    directory = a.get("org.osbuild.files", [checksum])
    assert directory == str(a.output / "org.osbuild.files")
    assert (a.output / "org.osbuild.files" / checksum).read_bytes() == data
    assert (a.cache / "org.osbuild.files" / checksum).read_bytes() == data
    # second request: served from the cache
    shutil.rmtree(a.output / "org.osbuild.files")
    a.get("org.osbuild.files", [checksum])
    assert server.count("x") == 1
    # default client path is the container's view
    assert sources.SOURCES_DIR == "/run/osbuild/sources"


def test_api_large_request(api):
    """Thousands of checksums (a message far above one packet) work both ways."""
    a = api({"org.osbuild.files": {"urls": {}}})
    cache = a.cache / "org.osbuild.files"
    cache.mkdir(parents=True)
    checksums = []
    for i in range(3000):
        data = str(i).encode()
        checksum = sha(data)
        (cache / checksum).write_bytes(data)
        checksums.append(checksum)
    a.get("org.osbuild.files", checksums)
    assert len(os.listdir(a.output / "org.osbuild.files")) == 3000


def test_api_large_error_reply(api):
    """A source's error of any size reaches the stage intact."""
    big = "E" * 200000
    a = api({}, {"org.test.big": f"import json; print(json.dumps({{'error': '{big}'}}))\n"})
    with pytest.raises(RuntimeError) as exc:
        a.get("org.test.big", [])
    assert big in str(exc.value)


def test_api_invalid_json_from_source(api):
    """A source that prints invalid JSON fails with what it printed."""
    a = api({}, {"org.test.garbage": "import sys; print('this is not json {'); "
                                     "print('oops', file=sys.stderr); sys.exit(0)\n"})
    with pytest.raises(RuntimeError) as exc:
        a.get("org.test.garbage", [])
    msg = str(exc.value)
    assert "did not print a JSON reply" in msg
    assert "this is not json {" in msg
    assert "oops" in msg


def test_api_crashing_source(api):
    """A source that dies with a traceback fails with its exit status and stderr."""
    a = api({}, {"org.test.crash": "print('{}'); raise SystemExit('kaboom')\n"})
    with pytest.raises(RuntimeError) as exc:
        a.get("org.test.crash", [])
    assert "exit status 1" in str(exc.value) and "kaboom" in str(exc.value)
    a = api({}, {"org.test.list": "print('[1, 2]')\n"})
    with pytest.raises(RuntimeError, match="instead of a JSON object"):
        a.get("org.test.list", [])


@pytest.mark.parametrize("name,message", [
    ("../stages/org.osbuild.noop", "invalid source name"),
    ("org.osbuild.files/../../stages/org.osbuild.noop", "invalid source name"),
    ("/bin/sh", "invalid source name"),
    ("osbuild", "invalid source name"),
    ("org.osbuild.nothere", "unknown source 'org.osbuild.nothere'"),
    (None, "invalid source name"),
])
def test_api_bad_source_name(api, name, message):
    """Source names are never used as paths without validation."""
    a = api({})
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(")):
        a.get(name, [])


def test_api_symlinked_source_refused(api):
    """A source program that is a symlink (possibly out of libdir) is refused."""
    a = api({})
    os.symlink("/bin/true", a.libdir / "sources" / "org.test.link")
    with pytest.raises(RuntimeError, match="unknown source"):
        a.get("org.test.link", [])


@pytest.mark.parametrize("checksums,message", [
    (["../../etc/passwd"], "malformed checksum"),
    (["md5:" + "0" * 32], "unsupported checksum algorithm"),
    ("sha256:" + "0" * 64, "must be a list"),
])
def test_api_bad_checksums(api, checksums, message):
    """The server checks checksums before running anything."""
    a = api({},
            {"org.test.marker": "import pathlib; pathlib.Path('/tmp/should-not-run').touch()\n"})
    reply = a.call({"source": "org.test.marker", "checksums": checksums})
    assert message in reply["error"]
    assert not os.path.exists("/tmp/should-not-run")


def test_api_malformed_request(api):
    """A request of the wrong shape gets an error reply, and the server keeps serving."""
    a = api({})
    assert "invalid sources request" in a.call({"method": "x"})["error"]
    assert "invalid sources request" in a.call([1, 2])["error"]
    assert a.call({"source": "org.osbuild.dnf", "checksums": []}) == {}


def test_api_errors_never_contain_secrets(api, tls_server, pki):
    """Secret values are scrubbed from every error message."""
    secret_value = "hunter2-super-secret"
    program = ("import json, sys\nargs = json.load(sys.stdin)\n"
               "s = args['secrets']['x']['password']\n"
               "print('leaking ' + s, file=sys.stderr)\n"
               "print(json.dumps({'error': 'bad ' + s}))\n")
    a = api({}, {"org.test.leak": program}, secrets={"x": {"password": secret_value}})
    with pytest.raises(RuntimeError) as exc:
        a.get("org.test.leak", [])
    assert secret_value not in str(exc.value)
    assert "bad ***" in str(exc.value)
    # a single line of a multi-line secret is scrubbed too
    pem = ("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
           "-----END PRIVATE KEY-----\n")
    program = ("import json, sys\nargs = json.load(sys.stdin)\n"
               "line = args['secrets']['k']['ssl_client_key'].splitlines()[1]\n"
               "print(json.dumps({'error': 'curl said ' + line}))\n")
    c = api({}, {"org.test.leakline": program}, secrets={"k": {"ssl_client_key": pem}})
    with pytest.raises(RuntimeError) as exc:
        c.get("org.test.leakline", [])
    assert "MIGHAgEAMBMGByqGSM49" not in str(exc.value)
    assert "curl said ***" in str(exc.value)
    # real source: a failing entitled download does not mention the key
    checksum = sha(b"nope")
    url = tls_server.add("nope", b"different")
    key = (pki / "client.key").read_text()
    secrets = {"r": {"ssl_client_cert": (pki / "client.crt").read_text(),
                     "ssl_client_key": key, "ssl_ca_cert": str(pki / "ca.crt")}}
    opts = {"org.osbuild.files": {"urls": {checksum: {"url": url, "secrets": {"name": "r"}}}}}
    b = api(opts, secrets=secrets)
    with pytest.raises(RuntimeError) as exc:
        b.get("org.osbuild.files", [checksum])
    assert "checksum mismatch" in str(exc.value)
    for line in key.splitlines():
        assert line not in str(exc.value)
    assert str(pki / "ca.crt") not in str(exc.value)


def test_api_concurrent_requests(server, api):
    """Concurrent requests from several clients are all answered."""
    urls = {}
    for i in range(10):
        data = f"c{i}".encode()
        urls[sha(data)] = server.add(f"c{i}", data)
    a = api({"org.osbuild.files": {"urls": urls}})
    errors = []

    def worker(cs):
        try:
            a.get("org.osbuild.files", [cs])
        except RuntimeError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(cs,)) for cs in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.listdir(a.output / "org.osbuild.files")) == sorted(urls)


def test_read_json_helper(api):
    """osbuild.sources.read_json returns the dnf configurations."""
    cs = sha(b"md")
    a = api({"org.osbuild.dnf": {"repos": {cs: {"baseurl": "http://x/"}}}})
    result = sources.read_json("org.osbuild.dnf", [cs], api_path=a.path, sources_dir=str(a.output))
    assert result == {cs: {"baseurl": "http://x/", "checksum": cs}}


def test_program_metadata():
    """Both sources declare STAGE_DESC/INFO/OPTS, and OPTS is a valid schema body."""
    # pylint: disable=import-outside-toplevel
    import jsonschema
    from osbuild import meta
    files_schema = None
    for path in (FILES, DNF):
        assert os.access(path, os.X_OK)
        with open(path, encoding="utf-8") as f:
            assert f.read().startswith("#!/usr/bin/python3\n")
        info = meta.index(REPO).get("sources", os.path.basename(path))
        schema = info.opts
        jsonschema.Draft4Validator.check_schema(schema)
        assert schema["additionalProperties"] is False
        assert info.desc and "\n" not in info.desc
        assert info.info
        if path == FILES:
            files_schema = schema
    validator = jsonschema.Draft4Validator(files_schema)
    good = {"urls": {sha(b"x"): "http://a/b", sha(b"y", "sha512"): {"url": "file:///x",
                                                                    "secrets": {"name": "n"}}}}
    assert not list(validator.iter_errors(good))
    for bad in ({"urls": {"md5:" + "0" * 32: "http://a"}}, {"urls": {"../x": "http://a"}},
                {}, {"urls": {sha(b"x"): {"url": "u", "extra": 1}}}):
        assert list(validator.iter_errors(bad))


def test_files_stale_temporaries_removed(server, tmp_path):
    """Work directories of killed runs are removed at once; live ones are left alone."""
    cache = tmp_path / "c"
    (cache / ".tmp-old").mkdir(parents=True)
    (cache / ".tmp-old" / "download-0-0").write_bytes(b"half")
    old = time.time() - 3 * 24 * 3600
    os.utime(cache / ".tmp-old", (old, old))
    (cache / ".tmp-fresh").mkdir()
    dead = cache / "work-0123456789ab"     # a killed run's: nobody holds its lock
    dead.mkdir()
    (dead / "download-0-0").write_bytes(b"half of a large file")
    with WorkDir(str(cache), "work-") as live:
        checksum = sha(b"z")
        urls = {checksum: server.add("z", b"z")}
        rc, _, _, _ = run_source(FILES, {"urls": urls}, [checksum], cache, tmp_path / "o")
        assert rc == 0
        assert cache_entries(cache) == sorted([".tmp-fresh", checksum,
                                               os.path.basename(live.path)])


def test_files_bad_parallel_setting(server, tmp_path):
    """A bad OSBUILD_SOURCES_MAX_PARALLEL is a clear error."""
    checksum = sha(b"q")
    urls = {checksum: server.add("q", b"q")}
    rc, reply, _, _ = run_source(FILES, {"urls": urls}, [checksum], tmp_path / "c", tmp_path / "o",
                                 env={"OSBUILD_SOURCES_MAX_PARALLEL": "many"})
    assert rc == 1
    assert "OSBUILD_SOURCES_MAX_PARALLEL" in reply["error"]


@pytest.mark.skipif(not os.path.isdir("/dev/shm")
                    or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
                    reason="needs /dev/shm on another filesystem")
def test_files_output_on_other_filesystem(server, tmp_path):
    """When output and cache are on different filesystems the file is copied."""
    data = b"copied across filesystems"
    checksum = sha(data)
    urls = {checksum: server.add("xfs", data)}
    out = tempfile.mkdtemp(dir="/dev/shm", prefix="osbuild-test-")
    try:
        rc, reply, _, err = run_source(FILES, {"urls": urls}, [checksum], tmp_path / "c", out)
        assert (rc, reply) == (0, {}), err
        with open(os.path.join(out, checksum), "rb") as f:
            assert f.read() == data
        assert os.listdir(out) == [checksum]
    finally:
        shutil.rmtree(out)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(hypothesis.strategies.one_of(
    hypothesis.strategies.text(),
    hypothesis.strategies.from_regex(r"\Asha(256|384|512):[0-9a-f./]{0,130}\Z"),
))
def test_checksum_validation_is_path_safe(text):
    """Any checksum the server accepts is a plain, safe file name of the right length."""
    if checksum_error(text) is None:
        algo, digest = text.split(":")
        assert "/" not in text and text not in (".", "..")
        assert len(digest) == HASH_LENGTHS[algo]
        assert set(digest) <= set("0123456789abcdef")
