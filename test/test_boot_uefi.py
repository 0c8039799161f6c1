"""Debian 13 images booting under UEFI, Secure Boot and BIOS, each checked from inside.

`samples/debian13-qcow2.json` (hybrid: BIOS boot partition, ESP, root) gets
the report stage of bootvm and is built once; the UEFI-only image is the same
tree with the generator's `--boot uefi` layout (no BIOS boot partition, no
BIOS GRUB), built from the same store, so only its assembler runs. The UEFI
image boots under OVMF and under OVMF with Secure Boot (Microsoft keys
enrolled); the hybrid image boots under SeaBIOS and under OVMF.
"""

import copy
import os
import time

import pytest

import bootvm
import debian_samples
from conftest import REPO, import_program, run_osbuild

TOOL = import_program(os.path.join(REPO, "tools", "osbuild-debian-manifest"), "debian_manifest")
ROOT_UUID = TOOL.DEFAULT_UUID

pytestmark = bootvm.MARKS
TIMES = {}


def uefi_variant(manifest):
    """The same stages with the generator's `--boot uefi` assembler."""
    args = TOOL.parse_args(["--suite", "trixie", "--boot", "uefi"])
    filesystems, assembler = TOOL.layout(args)
    fstab = next(s for s in manifest["pipeline"]["stages"] if s["name"] == "org.osbuild.fstab")
    # the tree is shared only if uefi and hybrid images need the same configuration
    assert fstab["options"]["filesystems"] == filesystems
    out = copy.deepcopy(manifest)
    out["pipeline"]["assembler"]["options"] = dict(assembler, filename="uefi.qcow2")
    return out


@pytest.fixture(name="images", scope="module")
def images_fixture(tmp_path_factory):
    """{"hybrid": path, "uefi": path} built through one store."""
    base = tmp_path_factory.mktemp("debian13")
    store, out = base / "store", base / "out"
    hybrid = bootvm.with_report(debian_samples.manifest_path("debian13-qcow2.json"))
    images = {}
    for name, manifest in (("hybrid", hybrid), ("uefi", uefi_variant(hybrid))):
        t0 = time.monotonic()
        res = run_osbuild(manifest, store, "--output-directory", out)
        TIMES[f"build {name}"] = time.monotonic() - t0
        assert res.returncode == 0, f"{name}: {res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        ran = [s["name"] for s in res.json["stages"]]
        if name == "uefi":
            assert ran == [], f"the UEFI image should reuse the hybrid tree, ran {ran}"
        filename = manifest["pipeline"]["assembler"]["options"]["filename"]
        images[name] = str(out / filename)
        assert os.path.exists(images[name])
    images["workdir"] = str(base)
    yield images
    print("Debian 13 timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMES.items()))


def boot_and_check(images, image, firmware, root, esp):
    """Boot `image` with `firmware`; assert the report; return it."""
    if not bootvm.have_firmware(firmware):
        pytest.skip(f"needs OVMF ({bootvm.OVMF}; apt-get install ovmf)")
    workdir = os.path.join(images["workdir"], f"{os.path.basename(image)}-{firmware}")
    code, elapsed, console, report = bootvm.boot(images[image], workdir, firmware)
    TIMES[f"boot {image}/{firmware}"] = elapsed
    print(f"{image} under {firmware}: power-off after {elapsed:.1f}s")
    assert code is not None, f"no power-off within {bootvm.BOOT_TIMEOUT}s:\n{console[-4000:]}"
    assert "OSBUILD-REPORT-END" in report, f"no report (qemu exit {code}):\n{console[-4000:]}"
    info = bootvm.parse_report(report)
    assert info["root"].split() == [root, "ext4"]
    assert info["esp"].split() == [esp, "vfat"]
    assert f"root=UUID={ROOT_UUID}" in info["cmdline"]
    assert info["failed"].strip() == "", f"failed units: {info['failed']}"
    assert info["fsck"] == "/usr/sbin/fsck.ext4" and info["resize2fs"]
    assert info["dpkg-audit"] == "0"
    assert info["firmware"] == ("bios" if firmware == "bios" else "uefi")
    esp_files = info["esp-files"].split()
    for name in ("./EFI/BOOT/BOOTX64.EFI", "./EFI/BOOT/grubx64.efi", "./EFI/BOOT/mmx64.efi",
                 "./EFI/debian/grub.cfg", "./EFI/debian/shimx64.efi"):
        assert name in esp_files, esp_files
    assert code == 0
    return info


def test_debian13_uefi(images):
    """The UEFI image (GPT: ESP, root) boots under OVMF, Secure Boot off."""
    info = boot_and_check(images, "uefi", "uefi", "/dev/vda2", "/dev/vda1")
    assert info["secureboot"] in ("0", "none")


def test_debian13_uefi_secure_boot(images):
    """The same image boots under OVMF's Secure Boot firmware with Microsoft's keys."""
    info = boot_and_check(images, "uefi", "secureboot", "/dev/vda2", "/dev/vda1")
    assert info["secureboot"] == "1"
    assert int(info["kernel-log-sb"]) >= 1


def test_debian13_hybrid_bios(images):
    """The hybrid image (BIOS boot partition, ESP, root) boots under SeaBIOS."""
    info = boot_and_check(images, "hybrid", "bios", "/dev/vda3", "/dev/vda2")
    assert info["secureboot"] == "none"


def test_debian13_hybrid_uefi(images):
    """The hybrid image boots under OVMF too."""
    boot_and_check(images, "hybrid", "uefi", "/dev/vda3", "/dev/vda2")
