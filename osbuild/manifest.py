"""Load and check a manifest (DESIGN 1.2) into Pipeline objects."""

import json
import os

from osbuild.meta import ProgramInfo, ValidationError, program_path
from osbuild.pipeline import Pipeline
from osbuild.schema import check_manifest
from osbuild.util import nesting


class Manifest:
    """A loaded manifest: the pipeline and the sources options."""

    def __init__(self, pipeline, sources):
        self.pipeline = pipeline
        self.sources = sources

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
    _check_keys(desc, ("name", "options"), where)
    if "name" not in desc:
        raise ValidationError(f"{where}: 'name' is required")
    _expect(desc["name"], (str,), f"{where}.name", "name")
    options = desc.get("options")
    if options is None:
        options = {}
    _expect(options, (dict,), f"{where}.options", "options")
    return desc["name"], options


def load_pipeline(desc, where, runner=None):
    """Build a Pipeline from its description; `where` names it in errors."""
    _expect(desc, (dict,), where or "manifest", "pipeline")
    prefix = where + "." if where else ""
    _check_keys(desc, ("build", "stages", "assembler", "runner"), where or "manifest")
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
        build = load_pipeline({} if inner is None else inner, f"{bwhere}.pipeline")
        runner = build_desc["runner"]
    elif desc.get("runner") is not None:
        _expect(desc["runner"], (str,), prefix + "runner", "runner")
        runner = desc["runner"]
    pipeline = Pipeline(runner, build)
    stages = desc.get("stages")
    stages = [] if stages is None else stages
    _expect(stages, (list,), prefix + "stages", "stages")
    for i, stage in enumerate(stages):
        name, options = _step(stage, f"{prefix}stages[{i}]", "stage")
        pipeline.add_stage(name, options)
    assembler = desc.get("assembler")
    if assembler is not None and assembler != {}:
        name, options = _step(assembler, prefix + "assembler", "assembler")
        pipeline.set_assembler(name, options)
    return pipeline


def load(desc, libdir=None):
    """Load a manifest in either format: `{"pipeline": ..., "sources": ...}` or a bare pipeline.

    The structure is checked against schemas/osbuild1.json (see osbuild.schema) first.
    """
    nesting.check(desc, "manifest")  # before anything that recurses per level
    check_manifest(desc, libdir)
    _expect(desc, (dict,), "manifest", "manifest")
    if "pipeline" in desc:
        _check_keys(desc, ("pipeline", "sources"), "manifest")
        sources = desc.get("sources")
        sources = {} if sources is None else sources
        _expect(sources, (dict,), "sources", "sources")
        pipeline = desc["pipeline"]
        return Manifest(load_pipeline({} if pipeline is None else pipeline, "pipeline"), sources)
    return Manifest(load_pipeline(desc, ""), {})


def validate(pipeline, libdir, where="pipeline", _infos=None):
    """Check that every program exists and every options object fits its schema."""
    prefix = where + "." if where else ""
    # Each program is read once, however many stages use it.
    infos = {} if _infos is None else _infos
    def info_of(kind, name):
        if (kind, name) not in infos:
            infos[kind, name] = ProgramInfo.load(libdir, kind, name)
        return infos[kind, name]
    if pipeline.build:
        validate(pipeline.build, libdir, f"{prefix}build.pipeline", infos)
    if pipeline.runner is not None:
        program_path(libdir, "runners", pipeline.runner)
    for i, stage in enumerate(pipeline.stages):
        info = info_of("stages", stage.name)
        info.validate(stage.options, f"{prefix}stages[{i}].options")
    if pipeline.assembler:
        info = info_of("assemblers", pipeline.assembler.name)
        info.validate(pipeline.assembler.options, f"{prefix}assembler.options")


def innermost(pipeline):
    """The innermost pipeline (the one built on the host)."""
    while pipeline.build is not None:
        pipeline = pipeline.build
    return pipeline


def host_runner(libdir, os_release_paths=("/etc/os-release", "/usr/lib/os-release")):
    """`org.osbuild.<ID><VERSION_ID without dots>` from the host's os-release(5)."""
    for path in os_release_paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        fields = {}
        for line in text.splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                fields[key.strip()] = value.strip().strip("\"'")
        name = f"org.osbuild.{fields.get('ID', '')}{fields.get('VERSION_ID', '').replace('.', '')}"
        if not os.path.exists(os.path.join(libdir, "runners", name)):
            raise ValidationError(f"no runner for this host: {name} is not in {libdir}/runners")
        return name
    raise ValidationError("cannot detect the host's runner: "
                          "no /etc/os-release or /usr/lib/os-release")
