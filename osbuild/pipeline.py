"""Stages, assemblers and pipelines: their ids, descriptions and how they run."""

import hashlib
import json
import os
import time

from osbuild.layout import CONTAINER
from osbuild.meta import emulates, receives_secrets, uses_host_network
from osbuild.monitor import Monitor
from osbuild.objectstore import Object
from osbuild.reproducible import DEFAULT_EPOCH, clamp_mtimes
from osbuild.results import PipelineResult, StageResult
from osbuild.util.pidlimit import DEFAULT_MAX_PROCESSES
from osbuild.util.workdir import WorkDir


def compute_id(name, build, base, options, source_epoch=None):
    """The id of DESIGN 1.3: SHA-256 over four canonical JSON texts.

    A `source_epoch` other than None and DEFAULT_EPOCH adds a fifth text
    (`{"source-epoch": N}`): another timestamp makes another tree.
    """
    digest = hashlib.sha256()
    parts = [name, build, base, options]
    if source_epoch is not None and source_epoch != DEFAULT_EPOCH:
        parts.append({"source-epoch": source_epoch})
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()


class BuildError(Exception):
    """The original osbuild's `osbuild.BuildError` (a failed build; `result`
    is its result). The engine returns PipelineResults and never raises it."""

    def __init__(self, result):
        super().__init__("build failed")
        self.result = result


class BuildContext:
    """What every program run of one osbuild invocation shares."""

    def __init__(self, store, libdir, sources_options=None, secrets=None, monitor=None,
                 checkpoints=(), remote=None, max_processes=DEFAULT_MAX_PROCESSES,
                 debug=None, exports=()):
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        self.store = store
        self.libdir = os.path.abspath(libdir)
        self.sources_options = sources_options or {}
        self.secrets = secrets
        self.monitor = monitor or Monitor()  # an osbuild.monitor.Monitor
        self.checkpoints = set(checkpoints)
        self.max_processes = max_processes  # of each build root; 0: no limit
        # an osbuild.remote.Remote shared with other build hosts, or None
        self.remote = remote
        # an osbuild.debugshell.Debug (--break, --stage-timeout, ...), or None
        self.debug = debug
        # ids of stage trees that must be in the store afterwards (--export)
        self.exports = set(exports)
        self.checkpoints |= self.exports

    def control(self, step):
        """What to do around running the stage or assembler `step` (debugshell)."""
        return self.debug.control(step) if self.debug is not None else None

    def pull(self, object_id):
        """Fetch `object_id` from the remote into the store; whether it is there now."""
        return self.remote is not None and self.remote.pull(self.store, object_id)

class Stage:
    """One stage: a program that modifies the tree.

    The arguments are the original osbuild's: `sources_options` (the
    manifest's `sources`, kept as `sources`; the build uses the context's),
    `build` (the build pipeline's tree id or None), `base` (the previous
    stage's id or None) and `options`.
    """

    kind = "stages"

    def __init__(self, name, sources_options, build, base, options, source_epoch=None):
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        self.name = name
        self.sources = sources_options
        self._build = build
        self._base = base
        self.options = options or {}
        self._source_epoch = source_epoch
        self.pipeline = None  # set by Pipeline.add_stage: build and base then follow it

    @property
    def build(self):
        """The build pipeline's tree id, or None (the pipeline's, while in one)."""
        return self.pipeline.build_id if self.pipeline is not None else self._build

    @build.setter
    def build(self, value):
        self._build = value

    @property
    def base(self):
        """The previous stage's id, or None (the pipeline's, while in one)."""
        return self.pipeline.base_of(self) if self.pipeline is not None else self._base

    @base.setter
    def base(self, value):
        self._base = value

    @property
    def source_epoch(self):
        """The explicit timestamp (see reproducible.py), or None (the pipeline's, while in one)."""
        return self.pipeline.source_epoch if self.pipeline is not None else self._source_epoch

    @source_epoch.setter
    def source_epoch(self, value):
        self._source_epoch = value

    @property
    def id(self):
        """The id of DESIGN 1.3, computed from the current build, base and options."""
        return compute_id(self.name, self.build, self.base, self.options, self.source_epoch)

    def description(self):
        """The manifest form of this stage."""
        desc = {"name": self.name}
        if self.options:
            desc["options"] = self.options
        return desc

    def run(self, ctx, buildroot, tree):
        """Run the stage on the writable host path `tree`; returns its StageResult."""
        return _timed(ctx, self, lambda: self._run(ctx, buildroot, tree))

    def _run(self, ctx, buildroot, tree):
        if not receives_secrets(ctx.libdir, self.kind, self.name):
            return self._run_in(ctx, buildroot, tree, False)
        # Every program already gets a read-only /etc and its own /var, /tmp and
        # /root; a stage that gets secrets also gets a build root of its own (its
        # own runner set-up), so nothing another program touched is near the secret.
        from osbuild.buildroot import BuildRoot  # pylint: disable=import-outside-toplevel
        with BuildRoot(buildroot.root, buildroot.runner, buildroot.libdir,
                       ctx.store.tmp, ctx.max_processes, epoch=buildroot.epoch) as own:
            return self._run_in(ctx, own, tree, True)

    def _run_in(self, ctx, buildroot, tree, secrets):
        from osbuild.sources import SourcesServer  # pylint: disable=import-outside-toplevel
        sources_workdir = WorkDir(ctx.store.tmp, "sources-")
        sources_dir = sources_workdir.path
        try:
            # source programs on the host get the secrets to fetch with; the
            # stage itself only if it declares STAGE_SECRETS (dnf, yum)
            server = SourcesServer(ctx.libdir, ctx.sources_options, ctx.store.sources,
                                   sources_dir, ctx.secrets, stage_secrets=secrets,
                                   remote=ctx.remote, monitor=ctx.monitor)
            args = {"tree": CONTAINER.tree, "sources": CONTAINER.sources,
                    "options": self.options}
            network = uses_host_network(ctx.libdir, self.kind, self.name)
            emulate = self.options.get("emulation") \
                if emulates(ctx.libdir, self.kind, self.name) else None
            return buildroot.run(self.kind, self.name, args,
                                 binds=[(tree, CONTAINER.tree)],
                                 ro_binds=[(sources_dir, CONTAINER.sources)],
                                 apis=[server], monitor=ctx.monitor.log, network=network,
                                 on_phase=lambda name: ctx.monitor.phase(self, name),
                                 emulate=emulate,
                                 control=ctx.control(self))
        finally:
            sources_workdir.cleanup()


class Assembler(Stage):
    """The assembler: a program that turns the finished tree into an artifact."""

    kind = "assemblers"

    def __init__(self, name, build, base, options, source_epoch=None):
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        super().__init__(name, None, build, base, options, source_epoch)

    @property
    def base(self):
        """The tree id it assembles, or None (the pipeline's, while in one)."""
        return self.pipeline.tree_id if self.pipeline is not None else self._base

    @base.setter
    def base(self, value):
        self._base = value

    def run(self, ctx, buildroot, tree, output_dir=None):  # pylint: disable=arguments-differ
        """Run on the read-only `tree`, writing into `output_dir`; returns its StageResult."""
        args = {"tree": CONTAINER.tree, "output_dir": CONTAINER.output, "options": self.options}
        return _timed(ctx, self, lambda: buildroot.run(
            self.kind, self.name, args,
            binds=[(output_dir, CONTAINER.output), (buildroot.dev, CONTAINER.dev)],
            ro_binds=[(tree, CONTAINER.tree)],
            apis=[buildroot.loop_server(tree, output_dir)], monitor=ctx.monitor.log,
            on_phase=lambda name: ctx.monitor.phase(self, name),
            control=ctx.control(self)))


def detect_os(*paths):
    """`ID` and `VERSION_ID` (without dots) of the first os-release(5) file of `paths`.

    E.g. "debian12" or "fedora31". Raises FileNotFoundError if none of the
    files exists; the defaults of os-release(5) apply to missing fields.
    """
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        fields = {}
        for line in text.splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                fields[key.strip()] = value.strip().strip("\"'")
        return fields.get("ID", "linux") + fields.get("VERSION_ID", "").replace(".", "")
    raise FileNotFoundError(f"none of the os-release files exists: {', '.join(paths)}")


def detect_host_runner():
    """The runner name for this host, e.g. "org.osbuild.debian12" (original osbuild API)."""
    return "org.osbuild." + detect_os("/etc/os-release", "/usr/lib/os-release")


def _timed(ctx, step, run):
    """Run `step` with `run()` (a RunResult), telling the monitor; its StageResult."""
    ctx.monitor.step_start(step)
    started = time.monotonic()
    res = run()
    result = StageResult(step, res.success, res.output, time.monotonic() - started)
    ctx.monitor.step_end(step, result)
    return result


class Pipeline:
    """Stages, an optional assembler and an optional build pipeline.

    `source_epoch` is the pipeline's timestamp (manifest `source-epoch` or
    SOURCE_DATE_EPOCH), None for DEFAULT_EPOCH; set it before adding stages.
    """

    def __init__(self, runner=None, build=None, source_epoch=None):
        self.runner = runner
        self.build = build
        self.stages = []
        self.assembler = None
        self.source_epoch = source_epoch

    @property
    def epoch(self):
        """The timestamp of everything this pipeline writes (seconds since 1970)."""
        return DEFAULT_EPOCH if self.source_epoch is None else self.source_epoch

    @property
    def build_id(self):
        """The tree id of the build pipeline, or None (host build root)."""
        return self.build.tree_id if self.build else None

    @property
    def tree_id(self):
        """The id of the finished tree (the last stage's), or None."""
        ids = self.stage_ids()
        return ids[-1] if ids else None

    @property
    def output_id(self):
        """The assembler's id, or None."""
        return self.assembler.id if self.assembler else None

    def add_stage(self, name, sources_options=None, options=None):
        """Append a stage (arguments as in the original osbuild); returns it."""
        stage = Stage(name, sources_options, None, None, options)
        stage.pipeline = self
        self.stages.append(stage)
        return stage

    def set_assembler(self, name, options=None):
        """Set the assembler; returns it."""
        self.assembler = Assembler(name, None, None, options)
        self.assembler.pipeline = self
        return self.assembler

    def stage_ids(self, upto=None):
        """The ids of the stages, in order (up to and without the stage `upto`).

        One pass: each id is the base of the next one.
        """
        build = self.build_id
        ids, base = [], None
        for stage in self.stages:
            if stage is upto:
                break
            base = compute_id(stage.name, build, base, stage.options, self.source_epoch) \
                if stage.pipeline is self else stage.id
            ids.append(base)
        return ids

    def base_of(self, step):
        """The base of `step` (a stage or the assembler of this pipeline): the id before it."""
        ids = self.stage_ids(upto=step)
        return ids[-1] if ids else None

    def all_stage_ids(self):
        """Ids of all stages of this pipeline and its build pipelines."""
        ids = self.stage_ids()
        if self.build:
            ids += self.build.all_stage_ids()
        return ids

    def all_stages(self):
        """All stages of this pipeline and its build pipelines."""
        return self.stages + (self.build.all_stages() if self.build else [])

    def all_assemblers(self):
        """The assemblers of this pipeline and its build pipelines."""
        own = [self.assembler] if self.assembler else []
        return own + (self.build.all_assemblers() if self.build else [])

    def description(self):
        """The canonical manifest form (empty and null parts dropped)."""
        from osbuild.formats import v1  # pylint: disable=import-outside-toplevel,cyclic-import
        return v1.describe(self)

    def _build_root(self, ctx, result, host_runner):
        """Build the build pipeline if needed; returns (tree path, runner), or
        None when it failed (its result is then in `result.build`)."""
        if self.build is None:
            return "/", self.runner or host_runner
        result.build = self.build.run(ctx, host_runner)
        if not result.build.success:
            return None
        if self.build.tree_id is None:
            return "/", self.runner
        return ctx.store.resolve_ref(self.build.tree_id), self.runner

    def _finished(self, ctx):
        """Whether the result (output, or tree without an assembler) is in the store now."""
        wanted = self.output_id if self.assembler else self.tree_id
        pipeline = self
        while pipeline is not None:    # --export of a build pipeline's stage, too
            if pipeline._missing_exports(ctx):  # pylint: disable=protected-access
                return False
            pipeline = pipeline.build
        return wanted is None or ctx.store.contains(wanted) or ctx.pull(wanted)

    def _missing_exports(self, ctx):
        """The indexes of the stages whose trees --export wants and the store lacks."""
        if not ctx.exports:
            return []
        return [i for i, stage_id in enumerate(self.stage_ids())
                if stage_id in ctx.exports and not ctx.store.contains(stage_id)
                and not ctx.pull(stage_id)]

    def run(self, ctx, host_runner):
        """Build what is not in the store yet; returns its PipelineResult (DESIGN 1.4)."""
        result = PipelineResult(self)
        if self._finished(ctx):
            if self.build:
                result.build = PipelineResult(self.build)
            return result
        found = self._build_root(ctx, result, host_runner)
        if found is None:
            return result
        root, runner = found
        # only a build that runs something needs the container machinery
        from osbuild.buildroot import BuildRoot  # pylint: disable=import-outside-toplevel
        with BuildRoot(root, runner, ctx.libdir, ctx.store.tmp,
                       ctx.max_processes, epoch=self.epoch) as buildroot:
            if self._run_stages(ctx, buildroot, result) and self._assembler_to_run(ctx):
                self._run_assembler(ctx, buildroot, result)
        return result

    def steps_to_run(self, ctx):
        """The stages and assemblers `run()` would run now, build pipelines' first."""
        if self._finished(ctx):
            return []
        steps = self.build.steps_to_run(ctx) if self.build else []
        steps += self._todo(ctx)[1]
        return steps + ([self.assembler] if self._assembler_to_run(ctx) else [])

    def _assembler_to_run(self, ctx):
        """Whether the assembler must run (not when --export alone made the stages run)."""
        return self.assembler is not None and not ctx.store.contains(self.output_id)

    def _todo(self, ctx):
        """(id of the last stage already in the store or None, the stages to run)."""
        # --export: start before the first stage whose tree is wanted and missing;
        # stop after the last one if the final tree is there already
        ids = self.stage_ids()
        missing = self._missing_exports(ctx)
        end = len(self.stages)
        if missing and ctx.store.contains(ids[-1]):
            end = missing[-1] + 1
        for i in range((missing[0] if missing else end) - 1, -1, -1):
            if ctx.store.contains(ids[i]) or ctx.pull(ids[i]):
                return ids[i], self.stages[i + 1:end]
        return None, self.stages[:end]

    def _run_stages(self, ctx, buildroot, result):
        """Run the stages not in the store; whether they all succeeded."""
        store = ctx.store
        base, todo = self._todo(ctx)
        with Object(store, base) as obj:
            for stage in todo:
                res = stage.run(ctx, buildroot, obj.write())
                result.stages.append(res)
                if not res.success:
                    return False
                # what the stage wrote "now" gets the pipeline's timestamp: in
                # the walk of the commit when one follows, else on its own
                if stage is todo[-1] or stage.id in ctx.checkpoints:
                    store.commit(obj, stage.id, clamp=self.epoch)
                else:
                    clamp_mtimes(obj.write(), self.epoch)
        return True

    def _run_assembler(self, ctx, buildroot, result):
        store = ctx.store
        with Object(store) as empty, Object(store) as output:
            tree = store.resolve_ref(self.tree_id) if self.tree_id else empty.path
            result.assembler = self.assembler.run(ctx, buildroot, tree, output.write())
            if result.assembler.success:
                store.commit(output, self.output_id, clamp=self.epoch)
