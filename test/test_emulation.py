"""Foreign-architecture emulation (osbuild/emulation.py): private, fixed, checked early.

The arm64 program run here is a 180-byte static AArch64 ELF made below
(write(1, message), exit(0)): real foreign code that only runs when qemu's
user-mode emulator is registered for it.
"""

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import threading

import pytest

from conftest import REPO, import_program, requires_root, run_osbuild
from osbuild import emulation
from osbuild.layout import CONTAINER

MESSAGE = b"hello from aarch64\n"
HOST_BINFMT = "/proc/sys/fs/binfmt_misc"

needs_qemu = pytest.mark.skipif(not os.path.exists("/usr/bin/qemu-aarch64-static"),
                                reason="needs qemu-user-static")


def aarch64_elf(message=MESSAGE):
    """A static AArch64 executable that writes `message` to stdout and exits 0."""
    code = struct.pack("<8I",
                       0xd2800020,                          # mov x0, #1
                       0x100000e1,                          # adr x1, message (+28)
                       0xd2800002 | (len(message) << 5),    # mov x2, #len
                       0xd2800808,                          # mov x8, #64 (write)
                       0xd4000001,                          # svc #0
                       0xd2800000,                          # mov x0, #0
                       0xd2800ba8,                          # mov x8, #93 (exit)
                       0xd4000001) + message                # svc #0
    base, start = 0x400000, 64 + 56
    size = start + len(code)
    header = (b"\x7fELF\x02\x01\x01" + bytes(9) +
              struct.pack("<HHIQQQIHHHHHH", 2, 183, 1, base + start, 64, 0, 0, 64, 56, 1, 0, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return header + phdr + code


def host_binfmt():
    """What the host's binfmt_misc shows: {entry: contents} (empty when not mounted)."""
    out = {}
    for name in sorted(os.listdir(HOST_BINFMT)):
        with open(os.path.join(HOST_BINFMT, name), "rb") as f:
            out[name] = f.read() if name != "register" else b""
    return out


def host_runs(path):
    """Whether the host can execute `path` (it must not, for foreign code)."""
    try:
        subprocess.run([path], capture_output=True, check=False, timeout=10)
    except OSError as e:
        assert e.errno == 8, e   # ENOEXEC: Exec format error
        return False
    return True


def script_stage(script, emulate=True):
    """A build-root-mode script stage, with aarch64 emulation unless told otherwise."""
    options = {"chroot": False, "script": script}
    if emulate:
        options["emulation"] = "aarch64"
    return {"name": "org.osbuild.script", "options": options}


def run_elf_script(extra=""):
    """A script writing the AArch64 program into the tree and running it."""
    data = base64.b64encode(aarch64_elf()).decode()
    return f"echo {data} | base64 -d > hello\nchmod 0755 hello\n./hello\n{extra}"


@pytest.fixture(name="foreign_file")
def foreign_file_fixture(tmp_path):
    """The AArch64 program as a host file (to show the host cannot run it)."""
    path = tmp_path / "hello-aarch64"
    path.write_bytes(aarch64_elf())
    path.chmod(0o755)
    return str(path)


def watch_host(foreign_file, stop, seen):
    """Until `stop`: record the host's binfmt_misc and whether it runs foreign code."""
    while not stop.wait(0.05):
        seen.append((host_binfmt(), host_runs(foreign_file)))


@pytest.mark.integration
@requires_root()
@needs_qemu
def test_emulated_stage_runs_arm64_with_host_untouched(tmp_path, foreign_file):
    """The stage runs arm64 code; the host's binfmt_misc is the same before,
    during (polled all along) and after, and the host never runs arm64 code."""
    assert not host_runs(foreign_file), "this host runs arm64 code itself: nothing to test"
    before = host_binfmt()
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_host, args=(foreign_file, stop, seen))
    script = run_elf_script("cat /proc/sys/fs/binfmt_misc/osbuild-aarch64\n"
                            "ls /proc/sys/fs/binfmt_misc\nsleep 2\n")
    watcher.start()
    try:
        res = run_osbuild({"stages": [script_stage(script)]}, tmp_path / "store")
    finally:
        stop.set()
        watcher.join()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    output = res.json["stages"][0]["output"]
    assert MESSAGE.decode() in output
    assert "flags: F" in output
    assert f"interpreter {CONTAINER.emulator}/qemu-aarch64-static" in output
    # the container's own instance holds ours only
    assert "\nosbuild-aarch64\nregister\nstatus\n" in output
    assert len(seen) >= 10, "the watcher did not see the build"
    for listing, ran in seen:
        assert listing == before and not ran
    assert host_binfmt() == before


@pytest.mark.integration
@requires_root()
@needs_qemu
def test_without_emulation_arm64_does_not_run(tmp_path):
    """The same stage without the option fails: the emulation is what runs arm64 code."""
    res = run_osbuild({"stages": [script_stage(run_elf_script(), emulate=False)]},
                      tmp_path / "store")
    assert res.returncode == 1
    output = res.json["stages"][0]["output"]
    assert MESSAGE.decode() not in output
    assert "Exec format error" in output or "cannot execute" in output


@pytest.mark.integration
@requires_root()
@needs_qemu
def test_hostile_stage_registers_only_in_its_own_namespace(tmp_path, foreign_file):
    """A hostile script with emulation on registers its own interpreter and magic
    (in its own instance, where it works) and mounts binfmt_misc over /proc's
    place for it: none of it reaches the host, nor the next stage."""
    before = host_binfmt()
    rogue = tmp_path / "rogue"
    rogue.write_bytes(b"OSBUILDROGUE\n")
    rogue.chmod(0o755)
    hostile = (
        "printf 'OSBUILDROGUE\\n' > rogue; chmod 0755 rogue\n"
        "echo ':rogue:M::OSBUILDROGUE::/bin/echo:' > /proc/sys/fs/binfmt_misc/register\n"
        "./rogue | grep -q rogue && echo ROGUE-RAN-INSIDE\n"
        "mount -t binfmt_misc none /proc/sys/fs/binfmt_misc 2>&1 || true\n"
        "echo ':rogue2:M::OSBUILDROGUE2::/bin/echo:' > /proc/sys/fs/binfmt_misc/register "
        "2>&1 || true\n"
        "ls /proc/sys/fs/binfmt_misc\n")
    res = run_osbuild({"stages": [script_stage(hostile),
                                  script_stage(run_elf_script(), emulate=False)]},
                      tmp_path / "store")
    stages = res.json["stages"]
    assert "ROGUE-RAN-INSIDE" in stages[0]["output"], stages[0]["output"]
    assert stages[0]["success"]
    # the next program has no registration left: its arm64 code does not run
    assert not stages[1]["success"] and MESSAGE.decode() not in stages[1]["output"]
    assert host_binfmt() == before
    assert not host_runs(str(rogue)) and not host_runs(foreign_file)


HOSTILE_VALUES = ["x86_64", "aarch64\n", ":x:M::\\x7fELF::/bin/sh:F", "../../bin/sh",
                  "qemu-aarch64-static", "", 64, ["aarch64"], {"name": "aarch64"}, None]


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_hostile_emulation_values_refused_before_anything_runs(tmp_path, value):
    """Anything but a known architecture name is a bad manifest: exit 1, one line
    naming the option, a JSON result, nothing run or stored."""
    store = tmp_path / "store"
    manifest = {"stages": [{"name": "org.osbuild.script",
                            "options": {"script": "true", "emulation": value}}]}
    res = run_osbuild(manifest, store)
    assert res.returncode == 1, res.stdout
    assert res.json["success"] is False
    assert "stages[0].options.emulation" in res.json["error"]
    assert "Traceback" not in res.stderr
    assert not (store / "objects").exists() or not os.listdir(store / "objects")


def test_osbuild_checks_the_architecture_whatever_the_schema(tmp_path):
    """A stage whose schema lets any string through still gets only ARCHES:
    osbuild's own check (the defence), not the program's schema, decides."""
    libdir = tmp_path / "lib"
    shutil.copytree(os.path.join(REPO, "runners"), libdir / "runners", symlinks=True)
    (libdir / "stages").mkdir()
    (libdir / "stages" / "org.osbuild.loose").write_text(
        "#!/usr/bin/python3\nSTAGE_DESC = 'x'\nSTAGE_EMULATION = True\n"
        "STAGE_OPTS = '\"properties\": {\"emulation\": {\"type\": \"string\"}}'\n")
    (libdir / "stages" / "org.osbuild.loose").chmod(0o755)
    manifest = tmp_path / "m.json"
    for value, ok in (("aarch64", True), (":x:M::\\x7fELF::/bin/sh:F", False),
                      ("x86_64", False)):
        manifest.write_text(json.dumps({"stages": [{"name": "org.osbuild.loose",
                                                    "options": {"emulation": value}}]}))
        res = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", str(libdir),
                              "--store", str(tmp_path / "store"), "--json", "--inspect",
                              str(manifest)], cwd=REPO, capture_output=True, text=True,
                             check=False)
        if ok:
            assert res.returncode == 0, res.stdout + res.stderr
        else:
            assert res.returncode == 1
            assert "supported are aarch64" in json.loads(res.stdout)["error"]


@needs_qemu
def test_missing_qemu_user_static_fails_before_anything_runs(tmp_path):
    """With the interpreter lookup pointed at a missing path: exit 1 before any
    stage runs, the message says what to install."""
    store = tmp_path / "store"
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"stages": [script_stage("touch ran")]}))
    code = ("import sys\nfrom osbuild import emulation\n"
            f"emulation.INTERPRETER_DIR = {str(tmp_path / 'no-such-dir')!r}\n"
            "from osbuild.__main__ import main\n"
            f"sys.exit(main(['--libdir', {REPO!r}, '--store', {str(store)!r}, "
            f"{str(manifest)!r}]))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert res.returncode == 1
    text = res.stdout + res.stderr
    assert "install qemu-user-static" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1, text
    assert not (store / "objects").exists() or not os.listdir(store / "objects")


def test_registration_line_is_fixed():
    """What the runner writes: osbuild's magic, mask, interpreter and flag F, nothing else."""
    arch = emulation.lookup("aarch64")
    line = arch.registration("/run/osbuild/emulator/qemu-aarch64-static")
    assert line.startswith(":osbuild-aarch64:M:0:\\x7f\\x45\\x4c\\x46\\x02")
    assert line.endswith(":/run/osbuild/emulator/qemu-aarch64-static:F")
    assert line.count(":") == 7
    assert aarch64_elf()[:20] == bytes(a & b for a, b in zip(aarch64_elf()[:20], arch.mask))
    assert emulation.is_native("aarch64", "aarch64")
    assert not emulation.is_native("aarch64", "x86_64")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="an x86_64 host")
def test_dpkg_stage_names_the_missing_option():
    """arm64 packages without `emulation`: the dpkg stage fails at once, saying what to set."""
    dpkg = import_program(os.path.join(REPO, "stages", "org.osbuild.dpkg"), "dpkg_stage_emu")
    with pytest.raises(dpkg.ProgramError, match='arm64, which this x86_64 build root cannot run: '
                                              'set "emulation": "aarch64"'):
        dpkg.check_architecture("arm64", {})
    dpkg.check_architecture("arm64", {"emulation": "aarch64"})
    dpkg.check_architecture("amd64", {})
