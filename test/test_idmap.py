"""osbuild.util.idmap: which binds of the build root can be idmapped."""

import pytest

from osbuild.util import idmap

MOUNTINFO = """\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /run rw,nosuid shared:2 - tmpfs tmpfs rw
24 22 0:44 / /srv/over rw shared:3 - overlay overlay rw,lowerdir=/a,upperdir=/b
25 24 252:1 / /srv/over/store\\040dir rw shared:4 - xfs /dev/vdb rw
26 22 0:50 / /mnt/nfs rw shared:5 - nfs4 server:/x rw
"""


@pytest.fixture(name="table")
def table_fixture(tmp_path):
    """A MountTable read from MOUNTINFO, on a 6.1 kernel."""
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    table = idmap.MountTable(str(path))
    table.kernel = (6, 1)
    return table


@pytest.mark.parametrize("path, fstype, ok", [
    ("/var/lib/osbuild", "ext4", True),
    ("/", "ext4", True),
    ("/run/osbuild", "tmpfs", False),          # tmpfs needs Linux 6.3
    ("/srv/over/x", "overlay", False),
    ("/srv/over/store dir/objects", "xfs", True),  # escaped space, nested mount wins
    ("/srv/overx", "ext4", True),              # a prefix of a name is not a mount point
    ("/mnt/nfs/store", "nfs4", False),
])
def test_fstype_and_support(table, path, fstype, ok):
    """The longest mount point holding the path decides; unknown types are not idmapped."""
    assert table.fstype(path) == fstype
    assert table.supports_idmap(path) is ok


def test_newer_kernel_idmaps_tmpfs(table):
    """tmpfs can be idmapped from Linux 6.3 on."""
    table.kernel = (6, 3)
    assert table.supports_idmap("/run/osbuild")


@pytest.mark.parametrize("release, version", [
    ("6.18.44-fc-v857", (6, 18)), ("5.15.0-91-generic", (5, 15)), ("6.3rc1", (6, 3)),
    ("garbage", (0, 0)),
])
def test_kernel_version(release, version):
    """Distribution suffixes are ignored."""
    assert idmap.kernel_version(release) == version


def test_this_host_can_idmap_its_store(tmp_path):
    """The machine the suite runs on can idmap the test stores (else nothing builds)."""
    assert idmap.MountTable().supports_idmap(str(tmp_path)), idmap.MountTable().fstype(tmp_path)
