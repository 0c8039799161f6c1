"""Ids, descriptions and loading of manifests (no build)."""

import hashlib
import json

import pytest

from osbuild import manifest
from osbuild.meta import ValidationError
from conftest import REPO


def sha(text):
    """SHA-256 hex of a literal text."""
    return hashlib.sha256(text.encode()).hexdigest()


TWO_LEVEL = {
    "pipeline": {
        "build": {
            "runner": "org.osbuild.debian12",
            "pipeline": {
                "stages": [{"name": "org.osbuild.noop", "options": {"b": [1, 2], "a": "x"}}]
            },
        },
        "stages": [
            {"name": "org.osbuild.noop"},
            {"name": "org.osbuild.error", "options": {"returncode": 3}},
        ],
        "assembler": {"name": "org.osbuild.noop", "options": {"z": None}},
    }
}


def test_two_level_ids_hand_computed():
    """Ids are SHA-256 over name, build, base and options as canonical JSON texts."""
    p = manifest.load(TWO_LEVEL).pipeline
    # The four JSON texts, written out by hand (sort_keys, default separators).
    build_stage = sha('"org.osbuild.noop"' + 'null' + 'null' + '{"a": "x", "b": [1, 2]}')
    assert p.build.tree_id == build_stage
    stage1 = sha('"org.osbuild.noop"' + f'"{build_stage}"' + 'null' + '{}')
    stage2 = sha('"org.osbuild.error"' + f'"{build_stage}"' + f'"{stage1}"' + '{"returncode": 3}')
    output = sha('"org.osbuild.noop"' + f'"{build_stage}"' + f'"{stage2}"' + '{"z": null}')
    assert [s.id for s in p.stages] == [stage1, stage2]
    assert p.tree_id == stage2
    assert p.output_id == output


def test_runner_not_part_of_id():
    other = json.loads(json.dumps(TWO_LEVEL))
    other["pipeline"]["build"]["runner"] = "org.osbuild.fedora30"
    assert manifest.load(other).pipeline.output_id == manifest.load(TWO_LEVEL).pipeline.output_id


def test_bare_pipeline_format_equals_wrapped():
    bare = TWO_LEVEL["pipeline"]
    assert manifest.load(bare).pipeline.output_id == manifest.load(TWO_LEVEL).pipeline.output_id
    assert manifest.load(bare).sources == {}


def test_null_and_empty_parts_mean_none():
    m = manifest.load({"pipeline": {"build": None, "stages": [{"name": "org.osbuild.noop",
                                                              "options": None}],
                                    "assembler": None}, "sources": None})
    p = m.pipeline
    assert p.build is None and p.assembler is None
    assert p.stages[0].id == sha('"org.osbuild.noop"' + 'null' + 'null' + '{}')
    assert p.description() == {"stages": [{"name": "org.osbuild.noop"}]}
    assert manifest.load({"stages": []}).pipeline.description() == {}


def test_description_round_trip():
    p = manifest.load(TWO_LEVEL).pipeline
    desc = p.description()
    assert desc["build"]["runner"] == "org.osbuild.debian12"
    assert desc["stages"][0] == {"name": "org.osbuild.noop"}
    again = manifest.load({"pipeline": desc}).pipeline
    assert again.output_id == p.output_id


@pytest.mark.parametrize("desc,path", [
    ([], "manifest"),
    ({"pipeline": {"stages": {}}}, "pipeline.stages"),
    ({"pipeline": {"stages": [{"options": {}}]}}, "pipeline.stages[0]"),
    ({"pipeline": {"stages": [{"name": 3}]}}, "pipeline.stages[0].name"),
    ({"pipeline": {"stages": [{"name": "org.osbuild.noop", "options": []}]}},
     "pipeline.stages[0].options"),
    ({"pipeline": {"build": {"pipeline": {}}}}, "pipeline.build"),
    ({"pipeline": {}, "sources": []}, "sources"),
    ({"stages": [], "extra": 1}, "manifest"),  # beside "pipeline" only a warning
])
def test_structural_errors_name_the_place(desc, path):
    with pytest.raises(ValidationError) as e:
        manifest.load(desc)
    assert str(e.value).startswith(path + ": ")


@pytest.mark.parametrize("desc,message", [
    ({"stages": [{"name": "org.osbuild.nope"}]}, "unknown stage 'org.osbuild.nope'"),
    ({"stages": [{"name": "../stages/org.osbuild.noop"}]}, "stages[0].name"),
    ({"assembler": {"name": "org.osbuild.nope"}}, "unknown assembler 'org.osbuild.nope'"),
    ({"build": {"runner": "org.osbuild.nope", "pipeline": {}}},
     "unknown runner 'org.osbuild.nope'"),
    ({"stages": [{"name": "org.osbuild.error", "options": {"returncode": "x"}}]},
     "stages[0].options.returncode: 'x' is not of type 'integer'"),
    ({"stages": [{"name": "org.osbuild.script", "options": {}}]},
     "stages[0].options: 'script' is a required property"),
])
def test_validation_errors(desc, message):
    with pytest.raises(ValidationError) as e:
        manifest.validate(manifest.load(desc).pipeline, REPO, "")
    assert message in str(e.value)


def test_host_runner_from_os_release(tmp_path):
    (tmp_path / "os-release").write_text('NAME="Fedora"\nID=fedora\nVERSION_ID=31\n')
    assert manifest.host_runner(REPO, [str(tmp_path / "missing"), str(tmp_path / "os-release")]) \
        == "org.osbuild.fedora31"
    (tmp_path / "os-release").write_text('ID="rhel"\nVERSION_ID="8.2"\n')
    assert manifest.host_runner(REPO, [str(tmp_path / "os-release")]) == "org.osbuild.rhel82"
    (tmp_path / "os-release").write_text('ID=plan9\nVERSION_ID=4\n')
    with pytest.raises(ValidationError, match="org.osbuild.plan94"):
        manifest.host_runner(REPO, [str(tmp_path / "os-release")])
