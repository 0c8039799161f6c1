"""tools/osbuild-debian-manifest --arch arm64: an image for qemu's arm64 `virt` under UEFI."""

import json
import os
import subprocess

import pytest

from conftest import REPO
from test_debian_manifest_boot import TOOL, manifest_for, stage_options, validate

SYSTEM_PYTHON = "/usr/bin/python3"
SAMPLE = os.path.join(REPO, "samples", "debian13-arm64-qcow2.json")


def test_arm64_uefi_manifest():
    """Emulated dpkg, virtio initramfs, ttyAMA0 console and getty, GPT with the ESP,
    aa64 boot chain; valid against every schema."""
    manifest = manifest_for("--suite", "trixie", "--arch", "arm64", "--boot", "uefi")
    validate(manifest)
    dpkg = stage_options(manifest, "org.osbuild.dpkg")
    assert dpkg["emulation"] == "aarch64"
    modules = dpkg["initramfs"]["add_modules"]
    assert {"virtio_pci", "virtio_blk", "virtio_mmio", "ext4"} <= set(modules)
    assert not {"ata_piix", "ahci"} & set(modules)
    grub = stage_options(manifest, "org.osbuild.grub2")
    assert grub["kernel_opts"].split()[-1] == "console=ttyAMA0,115200n8"
    assert "ttyS0" not in grub["kernel_opts"]
    assert grub["uefi"] == {"vendor": "debian", "arch": "aa64"}
    assert stage_options(manifest, "org.osbuild.systemd")["enabled_services"] == \
        ["serial-getty@ttyAMA0.service"]
    asm = manifest["pipeline"]["assembler"]["options"]
    assert asm["pttype"] == "gpt" and asm["bootloader"] == {"type": "none"}
    assert [p["name"] for p in asm["partitions"]] == ["EFI System", "root"]


def test_amd64_manifest_unchanged_by_arm64():
    """amd64 keeps its PC modules, ttyS0 and no emulation (its ids stay)."""
    manifest = manifest_for("--suite", "trixie", "--boot", "uefi")
    dpkg = stage_options(manifest, "org.osbuild.dpkg")
    assert "emulation" not in dpkg and "ahci" in dpkg["initramfs"]["add_modules"]
    assert "console=ttyS0,115200n8" in stage_options(manifest, "org.osbuild.grub2")["kernel_opts"]


@pytest.mark.parametrize("boot", ["bios", "hybrid"])
def test_arm64_bios_refused(boot):
    """--boot bios/hybrid with arm64: a one-line usage error naming the way out."""
    proc = subprocess.run([SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else "python3", TOOL,
                           "--arch", "arm64", "--boot", boot, "-o", "/nonexistent/never"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert f"--boot {boot} needs a BIOS architecture" in proc.stderr
    assert "use --boot uefi for arm64" in proc.stderr and "Traceback" not in proc.stderr


def test_arm64_sample_is_generated():
    """The checked-in sample: all arm64 packages, the generator's stages and layout."""
    with open(SAMPLE, encoding="utf-8") as f:
        sample = json.load(f)
    urls = sample["sources"]["org.osbuild.files"]["urls"].values()
    assert all(u.endswith(("_arm64.deb", "_all.deb")) for u in urls)
    names = {u.rsplit("/", 1)[1].split("_")[0] for u in urls}
    assert {"shim-signed", "grub-efi-arm64-signed", "linux-image-arm64"} <= names
    fresh = manifest_for("--suite", "trixie", "--arch", "arm64", "--boot", "uefi")
    assert sample["pipeline"]["stages"][1:] == fresh["pipeline"]["stages"][1:]
    assert sample["pipeline"]["assembler"] == fresh["pipeline"]["assembler"]
    validate(sample)


def test_build_image_prints_the_aavmf_command():
    """tools/build-image boots an arm64 image on qemu-system-aarch64 -M virt with AAVMF."""
    from conftest import import_program  # pylint: disable=import-outside-toplevel
    build_image = import_program(os.path.join(REPO, "tools", "build-image"), "build_image_arm")
    with open(SAMPLE, encoding="utf-8") as f:
        options = json.load(f)["pipeline"]["assembler"]["options"]
    [(firmware, command)] = build_image.boot_commands(options, "/o/disk.qcow2", "aa64")
    assert firmware == "UEFI (arm64)"
    assert command.startswith("cp /usr/share/AAVMF/AAVMF_VARS.fd /o/AAVMF_VARS.fd && "
                              "qemu-system-aarch64 -M virt ")
    assert "file=/usr/share/AAVMF/AAVMF_CODE.fd" in command and "if=virtio" in command
