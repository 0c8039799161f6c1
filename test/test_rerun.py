"""A rebuild with nothing to build is replayed from its memo (osbuild/rerun.py), and only
when nothing it depended on changed; a memo others could have written is never used."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import requires_root
from osbuild import rerun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = {"pipeline": {"stages": [{"name": "org.osbuild.noop", "options": {"rerun": 1}}]}}


def test_parse_takes_only_options_that_change_nothing():
    """Only --json runs made of store/libdir/checkpoint/limits options, one manifest file."""
    assert rerun.parse(["--store", "s", "--json", "m.json"]) == ("s", "m.json")
    assert rerun.parse(["--json", "--store=s", "-l", "lib", "--checkpoint", "*", "m"]) == \
        ("s", "m")
    assert rerun.parse(["--json", "m"]) == (rerun.DEFAULT_STORE, "m")
    assert rerun.parse(["-q", "m"]) == (rerun.DEFAULT_STORE, "m")
    assert rerun.parse(["--json", "--store", "s", "-"]) == ("s", "-")
    for argv in (["--json", "--output-directory", "o", "m"],  # copies out
                 ["--json", "--export", "x", "m"], ["--json", "--break", "m"],
                 ["--json", "--remote", "s3://b/p", "m"], ["--json", "--gc"],
                 ["--json", "--cache-max-size", "1GiB", "m"], ["--json", "m", "n"],
                 ["--json", "--store"], ["--json", "--monitor-fd=3", "m"]):
        assert rerun.parse(argv) is None, argv


@pytest.fixture(name="env")
def env_fixture(tmp_path):
    """A private libdir copy (its programs can change), a store, and the manifest."""
    requires_root()
    libdir = tmp_path / "lib"
    for d in ("stages", "assemblers", "sources", "runners", "schemas"):
        shutil.copytree(os.path.join(REPO, d), libdir / d, symlinks=True)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(MANIFEST))
    return {"lib": str(libdir), "store": str(tmp_path / "store"), "manifest": str(manifest),
            "tmp": tmp_path}


def osbuild(env, *extra, environ=None, json_output=True, stdin=None):
    """(result, whether the engine ran) of `osbuild --json` on the env's manifest
    (without --json: the standard output; with `stdin`: the manifest "-" fed that)."""
    argv = [sys.executable, "-X", "importtime", "-m", "osbuild", "--libdir", env["lib"],
            "--store", env["store"], *(["--json"] if json_output else []), *extra,
            "-" if stdin is not None else env["manifest"]]
    base = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False,
                          input=stdin, env=dict(base, PYTHONPATH=REPO, **(environ or {})))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = json.loads(proc.stdout) if json_output else proc.stdout
    return out, "osbuild.pipeline" in proc.stderr


def memo_file(env):
    """The one memo of the store."""
    names = os.listdir(os.path.join(env["store"], "cache", rerun.DIRNAME))
    assert len(names) == 1, names
    return os.path.join(env["store"], "cache", rerun.DIRNAME, names[0])


@pytest.mark.integration
def test_second_rebuild_is_replayed_and_touches_the_refs(env):
    """build → rebuild (full path, records) → rebuild (replayed, same result, LRU clock moved)."""
    built, engine = osbuild(env)
    assert engine and built["stages"]
    first, engine = osbuild(env)
    assert engine and first["stages"] == []
    ref = os.path.join(env["store"], "refs", first["tree_id"])
    os.utime(ref, ns=(10 ** 9, 10 ** 9), follow_symlinks=False)
    again, engine = osbuild(env)
    assert not engine and again == first
    assert os.lstat(ref).st_mtime_ns > 10 ** 9


@pytest.mark.integration
def test_human_log_is_replayed_with_its_own_time(env):
    """Without --json: the same closing lines, the total time measured by the replay."""
    built, _ = osbuild(env)
    full, engine = osbuild(env, json_output=False)
    assert engine
    again, engine = osbuild(env, json_output=False)
    assert not engine
    lines = again.splitlines()
    assert lines[0] == "" and lines[1].startswith("total time: ") and lines[1].endswith(" s")
    assert lines[2:] == [f"tree id: {built['tree_id']}"] == full.splitlines()[2:]
    quiet = f"tree id: {built['tree_id']}\n"
    assert osbuild(env, "--quiet", json_output=False) == (quiet, True)
    assert osbuild(env, "--quiet", json_output=False) == (quiet, False)


@pytest.mark.integration
def test_manifest_on_stdin_is_replayed_only_for_the_same_bytes(env):
    """A composer pipes the manifest: the replay reads stdin, and hands it to the full
    path when the memo does not match (another manifest on the same command line)."""
    text = json.dumps(MANIFEST)
    built, _ = osbuild(env, stdin=text)
    first, engine = osbuild(env, stdin=text)
    assert engine and first["stages"] == [] and first["tree_id"] == built["tree_id"]
    assert osbuild(env, stdin=text) == (first, False)
    other = json.dumps({"pipeline": {"stages": [{"name": "org.osbuild.noop",
                                                 "options": {"rerun": 2}}]}})
    result, engine = osbuild(env, stdin=other)
    assert engine and result["stages"] and result["tree_id"] != first["tree_id"]
    spaced, engine = osbuild(env, stdin=text + "\n")   # other bytes, same value
    assert engine and spaced == first


def change_manifest(env):
    """The same manifest with other whitespace: same ids, other bytes."""
    with open(env["manifest"], "a", encoding="utf-8") as f:
        f.write("\n")


def change_program(env):
    """An edited stage: validation must look at it again."""
    path = os.path.join(env["lib"], "stages", "org.osbuild.noop")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))


def add_schema_before(env):
    """A schema where the lookup looks first (LIBDIR/schemas) replaced by another file."""
    path = os.path.join(env["lib"], "schemas", "osbuild1.json")
    shutil.copy(path, path + ".new")
    os.rename(path + ".new", path)


def remove_ref(env):
    """The object the memo found is gone (evicted)."""
    refs = os.path.join(env["store"], "refs")
    for name in os.listdir(refs):
        os.unlink(os.path.join(refs, name))


def save_limit(env):
    """A size limit: a shrink may be due, which only the full path does."""
    with open(os.path.join(env["store"], "cache.json"), "w", encoding="utf-8") as f:
        json.dump({"max-size": 10 ** 12}, f)


@pytest.mark.integration
@pytest.mark.parametrize("change", [change_manifest, change_program, add_schema_before,
                                    remove_ref, save_limit])
def test_any_change_runs_the_full_path(env, change):
    """Each thing the outcome depends on, changed, sends the run through the engine."""
    osbuild(env)
    expected, _ = osbuild(env)
    assert osbuild(env)[1] is False
    change(env)
    result, engine = osbuild(env)
    assert engine
    assert result["tree_id"] == expected["tree_id"]
    if change is remove_ref:
        assert result["stages"]          # rebuilt
    else:
        assert result == expected


@pytest.mark.integration
def test_environment_and_options_are_part_of_the_key(env):
    """SOURCE_DATE_EPOCH (changes ids) and any other option are never replayed from a memo."""
    osbuild(env)
    plain, _ = osbuild(env)
    dated, engine = osbuild(env, environ={"SOURCE_DATE_EPOCH": "1600000000"})
    assert engine and dated["tree_id"] != plain["tree_id"]
    out = env["tmp"] / "out"
    _, engine = osbuild(env, "--output-directory", str(out))
    assert engine
    assert osbuild(env)[1] is False


@pytest.mark.integration
def test_a_memo_others_could_write_is_not_replayed(env):
    """A forged result in a memo is printed only from a store no one else can write to."""
    osbuild(env)
    osbuild(env)
    path = memo_file(env)
    with open(path, encoding="utf-8") as f:
        memo = json.load(f)
    forged = {"success": True, "stages": [], "tree_id": "f" * 64}
    memo["stdout"] = json.dumps(forged) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(memo, f)
    # the store's owner can change what it replays (like anything in the store) ...
    assert osbuild(env)[0] == forged
    # ... nobody else: a memo or directory others can write or own is ignored
    attacks = [(path, 0o664, None), (os.path.dirname(path), 0o770, None),
               (os.path.join(env["store"], "cache"), 0o777, None), (env["store"], 0o777, None),
               (path, 0o600, 65534)]
    for target, mode, owner in attacks:
        st = os.lstat(target)
        os.chmod(target, mode)
        if owner is not None:
            os.chown(target, owner, owner)
        try:
            result, engine = osbuild(env)
        finally:
            os.chown(target, st.st_uid, st.st_gid)
        assert engine and result != forged, (target, oct(mode), owner)
        # the full path leaves the store private again and records a real memo
        with open(path, "w", encoding="utf-8") as f:
            json.dump(memo, f)
        os.chmod(path, 0o600)
        os.chmod(target, stat_mode(target))


def stat_mode(path):
    """The mode the store keeps `path` at."""
    return 0o600 if os.path.isfile(path) else 0o700
