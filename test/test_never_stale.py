"""`make image` (tools/build-image) on a sample whose pinned package is gone, then offline.

A copy of samples/debian13-qcow2.json pins a zstd version the archive never
had (a new, well-formed SHA-256 and URL): the archive answers 404 for it.
build-image must say so in one line, resolve the image against today's
archive, build it and keep the resolved manifest as output/manifest.json.
The image is checked (qemu-img check, the GPT with BIOS boot, ESP and root
partitions, the kernel and initramfs on the root filesystem) but not booted:
test_boot_uefi boots the manifest test/debian_samples.py resolves, which is
the same fresh manifest whenever the pinned sample is stale. Then the same
command runs without any network (`unshare --net`): it finds the last
resolved manifest's image in the store and finishes from there.
"""

import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import assemblerlib
import bootvm
from conftest import REPO
from osbuild import pinned

SAMPLE = os.path.join(REPO, "samples", "debian13-qcow2.json")
BUILD_IMAGE = os.path.join(REPO, "tools", "build-image")
GONE_LINE = ("pinned package zstd is no longer in the archive; "
             "building a freshly resolved manifest instead")

pytestmark = bootvm.MARKS + [
    pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs Debian's python3"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare"),
]


def stale_copy(directory):
    """A copy of the sample (same file name) whose zstd is a version the archive never had."""
    with open(SAMPLE, encoding="utf-8") as f:
        desc = json.load(f)
    urls = desc["sources"]["org.osbuild.files"]["urls"]
    old = next(c for c, u in urls.items() if re.search(r"/zstd_[^/]*\.deb$", u))
    new = "sha256:" + hashlib.sha256(b"osbuild: a zstd the archive never had").hexdigest()
    url = re.sub(r"/zstd_[^_/]*_", "/zstd_99.0-osbuild-gone_", urls.pop(old))
    urls[new] = url
    packages = desc["pipeline"]["stages"][0]["options"]["packages"]
    packages[packages.index(old)] = new
    assert pinned.gone_urls([url]) == [url], "the archive should not serve the invented version"
    os.makedirs(directory)
    path = os.path.join(directory, "debian13-qcow2.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(desc, f, indent=2)
    return path, desc


def build_image(manifest, store, out, offline=False):
    """Run tools/build-image (under `unshare --net` when offline); return the process."""
    cmd = [sys.executable, BUILD_IMAGE, manifest, "--store", store, "--output-directory", out]
    if offline:
        cmd = ["unshare", "--net", "--"] + cmd
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=3600)


def check_image(image, tmpdir):
    """qemu-img check; the hybrid GPT; the kernel and initramfs on the root filesystem."""
    subprocess.run(["qemu-img", "check", "-f", "qcow2", image], check=True, capture_output=True)
    raw = assemblerlib.to_raw(image, "qcow2", tmpdir)
    table = assemblerlib.sfdisk_json(raw)
    assert table["label"] == "gpt"
    types = [p["type"] for p in table["partitions"]]
    assert len(types) == 3 and types[:2] == [pinned.BIOS_BOOT_GUID,
                                             "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"], types
    root = table["partitions"][2]
    with assemblerlib.attached(raw, root["start"], root["size"]) as dev:
        assert assemblerlib.blkid(dev)["TYPE"] == "ext4"
        with assemblerlib.mounted(dev) as mnt:
            kernels = [n for n in os.listdir(os.path.join(mnt, "boot"))
                       if n.startswith("vmlinuz-")]
            assert kernels, os.listdir(os.path.join(mnt, "boot"))
            assert os.path.isfile(os.path.join(mnt, "vmlinuz"))
            assert os.path.isfile(os.path.join(mnt, "initrd.img"))
            with open(os.path.join(mnt, "var/lib/dpkg/status"), encoding="utf-8") as f:
                status = f.read()
    os.unlink(raw)
    return status


def test_make_image_when_pinned_package_is_gone(tmp_path):
    """404 for a pinned package: told in one line, a fresh image built and its manifest kept."""
    path, stale = stale_copy(str(tmp_path / "in"))
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    proc = build_image(path, store, out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert GONE_LINE + " (and" not in log and GONE_LINE in proc.stdout, log[-3000:]
    assert "Traceback" not in log and "build failed" not in log.lower()

    kept = os.path.join(store, "resolved", "debian13-qcow2.json")
    assert filecmp.cmp(kept, os.path.join(out, "manifest.json"), shallow=False)
    with open(kept, encoding="utf-8") as f:
        fresh = json.load(f)
    assert pinned.configuration(fresh) == pinned.configuration(stale)
    fresh_urls = pinned.source_urls(fresh).values()
    assert not [u for u in fresh_urls if "osbuild-gone" in u]
    assert [u for u in fresh_urls if re.search(r"/zstd_[^/]*\.deb$", u)]

    status = check_image(os.path.join(out, "disk.qcow2"), str(tmp_path))
    assert re.search(r"^Package: zstd\nStatus: install ok installed\n", status, re.M)
    assert "99.0-osbuild-gone" not in status

    # offline: the pinned zstd cannot be asked for; the store has the resolved image
    offline_out = str(tmp_path / "offline")
    proc = build_image(path, store, offline_out, offline=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "cannot reach the archive" in proc.stdout and "building the last resolved manifest" \
        in proc.stdout, log[-3000:]
    assert filecmp.cmp(os.path.join(out, "disk.qcow2"), os.path.join(offline_out, "disk.qcow2"),
                       shallow=False)
    assert filecmp.cmp(kept, os.path.join(offline_out, "manifest.json"), shallow=False)

    # offline with an empty store: one line naming the network, not the manifest
    proc = build_image(path, str(tmp_path / "empty"), str(tmp_path / "none"), offline=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("build-image: cannot reach the archive") and \
        "network problem" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not os.path.exists(tmp_path / "none" / "disk.qcow2")
