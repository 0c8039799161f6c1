"""--break and --break-on-failure: debug shells in a program's build root, scripted on stdin."""

import json
import os
import re
import select
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_osbuild
from hygiene import check_store, no_leftovers_fixture  # pylint: disable=unused-import
from osbuild.manifest import load

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

SAMPLE = os.path.join(REPO, "samples", "script-tar.json")


def sample():
    """The script-tar sample manifest."""
    with open(SAMPLE, encoding="utf-8") as f:
        return json.load(f)


def ids(desc):
    """(stage ids, output id) of a manifest."""
    pipeline = load(desc, REPO).pipeline
    return [s.id for s in pipeline.stages], pipeline.output_id


def tar_members(out):
    """Member names of the tar an output directory holds."""
    listing = subprocess.run(["tar", "--zstd", "-tf", os.path.join(out, "tree.tar.zst")],
                             capture_output=True, text=True, check=True).stdout
    return {line.removeprefix("./").rstrip("/") for line in listing.splitlines()}


def test_break_before_a_stage_edits_the_tree_and_the_build_goes_on(tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    stages, _ = ids(sample())
    # by name: both script stages; bash leaves the second shell's lines unread
    commands = ("ls -a /run/osbuild/tree; echo first-shell; touch /run/osbuild/tree/marker1; exit\n"
                "cat /run/osbuild/tree/etc/motd; touch /run/osbuild/tree/marker2; exit\n")
    res = run_osbuild(SAMPLE, store, "--break", "org.osbuild.script",
                      "--output-directory", out, stdin=commands)
    assert res.returncode == 0, res.stderr
    assert res.json["success"], res.stdout          # stdout is the one JSON object
    assert "first-shell" in res.stderr               # the shells' output: stderr with --json
    assert "Hello from osbuild" in res.stderr        # the second shell saw the first stage's tree
    assert f"org.osbuild.script ({stages[0]}) before it runs" in res.stderr
    members = tar_members(out)
    assert {"marker1", "marker2", "etc/motd"} <= members
    check_store(store)


def test_break_by_id_and_in_the_human_log(tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    stages, _ = ids(sample())
    res = run_osbuild(SAMPLE, store, f"--break={stages[1]}", "--output-directory", out,
                      json_output=False, stdin="echo only-once; touch /run/osbuild/tree/m\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("only-once") == 1        # one shell, its output on stdout
    assert "shell exited with status 0" in res.stdout
    assert "m" in tar_members(out)


def test_break_shell_has_the_stage_sandbox(tmp_path):
    """The shell is as untrusted as the stage: no host file, no writable /usr or /etc,
    no host processes, an unprivileged user namespace."""
    secret = tmp_path / "host-secret"
    secret.write_text("TOP-SECRET-d17\n")
    os.chmod(secret, 0o644)
    store = tmp_path / "store"
    script = f"""
cat {secret} && echo READ-HOST-FILE
cat /etc/shadow && echo READ-SHADOW
touch /usr/osbuild-d17 && echo WROTE-USR
touch /etc/osbuild-d17 && echo WROTE-ETC
ls /proc | grep -qx {os.getpid()} && echo SAW-HOST-PID
grep -q '^ *0 *0 ' /proc/self/uid_map && echo HOST-ROOT
mount -o remount,rw /usr 2>/dev/null && echo REMOUNTED
echo sandbox-checked
"""
    try:
        res = run_osbuild(SAMPLE, store, "--break=*", stdin=script)
    finally:   # should the sandbox fail, leave no trace on the host
        for path in ("/usr/osbuild-d17", "/etc/osbuild-d17"):
            if os.path.exists(path):
                os.unlink(path)
                pytest.fail(f"the shell wrote {path} on the host")
    assert res.returncode == 0, res.stderr
    assert "sandbox-checked" in res.stderr
    for escape in ("TOP-SECRET", "READ-HOST-FILE", "READ-SHADOW", "WROTE-USR", "WROTE-ETC",
                   "SAW-HOST-PID", "HOST-ROOT", "REMOUNTED"):
        assert escape not in res.stderr, res.stderr


def test_break_before_the_assembler_cannot_change_the_committed_tree(tmp_path):
    """The assembler's shell gets the committed tree read-only, as the assembler does."""
    store, out = tmp_path / "store", tmp_path / "out"
    res = run_osbuild(SAMPLE, store, "--break=org.osbuild.tar", "--output-directory", out,
                      stdin="touch /run/osbuild/tree/x && echo WROTE-TREE\n"
                            "echo out > /run/osbuild/output/extra && echo WROTE-OUTPUT\n")
    assert res.returncode == 0, res.stderr
    assert "WROTE-TREE" not in res.stderr
    assert "WROTE-OUTPUT" in res.stderr              # its output directory is writable
    assert "x" not in tar_members(out)
    tree = store / "refs" / res.json["tree_id"]
    assert not (tree / "x").exists()
    check_store(store)                               # every object still hashes to its name


def test_break_on_failure_sees_the_tree_and_commits_nothing(tmp_path):
    store = tmp_path / "store"
    desc = {"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": "echo a > first"}},
        {"name": "org.osbuild.script",
         "options": {"chroot": False, "script": "echo left-behind > half; exit 7"}}]}}
    res = run_osbuild(desc, store, "--break-on-failure",
                      stdin="cat /run/osbuild/tree/half /run/osbuild/tree/first\n")
    assert res.returncode == 1
    assert res.json["success"] is False
    assert res.json["stages"][-1]["success"] is False
    assert "after it failed" in res.stderr
    assert "left-behind\na\n" in res.stderr
    objects, refs = check_store(store)
    assert objects == [] and refs == []
    assert os.listdir(store / "tmp") == []


def test_break_on_failure_does_nothing_when_all_succeed(tmp_path):
    res = run_osbuild(SAMPLE, tmp_path / "store", "--break-on-failure", stdin="echo SHELL\n")
    assert res.returncode == 0 and res.json["success"]
    assert "SHELL" not in res.stderr


def test_break_refuses_a_manifest_on_stdin(tmp_path):
    res = run_osbuild("-", tmp_path / "store", "--break", "*", stdin=json.dumps(sample()))
    assert res.returncode == 1
    assert "manifest cannot come from stdin" in res.json["error"]
    assert not (tmp_path / "store").exists()


def test_break_on_an_unknown_stage_is_refused_before_building(tmp_path):
    res = run_osbuild(SAMPLE, tmp_path / "store", "--break=org.osbuild.nope", stdin="")
    assert res.returncode == 1
    assert "--break 'org.osbuild.nope' matches no stage" in res.json["error"]
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()


def test_bare_break_before_the_manifest_says_how_to_write_it(tmp_path):
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(tmp_path / "s"),
           "--break", SAMPLE]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, input="")
    assert res.returncode == 1
    assert "--break took" in res.stderr and "--break=STAGE" in res.stderr
    assert "Traceback" not in res.stderr


def test_break_refuses_a_socket_as_stdin(tmp_path):
    """A socket could be written back through: the shell gets only pipes, files, terminals."""
    a, b = socket.socketpair()
    with a, b:
        cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
               str(tmp_path / "s"), "--json", "--break=*", SAMPLE]
        res = subprocess.run(cmd, cwd=REPO, stdin=a, capture_output=True, text=True,
                             check=False)
    assert res.returncode == 1
    assert "need stdin to be a terminal, a pipe or a file" in json.loads(res.stdout)["error"]


def _read_until(fd, text, deadline):
    seen = b""
    while text.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {text!r} in time; got:\n{seen.decode(errors='replace')}")
        try:
            data = os.read(fd, 65536)
        except OSError:    # EIO: the terminal's last user went away
            data = b""
        if not data:
            raise AssertionError(f"no {text!r}; got:\n{seen.decode(errors='replace')}")
        seen += data
    return seen.decode(errors="replace")


def test_break_on_a_terminal_gets_a_pty_of_its_own(tmp_path):
    """On a terminal nspawn relays through its own pseudo-terminal: the shell is
    interactive, and the terminal osbuild runs on is never handed into the container."""
    store = tmp_path / "store"
    stages, _ = ids(sample())
    master, slave = os.openpty()
    st = os.fstat(slave)
    host_tty = f"{st.st_dev}:{st.st_ino}"
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(store),
           f"--break={stages[1]}", SAMPLE]
    with subprocess.Popen(cmd, cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
                          start_new_session=True) as proc:
        os.close(slave)
        try:
            deadline = time.monotonic() + 600
            _read_until(master, "before it runs", deadline)
            os.write(master, b"echo pty-$((6*7)) $(tty) tty=$(stat -L -c %d:%i /proc/self/fd/0)"
                             b"=; exit\r")
            out = _read_until(master, "tree id:", deadline)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
    assert "pty-42 /dev/" in out, out          # a terminal inside: interactive
    inside = re.search(r"tty=([0-9]+:[0-9]+)=", out).group(1)
    assert inside != host_tty                  # and not osbuild's own terminal
