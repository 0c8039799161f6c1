"""The benchmarks read osbuild's human log: their parsers follow its format, and their
reports print every shape of figures they make (amd64 with a recipe, --arch without)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import requires_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    """bench/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIGURES = {"label": "debian13", "packages": 124, "fast_initrd": True, "load": 1.0, "repeat": 3,
           "cold": 30.0, "cold_all": [30.0, 31.0, 32.0], "warm": 0.05, "first_warm": 0.1,
           "cold_checkpoint": 29.0, "last_stage": 3.9,
           "last_stage_phases": [("org.osbuild.grub2", 0.7)],
           "phases": [("org.osbuild.dpkg", 24.0), ("org.osbuild.hostname", 0.2)],
           "dpkg_steps": [("  dpkg --install base", 5.0)], "maxrss": 100 * 2 ** 20,
           "mem_growth": 300 * 2 ** 20,
           "recipe": {"fetch": 2.0, "install": 33.0, "image": 3.0, "floor": 38.0,
                      "depsolve": 4.0}, "recipe_all": [38.0, 39.0, 40.0]}


def test_reports_print_with_and_without_the_rebuild_figures(capsys):
    """--arch builds have no checkpoint/last-stage figures and no recipe: still a report."""
    debian = load("debian")
    debian.report(FIGURES)
    debian.report(dict(FIGURES, label="debian13-arm64", cold_checkpoint=None, last_stage=None,
                       last_stage_phases=[], recipe=None, recipe_all=[], repeat=1))
    out = capsys.readouterr().out
    assert "last config stage changed / cold build: 0.130" in out
    assert out.count("warm rebuild / cold build") == 2
    assert "cold build / floor: 0.79" in out


@pytest.mark.integration
def test_phases_are_read_from_the_real_log(tmp_path):
    """The stage headers of a real human log are what bench/debian.py times."""
    requires_root()
    debian = load("debian")
    manifest = tmp_path / "m.json"
    manifest.write_text('{"pipeline": {"stages": [{"name": "org.osbuild.noop", "options": {}}, '
                        '{"name": "org.osbuild.noop", "options": {"b": 1}}]}}')
    proc = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
                           str(tmp_path / "store"), str(manifest)], cwd=REPO, check=True,
                          capture_output=True, text=True)
    lines = [(float(i), line) for i, line in enumerate(proc.stdout.splitlines())]
    stages, _ = debian.phases({"lines": lines, "total": float(len(lines))})
    assert [name for name, _ in stages] == ["org.osbuild.noop", "org.osbuild.noop"]
