"""The original's option forms, each built through osbuild (issue 14).

One manifest per form that the original accepted and built: string ids for
users and groups, groups' `name`, tar's `size` and its other compressions,
rawfs' `fs_type`, qemu's `raw.xz`, dnf's `fastestmirror`, inline TLS
material and several locations per repository, yum's `verbosity` without
`basearch`, grub2's `kernel_opts` with double quotes, and the script stage
running inside the tree.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import rpmrepo
from conftest import REPO, run_osbuild
from stageprog import FAKE_DEBIAN, fails, schema_error
from test_stages_config import DebianBuilds

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
pytestmark = [pytest.mark.integration, needs_root]

ROOT_UUID = "76a22bf4-f153-4541-b6c7-0332c0dfaeac"
PEM = "-----BEGIN CERTIFICATE-----\nMIIBcompat\nsslverify=0\n-----END CERTIFICATE-----\n"
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nMIIEcompat\n-----END PRIVATE KEY-----\n"


def script(text):
    """A build-root script stage (works on an empty tree)."""
    return {"name": "org.osbuild.script", "options": {"chroot": False, "script": text}}


def tree_of(store, result):
    """The committed tree of a --json result."""
    return os.path.join(store, "refs", result["tree_id"])


def output_of(store, result):
    """The assembler's output directory of a --json result."""
    return os.path.join(store, "refs", result["output_id"])


def built(manifest, store, *args):
    """Build `manifest`; the --json result (the build must succeed)."""
    res = run_osbuild(manifest, store, *args)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert res.json["success"] is True
    return res.json


def file_hash(path):
    """sha256 of a file, or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


# --------------------------------------------------------------- org.osbuild.script

# A tiny tree with the build root's dash (and its libraries) as /bin/sh and a
# marker file that only the tree has.
MINI_TREE = script(
    "mkdir -p bin etc\n"
    "cp -L /bin/sh bin/sh\n"
    "for l in $(ldd /bin/sh | grep -o '/[^ ]*'); do cp -L --parents \"$l\" .; done\n"
    "echo tree > osbuild-tree-marker\n")


def test_script_runs_inside_the_tree(store):
    """A script written for the original changes the image, not the build root or host."""
    host_motd = file_hash("/etc/motd")
    stages = [MINI_TREE,
              {"name": "org.osbuild.script", "options": {"script": (
                  "echo x > /etc/motd\n"
                  "[ -e /osbuild-tree-marker ] && echo in-tree > /etc/where\n"
                  "echo $TREE > /etc/tree-variable\n")}},
              {"name": "org.osbuild.script", "options": {"script": (
                  "#!/bin/sh -e\necho shebang > /etc/shebang\n")}},
              script("echo old-mode > etc/old-mode; [ -n \"$TREE\" ] && [ \"$PWD\" = \"$TREE\" ]")]
    result = built({"pipeline": {"stages": stages}}, store)
    tree = tree_of(store, result)
    with open(os.path.join(tree, "etc/motd"), encoding="utf-8") as f:
        assert f.read() == "x\n"
    for name, text in (("where", "in-tree\n"), ("tree-variable", "/\n"), ("shebang", "shebang\n"),
                       ("old-mode", "old-mode\n")):
        with open(os.path.join(tree, "etc", name), encoding="utf-8") as f:
            assert f.read() == text, name
    assert not [n for n in os.listdir(tree) if n.startswith(".osbuild-script")]
    assert file_hash("/etc/motd") == host_motd


def test_script_in_a_tree_without_shell_and_failing_scripts(store):
    res = run_osbuild({"pipeline": {"stages": [
        script("mkdir etc"), {"name": "org.osbuild.script", "options": {"script": "true"}}]}},
        store)
    assert res.returncode == 1
    assert "the tree has no /bin/sh to run the script with" in res.json["stages"][-1]["output"]
    res = run_osbuild({"pipeline": {"stages": [
        MINI_TREE, {"name": "org.osbuild.script", "options": {"script": "exit 7"}}]}}, store)
    assert res.returncode == 1
    assert "script failed with exit status 7" in res.json["stages"][-1]["output"]
    assert not os.path.lexists(os.path.join(store, "refs", res.json["stages"][-1]["id"]))


# --------------------------------------------------------------- users and groups

@pytest.fixture(name="debian", scope="module")
def debian_fixture(tmp_path_factory):
    """Builds on the cached Debian base tree."""
    return DebianBuilds(str(tmp_path_factory.mktemp("compat-debian")))


def test_users_and_groups_with_string_ids(debian):
    """composer's forms: gid/uid as strings, each group entry with its `name`."""
    groups = {"name": "org.osbuild.groups", "options": {"groups": {
        "compatgrp": {"name": "compatgrp", "gid": "1234"},
        "othergrp": {"name": "", "gid": 1235}}}}
    users = {"name": "org.osbuild.users", "options": {"users": {
        "compat": {"uid": "1500", "gid": "1234", "groups": ["othergrp"],
                   "description": "Compat User", "home": "/home/compat"}}}}
    res, tree, _ = debian.apply(groups, users)
    assert res.json["success"]
    with open(os.path.join(tree, "etc/group"), encoding="utf-8") as f:
        group = f.read().splitlines()
    assert "compatgrp:x:1234:" in group
    assert "othergrp:x:1235:compat" in group
    with open(os.path.join(tree, "etc/passwd"), encoding="utf-8") as f:
        passwd = f.read().splitlines()
    assert any(line.startswith("compat:x:1500:1234:Compat User:/home/compat:") for line in passwd)
    debian.cleanup()


def test_string_ids_are_still_checked():
    assert schema_error("org.osbuild.users", {"users": {"a": {"uid": "12a"}}}).startswith(
        "options.users.a.uid:")
    assert schema_error("org.osbuild.users", {"users": {"a": {"gid": "-1"}}}).startswith(
        "options.users.a.gid:")
    assert schema_error("org.osbuild.groups", {"groups": {"a": {"gid": "1 2"}}}).startswith(
        "options.groups.a.gid:")


# --------------------------------------------------------------- assemblers

TREE = script("mkdir -p etc usr/bin; echo compat > etc/hello; "
              "head -c 200000 /dev/urandom > usr/bin/blob")

DECOMPRESS = {"bzip2": "bzip2", "lzip": "lzip", "lzma": "lzma", "lzop": "lzop"}


@pytest.mark.parametrize("compression", sorted(DECOMPRESS))
def test_tar_other_compressions_and_size(store, tmp_path, compression):
    """bzip2, lzip, lzma, lzop, and the `size` one composer version emitted (ignored)."""
    if shutil.which(DECOMPRESS[compression]) is None:
        pytest.fail(f"{DECOMPRESS[compression]} is missing (apt-get install lzip lzop)")
    result = built({"pipeline": {"stages": [TREE], "assembler": {
        "name": "org.osbuild.tar", "options": {"filename": "tree.tar.x",
                                               "compression": compression,
                                               "size": 3221225472}}}}, store)
    archive = os.path.join(output_of(store, result), "tree.tar.x")
    assert "size 3221225472 ignored" in result["assembler"]["output"]
    listing = subprocess.run(["tar", "-I", DECOMPRESS[compression], "-tf", archive],
                             capture_output=True, text=True, check=True).stdout.split()
    assert "./etc/hello" in listing and "./usr/bin/blob" in listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-I", DECOMPRESS[compression], "-xf", archive, "-C", out], check=True)
    assert (out / "etc/hello").read_text() == "compat\n"


def test_rawfs_fs_type(store):
    """`fs_type`, the older name of root_fs_type: xfs is made, not the default ext4."""
    result = built({"pipeline": {"stages": [TREE], "assembler": {
        "name": "org.osbuild.rawfs", "options": {"filename": "root.img", "fs_type": "xfs",
                                                 "root_fs_uuid": ROOT_UUID,
                                                 "size": 320 * 1024 * 1024}}}}, store)
    image = os.path.join(output_of(store, result), "root.img")
    probe = subprocess.run(["blkid", "-p", "-o", "export", image], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert "TYPE=xfs" in probe and f"UUID={ROOT_UUID}" in probe
    res = subprocess.run([sys.executable, "-m", "osbuild", "-l", REPO, "--inspect", "-"],
                         input=json.dumps({"pipeline": {"stages": [TREE], "assembler": {
                             "name": "org.osbuild.rawfs", "options": {
                                 "filename": "r.img", "fs_type": "xfs", "root_fs_type": "ext4",
                                 "root_fs_uuid": ROOT_UUID, "size": 1 << 30}}}}),
                         capture_output=True, text=True, check=False, cwd=REPO)
    assert res.returncode == 1 and res.stderr.startswith("osbuild: pipeline.assembler.options:")


def test_qemu_raw_xz(store, tmp_path):
    """Format raw.xz: the raw disk image compressed with xz, named as given."""
    result = built({"pipeline": {"stages": [TREE], "assembler": {
        "name": "org.osbuild.qemu", "options": {
            "format": "raw.xz", "filename": "disk.raw.xz", "size": 64 * 1024 * 1024,
            "ptuuid": "0x14fc63d2", "root_fs_uuid": ROOT_UUID,
            "bootloader": {"type": "none"}}}}}, store)
    image = os.path.join(output_of(store, result), "disk.raw.xz")
    assert os.listdir(output_of(store, result)) == ["disk.raw.xz"]
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        subprocess.run(["xz", "-dc", image], stdout=f, check=True)
    assert raw.stat().st_size == 64 * 1024 * 1024
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    assert table["label"] == "dos" and table["id"] == "0x14fc63d2"
    assert table["partitions"][0]["start"] == 2048


# --------------------------------------------------------------- grub2 kernel_opts

QUOTED = 'ro console=ttyS0 foo="a b" "menuentry evil" x=""'


def sourced(path, variable):
    """The value of `variable` after a shell sources `path` (as grub-mkconfig does)."""
    return subprocess.run(["sh", "-c", f'. "$1"; printf %s "${variable}"', "sh", path],
                          capture_output=True, text=True, check=True).stdout


def test_grub2_kernel_opts_with_double_quotes(store):
    """`foo="a b"` is a valid kernel argument: quoted safely instead of refused."""
    result = built({"pipeline": {"stages": [FAKE_DEBIAN, {"name": "org.osbuild.grub2", "options": {
        "root_fs_uuid": ROOT_UUID, "bls": False, "kernel_opts": QUOTED}}]}}, store)
    tree = tree_of(store, result)
    cfg = os.path.join(tree, "boot/grub/grub.cfg")
    with open(cfg, encoding="utf-8") as f:
        lines = f.read().splitlines()
    # each argument one GRUB word; GRUB hands "foo=a b" to the kernel as foo="a b"
    assert f"  linux /vmlinuz root=UUID={ROOT_UUID} ro console=ttyS0 'foo=a b' " \
           "'menuentry evil' x=" in lines
    assert sum(line.lstrip().startswith("menuentry") for line in lines) == 1
    if shutil.which("grub-script-check"):
        subprocess.run(["grub-script-check", cfg], check=True)
    assert sourced(os.path.join(tree, "etc/default/grub"), "GRUB_CMDLINE_LINUX") == QUOTED


def test_grub2_bls_kernel_opts_with_double_quotes(store):
    # A Fedora tree's packages put the EFI binaries onto the ESP themselves.
    fedora_esp = script("mkdir -p boot/efi/EFI/BOOT && echo shim > boot/efi/EFI/BOOT/BOOTX64.EFI\n")
    result = built({"pipeline": {"stages": [FAKE_DEBIAN, fedora_esp, {
        "name": "org.osbuild.grub2", "options": {
            "root_fs_uuid": ROOT_UUID, "kernel_opts": 'ro foo="a b"',
            "uefi": {"vendor": "fedora"}}}]}}, store)
    tree = tree_of(store, result)
    with open(os.path.join(tree, "boot/efi/EFI/fedora/grubenv"), encoding="utf-8") as f:
        assert f.read().splitlines()[1] == f'kernelopts=root=UUID={ROOT_UUID} ro foo="a b"'
    assert sourced(os.path.join(tree, "etc/default/grub"), "GRUB_CMDLINE_LINUX") == 'ro foo="a b"'


@pytest.mark.parametrize("opts", ['foo="a', "foo='a b'", 'a="b;c"', 'a="$x"', 'a="b\nc"',
                                  'a="}"', 'a="`id`"'])
def test_grub2_kernel_opts_still_refused(opts):
    """Unpaired quotes and GRUB/shell syntax stay refused (schema, before anything runs)."""
    message = schema_error("org.osbuild.grub2", {"root_fs_uuid": ROOT_UUID, "kernel_opts": opts})
    assert message and message.startswith("options.kernel_opts:"), opts


# --------------------------------------------------------------- dnf and yum

@pytest.fixture(name="repo", scope="module")
def repo_fixture(tmp_path_factory):
    """The signed test packages and their repository, served on 127.0.0.1."""
    if not all(shutil.which(p) for p in ("rpmbuild", "createrepo_c", "dnf", "gpg", "rpmsign")):
        pytest.skip("needs rpm, createrepo-c, dnf and gnupg")
    repo = rpmrepo.RpmRepo(str(tmp_path_factory.mktemp("compat-rpmrepo"))).start()
    yield repo
    repo.stop()


def repo_object(repo):
    """A repository with both baseurl and metalink (a 404 here) and inline TLS material."""
    return {"baseurl": repo.url, "metalink": f"{repo.root_url}/no-metalink.xml",
            "gpgkey": repo.key, "checksum": repo.repomd_checksum,
            "sslcacert": PEM, "sslclientcert": PEM, "sslclientkey": KEY_PEM}


def installed_names(tree):
    """Package names in the tree's rpm database."""
    out = subprocess.run(["rpm", "--root", tree, "--dbpath", "/var/lib/rpm", "-qa",
                          "--qf", "%{NAME}\n"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_dnf_original_forms(repo, store):
    """fastestmirror, baseurl together with metalink, inline sslcacert/sslclient*."""
    result = built({"pipeline": {"stages": [script("mkdir -p etc usr var"), {
        "name": "org.osbuild.dnf", "options": {
            "repos": [repo_object(repo)], "packages": ["osb-app"], "releasever": "30",
            "basearch": "x86_64", "fastestmirror": False}}]}}, store)
    names = installed_names(tree_of(store, result))
    assert {"osb-app", "osb-base"} <= names


def test_yum_verbosity_without_basearch(repo, store):
    """yum's `verbosity`, and no `basearch` (the build root's architecture)."""
    result = built({"pipeline": {"stages": [script("mkdir -p etc usr var"), {
        "name": "org.osbuild.yum", "options": {
            "repos": [repo_object(repo)], "packages": ["osb-base"], "releasever": "30",
            "verbosity": "quiet"}}]}}, store)
    assert "osb-base" in installed_names(tree_of(store, result))
    assert "Running transaction" not in result["stages"][-1]["output"]   # quiet


def test_dnf_inline_pem_never_lands_in_the_repo_file(repo, tmp_path):
    """PEM text is multi-line: written into the .repo file it would add settings (the
    certificate above carries `sslverify=0`). dnf gets it as memory files instead,
    like a source's secret, and nothing of it is written to a disk."""
    bindir, log = tmp_path / "bin", tmp_path / "log"
    bindir.mkdir()
    log.mkdir()
    (bindir / "dnf").write_text(
        "#!/bin/sh\nfor a; do case $a in --setopt=reposdir=*) d=${a#--setopt=reposdir=};; "
        "esac; done\n"
        f"cp $d/*.repo {log}/\nls $(dirname $d) > {log}/tmp-listing\n"
        "for k in sslcacert sslclientcert sslclientkey; do\n"
        f"  cat \"$(sed -n \"s/^$k=//p\" $d/osbuild.repo)\" > {log}/$k\ndone\n"
        "echo 'Error: fake dnf'\nexit 1\n")
    os.chmod(bindir / "dnf", 0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    fails("org.osbuild.dnf", tmp_path / "tree", {
        "repos": [repo_object(repo)], "packages": ["osb-app"], "releasever": "30",
        "basearch": "x86_64"}, "Error: fake dnf", env=env)
    repo_file = (log / "osbuild.repo").read_text()
    assert "BEGIN" not in repo_file and "sslverify" not in repo_file
    settings = dict(line.split("=", 1) for line in repo_file.splitlines() if "=" in line)
    for key, text in (("sslcacert", PEM), ("sslclientcert", PEM), ("sslclientkey", KEY_PEM)):
        assert settings[key].startswith("/proc/self/fd/"), settings[key]
        assert (log / key).read_text() == text
    assert "pem" not in (log / "tmp-listing").read_text()
    assert settings["baseurl"] == repo.url and settings["metalink"].endswith("no-metalink.xml")


def test_dnf_yum_schema_forms():
    checksum = "sha256:" + "9" * 64
    both = {"baseurl": "https://a/", "metalink": "https://b/", "checksum": checksum}
    base = {"repos": [both], "packages": ["x"], "releasever": "30"}
    assert schema_error("org.osbuild.dnf", dict(base, basearch="x86_64",
                                                fastestmirror=True)) is None
    assert schema_error("org.osbuild.yum", dict(base, verbosity="debug")) is None
    assert schema_error("org.osbuild.dnf", dict(base, basearch="x86_64",
                                                fastestmirror="yes")).startswith(
        "options.fastestmirror:")
    bad_pem = dict(base, basearch="x86_64", repos=[dict(both, sslcacert="/etc/pki/ca.pem")])
    assert schema_error("org.osbuild.dnf", bad_pem).startswith("options.repos[0]:")
    assert schema_error("org.osbuild.yum", dict(base, verbosity="loud")).startswith(
        "options.verbosity:")
