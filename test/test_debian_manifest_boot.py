"""tools/osbuild-debian-manifest --boot bios|uefi|hybrid, its package set, and the samples."""

import json
import os
import re
import subprocess

import jsonschema
import pytest

from conftest import REPO, import_program
from test_debian_manifest import has_apt_pkg, stage_schema

TOOL = os.path.join(REPO, "tools", "osbuild-debian-manifest")
SYSTEM_PYTHON = "/usr/bin/python3"
tool = import_program(TOOL, "debian_manifest_boot_tool")
PKGS = [{"name": "a", "version": "1", "arch": "amd64", "url": "http://x/a.deb", "size": 1,
         "sha256": "a" * 64, "essential": True}]


def manifest_for(*argv):
    """The manifest the tool writes for `argv` and one fake package."""
    return tool.build_manifest(PKGS, tool.parse_args(list(argv)))


def validate(manifest):
    """Every stage's and the assembler's options against their schemas."""
    for item in manifest["pipeline"]["stages"] + [manifest["pipeline"]["assembler"]]:
        kind = "assemblers" if item["name"] == "org.osbuild.qemu" else "stages"
        jsonschema.validate(item["options"], stage_schema(kind, item["name"]))


def stage_options(manifest, name):
    """The options of stage `name`."""
    return next(s["options"] for s in manifest["pipeline"]["stages"] if s["name"] == name)


def test_default_is_hybrid():
    """GPT: BIOS boot partition, ESP (vfat, /boot/efi, in fstab), root; GRUB for BIOS and UEFI."""
    manifest = manifest_for()
    validate(manifest)
    asm = manifest["pipeline"]["assembler"]["options"]
    assert asm["pttype"] == "gpt" and asm["bootloader"] == {"type": "grub2"}
    types = [p.get("type") for p in asm["partitions"]]
    assert types == [tool.BIOS_BOOT_GUID, tool.ESP_GUID, None]
    esp = asm["partitions"][1]["filesystem"]
    assert esp == {"type": "vfat", "uuid": tool.DEFAULT_ESP_UUID, "mountpoint": "/boot/efi",
                   "label": "ESP"}
    assert asm["partitions"][2]["filesystem"]["mountpoint"] == "/"
    assert stage_options(manifest, "org.osbuild.grub2")["uefi"] == {"vendor": "debian",
                                                                    "arch": "x64"}
    fstab = stage_options(manifest, "org.osbuild.fstab")["filesystems"]
    assert [(f["path"], f["vfs_type"], f["uuid"]) for f in fstab] == [
        ("/", "ext4", tool.DEFAULT_UUID), ("/boot/efi", "vfat", tool.DEFAULT_ESP_UUID)]
    assert "ahci" in stage_options(manifest, "org.osbuild.dpkg")["initramfs"]["add_modules"]


def test_uefi_has_no_bios_grub():
    """GPT: ESP and root, no BIOS boot partition, no BIOS GRUB."""
    manifest = manifest_for("--boot", "uefi",
                            "--ptuuid", "D209C89E-EA5E-4FBD-B161-B461CCE297E0")
    validate(manifest)
    asm = manifest["pipeline"]["assembler"]["options"]
    assert asm["bootloader"] == {"type": "none"}
    assert asm["ptuuid"] == "d209c89e-ea5e-4fbd-b161-b461cce297e0"
    assert [p.get("type") for p in asm["partitions"]] == [tool.ESP_GUID, None]
    assert "uefi" in stage_options(manifest, "org.osbuild.grub2")


def test_bios_is_todays_mbr_image():
    """MBR, one root partition, GRUB for BIOS, no ESP."""
    manifest = manifest_for("--boot", "bios")
    validate(manifest)
    asm = manifest["pipeline"]["assembler"]["options"]
    assert asm["pttype"] == "mbr" and asm["ptuuid"] == tool.DEFAULT_MBR_ID
    assert "partitions" not in asm and asm["root_fs_uuid"] == tool.DEFAULT_UUID
    assert "uefi" not in stage_options(manifest, "org.osbuild.grub2")
    assert len(stage_options(manifest, "org.osbuild.fstab")["filesystems"]) == 1


def test_package_names_add_to_defaults_or_replace_them():
    """PACKAGE arguments add to the defaults; --no-default-packages replaces them."""
    names, optional = tool.package_names(tool.parse_args(["vim"]))
    assert names[:len(tool.DEFAULT_PACKAGES)] == tool.DEFAULT_PACKAGES
    assert "e2fsprogs" in names and "grub-efi-amd64-bin" in names and "dosfstools" in names
    assert names[-1] == "vim"
    assert optional == ["grub-efi-amd64-signed", "shim-signed"]
    names, optional = tool.package_names(tool.parse_args(["--boot", "bios", "vim"]))
    assert names == tool.DEFAULT_PACKAGES + ["vim"] and optional == []
    names, optional = tool.package_names(
        tool.parse_args(["--no-default-packages", "--boot", "uefi", "--arch", "arm64",
                         "linux-image-arm64", "shim-signed=1.0"]))
    assert names == ["grub-efi-arm64-bin", "dosfstools", "linux-image-arm64", "shim-signed=1.0"]
    assert optional == ["grub-efi-arm64-signed"]
    names, _ = tool.package_names(tool.parse_args(["--boot", "uefi", "--arch", "arm64"]))
    assert names[0] == "linux-image-arm64"


@pytest.mark.parametrize("argv, message", [
    (["--boot", "efi"], "invalid choice"),
    (["--boot", "hybrid", "--arch", "arm64"], "--boot hybrid needs a BIOS architecture"),
    (["--boot", "uefi", "--arch", "s390x"], "no UEFI support for 's390x'"),
    (["--no-default-packages"], "--no-default-packages needs PACKAGE arguments"),
    (["--esp-uuid", "nope"], "invalid ESP volume id"),
    (["--boot", "bios", "--ptuuid", "d209c89e-ea5e-4fbd-b161-b461cce297e0"], "MBR disk id"),
    (["--ptuuid", "0x1234"], "a GPT disk id is a UUID"),
])
def test_argument_errors(argv, message):
    """A bad combination is a one-line usage error, exit 2."""
    proc = subprocess.run([SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else "python3", TOOL,
                           *argv, "-o", "/nonexistent/never"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("sample, suite", [("debian13-qcow2.json", "trixie"),
                                           ("debian12-qcow2.json", "bookworm")])
def test_samples_are_hybrid(sample, suite):
    """Both samples are hybrid images with the boot packages, e2fsprogs and dosfstools."""
    with open(os.path.join(REPO, "samples", sample), encoding="utf-8") as f:
        manifest = json.load(f)
    validate(manifest)
    urls = manifest["sources"]["org.osbuild.files"]["urls"].values()
    names = {re.sub(r"_.*", "", u.rsplit("/", 1)[1]) for u in urls}
    for wanted in ("linux-image-amd64", "e2fsprogs", "dosfstools", "shim-signed",
                   "grub-efi-amd64-signed", "shim-helpers-amd64-signed", "usr-is-merged"):
        assert wanted in names, wanted
    sources = stage_options(manifest, "org.osbuild.dpkg")["apt_sources"]
    suites = {s for entry in sources for s in entry["suites"]}
    assert {suite, f"{suite}-updates", f"{suite}-security"} <= suites
    asm = manifest["pipeline"]["assembler"]["options"]
    assert [p.get("type") for p in asm["partitions"]] == [tool.BIOS_BOOT_GUID, tool.ESP_GUID,
                                                          None]


@pytest.mark.skipif(not has_apt_pkg(), reason="needs /usr/bin/python3 with python3-apt")
def test_missing_optional_package_is_skipped(tmp_path):
    """An optional boot package the archive lacks is skipped with a note; needed ones are not."""
    out = tmp_path / "m.json"
    lists = tmp_path / "lists"
    lists.mkdir()
    proc = subprocess.run([SYSTEM_PYTHON, "-c", f"""
import importlib.machinery, importlib.util, sys
loader = importlib.machinery.SourceFileLoader("t", {TOOL!r})
spec = importlib.util.spec_from_loader("t", loader)
t = importlib.util.module_from_spec(spec)
loader.exec_module(t)
t.boot_packages = lambda arch, boot: (["dosfstools"], ["no-such-package-osbuild"])
sys.exit(t.main(["--boot", "uefi", "--apt-lists", {str(lists)!r}, "-o", {str(out)!r}]))
"""], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipping no-such-package-osbuild" in proc.stderr
    urls = json.loads(out.read_text())["sources"]["org.osbuild.files"]["urls"].values()
    assert any("/dosfstools_" in u for u in urls)


def test_build_image_prints_both_boot_commands():
    """make image's tool prints a BIOS and a UEFI command line for the hybrid sample."""
    build_image = import_program(os.path.join(REPO, "tools", "build-image"), "build_image_tool")
    with open(os.path.join(REPO, "samples", "debian13-qcow2.json"), encoding="utf-8") as f:
        options = json.load(f)["pipeline"]["assembler"]["options"]
    commands = dict(build_image.boot_commands(options, "/o/disk.qcow2"))
    assert sorted(commands) == ["BIOS", "UEFI"]
    assert "-drive file=/o/disk.qcow2,format=qcow2,snapshot=on" in commands["BIOS"]
    assert "pflash" not in commands["BIOS"]
    uefi = commands["UEFI"]
    assert uefi.startswith("cp /usr/share/OVMF/OVMF_VARS_4M.fd /o/OVMF_VARS.fd && ")
    assert "-machine q35" in uefi and "readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" in uefi
    uefi_only = manifest_for("--boot", "uefi")["pipeline"]["assembler"]["options"]
    assert [f for f, _ in build_image.boot_commands(uefi_only, "/o/x.qcow2")] == ["UEFI"]
    bios = manifest_for("--boot", "bios")["pipeline"]["assembler"]["options"]
    assert [f for f, _ in build_image.boot_commands(bios, "/o/x.qcow2")] == ["BIOS"]
