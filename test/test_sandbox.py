"""The sandbox a stage runs in, and the host's care with what stages leave.

A stage writes only to its tree and its own /var, /tmp, /root (and
the container's private /run): the host's /usr, the libdir, the osbuild package,
the sources directory, the build root's /etc and the container root
are read-only; the store, other objects, the sources cache and the rest of
the host are not visible at all; /dev holds no host block devices. Names
and ids are never used as paths unchecked, and symlinks a stage leaves in a
tree are never followed by the host (treesum, commit, copy, removal,
assembler output).
"""

import json
import os
import socket
import subprocess
import sys
import tarfile
import uuid

import pytest

from osbuild import output as osbuild_output
from osbuild.manifest import load
from osbuild.meta import ValidationError, check_name
from osbuild.objectstore import ObjectStore, StoreError, copy_tree, remove_tree
from osbuild.programs.checksum import checksum_error
from osbuild.treesum import treesum

from hygiene import check_store, leftovers, no_leftovers_fixture  # pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def run_osbuild(store, desc, *extra, manifest=None):
    """Run osbuild --json on `desc`; returns (status, result, stdout, stderr)."""
    manifest = manifest or os.path.join(os.path.dirname(str(store)), "manifest.json")
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump(desc, f)
    proc = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store",
                           str(store), "--json", *extra, manifest], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = None
    return proc.returncode, result, proc.stdout, proc.stderr


def script(text):
    """An org.osbuild.script stage."""
    return {"name": "org.osbuild.script", "options": {"chroot": False, "script": text}}


# Paths a stage must not be able to write (container view), and those it may.
READ_ONLY = ["/usr", "/usr/bin", "/bin", "/run/osbuild/lib", "/run/osbuild/lib/stages",
             "/run/osbuild/python/osbuild", "/run/osbuild/sources",
             "/etc", "/"]
WRITABLE = ["/run/osbuild/tree", "/var", "/tmp", "/root"]


@pytest.mark.integration
def test_write_boundaries(tmp_path):
    """Writes to the host's /usr, the libdir, the package, sources, / fail; the tree works."""
    token = f"sandbox{uuid.uuid4().hex}"
    probes = " ".join(READ_ONLY + WRITABLE)
    text = (f"set +e; for d in {probes}; do "
            f"if echo x > $d/{token} 2>/dev/null; then echo \"WRITABLE $d\"; "
            f"rm -f $d/{token}; else echo \"READONLY $d\"; fi; "
            f"if mkdir $d/{token}.d 2>/dev/null; then echo \"MKDIR $d\"; fi; done")
    store = tmp_path / "store"
    status, result, _, stderr = run_osbuild(store, {"pipeline": {"stages": [script(text)]}})
    assert status == 0, stderr
    output = result["stages"][0]["output"]
    for path in READ_ONLY:
        assert f"READONLY {path}\n" in output, output
        assert f"MKDIR {path}\n" not in output, output
    for path in WRITABLE:
        assert f"WRITABLE {path}\n" in output, output
    # and nothing reached the host
    for host in ("/usr", "/usr/bin", REPO, os.path.join(REPO, "stages"),
                 os.path.join(REPO, "osbuild"), "/etc", "/"):
        assert not os.path.exists(os.path.join(host, token))
        assert not os.path.exists(os.path.join(host, token + ".d"))


# Each attack prints "ESCAPED <name>" when it works. They are harmless if they do:
# the sysctl write writes what is there already, sysrq 'h' only prints help.
ESCAPE_SCRIPT = r"""
set +e
ok() { echo "ESCAPED $1"; }
sed 's/^/UIDMAP /' /proc/self/uid_map
mount -o remount,rw /usr 2>/dev/null && ok remount-usr
mount -o remount,rw,bind /usr 2>/dev/null && ok remount-bind-usr
mount -o remount,rw,bind /run/osbuild/lib 2>/dev/null && ok remount-libdir
mount -o remount,rw / 2>/dev/null && ok remount-root
unshare -Urm sh -c 'mount -o remount,rw,bind /usr && touch /usr/.x' 2>/dev/null && ok userns-remount
mknod /tmp/mem c 1 1 2>/dev/null && ok mknod-char
mknod /tmp/disk b 8 0 2>/dev/null && ok mknod-block
cat /proc/sys/kernel/core_pattern > /tmp/cp
cat /tmp/cp > /proc/sys/kernel/core_pattern 2>/dev/null && ok sysctl-core-pattern
mkdir /tmp/proc
if mount -t proc proc /tmp/proc 2>/dev/null; then
  cat /tmp/cp > /tmp/proc/sys/kernel/core_pattern 2>/dev/null && ok fresh-proc-sysctl
  umount /tmp/proc
fi
echo h > /proc/sysrq-trigger 2>/dev/null && ok sysrq
[ -e /run/osbuild/dev ] && ok loop-node-directory-in-a-stage
python3 - PORT <<'PYTHON'
import ctypes, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
class Handle(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("f", ctypes.c_ubyte * 128)]
# inode 2 is the root directory of an ext4 filesystem: the host's, if the tree is on it
handle = Handle(8, 1)
handle.f[:8] = list(struct.pack("<II", 2, 0))
mount_fd = os.open("/run/osbuild/tree", os.O_RDONLY | os.O_DIRECTORY)
fd = libc.open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_RDONLY | os.O_DIRECTORY)
if fd >= 0:
    print("ESCAPED open_by_handle_at", sorted(os.listdir(fd))[:5])
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
    print("ESCAPED host-tcp")
except OSError:
    pass
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(b"\0" + b"ABSTRACT")
    print("ESCAPED abstract-socket")
except OSError:
    pass
PYTHON
echo done
"""


@pytest.mark.integration
def test_root_in_the_container_is_not_root_on_the_host(tmp_path):
    """Stages run as root of an unprivileged user namespace with their own network:
    remounting read-only binds (even from a nested user namespace), mknod, host
    sysctls, sysrq, open_by_handle_at, the host's TCP ports and abstract sockets
    all fail."""
    listener = socket.create_server(("127.0.0.1", 0))
    abstract = f"osbuild-test-{uuid.uuid4().hex}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(b"\0" + abstract.encode())
    unix.listen()
    with open("/proc/sys/kernel/core_pattern", encoding="utf-8") as f:
        core_pattern = f.read()
    text = ESCAPE_SCRIPT.replace("PORT", str(listener.getsockname()[1]))
    text = text.replace("ABSTRACT", abstract)
    store = tmp_path / "store"
    try:
        status, result, _, stderr = run_osbuild(store, {"pipeline": {"stages": [script(text)]}})
    finally:
        listener.close()
        unix.close()
    assert status == 0, stderr
    output = result["stages"][0]["output"]
    assert "done\n" in output, output
    assert "ESCAPED" not in output, output
    uidmap = [line.split() for line in output.splitlines() if line.startswith("UIDMAP")]
    assert len(uidmap) == 1 and uidmap[0][1] == "0" and int(uidmap[0][2]) >= 0x10000, uidmap
    with open("/proc/sys/kernel/core_pattern", encoding="utf-8") as f:
        assert f.read() == core_pattern


@pytest.mark.integration
def test_host_and_store_invisible(tmp_path):
    """The store, other objects, the sources cache and host directories are not visible."""
    store = tmp_path / "store"
    secret = f"other-object-{uuid.uuid4().hex}"
    # an object of another pipeline, and something in the sources cache
    status, _, _, stderr = run_osbuild(store, {"pipeline": {"stages": [
        script(f"echo {secret} > {secret}")]}})
    assert status == 0, stderr
    os.makedirs(store / "sources" / "org.osbuild.files", exist_ok=True)
    (store / "sources" / "org.osbuild.files" / secret).write_text(secret)
    sentinel = tmp_path / "host-dir"
    sentinel.mkdir()
    paths = [str(store), str(store / "objects"), str(store / "sources"), str(tmp_path), REPO,
             "/work", str(sentinel)]
    commands = [f"if [ -e {p} ]; then echo \"VISIBLE {p}\"; fi" for p in paths]
    # nspawn may create empty mount points; the host's contents must not show
    commands += [f"if [ -n \"$(ls -A {p} 2>/dev/null)\" ]; then echo \"VISIBLE {p}\"; fi"
                 for p in ("/root", "/home", "/srv", "/mnt", "/opt")]
    checks = "; ".join(commands)
    text = (f"set +e; {checks}; "
            f"find / -path /proc -prune -o -path /sys -prune -o -name '{secret}*' -print "
            "| sed 's/^/FOUND /'; "
            "find /dev -type b | sed 's/^/BLOCKDEV /'; echo done")
    status, result, _, stderr = run_osbuild(store, {"pipeline": {"stages": [script(text)]}})
    assert status == 0, stderr
    output = result["stages"][0]["output"]
    assert "done\n" in output
    assert "VISIBLE" not in output, output
    assert "FOUND" not in output, output
    assert "BLOCKDEV" not in output, output


@pytest.mark.integration
def test_symlinks_never_followed_by_host(tmp_path):
    """Symlinks out of the tree survive commit, copy-on-write, snapshot, treesum and the
    tar assembler as symlinks; the host files they point at are never read or changed."""
    store = tmp_path / "store"
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_text("precious")
    stage1 = script(f"mkdir -p etc; ln -s /etc/shadow etc/abs; ln -s {sentinel} etc/host-dir; "
                    f"ln -s ../../../../../../../../../.. etc/up; ln -s {sentinel}/keep etc/file")
    stage2 = script("echo two > two")  # copies the committed tree (cp of a tree with the links)
    desc = {"pipeline": {"stages": [stage1, stage2],
                         "assembler": {"name": "org.osbuild.tar",
                                       "options": {"filename": "root.tar"}}}}
    ids = [s.id for s in load(desc, REPO).pipeline.stages]
    out = tmp_path / "out"
    status, result, _, stderr = run_osbuild(store, desc, "--checkpoint", ids[0],
                                            "--output-directory", str(out))
    assert status == 0, stderr
    objects, _ = check_store(store)
    for tree_id in (ids[0], result["tree_id"]):
        etc = os.path.join(store, "refs", tree_id, "etc")
        assert os.readlink(os.path.join(etc, "abs")) == "/etc/shadow"
        assert os.readlink(os.path.join(etc, "host-dir")) == str(sentinel)
        assert os.path.islink(os.path.join(etc, "up"))
    assert sorted(os.listdir(sentinel)) == ["keep"]
    assert (sentinel / "keep").read_text() == "precious"
    # the tree's hash covers the links, not what they point at
    before = set(objects)
    (sentinel / "keep").write_text("changed")
    (sentinel / "new").write_text("new")
    assert {treesum(os.path.join(store, "objects", o)) for o in objects} == before
    with tarfile.open(out / "root.tar") as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers()}
    assert members["etc/host-dir"].issym() and members["etc/abs"].issym()
    assert "etc/host-dir/keep" not in members


def test_treesum_copy_remove_do_not_follow(tmp_path):
    """Host-side tree operations treat symlinks as links (no follow) even to directories."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data").write_text("data")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    os.symlink(str(outside), tree / "sub" / "dir-link")
    os.symlink(str(outside / "data"), tree / "file-link")
    os.symlink("../../../../../../..", tree / "up")
    first = treesum(str(tree))
    (outside / "data").write_text("other")
    (outside / "more").write_text("more")
    assert treesum(str(tree)) == first
    copy = tmp_path / "copy"
    copy_tree(str(tree), str(copy))
    assert os.path.islink(copy / "sub" / "dir-link") and os.path.islink(copy / "up")
    assert treesum(str(copy)) == first
    os.chmod(tree / "sub", 0o000)
    remove_tree(str(tree))
    remove_tree(str(copy))
    assert not tree.exists() and not copy.exists()
    assert sorted(os.listdir(outside)) == ["data", "more"]


@pytest.mark.parametrize("bad", ["../x", "../../etc/passwd", "/etc/passwd", "", "0" * 63 + "/",
                                 "0" * 64 + "\n", "..", "."])
def test_store_rejects_path_like_ids(tmp_path, bad):
    """Object ids are single safe file names (as in the original, not only hex: see
    test_library_api); anything else is refused before touching a path."""
    store = ObjectStore(str(tmp_path / "store"))
    with pytest.raises(StoreError):
        store.resolve_ref(bad)
    with pytest.raises(StoreError):
        with store.new(bad):
            pass
    assert os.listdir(store.refs) == [] and os.listdir(store.tmp) == []


@pytest.mark.parametrize("bad", ["../stages/org.osbuild.noop", "org.osbuild.noop/../x", "..",
                                 "/bin/sh", "org.osbuild.noop\n", ".hidden", "a/b", "", "x" * 300])
def test_program_names_validated(bad):
    """Stage/assembler/runner names are plain file names."""
    with pytest.raises(ValidationError):
        check_name(bad, "stage")


@pytest.mark.parametrize("bad", ["sha256:../../../etc/passwd", "sha256:" + "0" * 63 + "/",
                                 "../sha256:" + "0" * 64, "sha256:" + "0" * 64 + "/.."])
def test_checksums_validated(bad):
    """Source checksums never reach a path unchecked."""
    assert checksum_error(bad) is not None


@pytest.mark.integration
@pytest.mark.parametrize("args, desc, fragment", [
    (["--checkpoint", "../../../etc"], {"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}},
     "checkpoint"),
    ([], {"pipeline": {"stages": [{"name": "../stages/org.osbuild.noop"}]}}, "stages[0]"),
    ([], {"pipeline": {"build": {"runner": "../../usr/bin/env", "pipeline": {}}}}, "runner"),
    ([], {"pipeline": {"assembler": {"name": "../assemblers/org.osbuild.noop"}}}, "assembler"),
])
def test_cli_rejects_path_names(tmp_path, args, desc, fragment):
    """Path-like names on the command line or in the manifest: exit 1, nothing built."""
    store = tmp_path / "store"
    status, _, stdout, stderr = run_osbuild(store, desc, *args)
    assert status == 1
    assert stderr.startswith("osbuild: ") and fragment in stderr and "Traceback" not in stderr
    # --json: the same error as one JSON object (issue 14)
    assert json.loads(stdout) == {"success": False, "error": stderr.strip()[len("osbuild: "):]}
    assert not (store / "refs").exists() or os.listdir(store / "refs") == []
    assert leftovers(tmp_path) == {}


def test_output_copy_keeps_symlinks(tmp_path):
    """--output-directory copies an assembler output's symlinks as links, never what
    they point at, and replaces a link already in the output directory, not its target."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_text("precious")
    store = ObjectStore(str(tmp_path / "store"))
    output_id = "ef" * 32
    with store.new(output_id) as obj:
        out = obj.write()
        os.symlink(str(sentinel), os.path.join(out, "dir-link"))
        os.mkdir(os.path.join(out, "sub"))
        os.symlink("/etc/shadow", os.path.join(out, "sub", "abs"))
        with open(os.path.join(out, "image.raw"), "w", encoding="utf-8") as f:
            f.write("image")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(str(sentinel), dest / "image.raw")  # must be replaced, not written through
    osbuild_output.copy_output(store, output_id, str(dest))
    assert os.readlink(dest / "dir-link") == str(sentinel)
    assert os.readlink(dest / "sub" / "abs") == "/etc/shadow"
    assert not os.path.islink(dest / "image.raw")
    assert (dest / "image.raw").read_text() == "image"
    assert sorted(os.listdir(sentinel)) == ["keep"]
    assert (sentinel / "keep").read_text() == "precious"


def test_only_declared_programs_get_the_host_network(tmp_path):
    """STAGE_NETWORK = "host" is declared by dnf and yum only; anything else is an error."""
    from osbuild.meta import ProgramInfo  # pylint: disable=import-outside-toplevel
    networked = set()
    for kind in ("stages", "assemblers"):
        for name in os.listdir(os.path.join(REPO, kind)):
            if name.startswith("org.osbuild.") and ProgramInfo.load(REPO, kind, name).network:
                networked.add(name)
    assert networked == {"org.osbuild.dnf", "org.osbuild.yum"}
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "org.osbuild.bad").write_text('STAGE_NETWORK = "yes"\n')
    with pytest.raises(ValidationError, match="STAGE_NETWORK"):
        ProgramInfo.load(str(tmp_path), "stages", "org.osbuild.bad")
