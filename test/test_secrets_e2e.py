"""Secrets (--secrets) end to end: never in logs, results, the store or process arguments.

A build fetches a file through the org.osbuild.files source with a secret
(client certificate/key and CA as PEM text) while a watcher reads every
process' command line. The secret's text must not show up in the human or
JSON output, in any file of the store (trees, cache, refs) or in any
process' arguments, whether the build succeeds or fails.
"""

import contextlib
import functools
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from hygiene import leftovers, no_leftovers_fixture  # pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "sources",
                                                                 "org.osbuild.files")),
                                 reason="no files source")]


@pytest.fixture(name="server")
def server_fixture(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, directory)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()


class ArgvWatcher(threading.Thread):
    """Reads all processes' command lines until stopped; collects those containing `needle`."""

    def __init__(self, needle):
        super().__init__(daemon=True)
        self.needle = needle.encode()
        self.hits = []
        self.scans = 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read()
                except OSError:
                    continue
                if self.needle in argv:
                    self.hits.append(argv.replace(b"\0", b" ")[:300])
            self.scans += 1

    def stop(self):
        """Stop watching."""
        self.stopped.set()
        self.join()


def files_containing(top, needle):
    """Files under `top` whose content or name contains `needle` (bytes)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            if needle in name.encode():
                found.append(path)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(path)
    return found


def secret_pem(token, kind):
    """PEM-shaped text whose body is the secret token."""
    return f"-----BEGIN {kind}-----\n{token}\n-----END {kind}-----\n"


@pytest.mark.parametrize("outcome", ["success", "missing-file"])
@pytest.mark.parametrize("json_output", [True, False])
def test_secrets_never_leak(tmp_path, server, outcome, json_output):
    """The secret's text is nowhere: output, result, store, process arguments."""
    base, www = server
    token = f"SECRET{uuid.uuid4().hex}"
    data = f"payload {uuid.uuid4().hex}\n".encode()
    (www / "file").write_bytes(data)
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    url = f"{base}/file" if outcome == "success" else f"{base}/missing"
    manifest = {
        "pipeline": {"stages": [{"name": "org.osbuild.files-test",
                                 "options": {"checksums": [checksum], "path": "/files"}}]},
        "sources": {"org.osbuild.files": {"urls": {
            checksum: {"url": url, "secrets": {"name": "entitlement"}}}}},
    }
    secrets = {"entitlement": {"ssl_client_cert": secret_pem(token, "CERTIFICATE"),
                               "ssl_client_key": secret_pem(token + "K", "PRIVATE KEY"),
                               "ssl_ca_cert": secret_pem(token + "C", "CERTIFICATE")}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    secrets_path = tmp_path / "secrets.json"
    secrets_path.write_text(json.dumps(secrets))
    os.chmod(secrets_path, 0o600)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(store),
           "--secrets", str(secrets_path), str(tmp_path / "manifest.json")]
    if json_output:
        cmd.insert(-1, "--json")
    watcher = ArgvWatcher(token)
    watcher.start()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=600, check=False)
    finally:
        watcher.stop()
    assert watcher.scans > 0
    if outcome == "success":
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        tree = None
        for name in os.listdir(store / "refs"):
            tree = store / "refs" / name
        assert (tree / "files" / checksum).read_bytes() == data
    else:
        assert proc.returncode == 1
        assert b"org.osbuild.files" in proc.stdout + proc.stderr
    needle = token.encode()
    assert needle not in proc.stdout, "secret in stdout"
    assert needle not in proc.stderr, "secret in stderr"
    assert watcher.hits == [], "secret in a process' arguments"
    assert files_containing(str(store), needle) == [], "secret in the store"
    assert files_containing("/run/osbuild", needle) == [], "secret left in /run/osbuild"
    assert leftovers(tmp_path) == {}


class SlowHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET after `delay` seconds; sets `requested` when a request arrives."""

    requested = None
    delay = 30
    body = b""

    def do_GET(self):  # pylint: disable=invalid-name
        """Wait, then send the body."""
        self.requested.set()
        time.sleep(self.delay)
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        except OSError:
            pass

    def log_message(self, *args):  # pylint: disable=arguments-differ
        """Quiet."""


def descendants(pid):
    """All living descendants of `pid`."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        children = []
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            tasks = []
        for task in tasks:  # children of every thread, not only the main one's
            try:
                with open(f"/proc/{current}/task/{task}/children", encoding="utf-8") as f:
                    children += [int(c) for c in f.read().split()]
            except OSError:
                pass
        found += children
        todo += children
    return found


def alive(pid):
    """Whether `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("victims", ["osbuild", "everything"])
def test_killed_during_download(tmp_path, victims):
    """SIGKILL during a download that uses secrets: the secret was never written to disk
    (nothing in the store even when every process is killed at once, like on power loss
    or a cgroup kill), and when only osbuild is killed, the source program and curl die
    with it instead of running on."""
    token = f"SECRET{uuid.uuid4().hex}"
    data = f"payload {uuid.uuid4().hex}\n".encode()
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    requested = threading.Event()
    handler = type("Handler", (SlowHandler,), {"requested": requested, "body": data})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/file"
    manifest = {
        "pipeline": {"stages": [{"name": "org.osbuild.files-test",
                                 "options": {"checksums": [checksum], "path": "/files"}}]},
        "sources": {"org.osbuild.files": {"urls": {
            checksum: {"url": url, "secrets": {"name": "entitlement"}}}}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    secrets_path = tmp_path / "secrets.json"
    secrets_path.write_text(json.dumps({"entitlement": {
        "ssl_client_cert": secret_pem(token, "CERTIFICATE"),
        "ssl_client_key": secret_pem(token, "PRIVATE KEY")}}))
    store = tmp_path / "store"
    # pylint: disable-next=consider-using-with  # interrupted and waited for below
    proc = subprocess.Popen([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
                             str(store), "--json", "--secrets", str(secrets_path),
                             str(tmp_path / "manifest.json")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert requested.wait(120), "the download never started"
        tree = descendants(proc.pid)
        if victims == "everything":
            for pid in [proc.pid] + tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
        assert files_containing(str(store), token.encode()) == [], "secret on disk"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.05)
        assert [p for p in tree if alive(p)] == [], "processes outlived osbuild"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        httpd.shutdown()
        httpd.server_close()
