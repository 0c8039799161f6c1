"""Tests of tools/osbuild-debian-manifest and of the checked-in Debian sample."""
# pylint: disable=missing-function-docstring

import json
import os
import re
import subprocess

import jsonschema
import pytest

from conftest import REPO, import_program
from osbuild import meta

TOOL = os.path.join(REPO, "tools", "osbuild-debian-manifest")
SAMPLE = os.path.join(REPO, "samples", "debian12-qcow2.json")
SYSTEM_PYTHON = "/usr/bin/python3"


tool = import_program(TOOL, "debian_manifest_tool")


@pytest.fixture(name="apt_lists", scope="module")
def apt_lists_fixture(tmp_path_factory):
    """An archive metadata directory shared by the tests that run the tool."""
    return str(tmp_path_factory.mktemp("apt-lists"))


def has_apt_pkg():
    """Whether Debian's python has python3-apt."""
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    return subprocess.run([SYSTEM_PYTHON, "-c", "import apt_pkg"], capture_output=True,
                          check=False).returncode == 0


def test_parse_deb822_and_one_line():
    text = ("Types: deb\n# comment\nURIs: http://a/debian\nSuites: bookworm bookworm-updates\n"
            "Components: main\nSigned-By: /k.gpg\n\nTypes: deb-src\nURIs: http://b\n"
            "Suites: bookworm\nComponents: main\n\nTypes: deb\nURIs: http://c\nSuites: x\n"
            "Components: main\nEnabled: no\n"
            "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n")
    stanzas = tool.parse_deb822(text)
    assert len(stanzas) == 3
    assert stanzas[0]["suites"] == "bookworm bookworm-updates"
    assert stanzas[2]["signed-by"].startswith("\n -----BEGIN")
    line = tool.parse_one_line(
        "deb [arch=amd64 signed-by=/x.gpg] http://m/debian bookworm main contrib")
    assert line == {"types": "deb", "uris": "http://m/debian", "suites": "bookworm",
                    "components": "main contrib", "signed-by": "/x.gpg"}
    assert tool.parse_one_line("   # only a comment") is None
    with pytest.raises(tool.ToolError):
        tool.parse_one_line("deb http://only-uri")


def test_select_sources_from_host_config(tmp_path, monkeypatch):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\nURIs: http://off\nSuites: bookworm\nComponents: main\n"
        "Enabled: no\n")
    (etc / "sources.list.d" / "other.sources.disabled").write_text("Types: deb\nURIs: http://no\n")
    (etc / "sources.list").write_text("deb http://extra/debian bookworm contrib\n")
    monkeypatch.setattr(tool, "host_codename", lambda: "bookworm")
    same = tool.select_sources("bookworm", etc=str(etc))
    assert [(s["uris"], s["suites"]) for s in same] == [
        ("http://deb.example/debian", "bookworm bookworm-updates"),
        ("http://deb.example/debian-security", "bookworm-security"),
        ("http://extra/debian", "bookworm")]
    other = tool.select_sources("trixie", etc=str(etc))
    assert [s["suites"] for s in other] == ["trixie trixie-updates", "trixie-security", "trixie"]
    text = tool.write_deb822(other)
    assert "Suites: trixie trixie-updates\n" in text and "Signed-By: /usr/share/keyrings" in text
    mirror = tool.select_sources("bookworm", mirror="http://m/debian", etc=str(etc))
    assert [s["uris"] for s in mirror] == ["http://m/debian"]
    empty = tmp_path / "empty"
    (empty / "sources.list.d").mkdir(parents=True)
    with pytest.raises(tool.ToolError, match="pass --mirror"):
        tool.select_sources("bookworm", etc=str(empty))


def make_args(*argv):
    return tool.parse_args(list(argv))


def test_build_manifest_validates_against_stage_schemas():
    pkgs = [{"name": "b", "version": "1", "arch": "all", "url": "http://x/b.deb", "size": 1,
             "sha256": "b" * 64, "essential": False},
            {"name": "a", "version": "1", "arch": "amd64", "url": "http://x/a.deb", "size": 1,
             "sha256": "a" * 64, "essential": True}]
    args = make_args("--boot", "bios", "--hostname", "box",
                     "--root-fs-uuid", "11111111-2222-3333-4444-555555555555",
                     "--size", "3G", "--filename", "img.qcow2")
    stanzas = [{"uris": "http://m/debian", "suites": "bookworm bookworm-updates",
                "components": "main", "signed-by": "/usr/share/keyrings/k.gpg"},
               {"uris": "http://m/security", "suites": "bookworm-security",
                "components": "main", "signed-by": "\n -----BEGIN PGP PUBLIC KEY BLOCK-----"}]
    manifest = tool.build_manifest(pkgs, args, stanzas)
    stages = manifest["pipeline"]["stages"]
    assert [s["name"] for s in stages] == [
        "org.osbuild.dpkg", "org.osbuild.hostname", "org.osbuild.locale", "org.osbuild.timezone",
        "org.osbuild.users", "org.osbuild.fstab", "org.osbuild.systemd", "org.osbuild.grub2"]
    assert stages[0]["options"]["packages"] == ["sha256:" + "b" * 64, "sha256:" + "a" * 64]
    assert stages[0]["options"]["apt_sources"] == [
        {"uris": ["http://m/debian"], "suites": ["bookworm", "bookworm-updates"],
         "components": ["main"], "signed_by": "/usr/share/keyrings/k.gpg"},
        {"uris": ["http://m/security"], "suites": ["bookworm-security"], "components": ["main"]}]
    urls = manifest["sources"]["org.osbuild.files"]["urls"]
    assert urls["sha256:" + "a" * 64] == "http://x/a.deb"
    assert "console=ttyS0,115200n8" in stages[-1]["options"]["kernel_opts"]
    assert stages[-1]["options"]["bls"] is False
    asm = manifest["pipeline"]["assembler"]["options"]
    assert asm["size"] == 3 * 2**30
    assert asm["root_fs_uuid"] == "11111111-2222-3333-4444-555555555555"
    for stage in stages + [manifest["pipeline"]["assembler"]]:
        kind = "assemblers" if stage["name"] == "org.osbuild.qemu" else "stages"
        schema = stage_schema(kind, stage["name"])
        jsonschema.validate(stage["options"], schema)


def stage_schema(kind, name):
    """The JSON schema of a stage or assembler (osbuild's program index; never imported)."""
    if not os.path.exists(os.path.join(REPO, kind, name)):
        pytest.skip(f"{kind}/{name} does not exist yet")
    return meta.index(REPO).get(kind, name).schema


def test_argument_errors():
    for argv in (["--size", "12Q"], ["--root-fs-uuid", "nope"], ["--hostname", "a b"],
                 ["--suite", "Bad/Suite"], ["--lock-root", "--root-password-hash", "x"]):
        proc = subprocess.run([SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else "python3",
                               TOOL] + argv + ["-o", "/nonexistent/never"],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 2, argv
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_write_atomic(tmp_path):
    target = tmp_path / "m.json"
    tool.write_atomic(str(target), "{}\n")
    assert target.read_text() == "{}\n"
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_sample_is_complete():
    with open(SAMPLE, encoding="utf-8") as f:
        manifest = json.load(f)
    stages = manifest["pipeline"]["stages"]
    packages = stages[0]["options"]["packages"]
    urls = manifest["sources"]["org.osbuild.files"]["urls"]
    assert stages[0]["name"] == "org.osbuild.dpkg"
    assert set(packages) == set(urls) and len(packages) > 80
    names = [re.sub(r"_.*", "", u.rsplit("/", 1)[1]) for u in urls.values()]
    for wanted in ("linux-image-amd64", "systemd-sysv", "udev", "usr-is-merged", "zstd", "dpkg",
                   "base-files", "libc6"):
        assert wanted in names
    assert "usrmerge" not in names
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", c) for c in packages)
    assert manifest["pipeline"]["assembler"]["name"] == "org.osbuild.qemu"


@pytest.mark.skipif(not has_apt_pkg(), reason="needs /usr/bin/python3 with python3-apt")
def test_tool_unknown_package_writes_nothing(tmp_path, apt_lists):
    out = tmp_path / "m.json"
    proc = subprocess.run([SYSTEM_PYTHON, TOOL, "-o", str(out), "--apt-lists",
                           apt_lists, "no-such-package-osbuild"],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 1
    assert "no-such-package-osbuild" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.skipif(not has_apt_pkg(), reason="needs /usr/bin/python3 with python3-apt")
def test_tool_resolves_reproducibly(tmp_path, apt_lists):
    """Two runs give the same manifest; explicit picks win over alternatives."""
    lists = apt_lists
    outs = []
    for i in range(2):
        out = tmp_path / f"m{i}.json"
        proc = subprocess.run([SYSTEM_PYTHON, TOOL, "-o", str(out), "--apt-lists", lists,
                               "--hostname", "h", "systemd-sysv", "usr-is-merged"],
                              capture_output=True, text=True, check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    manifest = json.loads(outs[0])
    urls = list(manifest["sources"]["org.osbuild.files"]["urls"].values())
    names = [u.rsplit("/", 1)[1].split("_")[0] for u in urls]
    assert names == sorted(names)
    assert "systemd" in names and "usr-is-merged" in names and "usrmerge" not in names
    assert "perl" not in names  # usrmerge's dependency: not pulled in


@pytest.mark.skipif(not has_apt_pkg(), reason="needs /usr/bin/python3 with python3-apt")
def test_tool_matches_apt_get(tmp_path, apt_lists):
    """The tool's closure equals apt-get's own for the sample's package list."""
    out = tmp_path / "m.json"
    proc = subprocess.run([SYSTEM_PYTHON, TOOL, "-o", str(out), "--apt-lists", apt_lists,
                           "--boot", "bios"],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(out.read_text())["sources"]["org.osbuild.files"]["urls"]
    root = tmp_path / "aptroot"
    aptroot = tool.AptRoot(str(root), "amd64", tool.select_sources("bookworm"), apt_lists)
    aptroot.update()
    env = dict(os.environ, APT_CONFIG=str(root / "apt.conf"))
    apt = subprocess.run(["apt-get", "install", "--print-uris", "-qq", "-y",
                          "-o", "Acquire::ForceHash=SHA256", "?essential", "?priority(required)"]
                         + tool.DEFAULT_PACKAGES, env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    theirs = {}
    for line in apt.stdout.splitlines():
        url, _, _, digest = line.split()
        theirs[digest.lower()] = url.strip("'")
    assert ours == theirs
    assert len(ours) > 80


@pytest.mark.skipif(not os.path.exists("/usr/share/keyrings/debian-archive-removed-keys.gpg"),
                    reason="needs debian-archive-keyring")
def test_unverifiable_metadata_is_an_error(tmp_path):
    """Archive metadata not signed by the configured key is rejected (nothing resolved)."""
    stanzas = tool.select_sources("bookworm")
    for stanza in stanzas:
        stanza["signed-by"] = "/usr/share/keyrings/debian-archive-removed-keys.gpg"
    aptroot = tool.AptRoot(str(tmp_path / "root"), "amd64", stanzas[:1])
    with pytest.raises(tool.ToolError, match="apt-get update failed.*(NO_PUBKEY|not signed|verif)"):
        aptroot.update()
