"""Debian 13 arm64, built on this (x86) host under emulation, booted on qemu's arm64 `virt`.

`samples/debian13-arm64-qcow2.json` is the generator's `--suite trixie --arch
arm64 --boot uefi` manifest: its dpkg stage runs the arm64 maintainer scripts
under qemu-user-static (the stage's `emulation` option). The image gets the
report stage of bootvm, is built once, checked from outside (the tree's
programs are AArch64 ELF files, the ESP holds the aa64 boot chain) and booted
with AAVMF (qemu-system-aarch64, TCG) to the same report the amd64 boot
tests check.
"""

import os
import struct
import subprocess
import time

import pytest

import bootvm
import debian_samples
from conftest import REPO, import_program, run_osbuild
from osbuild.meta import emulates

SAMPLE = os.path.join(REPO, "samples", "debian13-arm64-qcow2.json")
TOOL = import_program(os.path.join(REPO, "tools", "osbuild-debian-manifest"), "debian_manifest")
EM_AARCH64, EM_X86_64 = 183, 62

pytestmark = bootvm.MARKS + [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/usr/bin/qemu-aarch64-static"),
                       reason="needs qemu-user-static"),
    pytest.mark.skipif(not bootvm.have_firmware("aavmf"),
                       reason="needs qemu-system-arm and qemu-efi-aarch64 (AAVMF)"),
]
TIMES = {}
# TCG emulating arm64 on a shared 2-core host is several times slower than the
# amd64 boots: systemd's default 90 s for devices and services is not enough.
SLOW_MACHINE = ("mkdir -p etc/systemd/system.conf.d\n"
                "printf '[Manager]\\nDefaultTimeoutStartSec=900s\\n"
                "DefaultDeviceTimeoutSec=900s\\n' "
                "> etc/systemd/system.conf.d/osbuild-test-slow.conf\n")


def elf_machine(path):
    """e_machine of the ELF file at `path`."""
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF", path
    return struct.unpack("<H", header[18:20])[0]


def pe_machine(data):
    """The COFF machine field of a PE image (0xaa64: arm64)."""
    offset = struct.unpack("<I", data[0x3c:0x40])[0]
    assert data[offset:offset + 4] == b"PE\0\0"
    return struct.unpack("<H", data[offset + 4:offset + 6])[0]


@pytest.fixture(name="image", scope="module")
def image_fixture(tmp_path_factory):
    """{"image", "tree", "workdir", "result"} of the arm64 build."""
    base = tmp_path_factory.mktemp("arm64")
    store, out = base / "store", base / "out"
    manifest = bootvm.with_report(debian_samples.manifest_path(os.path.basename(SAMPLE)))
    manifest["pipeline"]["stages"].append(
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": SLOW_MACHINE}})
    t0 = time.monotonic()
    res = run_osbuild(manifest, store, "--output-directory", out, timeout=3600)
    TIMES["build"] = time.monotonic() - t0
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    tree = os.path.join(store, "refs", res.json["tree_id"])
    yield {"image": str(out / "disk.qcow2"), "tree": tree, "workdir": str(base),
           "result": res.json}
    print("Debian 13 arm64 timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMES.items()))


def test_arm64_tree_is_arm64_and_assembler_native(image):
    """The image's programs are AArch64; only the dpkg stage was emulated, so the
    other stages and the assembler (which succeeded) ran the build root's x86 tools."""
    for path in ("usr/bin/bash", "usr/bin/dpkg", "usr/lib/systemd/systemd",
                 "usr/sbin/mkfs.ext4"):
        assert elf_machine(os.path.join(image["tree"], path)) == EM_AARCH64, path
    assert elf_machine("/usr/sbin/mkfs.ext4") == EM_X86_64
    res = image["result"]
    emulated = [s["name"] for s in res["stages"] if "emulation" in s["options"]]
    assert emulated == ["org.osbuild.dpkg"]
    assert not emulates(REPO, "assemblers", "org.osbuild.qemu")
    assert res["assembler"]["success"]
    raw = os.path.join(image["workdir"], "disk.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", image["image"], raw], check=True)
    try:   # the ESP starts at 1 MiB
        data = subprocess.run(["mtype", "-i", f"{raw}@@1M", "::/EFI/BOOT/BOOTAA64.EFI"],
                              capture_output=True, check=True).stdout
    finally:
        os.unlink(raw)
    assert pe_machine(data) == 0xaa64


def test_arm64_boots_under_aavmf(image):
    """The image boots on qemu-system-aarch64 -M virt with AAVMF and reports what the
    amd64 UEFI boot test checks."""
    workdir = os.path.join(image["workdir"], "boot")
    code, elapsed, console, report = bootvm.boot(image["image"], workdir, "aavmf",
                                                 timeout=max(bootvm.BOOT_TIMEOUT, 1800))
    TIMES["boot"] = elapsed
    print(f"arm64 under AAVMF: power-off after {elapsed:.1f}s")
    assert code is not None, f"no power-off within {bootvm.BOOT_TIMEOUT}s:\n{console[-4000:]}"
    assert "OSBUILD-REPORT-END" in report, f"no report (qemu exit {code}):\n{console[-4000:]}"
    info = bootvm.parse_report(report)
    # the getty on the serial console (its prompt may not reach the console before power-off)
    assert "serial-getty@ttyAMA0.service" in info["getty"].split(), info["getty"]
    assert info["machine"] == "aarch64"
    assert info["root"].split() == ["/dev/vda2", "ext4"]
    assert info["esp"].split() == ["/dev/vda1", "vfat"]
    assert f"root=UUID={TOOL.DEFAULT_UUID}" in info["cmdline"]
    assert "console=ttyAMA0" in info["cmdline"]
    assert info["failed"].strip() == "", f"failed units: {info['failed']}"
    assert info["fsck"] == "/usr/sbin/fsck.ext4" and info["resize2fs"]
    assert info["dpkg-audit"] == "0"
    assert info["firmware"] == "uefi"
    assert info["secureboot"] in ("0", "none")
    esp_files = info["esp-files"].split()
    for name in ("./EFI/BOOT/BOOTAA64.EFI", "./EFI/BOOT/grubaa64.efi", "./EFI/BOOT/mmaa64.efi",
                 "./EFI/debian/grub.cfg", "./EFI/debian/shimaa64.efi"):
        assert name in esp_files, esp_files
    assert code == 0
