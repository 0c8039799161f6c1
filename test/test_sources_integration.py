"""Sources through real builds: a stage in the nspawn build root asks for files.

Uses the test-only stage `org.osbuild.files-test`, which fetches checksums
with `osbuild.sources.get()` and copies them into the tree.
"""

import json
import os

import pytest

from conftest import requires_root
# pylint: disable=unused-import
from test_sources import FileServer, pki_fixture, server_fixture, sha, tls_server_fixture

pytestmark = [pytest.mark.integration, requires_root()]


def manifest(checksums, urls, path="/srv/files"):
    """A one-stage manifest fetching `checksums` with the files source."""
    return {
        "pipeline": {
            "stages": [{"name": "org.osbuild.files-test",
                        "options": {"checksums": checksums, "path": path}}],
        },
        "sources": {"org.osbuild.files": {"urls": urls}},
    }


def tree_of(store, res):
    """Host path of the built tree."""
    return os.path.join(store, "refs", res.json["tree_id"])


def leftovers(store):
    """Per-stage source directories still present under STORE/tmp."""
    tmp = os.path.join(store, "tmp")
    return [d for d in os.listdir(tmp) if d.startswith("sources")] if os.path.isdir(tmp) else []


def test_build_fetches_and_reuses_cache(osbuild, store, server):
    """A stage gets its files; a second build with other options hits only the cache."""
    blobs = [os.urandom(2000 + i) for i in range(5)]
    urls = {sha(b): server.add(f"b{i}", b) for i, b in enumerate(blobs)}
    res = osbuild(manifest(list(urls), urls), store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.json["success"] is True
    out = res.json["stages"][0]["output"]
    assert "sources directory is read-only" in out
    tree = tree_of(store, res)
    for checksum, blob in zip(urls, blobs):
        with open(os.path.join(tree, "srv/files", checksum), "rb") as f:
            assert f.read() == blob
    cache = os.path.join(store, "sources", "org.osbuild.files")
    assert sorted(os.listdir(cache)) == sorted(urls)
    assert leftovers(store) == []
    assert all(server.count(f"b{i}") == 1 for i in range(5))
    # a different stage (new id) needing the same files: nothing is downloaded again
    res = osbuild(manifest(list(urls), urls, path="/other"), store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(server.count(f"b{i}") == 1 for i in range(5))


@pytest.mark.parametrize("case", ["unknown", "mismatch", "404", "traversal", "md5"])
def test_build_bad_input_fails_stage(osbuild, store, server, case):
    """Each bad input fails the stage with a clear message and leaves the cache clean."""
    data = b"payload"
    checksum = sha(data)
    urls = {checksum: server.add("payload", data)}
    wanted = [checksum]
    expect = ""
    if case == "unknown":
        wanted = [sha(b"something else")]
        expect = "unknown checksum"
    elif case == "mismatch":
        server.files["/payload"] = b"tampered"
        expect = "checksum mismatch"
    elif case == "404":
        urls = {checksum: f"{server.base}/missing"}
        expect = "HTTP error 404"
    elif case == "traversal":
        wanted = ["../../etc/passwd"]
        expect = "malformed checksum"
    elif case == "md5":
        wanted = ["md5:" + "0" * 32]
        expect = "unsupported checksum algorithm"
    res = osbuild(manifest(wanted, urls), store)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.json["success"] is False
    stage = res.json["stages"][-1]
    assert stage["success"] is False
    assert expect in stage["output"]
    assert "Traceback" not in stage["output"]
    cache = os.path.join(store, "sources", "org.osbuild.files")
    assert not os.path.isdir(cache) or os.listdir(cache) == []
    assert leftovers(store) == []


def test_build_with_secrets(osbuild, store, tls_server, pki, tmp_path):
    """An entitled download works with --secrets; secrets appear nowhere in output or store."""
    data = b"entitled rpm content"
    checksum = sha(data)
    url = tls_server.add("ent.rpm", data)
    key = (pki / "client.key").read_text()
    secrets = {"org.osbuild.rhsm": {"ssl_client_cert": (pki / "client.crt").read_text(),
                                    "ssl_client_key": key,
                                    "ssl_ca_cert": (pki / "ca.crt").read_text()}}
    secrets_file = tmp_path / "secrets.json"
    secrets_file.write_text(json.dumps(secrets))
    os.chmod(secrets_file, 0o600)
    urls = {checksum: {"url": url, "secrets": {"name": "org.osbuild.rhsm"}}}
    key_lines = [line for line in key.splitlines() if "-----" not in line]
    tls_server.markers = key_lines

    for json_output in (True, False):
        res = osbuild(manifest([checksum], urls), store, "--secrets", secrets_file,
                      json_output=json_output)
        assert res.returncode == 0, res.stdout + res.stderr
        for line in key_lines:
            assert line not in res.stdout + res.stderr
    assert tls_server.count("ent.rpm") == 1
    assert tls_server.markers_seen == set()
    # nothing in the store (trees, refs, cache, tmp) holds the key
    for root, _, files in os.walk(store):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                content = f.read()
            assert key_lines[0].encode() not in content, path

    # failing entitled download: the error names the URL but not the secrets
    bad = sha(b"other")
    urls = {bad: {"url": url, "secrets": {"name": "org.osbuild.rhsm"}}}
    res = osbuild(manifest([bad], urls, path="/x"), store, "--secrets", secrets_file)
    assert res.returncode == 1
    assert "checksum mismatch" in res.json["stages"][-1]["output"]
    for line in key_lines:
        assert line not in res.stdout + res.stderr

    # without --secrets: a clear message
    res = osbuild(manifest([bad], urls, path="/y"), store)
    assert res.returncode == 1
    assert "needs the secret 'org.osbuild.rhsm'" in res.json["stages"][-1]["output"]


def test_build_dnf_source(osbuild, store):
    """A stage resolves a repository checksum through the dnf source."""
    checksum = sha(b"repomd.xml of a test repository")
    repo = {"baseurl": "http://127.0.0.1:8/repo", "gpgkey": "KEY"}
    desc = {
        "pipeline": {"stages": [{"name": "org.osbuild.files-test",
                                 "options": {"source": "org.osbuild.dnf",
                                             "checksums": [checksum], "path": "/repos"}}]},
        "sources": {"org.osbuild.dnf": {"repos": {checksum: repo}}},
    }
    res = osbuild(desc, store)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(os.path.join(tree_of(store, res), "repos", checksum), encoding="utf-8") as f:
        assert json.load(f) == dict(repo, checksum=checksum)
    desc["sources"] = {}
    desc["pipeline"]["stages"][0]["options"]["path"] = "/other"
    res = osbuild(desc, store)
    assert res.returncode == 1
    assert "unknown repository checksum" in res.json["stages"][-1]["output"]


def test_build_misbehaving_source(store, tmp_path):
    """A source printing invalid JSON fails the stage with what it printed."""
    # pylint: disable=import-outside-toplevel
    import shutil
    import subprocess
    import sys
    from conftest import REPO
    libdir = tmp_path / "lib"
    libdir.mkdir()
    for part in ("stages", "runners", "assemblers", "sources", "osbuild"):
        shutil.copytree(os.path.join(REPO, part), libdir / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    bad = libdir / "sources" / "org.test.garbage"
    bad.write_text("#!/usr/bin/python3\nprint('<html>definitely not json</html>')\n")
    bad.chmod(0o755)
    desc = {"pipeline": {"stages": [{"name": "org.osbuild.files-test",
                                     "options": {"source": "org.test.garbage",
                                                 "checksums": [sha(b"x")], "path": "/x"}}]}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(desc))
    proc = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", str(libdir),
                           "--store", str(store), "--json", str(path)],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    output = json.loads(proc.stdout)["stages"][-1]["output"]
    assert "did not print a JSON reply" in output
    assert "<html>definitely not json</html>" in output
