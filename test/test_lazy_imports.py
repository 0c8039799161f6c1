"""A warm rebuild (nothing to run) loads none of the machinery of a real build."""

import json
import os
import subprocess
import sys

import pytest

from conftest import requires_root, run_osbuild

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Modules only a build that runs something (or fails, or copies out) needs.
BUILD_ONLY = ["jsonschema", "osbuild.buildroot", "osbuild.api", "osbuild.sources",
              "osbuild.remote", "osbuild.remoteloop", "osbuild.etctemplate",
              "osbuild.output", "concurrent.futures"]

# Runs the CLI in-process and reports which of BUILD_ONLY it imported.
RUN = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from osbuild.__main__ import main
status = main(sys.argv[3:])
loaded = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
print(json.dumps({"status": status, "loaded": loaded}), file=sys.stderr)
"""


def run_in_process(*args):
    """(exit status, loaded modules of BUILD_ONLY, stdout) of `osbuild args` in a fresh Python."""
    proc = subprocess.run([sys.executable, "-c", RUN, REPO, json.dumps(BUILD_ONLY),
                           "--libdir", REPO, *args], capture_output=True, text=True,
                          check=False, cwd=REPO)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return report["status"], report["loaded"], proc.stdout


@pytest.mark.integration
def test_warm_rebuild_loads_no_build_machinery(tmp_path):
    """After a cold build, the same manifest again loads none of BUILD_ONLY and runs nothing."""
    requires_root()
    manifest = os.path.join(REPO, "samples", "script-tar.json")
    store = str(tmp_path / "store")
    assert run_osbuild(manifest, store).returncode == 0
    status, loaded, out = run_in_process("--store", store, "--json", manifest)
    assert status == 0
    result = json.loads(out)
    assert result["success"] and result["stages"] == [] and "assembler" not in result
    assert loaded == []


def test_errors_still_reported_after_lazy_imports(tmp_path):
    """The lazily imported error classes still give a one-line JSON error."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"stages": [{"name": "org.osbuild.noop"}], "nonsense": 1}')
    status, _, out = run_in_process("--store", str(tmp_path / "store"), "--json", str(bad))
    assert status != 0
    result = json.loads(out)
    assert result["success"] is False and "nonsense" in result["error"]
