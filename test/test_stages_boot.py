"""Tests for the boot loader stages: org.osbuild.grub2, org.osbuild.fix-bls, org.osbuild.zipl.

The stage programs run on small fake trees (a fake kernel file is enough to
generate a configuration) and the exact files they write are checked. The
integration tests run the stages through osbuild and compare the trees before
and after with tools/tree-diff.
"""

import hashlib
import json
import os
import subprocess

import pytest

from stageprog import FAKE_DEBIAN, KERNEL, REPO, fails, ok, schema_error

ROOT_UUID = "6a1b0c3e-2f4d-4e5a-9b8c-0d1e2f3a4b5c"
BOOT_UUID = "08a41983-3328-4d1a-ae3c-1699e6d2a806"
GRUB = "org.osbuild.grub2"


def read(path):
    """Content of a text file."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def debian_tree(root, links=True):
    """A fake Debian tree: kernel, initrd, /vmlinuz links, os-release."""
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{KERNEL}").write_text("kernel\n")
    (root / "boot" / f"initrd.img-{KERNEL}").write_text("initrd\n")
    (root / "boot" / "vmlinuz-5.10.0-9-amd64").write_text("old kernel\n")
    if links:
        os.symlink(f"boot/vmlinuz-{KERNEL}", root / "vmlinuz")
        os.symlink(f"boot/initrd.img-{KERNEL}", root / "initrd.img")
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "os-release").write_text(
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n')
    (root / "etc").mkdir()
    os.symlink("../usr/lib/os-release", root / "etc" / "os-release")
    return root


def grub_modules(root, platform="i386-pc"):
    """Fake GRUB modules of `platform` in the tree."""
    moddir = root / "usr" / "lib" / "grub" / platform
    moddir.mkdir(parents=True)
    for name in ("normal.mod", "blscfg.mod", "command.lst", "moddep.lst"):
        (moddir / name).write_text(name + "\n")
    fonts = root / "usr" / "share" / "grub"
    fonts.mkdir(parents=True)
    (fonts / "unicode.pf2").write_text("font\n")


def fedora_esp(root):
    """The boot loader Fedora's shim-x64 package installs onto the ESP itself."""
    boot = root / "boot" / "efi" / "EFI" / "BOOT"
    boot.mkdir(parents=True)
    (boot / "BOOTX64.EFI").write_text("shim\n")


def debian_efi(root):
    """Debian's shim-signed and grub-efi-amd64-signed binaries under /usr/lib."""
    (root / "usr/lib/shim").mkdir(parents=True)
    (root / "usr/lib/shim/shimx64.efi.signed").write_text("shim\n")
    (root / "usr/lib/grub/x86_64-efi-signed").mkdir(parents=True)
    (root / "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed").write_text("grub\n")


def bls_cfg(uuid):
    """The BLS grub.cfg searching filesystem `uuid`."""
    return ("set timeout=0\n"
            "load_env\n"
            f"search --no-floppy --fs-uuid --set=root {uuid}\n"
            "set boot=${root}\n"
            "function load_video {\n"
            "  insmod all_video\n"
            "}\n"
            "blscfg\n")


def grubenv(opts):
    """The 1024-byte environment block with kernelopts for `opts`."""
    head = f"# GRUB Environment Block\nkernelopts=root=UUID={ROOT_UUID} {opts}\n"
    return head + "#" * (1024 - len(head))


# ----------------------------------------------------------------- grub2, BLS


def test_grub2_bls_default_is_legacy_i386_pc(tmp_path):
    """Without uefi/legacy: BIOS (i386-pc) BLS config, grubenv, modules, font."""
    grub_modules(tmp_path)
    ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "kernel_opts": "ro biosdevname=0 net.ifnames=0"})
    assert read(tmp_path / "boot/grub2/grub.cfg") == bls_cfg(ROOT_UUID)
    env = read(tmp_path / "boot/grub2/grubenv")
    assert env == grubenv("ro biosdevname=0 net.ifnames=0")
    assert len(env.encode()) == 1024
    assert read(tmp_path / "etc/default/grub") == (
        "GRUB_TIMEOUT=0\n"
        "GRUB_CMDLINE_LINUX=\"ro biosdevname=0 net.ifnames=0\"\n"
        "GRUB_ENABLE_BLSCFG=true\n")
    assert sorted(os.listdir(tmp_path / "boot/grub2/i386-pc")) == [
        "blscfg.mod", "command.lst", "moddep.lst", "normal.mod"]
    assert read(tmp_path / "boot/grub2/fonts/unicode.pf2") == "font\n"
    assert not (tmp_path / "boot/efi").exists()


def test_grub2_uefi_only(tmp_path):
    """UEFI only: config and grubenv on the ESP, /boot/grub2/grubenv links there."""
    fedora_esp(tmp_path)
    ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "kernel_opts": "ro",
                                       "uefi": {"vendor": "fedora"}})
    efi = tmp_path / "boot/efi/EFI/fedora"
    assert read(efi / "grub.cfg") == bls_cfg(ROOT_UUID)
    assert read(efi / "grubenv") == grubenv("ro")
    # the ESP is FAT: the real file is there, /boot/grub2/grubenv points to it
    assert os.readlink(tmp_path / "boot/grub2/grubenv") == "../efi/EFI/fedora/grubenv"
    assert not (tmp_path / "boot/grub2/grub.cfg").exists()
    assert not (tmp_path / "boot/grub2/i386-pc").exists()


def test_grub2_hybrid_with_boot_partition(tmp_path):
    """Hybrid with a separate /boot: both configs search the /boot UUID."""
    grub_modules(tmp_path)
    fedora_esp(tmp_path)
    ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "boot_fs_uuid": BOOT_UUID,
                                       "kernel_opts": "ro console=ttyS0", "legacy": "i386-pc",
                                       "uefi": {"vendor": "fedora"}})
    for cfg in ("boot/grub2/grub.cfg", "boot/efi/EFI/fedora/grub.cfg"):
        assert read(tmp_path / cfg) == bls_cfg(BOOT_UUID)
    for env in ("boot/grub2/grubenv", "boot/efi/EFI/fedora/grubenv"):
        assert not os.path.islink(tmp_path / env)
        assert read(tmp_path / env) == grubenv("ro console=ttyS0")


def test_grub2_legacy_other_platform_and_missing_modules(tmp_path):
    """A platform's modules must be in the tree, and are copied."""
    fails(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "legacy": "powerpc-ieee1275"},
          "no GRUB modules in /usr/lib/grub/powerpc-ieee1275")
    grub_modules(tmp_path, "powerpc-ieee1275")
    ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "legacy": "powerpc-ieee1275"})
    assert (tmp_path / "boot/grub2/powerpc-ieee1275/normal.mod").exists()


def test_grub2_legacy_false_without_uefi(tmp_path):
    """Neither BIOS nor UEFI boot is a clear error."""
    fails(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "legacy": False}, "nothing to configure")


def test_grub2_kernel_opts_too_long(tmp_path):
    """kernelopts that do not fit the 1024-byte grubenv are refused."""
    grub_modules(tmp_path)
    fails(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "kernel_opts": "x" * 1000},
          "kernel_opts too long")


# --------------------------------------------------------------- grub2, plain


def plain_cfg(search, linux, initrd, opts, timeout=1, title="Debian GNU/Linux 12 (bookworm)"):
    """The plain (non-BLS) grub.cfg the stage should write."""
    text = ("serial --unit=0 --speed=115200\n"
            "terminal_input serial console\n"
            "terminal_output serial console\n"
            f"set timeout={timeout}\n"
            f"menuentry '{title}' {{\n"
            f"  search --no-floppy --fs-uuid --set=root {search}\n"
            f"  linux {linux} root=UUID={ROOT_UUID} {opts}\n")
    if initrd:
        text += f"  initrd {initrd}\n"
    return text + "}\n"


def test_grub2_plain_debian(tmp_path):
    """Plain mode on a Debian tree: /vmlinuz and /initrd.img, serial console."""
    debian_tree(tmp_path)
    opts = "ro console=tty0 console=ttyS0,115200n8"
    ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "bls": False, "kernel_opts": opts})
    assert read(tmp_path / "boot/grub/grub.cfg") == plain_cfg(ROOT_UUID, "/vmlinuz", "/initrd.img",
                                                              opts)
    assert oct(os.stat(tmp_path / "boot/grub/grub.cfg").st_mode & 0o777) == "0o444"
    assert read(tmp_path / "etc/default/grub") == (
        "GRUB_DEFAULT=0\n"
        "GRUB_TIMEOUT=1\n"
        f"GRUB_CMDLINE_LINUX=\"{opts}\"\n"
        "GRUB_CMDLINE_LINUX_DEFAULT=\"\"\n"
        "GRUB_TERMINAL=\"serial console\"\n"
        "GRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200\"\n"
        "GRUB_DISABLE_OS_PROBER=true\n")
    # no BLS files, nothing for grub2 paths, no modules without `legacy`
    assert not (tmp_path / "boot/grub2").exists()
    assert not (tmp_path / "boot/grub/i386-pc").exists()


def test_grub2_plain_separate_boot(tmp_path):
    """With a separate /boot, paths are relative to it."""
    debian_tree(tmp_path)
    ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "boot_fs_uuid": BOOT_UUID,
                                       "bls": False, "kernel_opts": "ro", "timeout": 5})
    assert read(tmp_path / "boot/grub/grub.cfg") == plain_cfg(
        BOOT_UUID, f"/vmlinuz-{KERNEL}", f"/initrd.img-{KERNEL}", "ro", timeout=5)


def test_grub2_plain_without_links_takes_newest_kernel(tmp_path):
    """Without links, the newest /boot/vmlinuz-* by version."""
    debian_tree(tmp_path, links=False)
    os.unlink(tmp_path / "etc/os-release")
    os.unlink(tmp_path / "usr/lib/os-release")
    ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "bls": False})
    # 6.1.0-13 is newer than 5.10.0-9 (version order, not string order)
    assert read(tmp_path / "boot/grub/grub.cfg") == plain_cfg(
        ROOT_UUID, f"/boot/vmlinuz-{KERNEL}", f"/boot/initrd.img-{KERNEL}", "", title="Linux"
    ).replace(f"{ROOT_UUID} \n", f"{ROOT_UUID}\n")


def test_grub2_plain_kernel_link_without_initrd_link(tmp_path):
    """Without an /initrd.img link, the initrd matching the linked kernel is used."""
    debian_tree(tmp_path)
    os.unlink(tmp_path / "initrd.img")
    ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "bls": False, "kernel_opts": "ro"})
    assert read(tmp_path / "boot/grub/grub.cfg") == plain_cfg(
        ROOT_UUID, "/vmlinuz", f"/boot/initrd.img-{KERNEL}", "ro")
    os.unlink(tmp_path / f"boot/initrd.img-{KERNEL}")
    proc = ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "bls": False, "kernel_opts": "ro"})
    assert "no initrd found" in proc.stderr
    assert read(tmp_path / "boot/grub/grub.cfg") == plain_cfg(ROOT_UUID, "/vmlinuz", None, "ro")


def test_grub2_plain_uefi_and_modules(tmp_path):
    """Plain mode with uefi (a loader config) and legacy (modules)."""
    debian_tree(tmp_path)
    grub_modules(tmp_path)
    debian_efi(tmp_path)
    ok(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "bls": False, "legacy": True,
                                       "uefi": {"vendor": "debian"}})
    assert read(tmp_path / "boot/efi/EFI/debian/grub.cfg") == (
        f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}\n"
        "set prefix=($root)/boot/grub\n"
        "configfile $prefix/grub.cfg\n")
    assert (tmp_path / "boot/grub/i386-pc/normal.mod").exists()


def test_grub2_plain_no_kernel(tmp_path):
    """A tree without a kernel fails and writes nothing."""
    (tmp_path / "boot").mkdir()
    os.symlink("boot/vmlinuz-gone", tmp_path / "vmlinuz")   # a dangling link is no kernel
    fails(GRUB, tmp_path, {"root_fs_uuid": ROOT_UUID, "bls": False},
          "the tree has no kernel")
    assert not (tmp_path / "boot/grub").exists()


def test_grub2_schema():
    """Valid option shapes of the original pass; wrong ones are named in the message."""
    def check(**options):
        return schema_error(GRUB, {"root_fs_uuid": ROOT_UUID, **options})

    assert check() is None
    assert check(legacy="i386-pc", uefi={"vendor": "fedora"}, boot_fs_uuid="46BB-8120",
                 kernel_opts="ro console=ttyS0,115200n8") is None
    assert "'root_fs_uuid' is a required property" in schema_error(GRUB, {})
    assert check(root_fs_uuid="not a uuid").startswith("options.root_fs_uuid:")
    assert check(uefi={}).startswith("options.uefi:")
    assert check(bls="no").startswith("options.bls:")
    assert check(kernel_opts="ro\ninsmod evil").startswith("options.kernel_opts:")
    assert check(timeout=-1).startswith("options.timeout:")
    assert "Additional properties" in check(x=1)


# --------------------------------------------------------------- fix-bls, zipl


ENTRY = ("title Fedora (5.0.9-301.fc30.x86_64) 30 (Thirty)\n"
         "version 5.0.9-301.fc30.x86_64\n"
         "linux /boot/vmlinuz-5.0.9-301.fc30.x86_64\n"
         "initrd /boot/initramfs-5.0.9-301.fc30.x86_64.img $tuned_initrd\n"
         "options $kernelopts $tuned_params\n"
         "id fedora-20190429-5.0.9-301.fc30.x86_64\n"
         "grub_users $grub_users\n"
         "grub_arg --unrestricted\n"
         "grub_class kernel\n")


def bls_tree(root, entry=ENTRY):
    """A tree with one BLS entry; returns the entry's path."""
    entries = root / "boot/loader/entries"
    entries.mkdir(parents=True)
    (entries / "abc-5.0.9-301.fc30.x86_64.conf").write_text(entry)
    return entries / "abc-5.0.9-301.fc30.x86_64.conf"


def test_fix_bls_separate_boot(tmp_path):
    """prefix / strips /boot; the default puts it back; mode kept."""
    entry = bls_tree(tmp_path)
    os.chmod(entry, 0o600)
    ok("org.osbuild.fix-bls", tmp_path, {"prefix": "/"})
    assert read(entry) == (ENTRY.replace("linux /boot/", "linux /")
                           .replace("initrd /boot/", "initrd /"))
    assert os.stat(entry).st_mode & 0o777 == 0o600
    # idempotent, and back with the default prefix
    ok("org.osbuild.fix-bls", tmp_path, {"prefix": "/"})
    ok("org.osbuild.fix-bls", tmp_path, {})
    assert read(entry) == ENTRY


def test_fix_bls_paths_without_boot(tmp_path):
    """Paths relative to the boot filesystem get the /boot prefix."""
    entry = bls_tree(tmp_path, ENTRY.replace("/boot/", "/"))
    ok("org.osbuild.fix-bls", tmp_path, {})
    assert read(entry) == ENTRY


def test_fix_bls_no_entries(tmp_path):
    """No BLS entries is an error; bad options are named."""
    fails("org.osbuild.fix-bls", tmp_path, {}, "the tree has no BLS entries")
    assert schema_error("org.osbuild.fix-bls", {"prefix": "boot"}).startswith("options.prefix:")
    assert "Additional properties" in schema_error("org.osbuild.fix-bls", {"prefx": "/"})


def test_zipl(tmp_path):
    """zipl.conf contents, timeout, missing entries, schema."""
    fails("org.osbuild.zipl", tmp_path, {}, "no BLS entries")
    bls_tree(tmp_path)
    ok("org.osbuild.zipl", tmp_path, {"timeout": 5})
    assert read(tmp_path / "etc/zipl.conf") == (
        "[defaultboot]\ndefaultauto\nprompt=1\ntimeout=5\ntarget=/boot\n")
    ok("org.osbuild.zipl", tmp_path, {})
    assert "timeout=0\n" in read(tmp_path / "etc/zipl.conf")
    assert schema_error("org.osbuild.zipl", {"timeout": "5"}).startswith("options.timeout:")
    assert schema_error("org.osbuild.zipl", {"timeout": -1}).startswith("options.timeout:")


# --------------------------------------------------------------- through osbuild


def sha256(text):
    """Hex sha256 of a text."""
    return hashlib.sha256(text.encode()).hexdigest()


def stage_diff(osbuild, store, base_stages, stage):
    """Build `base_stages`, then base + `stage`; return (tree-diff of the two, result)."""
    base = osbuild({"pipeline": {"stages": base_stages}}, store, check=True)
    res = osbuild({"pipeline": {"stages": base_stages + [stage]}}, store)
    if res.returncode != 0:
        return None, res
    assert [s["name"] for s in res.json["stages"]] == [stage["name"]]   # base came from the store
    refs = os.path.join(store, "refs")
    proc = subprocess.run([os.path.join(REPO, "tools", "tree-diff"),
                           os.path.realpath(os.path.join(refs, base.json["tree_id"])),
                           os.path.realpath(os.path.join(refs, res.json["tree_id"]))],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout), res




def dir_attrs():
    """tree-diff attributes of a root-owned 0755 directory."""
    return {"type": "dir", "mode": "0755", "uid": 0, "gid": 0}


def file_attrs(text, mode="0644"):
    """tree-diff attributes of a root-owned file with `text`."""
    return {"type": "file", "mode": mode, "uid": 0, "gid": 0, "sha256": sha256(text)}


@pytest.mark.integration
def test_grub2_plain_through_osbuild(osbuild, store):
    """Through osbuild: exactly grub.cfg and /etc/default/grub are added."""
    opts = "ro console=ttyS0,115200n8"
    diff, res = stage_diff(osbuild, store, [FAKE_DEBIAN], {
        "name": "org.osbuild.grub2",
        "options": {"root_fs_uuid": ROOT_UUID, "bls": False, "kernel_opts": opts}})
    assert res.returncode == 0, res.stdout + res.stderr
    default = read(os.path.join(store, "refs", res.json["tree_id"], "etc/default/grub"))
    assert diff == {
        "added_files": {
            "/boot/grub": dir_attrs(),
            "/boot/grub/grub.cfg": file_attrs(
                plain_cfg(ROOT_UUID, "/vmlinuz", "/initrd.img", opts), "0444"),
            "/etc/default": dir_attrs(),
            "/etc/default/grub": file_attrs(default),
        },
        "deleted_files": {},
        "differences": {},
    }


@pytest.mark.integration
def test_grub2_no_kernel_through_osbuild(osbuild, store):
    """Through osbuild: the failure is reported and nothing committed."""
    res = osbuild({"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": "mkdir -p boot etc"}},
        {"name": GRUB, "options": {"root_fs_uuid": ROOT_UUID, "bls": False}}]}}, store)
    assert res.returncode == 1
    last = res.json["stages"][-1]
    assert last["name"] == "org.osbuild.grub2" and last["success"] is False
    assert "the tree has no kernel" in last["output"]
    assert not os.path.lexists(os.path.join(store, "refs", last["id"]))


@pytest.mark.integration
def test_fix_bls_and_zipl_through_osbuild(osbuild, store):
    """Through osbuild: the exact changes of fix-bls and zipl."""
    base = [{"name": "org.osbuild.script", "options": {"chroot": False, "script": (
        "mkdir -p boot/loader/entries etc\n"
        "cat > boot/loader/entries/abc-5.0.conf <<'EOF'\n"
        "title Fedora\nlinux /boot/vmlinuz-5.0\ninitrd /boot/initramfs-5.0.img\n"
        "options $kernelopts\n"
        "EOF\n")}}]
    diff, res = stage_diff(osbuild, store, base,
                           {"name": "org.osbuild.fix-bls", "options": {"prefix": "/"}})
    assert res.returncode == 0, res.stdout + res.stderr
    fixed = "title Fedora\nlinux /vmlinuz-5.0\ninitrd /initramfs-5.0.img\noptions $kernelopts\n"
    old = fixed.replace(" /", " /boot/")
    assert diff == {"added_files": {}, "deleted_files": {},
                    "differences": {"/boot/loader/entries/abc-5.0.conf": {
                        "sha256": [sha256(old), sha256(fixed)]}}}
    diff, res = stage_diff(osbuild, store, base, {"name": "org.osbuild.zipl"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert diff == {"added_files": {"/etc/zipl.conf": file_attrs(
        "[defaultboot]\ndefaultauto\nprompt=1\ntimeout=0\ntarget=/boot\n")},
        "deleted_files": {}, "differences": {}}
