"""Attacks on the host's APIs (osbuild, sources, remoteloop) by hostile programs.

Stages and assemblers are not trusted: what they send over the API sockets
is checked before the host acts on it. Message bodies must be sealed,
size-capped memfds; JSON nesting is bounded before parsing; each server
serves a bounded number of connections and descriptors per message; every
bad message gets a one-line error and nothing on the host's stderr. The
remoteloop API attaches only read-write regular files of the output
directory, with checked geometry, at most 16 at once, and leaks nothing on
errors. The unit tests attack servers in this process; the integration
tests run real builds whose stage or assembler performs the attack.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from osbuild import api, loop, remoteloop
from osbuild.util import jsoncomm, nesting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024
MEMFD_MSG = json.dumps({"__osbuild_memfd__": True}).encode()
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK

needs_loop = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control"),
                                reason="needs root and loop devices")


class Echo(api.BaseAPI):
    """Answers every request with {"echo": request}; {"crash": 1} raises."""

    endpoint = "echo"

    def _message(self, msg, fds, sock):
        if isinstance(msg, dict) and msg.get("crash"):
            raise ValueError("handler bug")
        sock.send({"echo": msg, "fds": len(fds)})


@pytest.fixture(name="echo")
def echo_fixture(tmp_path):
    """A running Echo server; yields its socket path."""
    server = Echo()
    path = server.start(str(tmp_path))
    yield server, path
    server.stop()


def raw_call(path, data, fds=(), timeout=10):
    """Send one raw packet with `fds`; return the decoded reply (None at end of stream)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        socket.send_fds(sock, [data], list(fds))
        reply, rfds, _, _ = socket.recv_fds(sock, 1 << 20, 16)
        for fd in rfds:
            os.close(fd)
        return json.loads(reply) if reply else None


def memfd(data, seal=True):
    """A memfd holding `data`, sealed like jsoncomm's unless `seal` is false."""
    fd = os.memfd_create("attack", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def open_fds():
    """This process' open file descriptors."""
    return set(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def closing(fd):
    """Close `fd` on leaving."""
    try:
        yield fd
    finally:
        os.close(fd)


# ---- message bodies -------------------------------------------------------

def test_endless_body_is_refused(echo):
    """/dev/zero or a pipe as the "memfd" of a message: refused at once, not read."""
    _, path = echo
    with closing(os.open("/dev/zero", os.O_RDONLY)) as zero:
        start = time.monotonic()
        reply = raw_call(path, MEMFD_MSG, [zero])
        elapsed = time.monotonic() - start
    assert "not a sealed memfd" in reply["error"], reply
    assert elapsed < 1, elapsed
    r, w = os.pipe()
    with closing(r), closing(w):
        assert "not a sealed memfd" in raw_call(path, MEMFD_MSG, [r])["error"]


def test_unsealed_or_partly_sealed_memfd_is_refused(echo):
    """A memfd the sender could still grow or change is refused; a sealed one works."""
    _, path = echo
    body = json.dumps({"hello": "x" * 100}).encode()
    with closing(memfd(body, seal=False)) as fd:
        assert "not a sealed memfd" in raw_call(path, MEMFD_MSG, [fd])["error"]
    fd = os.memfd_create("attack", os.MFD_ALLOW_SEALING)
    with closing(fd):
        os.write(fd, body)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
        assert "not a sealed memfd" in raw_call(path, MEMFD_MSG, [fd])["error"]
    with closing(memfd(body)) as fd:
        assert raw_call(path, MEMFD_MSG, [fd]) == {"echo": {"hello": "x" * 100}, "fds": 0}


def test_oversized_body_is_refused(echo):
    """A sealed body above the request limit is refused without being read."""
    _, path = echo
    with closing(memfd(b" " * (jsoncomm.MAX_REQUEST + 1) + b"{}")) as fd:
        reply = raw_call(path, MEMFD_MSG, [fd])
    assert "at most" in reply["error"] and str(jsoncomm.MAX_REQUEST) in reply["error"], reply


def test_large_messages_still_work(echo):
    """Both directions: 1 MiB request, and the sender seals what it sends."""
    _, path = echo
    big = "y" * MIB
    with jsoncomm.Socket.new_client(path) as sock:
        reply, _ = sock.call({"big": big})
    assert reply == {"echo": {"big": big}, "fds": 0}
    a, b = jsoncomm.Socket.new_pair()
    with a, b:
        a.send({"big": big})
        data, fds, _, _ = socket.recv_fds(b.sock, 65536, 4)
        assert json.loads(data) == {"__osbuild_memfd__": True}
        with closing(fds[0]):
            assert fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & SEALS == SEALS


# ---- nesting, descriptors, garbage ----------------------------------------

def test_deep_nesting_is_refused_before_parsing(echo, capfd):
    """200,000 levels (in a memfd) and 15,000 (inline): one error each, no RecursionError."""
    _, path = echo
    with closing(memfd(b"[" * 200000 + b"]" * 200000)) as fd:
        reply = raw_call(path, MEMFD_MSG, [fd])
    assert "nested too deeply" in reply["error"], reply
    reply = raw_call(path, b"[" * 15000 + b"]" * 15000)
    assert "nested too deeply" in reply["error"], reply
    # 100 levels are fine
    reply = raw_call(path, b"[" * nesting.MAX_DEPTH + b"]" * nesting.MAX_DEPTH)
    assert "echo" in reply, reply
    assert "Traceback" not in capfd.readouterr().err


def test_text_depth_ignores_strings():
    """Brackets in strings do not count; the count equals the parsed depth."""
    text = json.dumps({"a": ["[[[{{{", {"b": "]]\\\"["}], "c": [[[]]]})
    assert nesting.text_depth(text) == nesting.depth(json.loads(text)) == 4
    assert nesting.text_depth(b"[" * 10 ** 6, stop=100) > 100


def test_too_many_fds_are_refused_and_closed(echo):
    """More than MAX_FDS descriptors: an error, and the host keeps none of them."""
    server, path = echo
    null = [os.open(os.devnull, os.O_RDONLY) for _ in range(jsoncomm.MAX_FDS + 4)]
    try:
        before = open_fds()
        reply = raw_call(path, b"{}", null)
        assert "more than" in reply["error"] and "file descriptors" in reply["error"], reply
        assert raw_call(path, b"{}", null[:3]) == {"echo": {}, "fds": 3}
        settle(server)
        assert open_fds() == before
        assert server.connections == 0
    finally:
        for fd in null:
            os.close(fd)


def test_garbage_and_handler_bugs_get_one_line_errors(echo, capfd):
    """Invalid JSON and a crashing handler: one-line errors; the connection goes on."""
    _, path = echo
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(path)
        for data in (b"\xff\xfe not json", b'{"crash": 1}', b'{"ok": 1}'):
            sock.send(data)
            reply = json.loads(sock.recv(65536))
            if data == b'{"ok": 1}':
                assert reply == {"echo": {"ok": 1}, "fds": 0}
            else:
                assert "\n" not in reply["error"] and len(reply["error"]) < 400, reply
    err = capfd.readouterr().err
    assert "Traceback" not in err and "handler bug" not in err


# ---- connections ------------------------------------------------------------

def test_connection_flood_is_bounded(echo):
    """2,000 held connections: the host serves MAX_CONNECTIONS, refuses the rest, and
    does not start a thread for each; stop() ends the held ones promptly."""
    server, path = echo
    threads_before = threading.active_count()
    socks, refused = [], 0
    try:
        for _ in range(2000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            socks.append(sock)
            sock.connect(path)
        peak = threading.active_count() - threads_before
        time.sleep(0.5)
        for sock in socks:
            sock.settimeout(0.01)
            with contextlib.suppress(OSError):
                data = sock.recv(65536)
                if b"too many connections" in data:
                    refused += 1
        assert refused >= 2000 - api.MAX_CONNECTIONS, refused
        assert server.connections <= api.MAX_CONNECTIONS
        assert threading.active_count() - threads_before <= api.MAX_CONNECTIONS
        assert peak <= api.MAX_CONNECTIONS
        start = time.monotonic()
        server.stop()
        assert time.monotonic() - start < 5
    finally:
        for sock in socks:
            sock.close()


# ---- remoteloop, in process -------------------------------------------------

@pytest.fixture(name="loopsrv")
def loopsrv_fixture(tmp_path):
    """A LoopServer whose output directory holds an 8 MiB `image`."""
    for name in ("api", "dev", "out"):
        (tmp_path / name).mkdir()
    with open(tmp_path / "out" / "image", "wb") as f:
        f.truncate(8 * MIB)
    server = remoteloop.LoopServer(str(tmp_path / "dev"), output_dir=str(tmp_path / "out"))
    path = server.start(str(tmp_path / "api"))
    yield server, path, tmp_path
    server.stop()


def settle(server):
    """Wait until the server has closed its side of every connection."""
    deadline = time.monotonic() + 5
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.01)


def attached_to(path):
    """Loop devices (from losetup) backed by `path`."""
    out = subprocess.run(["losetup", "--associated", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [line.split(":")[0] for line in out.splitlines()]


def attach(path, image_fd, **fields):
    """One raw attach request; returns the reply."""
    req = {"method": "attach", "fd": 0, "offset": 0, "sizelimit": 0, **fields}
    with jsoncomm.Socket.new_client(path) as sock:
        reply, fds = sock.call(req, [image_fd])
    for extra in fds:
        os.close(extra)
    return reply


@pytest.mark.integration
@needs_loop
@pytest.mark.parametrize("fields, fragment", [
    ({"offset": 2 ** 70}, "do not lie within the image"),
    ({"offset": -512}, "non-negative multiple of 512"),
    ({"offset": 513}, "non-negative multiple of 512"),
    ({"offset": True}, "non-negative multiple of 512"),
    ({"offset": "0"}, "non-negative multiple of 512"),
    ({"offset": 8 * MIB}, "do not lie within the image"),
    ({"sizelimit": 2 ** 64}, "do not lie within the image"),
    ({"offset": 4 * MIB, "sizelimit": 4 * MIB + 512}, "do not lie within the image"),
    ({"fd": 1}, "'fd' must index"),
    ({"fd": -1}, "'fd' must index"),
    ({"fd": True}, "'fd' must index"),
], ids=["2**70", "negative", "unaligned", "bool", "string", "at-end", "2**64", "past-end",
        "fd-1", "fd-neg", "fd-bool"])
def test_remoteloop_bad_geometry(loopsrv, fields, fragment):
    """Offsets and sizes are checked before anything is attached; nothing leaks."""
    server, path, tmp_path = loopsrv
    image = tmp_path / "out" / "image"
    with closing(os.open(image, os.O_RDWR)) as fd:
        before = open_fds()
        reply = attach(path, fd, **fields)
        assert fragment in reply["error"], reply
        settle(server)
        assert open_fds() == before
    assert attached_to(image) == [] and server.devices == []


@pytest.mark.integration
@needs_loop
def test_loop_attach_refuses_huge_offsets_without_leaking(tmp_path):
    """osbuild.loop itself: 2**70 is a LoopError (not struct.error) and no fd stays open."""
    image = tmp_path / "image"
    with open(image, "wb") as f:
        f.truncate(MIB)
    with closing(os.open(image, os.O_RDWR)) as fd:
        before = open_fds()
        with loop.LoopControl() as ctl:
            with pytest.raises(loop.LoopError, match="2\\*\\*63"):
                ctl.attach(fd, offset=2 ** 70)
        assert open_fds() == before
    assert attached_to(image) == []


@pytest.mark.integration
@needs_loop
def test_remoteloop_refuses_files_it_must_not_attach(loopsrv):
    """Host files, read-only fds, files outside the output dir, links out of it, memfds,
    devices: all refused; nothing attached."""
    server, path, tmp_path = loopsrv
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    with open(outside, "wb") as f:
        f.truncate(MIB)
    os.symlink(outside, out / "link")
    cases = [
        (lambda: os.open("/etc/passwd", os.O_RDONLY), "not open for reading and writing"),
        (lambda: os.open(out / "image", os.O_RDONLY), "not open for reading and writing"),
        (lambda: os.open(out / "image", os.O_PATH), "not open for reading and writing"),
        (lambda: os.open(outside, os.O_RDWR), "not a file in the output directory"),
        (lambda: os.open(out / "link", os.O_RDWR), "not a file in the output directory"),
        (lambda: memfd(b"\0" * MIB, seal=False), "not a file in the output directory"),
        (lambda: os.open("/dev/zero", os.O_RDWR), "not a regular file"),
        (lambda: os.open(tmp_path, os.O_RDONLY), "not a regular file"),
    ]
    for opener, fragment in cases:
        with closing(opener()) as fd:
            reply = attach(path, fd)
        assert fragment in reply.get("error", ""), (fragment, reply)
    assert server.devices == []
    assert attached_to(outside) == [] and attached_to("/etc/passwd") == []


@pytest.mark.integration
@needs_loop
def test_remoteloop_caps_devices(loopsrv):
    """100 attaches: MAX_DEVICES succeed, the rest are refused; stop() releases them all."""
    server, path, tmp_path = loopsrv
    image = tmp_path / "out" / "image"
    with closing(os.open(image, os.O_RDWR)) as fd:
        start = time.monotonic()
        replies = [attach(path, fd, offset=(n % 16) * 512 * 1024) for n in range(100)]
        elapsed = time.monotonic() - start
    ok = [r for r in replies if "devname" in r]
    refused = [r for r in replies if f"at most {remoteloop.MAX_DEVICES}" in r.get("error", "")]
    assert len(ok) == remoteloop.MAX_DEVICES and len(refused) == 100 - remoteloop.MAX_DEVICES
    assert len(attached_to(image)) == remoteloop.MAX_DEVICES
    print(f"100 attach requests in {elapsed:.2f}s")
    server.stop()
    assert attached_to(image) == []


@pytest.mark.integration
@needs_loop
def test_remoteloop_populate_request_size_is_bounded(tmp_path):
    """10,000 valid copies in one populate request: refused before any is opened."""
    for name in ("api", "dev", "out", "src"):
        (tmp_path / name).mkdir()
    with open(tmp_path / "out" / "image", "wb") as f:
        f.truncate(8 * MIB)
    server = remoteloop.LoopServer(str(tmp_path / "dev"), output_dir=str(tmp_path / "out"),
                                   paths=[("/c", str(tmp_path / "src"))],
                                   work_dir=str(tmp_path))
    path = server.start(str(tmp_path / "api"))
    try:
        with closing(os.open(tmp_path / "out" / "image", os.O_RDWR)) as fd:
            devname = attach(path, fd)["devname"]
        req = {"method": "populate",
               "mounts": [{"devname": devname, "fstype": "ext4", "mountpoint": "/"}],
               "copies": [{"path": "/c"}] * 10000}
        with jsoncomm.Socket.new_client(path) as sock:
            reply, _ = sock.call(req)
        assert f"at most {remoteloop.MAX_DEVICES} mounts and {remoteloop.MAX_COPIES} copies" \
            in reply["error"], reply
    finally:
        server.stop()
    assert attached_to(tmp_path / "out" / "image") == []


@pytest.mark.integration
@needs_loop
def test_remoteloop_error_after_attach_detaches(loopsrv):
    """When the node cannot be made, the device just attached is detached and closed."""
    server, path, tmp_path = loopsrv
    image = tmp_path / "out" / "image"
    os.rmdir(tmp_path / "dev")
    with closing(os.open(image, os.O_RDWR)) as fd:
        before = open_fds()
        reply = attach(path, fd)
        assert "error" in reply, reply
        settle(server)
        assert open_fds() == before
    assert attached_to(image) == [] and server.devices == []


# ---- real builds ------------------------------------------------------------

STAGE_ATTACK = r"""
import fcntl, json, os, resource, socket, sys, time
from osbuild.util import jsoncomm
API = "/run/osbuild/api/"
MEMFD = json.dumps({"__osbuild_memfd__": True}).encode()
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
results = {}

def call(path, data, fds=()):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(20)
        s.connect(path)
        socket.send_fds(s, [data], list(fds))
        try:
            msg, rfds, _, _ = socket.recv_fds(s, 1 << 20, 16)
        except socket.timeout:
            return "TIMEOUT"
        for fd in rfds:
            os.close(fd)
        return json.loads(msg) if msg else None

def memfd(data, seal=True):
    fd = os.memfd_create("attack", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd

for endpoint in ("sources", "osbuild"):
    path = API + endpoint
    zero = os.open("/dev/zero", os.O_RDONLY)
    start = time.monotonic()
    results[endpoint + " dev-zero"] = call(path, MEMFD, [zero])
    results[endpoint + " dev-zero seconds"] = time.monotonic() - start
    os.close(zero)
    fd = memfd(b'{"source": "org.osbuild.files", "checksums": []}', seal=False)
    results[endpoint + " unsealed"] = call(path, MEMFD, [fd])
    os.close(fd)
    fd = memfd(b" " * (5 << 20) + b"{}")
    results[endpoint + " oversized"] = call(path, MEMFD, [fd])
    os.close(fd)
    fd = memfd(b"[" * 200000 + b"]" * 200000)
    results[endpoint + " deep"] = call(path, MEMFD, [fd])
    os.close(fd)
    nulls = [os.open("/dev/null", os.O_RDONLY) for _ in range(20)]
    results[endpoint + " fds"] = call(path, b"{}", nulls)
    for fd in nulls:
        os.close(fd)
    results[endpoint + " garbage"] = call(path, b"\xff{{{")
results["sources still answers"] = call(API + "sources",
                                        b'{"source": "org.osbuild.nope", "checksums": []}')

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4000), hard))
socks = []
try:
    for _ in range(3000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socks.append(s)
        s.connect(API + "sources")
except OSError as e:
    results["connect error"] = str(e)
results["connections"] = len(socks)
time.sleep(3)       # held while the test counts the host's threads
refused = 0
for s in socks:
    s.settimeout(0.01)
    try:
        if b"too many connections" in s.recv(65536):
            refused += 1
    except OSError:
        pass
    s.close()
results["refused"] = refused
print("RESULTS " + json.dumps(results))
"""


def _poll(proc, samples):
    """Record the peak thread count and RSS (KiB) of `proc` until it exits."""
    while proc.poll() is None:
        with contextlib.suppress(OSError):
            with open(f"/proc/{proc.pid}/status", encoding="utf-8") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            samples["threads"] = max(samples.get("threads", 0), int(fields["Threads"]))
            rss = int(fields.get("VmRSS", "0 kB").split()[0])
            samples["rss_kib"] = max(samples.get("rss_kib", 0), rss)
        time.sleep(0.02)


def run_build(manifest, store, libdir=REPO):
    """Run osbuild --json as a subprocess; returns (returncode, result, stderr, samples)."""
    path = os.path.join(os.path.dirname(str(store)), "manifest.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    samples = {}
    with subprocess.Popen([sys.executable, "-m", "osbuild", "--libdir", str(libdir), "--store",
                           str(store), "--json", path], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        poller = threading.Thread(target=_poll, args=(proc, samples))
        poller.start()
        try:
            stdout, stderr = proc.communicate(timeout=900)
        finally:
            poller.join()
    try:
        result = json.loads(stdout)
    except ValueError:
        result = None
    return proc.returncode, result, stderr, samples


def stage_results(output):
    """The RESULTS line an attack program printed."""
    [line] = [line for line in output.splitlines() if line.startswith("RESULTS ")]
    return json.loads(line[len("RESULTS "):])


def script(text):
    """An org.osbuild.script stage."""
    return {"name": "org.osbuild.script", "options": {"chroot": False, "script": text}}


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_stage_attacks_the_sources_and_osbuild_apis(tmp_path):
    """A stage sends endless/unsealed/oversized bodies, 200,000-deep JSON, 20 fds and
    garbage to both sockets, then holds 3,000 connections: each gets a one-line error,
    the host neither reads without end nor starts thousands of threads, and the
    build goes on."""
    manifest = {"pipeline": {"stages": [script(f"python3 - <<'EOF'\n{STAGE_ATTACK}\nEOF\n"),
                                        script("echo next stage ran")]}}
    status, result, stderr, samples = run_build(manifest, tmp_path / "store")
    assert status == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "RecursionError" not in stderr, stderr[-3000:]
    res = stage_results(result["stages"][0]["output"])
    for endpoint in ("sources", "osbuild"):
        assert "not a sealed memfd" in res[f"{endpoint} dev-zero"]["error"], res
        assert res[f"{endpoint} dev-zero seconds"] < 2, res
        assert "not a sealed memfd" in res[f"{endpoint} unsealed"]["error"], res
        assert "at most" in res[f"{endpoint} oversized"]["error"], res
        assert "nested too deeply" in res[f"{endpoint} deep"]["error"], res
        assert "file descriptors" in res[f"{endpoint} fds"]["error"], res
        assert "not JSON" in res[f"{endpoint} garbage"]["error"], res
    assert "unknown source" in res["sources still answers"]["error"], res
    assert res["connections"] == 3000, res
    assert res["refused"] >= 3000 - api.MAX_CONNECTIONS, res
    assert samples["threads"] < api.MAX_CONNECTIONS + 30, samples
    assert samples["rss_kib"] < 512 * 1024, samples
    assert "next stage ran" in result["stages"][1]["output"]
    print(f"peak host threads {samples['threads']}, peak RSS {samples['rss_kib'] >> 10} MiB, "
          f"/dev/zero refused in {res['sources dev-zero seconds']:.3f}s")


HOSTILE_ASSEMBLER = r'''#!/usr/bin/python3
"""A hostile assembler (test only): attacks the remoteloop API."""
import json
import os
import sys
import time

from osbuild.util import jsoncomm

STAGE_DESC = "Attack the remoteloop API"
STAGE_INFO = "Test only."
STAGE_OPTS = """
"properties": {}
"""
PATH = "/run/osbuild/api/remoteloop"
MIB = 1024 * 1024


def attach(image_fd, **fields):
    req = {"method": "attach", "fd": 0, "offset": 0, "sizelimit": 0, **fields}
    with jsoncomm.Socket.new_client(PATH) as sock:
        reply, fds = sock.call(req, [image_fd])
    for extra in fds:
        os.close(extra)
    return reply


def main(out):
    results = {}
    image = os.path.join(out, "image.raw")
    with open(image, "wb") as f:
        f.truncate(8 * MIB)
    with open("/tmp/elsewhere", "wb") as f:
        f.truncate(MIB)
    os.symlink("/tmp/elsewhere", os.path.join(out, "link"))
    openers = {
        "host-passwd": lambda: os.open("/etc/passwd", os.O_RDONLY),
        "host-python": lambda: os.open(os.path.realpath(sys.executable), os.O_RDONLY),
        "output-readonly": lambda: os.open(image, os.O_RDONLY),
        "tmp-file": lambda: os.open("/tmp/elsewhere", os.O_RDWR),
        "link-out": lambda: os.open(os.path.join(out, "link"), os.O_RDWR),
        "memfd": lambda: os.memfd_create("x"),
        "dev-zero": lambda: os.open("/dev/zero", os.O_RDWR),
    }
    for name, opener in openers.items():
        fd = opener()
        try:
            results[name] = attach(fd)
        finally:
            os.close(fd)
    fd = os.open(image, os.O_RDWR)
    try:
        for name, fields in {"2**70": {"offset": 2 ** 70}, "negative": {"offset": -512},
                             "unaligned": {"offset": 100}, "past-end": {"sizelimit": 9 * MIB},
                             "fd-index": {"fd": 3}}.items():
            results[name] = attach(fd, **fields)
        start = time.monotonic()
        replies = [attach(fd, offset=n * 512) for n in range(100)]
        results["flood seconds"] = time.monotonic() - start
        results["flood attached"] = sum("devname" in r for r in replies)
        results["flood refused"] = [r.get("error") for r in replies if "error" in r][:1]
    finally:
        os.close(fd)
    print("RESULTS " + json.dumps(results))
    return 0


if __name__ == "__main__":
    args = json.load(sys.stdin)
    sys.exit(main(args["output_dir"]))
'''


def hostile_libdir(tmp_path):
    """A copy of the library with the hostile assembler added."""
    libdir = tmp_path / "lib"
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("stages", "assemblers", "runners", "sources", "schemas", "osbuild"):
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copytree(os.path.join(REPO, name), libdir / name, symlinks=True,
                            ignore=ignore)
    program = libdir / "assemblers" / "org.osbuild.hostile"
    program.write_text(HOSTILE_ASSEMBLER)
    program.chmod(0o755)
    return libdir


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _all_loops():
    out = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True,
                         check=False).stdout
    return json.loads(out)["loopdevices"] if out.strip() else []


@pytest.mark.integration
@needs_loop
def test_hostile_assembler_attacks_remoteloop(tmp_path):
    """An assembler (as if taken over through the build root) asks for host files,
    read-only fds, files outside its output, a memfd, /dev/zero, absurd geometry and
    100 devices: only its own output file is attached, at most 16 times; the host is
    unchanged and every device is gone after the build."""
    libdir = hostile_libdir(tmp_path)
    passwd = _sha256("/etc/passwd")
    loops_before = {d["name"] for d in _all_loops()}
    manifest = {"pipeline": {"stages": [script("echo tree")],
                             "assembler": {"name": "org.osbuild.hostile"}}}
    status, result, stderr, _ = run_build(manifest, tmp_path / "store", libdir)
    assert status == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    res = stage_results(result["assembler"]["output"])
    expected = {
        "host-passwd": "not open for reading and writing",
        "host-python": "not open for reading and writing",
        "output-readonly": "not open for reading and writing",
        "tmp-file": "not a file in the output directory",
        "link-out": "not a file in the output directory",
        "memfd": "not a file in the output directory",
        "dev-zero": "not a regular file",
        "2**70": "do not lie within the image",
        "negative": "non-negative multiple of 512",
        "unaligned": "non-negative multiple of 512",
        "past-end": "do not lie within the image",
        "fd-index": "'fd' must index",
    }
    for name, fragment in expected.items():
        assert fragment in res[name].get("error", ""), (name, res[name])
    assert res["flood attached"] == remoteloop.MAX_DEVICES, res
    assert "at most 16 loop devices" in res["flood refused"][0], res
    assert _sha256("/etc/passwd") == passwd
    leftovers = [d for d in _all_loops() if d["name"] not in loops_before]
    assert leftovers == [], leftovers
    print(f"100 attach requests from the container in {res['flood seconds']:.2f}s")


ESP_START, ESP_SIZE = 2048, 32768
VFAT_TREE = """
mkdir -p boot/efi/EFI/BOOT etc
echo efi > boot/efi/EFI/BOOT/BOOTX64.EFI
ln -s /etc/passwd boot/efi/passwd-link
ln -s /etc boot/efi/EFI/etc-link
ln -s /etc/passwd etc/leak
mkfifo boot/efi/fifo
"""


def _mdir(raw, offset):
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    argv = ["mdir", "-a", "-i", f"{raw}@@{offset}", "::/"]
    top = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
    assert "Volume Serial Number is 46BB-8120" in top, top
    if "No files" in top:       # mdir -/ fails on an empty filesystem
        return top
    return subprocess.run(argv[:1] + ["-/"] + argv[1:], capture_output=True, text=True,
                          check=True, env=env).stdout


def vfat_options(filename):
    """qemu assembler options: a raw GPT image with a vfat ESP at /boot/efi and ext4 /."""
    return {"format": "raw", "filename": filename, "size": 64 * MIB,
            "pttype": "gpt", "bootloader": {"type": "none"},
            "partitions": [
                {"start": ESP_START, "size": ESP_SIZE,
                 "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                 "filesystem": {"type": "vfat", "uuid": "46BB-8120", "mountpoint": "/boot/efi"}},
                {"start": ESP_START + ESP_SIZE,
                 "filesystem": {"type": "ext4", "mountpoint": "/",
                                "uuid": "76a22bf4-f153-4541-b6c7-0332c0dfaeac"}}]}


def assert_no_host_passwd(raw):
    """The ESP of `raw` does not hold the first line of the host's /etc/passwd."""
    with open("/etc/passwd", "rb") as f:
        host_line = f.readline().strip()
    with open(raw, "rb") as f:
        f.seek(ESP_START * 512)
        esp = f.read(ESP_SIZE * 512)
    assert host_line not in esp


@pytest.mark.integration
@needs_loop
def test_linked_vfat_mountpoint_copies_nothing(tmp_path):
    """The tree's /boot/efi is a link to the host's /etc (as the build root shows it):
    the ESP stays empty, with a warning, instead of receiving the host's /etc."""
    tree = "mkdir boot\nln -s /etc boot/efi\n"
    store = tmp_path / "store"
    manifest = {"pipeline": {"stages": [script(tree)], "assembler": {
        "name": "org.osbuild.qemu", "options": vfat_options("attack-vfat-link.raw")}}}
    status, result, stderr, _ = run_build(manifest, store)
    assert status == 0, stderr[-3000:] + json.dumps(result)[-3000:]
    assert "/boot/efi in the tree is not a directory reached without symbolic links" in \
        result["assembler"]["output"], result["assembler"]["output"]
    raw = os.path.join(store, "refs", result["output_id"], "attack-vfat-link.raw")
    listing = _mdir(raw, ESP_START * 512)
    assert "passwd" not in listing.lower() and "No files" in listing, listing
    assert_no_host_passwd(raw)


@pytest.mark.integration
@needs_loop
def test_symlinks_do_not_carry_host_files_into_images(tmp_path):
    """A tree's links to host files (visible in the build root) on a vfat ESP are left
    out with a warning, not copied as the host file's content; on ext4 and in a tarball
    they stay links."""
    options = vfat_options("attack-vfat.raw")
    store = tmp_path / "store"
    manifest = {"pipeline": {"stages": [script(VFAT_TREE)],
                             "assembler": {"name": "org.osbuild.qemu", "options": options}}}
    status, result, stderr, _ = run_build(manifest, store)
    assert status == 0, stderr[-3000:] + json.dumps(result)[-3000:]
    output = result["assembler"]["output"]
    assert "leaving out the symbolic link /passwd-link" in output, output
    assert "leaving out the symbolic link /EFI/etc-link" in output, output
    raw = os.path.join(store, "refs", result["output_id"], "attack-vfat.raw")
    listing = _mdir(raw, ESP_START * 512)
    assert "BOOTX64" in listing and "passwd" not in listing and "etc-link" not in listing, \
        listing
    assert_no_host_passwd(raw)
    with contextlib.ExitStack() as stack:
        dev = subprocess.run(["losetup", "--show", "--find", "--read-only", "--offset",
                              str((ESP_START + ESP_SIZE) * 512), raw], capture_output=True,
                             text=True, check=True).stdout.strip()
        stack.callback(subprocess.run, ["losetup", "--detach", dev], check=False)
        stat_out = subprocess.run(["debugfs", "-R", "stat /etc/leak", dev], capture_output=True,
                                  text=True, check=True).stdout
    assert "Type: symlink" in stat_out, stat_out

    manifest["pipeline"]["assembler"] = {"name": "org.osbuild.tar",
                                         "options": {"filename": "attack.tar"}}
    status, result, stderr, _ = run_build(manifest, store)
    assert status == 0, stderr[-3000:]
    tarball = os.path.join(store, "refs", result["output_id"], "attack.tar")
    listing = subprocess.run(["tar", "-tvf", tarball], capture_output=True, text=True,
                             check=True).stdout
    [leak] = [line for line in listing.splitlines() if line.endswith(
        "etc/leak -> /etc/passwd")]
    assert leak.startswith("l"), leak
