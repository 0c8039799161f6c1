"""--checkpoint globs (by id or stage name) and --export ID into the output directory."""

import os
import stat

import pytest

from conftest import REPO, run_osbuild
from hygiene import check_store, no_leftovers_fixture  # pylint: disable=unused-import
from osbuild.manifest import load

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

SCRIPT_1 = ("mkdir -p etc usr/bin home/user deep/er\n"
            "echo one > etc/motd\n"
            "printf '#!/bin/sh\\n' > usr/bin/suid; chmod 4755 usr/bin/suid\n"
            "printf x > deep/er/sgid; chmod 2755 deep/er/sgid\n"
            "chown 1000:1000 home/user\n"
            "ln -s ../usr/bin/suid etc/link\n")
MANIFEST = {"pipeline": {
    "stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": SCRIPT_1}},
        {"name": "org.osbuild.noop", "options": {"zero": 0}},
        {"name": "org.osbuild.script",
         "options": {"chroot": False, "script": "echo two >> etc/motd"}}],
    "assembler": {"name": "org.osbuild.tar",
                  "options": {"filename": "tree.tar.zst", "compression": "zstd"}}}}


def ids():
    """(stage ids, output id) of the manifest."""
    pipeline = load(MANIFEST, REPO).pipeline
    return [s.id for s in pipeline.stages], pipeline.output_id


def refs(store):
    """The ids the store has refs for."""
    return set(check_store(store)[1])


def test_checkpoint_star_keeps_every_stage(tmp_path):
    store = tmp_path / "store"
    stages, output = ids()
    res = run_osbuild(MANIFEST, store, "--checkpoint", "*")
    assert res.returncode == 0, res.stderr
    assert refs(store) == set(stages) | {output}


def test_checkpoint_by_stage_name_and_id_glob(tmp_path):
    store = tmp_path / "store"
    stages, output = ids()
    res = run_osbuild(MANIFEST, store, "--checkpoint", "org.osbuild.noop")
    assert res.returncode == 0, res.stderr
    assert refs(store) == {stages[1], stages[2], output}
    store2 = tmp_path / "store2"
    res = run_osbuild(MANIFEST, store2, "--checkpoint", stages[0][:10] + "*",
                      "--checkpoint", "org.osbuild.s*")
    assert res.returncode == 0, res.stderr
    assert refs(store2) == {stages[0], stages[2], output}


def test_checkpoint_that_matches_nothing(tmp_path):
    store = tmp_path / "store"
    # a glob: a warning, and the build goes on
    res = run_osbuild(MANIFEST, store, "--checkpoint", "org.osbuild.nothing*")
    assert res.returncode == 0, res.stderr
    assert "warning: checkpoint 'org.osbuild.nothing*' matches no stage" in res.stderr
    # a plain id or name: an error before anything runs, as in the original
    store2 = tmp_path / "store2"
    res = run_osbuild(MANIFEST, store2, "--checkpoint", "0" * 64)
    assert res.returncode == 1
    assert res.json["error"] == f"checkpoint '{'0' * 64}' matches no stage of the manifest"
    assert not store2.exists()


def test_export_stage_trees_and_the_output(tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    stages, output = ids()
    res = run_osbuild(MANIFEST, store, "--output-directory", out, "--export", stages[0],
                      "--export", output, "--export", stages[0])
    assert res.returncode == 0, res.stderr
    first = out / stages[0]
    assert (first / "etc/motd").read_text() == "one\n"
    assert stat.S_IMODE(os.lstat(first).st_mode) == 0o700
    assert os.lstat(first / "home/user").st_uid == 1000      # owners are kept
    assert os.readlink(first / "etc/link") == "../usr/bin/suid"
    assert (out / output / "tree.tar.zst").is_file()
    assert (out / "tree.tar.zst").is_file()                  # --output-directory as before
    assert sorted(os.listdir(out)) == sorted([stages[0], output, "tree.tar.zst"])
    assert stages[0] in refs(store)


def test_export_drops_setuid_setgid_and_capabilities(tmp_path):
    """An exported tree is what a hostile stage made: no file in it keeps privileges."""
    store, out = tmp_path / "store", tmp_path / "out"
    stages, _ = ids()
    desc = {"pipeline": {"stages": MANIFEST["pipeline"]["stages"][:1] + [
        {"name": "org.osbuild.script", "options": {
            "chroot": False,
            "script": "cp usr/bin/suid usr/bin/capped; "
                      "setcap cap_setuid+ep usr/bin/capped 2>/dev/null || "
                      "python3 -c \"import os; os.setxattr('usr/bin/capped', "
                      "'security.capability', bytes.fromhex('01000002800000000000000000000000'"
                      "'00000000'))\"; chmod 4755 usr/bin/capped"}}]}}
    res = run_osbuild(desc, store, "--output-directory", out, "--export", stages[0],
                      "--export", load(desc, REPO).pipeline.tree_id)
    assert res.returncode == 0, res.stdout + res.stderr
    stored = store / "refs" / stages[0]
    assert os.stat(stored / "usr/bin/suid").st_mode & stat.S_ISUID   # the store keeps it
    for tree in os.listdir(out):
        for top, _, files in os.walk(out / tree):
            for name in files:
                st = os.lstat(os.path.join(top, name))
                assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), (top, name)
                assert "security.capability" not in os.listxattr(os.path.join(top, name),
                                                                 follow_symlinks=False)
    assert (out / load(desc, REPO).pipeline.tree_id / "usr/bin/capped").is_file()


def test_export_replaces_a_planted_symlink_without_following_it(tmp_path):
    store, out, victim = tmp_path / "store", tmp_path / "out", tmp_path / "victim"
    stages, _ = ids()
    out.mkdir()
    victim.mkdir()
    (victim / "keep").write_text("mine")
    os.symlink(victim, out / stages[1])
    res = run_osbuild(MANIFEST, store, "--output-directory", out, "--export", stages[1])
    assert res.returncode == 0, res.stderr
    assert not os.path.islink(out / stages[1])
    assert (out / stages[1] / "etc/motd").read_text() == "one\n"
    assert os.listdir(victim) == ["keep"]


def test_export_of_an_earlier_stage_when_the_store_has_the_result(tmp_path):
    """The finished output is in the store, the stage's tree is not: it is built again."""
    store, out = tmp_path / "store", tmp_path / "out"
    stages, _ = ids()
    assert run_osbuild(MANIFEST, store).returncode == 0
    assert stages[0] not in refs(store)
    res = run_osbuild(MANIFEST, store, "--output-directory", out, "--export", stages[0])
    assert res.returncode == 0, res.stderr
    assert [s["id"] for s in res.json["stages"]] == [stages[0]]   # only up to it
    assert "assembler" not in res.json                             # the output was there
    assert (out / stages[0] / "etc/motd").read_text() == "one\n"


def test_export_errors_come_before_building(tmp_path):
    store = tmp_path / "store"
    stages, _ = ids()
    res = run_osbuild(MANIFEST, store, "--export", stages[0])
    assert res.returncode == 1
    assert "--export needs --output-directory" in res.json["error"]
    res = run_osbuild(MANIFEST, store, "--output-directory", tmp_path / "out",
                      "--export", "f" * 64)
    assert res.returncode == 1
    assert f"--export '{'f' * 64}' is not the id of a stage or an assembler" in res.json["error"]
    assert not store.exists() and not (tmp_path / "out").exists()
