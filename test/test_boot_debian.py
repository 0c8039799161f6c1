"""Build samples/debian12-qcow2.json through osbuild and boot it with qemu (TCG).

The image gets one extra stage: a systemd unit that, once the system is up,
writes a report to a virtio serial port (`org.osbuild.report`, a file on the
host) and powers the machine off. The test asserts the report and a clean
power-off within a bounded time.
"""

import copy
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import REPO, run_osbuild

SAMPLE = os.path.join(REPO, "samples", "debian12-qcow2.json")
BOOT_TIMEOUT = int(os.environ.get("OSBUILD_TEST_BOOT_TIMEOUT", "600"))
PORT = "org.osbuild.report"

REPORT_UNIT = """[Unit]
Description=Report to the osbuild boot test and power off
After=multi-user.target

[Service]
Type=oneshot
StandardOutput=journal+console
ExecStart=/usr/local/sbin/osbuild-report

[Install]
WantedBy=multi-user.target
"""

REPORT_SCRIPT = f"""#!/bin/sh
# waits for the virtio port, reports what the test checks, powers off
port=/dev/virtio-ports/{PORT}
i=0
while [ ! -e "$port" ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done
{{
  echo "OSBUILD-REPORT-BEGIN"
  echo "hostname=$(cat /etc/hostname)"
  echo "kernel=$(uname -r)"
  echo "root=$(findmnt -no SOURCE,FSTYPE /)"
  echo "cmdline=$(cat /proc/cmdline)"
  echo "failed=$(systemctl --failed --no-legend --plain | awk '{{print $1}}' | grep -v osbuild-report | tr '\\n' ' ')"
  echo "dpkg-audit=$(dpkg --audit | wc -l)"
  echo "apt-sources=$(grep -c '^URIs:' /etc/apt/sources.list.d/osbuild.sources)"
  echo "OSBUILD-REPORT-END"
}} > "$port"
systemctl poweroff --no-block
"""


def report_stage():
    """An org.osbuild.script stage installing and enabling the report unit."""
    script = (
        "mkdir -p usr/local/sbin etc/systemd/system/multi-user.target.wants\n"
        f"cat > usr/local/sbin/osbuild-report <<'EOF'\n{REPORT_SCRIPT}EOF\n"
        "chmod 0755 usr/local/sbin/osbuild-report\n"
        f"cat > etc/systemd/system/osbuild-report.service <<'EOF'\n{REPORT_UNIT}EOF\n"
        "ln -sf ../osbuild-report.service "
        "etc/systemd/system/multi-user.target.wants/osbuild-report.service\n"
    )
    return {"name": "org.osbuild.script", "options": {"chroot": False, "script": script}}


def boot_manifest():
    """The sample with the report stage added before the assembler."""
    with open(SAMPLE, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest = copy.deepcopy(manifest)
    manifest["pipeline"]["stages"].append(report_stage())
    return manifest


def parse_report(text):
    """key=value lines between the report markers."""
    body = text.split("OSBUILD-REPORT-BEGIN", 1)[1].split("OSBUILD-REPORT-END", 1)[0]
    return dict(line.split("=", 1) for line in body.strip().splitlines() if "=" in line)


def boot(image, workdir, timeout=BOOT_TIMEOUT):
    """Boot `image` (snapshot mode) until qemu exits; returns (exit, seconds, console, report)."""
    console = os.path.join(workdir, "console.log")
    report = os.path.join(workdir, "report.txt")
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "1",
           "-display", "none", "-monitor", "none", "-no-reboot",
           "-serial", f"file:{console}",
           "-drive", f"file={image},format=qcow2,if=virtio,snapshot=on",
           "-device", "virtio-serial-pci",
           "-chardev", f"file,id=report,path={report}",
           "-device", f"virtserialport,chardev=report,name={PORT}",
           "-nic", "none"]
    start = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            code = None
        else:
            code = proc.returncode
    elapsed = time.monotonic() - start

    def read(path):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""
    return code, elapsed, read(console) + out.decode(errors="replace"), read(report)


@pytest.mark.integration
@pytest.mark.boot
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
def test_debian12_boots(tmp_path):
    """Build the Debian 12 sample plus a report unit, boot it, expect the report and power-off."""
    store = tmp_path / "store"
    outdir = tmp_path / "out"
    t0 = time.monotonic()
    res = run_osbuild(boot_manifest(), store, "--output-directory", outdir)
    build_time = time.monotonic() - t0
    assert res.returncode == 0, f"build failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert res.json["success"] is True
    names = [s["name"] for s in res.json["stages"]]
    assert names[0] == "org.osbuild.dpkg" and names[-1] == "org.osbuild.script"
    image = outdir / "disk.qcow2"
    assert image.exists(), sorted(os.listdir(outdir))

    code, elapsed, console, report = boot(str(image), str(tmp_path))
    print(f"build {build_time:.1f}s, boot to power-off {elapsed:.1f}s")
    assert code is not None, f"no power-off within {BOOT_TIMEOUT}s:\n{console[-4000:]}"
    assert "OSBUILD-REPORT-END" in report, f"no report (qemu exit {code}):\n{console[-4000:]}"
    info = parse_report(report)
    assert info["hostname"] == "debian"
    assert info["root"].split() == ["/dev/vda1", "ext4"]
    assert "console=ttyS0,115200n8" in info["cmdline"]
    assert "root=UUID=6a1b0c3e-2f4d-4e5a-9b8c-0d1e2f3a4b5c" in info["cmdline"]
    assert info["failed"].strip() == "", f"failed units: {info['failed']}"
    assert info["dpkg-audit"] == "0"
    assert int(info["apt-sources"]) >= 1
    assert code == 0
    assert "reboot: Power down" in console, console[-2000:]
