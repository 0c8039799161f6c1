"""Partition planning of org.osbuild.qemu, without building anything (no root needed)."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, import_program


qemu = import_program(os.path.join(REPO, "assemblers", "org.osbuild.qemu"),
                      "osbuild_qemu_assembler")
MIB = 1024 * 1024
UUID = "76a22bf4-f153-4541-b6c7-0332c0dfaeac"
ROOT = {"type": "ext4", "uuid": UUID, "mountpoint": "/"}
GRUB = ("grub2", "i386-pc")


def plan(options, pttype="mbr", bootloader=GRUB):
    """Planned (start, size, type, bootable) tuples."""
    parts = qemu.plan_partitions(dict({"size": 64 * MIB}, **options), pttype, bootloader)
    return [(p.start, p.size, p.type, p.bootable) for p in parts]


def test_default_mbr():
    """One bootable Linux partition from 1 MiB to the end."""
    assert plan({"root_fs_uuid": UUID}) == [(2048, 64 * 2048 - 2048, "83", True)]


def test_default_gpt_with_bios_boot():
    """GPT for GRUB/BIOS: a 1 MiB BIOS boot partition, the root up to the backup table."""
    assert plan({"root_fs_uuid": UUID}, "gpt") == [
        (2048, 2048, qemu.BIOS_BOOT_GUID, False),
        (4096, 64 * 2048 - 33 - 4096, qemu.LINUX_GUID, False)]
    assert plan({"root_fs_uuid": UUID}, "gpt", ("none", "i386-pc")) == [
        (2048, 64 * 2048 - 33 - 2048, qemu.LINUX_GUID, False)]


def test_starts_are_aligned_and_sizes_fill_gaps():
    """Missing starts follow the previous partition at 1 MiB; missing sizes fill up."""
    parts = plan({"partitions": [{"size": 100}, {"start": 10000},
                                 {"start": 20000, "filesystem": ROOT}]})
    assert parts == [(2048, 100, "83", False), (10000, 10000, "83", False),
                     (20000, 64 * 2048 - 20000, "83", False)]


def test_root_fs_uuid_required_without_partitions():
    """The default layout needs the root filesystem's uuid."""
    with pytest.raises(qemu.ProgramError, match="root_fs_uuid"):
        plan({})


@pytest.mark.parametrize("partitions,pttype,message", [
    ([{"type": "83"}, {"filesystem": ROOT}], "mbr", "needs a size"),
    ([{"start": 0, "filesystem": ROOT}], "mbr", "outside"),
    ([{"start": 2048, "size": 64 * 2048, "filesystem": ROOT}], "mbr", "outside"),
    ([{"start": 2048, "size": 64 * 2048 - 2048 - 10, "filesystem": ROOT}], "gpt", "outside"),
    ([{"type": "83", "filesystem": ROOT}], "gpt", "not a GPT partition type"),
    ([{"type": qemu.LINUX_GUID, "filesystem": ROOT}], "mbr", "not an MBR partition type"),
    ([{"name": "root", "filesystem": ROOT}], "mbr", "need a GPT"),
    ([{"size": 4096, "filesystem": ROOT}, {"filesystem": dict(ROOT, uuid=UUID)}], "mbr",
     "same mountpoint"),
    ([{"filesystem": dict(ROOT, type="vfat", uuid="46BB-8120")}], "mbr", "vfat"),
    ([{"size": 4096, "filesystem": dict(ROOT, mountpoint="/boot", type="vfat",
                                        uuid="46BB-8120")},
      {"size": 4096, "filesystem": dict(ROOT, mountpoint="/boot/efi")},
      {"filesystem": ROOT}], "mbr", "vfat"),
    ([{"filesystem": dict(ROOT, uuid="46BB-8120")}], "mbr", "not a valid ext4 uuid"),
    ([{"filesystem": dict(ROOT, mountpoint="/boot/../etc")}], "mbr", "normalized"),
])
def test_bad_layouts(partitions, pttype, message):
    """Each bad layout is refused with a message naming the problem."""
    with pytest.raises(qemu.ProgramError, match=message):
        plan({"partitions": partitions}, pttype)


def test_core_image_must_fit():
    """The i386-pc core image goes into the MBR gap or the BIOS boot partition, if it fits."""
    parts = qemu.plan_partitions({"size": 64 * MIB, "partitions": [
        {"start": 64, "filesystem": ROOT}]}, "mbr", GRUB)
    assert qemu.core_location(parts, "mbr", 63 * 512) == 1
    with pytest.raises(qemu.ProgramError, match="does not fit"):
        qemu.core_location(parts, "mbr", 64 * 512)
    parts = qemu.plan_partitions({"size": 64 * MIB, "root_fs_uuid": UUID}, "gpt", GRUB)
    assert qemu.core_location(parts, "gpt", 2048 * 512) == 2048
    with pytest.raises(qemu.ProgramError, match="BIOS boot partition"):
        qemu.core_location(parts, "gpt", 2049 * 512)


def test_sfdisk_lines():
    """The sfdisk script carries every attribute in the partition table's own terms."""
    gpt = qemu.Partition(1, 2048, 8192, qemu.BIOS_BOOT_GUID, bootable=True,
                         uuid="6264D520-3FB9-423F-8AB8-7A0A8E3D3562", name="bios boot")
    assert gpt.sfdisk_line("gpt") == (
        f"start=2048, size=8192, type={qemu.BIOS_BOOT_GUID}, "
        'uuid=6264D520-3FB9-423F-8AB8-7A0A8E3D3562, name="bios boot", '
        'attrs="LegacyBIOSBootable"')
    assert qemu.Partition(1, 2048, 10, "83", bootable=True).sfdisk_line("mbr") == \
        "start=2048, size=10, type=83, bootable"


SPEC = st.fixed_dictionaries({}, optional={
    "start": st.integers(min_value=0, max_value=70000),
    "size": st.integers(min_value=0, max_value=70000),
})


@settings(max_examples=300, deadline=None)
@given(st.lists(SPEC, min_size=1, max_size=4), st.sampled_from(["mbr", "gpt"]))
def test_planned_layouts_are_sound(specs, pttype):
    """Whatever the input, a plan lies inside the disk, has no overlaps and keeps what was given."""
    specs = [dict(s) for s in specs]
    specs[-1]["filesystem"] = ROOT
    total = 32 * MIB // 512
    try:
        parts = qemu.plan_partitions({"size": 32 * MIB, "partitions": specs}, pttype, GRUB)
    except qemu.ProgramError:
        return
    first, limit = (34, total - 33) if pttype == "gpt" else (1, total)
    for spec, part in zip(specs, parts):
        assert first <= part.start and part.size > 0 and part.end <= limit
        assert part.start == spec.get("start", part.start)
        assert part.size == spec.get("size", part.size)
    ordered = sorted(parts, key=lambda p: p.start)
    assert all(a.end <= b.start for a, b in zip(ordered, ordered[1:]))


def test_prep_core_goes_into_prep_partition(tmp_path):
    """powerpc-ieee1275: the core image is written at the start of the PReP partition."""
    parts = qemu.plan_partitions({"size": 16 * MIB, "partitions": [
        {"size": 8192, "type": "41", "bootable": True},
        {"start": 10240, "filesystem": ROOT}]}, "mbr", ("grub2", "powerpc-ieee1275"))
    image = tmp_path / "disk"
    image.write_bytes(bytes(16 * MIB))
    qemu.install_prep(str(image), parts, "mbr", b"\x7fELF-core")
    data = image.read_bytes()
    assert data[2048 * 512:2048 * 512 + 9] == b"\x7fELF-core"
    assert data.count(b"\x7fELF") == 1
    with pytest.raises(qemu.ProgramError, match="does not fit"):
        qemu.install_prep(str(image), parts, "mbr", bytes(8192 * 512 + 1))
    with pytest.raises(qemu.ProgramError, match="needs a PReP partition"):
        qemu.install_prep(str(image), parts[1:], "mbr", b"core")
