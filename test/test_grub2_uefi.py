"""org.osbuild.grub2 with `uefi`: the tree's own UEFI boot chain is put onto the ESP.

Unit tests run the stage on small fake trees; the integration tests run it
through osbuild against hostile trees (symbolic links pointing out of the tree).
"""

import os

import pytest

from stageprog import fails, ok, schema_error

GRUB = "org.osbuild.grub2"
ROOT_UUID = "6a1b0c3e-2f4d-4e5a-9b8c-0d1e2f3a4b5c"
KERNEL = "6.12.0-1-amd64"
PLAIN = {"root_fs_uuid": ROOT_UUID, "bls": False, "uefi": {"vendor": "debian"}}


def debian_tree(root):
    """A fake Debian tree with a kernel, initrd and their links."""
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{KERNEL}").write_text("kernel\n")
    (root / "boot" / f"initrd.img-{KERNEL}").write_text("initrd\n")
    os.symlink(f"boot/vmlinuz-{KERNEL}", root / "vmlinuz")
    os.symlink(f"boot/initrd.img-{KERNEL}", root / "initrd.img")
    return root


def put(root, path, text):
    """Write `text` to tree path `path`."""
    full = root / path.lstrip("/")
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text(text)


def shim(root, arch="x64", cpu="x86_64", mm=True):
    """Debian's shim-signed (and shim-helpers) and grub-efi-<arch>-signed files."""
    put(root, f"/usr/lib/shim/shim{arch}.efi.signed", f"shim {arch}\n")
    if mm:
        put(root, f"/usr/lib/shim/mm{arch}.efi.signed", f"mm {arch}\n")
        put(root, f"/usr/lib/shim/fb{arch}.efi.signed", f"fb {arch}\n")
    put(root, f"/usr/lib/grub/{cpu}-efi-signed/grub{arch}.efi.signed", f"signed grub {arch}\n")


def esp(root):
    """{ESP-relative path: content} of every file on the ESP."""
    base = root / "boot" / "efi"
    out = {}
    for dirpath, _, files in os.walk(base):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                out[os.path.relpath(path, base)] = f.read()
    return out


LOADER_CFG = (f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}\n"
              "set prefix=($root)/boot/grub\n"
              "configfile $prefix/grub.cfg\n")


def test_shim_layout(tmp_path):
    """With shim: BOOTX64.EFI is shim, signed GRUB and MokManager beside it and under the vendor."""
    debian_tree(tmp_path)
    shim(tmp_path)
    put(tmp_path, "/usr/lib/grub/x86_64-efi/monolithic/grubx64.efi", "monolithic\n")
    proc = ok(GRUB, tmp_path, PLAIN)
    assert esp(tmp_path) == {
        "EFI/BOOT/BOOTX64.EFI": "shim x64\n",
        "EFI/BOOT/grubx64.efi": "signed grub x64\n",
        "EFI/BOOT/mmx64.efi": "mm x64\n",
        "EFI/debian/shimx64.efi": "shim x64\n",
        "EFI/debian/grubx64.efi": "signed grub x64\n",
        "EFI/debian/mmx64.efi": "mm x64\n",
        "EFI/debian/grub.cfg": LOADER_CFG,
    }
    assert "/boot/efi/EFI/BOOT/BOOTX64.EFI <- /usr/lib/shim/shimx64.efi.signed" in proc.stdout


def test_monolithic_grub_without_shim(tmp_path):
    """Without shim: the monolithic GRUB image as BOOTX64.EFI and under the vendor."""
    debian_tree(tmp_path)
    put(tmp_path, "/usr/lib/grub/x86_64-efi/monolithic/grubx64.efi", "monolithic\n")
    ok(GRUB, tmp_path, PLAIN)
    assert esp(tmp_path) == {"EFI/BOOT/BOOTX64.EFI": "monolithic\n",
                             "EFI/debian/grubx64.efi": "monolithic\n",
                             "EFI/debian/grub.cfg": LOADER_CFG}


def test_shim_without_grub_and_nothing_at_all(tmp_path):
    """Shim alone, or no EFI binaries at all, is a clear one-line error; the ESP stays empty."""
    debian_tree(tmp_path)
    fails(GRUB, tmp_path, PLAIN, "uefi: the tree has no UEFI boot loader: install shim-signed")
    assert not (tmp_path / "boot/efi").exists()
    put(tmp_path, "/usr/lib/shim/shimx64.efi.signed", "shim\n")
    fails(GRUB, tmp_path, PLAIN, "has shimx64.efi.signed but no GRUB for x64 "
                                 "(install grub-efi-amd64-signed)")
    assert not (tmp_path / "boot/efi").exists()


def test_arm64_names_and_arch_choice(tmp_path):
    """aa64 binaries get aa64 names; with two architectures uefi.arch must choose."""
    debian_tree(tmp_path)
    shim(tmp_path, "aa64", "arm64", mm=False)
    ok(GRUB, tmp_path, PLAIN)
    assert esp(tmp_path) == {"EFI/BOOT/BOOTAA64.EFI": "shim aa64\n",
                             "EFI/BOOT/grubaa64.efi": "signed grub aa64\n",
                             "EFI/debian/shimaa64.efi": "shim aa64\n",
                             "EFI/debian/grubaa64.efi": "signed grub aa64\n",
                             "EFI/debian/grub.cfg": LOADER_CFG}
    shim(tmp_path)
    fails(GRUB, tmp_path, PLAIN, "UEFI boot loaders for x64, aa64: choose one with uefi.arch")
    ok(GRUB, tmp_path, dict(PLAIN, uefi={"vendor": "debian", "arch": "x64"}))
    assert esp(tmp_path)["EFI/BOOT/BOOTX64.EFI"] == "shim x64\n"


def test_fedora_packages_already_on_the_esp(tmp_path):
    """A tree whose packages put BOOTX64.EFI onto the ESP is left alone."""
    debian_tree(tmp_path)
    put(tmp_path, "/boot/efi/EFI/BOOT/BOOTX64.EFI", "fedora shim\n")
    proc = ok(GRUB, tmp_path, dict(PLAIN, uefi={"vendor": "fedora"}))
    assert esp(tmp_path)["EFI/BOOT/BOOTX64.EFI"] == "fedora shim\n"
    assert "already installed EFI/BOOT/BOOTX64.EFI" in proc.stdout


def test_links_in_the_tree_resolve_inside_it(tmp_path):
    """Absolute links (as Debian's alternatives use) are followed inside the tree."""
    debian_tree(tmp_path)
    shim(tmp_path)
    real = tmp_path / "usr/lib/shim/shimx64.efi.signed"
    os.rename(real, tmp_path / "usr/lib/shim/shimx64.efi.signed.latest")
    os.symlink("/usr/lib/shim/shimx64.efi.signed.latest", real)
    ok(GRUB, tmp_path, PLAIN)
    assert esp(tmp_path)["EFI/BOOT/BOOTX64.EFI"] == "shim x64\n"


def test_esp_directory_link_refused(tmp_path):
    """An ESP (or EFI directory) that is a symbolic link is refused before anything is written."""
    debian_tree(tmp_path)
    shim(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), tmp_path / "boot/efi")
    fails(GRUB, tmp_path, PLAIN, "/boot/efi in the tree is a symbolic link")
    assert not os.listdir(outside)
    os.unlink(tmp_path / "boot/efi")
    (tmp_path / "boot/efi/EFI").mkdir(parents=True)
    os.symlink(str(outside), tmp_path / "boot/efi/EFI/BOOT")
    fails(GRUB, tmp_path, PLAIN, "/boot/efi/EFI/BOOT in the tree is a symbolic link")
    assert not os.listdir(outside)


def test_existing_link_at_a_destination_is_replaced(tmp_path):
    """A link where BOOTX64.EFI goes is replaced by the file, its target is not written."""
    debian_tree(tmp_path)
    shim(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "boot/efi/EFI/BOOT").mkdir(parents=True)
    os.symlink(str(victim), tmp_path / "boot/efi/EFI/BOOT/BOOTX64.EFI")
    ok(GRUB, tmp_path, PLAIN)
    assert victim.read_text() == "keep\n"
    assert not os.path.islink(tmp_path / "boot/efi/EFI/BOOT/BOOTX64.EFI")
    assert esp(tmp_path)["EFI/BOOT/BOOTX64.EFI"] == "shim x64\n"


def test_schema():
    """uefi.arch is one of the EFI names; the vendor cannot leave EFI/."""
    base = {"root_fs_uuid": ROOT_UUID, "bls": False}
    assert schema_error(GRUB, dict(base, uefi={"vendor": "debian", "arch": "aa64"})) is None
    assert schema_error(GRUB, dict(base, uefi={"vendor": "debian", "arch": "amd64"}))
    assert schema_error(GRUB, dict(base, uefi={"vendor": ".."}))
    assert schema_error(GRUB, dict(base, uefi={"vendor": "a/b"}))


HOST_FILE = "/usr/lib/os-release"


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.skipif(not os.path.isfile(HOST_FILE), reason=f"needs {HOST_FILE} on the host")
def test_attack_shim_link_to_build_root_file(osbuild, store):
    """A tree whose shim links to a build root file (the host's /usr) gets the tree's own file.

    Without resolving links inside the tree, the stage would copy the host's
    file onto the image's ESP.
    """
    tree_text = "tree's own os-release\n"
    script = (
        "mkdir -p boot usr/lib/shim usr/lib/grub/x86_64-efi-signed\n"
        f"echo kernel > boot/vmlinuz-{KERNEL}\n"
        f"ln -s boot/vmlinuz-{KERNEL} vmlinuz\n"
        f"printf \"{tree_text.strip()}\\n\" > usr/lib/os-release\n"
        f"ln -s {HOST_FILE} usr/lib/shim/shimx64.efi.signed\n"
        "echo grub > usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed\n")
    with open(HOST_FILE, "rb") as f:
        host_before = f.read()
    res = osbuild({"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": script}},
        {"name": GRUB, "options": PLAIN}]}}, store)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tree = os.path.join(store, "refs", res.json["tree_id"])
    with open(os.path.join(tree, "boot/efi/EFI/BOOT/BOOTX64.EFI"), "rb") as f:
        copied = f.read()
    assert copied == tree_text.encode(), copied[:200]
    assert copied != host_before
    with open(HOST_FILE, "rb") as f:
        assert f.read() == host_before


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_attack_esp_link_out_of_the_tree(osbuild, store):
    """A tree whose /boot/efi points out of the tree fails cleanly; nothing is committed."""
    script = (
        "mkdir -p boot usr/lib/shim usr/lib/grub/x86_64-efi-signed\n"
        f"echo kernel > boot/vmlinuz-{KERNEL}\n"
        f"ln -s boot/vmlinuz-{KERNEL} vmlinuz\n"
        "echo shim > usr/lib/shim/shimx64.efi.signed\n"
        "echo grub > usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed\n"
        "ln -s /run/osbuild boot/efi\n")
    res = osbuild({"pipeline": {"stages": [
        {"name": "org.osbuild.script", "options": {"chroot": False, "script": script}},
        {"name": GRUB, "options": PLAIN}]}}, store)
    assert res.returncode == 1
    last = res.json["stages"][-1]
    assert last["name"] == GRUB and last["success"] is False
    assert "/boot/efi in the tree is a symbolic link" in last["output"]
    assert "Traceback" not in last["output"]
    assert not os.path.lexists(os.path.join(store, "refs", last["id"]))
    assert not os.path.lexists("/run/osbuild/EFI")
    assert len(os.listdir(os.path.join(store, "refs"))) == 0


def test_link_loops_and_fifos_are_not_boot_loaders(tmp_path):
    """A shim that is a link loop or a FIFO counts as absent: the monolithic GRUB is used."""
    debian_tree(tmp_path)
    (tmp_path / "usr/lib/shim").mkdir(parents=True)
    os.symlink("b", tmp_path / "usr/lib/shim/a")
    os.symlink("a", tmp_path / "usr/lib/shim/b")
    os.symlink("a", tmp_path / "usr/lib/shim/shimx64.efi.signed")
    os.mkfifo(tmp_path / "usr/lib/shim/mmx64.efi.signed")
    fails(GRUB, tmp_path, PLAIN, "the tree has no UEFI boot loader")
    put(tmp_path, "/usr/lib/grub/x86_64-efi/monolithic/grubx64.efi", "monolithic\n")
    ok(GRUB, tmp_path, PLAIN)
    assert esp(tmp_path)["EFI/BOOT/BOOTX64.EFI"] == "monolithic\n"
