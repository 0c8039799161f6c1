"""--monitor JSONSeqMonitor, the human progress log and --quiet, through real builds.

A consumer parses the RFC 7464 records (RS, JSON, LF) osbuild writes on
--monitor-fd. Programs are hostile: a stage floods the phase API, a source
program floods its progress channel with garbage and lies; the host writes
only bounded, well-formed records.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import types

import pytest

from osbuild import api, sources
from conftest import REPO, requires_root
# pylint: disable=unused-import
from test_sources import FileServer, server_fixture, sha

pytestmark = [pytest.mark.integration, requires_root()]

ROOT_UUID = "76a22bf4-f153-4541-b6c7-0332c0dfaeac"
STEP_KEYS = {"type", "kind", "name", "id", "index", "count", "time"}


def parse_json_seq(data):
    """The records of an RFC 7464 JSON text sequence; fails on anything else."""
    assert data.startswith(b"\x1e") and data.endswith(b"\n"), data[:200]
    records = []
    for chunk in data.split(b"\x1e")[1:]:
        assert chunk.endswith(b"\n") and b"\n" not in chunk[:-1], chunk[:200]
        records.append(json.loads(chunk))
    return records


def run(store, desc, *extra, libdir=REPO, monitor=True, json_output=True, tmp=None):
    """Run osbuild; returns (process, monitor records or None)."""
    # pylint: disable=too-many-arguments
    manifest = os.path.join(tmp or os.path.dirname(str(store)), "manifest.json")
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump(desc, f)
    read, write = os.pipe()
    argv = [sys.executable, "-m", "osbuild", "--libdir", str(libdir), "--store", str(store),
            *(["--json"] if json_output else []), *extra]
    if monitor:
        argv += ["--monitor", "JSONSeqMonitor", "--monitor-fd", str(write)]
    with subprocess.Popen(argv + [manifest], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, pass_fds=[write]) as proc:
        os.close(write)
        with os.fdopen(read, "rb") as r:
            data = r.read()
        stdout, stderr = proc.communicate(timeout=600)
    result = types.SimpleNamespace(returncode=proc.returncode, stdout_text=stdout,
                                   stderr_text=stderr)
    return result, (parse_json_seq(data) if monitor else None)


def test_records_of_a_real_build(store, server, tmp_path):
    """begin, start/end of each stage and the assembler, downloads, phases, the result."""
    server.delay = 1.2   # long enough for the files source to report while it waits
    blobs = [os.urandom(3000 + i) for i in range(3)]
    urls = {sha(b): server.add(f"b{i}", b) for i, b in enumerate(blobs)}
    desc = {"pipeline": {
        "stages": [{"name": "org.osbuild.files-test",
                    "options": {"checksums": list(urls), "path": "/srv"}},
                   {"name": "org.osbuild.script",
                    "options": {"chroot": False, "script": "mkdir -p etc; echo hi > etc/x"}}],
        "assembler": {"name": "org.osbuild.qemu",
                      "options": {"format": "raw", "filename": "disk.img", "size": 64 << 20,
                                  "root_fs_uuid": ROOT_UUID}}},
        "sources": {"org.osbuild.files": {"urls": urls}}}
    proc, records = run(store, desc, tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr_text
    result = json.loads(proc.stdout_text)
    kinds = [r["type"] for r in records]
    assert kinds[0] == "begin" and kinds[-1] == "result"
    assert records[-1]["result"] == result and records[-1]["duration"] > 0
    assert all(isinstance(r["time"], float) for r in records)
    ids = [s["id"] for s in result["stages"]] + [result["assembler"]["id"]]
    assert [s["id"] for s in records[0]["steps"]] == ids
    assert [s["kind"] for s in records[0]["steps"]] == ["stage", "stage", "assembler"]
    starts = [r for r in records if r["type"] == "start"]
    ends = [r for r in records if r["type"] == "end"]
    assert [r["id"] for r in starts] == [r["id"] for r in ends] == ids
    assert [(r["index"], r["count"]) for r in ends] == [(1, 3), (2, 3), (3, 3)]
    assert all(set(r) == STEP_KEYS for r in starts)
    assert all(r["success"] is True and r["duration"] > 0 for r in ends)
    assert ends[-1]["name"] == "org.osbuild.qemu" and ends[-1]["kind"] == "assembler"
    # downloads: while the first stage runs, ending with every file and byte there
    first_end = records.index(ends[0])
    downloads = [r for r in records if r["type"] == "download"]
    assert downloads and all(records.index(r) < first_end for r in downloads)
    assert downloads[-1]["files_done"] == downloads[-1]["files_total"] == 3
    assert downloads[-1]["bytes_done"] == downloads[-1]["bytes_total"] == sum(map(len, blobs))
    assert len(downloads) >= 2   # one at least while curl waited for the server
    assert all(r["source"] == "org.osbuild.files" for r in downloads)
    # the assembler's phases, in order, between its start and its end
    phases = [r for r in records if r["type"] == "phase"]
    # (ext4 is made and filled in one step: no "copying the tree" phase of its own)
    assert [p["phase"] for p in phases][:3] == ["partitioning", "filesystems", "bootloader"]
    assert all(p["id"] == ids[-1] and p["kind"] == "assembler" for p in phases)
    assert records.index(starts[-1]) < records.index(phases[0])
    assert records.index(phases[-1]) < records.index(ends[-1])
    # the cached rebuild: nothing runs, nothing is downloaded
    proc, records = run(store, desc, tmp=tmp_path)
    assert proc.returncode == 0
    assert [r["type"] for r in records] == ["begin", "result"]
    assert records[0]["steps"] == [] and records[1]["result"]["stages"] == []


def test_failure_and_bad_manifest_records(store, tmp_path):
    """A failing stage's end record and the result; a bad manifest's one error record."""
    desc = {"pipeline": {"stages": [{"name": "org.osbuild.error",
                                     "options": {"returncode": 3}}]}}
    proc, records = run(store, desc, tmp=tmp_path)
    assert proc.returncode == 1
    end = [r for r in records if r["type"] == "end"][0]
    assert end["success"] is False and end["name"] == "org.osbuild.error"
    assert records[-1]["result"] == json.loads(proc.stdout_text)
    assert records[-1]["result"]["success"] is False
    proc, records = run(store, {"pipeline": {"stages": [{"name": 5}]}}, tmp=tmp_path)
    assert proc.returncode == 1
    message = proc.stderr_text.strip().removeprefix("osbuild: ")
    assert records == [{"type": "result", "duration": records[0]["duration"],
                        "time": records[0]["time"],
                        "result": {"success": False, "error": message}}]


def test_monitor_options_are_checked(store, tmp_path):
    """Bad --monitor/--monitor-fd: one clear line, a JSON result, nothing stored."""
    desc = {"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}}
    for extra, message in ((["--monitor", "Nope", "--monitor-fd", "1"], "unknown monitor"),
                           (["--monitor", "JSONSeqMonitor"], "needs --monitor-fd"),
                           (["--monitor-fd", "1"], "needs --monitor JSONSeqMonitor"),
                           (["--monitor", "JSONSeqMonitor", "--monitor-fd", "97"],
                            "--monitor-fd 97: Bad file descriptor"),
                           (["--monitor", "JSONSeqMonitor", "--monitor-fd", "x"],
                            "not a file descriptor number")):
        proc, _ = run(store, desc, *extra, monitor=False, tmp=tmp_path)
        assert proc.returncode == 1, extra
        assert json.loads(proc.stdout_text)["success"] is False
        lines = proc.stderr_text.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, proc.stderr_text)
    assert not os.path.exists(os.path.join(store, "refs")) or \
        os.listdir(os.path.join(store, "refs")) == []


def test_human_log_and_quiet(store, tmp_path):
    """[i/n] headers with elapsed time, the total time; --quiet: ids, or the failure."""
    desc = {"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": "echo one"}},
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": "echo two"}}]}}
    proc, _ = run(store, desc, monitor=False, json_output=False, tmp=tmp_path)
    assert proc.returncode == 0
    out = proc.stdout_text
    assert re.search(r"^\[1/2\] org\.osbuild\.script: [0-9a-f]{64} \(\d+\.\d s elapsed\)$",
                     out, re.M), out
    assert re.search(r"^\[2/2\] org\.osbuild\.script: ", out, re.M)
    assert "one\n" in out and "two\n" in out
    assert re.search(r"^total time: \d+\.\d s$", out, re.M)
    tree_id = out.strip().splitlines()[-1].removeprefix("tree id: ")
    assert re.fullmatch("[0-9a-f]{64}", tree_id)
    # --quiet: only the final ids; a failure shows the failing stage's header and output
    desc["pipeline"]["stages"].append({"name": "org.osbuild.script",
                                       "options": {"chroot": False, "script": "echo three"}})
    proc, _ = run(store, desc, "--quiet", monitor=False, json_output=False, tmp=tmp_path)
    assert proc.returncode == 0 and proc.stdout_text.splitlines()[0].startswith("tree id: ")
    assert len(proc.stdout_text.splitlines()) == 1
    desc["pipeline"]["stages"].append({"name": "org.osbuild.script", "options": {
        "chroot": False, "script": "echo four-failed; exit 4"}})
    proc, _ = run(store, desc, "--quiet", monitor=False, json_output=False, tmp=tmp_path)
    assert proc.returncode == 1
    out = proc.stdout_text
    assert "[1/1] org.osbuild.script:" in out and "four-failed" in out
    assert "three" not in out and out.rstrip().endswith("Failed")


def test_phase_api_flood_is_bounded(store, tmp_path):
    """A stage floods the phase API with good and bad names: the host writes at most
    api.MAX_PHASES phase records for it, each with a name matching api.PHASE_RE."""
    flood = (
        "import json, socket\n"
        "from osbuild.util import jsoncomm\n"
        "names = ['ok %d' % i for i in range(200)] + ['x' * 5000, 'a\\nb', '\\x1b[2J', '', 7]\n"
        "for name in names[::-1] + names:\n"
        "    with jsoncomm.Socket.new_client('/run/osbuild/api/osbuild') as s:\n"
        "        s.call({'method': 'phase', 'name': name})\n"
        "with jsoncomm.Socket.new_client('/run/osbuild/api/osbuild') as s:\n"
        "    s.call({'method': 'phase', 'name': 'ok', 'more': 'x' * 100000})\n"
        "print('flooded')\n")
    desc = {"pipeline": {"stages": [{"name": "org.osbuild.script", "options": {
        "chroot": False, "script": f"python3 - <<'FLOOD'\n{flood}FLOOD\n"}}]}}
    proc, records = run(store, desc, tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout_text + proc.stderr_text
    assert "flooded" in json.loads(proc.stdout_text)["stages"][0]["output"]
    phases = [r["phase"] for r in records if r["type"] == "phase"]
    assert 0 < len(phases) <= api.MAX_PHASES
    assert all(api.PHASE_RE.fullmatch(p) for p in phases)
    proc, _ = run(store, dict(desc, pipeline={"stages": [desc["pipeline"]["stages"][0], {
        "name": "org.osbuild.noop"}]}), monitor=False, json_output=False, tmp=tmp_path)
    assert proc.returncode == 0
    assert len([line for line in proc.stdout_text.splitlines()
                if line.startswith("org.osbuild.script: ok")]) <= api.MAX_PHASES


HOSTILE_SOURCE = r'''#!/usr/bin/python3
import json, os, socket, sys, time
args = json.load(sys.stdin)
sock = socket.socket(fileno=args["progress"])
bad = [b"x" * 100000, b"not json", b"[1, 2]", b"\xff\xfe",
       json.dumps({"files_done": -1, "bytes_done": 0, "bytes_total": None}).encode(),
       json.dumps({"files_done": 99, "bytes_done": 0, "bytes_total": None}).encode(),
       json.dumps({"files_done": 0, "bytes_done": 2 ** 80, "bytes_total": None}).encode(),
       json.dumps({"files_done": 0, "bytes_done": 1.5, "bytes_total": None}).encode(),
       json.dumps({"files_done": True, "bytes_done": 1, "bytes_total": None}).encode(),
       json.dumps({"files_done": 0, "bytes_done": 1, "bytes_total": None,
                   "source": "\u001b[2Jevil"}).encode()]
end = time.monotonic() + 2.0
n = 0
while time.monotonic() < end:
    for b in bad:
        sock.send(b)
    sock.send(json.dumps({"files_done": 0, "bytes_done": n, "bytes_total": 10 ** 9}).encode())
    n += 1
os.makedirs(os.path.join(args["output"]), exist_ok=True)
for c in args["checksums"]:
    with open(os.path.join(args["output"], c), "w") as f:
        f.write("x")
print("{}")
'''


def test_source_progress_flood_is_bounded(store, tmp_path):
    """A source program floods its progress channel with garbage and lies for 2 s:
    only well-formed download records reach the monitor, a few per second."""
    libdir = tmp_path / "lib"
    libdir.mkdir()
    for part in ("stages", "runners", "assemblers", "sources", "osbuild", "schemas"):
        shutil.copytree(os.path.join(REPO, part), libdir / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    bad = libdir / "sources" / "org.test.flood"
    bad.write_text(HOSTILE_SOURCE)
    bad.chmod(0o755)
    desc = {"pipeline": {"stages": [{"name": "org.osbuild.files-test", "options": {
        "source": "org.test.flood", "checksums": [sha(b"x")], "path": "/x"}}]}}
    started = time.monotonic()
    proc, records = run(store, desc, libdir=libdir, tmp=tmp_path)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout_text + proc.stderr_text
    downloads = [r for r in records if r["type"] == "download"]
    assert downloads
    assert len(downloads) <= took / sources.PROGRESS_INTERVAL + 2
    for r in downloads:
        assert set(r) == {"type", "source", "files_done", "files_total", "bytes_done",
                          "bytes_total", "time"}
        assert r["source"] == "org.test.flood" and r["files_total"] == 1
        assert 0 <= r["files_done"] <= 1 and 0 <= r["bytes_done"] <= sources.MAX_PROGRESS_BYTES
        assert all(type(r[k]) is int for k in ("files_done", "bytes_done"))  # pylint: disable=unidiomatic-typecheck
    assert downloads[-1]["files_done"] == 1 and downloads[-1]["bytes_total"] == 10 ** 9
