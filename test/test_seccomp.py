"""nspawn's seccomp filters, read once and installed by a filtered thread (osbuild/seccomp.py).

The claims: a program gets the byte-identical filter stack nspawn would have
compiled for it; system calls nspawn refuses are refused the same way; only
the spawning thread of osbuild is filtered; a cache that is not root's own,
is corrupt or names a changed library is not used; filters that cannot be
installed stop the build instead of running the program without them.
"""

import gc
import json
import os
import shutil
import struct
import threading
import time

import pytest

from osbuild import buildroot, seccomp
from osbuild.buildroot import BuildRootError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLEEP_ARGS = ["/usr/bin/sleep", "86398.75"]
# x86_64 numbers of calls nspawn's filter refuses (or the kernel does, in a user namespace)
CALLS = {"keyctl": 250, "add_key": 248, "request_key": 249, "kexec_load": 246,
         "init_module": 175, "swapon": 167, "settimeofday": 164, "open_by_handle_at": 304}
PROGRAM = r'''#!/usr/bin/python3
import ctypes, json, os, sys
args = json.load(sys.stdin)
libc = ctypes.CDLL(None, use_errno=True)
calls = {}
for name, nr in args["options"]["calls"].items():
    res = libc.syscall(nr, 0, 0, 0, 0, 0)
    calls[name] = 0 if res == 0 else ctypes.get_errno()
with open("/proc/self/status", encoding="ascii") as f:
    status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
print(json.dumps({"filters": int(status["Seccomp_filters"]), "calls": calls}))
sys.stdout.flush()
if args["options"].get("sleep"):
    os.execv(args["options"]["sleep"][0], args["options"]["sleep"])
'''


def whole(prog):
    """`prog` as seccomp.Filters programs of one filter."""
    return [(0, prog)]


ALLOW_ALL = struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000)   # ret SECCOMP_RET_ALLOW
REFUSED = struct.pack("<HBBI", 0x05, 0, 0, 100)            # ja +100: out of the program


@pytest.fixture(name="libdir")
def libdir_fixture(tmp_path):
    """A libdir with the runners and a stage that reports its seccomp state."""
    lib = tmp_path / "lib"
    shutil.copytree(os.path.join(REPO, "runners"), lib / "runners", symlinks=True)
    (lib / "stages").mkdir()
    prog = lib / "stages" / "test.seccomp"
    prog.write_text(PROGRAM, encoding="utf-8")
    prog.chmod(0o755)
    return str(lib)


@pytest.fixture(name="fresh")
def fresh_fixture(monkeypatch, tmp_path):
    """seccomp with an empty memory and its cache in `tmp_path/cache`."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(seccomp, "CACHE_DIR", str(cache))
    monkeypatch.setattr(seccomp, "_ACTIVE", {})
    return cache


def run(libdir, tmp_path, options, max_processes=0):
    """Run test.seccomp in a build root on the host's /usr; returns the RunResult."""
    tree = tmp_path / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    with buildroot.BuildRoot("/", "org.osbuild.debian12", libdir, str(work),
                             max_processes=max_processes) as root:
        return root.run("stages", "test.seccomp", {"tree": "/run/osbuild/tree",
                                                    "options": options},
                        binds=[(str(tree), "/run/osbuild/tree")])


def report(res):
    """The JSON line test.seccomp printed."""
    assert res.success, res.output
    return json.loads([line for line in res.output.splitlines() if line.startswith("{")][0])


def descendant_sleeping():
    """The pid of our descendant running SLEEP_ARGS, or None."""
    cmdline = b"\0".join(a.encode() for a in SLEEP_ARGS) + b"\0"
    return seccomp._find(os.getpid(), seccomp._cmdline_is(cmdline))  # pylint: disable=protected-access


def filters_of_sleeping_program(libdir, tmp_path):
    """Run test.seccomp until it sleeps, and read its filters from the host."""
    results = []
    thread = threading.Thread(target=lambda: results.append(
        run(libdir, tmp_path, {"calls": {}, "sleep": SLEEP_ARGS})), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while (pid := descendant_sleeping()) is None:
        assert time.monotonic() < deadline and thread.is_alive(), results
        time.sleep(0.01)
    try:
        return seccomp._dump(pid)  # pylint: disable=protected-access
    finally:
        os.kill(pid, 9)
        thread.join(60)


def nspawn_options():
    """The filter options of a program container of a build root on the host."""
    with buildroot.BuildRoot("/", "org.osbuild.debian12", REPO, "/tmp", max_processes=0) as root:
        argv = root._nspawn_argv("/x", "/y", False, (), (), False)  # pylint: disable=protected-access
        return seccomp.options_key(argv), f"{root.uid_base}:{buildroot.UID_RANGE}"


# -- the filters a program gets ---------------------------------------------------------

@pytest.mark.integration
def test_probe_reads_the_filters_nspawn_installs(fresh):
    options, users = nspawn_options()
    filters, files = seccomp.probe(options, users)
    assert len(filters.programs) >= 1
    assert all(len(prog) % 8 == 0 for _, prog in filters.programs)
    paths = [f[0] for f in files]
    assert os.path.realpath(shutil.which("systemd-nspawn")) in paths
    assert any("libseccomp" in path for path in paths)
    assert not fresh.exists()   # probe() alone keeps nothing


@pytest.mark.integration
def test_program_gets_nspawn_filters_byte_for_byte(libdir, tmp_path, fresh, monkeypatch):
    """The filters read from a running program are those nspawn installs itself."""
    ours = filters_of_sleeping_program(libdir, tmp_path / "a")
    assert list(fresh.iterdir()), "the filters were not kept"
    monkeypatch.setattr(seccomp, "for_options", lambda *_: None)
    nspawns = filters_of_sleeping_program(libdir, tmp_path / "b")
    assert len(ours) >= 1
    assert ours == nspawns


@pytest.mark.integration
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="system call numbers of x86_64")
def test_refused_calls_are_refused_as_under_nspawn(libdir, tmp_path, fresh, monkeypatch):
    ours = report(run(libdir, tmp_path / "a", {"calls": CALLS}, max_processes=100))
    monkeypatch.setattr(seccomp, "for_options", lambda *_: None)
    nspawns = report(run(libdir, tmp_path / "b", {"calls": CALLS}, max_processes=100))
    assert ours == nspawns
    assert ours["filters"] >= 1
    assert all(err != 0 for err in ours["calls"].values()), ours
    assert ours["calls"]["keyctl"] == 1 and ours["calls"]["kexec_load"] == 1, ours  # EPERM
    assert list(fresh.iterdir())


@pytest.mark.integration
@pytest.mark.usefixtures("fresh")
def test_only_the_spawning_thread_is_filtered(libdir, tmp_path):
    report(run(libdir, tmp_path, {"calls": {}}))
    filters = [f for f in seccomp._ACTIVE.values() if f is not None]  # pylint: disable=protected-access
    assert len(filters) == 1
    spawner = filters[0].spawner()
    states = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status", encoding="ascii") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        states[int(tid)] = int(status["Seccomp"])
    assert states[spawner.native_id] == 2, states
    assert states[os.getpid()] == 0, states   # the main thread
    spawners = {o.native_id for o in gc.get_objects() if isinstance(o, seccomp.Spawner)}
    assert {tid for tid, mode in states.items() if mode} == spawners, states


@pytest.mark.integration
def test_callers_systemd_seccomp_0_does_not_turn_filters_off(libdir, tmp_path, monkeypatch):
    monkeypatch.setenv("SYSTEMD_SECCOMP", "0")
    monkeypatch.setattr(seccomp, "for_options", lambda *_: None)
    assert report(run(libdir, tmp_path, {"calls": {}}))["filters"] >= 1


@pytest.mark.integration
def test_filters_that_cannot_be_installed_stop_the_program(libdir, tmp_path, monkeypatch):
    monkeypatch.setattr(seccomp, "for_options", lambda *_: seccomp.Filters(whole(REFUSED)))
    with pytest.raises(BuildRootError, match="seccomp filters: Invalid argument"):
        run(libdir, tmp_path, {"calls": {}})


# -- the cache ----------------------------------------------------------------------------

def make_cache(cache, tmp_path, programs=((0, ALLOW_ALL),)):
    """Keep `programs` as the filters of a made-up nspawn (a file in tmp_path); returns
    (cache file, that file)."""
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"v1")
    path = os.path.join(str(cache), "key.json")
    seccomp._write(path, seccomp.Filters(programs),  # pylint: disable=protected-access
                   [seccomp.file_identity(str(lib))])
    return path, lib


def read(path):
    """seccomp._read(path)."""
    return seccomp._read(path)  # pylint: disable=protected-access


def test_kept_filters_are_read_back(fresh, tmp_path):
    path, _ = make_cache(fresh, tmp_path, [(0, ALLOW_ALL), (2, ALLOW_ALL * 2)])
    assert read(path).programs == [(0, ALLOW_ALL), (2, ALLOW_ALL * 2)]
    assert os.stat(fresh).st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_changed_library_makes_them_stale(fresh, tmp_path):
    path, lib = make_cache(fresh, tmp_path)
    lib.write_bytes(b"v2-longer")
    assert read(path) is None


@pytest.mark.parametrize("attack", ["file-mode", "dir-mode", "symlink", "garbage", "format",
                                    "base64", "partial-instruction", "no-files", "no-filters"])
def test_a_cache_that_is_not_trusted_is_not_used(fresh, tmp_path, attack):
    path, _ = make_cache(fresh, tmp_path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    edits = {"format": {**data, "format": 99},
             "base64": {**data, "filters": [[0, "!!!"]]},
             "partial-instruction": {**data, "filters": [[0, "AAAA"]]},
             "no-files": {**data, "files": []},
             "no-filters": {**data, "filters": []}}
    if attack == "file-mode":
        os.chmod(path, 0o644)
    elif attack == "dir-mode":
        os.chmod(fresh, 0o755)
    elif attack == "symlink":
        os.rename(path, path + ".real")
        os.symlink(path + ".real", path)
    elif attack == "garbage":
        with open(path, "w", encoding="utf-8") as f:
            f.write("{not json")
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(edits[attack], f)
    assert read(path) is None


@pytest.mark.usefixtures("fresh")
def test_kept_filters_are_used_without_a_probe(tmp_path, monkeypatch):
    options = ["--private-network"]
    nspawn = os.path.realpath(shutil.which("systemd-nspawn"))
    path = seccomp._cache_path(options, nspawn)  # pylint: disable=protected-access
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"x")
    seccomp._write(path, seccomp.Filters(whole(ALLOW_ALL)),  # pylint: disable=protected-access
                   [seccomp.file_identity(str(lib))])

    def no_probe(*_):
        raise AssertionError("probed")
    monkeypatch.setattr(seccomp, "probe", no_probe)
    first = seccomp.for_options(options, "1:2")
    assert first.programs == whole(ALLOW_ALL)
    assert seccomp.for_options(options, "1:2") is first


def test_a_failed_probe_leaves_nspawn_its_own_filters(fresh, monkeypatch):
    calls = []

    def failing(*_):
        calls.append(1)
        raise seccomp.ProbeError("no ptrace here")
    monkeypatch.setattr(seccomp, "probe", failing)
    assert seccomp.for_options(["--private-network"], "1:2") is None
    assert seccomp.for_options(["--private-network"], "1:2") is None
    assert calls == [1]   # once per process
    assert not fresh.exists()


def test_filters_must_be_whole_instructions():
    for programs in ([], [(0, b"")], [(0, b"1234567")]):
        with pytest.raises(ValueError):
            seccomp.Filters(programs)


def test_options_key_leaves_out_what_differs_per_container():
    argv = ["systemd-nspawn", "--quiet", "--machine=a", "--directory=/d", "--bind=/a:/b",
            "--bind-ro=/c:/d", "--setenv=A=1", "--private-users=1:2", "--console=pipe",
            "--capability=CAP_MAC_ADMIN", "--private-network"]
    assert seccomp.options_key(argv) == ["--quiet", "--capability=CAP_MAC_ADMIN",
                                         "--private-network"]
