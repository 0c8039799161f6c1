"""org.osbuild.qemu writes the same bytes for the same tree and options.

The tree is built into two stores at different times (so its files have
other inode numbers, change and access times); both images must be
identical, and hold the tree (checked with the kernel's view of them).
"""

import hashlib
import os
import time

import pytest

from assemblerlib import (assert_same_tree, attached, blkid, copy_esp_efi, manifest, mounted,
                          output_file, sfdisk_json, to_raw, tree_path, tree_stage)
from conftest import run_osbuild

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

MIB = 1024 * 1024
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"

# every file of the test tree gets one modification time: the tree is the same in every build
SAME_TIMES = {"name": "org.osbuild.script", "options": {
    "chroot": False, "script": "find . -exec touch -h -d @1600000000 {} +"}}


def layout(root_fs):
    """GPT: BIOS boot, ESP (vfat) at /boot/efi, /boot (ext4), root of type `root_fs`."""
    return {
        "bootloader": {"type": "grub2"}, "format": "qcow2", "filename": "repro.qcow2",
        "size": 320 * MIB, "ptuuid": "5a3c3a0e-5d0f-4a39-9a61-3f3c9a1d2b10", "pttype": "gpt",
        "partitions": [
            {"size": 2048, "type": BIOS_BOOT},
            {"size": 65536, "type": ESP,
             "filesystem": {"type": "vfat", "uuid": "1234-ABCD", "label": "ESP",
                            "mountpoint": "/boot/efi"}},
            {"size": 131072, "filesystem": {"type": "ext4", "label": "boot",
                                            "uuid": "0b6f7ef1-9a2e-4b8e-8c1d-2f5e6a7b8c9d",
                                            "mountpoint": "/boot"}},
            {"filesystem": {"type": root_fs, "uuid": "c0ffee00-1111-4222-8333-944455556666",
                            "mountpoint": "/"}}]}


def digest(path):
    """SHA-256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_twice(tmp_path, options):
    """The image of the same manifest built in two fresh stores, at different times."""
    desc = manifest([tree_stage(blob_mib=0), SAME_TIMES], "org.osbuild.qemu", options)
    results = []
    for name in ("first", "second"):
        store = tmp_path / name
        res = run_osbuild(desc, store)
        results.append((store, res, output_file(store, res, options["filename"])))
        time.sleep(1.1)                   # other clock seconds for everything written
    return results


@pytest.mark.parametrize("root_fs", ["ext4"])
def test_same_tree_same_image(tmp_path, root_fs):
    """Two builds of one tree give one image (ext4 root and /boot, vfat ESP)."""
    results = build_twice(tmp_path, layout(root_fs))
    store, res, image = results[0]
    image2 = results[1][2]
    assert digest(image) == digest(image2)
    # and it is the tree
    raw = to_raw(image, "qcow2", tmp_path)
    _, esp, boot, root = sfdisk_json(raw)["partitions"]
    tree = tree_path(store, res)
    with attached(raw, root["start"], root["size"]) as dev, mounted(dev) as mnt:
        assert blkid(dev)["UUID"] == "c0ffee00-1111-4222-8333-944455556666"
        assert_same_tree(tree, mnt, ignore=["/boot"])
        assert os.listdir(os.path.join(mnt, "boot")) == []
    with attached(raw, boot["start"], boot["size"]) as dev, mounted(dev) as mnt:
        assert_same_tree(os.path.join(tree, "boot"), mnt, ignore=["/efi"],
                         allowed_added=["/grub/i386-pc"])
        assert os.listdir(os.path.join(mnt, "efi")) == []
        assert len(os.listdir(os.path.join(mnt, "grub", "i386-pc"))) > 100
    with attached(raw, esp["start"], esp["size"]) as dev:
        out = copy_esp_efi(dev, tmp_path / "esp")
        assert (out / "EFI/BOOT/BOOTX64.EFI").read_text() == "efi\n"
