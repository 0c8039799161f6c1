"""Build samples/debian12-qcow2.json (hybrid) through osbuild and boot it under BIOS and UEFI.

The manifest comes from debian_samples: the pinned sample while the archive
serves it, else one resolved today.

The image gets one extra stage (bootvm.report_stage): a systemd unit that,
once the system is up, writes a report to a virtio serial port (a file on the
host) and powers the machine off. The tests assert the report and a clean
power-off within a bounded time. The image is built once and booted twice.
"""

import os
import time

import pytest

import bootvm
import debian_samples
from conftest import run_osbuild


pytestmark = bootvm.MARKS


@pytest.fixture(name="image", scope="module")
def image_fixture(tmp_path_factory):
    """The built image: (path, work directory)."""
    base = tmp_path_factory.mktemp("debian12")
    t0 = time.monotonic()
    res = run_osbuild(bootvm.with_report(debian_samples.manifest_path("debian12-qcow2.json")),
                      base / "store",
                      "--output-directory", base / "out")
    print(f"Debian 12 build {time.monotonic() - t0:.1f}s")
    assert res.returncode == 0, f"build failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert res.json["success"] is True
    names = [s["name"] for s in res.json["stages"]]
    assert names[0] == "org.osbuild.dpkg" and names[-1] == "org.osbuild.script"
    image = base / "out" / "disk.qcow2"
    assert image.exists(), sorted(os.listdir(base / "out"))
    return str(image), str(base)


def boot_and_check(image, firmware):
    """Boot under `firmware`; assert what the report unit saw; return the report."""
    if not bootvm.have_firmware(firmware):
        pytest.skip(f"needs OVMF ({bootvm.OVMF}; apt-get install ovmf)")
    path, base = image
    code, elapsed, console, report = bootvm.boot(path, os.path.join(base, firmware), firmware)
    print(f"Debian 12 under {firmware}: power-off after {elapsed:.1f}s")
    assert code is not None, f"no power-off within {bootvm.BOOT_TIMEOUT}s:\n{console[-4000:]}"
    assert "OSBUILD-REPORT-END" in report, f"no report (qemu exit {code}):\n{console[-4000:]}"
    info = bootvm.parse_report(report)
    assert info["hostname"] == "debian"
    assert info["root"].split() == ["/dev/vda3", "ext4"]
    assert info["esp"].split() == ["/dev/vda2", "vfat"]
    assert "console=ttyS0,115200n8" in info["cmdline"]
    assert "root=UUID=6a1b0c3e-2f4d-4e5a-9b8c-0d1e2f3a4b5c" in info["cmdline"]
    assert info["failed"].strip() == "", f"failed units: {info['failed']}"
    assert info["fsck"] == "/usr/sbin/fsck.ext4"
    assert info["dpkg-audit"] == "0"
    assert int(info["apt-sources"]) >= 1
    assert info["firmware"] == ("bios" if firmware == "bios" else "uefi")
    assert code == 0
    assert "reboot: Power down" in console, console[-2000:]
    return info


def test_debian12_boots(image):
    """Debian 12 under BIOS (SeaBIOS): GRUB from the BIOS boot partition."""
    boot_and_check(image, "bios")


def test_debian12_boots_uefi(image):
    """Debian 12 under UEFI (OVMF): shim and GRUB from the ESP."""
    boot_and_check(image, "uefi")
