"""Reproducible builds (issue 16): one manifest built twice gives the same trees and bytes.

Builds run in two stores at different paths, at different times and in
different time zones, one after the other or at once; the tree of every
stage (its treesum, which covers mtimes) and the outputs must be identical.
When they are not, the assertion lists the differing files (tools/tree-diff).
"""
# pylint: disable=missing-function-docstring

import concurrent.futures
import copy
import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
import time

import pytest

import debian_samples
import stagetest
from conftest import REPO, import_program, run_osbuild
from hygiene import check_store
from osbuild.pipeline import compute_id
from osbuild.reproducible import DEFAULT_EPOCH, clamp_mtimes, derive_uuid

TREE_DIFF = os.path.join(REPO, "tools", "tree-diff")
EPOCH = 1700000000

SCRIPT = ("mkdir -p etc usr/bin var/log home/user\n"
          "echo hello > etc/motd\n"
          "printf '#!/bin/sh\\necho hi\\n' > usr/bin/hello\n"
          "chmod 755 usr/bin/hello\n"
          "ln -s ../usr/bin/hello usr/hello-link\n"
          "ln usr/bin/hello usr/bin/hello-hard\n"
          "mkfifo var/fifo\n"
          "echo \"$SOURCE_DATE_EPOCH\" > etc/epoch\n"
          "touch -d '2030-01-01' home/user/future\n"
          "touch -d '2001-02-03' home/user/old\n")


def manifest(compression="none", epoch=EPOCH):
    pipeline = {
        "stages": [
            {"name": "org.osbuild.script", "options": {"chroot": False, "script": SCRIPT}},
            {"name": "org.osbuild.script",
             "options": {"chroot": False, "script": "echo more >> etc/motd; mkdir -p new/dir"}},
        ],
        "assembler": {"name": "org.osbuild.tar",
                      "options": {"filename": "tree.tar", "compression": compression}},
    }
    if epoch is not None:
        pipeline["source-epoch"] = epoch
    return {"pipeline": pipeline}


def treesum_of(store, object_id):
    """The object name (treesum) `refs/<object_id>` points at."""
    return os.path.basename(os.readlink(os.path.join(store, "refs", object_id)))


def differing_files(tree_a, tree_b, limit=40):
    """tools/tree-diff --mtime of two trees, as lines naming each differing path."""
    proc = subprocess.run([sys.executable, TREE_DIFF, "--mtime", tree_a, tree_b],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return [f"tree-diff failed: {proc.stderr.strip()}"]
    diff = json.loads(proc.stdout)
    lines = [f"only in the first: {p}" for p in diff["deleted_files"]]
    lines += [f"only in the second: {p}" for p in diff["added_files"]]
    lines += [f"differs: {p} {json.dumps(attrs)[:160]}" for p, attrs in diff["differences"].items()]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def assert_same_objects(store_a, store_b, ids):
    """Every id names the same treesum in both stores; else the differing files are listed."""
    problems = []
    for object_id in ids:
        sum_a, sum_b = treesum_of(store_a, object_id), treesum_of(store_b, object_id)
        if sum_a != sum_b:
            problems.append(f"{object_id}: treesum {sum_a} != {sum_b}")
            problems += ["  " + line for line in
                         differing_files(os.path.join(store_a, "refs", object_id),
                                         os.path.join(store_b, "refs", object_id))]
    assert not problems, "the builds differ:\n" + "\n".join(problems)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- ids and errors

def test_ids_keep_the_original_without_an_epoch(tmp_path):
    plain = manifest(epoch=None)
    res = run_osbuild(plain, tmp_path / "s", "--inspect", check=True)
    stages = res.json["pipeline"]["stages"]
    first = compute_id("org.osbuild.script", None, None, plain["pipeline"]["stages"][0]["options"])
    assert stages[0]["id"] == first
    assert "source-epoch" not in res.json["pipeline"]
    # the default epoch written out builds the same trees: the same ids
    default = run_osbuild(manifest(epoch=DEFAULT_EPOCH), tmp_path / "s", "--inspect", check=True)
    assert default.json["pipeline"]["output_id"] == res.json["pipeline"]["output_id"]


def test_epoch_is_part_of_the_ids_and_env_overrides(tmp_path):
    ids = {}
    for epoch in (None, EPOCH, EPOCH + 1):
        res = run_osbuild(manifest(epoch=epoch), tmp_path / "s", "--inspect", check=True)
        ids[epoch] = [s["id"] for s in res.json["pipeline"]["stages"]]
        ids[epoch].append(res.json["pipeline"]["output_id"])
    assert len({tuple(v) for v in ids.values()}) == 3
    assert not set(ids[None]) & set(ids[EPOCH])
    # SOURCE_DATE_EPOCH wins over the manifest's source-epoch, and --inspect
    # writes the epoch used, so its output fed back gives the same ids
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH + 1))
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest(epoch=EPOCH)))
    proc = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", REPO, "--inspect",
                           str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True)
    inspected = json.loads(proc.stdout)
    assert inspected["pipeline"]["source-epoch"] == EPOCH + 1
    assert inspected["pipeline"]["output_id"] == ids[EPOCH + 1][-1]
    res = run_osbuild(inspected, tmp_path / "s", "--inspect", check=True)
    assert res.json["pipeline"]["output_id"] == ids[EPOCH + 1][-1]


@pytest.mark.parametrize("epoch,env,message", [
    (int(time.time()) + 86400 * 400, None, "pipeline.source-epoch: "),
    ("1700000000", None, "pipeline.source-epoch"),
    (-1, None, "pipeline.source-epoch"),
    (EPOCH, "soon", "SOURCE_DATE_EPOCH: \"soon\" is not a timestamp"),
    (EPOCH, str(int(time.time()) + 86400 * 400), "SOURCE_DATE_EPOCH: "),
])
def test_bad_epoch_is_one_line(tmp_path, epoch, env, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest(epoch=epoch)))
    environ = dict(os.environ)
    environ.pop("SOURCE_DATE_EPOCH", None)
    if env is not None:
        environ["SOURCE_DATE_EPOCH"] = env
    store = tmp_path / "store"
    for as_json in (False, True):
        proc = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
                               str(store)] + (["--json"] if as_json else []) + [str(path)],
                              cwd=REPO, env=environ, capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        if as_json:
            result = json.loads(proc.stdout)
            assert result["success"] is False and message in result["error"]
        else:
            assert len(proc.stderr.strip().splitlines()) == 1
            assert message in proc.stderr
    assert not store.exists() or not os.listdir(store / "objects")


def test_derive_uuid_is_stable():
    a = derive_uuid({"size": 1}, "root")
    assert a == derive_uuid({"size": 1}, "root")
    assert a != derive_uuid({"size": 2}, "root") and a.version == 4


def test_generator_epoch_is_the_suites_release_date(tmp_path):
    tool = import_program(os.path.join(REPO, "tools", "osbuild-debian-manifest"), "gen_epoch")
    signed = ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nOrigin: Debian\n"
              "Suite: {suite}\nCodename: {codename}\nDate: {date}\nSHA256:\n"
              " 0123 12 main/binary-amd64/Packages\n-----BEGIN PGP SIGNATURE-----\n")
    for name, suite, codename, date in [
            ("d_dists_trixie_InRelease", "stable", "trixie", "Sat, 08 Nov 2025 09:00:00 UTC"),
            ("d_dists_trixie-updates_InRelease", "stable-updates", "trixie-updates",
             "Mon, 01 Dec 2025 08:00:00 UTC"),
            ("d_dists_bookworm_Release", "oldstable", "bookworm", "Sat, 10 May 2025 10:00:00 UTC")]:
        (tmp_path / name).write_text(signed.format(suite=suite, codename=codename, date=date))
    assert tool.release_epoch(str(tmp_path), "trixie") == 1762592400
    assert tool.release_epoch(str(tmp_path), "stable") == 1762592400
    assert tool.release_epoch(str(tmp_path), "bookworm") == 1746871200
    # no Release of the suite itself: the newest of the others
    assert tool.release_epoch(str(tmp_path), "forky") == 1764576000
    with pytest.raises(tool.ToolError):
        tool.release_epoch(str(tmp_path / "nothing"), "trixie")


# ---------------------------------------------------------------- clamping

def test_clamp_stays_inside_the_tree(tmp_path):
    """Symlinks to files and directories outside are changed themselves, never followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("x")
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_text("y")
    os.symlink(outside / "victim", tree / "file-link")
    os.symlink(outside, tree / "dir-link")
    before = {p: os.lstat(outside / p).st_mtime_ns for p in (".", "victim")}
    assert clamp_mtimes(str(tree), EPOCH) == 5
    assert {p: os.lstat(outside / p).st_mtime_ns for p in (".", "victim")} == before
    for path in ("", "d", "d/f", "file-link", "dir-link"):
        assert os.lstat(tree / path).st_mtime == EPOCH
    old = tree / "old"
    old.write_text("")
    os.utime(old, (1000, 1000))
    assert clamp_mtimes(str(tree), EPOCH) == 1   # the tree root changed, "old" did not
    assert os.lstat(old).st_mtime == 1000


@pytest.mark.integration
def test_hostile_tree_cannot_make_the_host_touch_files(tmp_path):
    """A stage's links to host paths stay links: clamping after it never follows them."""
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "file").write_text("host file")
    before = {p: os.lstat(victim_dir / p).st_mtime_ns for p in (".", "file")}
    script = (f"ln -s {victim_dir}/file to-file; ln -s {victim_dir} to-dir; "
              f"mkdir -p deep/er; ln -s {victim_dir}/file deep/er/link")
    store = tmp_path / "store"
    res = run_osbuild({"pipeline": {"source-epoch": EPOCH, "stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": script}}]}},
        store, check=True)
    assert {p: os.lstat(victim_dir / p).st_mtime_ns for p in (".", "file")} == before
    tree = os.path.join(store, "refs", res.json["tree_id"])
    for path in ("to-file", "to-dir", "deep/er/link", "deep"):
        assert os.lstat(os.path.join(tree, path)).st_mtime == EPOCH
    check_store(store)


# ---------------------------------------------------------------- real builds

def _build(store, compressions, tz):
    env = dict(os.environ, TZ=tz)
    env.pop("SOURCE_DATE_EPOCH", None)
    results = []
    for compression in compressions:
        desc = manifest(compression)
        ids = [s["id"] for s in run_osbuild(desc, store, "--inspect", check=True)
               .json["pipeline"]["stages"]]
        path = os.path.join(os.path.dirname(store), f"m-{compression}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(desc, f)
        cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", store, "--json"]
        cmd += [a for i in ids[:-1] for a in ("--checkpoint", i)] + [path]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results.append((ids, json.loads(proc.stdout)))
    return results


@pytest.mark.integration
@pytest.mark.parametrize("parallel", [False, True], ids=["apart", "parallel"])
def test_script_tar_is_reproducible(tmp_path, parallel):
    compressions = ["none", "gzip", "zstd"] if not parallel else ["xz"]
    stores = [str(tmp_path / "first" / "store"), str(tmp_path / "second-one" / "s")]
    for store in stores:
        os.makedirs(os.path.dirname(store))
    if parallel:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(_build, stores, [compressions] * 2, ["UTC", "Pacific/Kiritimati"]))
    else:
        first = _build(stores[0], compressions, "UTC")
        time.sleep(2.5)   # the clock moved on; mtimes must come from the epoch
        runs = [first, _build(stores[1], compressions, "Pacific/Kiritimati")]
    for (ids, res_a), (_, res_b) in zip(*runs):
        assert res_a["output_id"] == res_b["output_id"]
        assert_same_objects(stores[0], stores[1], ids + [res_a["output_id"]])
        tar_a = os.path.join(stores[0], "refs", res_a["output_id"], "tree.tar")
        tar_b = os.path.join(stores[1], "refs", res_b["output_id"], "tree.tar")
        assert read_bytes(tar_a) == read_bytes(tar_b)
    # what the build wrote carries the epoch; older times stay, newer ones are clamped
    tree = os.path.join(stores[0], "refs", runs[0][0][0][-1])
    assert read_bytes(os.path.join(tree, "etc/epoch")) == f"{EPOCH}\n".encode()
    assert os.lstat(os.path.join(tree, "home/user/old")).st_mtime == 981158400
    for path in ("etc/motd", "home/user/future", "usr/hello-link", "new/dir", "var/fifo", "."):
        assert os.lstat(os.path.join(tree, path)).st_mtime == EPOCH
    with tarfile.open(os.path.join(stores[0], "refs", runs[0][0][1]["output_id"],
                                   "tree.tar")) as tar:
        for member in tar.getmembers():
            assert member.mtime <= EPOCH
            assert not {"atime", "ctime"} & set(member.pax_headers), member.name
            assert "PaxHeaders." not in member.name
    for store in stores:
        check_store(store)


# ---------------------------------------------------------------- dpkg, from warm caches

# Small packages from the host's apt cache whose dependencies a minbase tree
# has: maintainer scripts (emacsen-common), an ldconfig trigger (libboost).
DEBS = ["emacsen-common_3.0.5_all.deb", "libboost-system1.74.0_1.74.0+ds1-21_amd64.deb",
        "fortunes-min_1%3a1.99.1-7.3_all.deb", "dns-root-data_2024071801~deb12u1_all.deb"]
APT_CACHE = "/var/cache/apt/archives"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        pass


@pytest.fixture(name="warm_files")
def warm_files_fixture(tmp_path):
    """The cached minbase tarball and DEBS served on 127.0.0.1: {name: (checksum, url)}."""
    missing = [d for d in DEBS if not os.path.exists(os.path.join(APT_CACHE, d))]
    if missing:
        pytest.skip(f"not in {APT_CACHE}: {', '.join(missing)}")
    served = tmp_path / "served"
    served.mkdir()
    files = {}
    for path in [stagetest.debian_tar()] + [os.path.join(APT_CACHE, d) for d in DEBS]:
        name = os.path.basename(path).replace("%3a", "_")
        os.symlink(path, served / name)
        with open(path, "rb") as f:
            files[name] = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    handler = functools.partial(_Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}"
    yield {name: (checksum, f"{root}/{name}") for name, checksum in files.items()}
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_dpkg_stage_is_reproducible(tmp_path, warm_files):
    """A minbase tree plus a few packages installed by org.osbuild.dpkg, built twice."""
    tar_name = next(n for n in warm_files if n.endswith(".tar"))
    tar_sum = warm_files[tar_name][0]
    debs = [warm_files[n][0] for n in sorted(warm_files) if n != tar_name]
    desc = {"pipeline": {"source-epoch": EPOCH, "stages": [
        {"name": "org.osbuild.files-test", "options": {"checksums": [tar_sum], "path": "/seed"}},
        {"name": "org.osbuild.script", "options": {"chroot": False, "script":
            "tar -xf seed/* --numeric-owner --xattrs --exclude=./dev/* -C . && rm -r seed"}},
        {"name": "org.osbuild.dpkg", "options": {"packages": debs}},
    ]}, "sources": {"org.osbuild.files": {"urls": dict(warm_files.values())}}}
    ids = [s["id"] for s in run_osbuild(desc, tmp_path / "x", "--inspect", check=True)
           .json["pipeline"]["stages"]]
    stores = [str(tmp_path / "one" / "store"), str(tmp_path / "two" / "deeper" / "store")]
    for store, tz in zip(stores, ("UTC", "America/St_Johns")):
        os.makedirs(os.path.dirname(store))
        manifest_path = os.path.join(os.path.dirname(store), "m.json")
        with open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(desc, f)
        env = dict(os.environ, TZ=tz)
        env.pop("SOURCE_DATE_EPOCH", None)
        cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", store, "--json"]
        cmd += [a for i in ids[:-1] for a in ("--checkpoint", i)] + [manifest_path]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              check=False, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        time.sleep(2)
    assert_same_objects(stores[0], stores[1], ids)
    tree = os.path.join(stores[0], "refs", ids[-1])
    with open(os.path.join(tree, "var/log/dpkg.log"), encoding="utf-8") as f:
        assert all(line.startswith("2023-11-14 22:13:20 ") for line in f)
    assert os.lstat(os.path.join(tree, "var/lib/dpkg/status")).st_mtime == EPOCH
    for store in stores:
        check_store(store)


# ---------------------------------------------------------------- the main sample

@pytest.mark.integration
@pytest.mark.boot
def test_debian13_sample_is_reproducible(tmp_path):
    """samples/debian13-qcow2.json built twice: every stage's tree and the qcow2 are identical.

    The pinned sample while the archive serves it, else a freshly resolved one
    (test/debian_samples.py): reproducibility holds for either.
    """
    sample = debian_samples.manifest_path("debian13-qcow2.json")
    with open(sample, encoding="utf-8") as f:
        desc = json.load(f)
    inspected = run_osbuild(copy.deepcopy(desc), tmp_path / "x", "--inspect", check=True).json
    ids = [s["id"] for s in inspected["pipeline"]["stages"]]
    output_id = inspected["pipeline"]["output_id"]
    stores = [str(tmp_path / "a" / "store"), str(tmp_path / "bb" / "other-store")]
    started = time.monotonic()
    for store, tz in zip(stores, ("UTC", "Australia/Eucla")):
        os.makedirs(os.path.dirname(store))
        env = dict(os.environ, TZ=tz)
        env.pop("SOURCE_DATE_EPOCH", None)
        cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", store, "--json"]
        cmd += [a for i in ids[:-1] for a in ("--checkpoint", i)] + [sample]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              check=False, timeout=3600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if time.monotonic() - started < 60:
            time.sleep(60 - (time.monotonic() - started))  # a minute apart at least
    assert_same_objects(stores[0], stores[1], ids)
    images = [os.path.join(s, "refs", output_id) for s in stores]
    names = sorted(os.listdir(images[0]))
    assert names == sorted(os.listdir(images[1]))
    for name in names:
        assert read_bytes(os.path.join(images[0], name)) == \
            read_bytes(os.path.join(images[1], name)), f"{name} differs between the builds"
    assert treesum_of(stores[0], output_id) == treesum_of(stores[1], output_id)
