"""Drop-in compatibility with the original osbuild on the command line (issue 14, part of 12).

`--json` always prints one JSON object, also for bad input; `--inspect`
output is a manifest again; `-l`; a top-level key beside `pipeline` is
warned about and ignored; NaN/Infinity and NUL characters are refused;
Ctrl-C at any moment exits 130 with one line. The original's samples
(reference/original-samples) load and give ids.
"""

import copy
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from osbuild import objectstore
from osbuild import __main__ as cli
from conftest import REPO, run_osbuild

SAMPLES = "/work/shared/reference/original-samples"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def cli_run(args, stdin=None, timeout=120):
    """`python3 -m osbuild ARGS` from the checkout; the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "osbuild"] + [str(a) for a in args], cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          check=False)


def store_state(path):
    """Everything under the store's objects/ and refs/ (recursively), and its tmp/."""
    state = {}
    for sub in ("objects", "refs", "tmp"):
        root = os.path.join(path, sub)
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames):
                entries.append(os.path.relpath(os.path.join(dirpath, name), root))
        state[sub] = sorted(entries)
    return state


def populated_store(path):
    """A store holding one committed tree (made through the library, no build needed)."""
    store = objectstore.ObjectStore(path)
    with store.new("a" * 64) as obj:
        with open(os.path.join(obj.write(), "kept"), "w", encoding="utf-8") as f:
            f.write("kept\n")
    return store_state(path)


HOSTNAME = {"name": "org.osbuild.hostname", "options": {"hostname": "compat"}}
GOOD = {"pipeline": {"stages": [HOSTNAME]}}


# ------------------------------------------------------------------ --json on bad input

def _bad_inputs(tmp_path):
    """(name, argv without --json/--store, stdin, expected error text) for each kind."""
    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    good = write("good.json", json.dumps(GOOD))
    return [
        ("missing file", [str(tmp_path / "nope.json")], None,
         f"cannot read manifest {tmp_path / 'nope.json'}: No such file or directory"),
        ("not JSON", [write("broken.json", "{\"pipeline\": ")], None,
         "is not valid JSON: Expecting value"),
        ("schema", [write("schema.json", json.dumps(
            {"pipeline": {"stages": [{"name": "org.osbuild.hostname",
                                      "options": {"hostname": 42}}]}}))], None,
         "pipeline.stages[0].options.hostname: 42 is not of type 'string'"),
        ("unknown stage", ["-"], json.dumps({"pipeline": {"stages": [
            HOSTNAME, {"name": "org.osbuild.nope"}]}}),
         "pipeline.stages[1].name: unknown stage 'org.osbuild.nope'"),
        ("unknown assembler", ["-"], json.dumps({"pipeline": {"assembler": {
            "name": "org.osbuild.nope"}}}),
         "pipeline.assembler.name: unknown assembler 'org.osbuild.nope'"),
        ("unknown runner", ["-"], json.dumps({"pipeline": {"build": {
            "runner": "org.osbuild.nope", "pipeline": {}}}}),
         "pipeline.build.runner: unknown runner 'org.osbuild.nope'"),
        ("checkpoint", ["--checkpoint", "f" * 64, good], None,
         f"checkpoint '{'f' * 64}' matches no stage of the manifest"),
        ("NaN", ["-"], '{"pipeline": {"stages": [{"name": "org.osbuild.hostname", '
                       '"options": {"hostname": NaN}}]}}',
         "pipeline.stages[0].options.hostname: NaN is not allowed"),
        ("Infinity", ["-"], '{"stages": [{"name": "org.osbuild.noop", "options": '
                            '{"x": [1, -Infinity]}}]}',
         "stages[0].options.x[1]: -Infinity is not allowed"),
        ("NUL", ["-"], json.dumps({"pipeline": {"stages": [{"name": "org.osbuild.hostname",
                                                            "options": {"hostname": "a\0b"}}]}}),
         "pipeline.stages[0].options.hostname: a string containing a NUL character"),
        ("NUL key", ["-"], json.dumps({"pipeline": {"stages": [{"name": "org.osbuild.noop",
                                                                "options": {"a\0": 1}}]}}),
         "pipeline.stages[0].options: a key containing a NUL character"),
        ("sources file", ["--sources", write("sources.json", '{"org.osbuild.files": '
                                                             '{"urls": {"x": "\\u0000"}}}'), good],
         None, "sources.org.osbuild.files.urls.x: a string containing a NUL character"),
        ("sources not an object", ["--sources", write("list.json", "[]"), good], None,
         "expected a JSON object"),
        ("id mismatch", ["-"], json.dumps({"pipeline": {"stages": [dict(HOSTNAME, id="0" * 64)]}}),
         f"pipeline.stages[0].id: \"{'0' * 64}\" does not match the computed id"),
        ("bad option", ["--no-such-option", good], None,
         "unrecognized arguments: --no-such-option"),
        ("store is a file", ["--store", good, good], None, "exists and is not a directory"),
    ]


def test_json_on_every_kind_of_bad_input(tmp_path):
    """One JSON object on stdout naming the problem (the human message's text), exit 1,
    the store untouched."""
    store = tmp_path / "store"
    before = populated_store(store)
    for name, argv, stdin, expected in _bad_inputs(tmp_path):
        args = ["--libdir", REPO, "--store", store, "--json"]
        if "--store" in argv:
            args = ["--libdir", REPO, "--json"]
        res = cli_run(args + argv, stdin=stdin)
        assert res.returncode == 1, (name, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr, name
        result = json.loads(res.stdout)   # exactly one JSON document
        assert set(result) == {"success", "error"}, name
        assert result["success"] is False
        assert expected in result["error"], (name, result)
        # the same text as the human message, which is one line
        assert res.stderr == f"osbuild: {result['error']}\n", name
        human = cli_run([a for a in args if a != "--json"] + argv, stdin=stdin)
        assert human.returncode == 1 and human.stdout == "", name
        assert human.stderr == res.stderr, name
    assert store_state(store) == before


def test_json_output_is_strict():
    """Results are printed with allow_nan=False: a NaN could never slip out."""
    with pytest.raises(ValueError):
        cli.print_json({"x": float("nan")})


def test_short_libdir_option(tmp_path):
    res = cli_run(["-l", REPO, "--inspect", "-"], stdin=json.dumps(GOOD))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["pipeline"]["stages"][0]["name"] == "org.osbuild.hostname"
    res = cli_run(["-l", str(tmp_path), "--inspect", "-"], stdin=json.dumps(GOOD))
    assert res.returncode == 1 and f"libdir {tmp_path} has no stages/" in res.stderr


# ------------------------------------------------------------------ --inspect round trip

NESTED = {
    "pipeline": {
        "build": {"runner": "org.osbuild.debian12", "pipeline": {"stages": [
            {"name": "org.osbuild.noop", "options": {"build": 1}}]}},
        "stages": [HOSTNAME, {"name": "org.osbuild.noop", "options": {"second": True}}],
        "assembler": {"name": "org.osbuild.noop", "options": {"out": 1}}},
    "sources": {"org.osbuild.files": {"urls": {}}}}


def _inspect(desc):
    res = cli_run(["-l", REPO, "--inspect", "-"], stdin=json.dumps(desc))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_inspect_output_is_a_manifest_again():
    first = _inspect(NESTED)
    assert "id" in first["pipeline"]["stages"][0] and "output_id" in first["pipeline"]
    assert "tree_id" in first["pipeline"]["build"]["pipeline"]
    assert _inspect(first) == first   # fed back: accepted, same ids
    assert first["sources"] == NESTED["sources"]


@pytest.mark.parametrize("path", [
    ("pipeline", "stages", 1, "id"),
    ("pipeline", "tree_id"),
    ("pipeline", "output_id"),
    ("pipeline", "assembler", "id"),
    ("pipeline", "build", "pipeline", "stages", 0, "id"),
    ("pipeline", "build", "pipeline", "tree_id"),
])
def test_inspect_ids_that_do_not_match_are_errors(path):
    desc = copy.deepcopy(_inspect(NESTED))
    parent = desc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = "e" * 64
    res = cli_run(["-l", REPO, "--json", "--inspect", "-"], stdin=json.dumps(desc))
    assert res.returncode == 1
    error = json.loads(res.stdout)["error"]
    assert error.startswith(_where(path) + ": "), error
    assert "does not match the computed id" in error


def _where(path):
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


# ------------------------------------------------------------------ keys beside "pipeline"

def test_top_level_runner_is_ignored_with_a_warning():
    """The original's f27-build-from-ubuntu1804 form: `runner` beside `pipeline`."""
    desc = dict(NESTED, runner="org.osbuild.ubuntu1804")
    res = cli_run(["-l", REPO, "--inspect", "-"], stdin=json.dumps(desc))
    assert res.returncode == 0, res.stderr
    assert res.stderr == ("osbuild: warning: manifest: unknown top-level key 'runner' ignored "
                          "(as the original osbuild did; it does not select the runner)\n")
    assert json.loads(res.stdout) == _inspect(NESTED)   # same ids, same runner


def test_unknown_keys_inside_a_pipeline_are_refused():
    """Inside a pipeline a stray key is a typo that would build something else: refused."""
    res = cli_run(["-l", REPO, "--inspect", "-"],
                  stdin=json.dumps({"pipeline": {"stage": [HOSTNAME]}}))
    assert res.returncode == 1
    assert res.stderr.startswith("osbuild: pipeline: Additional properties are not allowed "
                                 "('stage' was unexpected)")


@pytest.mark.integration
@needs_root
def test_top_level_runner_does_not_select_the_runner(tmp_path):
    """A real build with a top-level runner that does not exist here uses the host's."""
    desc = {"runner": "org.osbuild.fedora27", "pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": "echo built > b"}}]}}
    res = run_osbuild(desc, tmp_path / "store")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "unknown top-level key 'runner' ignored" in res.stderr
    tree = tmp_path / "store" / "refs" / res.json["tree_id"]
    assert (tree / "b").read_text() == "built\n"


# ------------------------------------------------------------------ the original's samples

@pytest.mark.parametrize("sample", sorted(
    p for p in glob.glob(os.path.join(SAMPLES, "*.json")) if not p.endswith("sources.json")))
def test_original_samples_load(sample):
    """Every sample of the original inspects with its sources (except the one the original
    could not build either: base-rawfs.json names a repository "bl", which no source has)."""
    res = cli_run(["-l", REPO, "--inspect", "--sources", os.path.join(SAMPLES, "sources.json"),
                   sample])
    if os.path.basename(sample) == "base-rawfs.json":
        assert res.returncode == 1
        assert res.stderr.startswith("osbuild: stages[0].options.repos[1]: 'bl' is not valid")
        return
    assert res.returncode == 0, res.stderr
    assert "tree_id" in json.loads(res.stdout)["pipeline"]


# ------------------------------------------------------------------ NUL against a real build

@pytest.mark.integration
@needs_root
def test_nul_in_options_never_reaches_the_tree(tmp_path):
    """A NUL in fstab options (which the stage's own pattern lets through) is refused
    before anything runs: no tree, no ref, nothing in tmp."""
    store = tmp_path / "store"
    before = populated_store(store)
    desc = {"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": "mkdir -p etc"}},
        {"name": "org.osbuild.fstab", "options": {"filesystems": [
            {"uuid": "76a22bf4-f153-4541-b6c7-0332c0dfaeac", "vfs_type": "ext4", "path": "/",
             "options": "defaults\u0000,nosuid"}]}}]}}
    res = run_osbuild(desc, store)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.json == {"success": False, "error": (
        f"manifest {tmp_path / 'manifest.json'}: pipeline.stages[1].options.filesystems[0]"
        ".options: a string containing a NUL character (U+0000) is not allowed")}
    assert store_state(store) == before


def _strict_loads(text):
    """json.loads that refuses NaN/Infinity, as any non-Python JSON parser does."""
    def refuse(name):
        raise ValueError(f"{name} in the output")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.integration
@needs_root
def test_nan_is_refused_before_a_build_and_never_echoed(tmp_path):
    """NaN/Infinity in options a stage would accept (noop takes anything): refused at
    parse time, so the --json result stays valid JSON and nothing is built."""
    store = tmp_path / "store"
    before = populated_store(store)
    path = tmp_path / "nan.json"
    path.write_text('{"pipeline": {"stages": [{"name": "org.osbuild.noop", '
                    '"options": {"a": NaN, "b": Infinity}}]}}')
    res = run_osbuild(str(path), store)
    result = _strict_loads(res.stdout)
    assert res.returncode == 1, res.stdout
    assert result == {"success": False, "error": f"manifest {path}: pipeline.stages[0].options.a: "
                                                 "NaN is not allowed (JSON has no NaN or Infinity)"}
    assert store_state(store) == before


# ------------------------------------------------------------------ Ctrl-C at any moment

def _interpreter_startup_failure(err):
    """Python's own message when SIGINT arrives while the interpreter itself starts
    (init_sys_streams, init_import_site, … before any osbuild code runs): nothing
    osbuild can guard."""
    return err.startswith("Fatal Python error: init_") and "osbuild" not in err


def _lost_while_site_loads(err):
    """Python's default handler raised KeyboardInterrupt in a weakref callback of the
    import system while `site` loaded, before any osbuild code: the interpreter
    printed "Exception ignored" and dropped it, and the build went on."""
    return (err.startswith("Exception ignored in: <function _get_module_lock")
            and err.rstrip().endswith("KeyboardInterrupt:") and "osbuild" not in err)


@pytest.mark.integration
@needs_root
def _default_sigint():
    """In the child: SIGINT's default action, as from a terminal. A test run started in
    the background of a non-interactive shell inherits SIGINT ignored, and an ignored
    signal that arrives before osbuild installs its handler is lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_at_any_moment_exits_130_with_one_line(tmp_path):
    """SIGINT at several short delays after start: once osbuild's code runs, never a
    traceback, but one line and exit status 130 (with --json also a JSON result).

    Before that, the interpreter itself is starting: before it installs its
    handler the signal's default action ends the process (-2 here, 130 in a
    shell); while it imports `site` it prints its own fatal error. Both are
    outside osbuild (see README) and are tolerated only for the first moments.
    """
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": "sleep 5"}}]}}))
    ours = 0
    for delay in (0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22,
                  0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 2.0):
        for as_json in (False, True):
            cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO,
                   "--store", str(tmp_path / "store")] + (["--json"] if as_json else []) + \
                [str(manifest)]
            # killed and waited for below; the preexec_fn only calls signal(2)
            # pylint: disable-next=consider-using-with,subprocess-popen-preexec-fn
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    preexec_fn=_default_sigint)
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            if proc.returncode == -signal.SIGINT or _interpreter_startup_failure(err) \
                    or _lost_while_site_loads(err):
                assert delay < 0.3, (delay, err)
                continue
            assert "Traceback" not in err, (delay, err)
            assert proc.returncode == 130, (delay, proc.returncode, err)
            assert err.strip() == "osbuild: interrupted", (delay, err)
            if as_json:
                assert json.loads(out) == {"success": False, "error": "interrupted"}
            ours += 1
    assert ours >= 20, ours
    if (tmp_path / "store").exists():
        assert store_state(tmp_path / "store")["tmp"] == []
