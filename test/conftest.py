"""Shared fixtures: run osbuild from this checkout on a manifest."""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_program(path, module_name):
    """Import a program file without a .py suffix (a stage, assembler or tool) as a module."""
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    spec = importlib.util.spec_from_loader(module_name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class OsbuildResult:
    """What one osbuild invocation produced."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        try:
            self.json = json.loads(stdout)
        except ValueError:
            self.json = None


def run_osbuild(manifest, store, *args, json_output=True, stdin=None, check=False, timeout=1800):
    """Run `python3 -m osbuild --libdir REPO --store STORE [--json] ARGS MANIFEST`.

    `manifest` is a dict (written to a file next to the store), a path, or "-".
    """
    if isinstance(manifest, dict):
        path = os.path.join(os.path.dirname(os.path.abspath(store)), "manifest.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
        manifest = path
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(store)]
    if json_output:
        cmd.append("--json")
    cmd += [str(a) for a in args] + [str(manifest)]
    # a SOURCE_DATE_EPOCH of the caller's would change every id (osbuild/reproducible.py)
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = subprocess.run(cmd, cwd=REPO, input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)
    res = OsbuildResult(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"osbuild failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return res


@pytest.fixture(name="osbuild")
def osbuild_fixture():
    """The run_osbuild function."""
    return run_osbuild


@pytest.fixture(name="store")
def store_fixture(tmp_path):
    """A fresh, empty store directory path (not yet created)."""
    return tmp_path / "store"


def requires_root():
    """Skip marker for tests that need root."""
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
