"""osbuild.loop (ioctls) and osbuild.remoteloop (the API the assemblers use)."""

import contextlib
import os
import stat
import subprocess
import tempfile

import pytest

from osbuild import loop, remoteloop
from osbuild.util import jsoncomm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control"),
                       reason="needs root and loop devices"),
]

MIB = 1024 * 1024


def open_fds():
    """This process' open file descriptors."""
    return set(os.listdir("/proc/self/fd"))


def attached_to(path):
    """Loop devices (from losetup) whose backing file is `path`."""
    out = subprocess.run(["losetup", "--associated", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [line.split(":")[0] for line in out.splitlines()]


@pytest.fixture(name="image")
def image_fixture(tmp_path):
    """An 8 MiB image file whose MiB n is filled with the byte n, in the server's output dir."""
    (tmp_path / "out").mkdir(exist_ok=True)
    path = tmp_path / "out" / "image"
    with open(path, "wb") as f:
        for n in range(8):
            f.write(bytes([n]) * MIB)
    return path


def test_info_struct_roundtrip():
    """struct loop_info64 packs to the kernel's 232 bytes and back."""
    info = loop.LoopInfo(offset=3 * MIB, sizelimit=2 * MIB, flags=loop.LO_FLAGS_AUTOCLEAR)
    data = info.pack()
    assert len(data) == 232
    back = loop.LoopInfo.unpack(data)
    assert (back.offset, back.sizelimit, back.autoclear) == (3 * MIB, 2 * MIB, True)


def test_attach_offset_sizelimit_detach(image):
    """Offset, size limit and autoclear are set; detach removes the device; no fd leaks."""
    before = open_fds()
    fd = os.open(image, os.O_RDWR)
    try:
        with loop.LoopControl() as ctl:
            lo = ctl.attach(fd, offset=2 * MIB, sizelimit=3 * MIB)
        try:
            info = lo.get_status()
            assert (info.offset, info.sizelimit, info.autoclear) == (2 * MIB, 3 * MIB, True)
            assert not info.flags & loop.LO_FLAGS_DIRECT_IO
            assert f"/dev/{lo.devname}" in attached_to(image)
            dev = f"/dev/{lo.devname}"
            size = subprocess.run(["blockdev", "--getsize64", dev], capture_output=True,
                                  text=True, check=True).stdout
            assert int(size) == 3 * MIB
            with open(dev, "rb") as f:
                assert f.read(4) == b"\x02" * 4
                f.seek(3 * MIB - 1)
                assert f.read(1) == b"\x04"
            # Writes reach the image after a flush.
            with open(dev, "r+b") as f:
                f.write(b"written")
            lo.flush()
        finally:
            lo.clear_fd()
            lo.close()
    finally:
        os.close(fd)
    assert attached_to(image) == []
    with open(image, "rb") as f:
        f.seek(2 * MIB)
        assert f.read(7) == b"written"
    assert open_fds() == before


def test_autoclear_on_last_close(image):
    """An autoclear device goes away when its last user closes it."""
    fd = os.open(image, os.O_RDWR)
    with loop.LoopControl() as ctl:
        lo = ctl.attach(fd)
    os.close(fd)
    assert attached_to(image) != []
    lo.close()
    assert attached_to(image) == []


def test_busy_device_is_skipped(image, monkeypatch):
    """When the free device is taken before we attach (EBUSY), another one is used."""
    fd = os.open(image, os.O_RDWR)
    try:
        with loop.LoopControl() as ctl:
            taken = ctl.attach(fd)
            real = loop.LoopControl.get_unbound
            calls = []

            def racy(self):
                calls.append(1)
                return taken.minor if len(calls) == 1 else real(self)

            monkeypatch.setattr(loop.LoopControl, "get_unbound", racy)
            other = ctl.attach(fd, offset=MIB)
        try:
            assert other.minor != taken.minor
            assert len(calls) == 2
        finally:
            other.close()
            taken.close()
    finally:
        os.close(fd)
    assert attached_to(image) == []


def test_mknod(image, tmp_path):
    """The node is created in the directory; an identical one is accepted, others are not."""
    devdir = tmp_path / "dev"
    devdir.mkdir()
    fd = os.open(image, os.O_RDWR)
    dir_fd = os.open(devdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with loop.LoopControl() as ctl:
            lo = ctl.attach(fd)
        with lo:
            assert lo.mknod(dir_fd) is True
            st = os.stat(devdir / lo.devname)
            assert stat.S_ISBLK(st.st_mode) and st.st_rdev == lo.rdev
            assert lo.mknod(dir_fd) is False
            os.unlink(devdir / lo.devname)
            (devdir / lo.devname).write_text("not a device")
            with pytest.raises(loop.LoopError, match="not that loop device"):
                lo.mknod(dir_fd)
    finally:
        os.close(dir_fd)
        os.close(fd)
    assert attached_to(image) == []


def test_negative_offset_is_refused(image):
    """Nonsense geometry is an error before anything is attached."""
    fd = os.open(image, os.O_RDWR)
    try:
        with loop.LoopControl() as ctl, pytest.raises(loop.LoopError):
            ctl.attach(fd, offset=-512)
    finally:
        os.close(fd)


@pytest.fixture(name="server")
def server_fixture(tmp_path):
    """A running LoopServer; yields (server, socket path)."""
    api_dir = tmp_path / "api"
    api_dir.mkdir()
    devdir = tmp_path / "dev"
    devdir.mkdir()
    (tmp_path / "out").mkdir(exist_ok=True)
    server = remoteloop.LoopServer(str(devdir), output_dir=str(tmp_path / "out"))
    path = server.start(str(api_dir))
    yield server, path
    server.stop()


def test_remoteloop_attach_release(image, tmp_path, server):
    """The client gets a node in the server's directory; release detaches it, removes the node."""
    srv, path = server
    devdir = tmp_path / "dev"
    before = open_fds()
    client = remoteloop.LoopClient(path)
    fd = os.open(image, os.O_RDWR)
    try:
        with client.device(fd, offset=MIB, sizelimit=2 * MIB) as dev:
            assert os.path.dirname(dev) == str(devdir)
            assert stat.S_ISBLK(os.stat(dev).st_mode)
            assert srv.devices == [os.path.basename(dev)]
            assert len(attached_to(image)) == 1
            with open(dev, "r+b") as f:
                assert f.read(1) == b"\x01"
                f.seek(2 * MIB - 5)
                f.write(b"tail!")
    finally:
        os.close(fd)
    assert srv.devices == []
    assert os.listdir(devdir) == []
    assert attached_to(image) == []
    with open(image, "rb") as f:
        f.seek(3 * MIB - 5)
        assert f.read(5) == b"tail!"
    assert open_fds() == before


def test_remoteloop_on_tmpfs(tmp_path):
    """No O_DIRECT: an image on tmpfs works."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    (tmp_path / "api").mkdir()
    (tmp_path / "dev").mkdir()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as out:
        server = remoteloop.LoopServer(str(tmp_path / "dev"), output_dir=out)
        path = server.start(str(tmp_path / "api"))
        fd = os.open(os.path.join(out, "image"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 4 * MIB)
            with remoteloop.LoopClient(path).device(fd) as dev:
                with open(dev, "r+b") as f:
                    f.write(b"tmpfs")
            assert os.pread(fd, 5, 0) == b"tmpfs"
        finally:
            os.close(fd)
            server.stop()


def test_remoteloop_stop_detaches_leftovers(image, tmp_path, server):
    """stop() detaches what clients never released, and removes their nodes."""
    srv, path = server
    devdir = tmp_path / "dev"
    fd = os.open(image, os.O_RDWR)
    try:
        with jsoncomm.Socket.new_client(path) as sock:
            for offset in (0, MIB):
                reply, _ = sock.call({"method": "attach", "fd": 0,
                                      "offset": offset, "sizelimit": MIB}, [fd])
                assert "devname" in reply
        assert len(attached_to(image)) == 2
        assert len(os.listdir(devdir)) == 2
    finally:
        os.close(fd)
        srv.stop()
    assert srv.devices == []
    assert attached_to(image) == []
    assert os.listdir(devdir) == []


def test_remoteloop_errors(image, server):
    """Bad requests get an error reply, not a dead server."""
    _, path = server
    fd = os.open(image, os.O_RDWR)
    try:
        with jsoncomm.Socket.new_client(path) as sock:
            reply, _ = sock.call({"method": "attach", "fd": 1}, [fd])
            assert "error" in reply
            reply, _ = sock.call({"method": "release", "devname": "loop99999"})
            assert "not a device of this server" in reply["error"]
            reply, _ = sock.call({"method": "format-disk"})
            assert "unknown request" in reply["error"]
            reply, _ = sock.call({"method": "attach", "fd": 0, "offset": "x"}, [fd])
            assert "error" in reply
    finally:
        os.close(fd)
    assert attached_to(image) == []
    # The client turns an error reply into LoopError.
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(loop.LoopError):
            with remoteloop.LoopClient(path).device(null):
                pass
    finally:
        os.close(null)


def test_client_without_server(tmp_path):
    """Outside osbuild there is no API socket: a clear error, no leaked fds."""
    before = open_fds()
    client = remoteloop.LoopClient(str(tmp_path / "remoteloop"))
    with pytest.raises(loop.LoopError, match="no remoteloop API"):
        with client.device(0):
            pass
    assert open_fds() == before


def _mounts():
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return f.read()


@contextlib.contextmanager
def _attached(client, image):
    """The image attached through `client`; yields the device path."""
    fd = os.open(image, os.O_RDWR)
    try:
        with client.device(fd) as dev:
            yield dev
    finally:
        os.close(fd)


@pytest.fixture(name="populate_env")
def populate_env_fixture(tmp_path):
    """A server that may copy from `tree` (as /c/tree) and `tmp` (as /c/tmp), an ext4 image."""
    for name in ("api", "dev", "work", "tree", "tmp"):
        (tmp_path / name).mkdir()
    tree = tmp_path / "tree"
    (tree / "etc").mkdir()
    (tree / "etc" / "owned").write_text("owned")
    os.chown(tree / "etc" / "owned", 12, 34)
    os.symlink("/etc", tree / "hostetc")
    os.setxattr(tree / "etc" / "owned", "user.osbuild", b"kept")
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    server = remoteloop.LoopServer(str(tmp_path / "dev"), output_dir=str(tmp_path),
                                   work_dir=str(tmp_path / "work"),
                                   paths=[("/c/tree", str(tree)),
                                          ("/c/tmp", str(tmp_path / "tmp"))])
    path = server.start(str(tmp_path / "api"))
    yield tmp_path, image, remoteloop.LoopClient(path)
    server.stop()


def test_populate_copies_with_owners_and_xattrs(populate_env):
    """The host mounts the filesystem privately, copies the tree keeping owners, links and
    xattrs, and leaves no mount behind."""
    tmp_path, image, client = populate_env
    before = _mounts()
    with _attached(client, image) as dev:
        client.populate([(dev, "ext4", "/")], [{"path": "/c/tree"}])
        assert _mounts() == before
    assert attached_to(image) == []
    listing = subprocess.run(["debugfs", "-R", "stat /etc/owned", str(image)],
                             capture_output=True, text=True, check=True).stdout
    assert "User:    12" in listing and "Group:    34" in listing, listing
    assert "user.osbuild" in listing, listing
    link = subprocess.run(["debugfs", "-R", "stat /hostetc", str(image)],
                          capture_output=True, text=True, check=True).stdout
    assert "Type: symlink" in link and 'Fast link dest: "/etc"' in link, link
    assert os.listdir(tmp_path / "work") == []


@pytest.mark.parametrize("path, fragment", [
    ("/etc", "not below a directory it may copy"),
    ("/c/tree/../../../etc", "not a normalized path"),
    ("/c/tree/hostetc", "not a directory"),         # a symlink in the tree is not followed
    ("c/tree", "not an absolute path"),
    ("/c/treex", "not below a directory it may copy"),
])
def test_populate_refuses_paths_outside(populate_env, path, fragment):
    """Only directories below the server's paths, reached without symlinks, are copied."""
    _, image, client = populate_env
    with _attached(client, image) as dev:
        with pytest.raises(loop.LoopError, match=fragment):
            client.populate([(dev, "ext4", "/")], [{"path": path}])
    listing = subprocess.run(["debugfs", "-R", "ls -l /", str(image)],
                             capture_output=True, text=True, check=True).stdout
    assert "passwd" not in listing and "etc" not in listing, listing


def test_populate_refuses_bad_mounts(populate_env):
    """Devices of other servers, unknown types, relative or dotted mount points are errors."""
    _, image, client = populate_env
    with _attached(client, image) as dev:
        for mounts, fragment in [
                ([("/dev/sda", "ext4", "/")], "does not name a device"),
                ([(dev, "btrfs", "/")], "cannot mount filesystem type"),
                ([(dev, "ext4", "boot")], "bad mountpoint"),
                ([(dev, "ext4", "/boot/../..")], "bad mountpoint"),
                ([(dev, "ext4", "/boot")], "first mount must be '/'")]:
            with pytest.raises(loop.LoopError, match=fragment):
                client.populate(mounts, [{"path": "/c/tree"}])


def test_populate_reports_a_full_filesystem(populate_env):
    """A tree larger than the filesystem is a clear error, and nothing stays mounted."""
    tmp_path, image, client = populate_env
    with open(tmp_path / "tmp" / "big", "wb") as f:
        f.write(os.urandom(MIB) * 20)
    before = _mounts()
    with _attached(client, image) as dev:
        with pytest.raises(loop.LoopError, match="copying the tree into the image failed"):
            client.populate([(dev, "ext4", "/")], [{"path": "/c/tmp"}])
    assert _mounts() == before
    assert attached_to(image) == []


def test_populate_refuses_a_filesystem_its_fsck_rejects(populate_env):
    """The host mounts only filesystems its own e2fsck accepts: a crafted image is refused."""
    _, image, client = populate_env
    with open(image, "r+b") as f:
        f.seek(1024 + 0x14)              # s_first_data_block of the superblock
        f.write(b"\xff\xff\x00\x00")
    before = _mounts()
    with _attached(client, image) as dev:
        with pytest.raises(loop.LoopError, match="fails the host's check"):
            client.populate([(dev, "ext4", "/")], [{"path": "/c/tree"}])
    assert _mounts() == before


def test_populate_dest_and_include(populate_env):
    """A copy can go below a destination and take only the entries matching patterns."""
    tmp_path, image, client = populate_env
    mods = tmp_path / "tree" / "mods"
    mods.mkdir()
    for name in ("a.mod", "b.lst", "skip.exec"):
        (mods / name).write_text(name)
    with _attached(client, image) as dev:
        client.populate([(dev, "ext4", "/")], [
            {"path": "/c/tree/mods", "dest": "/boot/grub/i386-pc", "include": ["*.mod", "*.lst"]}])
        for bad, fragment in [({"dest": "boot"}, "bad destination"),
                              ({"dest": "/boot/../.."}, "bad destination"),
                              ({"include": ["../x"]}, "bad include list"),
                              ({"include": "*.mod"}, "bad include list")]:
            with pytest.raises(loop.LoopError, match=fragment):
                client.populate([(dev, "ext4", "/")], [{"path": "/c/tree/mods", **bad}])
    listing = subprocess.run(["debugfs", "-R", "ls /boot/grub/i386-pc", str(image)],
                             capture_output=True, text=True, check=True).stdout
    assert "a.mod" in listing and "b.lst" in listing and "skip.exec" not in listing, listing
