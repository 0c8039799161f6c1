"""org.osbuild.qemu writing ext4 straight from the tree (mkfs.ext4 -d + debugfs): hostile trees.

The tree's names reach debugfs commands (entries below another
filesystem's mountpoint, here /boot, are removed by name from the root
filesystem). A name that could end a
command and start another must not: such trees are copied by the host path
instead, and the image holds exactly the tree.
"""

import os

import pytest

from assemblerlib import (assert_same_tree, attached, manifest, mounted, output_file,
                          sfdisk_json, to_raw, tree_path)
from conftest import run_osbuild

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

MIB = 1024 * 1024
BOOT_UUID = "5f1c2d3e-4a5b-4c6d-8e7f-901a2b3c4d5e"
ROOT_UUID = "3e6c5b1a-0d5e-4f7a-9c1b-2a3b4c5d6e7f"

OPTIONS = {
    "bootloader": {"type": "none"}, "format": "raw", "filename": "direct.raw",
    "size": 160 * MIB, "pttype": "gpt",
    "partitions": [
        {"size": 32768,
         "filesystem": {"type": "ext4", "uuid": BOOT_UUID, "mountpoint": "/boot"}},
        {"filesystem": {"type": "ext4", "uuid": ROOT_UUID, "mountpoint": "/"}}]}

# Names below /boot (removed from the root filesystem by name) that try
# to smuggle a second debugfs command: each would delete /victim (debugfs
# works in the filesystem's root directory; names hold no "/").
HOSTILE = ['x"\nrm "victim', 'y\nrm victim', 'w\\"\nrm victim\n']


def script(names):
    """A tree with /victim and the given names in /boot."""
    lines = ["import os",
             "os.makedirs('etc'); os.makedirs('boot/grub')",
             "open('victim', 'w').write('still here')",
             "open('boot/grub/ok', 'w').write('boot')"]
    lines += [f"open(os.path.join('boot', {name!r}), 'w').write('n')" for name in names]
    return {"name": "org.osbuild.script", "options": {
        "chroot": False, "script": "python3 - <<'EOF'\n" + "\n".join(lines) + "\nEOF\n"}}


def build(tmp_path, names):
    """Assemble the tree; returns (store, result, raw image)."""
    store = tmp_path / "store"
    res = run_osbuild(manifest([script(names)], "org.osbuild.qemu", OPTIONS), store)
    return store, res, output_file(store, res, "direct.raw")


@pytest.mark.parametrize("names", [[], HOSTILE], ids=["plain", "hostile"])
def test_root_holds_the_tree_and_nothing_of_boot(tmp_path, names):
    """The root filesystem is the tree, /boot empty in it, /boot the tree's /boot; no name
    ran a command."""
    store, res, image = build(tmp_path, names)
    log = res.json["assembler"]["output"]
    if names:
        assert "the host copies the tree into the filesystems instead" in log, log[-2000:]
    else:
        assert "written from the tree" in log, log[-2000:]
    raw = to_raw(image, "raw", tmp_path)
    boot, root = sfdisk_json(raw)["partitions"]
    tree = tree_path(store, res)
    with attached(raw, root["start"], root["size"]) as dev, mounted(dev) as mnt:
        with open(os.path.join(mnt, "victim"), encoding="utf-8") as f:
            assert f.read() == "still here"
        assert os.listdir(os.path.join(mnt, "boot")) == []
        assert_same_tree(tree, mnt, ignore=["/boot"])
    with attached(raw, boot["start"], boot["size"]) as dev, mounted(dev) as mnt:
        assert_same_tree(os.path.join(tree, "boot"), mnt)
