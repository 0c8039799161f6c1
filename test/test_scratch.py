"""Scratch files in memory (osbuild.programs.scratch, the dpkg stage's repacked packages,
the qemu assembler's raw image) and the dpkg stage's no-op syncs (osbuild.programs.nosync)."""
# pylint: disable=missing-function-docstring

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, import_program, requires_root
from osbuild.programs import fsimage, nosync, scratch

dpkg = import_program(os.path.join(REPO, "stages", "org.osbuild.dpkg"), "stage_dpkg_scratch")
qemu = import_program(os.path.join(REPO, "assemblers", "org.osbuild.qemu"), "asm_qemu_scratch")
SHM_IS_TMPFS = scratch.is_tmpfs(scratch.MEMORY_DIR)
needs_shm = pytest.mark.skipif(not SHM_IS_TMPFS, reason="/dev/shm is not a tmpfs here")


# ---------------------------------------------------------------- scratch

def test_is_tmpfs_reads_the_last_mount_of_the_path(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("tmpfs /dev/shm tmpfs rw 0 0\n/dev/vda /dev/shm ext4 rw 0 0\n"
                      "tmpfs /run tmpfs rw 0 0\n")
    assert not scratch.is_tmpfs("/dev/shm", str(mounts))
    assert scratch.is_tmpfs("/run", str(mounts))
    assert not scratch.is_tmpfs("/run/x", str(mounts))
    assert not scratch.is_tmpfs("/run", str(tmp_path / "missing"))


def test_available_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
    assert scratch.available_memory(str(meminfo)) == 2 << 20
    meminfo.write_text("MemTotal: 100 kB\n")
    assert scratch.available_memory(str(meminfo)) == 0
    assert scratch.available_memory() > 0


@needs_shm
def test_memory_dir_only_when_it_fits(tmp_path, monkeypatch):
    assert scratch.memory_dir(1 << 20) == scratch.MEMORY_DIR
    assert scratch.memory_dir(0) is None
    assert scratch.memory_dir(scratch.free_bytes(scratch.MEMORY_DIR)) is None  # no tenth spare
    assert scratch.memory_dir(1 << 20, str(tmp_path)) is None      # not a tmpfs
    monkeypatch.setattr(scratch, "available_memory", lambda: scratch.RESERVE + (2 << 20) - 1)
    assert scratch.memory_dir(1 << 20) is None                     # not twice in memory
    monkeypatch.setattr(scratch, "available_memory", lambda: scratch.RESERVE + (2 << 20))
    assert scratch.memory_dir(1 << 20) == scratch.MEMORY_DIR


def test_memory_budget(monkeypatch):
    monkeypatch.setattr(scratch, "available_memory", lambda: scratch.RESERVE + (10 << 20))
    assert scratch.memory_budget(1 << 20) == 1 << 20
    assert scratch.memory_budget(100 << 20) == 5 << 20
    monkeypatch.setattr(scratch, "available_memory", lambda: 0)
    assert scratch.memory_budget(1 << 20) == 0


@needs_shm
def test_copy_sparse_from_a_tmpfs_to_a_disk(tmp_path):
    """copy_file_range refuses (EXDEV) between a tmpfs and a disk: reads and writes instead."""
    src_path = os.path.join(scratch.MEMORY_DIR, f"osbuild-test-{os.getpid()}")
    src = os.open(src_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    dst = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.unlink(src_path)
        os.ftruncate(src, 8 << 20)
        os.pwrite(src, b"A" * 5000, 4096)
        os.pwrite(src, b"B" * 3, (8 << 20) - 3)
        os.ftruncate(dst, 16 << 20)
        fsimage.copy_sparse(src, dst, 1 << 20, 8 << 20)
        assert os.pread(dst, 5000, (1 << 20) + 4096) == b"A" * 5000
        assert os.pread(dst, 3, (9 << 20) - 3) == b"BBB"
        assert os.pread(dst, 4096, 1 << 20) == bytes(4096)
    finally:
        os.close(src)
        os.close(dst)


# ---------------------------------------------------------------- nosync

def run_python(code, with_filter):
    prog = ("import os, subprocess, sys\n"
            "from osbuild.programs import nosync\n"
            + ("assert nosync.install()\n" if with_filter else "") + code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          check=False, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.skipif(os.uname().machine not in nosync.SYNC_CALLS, reason="no filter here")
@pytest.mark.parametrize("call", ["os.fsync(987)", "os.fdatasync(987)"])
def test_nosync_answers_syncs_without_running_them(call):
    # a sync of a descriptor that is not open fails with EBADF when it runs
    assert "Bad file descriptor" in run_python(call, with_filter=False).stderr
    res = run_python(call + "\nos.sync()\nprint('ok')", with_filter=True)
    assert (res.returncode, res.stdout) == (0, "ok\n"), res.stderr


@pytest.mark.skipif(os.uname().machine not in nosync.SYNC_CALLS, reason="no filter here")
def test_nosync_is_inherited_and_leaves_everything_else(tmp_path):
    path = tmp_path / "f"
    code = (f"fd = os.open({str(path)!r}, os.O_WRONLY | os.O_CREAT)\n"
            "os.write(fd, b'data')\nos.fsync(fd)\nos.close(fd)\n"
            "child = subprocess.run([sys.executable, '-c', 'import os; os.fsync(987)'])\n"
            "print(child.returncode, open('/proc/self/status').read().count('Seccomp:\\t2'))\n")
    res = run_python(code, with_filter=True)
    assert (res.returncode, res.stdout) == (0, "0 1\n"), res.stderr
    assert path.read_bytes() == b"data"
    assert run_python(code, with_filter=False).stdout.split()[0] == "1"


def test_nosync_program_shape():
    assert nosync.program("sparc") is None
    assert nosync.install("sparc") is False
    for machine, (_, calls) in nosync.SYNC_CALLS.items():
        prog = nosync.program(machine)
        assert len(prog) == 8 * (len(calls) + 5)


# ---------------------------------------------------------------- the dpkg stage's repacking

def build_deb(tmp_path, name, size):
    root = tmp_path / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.com>\n"
        f"Description: test\nInstalled-Size: 1\n")
    (root / "usr/share" / name).mkdir(parents=True)
    with open(root / "usr/share" / name / "data", "wb") as f:
        f.truncate(size)  # zeros: a large data.tar from a small .deb
    out = tmp_path / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    return dpkg.Package(f"sha256:{name}", str(out), dpkg.read_control(str(out)))


@requires_root()
@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_repacked_packages_go_to_memory_and_overflow_to_disk(tmp_path, monkeypatch):
    small = build_deb(tmp_path, "small", 1 << 20)
    big = build_deb(tmp_path, "big", 80 << 20)   # claims 1 KiB installed: a wrong size
    monkeypatch.setattr(dpkg.scratch, "memory_budget", lambda nbytes: 64 << 20)
    outdir = tmp_path / "repack"
    outdir.mkdir()
    repacker = dpkg.Repacker(str(outdir), 2, [small, big])
    try:
        memory = str(outdir / dpkg.REPACK_MEMORY)
        assert repacker.memory == memory and os.path.ismount(memory)
        repacker.submit([small, big])
        repacker.wait([small, big])
        assert os.path.dirname(small.repacked) == memory
        assert dpkg.debpath(small) == f"/{dpkg.REPACK_IN_TREE}/memory/sha256:small"
        # did not fit in the 64 MiB tmpfs after all: repacked again on disk, nothing left
        assert os.path.dirname(big.repacked) == str(outdir)
        assert dpkg.debpath(big) == f"/{dpkg.REPACK_IN_TREE}/sha256:big"
        assert os.listdir(memory) == ["sha256:small"]
        assert os.path.getsize(big.repacked) > 80 << 20
    finally:
        repacker.close()
    assert not os.path.ismount(memory)
    repacker.close()    # idempotent


@requires_root()
def test_repacking_does_not_mount_over_a_link(tmp_path, monkeypatch):
    monkeypatch.setattr(dpkg.scratch, "memory_budget", lambda nbytes: 64 << 20)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outdir = tmp_path / "repack"
    outdir.mkdir()
    os.symlink(elsewhere, outdir / dpkg.REPACK_MEMORY)
    repacker = dpkg.Repacker(str(outdir), 1, [])
    try:
        assert repacker.memory is None
        assert not os.path.ismount(elsewhere)
    finally:
        repacker.close()


def test_repacking_stays_on_disk_without_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(dpkg.scratch, "memory_budget", lambda nbytes: 1 << 20)
    repacker = dpkg.Repacker(str(tmp_path), 1, [])
    try:
        assert repacker.memory is None and os.listdir(tmp_path) == []
    finally:
        repacker.close()


# ---------------------------------------------------------------- the qemu assembler's raw image

class Part:  # pylint: disable=too-few-public-methods
    """What raw_image_dir reads of a partition: its size in sectors, whether it has a
    filesystem."""

    def __init__(self, size, filesystem=True):
        self.size, self.filesystem = size, filesystem


@needs_shm
def test_raw_image_in_memory_only_when_converted_and_small(tmp_path):
    out = str(tmp_path)
    parts = [Part(2048, filesystem=False), Part(2048 * 100)]
    assert qemu.raw_image_dir(out, "qcow2", parts, 10 << 20) == scratch.MEMORY_DIR
    assert qemu.raw_image_dir(out, "raw.xz", parts, 10 << 20) == scratch.MEMORY_DIR
    assert qemu.raw_image_dir(out, "raw", parts, 10 << 20) == out   # the output itself
    free = scratch.free_bytes(scratch.MEMORY_DIR)
    assert qemu.raw_image_dir(out, "qcow2", parts, free) == out
    # the filesystems' own metadata counts too
    assert qemu.raw_image_dir(out, "qcow2", [Part(free // 512 * 22)], 1 << 20) == out
