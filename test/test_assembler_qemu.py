"""org.osbuild.qemu: partitioned, bootable disk images, inspected with independent tools."""

import os
import shutil
import struct
import subprocess

import pytest

from assemblerlib import (GRUB_MARKER, assert_failed, assert_same_tree, attached, blkid,
                          boot_grub, copy_esp_efi, loops_on, manifest, mounted, mounts_under,
                          output_file, qemu_img_info, sfdisk_json, to_raw, tree_path, tree_stage)
from conftest import run_osbuild

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

MIB = 1024 * 1024
GRUB_PC = "/usr/lib/grub/i386-pc"
ROOT_UUID = "76a22bf4-f153-4541-b6c7-0332c0dfaeac"
BOOT_UUID = "08a41983-3328-4d1a-ae3c-1699e6d2a806"
GPT_ID = "29579f67-d390-43e7-bd96-dc8f5461171e"
ROOT_PARTUUID = "6264D520-3FB9-423F-8AB8-7A0A8E3D3562"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None


@pytest.fixture(name="store", scope="module")
def store_fixture(tmp_path_factory):
    """One store for the module: the trees are built once."""
    return tmp_path_factory.mktemp("qemu-assembler") / "store"


def build(store, options, grubdir="grub", blob_mib=1):
    """Build the test tree and assemble it with `options`."""
    return run_osbuild(manifest([tree_stage(grubdir, blob_mib)], "org.osbuild.qemu", options),
                       store)


def assert_clean(store, filename):
    """No loop device on the (uniquely named) image and no mount in the store is left."""
    assert loops_on(filename) == []
    assert mounts_under(store) == []


def check_grub_pc(raw, core_lba):
    """boot.img is in the MBR and the core image at `core_lba`, patched like grub-install."""
    with open(os.path.join(GRUB_PC, "boot.img"), "rb") as f:
        boot = f.read()
    with open(os.path.join(GRUB_PC, "diskboot.img"), "rb") as f:
        diskboot = f.read()
    with open(raw, "rb") as f:
        mbr = f.read(512)
        f.seek(core_lba * 512)
        core = f.read(512)
    assert mbr[510:512] == b"\x55\xaa"
    assert struct.unpack_from("<Q", mbr, 0x5c)[0] == core_lba
    # Apart from the patched fields, the boot code is boot.img's.
    assert mbr[:0x5c] == boot[:0x5c]
    assert mbr[0x68:440] == boot[0x68:440]
    assert core[:0x200 - 12] == diskboot[:0x200 - 12]
    assert struct.unpack_from("<Q", core, 0x200 - 12)[0] == core_lba + 1
    assert struct.unpack_from("<H", core, 0x200 - 4)[0] > 0


def test_mbr_ext4_qcow2_bootable(store, tmp_path):
    """The default layout: MBR, one bootable ext4 partition, GRUB for BIOS, qcow2."""
    size = 64 * MIB
    res = build(store, {"format": "qcow2", "filename": "osbt-mbr.qcow2", "size": size,
                        "ptuuid": "0x14fc63d2", "root_fs_uuid": ROOT_UUID})
    image = output_file(store, res, "osbt-mbr.qcow2")
    info = qemu_img_info(image)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == size

    raw = to_raw(image, "qcow2", tmp_path)
    table = sfdisk_json(raw)
    assert table["label"] == "dos"
    assert table["id"] == "0x14fc63d2"
    [part] = table["partitions"]
    assert (part["start"], part["size"], part["type"]) == (2048, size // 512 - 2048, "83")
    assert part.get("bootable") is True
    check_grub_pc(raw, 1)

    with attached(raw, part["start"], part["size"]) as dev:
        probe = blkid(dev)
        assert (probe["TYPE"], probe["UUID"]) == ("ext4", ROOT_UUID)
        features = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True,
                                  check=True).stdout
        assert "metadata_csum_seed" not in features and "orphan_file" not in features
        with mounted(dev) as mnt:
            assert_same_tree(tree_path(store, res), mnt, allowed_added=["/boot/grub/i386-pc"])
            assert os.path.isfile(os.path.join(mnt, "boot/grub/i386-pc/normal.mod"))
    assert_clean(store, "osbt-mbr.qcow2")

    if HAVE_QEMU:
        out = boot_grub(image, "qcow2")
        assert f"{GRUB_MARKER} prefix=(hd0,msdos1)/boot/grub" in out, out[-2000:]


def test_gpt_hybrid_multi_partition(store, tmp_path):
    """GPT with separate /boot (ext4), ESP (vfat), BIOS boot and xfs root; Fedora-style grub2."""
    size = 512 * MIB
    options = {
        "bootloader": {"type": "grub2"}, "format": "vmdk", "filename": "osbt-gpt.vmdk",
        "size": size, "ptuuid": GPT_ID, "pttype": "gpt",
        "partitions": [
            {"size": 131072, "filesystem": {"type": "ext4", "uuid": BOOT_UUID, "label": "boot",
                                            "mountpoint": "/boot"}},
            {"size": 65536, "type": ESP,
             "filesystem": {"type": "vfat", "uuid": "46BB-8120", "label": "EFI System Partition",
                            "mountpoint": "/boot/efi"}},
            {"size": 8192, "type": BIOS_BOOT, "bootable": True},
            {"type": LINUX, "uuid": ROOT_PARTUUID, "name": "root",
             "filesystem": {"type": "xfs", "uuid": ROOT_UUID, "label": "root",
                            "mountpoint": "/"}},
        ]}
    res = build(store, options, grubdir="grub2")
    image = output_file(store, res, "osbt-gpt.vmdk")
    info = qemu_img_info(image)
    assert info["format"] == "vmdk"
    assert info["virtual-size"] == size

    raw = to_raw(image, "vmdk", tmp_path)
    table = sfdisk_json(raw)
    assert table["label"] == "gpt"
    assert table["id"].lower() == GPT_ID
    parts = table["partitions"]
    layout = [(p["start"], p["size"], p["type"]) for p in parts]
    last = size // 512 - 34
    assert layout == [(2048, 131072, LINUX), (133120, 65536, ESP), (198656, 8192, BIOS_BOOT),
                      (206848, last - 206848 + 1, LINUX)]
    assert parts[2].get("attrs") == "LegacyBIOSBootable"
    assert (parts[3]["uuid"], parts[3]["name"]) == (ROOT_PARTUUID, "root")
    check_grub_pc(raw, 198656)

    tree = tree_path(store, res)
    boot, esp, _, root = parts
    with attached(raw, root["start"], root["size"]) as dev:
        assert {k: blkid(dev)[k] for k in ("TYPE", "UUID", "LABEL")} == \
            {"TYPE": "xfs", "UUID": ROOT_UUID, "LABEL": "root"}
        with mounted(dev) as mnt:
            assert_same_tree(tree, mnt, ignore=["/boot"])
            assert os.listdir(os.path.join(mnt, "boot")) == []
    with attached(raw, boot["start"], boot["size"]) as dev:
        assert {k: blkid(dev)[k] for k in ("TYPE", "UUID", "LABEL")} == \
            {"TYPE": "ext4", "UUID": BOOT_UUID, "LABEL": "boot"}
        with mounted(dev) as mnt:
            assert_same_tree(os.path.join(tree, "boot"), mnt, ignore=["/efi"],
                             allowed_added=["/grub2/i386-pc"])
    with attached(raw, esp["start"], esp["size"]) as dev:
        probe = blkid(dev)
        assert (probe["TYPE"], probe["UUID"], probe["LABEL"]) == ("vfat", "46BB-8120",
                                                                  "EFI System")
        # No vfat driver needed: read it back with mtools.
        out = copy_esp_efi(dev, tmp_path / "esp")
        assert (out / "EFI/BOOT/BOOTX64.EFI").read_text() == "efi\n"
        assert (out / "EFI/debian/grub.cfg").read_text() == "cfg\n"
    assert_clean(store, "osbt-gpt.vmdk")

    if HAVE_QEMU:
        out = boot_grub(image, "vmdk")
        assert f"{GRUB_MARKER} prefix=(hd0,gpt1)/grub2" in out, out[-2000:]


def test_mbr_xfs_root_raw_bootable(store):
    """root_fs_type xfs: GRUB 2.06 must read the xfsprogs defaults of the build root."""
    size = 320 * MIB
    res = build(store, {"format": "raw", "filename": "osbt-xfs.img", "size": size,
                        "root_fs_uuid": ROOT_UUID, "root_fs_type": "xfs"})
    image = output_file(store, res, "osbt-xfs.img")
    assert os.stat(image).st_size == size
    assert qemu_img_info(image)["format"] == "raw"
    [part] = sfdisk_json(image)["partitions"]
    with attached(image, part["start"], part["size"]) as dev:
        probe = blkid(dev)
        assert (probe["TYPE"], probe["UUID"]) == ("xfs", ROOT_UUID)
        with mounted(dev) as mnt:
            assert_same_tree(tree_path(store, res), mnt, allowed_added=["/boot/grub/i386-pc"])
    assert_clean(store, "osbt-xfs.img")
    if HAVE_QEMU:
        out = boot_grub(image, "raw")
        assert f"{GRUB_MARKER} prefix=(hd0,msdos1)/boot/grub" in out, out[-2000:]


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vdi", "vpc"])
def test_formats(store, tmp_path, fmt):
    """Every format converts, keeps the exact virtual size and the data."""
    size = 48 * MIB
    filename = f"osbt-fmt.{fmt}"
    res = build(store, {"format": fmt, "filename": filename, "size": size,
                        "root_fs_uuid": ROOT_UUID, "bootloader": {"type": "none"}})
    image = output_file(store, res, filename)
    assert os.listdir(os.path.dirname(image)) == [filename]
    probed = qemu_img_info(image)["format"]
    if fmt == "vpc":
        # A fixed VHD is raw data plus a footer; only the footer tells it apart.
        assert probed == "raw"
        with open(image, "rb") as f:
            f.seek(-512, os.SEEK_END)
            assert f.read(8) == b"conectix"
    else:
        assert probed == fmt
    assert qemu_img_info(image, fmt)["virtual-size"] == size
    raw = to_raw(image, fmt, tmp_path)
    with open(raw, "rb") as f:
        assert f.read(440) == bytes(440)            # no bootloader was asked for
    [part] = sfdisk_json(raw)["partitions"]
    with attached(raw, part["start"], part["size"]) as dev:
        assert blkid(dev)["UUID"] == ROOT_UUID
        with mounted(dev) as mnt:
            assert_same_tree(tree_path(store, res), mnt)


def test_gpt_default_layout_bootable(store, tmp_path):
    """GPT without partitions: a BIOS boot partition for GRUB, then the root filesystem."""
    size = 64 * MIB
    res = build(store, {"format": "qcow2", "filename": "osbt-gptdef.qcow2", "size": size,
                        "pttype": "gpt", "ptuuid": GPT_ID, "root_fs_uuid": ROOT_UUID})
    image = output_file(store, res, "osbt-gptdef.qcow2")
    raw = to_raw(image, "qcow2", tmp_path)
    table = sfdisk_json(raw)
    assert table["label"] == "gpt"
    layout = [(p["start"], p["size"], p["type"]) for p in table["partitions"]]
    assert layout == [(2048, 2048, BIOS_BOOT), (4096, size // 512 - 34 - 4096 + 1, LINUX)]
    check_grub_pc(raw, 2048)
    with attached(raw, 4096, layout[1][1]) as dev:
        assert blkid(dev)["UUID"] == ROOT_UUID
    assert_clean(store, "osbt-gptdef.qcow2")
    if HAVE_QEMU:
        out = boot_grub(image, "qcow2")
        assert f"{GRUB_MARKER} prefix=(hd0,gpt2)/boot/grub" in out, out[-2000:]


def test_sample_f30_uefi_layout(store, tmp_path):
    """The original's UEFI sample layout (GPT, no BIOS boot partition) still gets GRUB."""
    options = {
        "format": "qcow2", "filename": "osbt-uefi.qcow2", "size": 128 * MIB, "ptuuid": GPT_ID,
        "pttype": "gpt",
        "partitions": [
            {"start": 2048, "size": 65536, "type": ESP,
             "filesystem": {"type": "vfat", "uuid": "46BB-8120", "label": "EFI System Partition",
                            "mountpoint": "/boot/efi"}},
            {"start": 67584, "filesystem": {"type": "ext4", "uuid": ROOT_UUID,
                                            "mountpoint": "/"}},
        ]}
    res = build(store, options)
    raw = to_raw(output_file(store, res, "osbt-uefi.qcow2"), "qcow2", tmp_path)
    parts = sfdisk_json(raw)["partitions"]
    assert [(p["start"], p["size"]) for p in parts] == [(2048, 65536),
                                                        (67584, 128 * 2048 - 34 - 67584 + 1)]
    check_grub_pc(raw, 34)
    assert_clean(store, "osbt-uefi.qcow2")


BASE = {"format": "qcow2", "size": 16 * MIB, "root_fs_uuid": ROOT_UUID}
EXT4 = {"type": "ext4", "uuid": ROOT_UUID, "mountpoint": "/"}


@pytest.mark.parametrize("options,message", [
    ({"size": 4 * MIB, "bootloader": {"type": "none"}}, "increase size"),
    ({"partitions": [{"start": 2048, "size": 8192, "filesystem": EXT4},
                     {"start": 8192, "size": 4096}]}, "overlap"),
    ({"partitions": [{"start": 2048, "size": 40000, "filesystem": EXT4}]}, "outside"),
    ({"partitions": [{"size": 2048, "filesystem": EXT4}] + [{"size": 100}] * 4},
     "at most 4"),
    ({"partitions": [{"size": 2048, "filesystem": dict(EXT4, mountpoint="/srv")}]},
     "mounted at '/'"),
    ({"pttype": "gpt", "ptuuid": "0x1234"}, "does not fit a GPT"),
    ({"bootloader": {"type": "grub2", "platform": "powerpc-ieee1275"}}, "powerpc-ieee1275"),
    ({"bootloader": {"type": "zipl"}}, "zipl"),
    ({"format": "iso"}, "format"),
    ({"filename": "../escape.qcow2"}, "filename"),
    ({"filename": "sub/slashed.qcow2"}, "filename"),
], ids=["tree-too-large", "overlap", "out-of-range", "mbr-5", "no-root", "ptuuid",
        "ppc-tools-missing", "zipl-missing", "unknown-format", "dotdot", "slash"])
def test_bad_input(store, request, options, message):
    """Bad options: one clear message, no artifact, no loop device or mount left."""
    opts = dict(BASE, filename=f"osbt-bad-{request.node.callspec.id}.qcow2")
    opts.update(options)
    res = build(store, opts, blob_mib=6)
    assert_failed(store, res, message, os.path.basename(opts["filename"]))


def test_filesystem_full_cleans_up(store):
    """The early size check passes but the copy runs out of space: loops and mounts go away."""
    opts = dict(BASE, filename="osbt-full.qcow2", size=8 * MIB, bootloader={"type": "none"})
    res = build(store, opts, blob_mib=6)
    assert_failed(store, res, "copying the tree into the image failed", "osbt-full.qcow2")
