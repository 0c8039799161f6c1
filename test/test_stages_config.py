"""The system configuration stages, each applied to a real Debian 12 tree.

Integration tests build the cached debootstrap tree (see stagetest.py) once
per session with a checkpoint, then apply one stage on top of it through a
real osbuild build and compare the committed tree with the base tree using
tools/tree-diff against the exact expected difference.
"""

# pylint: disable=missing-function-docstring  # test names say what they test

import json
import os
import shutil
import subprocess

import jsonschema
import pytest

from osbuild import reproducible

import stagetest
from stagetest import (ANY, assert_diff, content_change, dir_attrs, file_attrs, link_attrs, read,
                       tree_diff)
from conftest import REPO, run_osbuild

STAGES = ["org.osbuild.hostname", "org.osbuild.locale", "org.osbuild.keymap",
          "org.osbuild.timezone", "org.osbuild.users", "org.osbuild.groups",
          "org.osbuild.fstab", "org.osbuild.systemd", "org.osbuild.selinux",
          "org.osbuild.firewall", "org.osbuild.chrony", "org.osbuild.kernel-cmdline",
          "org.osbuild.debug-shell"]

ROOT_UUID = "76a22bf4-f153-4541-b6c7-0332c0dfaeac"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# ---------------------------------------------------------------------------
# Schemas (no root needed)

def validate(name, options):
    """The jsonschema error messages for `options` of stage `name` (empty: valid)."""
    schema = stagetest.load_stage_schema(name)
    jsonschema.Draft7Validator.check_schema(schema)
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(options)]


@pytest.mark.parametrize("name", STAGES)
def test_program_shape(name):
    path = os.path.join(REPO, "stages", name)
    assert os.access(path, os.X_OK)
    with open(path, encoding="utf-8") as f:
        assert f.readline() == "#!/usr/bin/python3\n"
    schema = stagetest.load_stage_schema(name)
    assert schema.get("additionalProperties") is False
    assert validate(name, {"no-such-option": 1})


# Options of the original osbuild sample manifests: must stay valid.
GOOD = [
    ("org.osbuild.hostname", {"hostname": "my-host.example.com"}),
    ("org.osbuild.locale", {"language": "en_US"}),
    ("org.osbuild.locale", {"language": "de_DE.UTF-8"}),
    ("org.osbuild.keymap", {"keymap": "de-latin1-nodeadkeys"}),
    ("org.osbuild.timezone", {"zone": "America/Argentina/Buenos_Aires"}),
    ("org.osbuild.timezone", {"zone": "Etc/GMT+5"}),
    ("org.osbuild.users", {"users": {"root": {"password": "$6$LsodJXg8kj9G7sbe$8o6ZfPR4UMKE4ML"}}}),
    ("org.osbuild.users", {"users": {"alice": {"uid": 1000, "gid": 1000, "groups": ["wheel"],
                                               "description": "Alice", "home": "/home/alice",
                                               "shell": "/bin/bash", "password": "$6$a$b",
                                               "key": "ssh-ed25519 AAAA alice"}}}),
    ("org.osbuild.groups", {"groups": {"devs": {"gid": 1500}, "ops": {}}}),
    ("org.osbuild.fstab", {"filesystems": [
        {"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "/", "freq": 1, "passno": 1},
        {"uuid": "46BB-8120", "vfs_type": "vfat", "path": "/boot/efi",
         "options": "umask=0077,shortname=winnt", "freq": 0, "passno": 2}]}),
    ("org.osbuild.fstab", {"filesystems": [
        {"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "/", "freq": "1", "passno": "1"}]}),
    ("org.osbuild.fstab", {"filesystems": [{"label": "root", "vfs_type": "xfs", "path": "/"}]}),
    ("org.osbuild.systemd", {"enabled_services": ["cloud-config", "cloud-init-local"]}),
    ("org.osbuild.systemd", {"disabled_services": ["kdump.service"],
                             "default_target": "multi-user.target"}),
    ("org.osbuild.selinux", {"file_contexts": "etc/selinux/targeted/contexts/files/file_contexts"}),
    ("org.osbuild.selinux", {"file_contexts": "etc/selinux/x/file_contexts",
                             "labels": {"/usr/bin/cp": "system_u:object_r:install_exec_t:s0"}}),
    ("org.osbuild.firewall", {"ports": ["22:tcp", "60000-61000:udp"],
                              "enabled_services": ["ssh"], "disabled_services": ["cockpit"]}),
    ("org.osbuild.chrony", {"timeservers": ["0.pool.ntp.org", "192.0.2.1", "2001:db8::1"]}),
    ("org.osbuild.kernel-cmdline", {"root_fs_uuid": ROOT_UUID,
                                    "kernel_opts": "net.ifnames=0 crashkernel=auto"}),
    ("org.osbuild.debug-shell", {"tty": "/dev/tty2"}),
]


@pytest.mark.parametrize("name,options", GOOD)
def test_schema_accepts(name, options):
    assert validate(name, options) == []


BAD = [
    ("org.osbuild.hostname", {}, "'hostname' is a required property"),
    ("org.osbuild.hostname", {"hostname": 42}, "42 is not of type 'string'"),
    ("org.osbuild.hostname", {"hostname": "bad host"}, "does not match"),
    ("org.osbuild.hostname", {"hostname": "h", "domain": "x"}, "Additional properties"),
    ("org.osbuild.locale", {"language": "en US"}, "does not match"),
    ("org.osbuild.keymap", {"keymap": ["us"]}, "is not of type 'string'"),
    ("org.osbuild.timezone", {"zone": "../../etc/passwd"}, "does not match"),
    ("org.osbuild.timezone", {"timezone": "UTC"}, "'zone' is a required property"),
    ("org.osbuild.users", {"users": {"bad:name": {}}}, "does not match any of the regexes"),
    ("org.osbuild.users", {"users": {"..": {}}}, "does not match any of the regexes"),
    ("org.osbuild.users", {"users": {"alice": {"groups": ["-g"]}}}, "does not match"),
    ("org.osbuild.users", {"users": {"alice": {"uid": "10x0"}}},   # "1000" is accepted
     "is not valid under any of the given schemas"),
    ("org.osbuild.users", {"users": {"alice": {"groups": "wheel"}}}, "is not of type 'array'"),
    ("org.osbuild.users", {"users": {"alice": {"shell": "bash"}}}, "does not match"),
    ("org.osbuild.users", {"users": {"alice": {"password": "a:b"}}}, "does not match"),
    ("org.osbuild.users", {"users": {"alice": {"sshkey": "x"}}}, "Additional properties"),
    ("org.osbuild.groups", {"groups": {"devs": {"gid": -1}}},
     "is not valid under any of the given schemas"),
    ("org.osbuild.fstab", {"filesystems": [{"uuid": ROOT_UUID, "label": "r",
                                            "vfs_type": "ext4", "path": "/"}]}, "valid under each"),
    ("org.osbuild.fstab", {"filesystems": [{"vfs_type": "ext4", "path": "/"}]},
     "not valid under any"),
    ("org.osbuild.fstab", {"filesystems": [{"uuid": ROOT_UUID, "vfs_type": "ext4",
                                            "path": "boot"}]}, "does not match"),
    ("org.osbuild.fstab", {"filesystems": [{"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "/",
                                            "options": "a b"}]}, "does not match"),
    ("org.osbuild.fstab", {"filesystems": [{"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "/",
                                            "passno": "one"}]}, "not valid under any"),
    ("org.osbuild.systemd", {"enabled_services": "sshd"}, "is not of type 'array'"),
    ("org.osbuild.systemd", {"default_target": "multi-user"}, "does not match"),
    ("org.osbuild.systemd", {"enabled_services": ["a b"]}, "does not match"),
    ("org.osbuild.selinux", {}, "'file_contexts' is a required property"),
    ("org.osbuild.selinux", {"file_contexts": "x", "labels": {"rel/path": "a:b:c"}},
     "does not match any of the regexes"),
    ("org.osbuild.firewall", {"ports": ["22"]}, "does not match"),
    ("org.osbuild.firewall", {"ports": ["22:icmp"]}, "does not match"),
    ("org.osbuild.chrony", {"timeservers": []}, "should be non-empty"),
    ("org.osbuild.chrony", {"timeservers": ["a b"]}, "does not match"),
    ("org.osbuild.kernel-cmdline", {"root_fs_uuid": "not-a-uuid"}, "does not match"),
    ("org.osbuild.kernel-cmdline", {"kernel_opts": 1}, "is not of type 'string'"),
    ("org.osbuild.debug-shell", {}, "'tty' is a required property"),
    ("org.osbuild.debug-shell", {"tty": "tty1"}, "does not match"),
]


@pytest.mark.parametrize("name,options,message", BAD)
def test_schema_rejects(name, options, message):
    errors = validate(name, options)
    assert errors, f"{name} accepted {options}"
    assert any(message in e for e in errors), errors


# ---------------------------------------------------------------------------
# tools/tree-diff

def test_tree_diff_reports_every_kind_of_change(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for t in (a, b):
        (t / "d").mkdir(parents=True)
        (t / "same").write_text("same\n")
    (a / "changed").write_text("old\n")
    (b / "changed").write_text("new\n")
    (a / "gone").write_text("x")
    (b / "d" / "new").write_text("new file\n")
    os.chmod(b / "d" / "new", 0o600)
    os.symlink("same", a / "link")
    os.symlink("changed", b / "link")
    os.chmod(b / "d", 0o700)
    (a / "mode").write_text("m")
    (b / "mode").write_text("m")
    os.chmod(b / "mode", 0o4755)
    if os.geteuid() == 0:
        (a / "owner").write_text("o")
        (b / "owner").write_text("o")
        os.chown(b / "owner", 1234, 5678)
    os.setxattr(b / "same", "user.test", b"value")
    diff = tree_diff(str(a), str(b))
    changed = {
        "/changed": {"sha256": [stagetest.sha256("old\n"), stagetest.sha256("new\n")]},
        "/d": {"mode": ["0755", "0700"]},
        "/link": {"target": ["same", "changed"]},
        "/mode": {"mode": ["0644", "4755"]},
        "/same": {"xattrs": [None, {"user.test": "value"}]},
    }
    if os.geteuid() == 0:
        changed["/owner"] = {"uid": [0, 1234], "gid": [0, 5678]}
    assert_diff(diff,
                added={"/d/new": file_attrs("new file\n", mode="0600",
                                            uid=os.getuid(), gid=os.getgid())},
                deleted={"/gone": file_attrs("x", uid=os.getuid(), gid=os.getgid())},
                changed=changed)
    assert tree_diff(str(a), str(a)) == {"added_files": {}, "deleted_files": {}, "differences": {}}


def test_tree_diff_type_change_ignore_and_errors(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "x").mkdir(parents=True)
    (a / "x" / "inner").write_text("i")
    b.mkdir()
    (b / "x").write_text("now a file")
    (b / "skip").mkdir()
    (b / "skip" / "f").write_text("f")
    diff = tree_diff(str(a), str(b))
    assert diff["deleted_files"].keys() == {"/x/inner"}
    assert diff["differences"]["/x"]["type"] == ["dir", "file"]
    assert diff["added_files"].keys() == {"/skip", "/skip/f"}
    res = subprocess.run([stagetest.TREE_DIFF, "--ignore", "/skip", str(a), str(b)],
                         capture_output=True, text=True, check=True)
    assert json.loads(res.stdout)["added_files"] == {}
    res = subprocess.run([stagetest.TREE_DIFF, str(a), str(tmp_path / "missing")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert "missing: not a directory" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------
# Direct runs of stages on scratch trees (no container)

def direct(name, tree, options):
    """Run the stage on the host; return (returncode, stderr)."""
    res = stagetest.run_stage_direct(name, str(tree), options)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stdout + res.stderr


def test_direct_fstab_malformed_entries(tmp_path):
    cases = [
        ({"filesystems": [{"uuid": ROOT_UUID, "label": "x", "vfs_type": "ext4", "path": "/"}]},
         "filesystems[0]: exactly one of 'uuid' and 'label'"),
        ({"filesystems": [{"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "boot"}]},
         "filesystems[0]: mount point 'boot' is not an absolute path"),
        ({"filesystems": [{"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "/"},
                          {"label": "b", "vfs_type": "ext4 x", "path": "/b"}]},
         "filesystems[1]: vfs_type 'ext4 x' is empty or contains whitespace"),
        ({"filesystems": [{"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "/"},
                          {"label": "b", "vfs_type": "ext4", "path": "/"}]},
         "filesystems[1]: mount point / is given twice"),
        ({"filesystems": [{"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "/", "freq": -1}]},
         "filesystems[0]: freq -1 is not a non-negative number"),
    ]
    for options, message in cases:
        code, out = direct("org.osbuild.fstab", tmp_path, options)
        assert code == 1 and message in out, out
    assert not (tmp_path / "etc" / "fstab").exists()


def test_direct_hostname_updates_debian_hosts_line(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\told.example old\n")
    code, out = direct("org.osbuild.hostname", tmp_path, {"hostname": "new"})
    assert code == 0, out
    assert (tmp_path / "etc" / "hostname").read_text() == "new\n"
    assert (tmp_path / "etc" / "hosts").read_text() == "127.0.0.1\tlocalhost\n127.0.1.1\tnew\n"


def test_direct_keymap_keeps_other_settings(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "vconsole.conf").write_text("KEYMAP=us\nFONT=eurlatgr\n")
    code, out = direct("org.osbuild.keymap", tmp_path, {"keymap": "de"})
    assert code == 0, out
    assert (tmp_path / "etc" / "vconsole.conf").read_text() == "FONT=eurlatgr\nKEYMAP=de\n"


def test_direct_chrony_without_config_and_fedora_layout(tmp_path):
    code, out = direct("org.osbuild.chrony", tmp_path, {"timeservers": ["ntp.example"]})
    assert code == 1 and "the tree has no chrony configuration" in out
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "chrony.conf").write_text(
        "# Use public servers\npool 2.fedora.pool.ntp.org iburst\ndriftfile /var/lib/chrony/drift\n"
        "server old.example iburst\n")
    code, out = direct("org.osbuild.chrony", tmp_path, {"timeservers": ["a.example", "b.example"]})
    assert code == 0, out
    assert (tmp_path / "etc" / "chrony.conf").read_text() == (
        "# Use public servers\nserver a.example iburst\nserver b.example iburst\n"
        "driftfile /var/lib/chrony/drift\n")


def test_direct_timezone_empty_tree(tmp_path):
    code, out = direct("org.osbuild.timezone", tmp_path, {"zone": "Europe/Berlin"})
    assert code == 1
    assert "time zone 'Europe/Berlin' is not in the tree" in out


def test_direct_selinux_missing_contexts(tmp_path):
    code, out = direct("org.osbuild.selinux", tmp_path, {"file_contexts": "etc/selinux/fc"})
    assert code == 1 and "file_contexts /etc/selinux/fc does not exist in the tree" in out


def test_direct_users_without_passwd(tmp_path):
    code, out = direct("org.osbuild.users", tmp_path, {"users": {"alice": {}}})
    assert code == 1 and "the tree has no /etc/group (install the base system first)" in out


OPTION_KEYS = {
    "org.osbuild.hostname": ["hostname"], "org.osbuild.locale": ["language"],
    "org.osbuild.keymap": ["keymap"], "org.osbuild.timezone": ["zone"],
    "org.osbuild.users": ["users"], "org.osbuild.groups": ["groups"],
    "org.osbuild.fstab": ["filesystems"],
    "org.osbuild.systemd": ["enabled_services", "disabled_services", "default_target"],
    "org.osbuild.selinux": ["file_contexts", "labels"],
    "org.osbuild.firewall": ["ports", "enabled_services", "disabled_services"],
    "org.osbuild.chrony": ["timeservers"],
    "org.osbuild.kernel-cmdline": ["root_fs_uuid", "kernel_opts"],
    "org.osbuild.debug-shell": ["tty"],
}
WRONG_VALUES = [None, 42, True, "", "x y", "../../x", [], [1], ["a", None], {}, {"a": 1},
                {"a": None}, {"a": {"uid": "x"}}, {"a": {"groups": 5}}, {"a": {"key": 5}},
                {"a": {"gid": -5}}, [{"uuid": 1}], {"/x": 5},
                [{"uuid": "ab", "vfs_type": "x", "path": "/", "freq": True}]]


@pytest.mark.parametrize("name", STAGES)
def test_direct_wrong_types_fail_cleanly(name, tmp_path):
    """Without the engine's schema check, wrong option types still give a one-line error."""
    assert sorted(OPTION_KEYS) == sorted(STAGES)
    for key in OPTION_KEYS[name]:
        for value in WRONG_VALUES:
            res = stagetest.run_stage_direct(name, str(tmp_path), {key: value})
            assert "Traceback" not in res.stderr, (key, value, res.stderr)
            if res.returncode != 0:
                lines = res.stderr.strip().splitlines()
                assert lines and lines[-1].startswith(f"{name}: "), (key, value, res.stderr)
                assert "invalid options (" not in res.stderr, (key, value, res.stderr)


def test_direct_bad_stdin_is_a_clear_error():
    for name in STAGES:
        res = subprocess.run([os.path.join(REPO, "stages", name)], input="not json",
                             capture_output=True, text=True, check=False)
        assert res.returncode == 1
        assert res.stderr.startswith(f"{name}: failed: ") and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------
# Real builds on the Debian base tree

class DebianBuilds:
    """Builds stages on top of the checkpointed Debian base tree in one store."""

    def __init__(self, root, tar=None):
        self.root = root
        tar = tar or stagetest.debian_base_tar()
        self.libdir = stagetest.make_libdir(os.path.join(root, "lib"), [tar])
        self.store = os.path.join(root, "store")
        self.base = stagetest.base_stages(tar)
        self.base_id = stagetest.stage_ids(self.base)[-1]
        res = self.build([], "--checkpoint", self.base_id)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        self.base_tree = os.path.join(self.store, "refs", self.base_id)
        self.built = []
        assert os.path.isfile(os.path.join(self.base_tree, "etc", "debian_version"))

    def build(self, stages, *args):
        """Run osbuild on base + `stages`; return the result."""
        manifest = {"pipeline": {"stages": self.base + stages}}
        path = os.path.join(self.root, "manifest.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
        return run_osbuild(path, self.store, "--libdir", self.libdir, *args)

    def tree(self, tree_id):
        """The committed tree of `tree_id`, or None."""
        path = os.path.join(self.store, "refs", tree_id)
        return path if os.path.lexists(path) else None

    def drop(self, tree_id):
        """Remove a test's result from the store (keeps the store small)."""
        ref = os.path.join(self.store, "refs", tree_id)
        if os.path.islink(ref) and tree_id != self.base_id:
            obj = os.path.realpath(ref)
            os.unlink(ref)
            if not any(os.path.realpath(os.path.join(self.store, "refs", r)) == obj
                       for r in os.listdir(os.path.join(self.store, "refs"))):
                shutil.rmtree(obj, ignore_errors=True)

    def apply(self, *stages, expect_success=True):
        """Build base + `stages`: (result, tree or None, diff against the base tree or None).

        A failed build must fail cleanly and commit nothing.
        """
        stages = list(stages)
        ids = stagetest.stage_ids(self.base + stages)
        res = self.build(stages)
        self.built.append(ids[-1])
        out = res.stdout[-4000:] + res.stderr[-4000:]
        assert "Traceback" not in out
        if expect_success:
            assert res.returncode == 0, out
            assert res.json["success"] is True and res.json["tree_id"] == ids[-1]
            tree = self.tree(ids[-1])
            return res, tree, tree_diff(self.base_tree, tree)
        assert res.returncode == 1, out
        assert res.json["success"] is False
        assert self.tree(ids[-1]) is None
        return res, None, None

    def cleanup(self):
        """Drop everything apply() built."""
        while self.built:
            self.drop(self.built.pop())


@pytest.fixture(name="debian", scope="session")
def debian_fixture(tmp_path_factory):
    """The session's Debian base build (built once, reused by every test)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return DebianBuilds(str(tmp_path_factory.mktemp("stages-config")))


@pytest.fixture(name="apply")
def apply_fixture(debian):
    """debian.apply, dropping the test's trees from the store afterwards."""
    yield debian.apply
    debian.cleanup()


def stage(name, options):
    """A stage entry of a manifest."""
    return {"name": name, "options": options}


def failure_output(res):
    """The output of the failed (last) stage of a --json result."""
    last = res.json["stages"][-1]
    assert last["success"] is False
    return last["output"]


@pytest.mark.integration
@needs_root
def test_hostname(apply):
    _, _, diff = apply(stage("org.osbuild.hostname", {"hostname": "debian-test"}))
    assert_diff(diff, added={"/etc/hostname": file_attrs("debian-test\n")})


@pytest.mark.integration
@needs_root
def test_locale_generates_debian_locale(apply, debian):
    _, tree, diff = apply(stage("org.osbuild.locale", {"language": "de_DE.UTF-8"}))
    locale_gen = read(debian.base_tree, "/etc/locale.gen").replace(
        "# de_DE.UTF-8 UTF-8\n", "de_DE.UTF-8 UTF-8\n")
    assert_diff(diff,
                added={"/etc/locale.conf": file_attrs("LANG=de_DE.UTF-8\n"),
                       "/usr/lib/locale/locale-archive": {**file_attrs(""), "sha256": ANY}},
                changed={"/etc/default/locale": content_change(debian.base_tree,
                                                               "/etc/default/locale",
                                                               "LANG=de_DE.UTF-8\n"),
                         "/etc/locale.gen": content_change(debian.base_tree, "/etc/locale.gen",
                                                           locale_gen)})
    res = subprocess.run(["chroot", tree, "locale", "-a"], capture_output=True, text=True,
                         check=True)
    assert "de_DE.utf8" in res.stdout.split()


@pytest.mark.integration
@needs_root
def test_locale_builtin_and_unsupported(apply, debian):
    _, _, diff = apply(stage("org.osbuild.locale", {"language": "C.UTF-8"}))
    assert_diff(diff,
                added={"/etc/locale.conf": file_attrs("LANG=C.UTF-8\n")},
                changed={"/etc/default/locale": content_change(
                    debian.base_tree, "/etc/default/locale", "LANG=C.UTF-8\n")})
    res, _, _ = apply(stage("org.osbuild.locale", {"language": "xx_YY.UTF-8"}),
                      expect_success=False)
    assert "locale 'xx_YY.UTF-8' is not supported by the tree" in failure_output(res)


@pytest.mark.integration
@needs_root
def test_keymap(apply):
    _, _, diff = apply(stage("org.osbuild.keymap", {"keymap": "de-latin1"}))
    assert_diff(diff, added={"/etc/vconsole.conf": file_attrs("KEYMAP=de-latin1\n")})


@pytest.mark.integration
@needs_root
def test_timezone(apply, debian):
    _, _, diff = apply(stage("org.osbuild.timezone", {"zone": "Europe/Berlin"}))
    old_target = os.readlink(os.path.join(debian.base_tree, "etc/localtime"))
    assert_diff(diff, changed={
        "/etc/localtime": {"target": [old_target, "../usr/share/zoneinfo/Europe/Berlin"]},
        "/etc/timezone": content_change(debian.base_tree, "/etc/timezone", "Europe/Berlin\n"),
    })


@pytest.mark.integration
@needs_root
def test_timezone_not_in_tree(apply):
    res, _, _ = apply(stage("org.osbuild.timezone", {"zone": "Mars/Olympus_Mons"}),
                      expect_success=False)
    assert "time zone 'Mars/Olympus_Mons' is not in the tree" in failure_output(res)


def _days_since_epoch():
    """The day shadow records for a change: the build's source epoch, never the clock."""
    return reproducible.DEFAULT_EPOCH // 86400


def _add_member(group_text, group, user):
    """/etc/group (or gshadow) text with `user` appended to `group`'s member list."""
    lines = []
    for line in group_text.splitlines():
        fields = line.split(":")
        if fields[0] == group:
            members = [m for m in fields[-1].split(",") if m] + [user]
            fields[-1] = ",".join(members)
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


@pytest.mark.integration
@needs_root
def test_users_create_and_modify(apply, debian):  # pylint: disable=too-many-locals
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb0ZrkqlW6QBvzq1k alice@example"
    root_hash = "$6$LsodJXg8kj9G7sbe$8o6ZfPR4UMKE4MLcXTLukatY.YYXRuR4h9hV162numzgAZhn1Gb9H"
    alice_hash = "$6$saltsalt$QWERTYuiop"
    _, tree, diff = apply(
        stage("org.osbuild.groups", {"groups": {"devs": {"gid": 1500}}}),
        stage("org.osbuild.users", {"users": {
            "root": {"password": root_hash},
            "alice": {"uid": 1234, "groups": ["devs", "users"], "description": "Alice Example",
                      "shell": "/bin/bash", "password": alice_hash, "key": key},
        }}))
    base = debian.base_tree
    days = _days_since_epoch()
    passwd = read(base, "/etc/passwd") + \
        "alice:x:1234:1234:Alice Example:/home/alice:/bin/bash\n"
    shadow_lines = []
    for line in read(base, "/etc/shadow").splitlines():
        fields = line.split(":")
        if fields[0] == "root":
            fields[1] = root_hash
            fields[2] = str(days)
        shadow_lines.append(":".join(fields))
    shadow = "\n".join(shadow_lines) + "\n" + f"alice:{alice_hash}:{days}:0:99999:7:::\n"
    group1 = read(base, "/etc/group") + "devs:x:1500:\n"
    group = _add_member(_add_member(group1, "users", "alice"), "devs", "alice") + \
        "alice:x:1234:\n"
    gshadow1 = read(base, "/etc/gshadow") + "devs:!::\n"
    gshadow = _add_member(_add_member(gshadow1, "users", "alice"), "devs", "alice") + \
        "alice:!::\n"
    subid = read(base, "/etc/subuid") + "alice:100000:65536\n"
    home = {"uid": 1234, "gid": 1234}
    skel = {f"/home/alice/{name}": file_attrs(read(base, f"/etc/skel/{name}"), **home)
            for name in os.listdir(os.path.join(base, "etc/skel"))}
    changed = {}
    for path, new in (("/etc/passwd", passwd), ("/etc/shadow", shadow), ("/etc/group", group),
                      ("/etc/gshadow", gshadow), ("/etc/subuid", subid),
                      ("/etc/subgid", read(base, "/etc/subgid") + "alice:100000:65536\n")):
        changed[path] = content_change(base, path, new)
    # the backup files shadow-utils leaves: the file as it was before the last change
    added = {}
    for path in ("/etc/passwd-", "/etc/shadow-", "/etc/group-", "/etc/gshadow-",
                 "/etc/subuid-", "/etc/subgid-"):
        if os.path.lexists(os.path.join(base, path.lstrip("/"))):
            changed[path] = {"sha256": [ANY, ANY]}
        else:
            added[path] = {**file_attrs(""), "mode": ANY, "gid": ANY, "sha256": ANY}
    added.update({
        "/home/alice": dir_attrs(**home),
        "/home/alice/.ssh": dir_attrs(mode="0700", **home),
        "/home/alice/.ssh/authorized_keys": file_attrs(key + "\n", mode="0600", **home),
        **skel,
    })
    assert_diff(diff, added=added, changed=changed)
    assert read(tree, "/etc/passwd-") == passwd.replace(
        "alice:x:1234:1234:Alice Example:/home/alice:/bin/bash\n", "")
    # numeric owner from the tree: the host has no user alice / uid 1234 may be anybody
    st = os.lstat(os.path.join(tree, "home/alice/.ssh/authorized_keys"))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 1234, 0o600)


@pytest.mark.integration
@needs_root
def test_direct_user_with_existing_group_and_custom_home(tmp_path):
    tree = stagetest.unpack_base(str(tmp_path / "tree"))
    code, out = direct("org.osbuild.groups", tree, {"groups": {"bob": {"gid": 3000}}})
    assert code == 0, out
    code, out = direct("org.osbuild.users", tree, {"users": {
        "bob": {"uid": 3001, "home": "/srv/bob", "key": "ssh-rsa AAAAB3Nza bob@host\n"}}})
    assert code == 0, out
    passwd = read(tree, "/etc/passwd").splitlines()
    assert "bob:x:3001:3000::/srv/bob:/bin/sh" in passwd
    assert read(tree, "/etc/group").splitlines().count("bob:x:3000:") == 1
    assert read(tree, "/srv/bob/.ssh/authorized_keys") == "ssh-rsa AAAAB3Nza bob@host\n"
    for path, mode in (("srv/bob", 0o755), ("srv/bob/.ssh", 0o700),
                       ("srv/bob/.ssh/authorized_keys", 0o600)):
        st = os.lstat(os.path.join(tree, path))
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (3001, 3000, mode), path


@pytest.mark.integration
@needs_root
def test_users_modify_existing_uses_usermod(apply, debian):
    _, _, diff = apply(stage("org.osbuild.users", {"users": {
        "nobody": {"description": "Nobody at all", "shell": "/bin/sh"}}}))
    base = debian.base_tree
    passwd = read(base, "/etc/passwd").replace(
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
        "nobody:x:65534:65534:Nobody at all:/nonexistent:/bin/sh")
    assert passwd != read(base, "/etc/passwd")
    assert_diff(diff, changed={
        "/etc/passwd": content_change(base, "/etc/passwd", passwd),
        "/etc/passwd-": {"sha256": [ANY, stagetest.sha256(read(base, "/etc/passwd"))]},
    })


@pytest.mark.integration
@needs_root
def test_users_missing_group(apply):
    res, _, _ = apply(stage("org.osbuild.users", {"users": {
        "alice": {"groups": ["wheel", "no-such-group"]}}}), expect_success=False)
    assert "user 'alice': group 'wheel' does not exist in the tree" in failure_output(res)
    res, _, _ = apply(stage("org.osbuild.users", {"users": {"bob": {"gid": 4711}}}),
                      expect_success=False)
    assert "user 'bob': group with gid 4711 does not exist in the tree" in failure_output(res)


@pytest.mark.integration
@needs_root
def test_groups(apply, debian):
    _, _, diff = apply(stage("org.osbuild.groups", {"groups": {"devs": {"gid": 1500},
                                                               "users": {"gid": 1600}}}))
    base = debian.base_tree
    group = read(base, "/etc/group").replace("users:x:100:", "users:x:1600:") + "devs:x:1500:\n"
    assert_diff(diff, changed={
        "/etc/group": content_change(base, "/etc/group", group),
        "/etc/group-": {"sha256": [ANY, ANY]},
        "/etc/gshadow": content_change(base, "/etc/gshadow", read(base, "/etc/gshadow") +
                                       "devs:!::\n"),
        "/etc/gshadow-": {"sha256": [ANY, ANY]},
    })
    res, _, _ = apply(stage("org.osbuild.groups", {"groups": {"clash": {"gid": 0}}}),
                      expect_success=False)
    assert "group 'clash': gid 0 is already used by group 'root'" in failure_output(res)


@pytest.mark.integration
@needs_root
def test_fstab(apply, debian):
    _, _, diff = apply(stage("org.osbuild.fstab", {"filesystems": [
        {"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "/", "freq": 1, "passno": 1},
        {"uuid": "46BB-8120", "vfs_type": "vfat", "path": "/boot/efi",
         "options": "umask=0077,shortname=winnt", "freq": 0, "passno": 2},
        {"label": "swap", "vfs_type": "swap", "path": "none"},
    ]}))
    fstab = (f"UUID={ROOT_UUID} / ext4 defaults 1 1\n"
             "UUID=46BB-8120 /boot/efi vfat umask=0077,shortname=winnt 0 2\n"
             "LABEL=swap none swap defaults 0 0\n")
    assert_diff(diff, changed={"/etc/fstab": content_change(debian.base_tree, "/etc/fstab",
                                                            fstab)})


@pytest.mark.integration
@needs_root
def test_fstab_malformed_entry_rejected_before_build(debian):
    bad = stage("org.osbuild.fstab", {"filesystems": [{"uuid": ROOT_UUID, "vfs_type": "ext4",
                                                       "path": "root fs"}]})
    res = debian.build([bad])
    assert res.returncode == 1
    assert "stages[1].options.filesystems[0].path" in res.stderr
    assert "'root fs' does not match" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.integration
@needs_root
def test_schema_error_through_cli(debian):
    res = debian.build([stage("org.osbuild.hostname", {"hostname": 42})])
    assert res.returncode == 1
    assert "pipeline.stages[1].options.hostname: 42 is not of type 'string'" in res.stderr
    res = debian.build([stage("org.osbuild.users", {"users": {"alice": {"uid": "x"}}})])
    assert res.returncode == 1
    assert "pipeline.stages[1].options.users.alice.uid" in res.stderr


SYSTEMD_LIB = "/lib/systemd/system"


@pytest.mark.integration
@needs_root
def test_systemd(apply):
    _, _, diff = apply(stage("org.osbuild.systemd", {
        "enabled_services": ["systemd-networkd"],
        "disabled_services": ["e2scrub_reap.service"],
        "default_target": "multi-user.target"}))
    etc = "/etc/systemd/system"
    assert_diff(
        diff,
        added={
            f"{etc}/default.target": link_attrs(f"{SYSTEMD_LIB}/multi-user.target"),
            f"{etc}/dbus-org.freedesktop.network1.service":
                link_attrs(f"{SYSTEMD_LIB}/systemd-networkd.service"),
            f"{etc}/multi-user.target.wants/systemd-networkd.service":
                link_attrs(f"{SYSTEMD_LIB}/systemd-networkd.service"),
            f"{etc}/sockets.target.wants": dir_attrs(),
            f"{etc}/sockets.target.wants/systemd-networkd.socket":
                link_attrs(f"{SYSTEMD_LIB}/systemd-networkd.socket"),
            f"{etc}/sysinit.target.wants/systemd-network-generator.service":
                link_attrs(f"{SYSTEMD_LIB}/systemd-network-generator.service"),
            f"{etc}/network-online.target.wants": dir_attrs(),
            f"{etc}/network-online.target.wants/systemd-networkd-wait-online.service":
                link_attrs(f"{SYSTEMD_LIB}/systemd-networkd-wait-online.service"),
        },
        deleted={f"{etc}/multi-user.target.wants/e2scrub_reap.service":
                 link_attrs(f"{SYSTEMD_LIB}/e2scrub_reap.service")})


@pytest.mark.integration
@needs_root
def test_systemd_unknown_unit(apply):
    for options in ({"enabled_services": ["no-such-daemon"]},
                    {"disabled_services": ["no-such-daemon.service"]}):
        res, _, _ = apply(stage("org.osbuild.systemd", options), expect_success=False)
        assert "no-such-daemon.service does not exist" in failure_output(res)
    res, _, _ = apply(stage("org.osbuild.systemd", {"default_target": "nowhere.target"}),
                      expect_success=False)
    assert "nowhere.target does not exist" in failure_output(res)


FILE_CONTEXTS = """\
/.*\t\tsystem_u:object_r:default_t:s0
/etc(/.*)?\t\tsystem_u:object_r:etc_t:s0
/usr/bin(/.*)?\t\tsystem_u:object_r:bin_t:s0
"""


@pytest.mark.integration
@needs_root
def test_selinux(apply, debian):
    write_contexts = stage("org.osbuild.script", {
        "chroot": False,
        "script": "mkdir -p etc/selinux/test/contexts/files\n"
                  "cat > etc/selinux/test/contexts/files/file_contexts <<'EOF'\n"
                  f"{FILE_CONTEXTS}EOF\n"})
    _, _, diff = apply(write_contexts, stage("org.osbuild.selinux", {
        "file_contexts": "etc/selinux/test/contexts/files/file_contexts",
        "labels": {"/usr/bin/cp": "system_u:object_r:install_exec_t:s0"}}))

    def label(path):
        if path == "/usr/bin/cp":
            return "system_u:object_r:install_exec_t:s0"
        if path == "/etc" or path.startswith("/etc/"):
            return "system_u:object_r:etc_t:s0"
        if path == "/usr/bin" or path.startswith("/usr/bin/"):
            return "system_u:object_r:bin_t:s0"
        return "system_u:object_r:default_t:s0"

    fc_dir = "/etc/selinux/test/contexts/files"
    added = {path: {**dir_attrs(), "xattrs": {"security.selinux": label(path)}}
             for path in ("/etc/selinux/test", "/etc/selinux/test/contexts", fc_dir)}
    added[f"{fc_dir}/file_contexts"] = {**file_attrs(FILE_CONTEXTS), "xattrs": {
        "security.selinux": "system_u:object_r:etc_t:s0"}}
    # every entry of the base tree gets exactly its label, nothing else changes
    changed = {path: {"xattrs": [None, {"security.selinux": label(path)}]}
               for path in _all_paths(debian.base_tree)}
    assert_diff(diff, added=added, changed=changed)


def _all_paths(tree):
    paths = ["/"]
    for dirpath, dirnames, filenames in os.walk(tree):
        rel = "/" + os.path.relpath(dirpath, tree).lstrip(".")
        for name in dirnames + filenames:
            paths.append(os.path.join(rel, name))
    return paths


@pytest.mark.integration
@needs_root
def test_selinux_missing_file_contexts(apply):
    res, _, _ = apply(stage("org.osbuild.selinux", {
        "file_contexts": "etc/selinux/targeted/contexts/files/file_contexts"}),
        expect_success=False)
    assert "file_contexts /etc/selinux/targeted/contexts/files/file_contexts does not exist " \
           "in the tree" in failure_output(res)


@pytest.mark.integration
@needs_root
def test_firewall_without_firewalld(apply):
    res, _, _ = apply(stage("org.osbuild.firewall", {"ports": ["22:tcp"]}),
                      expect_success=False)
    assert "the tree has no firewall-offline-cmd" in failure_output(res)


@pytest.fixture(name="firewalld_tree")
def firewalld_tree_fixture(tmp_path):
    """Builds on a Debian tree that has firewalld (its own cached tarball)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    builds = DebianBuilds(str(tmp_path), stagetest.debian_tar(stagetest.FIREWALLD_EXTRA))
    yield builds
    builds.cleanup()


@pytest.mark.integration
@needs_root
def test_firewall(firewalld_tree):
    base = firewalld_tree.base_tree
    _, tree, diff = firewalld_tree.apply(stage("org.osbuild.firewall", {
        "ports": ["2222:tcp", "60000-61000:udp"],
        "enabled_services": ["http"],
        "disabled_services": ["dhcpv6-client"]}))
    stock = read(base, "/usr/lib/firewalld/zones/public.xml")
    assert '<service name="dhcpv6-client"/>' in stock
    zone = read(tree, "/etc/firewalld/zones/public.xml")
    expected = stock.replace('  <service name="dhcpv6-client"/>\n', "").replace(
        "  <forward/>\n",
        '  <service name="http"/>\n'
        '  <port port="2222" protocol="tcp"/>\n'
        '  <port port="60000-61000" protocol="udp"/>\n'
        "  <forward/>\n")
    assert zone == expected
    assert_diff(diff, added={
        "/etc/firewalld/zones/public.xml": file_attrs(expected),
        # firewalld keeps the previous version of a zone file it rewrites
        "/etc/firewalld/zones/public.xml.old": {**file_attrs(""), "sha256": ANY},
    })
    res, _, _ = firewalld_tree.apply(stage("org.osbuild.firewall", {
        "enabled_services": ["no-such-service"]}), expect_success=False)
    assert "INVALID_SERVICE" in failure_output(res)


@pytest.mark.integration
@needs_root
def test_chrony(apply, debian):
    _, _, diff = apply(stage("org.osbuild.chrony", {"timeservers": ["ntp1.example.com",
                                                                    "192.0.2.1"]}))
    path = "/etc/chrony/chrony.conf"
    old = read(debian.base_tree, path)
    assert "\npool 2.debian.pool.ntp.org iburst\n" in old
    new = old.replace("pool 2.debian.pool.ntp.org iburst\n",
                      "server ntp1.example.com iburst\nserver 192.0.2.1 iburst\n")
    assert_diff(diff, changed={path: content_change(debian.base_tree, path, new)})


@pytest.mark.integration
@needs_root
def test_kernel_cmdline(apply):
    _, _, diff = apply(stage("org.osbuild.kernel-cmdline", {
        "root_fs_uuid": ROOT_UUID, "kernel_opts": "net.ifnames=0  console=ttyS0,115200n8"}))
    assert_diff(diff, added={"/etc/kernel/cmdline": file_attrs(
        f"root=UUID={ROOT_UUID} net.ifnames=0 console=ttyS0,115200n8\n")})


@pytest.mark.integration
@needs_root
def test_debug_shell(apply):
    _, tree, diff = apply(stage("org.osbuild.debug-shell", {"tty": "/dev/ttyS1"}))
    unit = read(tree, "/etc/systemd/system/osbuild-debug-shell.service")
    assert "TTYPath=/dev/ttyS1\n" in unit and "ExecStart=/bin/sh\n" in unit
    assert_diff(diff, added={
        "/etc/systemd/system/osbuild-debug-shell.service": file_attrs(unit),
        "/etc/systemd/system/sysinit.target.wants/osbuild-debug-shell.service":
            link_attrs("/etc/systemd/system/osbuild-debug-shell.service"),
    })
    res = subprocess.run(["systemctl", "--root", tree, "is-enabled",
                          "osbuild-debug-shell.service"], capture_output=True, text=True,
                         check=False)
    assert res.stdout.strip() == "enabled"


@pytest.mark.integration
@needs_root
def test_debian_sample_configuration(apply):
    """The configuration stages of samples/debian12-qcow2.json, together on the Debian tree."""
    with open(os.path.join(REPO, "samples", "debian12-qcow2.json"), encoding="utf-8") as f:
        sample = json.load(f)
    mine = [s for s in sample["pipeline"]["stages"] if s["name"] in STAGES]
    assert {s["name"] for s in mine} >= {"org.osbuild.hostname", "org.osbuild.users",
                                         "org.osbuild.fstab", "org.osbuild.systemd"}
    _, tree, diff = apply(*mine)
    touched = set(diff["added_files"]) | set(diff["differences"])
    opts = {s["name"]: s["options"] for s in mine}
    if "org.osbuild.hostname" in opts:
        assert read(tree, "/etc/hostname") == opts["org.osbuild.hostname"]["hostname"] + "\n"
    if "org.osbuild.locale" in opts:
        assert read(tree, "/etc/locale.conf") == \
            f"LANG={opts['org.osbuild.locale']['language']}\n"
        assert read(tree, "/etc/default/locale") == read(tree, "/etc/locale.conf")
    if "org.osbuild.timezone" in opts:
        zone = opts["org.osbuild.timezone"]["zone"]
        assert os.readlink(os.path.join(tree, "etc/localtime")) == f"../usr/share/zoneinfo/{zone}"
    for user, props in opts["org.osbuild.users"]["users"].items():
        if "password" in props:
            shadow = dict(line.split(":", 2)[:2] for line in read(tree, "/etc/shadow").splitlines())
            assert shadow[user] == props["password"]
    fstab = read(tree, "/etc/fstab").splitlines()
    assert len(fstab) == len(opts["org.osbuild.fstab"]["filesystems"])
    for unit in opts["org.osbuild.systemd"].get("enabled_services", []):
        res = subprocess.run(["systemctl", "--root", tree, "is-enabled", unit],
                             capture_output=True, text=True, check=False)
        assert res.stdout.strip() == "enabled", (unit, res.stdout, res.stderr)
    assert "/etc/fstab" in touched and not diff["deleted_files"]
    assert all(p.startswith(("/etc/", "/usr/lib/locale/")) for p in touched), sorted(touched)
