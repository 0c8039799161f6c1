"""Load and check a manifest (DESIGN 1.2) into Pipeline objects."""

import json
import os
import time

from osbuild import meta
from osbuild.meta import ValidationError
from osbuild.pipeline import Pipeline, detect_host_runner, detect_os
from osbuild.reproducible import ENV as EPOCH_ENV, EpochError, check_epoch
from osbuild.schema import check_manifest
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


def _expect(value, types, where, _what):
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        names = {dict: "an object", list: "an array", str: "a string"}
        expected = " or ".join(names.get(t, t.__name__) for t in types)
        shown = json.dumps(value)
        if len(shown) > 80:
            shown = shown[:80] + "…"
        raise ValidationError(f"{where}: {shown} is not {expected}")


def _check_keys(obj, allowed, where):
    for key in obj:
        if key not in allowed:
            raise ValidationError(f"{where}: unknown key '{key}'")


def _step(desc, where, kind):
    _expect(desc, (dict,), where, kind)
    _check_keys(desc, ("name", "options", "id"), where)
    if "name" not in desc:
        raise ValidationError(f"{where}: 'name' is required")
    _expect(desc["name"], (str,), f"{where}.name", "name")
    options = desc.get("options")
    if options is None:
        options = {}
    _expect(options, (dict,), f"{where}.options", "options")
    return desc["name"], options


def _check_id(desc, key, actual, where):
    """An `id`/`tree_id`/`output_id` (as --inspect prints them) must be the computed one."""
    if key not in desc:
        return
    given = desc[key]
    if given != actual:
        raise ValidationError(f"{where}.{key}: {json.dumps(given)[:80]} does not match the "
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


def load_pipeline(desc, where, runner=None, sources_options=None, environ=None):
    """Build a Pipeline from its description; `where` names it in errors.

    The ids `--inspect` adds (`id` of each stage and the assembler,
    `tree_id`, `output_id`) are accepted and must match the computed ones.
    `environ` (osbuild's environment) may override `source-epoch` with
    SOURCE_DATE_EPOCH.
    """
    # pylint: disable=too-many-locals
    _expect(desc, (dict,), where or "manifest", "pipeline")
    prefix = where + "." if where else ""
    _check_keys(desc, ("build", "stages", "assembler", "runner", "tree_id", "output_id",
                       "source-epoch"), where or "manifest")
    build = None
    build_desc = desc.get("build")
    if build_desc is not None and build_desc != {}:
        bwhere = prefix + "build"
        _expect(build_desc, (dict,), bwhere, "build")
        _check_keys(build_desc, ("pipeline", "runner"), bwhere)
        if "runner" not in build_desc:
            raise ValidationError(f"{bwhere}: 'runner' is required")
        _expect(build_desc["runner"], (str,), f"{bwhere}.runner", "runner")
        inner = build_desc.get("pipeline")
        build = load_pipeline({} if inner is None else inner, f"{bwhere}.pipeline",
                              sources_options=sources_options, environ=environ)
        runner = build_desc["runner"]
    elif desc.get("runner") is not None:
        _expect(desc["runner"], (str,), prefix + "runner", "runner")
        runner = desc["runner"]
    pipeline = Pipeline(runner, build, source_epoch(desc, prefix, environ))
    stages = desc.get("stages")
    stages = [] if stages is None else stages
    _expect(stages, (list,), prefix + "stages", "stages")
    for i, stage in enumerate(stages):
        name, options = _step(stage, f"{prefix}stages[{i}]", "stage")
        added = pipeline.add_stage(name, sources_options, options)
        _check_id(stage, "id", added.id, f"{prefix}stages[{i}]")
    assembler = desc.get("assembler")
    if assembler is not None and assembler != {}:
        name, options = _step(assembler, prefix + "assembler", "assembler")
        added = pipeline.set_assembler(name, options)
        _check_id(assembler, "id", added.id, prefix + "assembler")
    _check_id(desc, "tree_id", pipeline.tree_id, where or "manifest")
    _check_id(desc, "output_id", pipeline.output_id, where or "manifest")
    return pipeline


def load(desc, libdir=None, environ=None):
    """Load a manifest in either format: `{"pipeline": ..., "sources": ...}` or a bare pipeline.

    The structure is checked against schemas/osbuild1.json (see osbuild.schema)
    first. `environ`: see load_pipeline.
    """
    nesting.check(desc, "manifest")  # before anything that recurses per level
    strictjson.check(desc)
    warnings = []
    if isinstance(desc, dict) and "pipeline" in desc:
        extra = sorted(k for k in desc if k not in MANIFEST_KEYS)
        for key in extra:
            warnings.append(f"manifest: unknown top-level key '{key[:80]}' ignored "
                            "(as the original osbuild did"
                            + ("; it does not select the runner)" if key == "runner" else ")"))
        desc = {k: v for k, v in desc.items() if k in MANIFEST_KEYS}
    check_manifest(desc, libdir)
    _expect(desc, (dict,), "manifest", "manifest")
    if "pipeline" in desc:
        sources = desc.get("sources")
        sources = {} if sources is None else sources
        _expect(sources, (dict,), "sources", "sources")
        pipeline = desc["pipeline"]
        return Manifest(load_pipeline({} if pipeline is None else pipeline, "pipeline",
                                      sources_options=sources, environ=environ),
                        sources, warnings)
    return Manifest(load_pipeline(desc, "", environ=environ), {}, warnings)


def load_original(description, sources_options):
    """The original osbuild's `osbuild.load()`: a Pipeline from a pipeline description.

    `description` is a pipeline (the value of a manifest's `pipeline` key),
    checked like the CLI checks its structure; `sources_options` are given
    to every stage (`Stage.sources`). Without a build pipeline the runner is
    the host's (None when the host has no os-release).
    """
    nesting.check(description, "pipeline")
    strictjson.check(description)
    pipeline = load_pipeline(description, "", sources_options=sources_options)
    inner = innermost(pipeline)
    if inner.runner is None:
        try:
            inner.runner = detect_host_runner()
        except FileNotFoundError:
            pass
    return pipeline


def validate(pipeline, libdir, where="pipeline"):
    """Check that every program exists and every options object fits its schema."""
    prefix = where + "." if where else ""
    programs = meta.index(libdir)

    def info_of(kind, name, where):
        try:
            return programs.get(kind, name)
        except ValidationError as e:
            raise ValidationError(f"{where}: {e}") from None
    if pipeline.build:
        validate(pipeline.build, libdir, f"{prefix}build.pipeline")
    if pipeline.runner is not None:
        try:
            programs.path("runners", pipeline.runner)
        except ValidationError as e:
            where = f"{prefix}build.runner" if pipeline.build else f"{prefix}runner"
            raise ValidationError(f"{where}: {e}") from None
    for i, stage in enumerate(pipeline.stages):
        info = info_of("stages", stage.name, f"{prefix}stages[{i}].name")
        info.validate(stage.options, f"{prefix}stages[{i}].options")
    if pipeline.assembler:
        info = info_of("assemblers", pipeline.assembler.name, f"{prefix}assembler.name")
        info.validate(pipeline.assembler.options, f"{prefix}assembler.options")


def innermost(pipeline):
    """The innermost pipeline (the one built on the host)."""
    while pipeline.build is not None:
        pipeline = pipeline.build
    return pipeline


def host_runner(libdir, os_release_paths=("/etc/os-release", "/usr/lib/os-release")):
    """`org.osbuild.<ID><VERSION_ID without dots>` from the host's os-release(5)."""
    try:
        name = "org.osbuild." + detect_os(*os_release_paths)
    except FileNotFoundError:
        raise ValidationError("cannot detect the host's runner: "
                              f"no {' or '.join(os_release_paths)}") from None
    except OSError as e:
        raise ValidationError(f"cannot read the host's os-release: {e}") from None
    if not os.path.exists(os.path.join(libdir, "runners", name)):
        raise ValidationError(f"no runner for this host: {name} is not in {libdir}/runners")
    return name
