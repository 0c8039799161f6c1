"""Bad input at scale: random and mutated manifests for the loader and the CLI.

Every manifest must end in success or in one clear error: a ValidationError
with a one-line message from the loader, exit status 1 with one line
starting `osbuild:` from the command line; never a traceback, an "internal
error" or a hang.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osbuild import __main__ as cli
from osbuild.manifest import load, validate
from osbuild.meta import ValidationError
from osbuild.pipeline import Pipeline
from osbuild.results import PipelineResult

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stage and assembler names that are cheap to really run, plus junk.
CHEAP_STAGES = ["org.osbuild.noop", "org.osbuild.error", "org.osbuild.hostname",
                "org.osbuild.timezone", "org.osbuild.locale"]
CHEAP_ASSEMBLERS = ["org.osbuild.noop", "org.osbuild.tar"]
BAD_NAMES = ["", ".", "..", "../stages/org.osbuild.noop", "/bin/sh", "org.osbuild.noop\n",
             "org.osbuild.noop/", "osbuild", "org..osbuild", "-rf", "org.osbuild.nope",
             "org.osbuild.\u00e9", "org.osbuild.noop\x00", "stages/org.osbuild.noop"]
KEYS = ["pipeline", "sources", "build", "runner", "stages", "assembler", "name", "options",
        "hostname", "zone", "language", "filename", "compression", "urls",
        "org.osbuild.files", "", "\u00fc\u00f1\u00ee", "a\nb", "\ud800"]
WEIRD_STRINGS = ["", " ", "\n", "\x00", "\ud800", "a\udfffb", "\u202e", "\U0001f600" * 3,
                 "../../../../etc/passwd", "/etc/shadow", "%s%n", "$(reboot)", "x" * 5000,
                 "sha256:" + "0" * 64, "sha256:../../x", "org.osbuild.debian12",
                 "org.osbuild.fedora30", "../runners/org.osbuild.debian12"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([0, -1, 2**31, 2**63, -2**63 - 1, 10**300, -10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(WEIRD_STRINGS))
keys = st.one_of(st.text(max_size=8), st.sampled_from(KEYS))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20)
names = st.one_of(st.sampled_from(CHEAP_STAGES + CHEAP_ASSEMBLERS + BAD_NAMES),
                  st.text(max_size=12))


@st.composite
def deep(draw, inner=json_values):
    """A value nested between 1 and 3000 levels deep (arrays, objects or both)."""
    value = draw(inner)
    shape = draw(st.sampled_from(["array", "object", "mixed"]))
    key = draw(keys)
    for level in range(draw(st.integers(min_value=1, max_value=3000))):
        if shape == "array" or shape == "mixed" and level % 2:
            value = [value]
        else:
            value = {key: value}
    return value


@st.composite
def stage_desc(draw, pool=tuple(CHEAP_STAGES)):
    """A stage description that is often, but not always, valid."""
    name = draw(st.one_of(st.sampled_from(pool), names))
    options = draw(st.one_of(
        st.just({}), st.none(),
        st.fixed_dictionaries({"hostname": st.one_of(st.sampled_from(["h", "my-host"]), scalars)}),
        st.fixed_dictionaries({"zone": st.one_of(st.just("UTC"), scalars)}),
        st.dictionaries(keys, json_values, max_size=3)))
    desc = {"name": name}
    if draw(st.booleans()):
        desc["options"] = options
    return desc


@st.composite
def pipeline_desc(draw, depth=2):
    """A pipeline: stages, maybe an assembler, maybe a (nested) build."""
    desc = {}
    if draw(st.booleans()):
        desc["stages"] = draw(st.lists(stage_desc(), max_size=3))
    if draw(st.booleans()):
        desc["assembler"] = {"name": draw(st.one_of(st.sampled_from(CHEAP_ASSEMBLERS), names)),
                             "options": draw(st.one_of(
                                 st.just({}), st.just({"filename": "root.tar"}),
                                 st.dictionaries(keys, json_values, max_size=2)))}
    if depth > 0 and draw(st.integers(0, 3)) == 0:
        desc["build"] = {"runner": draw(st.one_of(st.just("org.osbuild.debian12"),
                                                  st.sampled_from(WEIRD_STRINGS))),
                         "pipeline": draw(pipeline_desc(depth=depth - 1))}
    return desc


@st.composite
def manifest_desc(draw):
    """A manifest in either format, with or without sources."""
    pipeline = draw(pipeline_desc())
    if draw(st.booleans()):
        return pipeline
    desc = {"pipeline": pipeline}
    if draw(st.booleans()):
        desc["sources"] = draw(st.one_of(
            st.just({}),
            st.just({"org.osbuild.files": {"urls": {"sha256:" + "a" * 64:
                                                        "http://127.0.0.1:9/x"}}}),
            st.dictionaries(keys, json_values, max_size=2)))
    return desc


def _paths(value):
    """Every path (tuple of keys/indices) into a JSON value, the root included."""
    stack = [(value, ())]
    while stack:
        item, prefix = stack.pop()
        yield prefix
        if isinstance(item, dict):
            stack.extend((child, prefix + (key,)) for key, child in item.items())
        elif isinstance(item, list):
            stack.extend((child, prefix + (i,)) for i, child in enumerate(item))


def dumps(value):
    """json.dumps without recursion, for values nested thousands of levels deep."""
    out, stack = [], [("value", value)]
    while stack:
        kind, item = stack.pop()
        if kind == "text":
            out.append(item)
        elif isinstance(item, dict):
            stack.append(("text", "}"))
            for i, (key, child) in reversed(list(enumerate(item.items()))):
                stack.append(("value", child))
                stack.append(("text", ("," if i else "") + json.dumps(str(key)) + ":"))
            out.append("{")
        elif isinstance(item, list):
            stack.append(("text", "]"))
            for i, child in reversed(list(enumerate(item))):
                stack.append(("value", child))
                if i:
                    stack.append(("text", ","))
            out.append("[")
        else:
            out.append(json.dumps(item))
    return "".join(out)


@st.composite
def mutated(draw):
    """A manifest with one to three random edits: replace, delete, add, deepen, wrap."""
    desc = draw(manifest_desc())
    for _ in range(draw(st.integers(1, 3))):
        paths = sorted(_paths(desc), key=lambda p: (len(p), repr(p)))
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add", "deep", "wrap"]))
        if action == "replace":
            new = draw(json_values)
        elif action == "deep":
            new = draw(deep())
        else:
            new = None
        if not path:
            if action in ("replace", "deep"):
                desc = new
            elif action == "wrap":
                desc = [desc]
            continue
        parent = desc
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if action in ("replace", "deep"):
            parent[last] = new
        elif action == "delete":
            del parent[last]
        elif action == "wrap":
            parent[last] = [parent[last]]
        elif isinstance(parent[last], dict):
            parent[last][draw(keys)] = draw(json_values)
        elif isinstance(parent[last], list):
            parent[last].append(draw(json_values))
    return desc


any_manifest = st.one_of(mutated(), manifest_desc(), json_values, deep())


def check_loader(desc):
    """load + validate: a Manifest, or a ValidationError with a clear one-line message."""
    try:
        manifest = load(desc, REPO)
        validate(manifest.pipeline, REPO)
    except ValidationError as e:
        message = str(e)
        assert message.strip(), "empty error message"
        assert "\n" not in message, f"multi-line error: {message!r}"
        assert len(message) < 2000, f"error message of {len(message)} characters"
        return None
    # what the CLI does with a loaded manifest must work as well
    pipeline = manifest.pipeline
    json.dumps(manifest.description())
    assert pipeline.all_stage_ids() is not None
    return manifest


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(any_manifest)
def test_loader_never_crashes(desc):
    """Thousands of random/mutated manifests: loaded, or one clear ValidationError."""
    check_loader(desc)


@pytest.mark.parametrize("desc", [
    {"pipeline": {"stages": [{"name": "org.osbuild.noop", "options": {"a": 1}}]}},
    {"stages": [{"name": "org.osbuild.hostname", "options": {"hostname": "h"}}]},
    {"pipeline": {"build": {"runner": "org.osbuild.debian12",
                            "pipeline": {"stages": [{"name": "org.osbuild.noop"}]}},
                  "assembler": {"name": "org.osbuild.tar", "options": {"filename": "r.tar"}}}},
])
def test_loader_accepts_valid(desc):
    """The generators' base manifests are really accepted (the fuzzing is not all rejects)."""
    assert check_loader(desc) is not None


@pytest.mark.parametrize("desc, fragment", [
    ({"pipeline": {"stages": [{"name": "../stages/org.osbuild.noop"}]}}, "stages[0].name"),
    ({"pipeline": {"stages": [{"name": "org.osbuild.noop\n"}]}}, "org.osbuild.noop\\n"),
    ({"pipeline": {"build": {"runner": "../../bin/sh", "pipeline": {}}}}, "runner"),
    ({"pipeline": {"stages": [{"name": "org.osbuild.hostname", "options": {"hostname": 42}}]}},
     "pipeline.stages[0].options.hostname"),
])
def test_loader_names_the_place(desc, fragment):
    """Path-like names and wrong types are rejected, naming the offending place."""
    with pytest.raises(ValidationError) as e:
        validate(load(desc, REPO).pipeline, REPO)
    assert fragment in str(e.value)


def test_loader_deep_nesting():
    """Nesting far beyond the recursion limit is one clear error, not a RecursionError."""
    value = {}
    for _ in range(100000):
        value = {"a": value}
    for desc in ({"pipeline": {"stages": [{"name": "org.osbuild.noop", "options": value}]}},
                 {"pipeline": value}, value):
        with pytest.raises(ValidationError, match="nested too deeply"):
            load(desc, REPO)
    build = {}
    for _ in range(500):
        build = {"build": {"runner": "org.osbuild.debian12", "pipeline": build}}
    with pytest.raises(ValidationError, match="nested too deeply"):
        load({"pipeline": build}, REPO)


def _fake_run(self, _ctx, _runner):
    """Stands in for Pipeline.run in in-process CLI fuzzing (no builds)."""
    return PipelineResult(self)


def run_main(argv):
    """Run the CLI in-process; returns (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def without_warnings(stderr):
    """stderr without the one-line warnings about ignored top-level keys (issue 14)."""
    return "\n".join(line for line in stderr.strip().splitlines()
                     if not line.startswith("osbuild: warning: manifest: unknown top-level key"))


def assert_clear_failure(status, stderr, what):
    """Exit 1 with exactly one line `osbuild: ...` on stderr, no internal error."""
    assert status == 1, f"{what}: exit status {status}"
    lines = without_warnings(stderr).splitlines()
    assert len(lines) == 1, f"{what}: not one line: {stderr[-3000:]}"
    assert lines[0].startswith("osbuild: "), f"{what}: {stderr[-3000:]}"
    assert "internal error" not in lines[0] and "Traceback" not in stderr, f"{what}: {stderr}"


@st.composite
def raw_documents(draw):
    """A manifest file's bytes: JSON of a (mutated) manifest, or junk."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        text = dumps(draw(mutated()))
        cut = draw(st.integers(0, len(text)))
        return text[:cut].encode()
    if kind == 2:
        return ("[" * draw(st.integers(1, 200000))).encode()
    if kind == 3:
        return dumps(draw(deep())).encode()
    return dumps(draw(any_manifest)).encode()


@settings(max_examples=500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=raw_documents(), build_env=st.one_of(st.none(), json_values, pipeline_desc()),
       checkpoint=st.one_of(st.none(), st.sampled_from(WEIRD_STRINGS[:12])))
def test_cli_in_process(tmp_path, data, build_env, checkpoint):
    """The CLI on random files and options: exit 0, or exit 1 with one `osbuild:` line.

    Builds are replaced by a stub so that thousands of inputs stay cheap; the
    subprocess test below runs the real thing.
    """
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(data)
    argv = ["--libdir", REPO, "--store", str(tmp_path / "store"), "--json"]
    if build_env is not None:
        env_path = tmp_path / "build-env.json"
        env_path.write_text(json.dumps({"runner": "org.osbuild.debian12", "pipeline": build_env}
                                       if isinstance(build_env, dict) and "stages" in build_env
                                       else build_env))
        argv += ["--build-env", str(env_path)]
    if checkpoint is not None:
        argv += ["--checkpoint", checkpoint]
    with mock.patch.object(Pipeline, "run", _fake_run):
        status, stdout, stderr = run_main(argv + [str(manifest)])
    if status == 0:
        assert json.loads(stdout)["success"] is True
        assert not without_warnings(stderr)
    else:
        assert_clear_failure(status, stderr, data[:200])


@pytest.mark.integration
@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.one_of(raw_documents(), st.builds(lambda d: dumps(d).encode(),
                                                 manifest_desc())),
       stdin=st.booleans())
def test_cli_subprocess(tmp_path, data, stdin):
    """The real command on random manifests (builds included): success or one clear error."""
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(data)
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(tmp_path / "store"),
           "--json", "-" if stdin else str(manifest)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, input=data if stdin else None, capture_output=True,
                              timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"osbuild hung on {data[:300]!r}")
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    if proc.returncode == 0:
        assert json.loads(proc.stdout)["success"] is True
    elif proc.stdout.strip():
        # the manifest was valid and a stage failed (e.g. org.osbuild.error): a result
        assert proc.returncode == 1
        assert json.loads(proc.stdout)["success"] is False
    else:
        assert_clear_failure(proc.returncode, stderr, data[:300])
