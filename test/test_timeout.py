"""--stage-timeout: a program that runs too long is stopped with all its processes."""

import os
import time
import uuid

import pytest

from conftest import run_osbuild
from hygiene import check_store, leftovers, no_leftovers_fixture  # pylint: disable=unused-import

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def script_manifest(*scripts):
    """A manifest of one script stage per script (build-root mode)."""
    return {"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": s}}
        for s in scripts]}}


def assert_nothing_half_written(store):
    """The store is consistent and its tmp/ empty; returns (objects, refs)."""
    objects, refs = check_store(store)
    assert os.listdir(store / "tmp") == []
    return objects, refs


def test_a_sleeping_stage_is_stopped_and_the_store_works_after(tmp_path):
    store = tmp_path / "store"
    desc = script_manifest("echo ok > first", "echo partial > half-written; sleep 600")
    start = time.monotonic()
    res = run_osbuild(desc, store, "--stage-timeout", "4")
    took = time.monotonic() - start
    assert res.returncode == 1
    assert res.json["success"] is False
    last = res.json["stages"][-1]
    assert last["success"] is False
    assert ("osbuild: stage org.osbuild.script ran longer than the limit of 4 s "
            "(--stage-timeout) and was stopped") in last["output"]
    assert took < 300, took                        # not the 600 s of the sleep
    objects, refs = assert_nothing_half_written(store)
    assert objects == [] and refs == []
    # the same store builds the first stage, and without the limit a quick second one
    res = run_osbuild(script_manifest("echo ok > first", "echo done > second"), store,
                      "--stage-timeout", "120")
    assert res.returncode == 0 and res.json["success"], res.stdout
    objects, refs = assert_nothing_half_written(store)
    assert len(refs) == 1


def test_a_daemon_that_ignores_sigterm_dies_with_the_stage(tmp_path):
    store = tmp_path / "store"
    marker = f"d17-daemon-{uuid.uuid4().hex[:12]}"
    # a daemon in a session of its own that ignores SIGTERM (and SIGHUP), and a stage
    # that ignores SIGTERM too and would wait forever
    daemon = f"trap '' TERM HUP; while :; do echo {marker} > /dev/null; sleep 0.2; done"
    desc = script_manifest(f"trap '' TERM; setsid sh -c \"{daemon}\" {marker} & "
                           f"sleep 600 # {marker}")
    res = run_osbuild(desc, store, "--stage-timeout", "3", timeout=300)
    assert res.returncode == 1
    assert "ran longer than the limit of 3 s" in res.json["stages"][-1]["output"]
    assert not leftovers(tmp_path, markers=(marker,))
    assert_nothing_half_written(store)


def test_in_the_human_log_the_message_is_one_line_naming_the_stage(tmp_path):
    res = run_osbuild(script_manifest("sleep 600"), tmp_path / "store", "--stage-timeout", "2.5",
                      json_output=False)
    assert res.returncode == 1
    lines = [line for line in res.stdout.splitlines() if "--stage-timeout" in line]
    assert lines == ["osbuild: stage org.osbuild.script ran longer than the limit of 2.5 s "
                     "(--stage-timeout) and was stopped"]
    assert res.stdout.rstrip().endswith("Failed")


@pytest.mark.parametrize("value", ["0", "-3", "abc", "nan", "inf", ""])
def test_bad_values_are_refused_before_building(tmp_path, value):
    res = run_osbuild(script_manifest("true"), tmp_path / "store", "--stage-timeout", value)
    assert res.returncode == 1
    assert res.json == {"success": False, "error": res.json["error"]}
    assert "--stage-timeout" in res.json["error"]
    assert not (tmp_path / "store").exists()
