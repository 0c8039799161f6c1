"""The manifest format, version 1 (DESIGN 1.2): load, describe, inspect.

A description is first checked against schemas/osbuild1.json (osbuild.schema):
after that its structure is known to be right, and loading only builds the
Pipeline objects (and checks the ids --inspect adds, which a schema cannot).
Ids are never stored: a stage's id is computed from its pipeline's build
and the stage before it when asked (osbuild.pipeline), so attaching a build
pipeline (`--build-env`) changes them all at once.
"""

import json
import time

from osbuild.meta import ValidationError
from osbuild.pipeline import Pipeline
from osbuild.reproducible import ENV as EPOCH_ENV, EpochError, check_epoch
from osbuild.schema import check_manifest, check_pipeline
from osbuild.util import nesting, strictjson

# Top-level keys of the manifest format; any other top-level key is ignored
# with a warning, as the original ignored it (see README, "compatibility").
MANIFEST_KEYS = ("pipeline", "sources")


class Manifest:
    """A loaded manifest: the pipeline, the sources options and load warnings."""

    def __init__(self, pipeline, sources, warnings=()):
        self.pipeline = pipeline
        self.sources = sources
        self.warnings = list(warnings)

    def description(self):
        """The canonical manifest form."""
        desc = {"pipeline": self.pipeline.description()}
        if self.sources:
            desc["sources"] = self.sources
        return desc


def _check_id(desc, key, actual, where):
    """An `id`/`tree_id`/`output_id` (as --inspect prints them) must be the computed one."""
    if key in desc and desc[key] != actual:
        raise ValidationError(f"{where}.{key}: {json.dumps(desc[key])[:80]} does not match the "
                              f"computed id {json.dumps(actual)}")


def source_epoch(desc, prefix, environ):
    """The pipeline's explicit timestamp: SOURCE_DATE_EPOCH in `environ`, else its
    `source-epoch`, else None (see osbuild/reproducible.py)."""
    try:
        if environ and environ.get(EPOCH_ENV):
            return check_epoch(environ[EPOCH_ENV], EPOCH_ENV, time.time())
        if desc.get("source-epoch") is not None:
            return check_epoch(desc["source-epoch"], prefix + "source-epoch", time.time())
    except EpochError as e:
        raise ValidationError(str(e)) from None
    return None


def _pipeline(desc, where, sources_options=None, environ=None):
    """A Pipeline from a description the schema accepted; `where` names it in errors.

    `environ` (osbuild's environment) may override `source-epoch` with
    SOURCE_DATE_EPOCH.
    """
    desc = desc or {}
    prefix = where + "." if where else ""
    build, runner = None, None
    build_desc = desc.get("build")
    if build_desc:
        build = _pipeline(build_desc.get("pipeline"), f"{prefix}build.pipeline",
                          sources_options, environ)
        runner = build_desc["runner"]
    elif desc.get("runner") is not None:
        runner = desc["runner"]
    pipeline = Pipeline(runner, build, source_epoch(desc, prefix, environ))
    stages = desc.get("stages") or []
    for stage in stages:
        pipeline.add_stage(stage["name"], sources_options, stage.get("options"))
    assembler = desc.get("assembler")
    if assembler:
        pipeline.set_assembler(assembler["name"], assembler.get("options"))
    # the ids --inspect adds: each pass over the stages computes all their ids
    if "tree_id" in desc or any("id" in stage for stage in stages):
        ids = pipeline.stage_ids()
        for i, (stage, sid) in enumerate(zip(stages, ids)):
            _check_id(stage, "id", sid, f"{prefix}stages[{i}]")
        _check_id(desc, "tree_id", ids[-1] if ids else None, where or "manifest")
    if "output_id" in desc or assembler and "id" in assembler:
        output_id = pipeline.output_id
        if assembler:
            _check_id(assembler, "id", output_id, prefix + "assembler")
        _check_id(desc, "output_id", output_id, where or "manifest")
    return pipeline


def load_pipeline(desc, where="", sources_options=None, libdir=None, environ=None):
    """A Pipeline from a bare pipeline description, checked against the schema first.

    The ids `--inspect` adds (`id` of each stage and the assembler,
    `tree_id`, `output_id`) are accepted and must match the computed ones.
    """
    nesting.check(desc, where or "pipeline")  # before anything that recurses per level
    strictjson.check(desc)
    check_pipeline(desc, where, libdir)
    return _pipeline(desc, where, sources_options, environ)


def load(desc, libdir=None, environ=None):
    """Load a manifest in either form: `{"pipeline": ..., "sources": ...}` or a bare pipeline.

    `environ`: see _pipeline.
    """
    nesting.check(desc, "manifest")  # before anything that recurses per level
    strictjson.check(desc)
    warnings = []
    if isinstance(desc, dict) and "pipeline" in desc:
        for key in sorted(k for k in desc if k not in MANIFEST_KEYS):
            warnings.append(f"manifest: unknown top-level key '{key[:80]}' ignored "
                            "(as the original osbuild did"
                            + ("; it does not select the runner)" if key == "runner" else ")"))
        desc = {k: v for k, v in desc.items() if k in MANIFEST_KEYS}
    check_manifest(desc, libdir)
    if "pipeline" in desc:
        sources = desc.get("sources") or {}
        return Manifest(_pipeline(desc["pipeline"], "pipeline", sources, environ),
                        sources, warnings)
    return Manifest(_pipeline(desc, "", environ=environ), {}, warnings)


def innermost(pipeline):
    """The innermost pipeline (the one built on the host)."""
    while pipeline.build is not None:
        pipeline = pipeline.build
    return pipeline


def attach_build_env(env, pipeline, where, libdir=None, environ=None):
    """Make `env` (`{"runner": NAME, "pipeline": {...}}`) the innermost build pipeline."""
    if not isinstance(env, dict) or not isinstance(env.get("runner"), str) \
            or not isinstance(env.get("pipeline", {}), dict):
        raise ValidationError(f"{where}: expected " '{"runner": NAME, "pipeline": {...}}')
    inner = innermost(pipeline)
    inner.build = load_pipeline(env.get("pipeline") or {}, "build-env.pipeline", libdir=libdir,
                                environ=environ)
    inner.runner = env["runner"]
    return pipeline


def describe(pipeline, with_ids=False):
    """A pipeline's description; `with_ids` adds `id` to every stage and the
    assembler, and `tree_id`/`output_id` to each pipeline (as --inspect prints it)."""
    desc = {}
    if pipeline.build is not None:
        desc["build"] = {"pipeline": describe(pipeline.build, with_ids),
                         "runner": pipeline.runner}
    elif with_ids and pipeline.runner is not None:
        desc["runner"] = pipeline.runner
    if pipeline.source_epoch is not None:
        desc["source-epoch"] = pipeline.source_epoch
    ids = pipeline.stage_ids()
    if pipeline.stages:
        desc["stages"] = [dict(stage.description(), id=sid) if with_ids else stage.description()
                          for stage, sid in zip(pipeline.stages, ids)]
    output_id = pipeline.output_id if with_ids else None
    if pipeline.assembler:
        desc["assembler"] = pipeline.assembler.description()
        if with_ids:
            desc["assembler"]["id"] = output_id
    if with_ids and ids:
        desc["tree_id"] = ids[-1]
    if output_id:
        desc["output_id"] = output_id
    return desc


def inspect(pipeline, sources):
    """The manifest with every id filled in (`--inspect`)."""
    result = {"pipeline": describe(pipeline, with_ids=True)}
    if sources:
        result["sources"] = sources
    return result
