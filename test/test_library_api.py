"""The original osbuild's library API, used the way the original's own unit tests use it.

Tools that import osbuild (2020) call `osbuild.load`, build `Pipeline`s by
hand, and drive `objectstore.ObjectStore` and `sources.SourcesServer`
directly. These tests are written in those shapes (positional arguments,
short object ids like "a"), so a change of signature breaks them.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import osbuild
import osbuild.sources
from osbuild import objectstore, pipeline
from osbuild.meta import ValidationError


def original_id(name, build, base, options):
    """DESIGN 1.3, computed here independently of osbuild.pipeline."""
    m = hashlib.sha256()
    for part in (name, build, base, options):
        m.update(json.dumps(part, sort_keys=True).encode())
    return m.hexdigest()


# --------------------------------------------------------------- descriptions


@pytest.mark.parametrize("desc", [{}, {"assembler": None}, {"stages": []}, {"build": {}},
                                  {"build": None}])
def test_canonical_description(desc):
    """Empty or null parts load to the same canonical (empty) description."""
    assert osbuild.load(desc, {}).description() == {}


def test_stage_description():
    name, options = "org.osbuild.test", {"one": 1}
    assert osbuild.Stage(name, {}, None, None, {}).description() == {"name": name}
    assert osbuild.Stage(name, {}, None, None, None).description() == {"name": name}
    assert osbuild.Stage(name, {}, None, None, options).description() == \
        {"name": name, "options": options}


def test_assembler_description():
    name, options = "org.osbuild.test", {"one": 1}
    assert osbuild.Assembler(name, None, None, {}).description() == {"name": name}
    assert osbuild.Assembler(name, None, None, None).description() == {"name": name}
    assert osbuild.Assembler(name, None, None, options).description() == \
        {"name": name, "options": options}


def test_pipeline_description_and_ids():
    build = osbuild.Pipeline("org.osbuild.test")
    build.add_stage("org.osbuild.test", {}, {"one": 1})
    pl = osbuild.Pipeline("org.osbuild.test", build)
    pl.add_stage("org.osbuild.test", {}, {"one": 2})
    pl.set_assembler("org.osbuild.test")
    assert pl.description() == {
        "build": {"pipeline": {"stages": [{"name": "org.osbuild.test", "options": {"one": 1}}]},
                  "runner": "org.osbuild.test"},
        "stages": [{"name": "org.osbuild.test", "options": {"one": 2}}],
        "assembler": {"name": "org.osbuild.test"}}
    build_id = original_id("org.osbuild.test", None, None, {"one": 1})
    assert build.tree_id == build_id
    tree_id = original_id("org.osbuild.test", build_id, None, {"one": 2})
    assert pl.tree_id == tree_id
    assert pl.output_id == original_id("org.osbuild.test", build_id, tree_id, {})
    assert pl.stages[0].sources == {}


def test_assembler_follows_stages_added_later():
    """As in the original, a stage added after the assembler becomes its base."""
    pl = osbuild.Pipeline()
    pl.set_assembler("org.osbuild.noop")
    stage = pl.add_stage("org.osbuild.noop", None, {"a": 1})
    assert pl.assembler.base == stage.id
    assert pl.output_id == original_id("org.osbuild.noop", None, stage.id, {})


def test_load_gives_sources_and_host_runner():
    sources = {"org.osbuild.files": {"urls": {}}}
    pl = osbuild.load({"stages": [{"name": "org.osbuild.noop"}]}, sources)
    assert isinstance(pl, osbuild.Pipeline)
    assert pl.stages[0].sources is sources
    assert pl.runner == pipeline.detect_host_runner()
    with_build = osbuild.load({"build": {"runner": "org.osbuild.x", "pipeline": {}}}, {})
    assert with_build.runner == "org.osbuild.x"


def test_load_refuses_what_the_cli_refuses():
    # the same schema check as the CLI's, with the same message
    with pytest.raises(ValidationError, match=r"^stages\[0\]: Additional properties are not "
                                              r"allowed \('nme' was unexpected\)"):
        osbuild.load({"stages": [{"nme": "x"}]}, {})
    with pytest.raises(ValidationError,
                       match=r"stages\[0\]\.options\.x: a string containing a NUL"):
        osbuild.load({"stages": [{"name": "org.osbuild.noop", "options": {"x": "a\0"}}]}, {})
    with pytest.raises(ValidationError, match=r"stages\[0\]\.options\.x: nan is not allowed"):
        osbuild.load({"stages": [{"name": "org.osbuild.noop", "options": {"x": float("nan")}}]},
                     {})


# --------------------------------------------------------------- detect_os


def test_detect_os(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    second.write_text('# comment\nNAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\n')
    assert pipeline.detect_os(str(first), str(second)) == "debian12"
    first.write_text("ID=rhel\nVERSION_ID=8.2\n")
    assert pipeline.detect_os(str(first), str(second)) == "rhel82"
    first.write_text("NAME=x\n")
    assert pipeline.detect_os(str(first)) == "linux"   # the os-release(5) default ID
    with pytest.raises(FileNotFoundError):
        pipeline.detect_os(str(tmp_path / "missing"), str(tmp_path / "also-missing"))


# --------------------------------------------------------------- object store


def test_objectstore_basic(tmp_path):
    store = objectstore.ObjectStore(tmp_path)
    with store.new("a") as tree:
        Path(tree.write(), "A").touch()
    assert os.path.exists(f"{store.refs}/a/A")
    assert len(os.listdir(store.refs)) == 1
    assert len(os.listdir(store.objects)) == 1
    with store.new("b") as tree:
        path = tree.write()
        Path(path, "A").touch()
        Path(path, "B").touch()
    assert os.path.exists(f"{store.refs}/b/B")
    assert len(os.listdir(store.refs)) == 2
    assert len(os.listdir(store.objects)) == 2
    assert len(os.listdir(f"{store.refs}/b/")) == 2
    assert store.contains("a") and store.contains("b") and not store.contains("c")


def test_objectstore_duplicate(tmp_path):
    store = objectstore.ObjectStore(tmp_path)
    with store.new("a") as tree:
        Path(tree.write(), "A").touch()
    with store.new("b") as tree:
        shutil.copy2(f"{store.refs}/a/A", f"{tree.write()}/A")
        # the store's treesum now counts modification times (unlike the
        # original's): give the copy's top directory the first tree's
        st = os.stat(f"{store.refs}/a")
        os.utime(tree.write(), ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(os.listdir(store.refs)) == 2
    assert len(os.listdir(store.objects)) == 1


def test_objectstore_object_base(tmp_path):
    store = objectstore.ObjectStore(tmp_path)
    with store.new("a") as tree:
        Path(tree.write(), "A").touch()
    with store.new("b", base_id="a") as tree:
        assert tree.base == "a"
        assert os.path.exists(f"{tree.path}/A")
        Path(tree.write(), "B").touch()
    assert os.path.exists(f"{store.refs}/b/A") and os.path.exists(f"{store.refs}/b/B")
    assert not os.path.exists(f"{store.refs}/a/B")
    assert len(os.listdir(store.objects)) == 2


def test_objectstore_snapshot(tmp_path):
    store = objectstore.ObjectStore(tmp_path)
    with store.new("b") as tree:
        path = tree.write()
        Path(path, "A").touch()
        store.snapshot(tree, "a")
        Path(path, "B").touch()
    assert os.path.exists(f"{store.refs}/a/A") and not os.path.exists(f"{store.refs}/a/B")
    assert os.path.exists(f"{store.refs}/b/A") and os.path.exists(f"{store.refs}/b/B")


def test_objectstore_commit(tmp_path):
    store = objectstore.ObjectStore(tmp_path)
    with objectstore.Object(store) as obj:
        Path(obj.write(), "C").write_text("c", encoding="utf-8")
        store.commit(obj, "my-tree.v1")
    assert Path(store.refs, "my-tree.v1", "C").read_text(encoding="utf-8") == "c"


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../a", "/abs", "a\0b", "a\nb", "\x7f",
                                 "x" * 252, 3, None])
def test_objectstore_ids_must_be_safe_names(tmp_path, bad):
    """Any single safe file name is an id; nothing that leaves refs/ is."""
    store = objectstore.ObjectStore(tmp_path / "store")
    with pytest.raises(objectstore.StoreError, match="invalid object id"):
        with store.new(bad) as tree:
            Path(tree.write(), "A").touch()
    assert os.listdir(store.refs) == [] and os.listdir(store.objects) == []
    assert sorted(os.listdir(tmp_path)) == ["store"]


# --------------------------------------------------------------- sources


SOURCE_PROGRAM = """#!/usr/bin/python3
import json, os, sys
request = json.load(sys.stdin)
for checksum in request["checksums"]:
    with open(os.path.join(request["output"], checksum), "w") as f:
        f.write(request["options"]["content"])
print("{}")
"""


def test_sources_server_in_the_original_shape(tmp_path):
    """SourcesServer(socket_address, libdir, options, cache, output) as a context manager."""
    libdir = tmp_path / "lib"
    (libdir / "sources").mkdir(parents=True)
    program = libdir / "sources" / "org.osbuild.echo"
    program.write_text(SOURCE_PROGRAM)
    program.chmod(0o755)
    address = str(tmp_path / "api" / "sources")
    os.makedirs(os.path.dirname(address))
    checksum = "sha256:" + "ab" * 32
    options = {"org.osbuild.echo": {"content": "hello"}}
    server = osbuild.sources.SourcesServer(address, str(libdir), options,
                                           str(tmp_path / "cache"), str(tmp_path / "output"))
    with server:
        assert os.path.exists(address)
        directory = osbuild.sources.get("org.osbuild.echo", [checksum], api_path=address,
                                        sources_dir=str(tmp_path / "output"))
        assert Path(directory, checksum).read_text(encoding="utf-8") == "hello"
        with pytest.raises(RuntimeError, match="unknown source 'org.osbuild.nope'"):
            osbuild.sources.get("org.osbuild.nope", [checksum], api_path=address)
    # the modern shape is unchanged
    modern = osbuild.sources.SourcesServer(str(libdir), options, str(tmp_path / "cache"),
                                           str(tmp_path / "output"))
    assert modern.socket_address is None and modern.options == options


def test_library_import_stays_light():
    """`import osbuild` (done by every stage in the build root) loads no host-only module."""
    code = ("import sys, osbuild, osbuild.sources; "
            "print('jsonschema' in sys.modules, 'osbuild.pipeline' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["False", "False"]
