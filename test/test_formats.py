"""osbuild.formats.v1: one loader (schema first), ids on demand, describe and inspect."""

import copy
import os

import pytest

from osbuild.formats import v1
from osbuild.meta import ValidationError
from osbuild.pipeline import Pipeline, compute_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NOOP = {"name": "org.osbuild.noop"}
HOST = {"name": "org.osbuild.hostname", "options": {"hostname": "h"}}
BUILD = {"runner": "org.osbuild.debian12", "pipeline": {"stages": [NOOP]}}


def test_ids_follow_a_build_pipeline_attached_later():
    """--build-env attaches a build pipeline: the stages' ids change, without a rebuild."""
    nested = v1.load({"pipeline": {"build": BUILD, "stages": [NOOP, HOST],
                                   "assembler": NOOP}}, REPO).pipeline
    plain = v1.load({"pipeline": {"stages": [NOOP, HOST], "assembler": NOOP}}, REPO).pipeline
    stages = list(plain.stages)
    before = plain.output_id
    v1.attach_build_env(copy.deepcopy(BUILD), plain, "env", REPO)
    assert plain.stages == stages              # the same Stage objects
    assert plain.output_id != before
    assert v1.inspect(plain, {}) == v1.inspect(nested, {})
    assert [s.id for s in plain.stages] == plain.stage_ids() == nested.stage_ids()
    build_id = nested.build.tree_id
    first = compute_id("org.osbuild.noop", build_id, None, {})
    assert plain.stages[1].base == first and plain.stages[1].build == build_id
    assert plain.assembler.base == plain.tree_id


def test_build_env_of_a_nested_manifest_goes_innermost():
    outer = v1.load({"pipeline": {"build": BUILD, "stages": [HOST]}}, REPO).pipeline
    tree = outer.tree_id
    v1.attach_build_env({"runner": "org.osbuild.debian12", "pipeline": {"stages": [HOST]}},
                        outer, "env", REPO)
    assert outer.build.build is not None and outer.tree_id != tree


def test_build_env_is_checked_by_the_schema():
    plain = v1.load({"stages": [NOOP]}, REPO).pipeline
    with pytest.raises(ValidationError, match=r"^build-env\.pipeline\.stages\[0\]\.name: 1 "):
        v1.attach_build_env({"runner": "r", "pipeline": {"stages": [{"name": 1}]}}, plain,
                            "env", REPO)
    with pytest.raises(ValidationError, match='^env: expected {"runner": NAME'):
        v1.attach_build_env({"pipeline": {}}, plain, "env", REPO)


def test_inspect_output_loads_back_with_its_ids():
    desc = {"pipeline": {"build": BUILD, "stages": [NOOP, HOST], "assembler": NOOP},
            "sources": {"org.osbuild.files": {"urls": {}}}}
    manifest = v1.load(desc, REPO)
    shown = v1.inspect(manifest.pipeline, manifest.sources)
    again = v1.load(shown, REPO)
    assert v1.inspect(again.pipeline, again.sources) == shown
    assert shown["pipeline"]["build"]["pipeline"]["tree_id"] == manifest.pipeline.build_id
    wrong = copy.deepcopy(shown)
    wrong["pipeline"]["stages"][1]["id"] = "0" * 64
    with pytest.raises(ValidationError, match=r"^pipeline\.stages\[1\]\.id: .* does not match"):
        v1.load(wrong, REPO)


def test_description_drops_empty_parts():
    manifest = v1.load({"pipeline": {"build": None, "stages": None, "assembler": {}}}, REPO)
    assert manifest.pipeline.description() == {}
    assert manifest.description() == {"pipeline": {}}
    p = Pipeline()
    p.add_stage("org.osbuild.noop", None, {"a": 1})
    assert v1.describe(p) == {"stages": [{"name": "org.osbuild.noop", "options": {"a": 1}}]}
