"""Helpers for the assembler tests: inspect images with independent tools."""

import contextlib
import json
import os
import re
import subprocess
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE_DIFF = os.path.join(REPO, "tools", "tree-diff")
GRUB_MARKER = "OSBUILD-GRUB-OK"

# A grub.cfg that proves GRUB found and read it, then powers the VM off.
GRUB_CFG = ("serial --unit=0 --speed=115200\\nterminal_input serial\\nterminal_output serial\\n"
            f"echo {GRUB_MARKER} prefix=$prefix\\nhalt\\n")

# Script for org.osbuild.script: a small tree with everything a copy must keep.
TREE_SCRIPT = """
mkdir -p etc boot/{grubdir} boot/efi/EFI/BOOT usr/bin var/tmp
echo hello > etc/hello
chown 12:34 etc/hello
chmod 0640 etc/hello
ln -s hello etc/link
ln etc/hello etc/hard
echo suid > usr/bin/suid
chmod 4755 usr/bin/suid
chmod 1777 var/tmp
mkfifo usr/bin/fifo
dd if=/dev/urandom of=usr/bin/blob bs=1M count={blob_mib} status=none
python3 - <<'EOF'
import os, struct
os.setxattr("etc/hello", "user.osbuild", b"test")
os.setxattr("etc/hello", "security.selinux", b"system_u:object_r:etc_t:s0")
acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in
      [(1, 6, 0xffffffff), (2, 4, 1001), (4, 4, 0xffffffff), (0x10, 4, 0xffffffff),
       (0x20, 0, 0xffffffff)])
os.setxattr("etc/hello", "system.posix_acl_access", acl)
EOF
echo kernel > boot/vmlinuz
echo efi > boot/efi/EFI/BOOT/BOOTX64.EFI
mkdir -p boot/efi/EFI/debian
echo cfg > boot/efi/EFI/debian/grub.cfg
printf '{grub_cfg}' > boot/{grubdir}/grub.cfg
"""


def tree_stage(grubdir="grub", blob_mib=1):
    """The org.osbuild.script stage that builds the test tree."""
    script = TREE_SCRIPT.format(grubdir=grubdir, blob_mib=blob_mib, grub_cfg=GRUB_CFG)
    return {"name": "org.osbuild.script", "options": {"chroot": False, "script": script}}


def manifest(stages, assembler_name, options):
    """A manifest with `stages` and the given assembler."""
    return {"pipeline": {"stages": stages,
                         "assembler": {"name": assembler_name, "options": options}}}


def loops_on(name):
    """Loop devices whose backing file path contains `name`.

    The kernel reports the path as the container saw it, so tests give their
    images unique names and look for those.
    """
    out = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True,
                         check=False).stdout
    devices = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devices if name in (d.get("back-file") or "")]


def mounts_under(prefix):
    """Mount points below `prefix` in this mount namespace."""
    with open("/proc/mounts", encoding="utf-8") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(prefix))]


def output_file(store, res, filename):
    """Path of the assembled artifact of a successful build."""
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return os.path.join(store, "refs", res.json["output_id"], filename)


def tree_path(store, res):
    """Path of the committed tree of a build."""
    return os.path.realpath(os.path.join(store, "refs", res.json["tree_id"]))


def committed_files(store, filename):
    """Refs below `store` that contain `filename`."""
    refs = os.path.join(store, "refs")
    if not os.path.isdir(refs):
        return []
    return [r for r in os.listdir(refs) if os.path.exists(os.path.join(refs, r, filename))]


def qemu_img_info(path, fmt=None):
    """`qemu-img info` as a dict (`fmt` skips probing: fixed VHDs probe as raw)."""
    argv = ["qemu-img", "info", "--output=json"] + (["-f", fmt] if fmt else [])
    out = subprocess.run(argv + [path], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def to_raw(path, fmt, tmpdir):
    """A raw copy of the image (the path itself when it is raw)."""
    if fmt == "raw":
        return path
    raw = os.path.join(tmpdir, os.path.basename(path) + ".raw")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, raw], check=True)
    return raw


def sfdisk_json(raw):
    """The partition table as sfdisk sees it."""
    out = subprocess.run(["sfdisk", "--json", raw], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)["partitiontable"]


@contextlib.contextmanager
def attached(raw, start=0, size=0, read_only=True):
    """A loop device (made by losetup) over sectors start..start+size of `raw`."""
    argv = ["losetup", "--show", "--find", "--offset", str(start * 512)]
    if size:
        argv += ["--sizelimit", str(size * 512)]
    if read_only:
        argv.append("--read-only")
    dev = subprocess.run(argv + [raw], capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def blkid(dev):
    """Probe `dev` with blkid: {"TYPE": ..., "UUID": ..., "LABEL": ...}."""
    out = subprocess.run(["blkid", "--probe", "--output", "export", dev], capture_output=True,
                         text=True, check=True).stdout
    # "export" format escapes spaces and shell specials with a backslash.
    return {key: re.sub(r"\\(.)", r"\1", value)
            for key, value in (line.split("=", 1) for line in out.splitlines() if "=" in line)}


@contextlib.contextmanager
def mounted(dev):
    """Mount `dev` read-only on a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="osbuild-test-mnt-") as mnt:
        subprocess.run(["mount", "-o", "ro", dev, mnt], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=True)


def copy_esp_efi(dev, out):
    """Copy /EFI of the vfat filesystem on `dev` into the new directory `out` (mtools, no mount)."""
    out.mkdir()
    subprocess.run(["mcopy", "-s", "-n", "-i", dev, "::/EFI", str(out)], check=True,
                   env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    return out


def tree_diff(tree1, tree2, *ignore):
    """tools/tree-diff of two trees as a dict."""
    argv = [TREE_DIFF]
    for path in ignore:
        argv += ["--ignore", path]
    out = subprocess.run(argv + [tree1, tree2], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def _real_change(change):
    """False for the view XFS gives of ACLs (trusted.SGI_ACL_*), which is no change."""
    if set(change) != {"xattrs"}:
        return True
    old, new = ({k: v for k, v in (x or {}).items() if not k.startswith("trusted.SGI_ACL_")}
                for x in change["xattrs"])
    return old != new


def assert_same_tree(source, copy, allowed_added=(), ignore=()):
    """The copy equals the source except for entries below `allowed_added`."""
    diff = tree_diff(source, copy, *ignore)
    assert diff["deleted_files"] == {}, diff["deleted_files"]
    differences = {path: change for path, change in diff["differences"].items()
                   if _real_change(change)}
    assert differences == {}, differences
    extra = [p for p in diff["added_files"]
             if not any(p == a or p.startswith(a + "/") for a in ("/lost+found", *allowed_added))]
    assert extra == [], extra


def boot_grub(image, fmt, timeout=120):
    """Boot `image` in qemu (TCG) and return the serial output up to GRUB's halt."""
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
            "-drive", f"file={image},format={fmt},snapshot=on"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False)
        output = proc.stdout
    except subprocess.TimeoutExpired as e:
        output = e.stdout or b""
    return output.decode("utf-8", errors="replace").replace("\r", "")


def assert_failed(store, res, message, filename):
    """The build failed with `message`, committed no `filename` and left no loop device."""
    assert res.returncode == 1
    text = res.stdout + res.stderr
    assert message in text, text[-3000:]
    assert "Traceback" not in text
    assert committed_files(store, filename) == []
    assert loops_on(filename) == []
    assert mounts_under(store) == []
