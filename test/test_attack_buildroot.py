"""Attacks on the build root (issue 12): each runs a real, hostile build.

* the host's /etc is not in the build root, only an allow-list of public files;
* a build tree's `etc` (or lib*) symlinked to a host directory is not followed;
* a fork bomb, as root or another uid inside, is stopped by the process limit;
* nothing a program writes to /etc, /tmp, /var or /root (e.g. a Python
  sitecustomize) is seen by a later program;
* a store path with ':' (and '\\') works.
"""

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from osbuild import etctemplate
from osbuild.util import pidlimit

from hygiene import leftovers, processes_mentioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(text, **extra):
    """An org.osbuild.script stage."""
    return {"name": "org.osbuild.script", "options": {"chroot": False, "script": text, **extra}}


def osbuild(store, desc, *extra, watch=None):
    """Run osbuild --json on `desc`; returns (status, result, stderr, osbuild's pid).

    `watch` is called every 50 ms while osbuild runs.
    """
    manifest = os.path.join(os.path.dirname(str(store)), "manifest.json")
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump(desc, f)
    with subprocess.Popen([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
                           str(store), "--json", *extra, manifest], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        done = threading.Event()
        if watch is not None:
            def loop():
                while not done.wait(0.05):
                    watch()
            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
        try:
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            done.set()
    try:
        result = json.loads(stdout)
    except ValueError:
        result = None
    return proc.returncode, result, stderr, proc.pid


def outputs(result):
    """The output of every program that ran, build pipelines included, in order."""
    out = []
    if result.get("build"):
        out += outputs(result["build"])
    out += [s["output"] for s in result.get("stages", [])]
    if result.get("assembler"):
        out.append(result["assembler"]["output"])
    return out


# -- 2: the host's /etc ---------------------------------------------------------------

@pytest.mark.integration
def test_host_etc_is_not_the_build_roots(tmp_path):
    """Without a build pipeline, programs see only the allow-listed public part of the
    host's /etc: no shadow, no file outside the list, no password fields."""
    token = uuid.uuid4().hex
    canary = f"/etc/osbuild-canary-{token}"
    with open(canary, "w", encoding="utf-8") as f:
        f.write(f"CANARY-{token}\n")
    os.chmod(canary, 0o644)
    try:
        text = ("set +e; cat /etc/shadow /etc/gshadow /run/osbuild/buildroot-etc/shadow; "
                "cat /etc/osbuild-canary-* /run/osbuild/buildroot-etc/osbuild-canary-*; "
                "grep -rl CANARY /etc /run 2>/dev/null; "
                "ls -A /etc | sed 's/^/ETC /'; sed 's/^/PASSWD /' /etc/passwd; "
                "[ -e /etc/ssl/private ] && echo PRIVATE; [ -e /etc/machine-id ] && echo MID; "
                "python3 -c 'import ssl, pwd; print(\"ROOT\", pwd.getpwuid(0).pw_name)'; "
                "echo done")
        status, result, stderr, _ = osbuild(tmp_path / "store",
                                            {"pipeline": {"stages": [script(text)]}})
    finally:
        os.unlink(canary)
    assert status == 0, stderr
    out = result["stages"][0]["output"]
    assert "done\n" in out and "ROOT root\n" in out, out
    assert f"CANARY-{token}" not in out, out
    assert "PRIVATE" not in out and "MID\n" not in out, out
    with open("/etc/shadow", encoding="utf-8") as f:
        hashes = [line.split(":")[1] for line in f if len(line.split(":")[1]) > 2]
    assert not any(h in out for h in hashes)
    listed = {line[4:] for line in out.splitlines() if line.startswith("ETC ")}
    allowed = {p.split("/")[0].rstrip("*") for p in etctemplate.HOST_ALLOW}
    assert listed, out
    assert all(any(name.startswith(a) for a in allowed) for name in listed), listed
    assert "shadow" not in listed and "ssh" not in listed and "hostname" not in listed
    passwd = [line[7:] for line in out.splitlines() if line.startswith("PASSWD ")]
    assert passwd and all(line.split(":")[1] == "x" for line in passwd), passwd


def test_host_etc_template_copies_only_public_files(tmp_path):
    """Allow-listed but unreadable files (a key under ssl/certs) stay out; symlinks
    are copied as symlinks; password fields become x."""
    host = tmp_path / "host"
    (host / "ssl" / "certs").mkdir(parents=True)
    (host / "ssl" / "private").mkdir()
    (host / "ssl" / "private" / "key.pem").write_text("KEY")
    (host / "ssl" / "certs" / "ca.pem").write_text("CA")
    (host / "ssl" / "certs" / "secret.pem").write_text("SECRET")
    os.chmod(host / "ssl" / "certs" / "secret.pem", 0o600)
    os.symlink("/etc/shadow", host / "ssl" / "certs" / "link.pem")
    (host / "passwd").write_text("root:$6$hash:0:0:root:/root:/bin/sh\nodd\n")
    (host / "shadow").write_text("root:$6$hash:::\n")
    (host / "python3.11").mkdir()
    (host / "python3.11" / "sitecustomize.py").write_text("pass\n")
    dst = tmp_path / "dst"
    dst.mkdir()
    etctemplate.from_host(str(dst), str(host))
    assert sorted(os.listdir(dst)) == ["passwd", "python3.11", "ssl"]
    assert sorted(os.listdir(dst / "ssl")) == ["certs"]
    assert sorted(os.listdir(dst / "ssl" / "certs")) == ["ca.pem", "link.pem"]
    assert os.readlink(dst / "ssl" / "certs" / "link.pem") == "/etc/shadow"
    assert (dst / "passwd").read_text() == "root:x:0:0:root:/root:/bin/sh\nodd\n"


# -- 4: a build tree pointing binds at the host --------------------------------------------

def _build_tree_script(hostdir):
    """A tiny build root (sh, python3 + stdlib) whose etc and lib32 are links to `hostdir`."""
    return rf"""
mkdir -p usr/bin usr/lib usr/share
ln -s usr/bin bin; ln -s usr/bin sbin; ln -s usr/lib lib
[ -d /usr/lib64 ] && mkdir -p usr/lib64 && ln -s usr/lib64 lib64
for b in sh dash cat ls echo python3 python3.11; do cp -a /usr/bin/$b usr/bin/ 2>/dev/null || true; done
for b in /usr/bin/python3.11 /usr/bin/dash /usr/bin/cat /usr/bin/ls; do
  for l in $(ldd $b | grep -o '/[^ ]*'); do cp -L --parents "$l" . ; done
done
tar -C / --exclude=__pycache__ --exclude=test --exclude=idlelib --exclude=tkinter -cf - usr/lib/python3.11 | tar -xf -
ln -s {hostdir} etc
ln -s {hostdir} lib32
"""


@pytest.mark.integration
def test_build_tree_symlinks_are_not_followed(tmp_path):
    """A build tree whose etc and lib32 are symlinks to a host directory: the next
    build root gets an empty /etc and a /lib32 link that resolves inside the container."""
    token = uuid.uuid4().hex
    hostdir = tmp_path / "host-secrets"
    hostdir.mkdir()
    (hostdir / "shadow").write_text(f"SECRET-{token}\n")
    desc = {"pipeline": {
        "build": {"runner": "org.osbuild.debian12",
                  "pipeline": {"stages": [script(_build_tree_script(hostdir))]}},
        "stages": [script("set +e; "
                          "cat /etc/shadow /lib32/shadow /run/osbuild/buildroot-etc/shadow; "
                          "ls -A /etc | sed 's/^/ETC /'; echo done > done")]}}
    status, result, stderr, _ = osbuild(tmp_path / "store", desc)
    assert result is not None, stderr
    out = "".join(outputs(result))
    assert f"SECRET-{token}" not in out, out
    assert status == 0, out[-3000:] + stderr
    assert "ETC " not in result["stages"][0]["output"], out
    assert sorted(os.listdir(hostdir)) == ["shadow"]
    assert (hostdir / "shadow").read_text() == f"SECRET-{token}\n"


# -- 6: process limit -----------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("uid", [0, 1000])
def test_fork_bomb_is_stopped(tmp_path, uid):
    """300 processes, as root or as uid 1000 inside, against --max-processes 64:
    the stage fails saying so, the host never counts more than 64 of them, the
    container could not lift its limit, and nothing is left behind."""
    marker = 3000 + int(uuid.uuid4().hex[:4], 16)   # an unusual sleep duration
    # bounded (and no wait) so that without the defence the host survives the test
    bomb = f"i=0; while [ $i -lt 300 ]; do sleep {marker} & i=$((i+1)); done"
    text = ("set +e; for f in $(find /sys/fs/cgroup -name pids.max 2>/dev/null); do "
            "echo max > $f 2>/dev/null && echo RAISED $f; done; "
            "for f in $(find /sys/fs/cgroup -name cgroup.procs 2>/dev/null); do "
            "echo $$ > $f 2>/dev/null; done; "
            + (bomb if uid == 0 else
               f"setpriv --reuid {uid} --regid {uid} --clear-groups sh -c '{bomb}'"))
    peak = [0]

    def count():
        peak[0] = max(peak[0], len(processes_mentioning(f"sleep {marker}")))
    start = time.monotonic()
    status, result, stderr, pid = osbuild(tmp_path / "store",
                                          {"pipeline": {"stages": [script(text)]}},
                                          "--max-processes", "64", watch=count)
    elapsed = time.monotonic() - start
    assert status == 1, stderr
    stage = result["stages"][0]
    assert not stage["success"]
    assert "limit of 64 processes (--max-processes)" in stage["output"], stage["output"]
    assert 0 < peak[0] <= 64, peak
    assert elapsed < 60
    assert not leftovers(tmp_path, markers=[f"sleep {marker}"])
    hierarchy = pidlimit.find_hierarchy()
    assert not [d for d in os.listdir(os.path.join(hierarchy, "osbuild"))
                if d.startswith(f"{pid}-")]


@pytest.mark.integration
def test_process_limit_allows_normal_work(tmp_path):
    """Below the limit nothing changes: 40 processes under --max-processes 64 succeed,
    and --max-processes 0 builds without a limit."""
    text = "i=0; while [ $i -lt 40 ]; do sleep 1 & i=$((i+1)); done; wait; echo ok"
    for limit in ("64", "0"):
        status, result, stderr, _ = osbuild(tmp_path / f"store{limit}",
                                            {"pipeline": {"stages": [script(text)]}},
                                            "--max-processes", limit)
        assert status == 0, stderr
        assert "ok\n" in result["stages"][0]["output"]


@pytest.mark.parametrize("bad", ["-1", "abc", "5", "1e3", "99999999999", "²"])
def test_max_processes_validated(tmp_path, bad):
    """A bad --max-processes is a one-line error before anything runs."""
    store = tmp_path / "store"
    status, _, stderr, _ = osbuild(store, {"pipeline": {"stages": [script("true")]}},
                                   "--max-processes", bad)
    assert status == 1
    assert stderr.strip().count("\n") == 0 and "--max-processes" in stderr, stderr
    assert "Traceback" not in stderr
    assert not os.path.exists(store / "objects") or not os.listdir(store / "objects")


# -- 7: nothing a program writes is seen by the next ------------------------------------

PAYLOAD = "print('PWNED by an earlier stage')"


@pytest.mark.integration
def test_programs_get_a_fresh_build_root(tmp_path):
    """A stage plants Python start-up hooks (sitecustomize in /etc, a user site in
    /root) and files in /tmp and /var; neither the next stage nor the assembler
    (which holds the remoteloop API) runs them or sees the files."""
    plant = ("set +e; "
             "for d in /etc/python3 /etc/python3.11 /root/.local/lib/python3.11/site-packages "
             "/tmp /var/tmp /var; do mkdir -p $d; "
             f"printf '%s\\n' \"{PAYLOAD}\" > $d/sitecustomize.py && echo \"PLANTED $d\"; "
             f"printf '%s\\n' \"{PAYLOAD}\" > $d/usercustomize.py; done; "
             "echo x > /tmp/left; echo x > /var/left; echo x > /root/left; "
             "python3 -c 'print(\"self\")'")
    check = "find /tmp /var /root -mindepth 1 | sed 's/^/LEFT /'; python3 -c 'print(\"checked\")'"
    desc = {"pipeline": {"stages": [script(plant), script(check)],
                         "assembler": {"name": "org.osbuild.tar",
                                       "options": {"filename": "t.tar"}}}}
    status, result, stderr, _ = osbuild(tmp_path / "store", desc)
    assert status == 0, stderr
    first, second = result["stages"][0]["output"], result["stages"][1]["output"]
    assert "checked\n" in second, second
    assert "PWNED" not in second and "PWNED" not in result["assembler"]["output"], second
    assert "LEFT" not in second, second
    # the planting stage itself could write its own /tmp, /root (and proves the payload works)
    assert "PLANTED /tmp" in first and "PLANTED /root/.local" in first, first
    assert "PWNED" in first, first
    assert "PLANTED /etc" not in first, first


# -- a store path with ':' --------------------------------------------------------------

@pytest.mark.integration
def test_store_path_with_colon_and_backslash(tmp_path):
    """nspawn splits --bind= on ':'; a store at .../a:b\\c/store builds and assembles."""
    store = tmp_path / "a:b\\c" / "store"
    store.parent.mkdir()
    desc = {"pipeline": {"stages": [script("echo hi > hi")],
                         "assembler": {"name": "org.osbuild.tar",
                                       "options": {"filename": "t.tar"}}}}
    status, result, stderr, _ = osbuild(store, desc)
    assert status == 0, (stderr, result)
    assert os.path.exists(store / "refs" / result["output_id"] / "t.tar")


@pytest.mark.integration
def test_cgroup_of_a_killed_osbuild_is_removed_later(tmp_path):
    """osbuild SIGKILLed mid-stage leaves its (emptied) pids cgroup; the next build
    removes it, and its own when it is done."""
    hierarchy = pidlimit.find_hierarchy()
    parent = os.path.join(hierarchy, "osbuild")
    token = uuid.uuid4().hex
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"pipeline": {"stages": [script(f": {token}; sleep 60")]}}))
    with subprocess.Popen([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
                           str(tmp_path / "store"), "--json", str(manifest)], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 60
        mine = []
        while not mine and time.monotonic() < deadline:
            mine = [d for d in os.listdir(parent) if d.startswith(f"{proc.pid}-")
                    and _count(os.path.join(parent, d)) > 3]
            time.sleep(0.05)
        assert mine, "the stage never started"
        proc.kill()
    assert not leftovers(tmp_path, markers=[token])
    # The killed build's cgroup stays until the next osbuild on this host removes it (any
    # concurrent one may do so first, so it is not asserted to be there now).
    status, _, stderr, pid = osbuild(tmp_path / "store2",
                                     {"pipeline": {"stages": [script("true")]}})
    assert status == 0, stderr
    assert not os.path.exists(os.path.join(parent, mine[0]))
    assert not [d for d in os.listdir(parent) if d.startswith(f"{pid}-")]


def _count(cgroup):
    try:
        with open(os.path.join(cgroup, "pids.current"), encoding="ascii") as f:
            return int(f.read())
    except OSError:
        return 0


def test_no_pids_cgroup_is_a_clear_error():
    """Where no pids cgroup can be made, the build root refuses to start instead of
    running programs without a limit."""
    with pytest.raises(pidlimit.ProcessLimitError, match="cannot create a pids cgroup"):
        pidlimit.ProcessLimit(64, hierarchy="/proc/sys")
