"""Check a loaded manifest against the programs, and find the runner.

The format itself (load, describe, inspect) is osbuild.formats.v1; `load`
and `Manifest` are its, named here too for the tools that import them from
this module.
"""

import os

from osbuild import meta
from osbuild.formats.v1 import Manifest, innermost, load, load_pipeline
from osbuild.meta import ValidationError
from osbuild.pipeline import detect_host_runner, detect_os

__all__ = ["Manifest", "host_runner", "innermost", "load", "load_original", "validate"]


def load_original(description, sources_options):
    """The original osbuild's `osbuild.load()`: a Pipeline from a pipeline description.

    `description` is a pipeline (the value of a manifest's `pipeline` key),
    checked like the CLI checks its structure; `sources_options` are given
    to every stage (`Stage.sources`). Without a build pipeline the runner is
    the host's (None when the host has no os-release).
    """
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
