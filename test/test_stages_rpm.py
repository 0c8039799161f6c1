"""Tests for the RPM stages: org.osbuild.rpm, org.osbuild.dnf, org.osbuild.yum.

Small RPMs are built with rpmbuild and signed with a throwaway GPG key
(test/rpmrepo.py); a createrepo_c repository of them is served over HTTP on
127.0.0.1. The stage programs run directly on the host (fast checks of
behaviour and errors) and through osbuild with real sources (tree-diff of
the change).
"""

import json
import os
import shutil
import subprocess

import pytest

import rpmrepo
from stageprog import REPO, fails, ok, schema_error

RPM, DNF, YUM = "org.osbuild.rpm", "org.osbuild.dnf", "org.osbuild.yum"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(p) for p in ("rpmbuild", "createrepo_c", "dnf", "gpg", "rpmsign")),
    reason="needs rpm, createrepo-c, dnf and gnupg (apt-get install)")


@pytest.fixture(name="repo", scope="session")
def repo_fixture(tmp_path_factory):
    """The signed test packages and their repository, served on 127.0.0.1."""
    repo = rpmrepo.RpmRepo(str(tmp_path_factory.mktemp("rpmrepo"))).start()
    yield repo
    repo.stop()


@pytest.fixture(name="sources")
def sources_fixture(tmp_path, repo):
    """A stage's sources directory with all package files of the files source."""
    directory = tmp_path / "sources"
    repo.populate_sources(str(directory / "org.osbuild.files"))
    return directory


def installed(tree):
    """{name: version-release} of the packages in the tree's rpm database."""
    proc = subprocess.run(["rpm", "--root", str(tree), "--dbpath", "/var/lib/rpm", "-qa",
                           "--qf", "%{NAME} %{VERSION}-%{RELEASE}\n"],
                          capture_output=True, text=True, check=True)
    return dict(line.split() for line in proc.stdout.splitlines())


# ------------------------------------------------------------------- rpm


def test_rpm_installs_signed_packages(tmp_path, repo, sources):
    """Keys imported, signatures checked, packages installed, database consistent."""
    tree = tmp_path / "tree"
    tree.mkdir()
    c = repo.checksum
    ok(RPM, tree, {"gpgkeys": [repo.key],
                   "packages": [c("osb-base-1.0"), c("osb-app-2.0"), c("osb-base-1.0")]}, sources)
    pkgs = installed(tree)
    assert pkgs.pop("osb-base") == "1.0-1"
    assert pkgs.pop("osb-app") == "2.0-1"
    assert list(pkgs) == ["gpg-pubkey"]   # the imported key, nothing else
    assert (tree / "usr/share/osb-app/app.txt").read_text() == "app 2.0\n"
    assert (tree / "etc/osb-app.conf").read_text() == "setting=1\n"
    # the database is consistent: everything verifies, no missing dependencies
    subprocess.run(["rpm", "--root", str(tree), "--dbpath", "/var/lib/rpm", "-Va"], check=True,
                   capture_output=True)


def test_rpm_bad_signature(tmp_path, repo, sources):
    """A package signed by an unknown key fails the stage before anything is installed."""
    bad = repo.checksum("osb-weak-1.0", "badsig")
    fails(RPM, tmp_path, {"gpgkeys": [repo.key], "packages": [repo.checksum("osb-base-1.0"), bad]},
          f"package {bad} failed its signature check", sources)
    assert not (tmp_path / "usr").exists()


def test_rpm_unsigned_package_with_keys(tmp_path, repo, sources):
    """With gpgkeys, unsigned packages fail unless check_gpg is false for them."""
    unsigned = repo.checksum("osb-base-1.0", "unsigned")
    fails(RPM, tmp_path, {"gpgkeys": [repo.key], "packages": [unsigned]}, "is not signed", sources)
    ok(RPM, tmp_path, {"gpgkeys": [repo.key],
                       "packages": [{"checksum": unsigned, "check_gpg": False}]}, sources)
    assert installed(tmp_path)["osb-base"] == "1.0-1"


def test_rpm_without_keys_and_check_gpg(tmp_path, repo, sources):
    """Without keys nothing is checked; check_gpg without a key in the tree fails."""
    ok(RPM, tmp_path, {"packages": [repo.checksum("osb-base-1.0", "unsigned")]}, sources)
    fails(RPM, tmp_path, {"packages": [{"checksum": repo.checksum("osb-weak-1.0"),
                                        "check_gpg": True}]},
          "failed its signature check", sources)


def test_rpm_checksum_not_in_sources(tmp_path, sources):
    """A checksum the sources do not have is named in the error."""
    missing = "sha256:" + "ab" * 32
    fails(RPM, tmp_path, {"packages": [missing]}, f"package {missing} is not in the sources",
          sources)


def test_rpm_corrupt_source_file(tmp_path, repo, sources):
    """A source file that does not match its checksum is refused."""
    checksum = repo.checksum("osb-base-1.0")
    path = sources / "org.osbuild.files" / checksum
    os.chmod(path, 0o644)
    with open(path, "ab") as f:
        f.write(b"x")
    fails(RPM, tmp_path, {"packages": [checksum]}, "does not match its checksum", sources)


def test_rpm_missing_dependency(tmp_path, repo, sources):
    """rpm's dependency check stays on: a missing dependency is named."""
    fails(RPM, tmp_path, {"gpgkeys": [repo.key], "packages": [repo.checksum("osb-app-2.0")]},
          "osb-base is needed by osb-app-2.0-1.noarch", sources)
    assert "osb-app" not in installed(tmp_path)


def test_rpm_schema():
    """Both package forms pass; wrong options are named."""
    good = "sha256:" + "0" * 64
    assert schema_error(RPM, {"packages": [good, {"checksum": good, "check_gpg": True}]}) is None
    assert "'packages' is a required property" in schema_error(RPM, {})
    assert schema_error(RPM, {"packages": ["md5:abc"]}).startswith("options.packages[0]:")
    assert schema_error(RPM, {"packages": [good], "gpgkeys": ["not a key"]}) \
        .startswith("options.gpgkeys[0]:")
    assert "Additional properties" in schema_error(RPM, {"packages": [], "keys": []})


# ------------------------------------------------------------------- dnf / yum


def dnf_options(repo, **kwargs):
    """dnf options for the test repository, updated with `kwargs`."""
    options = {"repos": [{"baseurl": repo.url, "gpgkey": repo.key,
                          "checksum": repo.repomd_checksum}],
               "packages": ["osb-app"], "releasever": "30", "basearch": "x86_64"}
    options.update(kwargs)
    return options


def test_dnf_install_groups_weak_deps_excludes(tmp_path, repo):
    """Newest version, dependencies, weak dependencies, a group minus an excluded package."""
    ok(DNF, tmp_path, dnf_options(repo, packages=["osb-app", "@osb-group"],
                                  exclude_packages=["osb-other"]))
    pkgs = installed(tmp_path)
    assert pkgs.pop("gpg-pubkey")   # the repository's key, imported by dnf
    assert pkgs == {"osb-app": "2.1-1", "osb-base": "1.0-1", "osb-weak": "1.0-1",
                    "osb-extra": "1.0-1"}
    # dnf's cache and logs stay out of the tree
    assert sorted(os.listdir(tmp_path / "var")) == ["lib"]


def test_dnf_no_weak_deps(tmp_path, repo):
    """install_weak_deps false leaves out Recommends."""
    ok(DNF, tmp_path, dnf_options(repo, install_weak_deps=False,
                                  module_platform_id="platform:f30"))
    assert "osb-weak" not in installed(tmp_path)
    assert "osb-app" in installed(tmp_path)


def test_dnf_upgrade_and_remove(tmp_path, repo, sources):
    """operation upgrade updates an rpm-installed package; yum remove removes it."""
    ok(RPM, tmp_path, {"packages": [repo.checksum("osb-base-1.0"), repo.checksum("osb-app-2.0")]},
       sources)
    assert installed(tmp_path)["osb-app"] == "2.0-1"
    ok(DNF, tmp_path, dnf_options(repo, operation="upgrade", packages=[]))
    assert installed(tmp_path)["osb-app"] == "2.1-1"
    assert (tmp_path / "usr/share/osb-app/app.txt").read_text() == "app 2.1\n"
    ok(YUM, tmp_path, dnf_options(repo, operation="remove"))
    assert "osb-app" not in installed(tmp_path)
    assert not (tmp_path / "usr/share/osb-app").exists()


def test_dnf_repo_from_source(tmp_path, repo):
    """A repository named by checksum comes from the org.osbuild.dnf source."""
    sources = tmp_path / "sources" / "org.osbuild.dnf"
    sources.mkdir(parents=True)
    (sources / repo.repomd_checksum).write_text(json.dumps(
        {"baseurl": repo.url, "gpgkey": repo.key, "checksum": repo.repomd_checksum}))
    tree = tmp_path / "tree"
    tree.mkdir()
    ok(DNF, tree, dnf_options(repo, repos=[repo.repomd_checksum]), tmp_path / "sources")
    assert installed(tree)["osb-app"] == "2.1-1"
    missing = "sha256:" + "cd" * 32
    fails(DNF, tree, dnf_options(repo, repos=[missing]),
          f"repository {missing} is not in the sources", tmp_path / "sources")


def test_dnf_metadata_checksum_mismatch(tmp_path, repo):
    """Metadata that does not match the repository's checksum is refused."""
    wrong = "sha256:" + "1" * 64
    proc = fails(DNF, tmp_path, dnf_options(repo, repos=[{"baseurl": repo.url,
                                                          "checksum": wrong}]),
                 f"does not match the expected {wrong}")
    assert repo.repomd_checksum in proc.stderr
    assert not (tmp_path / "usr").exists()


def test_dnf_unknown_package(tmp_path, repo):
    """Unknown packages and unresolvable dependencies are named."""
    fails(DNF, tmp_path, dnf_options(repo, packages=["osb-app", "osb-nonexistent"]),
          "Unable to find a match: osb-nonexistent")
    fails(DNF, tmp_path, dnf_options(repo, packages=["osb-needs-missing"]),
          "nothing provides osb-does-not-exist needed by osb-needs-missing")
    assert not (tmp_path / "usr").exists()


def test_dnf_bad_signature(tmp_path, repo):
    """Packages signed with another key than the repository's gpgkey fail."""
    fails(DNF, tmp_path, dnf_options(repo, packages=["osb-base"], repos=[
        {"baseurl": repo.badsig_url, "gpgkey": repo.key,
         "checksum": repo.badsig_repomd_checksum}]),
        "Error: GPG check FAILED")
    assert not (tmp_path / "usr").exists()


def test_dnf_unreachable_repo(tmp_path):
    """A repository that cannot be reached fails while fetching metadata."""
    fails(DNF, tmp_path, {"repos": [{"baseurl": "http://127.0.0.1:9/repo"}], "packages": ["x"],
                          "releasever": "30", "basearch": "x86_64"},
          "fetching the repository metadata failed")


def test_yum_uses_yum_without_dnf_only_options(tmp_path, repo):
    """A real yum in the build root is used, without dnf-only options."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "yum-args"
    (bindir / "yum").write_text(
        f"#!/bin/sh\necho \"$@\" >> {log}\necho 'Error: fake yum'\nexit 1\n")
    os.chmod(bindir / "yum", 0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    fails(YUM, tmp_path / "tree", dnf_options(repo, basearch=os.uname().machine),
          "fetching the repository metadata failed (exit status 1): Error: fake yum", env=env)
    args = log.read_text()
    assert f"--installroot={tmp_path / 'tree'}" in args and args.strip().endswith("makecache")
    assert "--forcearch" not in args and "varsdir" not in args
    fails(YUM, tmp_path / "tree", dnf_options(repo, basearch="s390x"),
          "yum cannot install for basearch s390x", env=env)


@pytest.mark.parametrize("stage", [DNF, YUM])
def test_dnf_schema(stage):
    """The original option shapes pass; wrong options are named."""
    checksum = "sha256:" + "9" * 64
    good = {"repos": [checksum, {"metalink": "https://example.com/metalink?repo=f-$releasever",
                                 "checksum": checksum,
                                 "gpgkey": "-----BEGIN PGP PUBLIC KEY BLOCK-----\n"}],
            "packages": ["@Fedora Cloud Server", "kernel"], "releasever": "30",
            "basearch": "x86_64", "install_weak_deps": True,
            "exclude_packages": ["dracut-config-rescue"],
            "module_platform_id": "platform:f30", "operation": "install"}
    assert schema_error(stage, good) is None
    for bad, where in [
            ({"repos": []}, "options.repos:"),
            ({"repos": [{"gpgkey": "x"}]}, "options.repos[0]:"),
            ({"repos": [{"baseurl": "no url"}]}, "options.repos[0]:"),
            ({"packages": ["--installroot=/"]}, "options.packages[0]:"),
            ({"operation": "erase-everything"}, "options.operation:"),
            ({"install_weak_deps": "yes"}, "options.install_weak_deps:"),
            ({"releasever": 30}, "options.releasever:")]:
        message = schema_error(stage, {**good, **bad})
        assert message.startswith(where), (bad, message)
    del good["basearch"]
    if stage == DNF:   # yum's basearch is optional, as in the original (test_compat_stages)
        assert "'basearch' is a required property" in schema_error(stage, good)
    else:
        assert schema_error(stage, good) is None


# ------------------------------------------------------------------- through osbuild


def tree_diff(store, id1, id2, *ignore):
    """tools/tree-diff of the committed trees `id1` and `id2`."""
    refs = os.path.join(store, "refs")
    argv = [os.path.join(REPO, "tools", "tree-diff")]
    for path in ignore:
        argv += ["--ignore", path]
    argv += [os.path.realpath(os.path.join(refs, id1)), os.path.realpath(os.path.join(refs, id2))]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


BASE = {"name": "org.osbuild.script", "options": {"chroot": False,
                                                  "script": "mkdir -p etc usr var"}}
DIR = {"type": "dir", "mode": "0755", "uid": 0, "gid": 0}


def file_attrs(text):
    """tree-diff attributes of a root-owned 0644 file with `text`."""
    return {"type": "file", "mode": "0644", "uid": 0, "gid": 0, "sha256": rpmrepo.sha256_text(text)}


@pytest.mark.integration
def test_rpm_through_osbuild(osbuild, store, repo):
    """Through osbuild with the files source: exactly the packages' files are added."""
    urls = repo.file_urls()
    base = osbuild({"pipeline": {"stages": [BASE]}}, store, check=True)
    checksums = [repo.checksum("osb-base-1.0"), repo.checksum("osb-weak-1.0")]
    manifest = {"pipeline": {"stages": [BASE, {"name": RPM, "options": {
        "gpgkeys": [repo.key], "packages": checksums}}]},
        "sources": {"org.osbuild.files": {"urls": {c: urls[c] for c in checksums}}}}
    res = osbuild(manifest, store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [s["name"] for s in res.json["stages"]] == [RPM]
    diff = tree_diff(store, base.json["tree_id"], res.json["tree_id"], "/var/lib/rpm")
    dirs = ["/usr/share", "/usr/share/osb-base", "/usr/share/osb-weak", "/var/lib"]
    assert diff == {
        "added_files": {
            **{d: DIR for d in dirs},
            "/usr/share/osb-base/data.txt": file_attrs("base data\n"),
            "/usr/share/osb-weak/weak.txt": file_attrs("weak\n"),
        },
        "deleted_files": {}, "differences": {}}
    db = os.path.join(store, "refs", res.json["tree_id"], "var/lib/rpm/rpmdb.sqlite")
    assert os.path.isfile(db)


@pytest.mark.integration
def test_rpm_missing_source_through_osbuild(osbuild, store, repo):
    """Through osbuild: a package the sources cannot provide fails; nothing is committed."""
    checksum = repo.checksum("osb-base-1.0")
    res = osbuild({"pipeline": {"stages": [BASE, {"name": RPM, "options": {
        "packages": [checksum]}}]}, "sources": {"org.osbuild.files": {"urls": {}}}}, store)
    assert res.returncode == 1
    last = res.json["stages"][-1]
    assert last["name"] == RPM and not last["success"]
    assert checksum in last["output"]
    assert not os.path.lexists(os.path.join(store, "refs", last["id"]))


@pytest.mark.integration
def test_dnf_through_osbuild(osbuild, store, repo):
    """Through osbuild with the dnf source: the package, its dependency, dnf's state."""
    manifest = {"pipeline": {"stages": [BASE, {"name": DNF, "options": {
        "repos": [repo.repomd_checksum], "packages": ["osb-app"], "install_weak_deps": False,
        "releasever": "30", "basearch": "x86_64"}}]},
        "sources": {"org.osbuild.dnf": {"repos": {
            repo.repomd_checksum: {"baseurl": repo.url, "gpgkey": repo.key}}}}}
    base = osbuild({"pipeline": {"stages": [BASE]}}, store, check=True)
    res = osbuild(manifest, store)
    assert res.returncode == 0, res.stdout + res.stderr
    diff = tree_diff(store, base.json["tree_id"], res.json["tree_id"],
                     "/var/lib/rpm", "/var/lib/dnf")
    assert diff == {
        "added_files": {
            "/etc/dnf": DIR, "/etc/dnf/modules.d": DIR,
            "/etc/osb-app.conf": file_attrs("setting=1\n"),
            "/usr/share": DIR, "/usr/share/osb-app": DIR, "/usr/share/osb-base": DIR,
            "/usr/share/osb-app/app.txt": file_attrs("app 2.1\n"),
            "/usr/share/osb-base/data.txt": file_attrs("base data\n"),
            "/var/lib": DIR,
        },
        "deleted_files": {}, "differences": {}}
