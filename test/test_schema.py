"""The manifest schema (schemas/osbuild1.json), its use by the loader, and --inspect."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jsonschema
import pytest

from osbuild import manifest as osbuild_manifest
from osbuild import schema as osbuild_schema
from osbuild.meta import ValidationError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_PATH = os.path.join(REPO, "schemas", "osbuild1.json")

STAGE = {"name": "org.osbuild.noop"}
VALID = [
    {},
    {"pipeline": None},
    {"pipeline": {}},
    {"pipeline": {"stages": [STAGE]}, "sources": None},
    {"stages": None, "assembler": None, "build": None},
    {"stages": [], "assembler": {}, "build": {}},
    {"stages": [{"name": "org.osbuild.hostname", "options": {"hostname": "h"}}],
     "assembler": {"name": "org.osbuild.noop", "options": None}},
    {"pipeline": {
        "build": {"runner": "org.osbuild.fedora30",
                  "pipeline": {"build": {"runner": "org.osbuild.debian12",
                                         "pipeline": {"stages": [STAGE]}},
                               "stages": [STAGE]}},
        "stages": [STAGE, {"name": "org.osbuild.script", "options": {"script": "true"}}],
        "assembler": {"name": "org.osbuild.noop", "options": {}}},
     "sources": {"org.osbuild.files": {"urls": {}}}},
    {"build": {"runner": "org.osbuild.fedora30"}, "runner": None},
    {"runner": "org.osbuild.debian12", "stages": [STAGE]},
]

INVALID = [
    ([], "manifest: [] is not of type 'object'"),
    ("x", "manifest: 'x' is not of type 'object'"),
    ({"stages": [], "extra": 1},  # beside "pipeline": a warning (test_compat)
     "manifest: Additional properties are not allowed ('extra' was unexpected)"),
    ({"stages": [], "sources": {}},
     "manifest: Additional properties are not allowed ('sources' was unexpected)"),
    ({"pipeline": []}, "pipeline: [] is not of type 'object', 'null'"),
    ({"pipeline": {"stages": {"name": "x"}}},
     "pipeline.stages: {'name': 'x'} is not of type 'array', 'null'"),
    ({"pipeline": {"stages": [STAGE, STAGE, STAGE, {"name": "org.osbuild.noop", "options": 5}]}},
     "pipeline.stages[3].options: 5 is not of type 'object', 'null'"),
    ({"pipeline": {"stages": [{"options": {}}]}},
     "pipeline.stages[0]: 'name' is a required property"),
    ({"pipeline": {"stages": [{"name": 42}]}},
     "pipeline.stages[0].name: 42 is not of type 'string'"),
    ({"pipeline": {"stages": [dict(STAGE, ID="abc")]}},
     "pipeline.stages[0]: Additional properties are not allowed ('ID' was unexpected)"),
    ({"pipeline": {"assembler": {"options": {}}}},
     "pipeline.assembler: 'name' is a required property"),
    ({"pipeline": {"assembler": [STAGE]}},
     "pipeline.assembler: [{'name': 'org.osbuild.noop'}] is not of type 'object', 'null'"),
    ({"pipeline": {"build": {"pipeline": {}}}},
     "pipeline.build: 'runner' is a required property"),
    ({"pipeline": {"build": {"runner": "org.osbuild.fedora30",
                             "pipeline": {"build": {"runner": 3}}}}},
     "pipeline.build.pipeline.build.runner: 3 is not of type 'string'"),
    ({"pipeline": {"build": {"runner": "org.osbuild.fedora30",
                             "pipeline": {"stages": [STAGE, {"name": "x", "option": {}}]}}}},
     "pipeline.build.pipeline.stages[1]: Additional properties are not allowed "
     "('option' was unexpected)"),
    ({"pipeline": {}, "sources": []}, "sources: [] is not of type 'object', 'null'"),
    ({"pipeline": {}, "sources": {"org.osbuild.files": 3}},
     "sources.org.osbuild.files: 3 is not of type 'object'"),
    ({"stages": [{"name": "org.osbuild.noop", "options": []}]},
     "stages[0].options: [] is not of type 'object', 'null'"),
    ({"build": {"runner": "x", "pipeline": {"assembler": {"name": None}}}},
     "build.pipeline.assembler.name: None is not of type 'string'"),
]

BAD_NAMES = ["../../bin/sh", "/bin/sh", "org..osbuild", ".hidden", "a/b", ""]


@pytest.fixture(name="schema")
def schema_fixture():
    """The manifest JSON schema."""
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


def test_schema_is_valid_draft7(schema):
    jsonschema.Draft7Validator.check_schema(schema)
    for part in ("manifest", "pipeline", "build", "stage", "assembler", "sources"):
        assert part in schema["definitions"]


@pytest.mark.parametrize("desc", VALID)
def test_valid_manifests_pass(desc):
    osbuild_schema.check_manifest(desc, REPO)
    osbuild_manifest.load(desc, REPO)


@pytest.mark.parametrize("desc,message", INVALID)
def test_invalid_manifests_name_the_path(desc, message):
    with pytest.raises(ValidationError) as e:
        osbuild_schema.check_manifest(desc, REPO)
    assert str(e.value) == message
    with pytest.raises(ValidationError) as e:
        osbuild_manifest.load(desc, REPO)
    assert str(e.value) == message


@pytest.mark.parametrize("name", BAD_NAMES)
def test_program_names_must_not_be_paths(name):
    desc = {"pipeline": {"stages": [{"name": name}]}}
    with pytest.raises(ValidationError, match=r"^pipeline\.stages\[0\]\.name: .* is not valid"):
        osbuild_schema.check_manifest(desc, REPO)


def test_missing_schema_is_an_error(monkeypatch):
    """Without its schema a manifest is never loaded unchecked: a clear error instead."""
    monkeypatch.setattr(osbuild_schema, "find_schema", lambda libdir=None: None)
    for desc in ({"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}}, {"stages": []}):
        with pytest.raises(ValidationError, match="^cannot find the manifest schema "
                                                  r"\(looked for .*osbuild1\.json"):
            osbuild_manifest.load(desc, REPO)
    with pytest.raises(ValidationError, match="^cannot find the manifest schema"):
        osbuild_schema.check_pipeline({}, "build-env.pipeline", REPO)


def test_schema_lookup_order(tmp_path):
    assert osbuild_schema.find_schema(REPO) == SCHEMA_PATH
    # A libdir without schemas/ falls back to the package's (or its checkout's) copy.
    found = osbuild_schema.find_schema(str(tmp_path))
    assert found and os.path.basename(found) == "osbuild1.json"
    assert found in osbuild_schema.schema_paths(None)
    # The libdir's copy wins.
    os.makedirs(tmp_path / "schemas")
    strict = {"type": "object", "required": ["pipeline"], "definitions": {"pipeline": {}}}
    (tmp_path / "schemas" / "osbuild1.json").write_text(json.dumps(strict))
    assert osbuild_schema.find_schema(str(tmp_path)) == str(tmp_path / "schemas" / "osbuild1.json")
    with pytest.raises(ValidationError, match="^manifest: 'pipeline' is a required property$"):
        osbuild_schema.check_manifest({}, str(tmp_path))


def test_broken_schema_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "schemas")
    (tmp_path / "schemas" / "osbuild1.json").write_text("{not json")
    with pytest.raises(ValidationError, match="cannot read the manifest schema"):
        osbuild_schema.check_manifest({}, str(tmp_path))
    (tmp_path / "schemas" / "osbuild1.json").write_text('{"type": 3}')
    osbuild_schema._load.cache_clear()  # pylint: disable=protected-access
    with pytest.raises(ValidationError, match="manifest schema .* is invalid"):
        osbuild_schema.check_manifest({}, str(tmp_path))


def test_check_pipeline_prefixes_errors():
    with pytest.raises(ValidationError) as e:
        osbuild_schema.check_pipeline({"stages": [{"name": 1}]}, "build-env.pipeline", REPO)
    assert str(e.value) == "build-env.pipeline.stages[0].name: 1 is not of type 'string'"
    osbuild_schema.check_pipeline({"stages": [STAGE]}, "build-env.pipeline", REPO)


def run_cli(args, stdin=None):
    """Run `python3 -m osbuild --libdir REPO ARGS` from the checkout."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "osbuild", "--libdir", REPO] + args,
                          input=stdin, capture_output=True, text=True, env=env, check=False,
                          timeout=120)


def test_cli_reports_schema_errors_before_option_checks(tmp_path):
    """Structure is checked first: stage 1's bad key wins over stage 0's bad option."""
    desc = {"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"script": 42}},
        {"name": "org.osbuild.noop", "bogus": True}]}}
    res = run_cli(["--store", str(tmp_path / "store"), "--inspect", "-"], json.dumps(desc))
    assert res.returncode == 1
    assert res.stderr == ("osbuild: pipeline.stages[1]: Additional properties are not allowed "
                          "('bogus' was unexpected)\n")
    assert "Traceback" not in res.stderr
    # Fixing the structure reveals the option error, also by path.
    del desc["pipeline"]["stages"][1]["bogus"]
    res = run_cli(["--store", str(tmp_path / "store"), "--inspect", "-"], json.dumps(desc))
    assert res.returncode == 1
    assert res.stderr == "osbuild: pipeline.stages[0].options.script: 42 is not of type 'string'\n"
    assert not os.path.exists(tmp_path / "store")


def test_cli_build_env_is_checked(tmp_path):
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"runner": "org.osbuild.debian12",
                               "pipeline": {"stages": [{"name": "org.osbuild.noop", "x": 1}]}}))
    res = run_cli(["--store", str(tmp_path / "store"), "--inspect", "--build-env", str(env), "-"],
                  json.dumps({"stages": [STAGE]}))
    assert res.returncode == 1
    assert res.stderr.startswith("osbuild: build-env.pipeline.stages[0]: Additional properties")


def expected_id(name, build, base, options):
    """DESIGN 1.3, written out independently of osbuild.pipeline."""
    text = "".join(json.dumps(x, sort_keys=True) for x in (name, build, base, options))
    return hashlib.sha256(text.encode()).hexdigest()


def test_inspect_fills_in_ids(tmp_path):
    script = {"name": "org.osbuild.script", "options": {"script": "true"}}
    desc = {"pipeline": {
        "build": {"runner": "org.osbuild.debian12", "pipeline": {"stages": [STAGE]}},
        "stages": [STAGE, script],
        "assembler": {"name": "org.osbuild.noop", "options": {"a": 1}}},
        "sources": {"org.osbuild.files": {"urls": {}}}}
    res = run_cli(["--store", str(tmp_path / "store"), "--inspect", "-"], json.dumps(desc))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    build_id = expected_id("org.osbuild.noop", None, None, {})
    first = expected_id("org.osbuild.noop", build_id, None, {})
    second = expected_id("org.osbuild.script", build_id, first, {"script": "true"})
    output = expected_id("org.osbuild.noop", build_id, second, {"a": 1})
    build = out["pipeline"]["build"]
    assert build["runner"] == "org.osbuild.debian12"
    assert build["pipeline"]["stages"] == [dict(STAGE, id=build_id)]
    assert build["pipeline"]["tree_id"] == build_id
    assert "output_id" not in build["pipeline"]
    assert out["pipeline"]["stages"] == [dict(STAGE, id=first), dict(script, id=second)]
    assert out["pipeline"]["assembler"] == {"name": "org.osbuild.noop", "options": {"a": 1},
                                            "id": output}
    assert out["pipeline"]["tree_id"] == second
    assert out["pipeline"]["output_id"] == output
    assert out["sources"] == desc["sources"]
    assert not os.path.exists(tmp_path / "store"), "--inspect must not touch the store"


def test_inspect_bare_pipeline_and_sources_file(tmp_path):
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"org.osbuild.files": {"urls": {}}}))
    res = run_cli(["--store", str(tmp_path / "store"), "--inspect", "--sources", str(sources),
                   "-"], json.dumps({"stages": [STAGE]}))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    stage_id = expected_id("org.osbuild.noop", None, None, {})
    assert out == {"pipeline": {"stages": [dict(STAGE, id=stage_id)], "tree_id": stage_id},
                   "sources": {"org.osbuild.files": {"urls": {}}}}


def test_inspect_checks_stage_options(tmp_path):
    desc = {"stages": [{"name": "org.osbuild.script", "options": {}}]}
    res = run_cli(["--store", str(tmp_path / "store"), "--inspect", "-"], json.dumps(desc))
    assert res.returncode == 1
    assert res.stderr == "osbuild: stages[0].options: 'script' is a required property\n"


def test_cli_uses_libdir_schema(tmp_path):
    """The libdir's schema is the one the CLI checks with."""
    libdir = tmp_path / "lib"
    shutil.copytree(REPO, libdir, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "rpmbuild", "build", "test"))
    strict = json.loads((libdir / "schemas" / "osbuild1.json").read_text())
    strict["definitions"]["stage"]["required"] = ["name", "options"]
    (libdir / "schemas" / "osbuild1.json").write_text(json.dumps(strict))
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", str(libdir), "--store",
                          str(tmp_path / "store"), "--inspect", "-"],
                         input=json.dumps({"stages": [STAGE]}), capture_output=True, text=True,
                         env=env, check=False, timeout=120)
    assert res.returncode == 1
    assert res.stderr == "osbuild: stages[0]: 'options' is a required property\n"


def test_deep_nesting_is_a_clear_error():
    """The schema check never recurses into a RecursionError."""
    value = {}
    for _ in range(5000):
        value = {"build": {"runner": "org.osbuild.debian12", "pipeline": value}}
    with pytest.raises(ValidationError, match="^build-env.pipeline is nested too deeply"):
        osbuild_schema.check_pipeline(value, "build-env.pipeline", REPO)
    with pytest.raises(ValidationError, match="^manifest is nested too deeply"):
        osbuild_schema.check_manifest({"pipeline": value}, REPO)


def test_odd_keys_stay_on_one_line():
    with pytest.raises(ValidationError) as e:
        osbuild_schema.check_manifest({"pipeline": {}, "sources": {"a\nb": 3}}, REPO)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("sources: 'a\\nb' is not valid: ")
    assert osbuild_schema.format_path(["sources", "a\nb", "urls"]) == 'sources["a\\nb"].urls'
    assert osbuild_schema.format_path(["pipeline", "stages", 3, "options"]) == \
        "pipeline.stages[3].options"
    assert osbuild_schema.format_path([], "") == "manifest"


def test_deep_path_in_an_error_is_elided():
    parts = ["\x1f\x1f\U00010000"] * 60 + [0]
    path = osbuild_schema.format_path(parts)
    assert len(path) <= osbuild_schema.MAX_PATH_CHARS + 1
    assert path.endswith("[0]") and "…" in path
    assert osbuild_schema.format_path(["pipeline", "stages", 3]) == "pipeline.stages[3]"
