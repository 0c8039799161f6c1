"""Build hosts sharing work through an S3 bucket (--remote), against a real radosgw.

Each "host" is a separate store; all talk to one Ceph radosgw on 127.0.0.1
(test/s3server.py). The attacks (tampered, truncated and malicious archives,
refs lying about trees, uploads of secret-fetched content) are performed on
the bucket directly with an admin client, then a real build must neither
fail nor use the bad object, and the host must stay untouched.
"""

import copy
import hashlib
import http.server
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
import uuid

import pytest

from s3server import s3_fixture  # pylint: disable=unused-import
from hygiene import check_store

from osbuild import remote as remote_mod
from osbuild.manifest import load
from osbuild.treesum import treesum
from osbuild.util import treearchive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- helpers

def sha256(data):
    """`sha256:HEX` of bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FileServer:
    """HTTP on 127.0.0.1 serving {path: bytes}; counts requests; can be shut down."""

    def __init__(self, files):
        self.files = files
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            """GET only."""

            def do_GET(self):  # pylint: disable=invalid-name
                """Serve a file or 404."""
                outer.requests.append(self.path)
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # pylint: disable=arguments-differ
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        """Stop serving (later downloads get connection refused)."""
        self.httpd.shutdown()
        self.httpd.server_close()


def osbuild(store, manifest, s3, url, *extra, env=None, json_output=True, timeout=600):
    """Run osbuild on `manifest` (a dict) with --remote `url`; returns the process result."""
    path = os.path.join(os.path.dirname(str(store)), f"manifest-{uuid.uuid4().hex[:8]}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(store)]
    if json_output:
        cmd.append("--json")
    if url:
        cmd += ["--remote", url]
    cmd += [*extra, path]
    full_env = {**os.environ, **(s3.env() if s3 else {}), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=full_env,
                          timeout=timeout, check=False)


def result(proc):
    """The JSON result of a successful run (asserts success)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["success"] is True
    return res


def ran(res):
    """Names of all programs that ran, build pipelines included."""
    names = []
    while res:
        names += [s["name"] for s in res.get("stages", [])]
        if res.get("assembler"):
            names.append(res["assembler"]["name"])
        res = res.get("build")
    return names


def new_bucket(s3):
    """A fresh bucket; returns (name, s3://name/prefix)."""
    name = f"osb-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name, f"s3://{name}/hosts"


def keys(s3, bucket):
    """All keys of a bucket with their sizes."""
    client = s3.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            found[item["Key"]] = item["Size"]
    return found


def tree_manifest(token, extra_script=""):
    """Two script stages making a tree with owners, modes, hard links, xattrs; tar assembler."""
    script = (f": {token}\nmkdir -p etc usr/bin home/user\necho {token} > etc/motd\n"
              "printf '#!/bin/sh\\necho hi\\n' > usr/bin/hello\nchmod 4755 usr/bin/hello\n"
              "ln usr/bin/hello usr/bin/hello-hard\nln -s ../usr/bin/hello usr/hello-link\n"
              "chown 1000:1000 home/user\nchmod 1777 home\n"
              "python3 -c \"import os; os.setxattr('etc/motd', 'user.osbuild', b'remote')\"\n"
              + extra_script)
    return {"pipeline": {
        "stages": [{"name": "org.osbuild.script", "options": {"chroot": False, "script": script}},
                   {"name": "org.osbuild.script",
                    "options": {"chroot": False, "script": "echo second >> etc/motd"}}],
        "assembler": {"name": "org.osbuild.tar",
                      "options": {"filename": "tree.tar.zst", "compression": "zstd"}}}}


def ids_of(manifest):
    """(stage ids, tree id, output id) of a manifest."""
    pipeline = load(manifest, REPO).pipeline
    return [s.id for s in pipeline.stages], pipeline.tree_id, pipeline.output_id


def treesum_of(store, object_id):
    """The treesum a store's ref points at."""
    return os.path.basename(os.path.realpath(os.path.join(store, "refs", object_id)))


def put(s3, bucket, key, body):
    """Overwrite `key` as a writer of the bucket may."""
    s3.client().put_object(Bucket=bucket, Key=key, Body=body)


def get(s3, bucket, key):
    """The bytes of `key`."""
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def zstd_tar(members):
    """A zstd tar built by Python's tarfile from [(TarInfo, bytes or None)]."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return subprocess.run(["zstd", "-q", "-c"], input=raw.getvalue(), capture_output=True,
                          check=True).stdout


def member(name, kind=tarfile.REGTYPE, data=b"", **attrs):
    """A TarInfo (and its data) for `zstd_tar`."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data if kind == tarfile.REGTYPE else None


def plant(s3, bucket, prefix, object_id, archive, tree_sum=None):
    """Record `archive` (bytes) in the bucket as the tree of `object_id`, self-consistently.

    Without `tree_sum`, the recorded treesum is that of the archive's real content
    (what a malicious writer would do to pass verification).
    """
    digest = hashlib.sha256(archive).hexdigest()
    put(s3, bucket, f"{prefix}/archives/{digest}.tar.zst", archive)
    if tree_sum is None:
        tree_sum = "0" * 64
    ref = {"treesum": tree_sum, "archive": digest, "size": len(archive)}
    put(s3, bucket, f"{prefix}/refs/{object_id}", json.dumps(ref).encode())


# ------------------------------------------------------------- unit level

@pytest.mark.parametrize("url,message", [
    ("http://bucket/x", "expected s3://BUCKET/PREFIX"),
    ("s3://", "not a valid bucket name"),
    ("s3://UPPER/x", "not a valid bucket name"),
    ("s3://bucket/a/../b", "'..'"),
    ("s3://bucket/a//b", "empty"),
])
def test_bad_remote_url_is_one_line_error(tmp_path, url, message):
    """A malformed --remote stops before anything runs: one line, exit 1, empty store."""
    store = tmp_path / "store"
    proc = osbuild(store, {"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}}, None, url)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(store)


def test_missing_boto3_says_what_to_install(tmp_path):
    """Without boto3, --remote is one warning naming what to install; the build goes on."""
    fake = tmp_path / "fake"
    (fake / "boto3").mkdir(parents=True)
    (fake / "boto3" / "__init__.py").write_text("raise ImportError('No module named boto3')\n")
    proc = osbuild(tmp_path / "store", {"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}},
                   None, "s3://bucket/x", env={"PYTHONPATH": f"{fake}:{REPO}"})
    result(proc)
    assert "pip install boto3" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_shareable_checksums_skip_secrets():
    """Only entries fetched without secrets may be uploaded."""
    options = {"urls": {"sha256:" + "a" * 64: "http://x/a",
                        "sha256:" + "b" * 64: {"url": "http://x/b"},
                        "sha256:" + "c" * 64: {"url": "https://x/c", "secrets": {"name": "s"}}}}
    assert remote_mod.shareable_checksums(options, sorted(options["urls"])) == \
        ["sha256:" + "a" * 64, "sha256:" + "b" * 64]
    assert remote_mod.shareable_checksums({"repos": {}}, ["sha256:" + "a" * 64]) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners)")
def test_archive_round_trip_keeps_everything(tmp_path):
    """Owners, setuid, sticky, xattrs, hard links, symlinks, FIFOs, mtimes survive pack/unpack."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"data")
    os.chown(src / "a" / "f", 123, 456)
    os.chmod(src / "a" / "f", 0o4755)
    os.chmod(src / "a", 0o1777)
    os.link(src / "a" / "f", src / "a" / "b" / "hard")
    os.symlink("/etc/passwd", src / "abs")
    os.mkfifo(src / "fifo")
    os.setxattr(src / "a" / "f", "user.test", b"value")
    os.utime(src / "a" / "f", ns=(1, 1_234_567_891))
    os.utime(src / "abs", ns=(1, 2_000_000_007), follow_symlinks=False)
    os.utime(src / "a", ns=(1, 3_000_000_011))
    os.chmod(src, 0o750)
    archive = tmp_path / "a.tar.zst"
    treearchive.pack(str(src), str(archive))
    dst = tmp_path / "dst"
    dst.mkdir()
    treearchive.unpack(str(archive), str(dst))
    assert treesum(str(src)) == treesum(str(dst))
    st = os.lstat(dst / "a" / "f")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_nlink) == (123, 456, 0o4755, 2)
    assert st.st_ino == os.lstat(dst / "a" / "b" / "hard").st_ino
    assert st.st_mtime_ns == 1_234_567_891
    assert os.lstat(dst / "abs").st_mtime_ns == 2_000_000_007
    assert os.lstat(dst / "a").st_mtime_ns == 3_000_000_011
    assert os.getxattr(dst / "a" / "f", "user.test") == b"value"
    assert os.lstat(dst).st_mode & 0o7777 == 0o750
    # deterministic: the same tree packs to the same bytes
    again = tmp_path / "b.tar.zst"
    treearchive.pack(str(src), str(again))
    assert archive.read_bytes() == again.read_bytes()


BAD_ARCHIVES = {
    "absolute": [member(".", tarfile.DIRTYPE), member("/tmp/osbuild-abs-{token}", data=b"x")],
    "dotdot": [member(".", tarfile.DIRTYPE),
               member("a/../../../../tmp/osbuild-dotdot-{token}", data=b"x")],
    "symlink-walk": [member(".", tarfile.DIRTYPE),
                     member("evil", tarfile.SYMTYPE, linkname="/tmp"),
                     member("evil/osbuild-walk-{token}", data=b"x")],
    "relative-symlink-walk": [member(".", tarfile.DIRTYPE),
                              member("up", tarfile.SYMTYPE, linkname="../../../../../tmp"),
                              member("up/osbuild-rel-{token}", data=b"x")],
    "hardlink-out": [member(".", tarfile.DIRTYPE),
                     member("passwd", tarfile.LNKTYPE, linkname="/etc/passwd")],
    "device": [member(".", tarfile.DIRTYPE),
               member("null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)],
    "duplicate": [member(".", tarfile.DIRTYPE), member("x", tarfile.DIRTYPE),
                  member("x", tarfile.SYMTYPE, linkname="/tmp")],
    "no-root": [member("x", data=b"x")],
}


def bad_members(case, token):
    """Fresh copies of the members of BAD_ARCHIVES[case], names carrying `token`."""
    members = []
    for info, data in BAD_ARCHIVES[case]:
        info = copy.copy(info)
        info.name = info.name.replace("{token}", token)
        members.append((info, data))
    return members


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_unsafe_archive_refused_before_extraction(tmp_path, case):
    """Each unsafe member is refused and nothing lands outside (or inside) the target."""
    token = uuid.uuid4().hex
    members = bad_members(case, token)
    archive = tmp_path / "bad.tar.zst"
    archive.write_bytes(zstd_tar(members))
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(treearchive.ArchiveError):
        treearchive.check(str(archive))
    with pytest.raises(treearchive.ArchiveError):
        treearchive.unpack(str(archive), str(dst))
    assert os.listdir(dst) == []
    assert not [p for p in os.listdir("/tmp") if token in p]


def test_zip_bomb_capped(tmp_path):
    """A tree larger than the cap is refused before extraction."""
    archive = tmp_path / "big.tar.zst"
    archive.write_bytes(zstd_tar([member(".", tarfile.DIRTYPE),
                                  member("zeros", data=bytes(1 << 20))]))
    with pytest.raises(treearchive.ArchiveError, match="exceeds"):
        treearchive.check(str(archive), max_bytes=1 << 19)


# ------------------------------------------------- against the real server

def test_conditional_put_first_writer_wins(s3):
    """Two writers of one key: the second is refused by the server, the first content stays."""
    bucket, url = new_bucket(s3)
    env = s3.env()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        remote = remote_mod.open_remote(url, verbose=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert remote is not None
    assert remote.put_if_absent(remote.key("refs", "x"), body=b"first") is True
    assert remote.put_if_absent(remote.key("refs", "x"), body=b"second") is False
    assert get(s3, bucket, "hosts/refs/x") == b"first"


@pytest.mark.integration
def test_second_host_builds_from_remote_alone(s3, tmp_path):
    """Host B runs no stage and needs no package URL: everything comes from the bucket."""
    token = uuid.uuid4().hex
    payload = f"package {token}\n".encode()
    checksum = sha256(payload)
    files = FileServer({"/pkg": payload})
    manifest = tree_manifest(token)
    manifest["pipeline"]["stages"].insert(1, {
        "name": "org.osbuild.files-test",
        "options": {"checksums": [checksum], "path": "/srv"}})
    manifest["sources"] = {"org.osbuild.files": {"urls": {checksum: files.url + "/pkg"}}}
    bucket, url = new_bucket(s3)
    stage_ids, tree_id, output_id = ids_of(manifest)

    t0 = time.monotonic()
    res_a = result(osbuild(tmp_path / "a", manifest, s3, url, "--checkpoint", stage_ids[0]))
    cold = time.monotonic() - t0
    assert ran(res_a) == ["org.osbuild.script", "org.osbuild.files-test",
                          "org.osbuild.script", "org.osbuild.tar"]
    stored = keys(s3, bucket)
    for object_id in (stage_ids[0], tree_id, output_id):
        assert f"hosts/refs/{object_id}" in stored
    assert f"hosts/sources/org.osbuild.files/{checksum}" in stored

    files.stop()
    t0 = time.monotonic()
    proc_b = osbuild(tmp_path / "b", manifest, s3, url)
    warm = time.monotonic() - t0
    res_b = result(proc_b)
    assert ran(res_b) == [], proc_b.stderr
    assert res_b["output_id"] == output_id
    assert treesum_of(tmp_path / "b", output_id) == treesum_of(tmp_path / "a", output_id)
    check_store(tmp_path / "b")
    print(f"host A {cold:.1f} s, host B {warm:.1f} s")

    # host C needs the tree (new assembler options): it pulls the tree, runs only the assembler
    manifest["pipeline"]["assembler"]["options"]["filename"] = "other.tar.zst"
    proc_c = osbuild(tmp_path / "c", manifest, s3, url)
    res_c = result(proc_c)
    assert ran(res_c) == ["org.osbuild.tar"], proc_c.stderr
    assert treesum_of(tmp_path / "c", tree_id) == treesum_of(tmp_path / "a", tree_id)
    motd = tmp_path / "c" / "refs" / tree_id / "etc" / "motd"
    assert os.getxattr(motd, "user.osbuild") == b"remote"
    hello = os.lstat(tmp_path / "c" / "refs" / tree_id / "usr" / "bin" / "hello")
    assert hello.st_mode & 0o7777 == 0o4755 and hello.st_nlink == 2


@pytest.mark.integration
def test_sources_come_from_remote(s3, tmp_path):
    """A stage that must run gets its file from the bucket when the URL is dead."""
    token = uuid.uuid4().hex
    payload = f"shared source {token}\n".encode()
    checksum = sha256(payload)
    files = FileServer({"/pkg": payload})
    bucket, url = new_bucket(s3)

    def manifest(tag):
        return {"pipeline": {"stages": [{"name": "org.osbuild.files-test",
                                         "options": {"checksums": [checksum],
                                                     "path": f"/srv/{tag}"}}]},
                "sources": {"org.osbuild.files": {"urls": {checksum: files.url + "/pkg"}}}}

    result(osbuild(tmp_path / "a", manifest("a"), s3, url))
    assert files.requests == ["/pkg"]
    files.stop()
    res = result(osbuild(tmp_path / "b", manifest("b"), s3, url))
    assert ran(res) == ["org.osbuild.files-test"]
    tree = tmp_path / "b" / "refs" / res["tree_id"]
    assert (tree / "srv" / "b" / checksum).read_bytes() == payload
    assert f"hosts/sources/org.osbuild.files/{checksum}" in keys(s3, bucket)


@pytest.mark.integration
def test_tampered_source_in_bucket_is_not_used(s3, tmp_path):
    """A source file whose content is not its checksum is ignored; the URL is used."""
    token = uuid.uuid4().hex
    payload = f"real {token}\n".encode()
    checksum = sha256(payload)
    files = FileServer({"/pkg": payload})
    bucket, url = new_bucket(s3)
    put(s3, bucket, f"hosts/sources/org.osbuild.files/{checksum}", b"evil content")
    manifest = {"pipeline": {"stages": [{"name": "org.osbuild.files-test",
                                         "options": {"checksums": [checksum], "path": "/srv"}}]},
                "sources": {"org.osbuild.files": {"urls": {checksum: files.url + "/pkg"}}}}
    proc = osbuild(tmp_path / "a", manifest, s3, url)
    res = result(proc)
    assert "other content" in proc.stderr
    assert files.requests == ["/pkg"]
    tree = tmp_path / "a" / "refs" / res["tree_id"]
    assert (tree / "srv" / checksum).read_bytes() == payload
    files.stop()


@pytest.mark.integration
def test_secret_fetched_source_never_uploaded(s3, tmp_path):
    """Content fetched with secrets stays on the host that had them."""
    token = uuid.uuid4().hex
    public, private = f"public {token}\n".encode(), f"entitled {token}\n".encode()
    files = FileServer({"/public": public, "/private": private})
    bucket, url = new_bucket(s3)
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"entitled": {
        "ssl_ca_cert": "/etc/ssl/certs/ca-certificates.crt"}}))
    urls = {sha256(public): files.url + "/public",
            sha256(private): {"url": files.url + "/private", "secrets": {"name": "entitled"}}}
    manifest = {"pipeline": {"stages": [{"name": "org.osbuild.files-test",
                                         "options": {"checksums": sorted(urls), "path": "/srv"}}]},
                "sources": {"org.osbuild.files": {"urls": urls}}}
    result(osbuild(tmp_path / "a", manifest, s3, url, "--secrets", secrets))
    stored = keys(s3, bucket)
    assert f"hosts/sources/org.osbuild.files/{sha256(public)}" in stored
    assert not [k for k in stored if sha256(private) in k]
    files.stop()


def _built(s3, tmp_path, token):
    """Host A builds tree_manifest(token) with its first stage checkpointed."""
    manifest = tree_manifest(token)
    bucket, url = new_bucket(s3)
    stage_ids, tree_id, output_id = ids_of(manifest)
    result(osbuild(tmp_path / "a", manifest, s3, url, "--checkpoint", stage_ids[0]))
    return manifest, bucket, url, stage_ids, tree_id, output_id


def _assert_built_locally(proc, manifest, store, reference, warning):
    """The build succeeded, ran its stages itself, warned, and its tree is the real one."""
    res = result(proc)
    assert "org.osbuild.script" in ran(res)
    assert warning in proc.stderr, proc.stderr
    _, tree_id, _ = ids_of(manifest)
    with open(os.path.join(store, "refs", tree_id, "etc", "motd"), encoding="utf-8") as f:
        assert f.read() == reference
    check_store(store)


TAMPER = ["flipped-bytes", "truncated", "wrong-tree", "missing-archive", "bad-ref"]


@pytest.mark.integration
@pytest.mark.parametrize("how", TAMPER)
def test_tampered_remote_never_poisons(s3, tmp_path, how):
    """Corrupt, truncated, swapped or missing objects are ignored; the build is done locally."""
    token = uuid.uuid4().hex
    manifest, bucket, url, _, tree_id, output_id = _built(s3, tmp_path, token)
    other = tree_manifest(token + "-other")
    result(osbuild(tmp_path / "other", other, s3, url))
    _, other_tree, other_output = ids_of(other)
    for object_id, donor in ((tree_id, other_tree), (output_id, other_output)):
        ref_key = f"hosts/refs/{object_id}"
        ref = json.loads(get(s3, bucket, ref_key))
        archive_key = f"hosts/archives/{ref['archive']}.tar.zst"
        data = get(s3, bucket, archive_key)
        if how == "flipped-bytes":
            mid = len(data) // 2
            put(s3, bucket, archive_key, data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])
        elif how == "truncated":
            put(s3, bucket, archive_key, data[:len(data) // 2])
        elif how == "wrong-tree":
            # a consistent archive of another tree under this id, recorded with our treesum
            donor_ref = json.loads(get(s3, bucket, f"hosts/refs/{donor}"))
            put(s3, bucket, ref_key, json.dumps(dict(donor_ref, treesum=ref["treesum"])).encode())
        elif how == "missing-archive":
            s3.client().delete_object(Bucket=bucket, Key=archive_key)
        elif how == "bad-ref":
            put(s3, bucket, ref_key, b'{"treesum": "../../etc", "archive": 1}')
    warning = {"flipped-bytes": "corrupt", "truncated": "truncated", "wrong-tree": "treesum",
               "missing-archive": "missing", "bad-ref": "malformed"}[how]
    proc = osbuild(tmp_path / "b", manifest, s3, url)
    _assert_built_locally(proc, manifest, tmp_path / "b", f"{token}\nsecond\n", warning)


@pytest.mark.integration
@pytest.mark.parametrize("case", ["dotdot", "symlink-walk", "relative-symlink-walk", "device",
                                  "hardlink-out"])
def test_malicious_archive_in_bucket(s3, tmp_path, case):
    """A bucket writer's self-consistent malicious archive does not touch the host or the store."""
    token = uuid.uuid4().hex
    manifest, bucket, url, _, tree_id, output_id = _built(s3, tmp_path, token)
    members = bad_members(case, token)
    archive = zstd_tar(members + [member("etc", tarfile.DIRTYPE),
                                  member("etc/motd", data=b"poisoned\n")])
    for object_id in (tree_id, output_id):
        plant(s3, bucket, "hosts", object_id, archive)
    proc = osbuild(tmp_path / "b", manifest, s3, url)
    _assert_built_locally(proc, manifest, tmp_path / "b", f"{token}\nsecond\n", "refused")
    assert not [p for p in os.listdir("/tmp") if token in p]
    assert os.path.realpath("/tmp") == "/tmp"


@pytest.mark.integration
def test_malicious_archive_with_matching_treesum_is_refused(s3, tmp_path):
    """The treesum is no defence against a writer (it can record the right one): the checks are."""
    token = uuid.uuid4().hex
    manifest, bucket, url, _, tree_id, output_id = _built(s3, tmp_path, token)
    members = bad_members("device", "")
    archive = zstd_tar(members)
    # what the tree would hash to if tar had created the device node
    probe = tmp_path / "probe"
    probe.mkdir()
    os.mknod(probe / "null", 0o20666, os.makedev(1, 3))
    os.chmod(probe, 0o755)
    for object_id in (tree_id, output_id):
        plant(s3, bucket, "hosts", object_id, archive, tree_sum=treesum(str(probe)))
    proc = osbuild(tmp_path / "b", manifest, s3, url)
    _assert_built_locally(proc, manifest, tmp_path / "b", f"{token}\nsecond\n", "device node")
    for root, _, names in os.walk(tmp_path / "b"):
        for name in names:
            mode = os.lstat(os.path.join(root, name)).st_mode
            assert not stat.S_ISCHR(mode) and not stat.S_ISBLK(mode)


@pytest.mark.integration
def test_three_hosts_at_once(s3, tmp_path):
    """Three hosts building and pushing the same ids at once all succeed; one ref per id."""
    token = uuid.uuid4().hex
    manifest = tree_manifest(token)
    bucket, url = new_bucket(s3)
    stage_ids, tree_id, output_id = ids_of(manifest)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest))
    env = dict(os.environ, **s3.env())
    argv = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--json", "--remote", url,
            "--checkpoint", stage_ids[0], str(path)]
    procs = [subprocess.Popen(  # pylint: disable=consider-using-with
        argv + ["--store", str(tmp_path / f"h{i}")], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert json.loads(out)["success"] is True
        assert "warning" not in err, err
    refs = [k for k in keys(s3, bucket) if k.startswith("hosts/refs/")]
    assert sorted(refs) == sorted(f"hosts/refs/{i}" for i in (stage_ids[0], tree_id, output_id))
    res = result(osbuild(tmp_path / "h3", manifest, s3, url))
    assert ran(res) == []


@pytest.mark.integration
def test_remote_stopped_mid_build(s3, tmp_path):
    """The gateway going away during a build is a warning; the build finishes locally."""
    token = uuid.uuid4().hex
    manifest = tree_manifest(token, extra_script="sleep 4\n")
    _, url = new_bucket(s3)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest))
    proc = subprocess.Popen([sys.executable, "-m", "osbuild", "--libdir", REPO,  # pylint: disable=consider-using-with
                             "--store", str(tmp_path / "a"), "--json", "--remote", url, str(path)],
                            cwd=REPO, env=dict(os.environ, **s3.env()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        work = tmp_path / "a" / "tmp"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (work.is_dir() and any(
                (work / d / "tree" / "etc" / "motd").exists() for d in os.listdir(work))):
            time.sleep(0.05)
        s3.stop_gateway()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        s3.start_gateway()
    assert proc.returncode == 0, err
    assert json.loads(out)["success"] is True
    assert "unreachable" in err and "building locally" in err, err
    assert len([line for line in err.splitlines() if "warning" in line]) == 1, err


@pytest.mark.integration
def test_unreachable_remote_is_a_warning(tmp_path):
    """No server at the endpoint: one warning, the build succeeds."""
    proc = osbuild(tmp_path / "a", {"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}}, None,
                   "s3://bucket/x", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                                         "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
                                         "AWS_DEFAULT_REGION": "us-east-1"})
    result(proc)
    assert "unreachable" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("problem", ["secret", "bucket"])
def test_bad_credentials_or_bucket_is_one_line(s3, tmp_path, problem):
    """Wrong credentials or a missing bucket: one clear line, the build goes on locally."""
    _, url = new_bucket(s3)
    env = {"AWS_SECRET_ACCESS_KEY": "wrong"} if problem == "secret" else {}
    if problem == "bucket":
        url = "s3://no-such-bucket-here/x"
    proc = osbuild(tmp_path / "a", {"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}}, s3,
                   url, env=env)
    result(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert ("denied" if problem == "secret" else "does not exist") in lines[0]
