"""Boot a built image in qemu (TCG) under BIOS, UEFI or Secure Boot and read its report.

Firmware "aavmf" boots an arm64 image on qemu-system-aarch64's `virt` machine
with AAVMF (package qemu-efi-aarch64).

The image gets one extra stage (`report_stage`): a systemd unit that, once
the system is up, writes what the tests check to a virtio serial port (a
file on the host) and powers the machine off.
"""

import json
import os
import shutil
import subprocess
import time

import pytest

PORT = "org.osbuild.report"
BOOT_TIMEOUT = int(os.environ.get("OSBUILD_TEST_BOOT_TIMEOUT", "600"))
OVMF = "/usr/share/OVMF"
AAVMF = "/usr/share/AAVMF"
# firmware -> (code, vars template, extra qemu arguments)
FIRMWARE = {
    "uefi": ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", ["-machine", "q35"]),
    "secureboot": ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd",
                   ["-machine", "q35,smm=on",
                    "-global", "driver=cfi.pflash01,property=secure,value=on"]),
    "aavmf": ("AAVMF_CODE.fd", "AAVMF_VARS.fd", ["-machine", "virt", "-cpu", "cortex-a72"]),
}
# firmware -> (directory of its files, qemu program)
FIRMWARE_HOST = {"aavmf": (AAVMF, "qemu-system-aarch64")}
EFIVARS = "/sys/firmware/efi/efivars"
SECURE_BOOT_VAR = f"{EFIVARS}/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"

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
# the ESP is mounted by systemd after local-fs; wait a little for it
i=0
while ! findmnt -n /boot/efi >/dev/null 2>&1 && grep -q /boot/efi /etc/fstab && [ $i -lt 20 ]; do
  sleep 0.5; i=$((i+1))
done
# the getty on the serial console starts late under emulation; wait for it (bounded)
i=0
while ! systemctl is-active --quiet 'serial-getty@*' && [ $i -lt 120 ]; do
  sleep 0.5; i=$((i+1))
done
{{
  echo "OSBUILD-REPORT-BEGIN"
  echo "getty=$(systemctl list-units --state=active --plain --no-legend 'serial-getty@*' | awk '{{print $1}}' | tr '\\n' ' ')"
  echo "hostname=$(cat /etc/hostname)"
  echo "kernel=$(uname -r)"
  echo "machine=$(uname -m)"
  echo "root=$(findmnt -no SOURCE,FSTYPE /)"
  echo "esp=$(findmnt -no SOURCE,FSTYPE /boot/efi)"
  echo "cmdline=$(cat /proc/cmdline)"
  echo "failed=$(systemctl --failed --no-legend --plain | awk '{{print $1}}' | grep -v osbuild-report | tr '\\n' ' ')"
  echo "dpkg-audit=$(dpkg --audit | wc -l)"
  echo "apt-sources=$(grep -c '^URIs:' /etc/apt/sources.list.d/osbuild.sources)"
  echo "fsck=$(command -v fsck.ext4)"
  echo "resize2fs=$(command -v resize2fs)"
  if [ -d /sys/firmware/efi ]; then echo "firmware=uefi"; else echo "firmware=bios"; fi
  if [ -e {SECURE_BOOT_VAR} ]; then
    echo "secureboot=$(od -An -t u1 -j 4 -N 1 {SECURE_BOOT_VAR} | tr -d ' ')"
  else
    echo "secureboot=none"
  fi
  echo "esp-files=$(cd /boot/efi 2>/dev/null && find . -type f | sort | tr '\\n' ' ')"
  echo "kernel-log-sb=$(dmesg | grep -c 'Secure boot enabled')"
  echo "OSBUILD-REPORT-END"
}} > "$port"
systemctl poweroff --no-block
"""


# the marks of every boot test module
MARKS = [
    pytest.mark.integration, pytest.mark.boot,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="needs qemu-system-x86_64"),
]


def with_report(path):
    """The manifest at `path` with the report stage added before the assembler."""
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["pipeline"]["stages"].append(report_stage())
    return manifest


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


def parse_report(text):
    """key=value lines between the report markers."""
    body = text.split("OSBUILD-REPORT-BEGIN", 1)[1].split("OSBUILD-REPORT-END", 1)[0]
    return dict(line.split("=", 1) for line in body.strip().splitlines() if "=" in line)


def have_firmware(firmware):
    """Whether the OVMF files for `firmware` ("bios" needs none) are installed."""
    if firmware == "bios":
        return True
    code, template, _ = FIRMWARE[firmware]
    directory, program = FIRMWARE_HOST.get(firmware, (OVMF, "qemu-system-x86_64"))
    return shutil.which(program) is not None and \
        all(os.path.isfile(os.path.join(directory, f)) for f in (code, template))


def firmware_args(firmware, workdir):
    """qemu arguments for `firmware`: BIOS (SeaBIOS, the default), UEFI or Secure Boot (OVMF)."""
    if firmware == "bios":
        return []
    code, template, extra = FIRMWARE[firmware]
    directory = FIRMWARE_HOST.get(firmware, (OVMF,))[0]
    varstore = os.path.join(workdir, f"vars-{firmware}.fd")
    shutil.copyfile(os.path.join(directory, template), varstore)    # a fresh copy per boot
    return extra + [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={os.path.join(directory, code)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={varstore}"]


def boot(image, workdir, firmware="bios", timeout=BOOT_TIMEOUT):
    """Boot `image` (snapshot mode) until qemu exits; returns (exit, seconds, console, report)."""
    os.makedirs(workdir, exist_ok=True)
    console = os.path.join(workdir, f"console-{firmware}.log")
    report = os.path.join(workdir, f"report-{firmware}.txt")
    for path in (console, report):
        if os.path.exists(path):
            os.unlink(path)
    program = FIRMWARE_HOST.get(firmware, (None, "qemu-system-x86_64"))[1]
    cmd = [program, "-accel", "tcg", "-m", "1024", "-smp", "1",
           *firmware_args(firmware, workdir),
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
