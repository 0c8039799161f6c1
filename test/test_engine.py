"""Real builds through the CLI: results, store, incremental builds, checkpoints, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from osbuild import manifest
from conftest import REPO, run_osbuild

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def script(text, **kw):
    """A script stage."""
    return {"name": "org.osbuild.script", "options": {"chroot": False, "script": text, **kw}}


def store_state(store):
    """Everything under objects/ and refs/, and what is left in tmp/."""
    def ls(d):
        p = os.path.join(store, d)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    return {"objects": ls("objects"), "refs": ls("refs"), "tmp": ls("tmp")}


SIMPLE = {"pipeline": {"stages": [
    script("mkdir -p etc; echo hello > etc/greeting; echo made-greeting"),
    script("echo world >> etc/greeting; chmod 600 etc/greeting"),
]}}


def test_build_result_and_store(store):
    res = run_osbuild(SIMPLE, store)
    assert res.returncode == 0, res.stderr
    r = res.json
    ids = [s.id for s in manifest.load(SIMPLE).pipeline.stages]
    assert r["success"] is True
    assert r["tree_id"] == ids[-1]
    assert [s["id"] for s in r["stages"]] == ids
    assert [s["name"] for s in r["stages"]] == ["org.osbuild.script"] * 2
    assert all(s["success"] for s in r["stages"])
    assert "made-greeting" in r["stages"][0]["output"]
    assert r["stages"][0]["options"] == SIMPLE["pipeline"]["stages"][0]["options"]
    state = store_state(store)
    assert state["refs"] == [ids[-1]] and len(state["objects"]) == 1 and state["tmp"] == []
    ref = os.path.join(store, "refs", ids[-1])
    assert os.readlink(ref) == os.path.join("..", "objects", state["objects"][0])
    greeting = os.path.join(ref, "etc", "greeting")
    with open(greeting, encoding="utf-8") as f:
        assert f.read() == "hello\nworld\n"
    assert os.stat(greeting).st_mode & 0o777 == 0o600


def test_warm_rebuild_runs_nothing(store):
    m = {"pipeline": {"stages": SIMPLE["pipeline"]["stages"],
                      "assembler": {"name": "org.osbuild.noop"}}}
    res = run_osbuild(m, store)
    assert res.json, res.stderr + res.stdout
    first = res.json
    assert first["success"] and len(first["stages"]) == 2 and "assembler" in first
    before = store_state(store)
    second = run_osbuild(m, store).json
    assert second["success"] is True
    assert second["stages"] == [] and "assembler" not in second
    assert second["tree_id"] == first["tree_id"] and second["output_id"] == first["output_id"]
    assert store_state(store) == before


def test_human_output(store):
    res = run_osbuild(SIMPLE, store, json_output=False)
    assert res.returncode == 0
    ids = [s.id for s in manifest.load(SIMPLE).pipeline.stages]
    assert f"org.osbuild.script: {ids[0]}" in res.stdout
    assert "made-greeting" in res.stdout
    assert res.stdout.rstrip().endswith(f"tree id: {ids[-1]}")


def test_manifest_from_stdin_bare_format(store):
    res = run_osbuild("-", store, stdin=json.dumps(SIMPLE["pipeline"]))
    assert res.returncode == 0, res.stderr
    assert res.json["tree_id"] == manifest.load(SIMPLE).pipeline.tree_id


def test_failing_stage_discards_and_reports(store):
    run_osbuild(SIMPLE, store, check=True)
    before = store_state(store)
    m = {"pipeline": {"stages": SIMPLE["pipeline"]["stages"] + [
        script("echo partial > etc/partial"),
        {"name": "org.osbuild.error", "options": {"returncode": 3}},
        script("echo never"),
    ]}}
    res = run_osbuild(m, store)
    assert res.returncode == 1
    r = res.json
    assert r["success"] is False
    assert [s["name"] for s in r["stages"]] == ["org.osbuild.script", "org.osbuild.error"]
    assert r["stages"][-1]["success"] is False
    assert "returning 3" in r["stages"][-1]["output"]
    assert store_state(store) == before
    human = run_osbuild(m, store, json_output=False)
    assert human.returncode == 1 and human.stdout.rstrip().endswith("Failed")


def test_checkpoints_and_incremental(store):
    stages = SIMPLE["pipeline"]["stages"]
    ids = [s.id for s in manifest.load(SIMPLE).pipeline.stages]
    res = run_osbuild(SIMPLE, store, "--checkpoint", ids[0])
    assert res.returncode == 0
    assert sorted(store_state(store)["refs"]) == sorted(ids)
    # Only the last stage changes: the first comes from the store.
    changed = {"pipeline": {"stages": [stages[0], script("echo other >> etc/greeting")]}}
    r = run_osbuild(changed, store).json
    assert r["success"] and [s["id"] for s in r["stages"]] == \
        [manifest.load(changed).pipeline.tree_id]
    with open(os.path.join(store, "refs", r["tree_id"], "etc/greeting"), encoding="utf-8") as f:
        assert f.read() == "hello\nother\n"


def test_unknown_checkpoint_aborts_before_running(store):
    res = run_osbuild(SIMPLE, store, "--checkpoint", "ab" * 32)
    assert res.returncode == 1
    assert "ab" * 32 in res.stderr and "matches no stage" in res.stderr
    assert "Traceback" not in res.stderr
    assert not os.path.exists(store)


def test_identical_trees_stored_once(store):
    # mtimes are part of a tree's identity, so the stages pin them
    a = {"stages": [script("echo same > f; touch -d @1000000000 f .")]}
    b = {"stages": [script("echo 'same' > f; touch -d @1000000000 f .")]}
    ra = run_osbuild(a, store).json
    rb = run_osbuild(b, store).json
    assert ra["tree_id"] != rb["tree_id"]
    state = store_state(store)
    assert len(state["refs"]) == 2 and len(state["objects"]) == 1


def test_large_options_and_output(store):
    big = "x" * 300000
    m = {"stages": [{"name": "org.osbuild.noop", "options": {"big": big}},
                    script("head -c 2000000 /dev/zero | tr '\\0' y; echo; echo done")]}
    r = run_osbuild(m, store).json
    assert r["success"]
    assert big in r["stages"][0]["output"]
    out = r["stages"][1]["output"]
    assert out.count("y") == 2000000 and out.rstrip().endswith("done")


def test_sandbox_sees_build_root_not_tree_root(store):
    m = {"stages": [script("test -e /run/osbuild/tree; test \"$(pwd)\" = /run/osbuild/tree; "
                           "test -x /usr/bin/python3; test ! -e /run/osbuild/tree/usr; "
                           "touch /usr/osbuild-write-test 2>/dev/null && exit 1; echo ok")]}
    r = run_osbuild(m, store).json
    assert r["success"], r


def _minimal_build_tree_script():
    """A script that makes a tiny build root: sh, coreutils bits, python3 + stdlib."""
    return r"""
mkdir -p usr/bin usr/lib usr/share etc
ln -s usr/bin bin; ln -s usr/bin sbin; ln -s usr/lib lib
[ -d /usr/lib64 ] && mkdir -p usr/lib64 && ln -s usr/lib64 lib64
for b in sh dash cat ls mkdir echo test python3 python3.11 env id; do cp -a /usr/bin/$b usr/bin/ 2>/dev/null || true; done
for b in /usr/bin/python3.11 /usr/bin/dash /usr/bin/cat /usr/bin/ls /usr/bin/mkdir /usr/bin/id; do
  for l in $(ldd $b | grep -o '/[^ ]*'); do cp -L --parents "$l" . ; done
done
# cp --parents of /lib/... lands under ./lib -> usr/lib; /lib64 likewise
tar -C / --exclude=__pycache__ --exclude=test --exclude=idlelib --exclude=tkinter -cf - usr/lib/python3.11 | tar -xf -
echo build-root-marker > usr/share/osbuild-build-marker
"""


def test_build_pipeline_is_the_build_root(store):
    build = {"stages": [script(_minimal_build_tree_script())]}
    m = {"pipeline": {
        "build": {"runner": "org.osbuild.debian12", "pipeline": build},
        "stages": [script("cat /usr/share/osbuild-build-marker > marker")],
    }}
    res = run_osbuild(m, store)
    r = res.json
    assert res.returncode == 0, res.stdout[-3000:]
    assert r["build"]["success"] and len(r["build"]["stages"]) == 1
    p = manifest.load(m).pipeline
    assert r["build"]["tree_id"] == p.build.tree_id
    with open(os.path.join(store, "refs", r["tree_id"], "marker"), encoding="utf-8") as f:
        assert f.read() == "build-root-marker\n"
    # --build-env gives the same ids as the nested form.
    env = os.path.join(os.path.dirname(str(store)), "build-env.json")
    with open(env, "w", encoding="utf-8") as f:
        json.dump({"runner": "org.osbuild.debian12", "pipeline": build}, f)
    again = run_osbuild({"pipeline": {"stages": m["pipeline"]["stages"]}}, store,
                        "--build-env", env).json
    assert again["success"] and again["tree_id"] == r["tree_id"] and again["stages"] == []


@pytest.mark.parametrize("content,extra,message", [
    ("{not json", [], "is not valid JSON"),
    ("[1, 2]", [], "manifest: [1, 2] is not"),
    ('{"stages": [{"name": "org.osbuild.nope"}]}', [], "unknown stage 'org.osbuild.nope'"),
    ('{"assembler": {"name": "org.osbuild.nope"}}', [], "unknown assembler 'org.osbuild.nope'"),
    ('{"build": {"runner": "org.osbuild.nope", "pipeline": {}}}', [], "unknown runner"),
    ('{"pipeline": {"stages": [{"name": "org.osbuild.error", "options": {"returncode": "3"}}]}}',
     [], "pipeline.stages[0].options.returncode: '3' is not of type 'integer'"),
    ('{}', ["--sources", "/nonexistent/sources.json"], "cannot read sources file /nonexistent"),
    ('{}', ["--secrets", "BADJSON"], "secrets file"),
    ('{}', ["--build-env", "/nonexistent/env.json"], "cannot read build environment"),
])
def test_bad_input_clear_error(tmp_path, content, extra, message):
    path = tmp_path / "m.json"
    path.write_text(content)
    bad = tmp_path / "BADJSON"
    bad.write_text("{oops")
    extra = [str(bad) if e == "BADJSON" else e for e in extra]
    store = tmp_path / "store"
    res = run_osbuild(str(path), store, *extra)
    assert res.returncode == 1
    assert message in res.stderr
    assert res.stderr.startswith("osbuild: ") and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) <= 5


def test_store_is_a_file(tmp_path):
    store = tmp_path / "store"
    store.write_text("")
    res = run_osbuild(SIMPLE, store)
    assert res.returncode == 1 and "not a directory" in res.stderr
    assert "Traceback" not in res.stderr


def test_unwritable_store(store):
    run_osbuild(SIMPLE, store, check=True)
    before = store_state(store)
    subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(store)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(store)], check=True)
        m = {"stages": [script("echo new > x")]}
        res = run_osbuild(m, store)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert "store" in res.stderr and "Read-only" in res.stderr
    finally:
        subprocess.run(["umount", str(store)], check=True)
    assert store_state(store) == before


def test_ctrl_c_during_stage(store, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"stages": [script("echo started; sleep 60")]}))
    # pylint: disable-next=consider-using-with  # interrupted and waited for below
    proc = subprocess.Popen([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
                             str(store), str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    line = ""
    while "started" not in line and time.time() < deadline:
        line = proc.stdout.readline()
    assert "started" in line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    state = store_state(store)
    assert state == {"objects": [], "refs": [], "tmp": []}
    with open("/proc/mounts", encoding="utf-8") as f:
        assert str(store) not in f.read()


@pytest.mark.integration
def test_store_inside_the_libdir(tmp_path):
    """As in a checkout with the default store: the libdir bind must not drag the store's
    live mounts into the container (it is not recursive, and never idmapped)."""
    store = os.path.join(REPO, f".osbuild-test-{os.getpid()}-{time.time_ns()}")
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"pipeline": {
        "stages": [script("mkdir -p etc && echo inside > etc/where && chown 7:8 etc/where")],
        "assembler": {"name": "org.osbuild.tar", "options": {"filename": "t.tar"}}}}))
    try:
        res = run_osbuild(path, store, "--output-directory", tmp_path / "out")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        listing = subprocess.run(["tar", "-tvf", tmp_path / "out" / "t.tar", "--numeric-owner"],
                                 capture_output=True, text=True, check=True).stdout
        assert " 7/8 " in listing, listing
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", store], check=True)
