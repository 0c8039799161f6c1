"""The validation cache (osbuild/metacache.py): fast when nothing changed, never fooled."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from osbuild import metacache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Loads and validates a manifest as the CLI does, in a fresh interpreter;
# prints which of the slow modules it needed.
CHECK = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from osbuild import metacache
from osbuild.manifest import load, validate
from osbuild.meta import ValidationError
libdir, store, path = sys.argv[2:5]
metacache.use_store(store)
with open(path, encoding="utf-8") as f:
    desc = json.load(f)
try:
    validate(load(desc, libdir).pipeline, libdir)
    error = None
except ValidationError as e:
    error = str(e)
os.makedirs(store, exist_ok=True)
metacache.save()
print(json.dumps({"error": error, "jsonschema": "jsonschema" in sys.modules,
                  "ast": "ast" in sys.modules}))
"""


def check(libdir, store, manifest, tmp_path):
    """Validate `manifest` against `libdir` with the cache of `store`; returns the report."""
    path = os.path.join(tmp_path, "manifest.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    proc = subprocess.run([sys.executable, "-c", CHECK, REPO, libdir, store, path],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def hostname_manifest(hostname):
    """A manifest with one hostname stage."""
    return {"pipeline": {"stages": [{"name": "org.osbuild.hostname",
                                     "options": {"hostname": hostname}}],
                         "assembler": {"name": "org.osbuild.noop"}}}


@pytest.fixture(name="libdir")
def fixture_libdir(tmp_path):
    """A private library with copies of a few programs (so they can be edited)."""
    lib = tmp_path / "lib"
    for kind, name in (("stages", "org.osbuild.hostname"), ("assemblers", "org.osbuild.noop")):
        (lib / kind).mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(REPO, kind, name), lib / kind / name)
    (lib / "schemas").mkdir()
    shutil.copy2(os.path.join(REPO, "schemas", "osbuild1.json"), lib / "schemas")
    return str(lib)


def test_second_validation_needs_neither_jsonschema_nor_ast(libdir, tmp_path):
    """A rebuild of the same manifest takes everything from the cache."""
    store = str(tmp_path / "store")
    first = check(libdir, store, hostname_manifest("one"), tmp_path)
    assert first == {"error": None, "jsonschema": True, "ast": True}
    assert os.path.isfile(os.path.join(store, "cache", "meta.json"))
    second = check(libdir, store, hostname_manifest("one"), tmp_path)
    assert second == {"error": None, "jsonschema": False, "ast": False}


def test_new_options_are_validated(libdir, tmp_path):
    """Only the very same value hits the cache: other (bad) options are checked."""
    store = str(tmp_path / "store")
    assert check(libdir, store, hostname_manifest("one"), tmp_path)["error"] is None
    bad = check(libdir, store, hostname_manifest(42), tmp_path)
    assert bad["jsonschema"]
    assert bad["error"] == "pipeline.stages[0].options.hostname: 42 is not of type 'string'"
    # a bad manifest is never recorded as valid: it fails again
    assert check(libdir, store, hostname_manifest(42), tmp_path)["error"] == bad["error"]
    # nor in the manifest schema's part
    broken = {"pipeline": {"stages": [{"name": "org.osbuild.hostname", "options": [1]}]}}
    for _ in range(2):
        assert "is not of type 'object'" in check(libdir, store, broken, tmp_path)["error"]


def test_edited_program_is_read_again(libdir, tmp_path):
    """A program whose file changed (same size, same mtime even) gets its new schema used."""
    store = str(tmp_path / "store")
    assert check(libdir, store, hostname_manifest("one"), tmp_path)["error"] is None
    path = os.path.join(libdir, "stages", "org.osbuild.hostname")
    st = os.stat(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # same length, same mtime: now "hostname" must be at most 2 characters long
    edited = text.replace('"maxLength": 253', '"maxLength": 2  ', 1)
    assert edited != text and len(edited) == len(text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(edited)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = check(libdir, store, hostname_manifest("one"), tmp_path)
    assert res["jsonschema"]
    assert "is too long" in res["error"]


def test_edited_manifest_schema_is_used(libdir, tmp_path):
    """The manifest schema's file is part of the key too."""
    store = str(tmp_path / "store")
    manifest = hostname_manifest("one")
    assert check(libdir, store, manifest, tmp_path)["error"] is None
    path = os.path.join(libdir, "schemas", "osbuild1.json")
    with open(path, encoding="utf-8") as f:
        schema = json.load(f)
    schema["definitions"]["manifest"]["properties"]["pipeline"] = {"type": "null"}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(schema, f)
    assert "is not of type 'null'" in check(libdir, store, manifest, tmp_path)["error"]


@pytest.mark.parametrize("content", ["{", "[]",
                                     '{"format": 1, "programs": {"x": 1}, "valid": [1]}'])
def test_damaged_cache_is_an_empty_one(libdir, tmp_path, content):
    """A cache file that is not what osbuild writes is ignored (and replaced)."""
    store = str(tmp_path / "store")
    os.makedirs(os.path.join(store, "cache"))
    with open(os.path.join(store, "cache", "meta.json"), "w", encoding="utf-8") as f:
        f.write(content)
    first = check(libdir, store, hostname_manifest("one"), tmp_path)
    assert first == {"error": None, "jsonschema": True, "ast": True}
    assert check(libdir, store, hostname_manifest("one"), tmp_path)["jsonschema"] is False


def test_key_covers_the_value_exactly():
    """1, 1.0, true and "1" are different values, so different keys."""
    ident = ["/x", 1, 2, 3, 4, 5]
    keys = {metacache.validation_key(ident, v) for v in (1, 1.0, True, "1", [1], {"a": 1})}
    assert len(keys) == 6
    assert metacache.validation_key(ident, {"a": 1, "b": 2}) == \
        metacache.validation_key(ident, {"b": 2, "a": 1})
    assert metacache.validation_key(ident, 1) != metacache.validation_key(ident[:5] + [6], 1)


def test_cache_others_could_write_is_ignored(libdir, tmp_path):
    """A cache file (or directory) that another user could have written is not trusted."""
    store = str(tmp_path / "store")
    assert check(libdir, store, hostname_manifest("one"), tmp_path)["error"] is None
    path = os.path.join(store, "cache", "meta.json")
    os.chmod(path, 0o666)
    assert check(libdir, store, hostname_manifest("one"), tmp_path)["jsonschema"] is True
    os.chmod(path, 0o600)
    os.chmod(os.path.dirname(path), 0o777)
    assert check(libdir, store, hostname_manifest("one"), tmp_path)["jsonschema"] is True
    os.chmod(os.path.dirname(path), 0o700)
    assert check(libdir, store, hostname_manifest("one"), tmp_path)["jsonschema"] is False
