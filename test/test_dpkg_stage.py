"""Unit tests of the org.osbuild.dpkg stage: versions, dependencies, .deb handling."""
# pylint: disable=missing-function-docstring

import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from conftest import REPO, import_program


dpkg = import_program(os.path.join(REPO, "stages", "org.osbuild.dpkg"), "stage_dpkg")
needs_dpkg = pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg")


def dpkg_cmp(a, b):
    """The sign of dpkg's own comparison of versions a and b."""
    if subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode == 0:
        return -1
    if subprocess.run(["dpkg", "--compare-versions", a, "eq", b], check=False).returncode == 0:
        return 0
    return 1


def sign(x):
    return (x > 0) - (x < 0)


@pytest.mark.parametrize("a,b,expected", [
    ("1.0", "1.0", 0), ("1.0", "1.1", -1), ("1.0~rc1", "1.0", -1), ("1:0.1", "2.0", 1),
    ("1.2.13.dfsg-1", "1.2.13.dfsg-1+b1", -1), ("2.36-9+deb12u14", "2.36-9+deb12u4", 1),
    ("1.0a", "1.0", 1), ("1.0+", "1.0a", 1), ("0:1.0", "1.0", 0), ("1.001", "1.1", 0),
    ("6.1.0-56-amd64", "6.1.0-9-amd64", 1), ("1.0-1", "1.0", 1), ("~~", "~", -1),
])
def test_compare_versions(a, b, expected):
    assert sign(dpkg.compare_versions(a, b)) == expected
    assert sign(dpkg.compare_versions(b, a)) == -expected


VERSION = st.from_regex(r"\A([0-9]:)?[0-9][0-9a-z.+~]{0,6}(-[0-9a-z.+~]{1,4})?\Z", fullmatch=True)


@needs_dpkg
@settings(max_examples=60, deadline=None)
@given(VERSION, VERSION)
def test_compare_versions_matches_dpkg(a, b):
    assert sign(dpkg.compare_versions(a, b)) == dpkg_cmp(a, b)


def test_parse_relations():
    rel = dpkg.parse_relations(
        "libc6 (>= 2.34), usrmerge | usr-is-merged, perl:any, x (<< 2~) [amd64]")
    assert rel == [[("libc6", ">=", "2.34")],
                   [("usrmerge", None, None), ("usr-is-merged", None, None)],
                   [("perl", None, None)], [("x", "<<", "2~")]]
    with pytest.raises(dpkg.ProgramError):
        dpkg.parse_relations("Bad Name")


class FakePkg(dpkg.Package):
    """A package made from control-like strings, without a file."""

    def __init__(self, name, version, depends="", pre_depends="", provides="", essential=False):
        # pylint: disable=super-init-not-called
        self.name, self.version, self.arch, self.checksum = name, version, "amd64", "sha256:" + name
        self.essential = essential
        self.depends = dpkg.parse_relations(depends)
        self.pre_depends = dpkg.parse_relations(pre_depends)
        self.provides = [a[0] for a in dpkg.parse_relations(provides)]
        self.size, self.repacked, self.path = 1, None, None


def test_package_set_resolution():
    pkgs = [FakePkg("a", "1.0", depends="b (>= 2) | c, mail-transport-agent"),
            FakePkg("b", "1.5"), FakePkg("c", "1"),
            FakePkg("exim", "4", provides="mail-transport-agent"),
            FakePkg("d", "1", depends="virt (>= 3)"), FakePkg("e", "1", provides="virt (= 3.1)")]
    pset = dpkg.PackageSet(pkgs)
    pset.check()
    assert [p.name for p in pset.deps_of(pkgs[0])] == ["c", "exim"]
    assert [p.name for p in pset.deps_of(pkgs[4])] == ["e"]
    order = [p.name for p in pset.order(pkgs)]
    assert order.index("c") < order.index("a") and order.index("exim") < order.index("a")


def test_package_set_missing_dependency():
    pset = dpkg.PackageSet([FakePkg("a", "1", depends="b (>= 2)"), FakePkg("b", "1.9")])
    with pytest.raises(dpkg.ProgramError, match=r"a \(1\) depends on b \(>= 2\)"):
        pset.check()
    pset = dpkg.PackageSet([FakePkg("a", "1", depends="virt (>= 1)"),
                            FakePkg("b", "1", provides="virt")])
    with pytest.raises(dpkg.ProgramError, match="virt"):
        pset.check()


def test_package_set_duplicate():
    with pytest.raises(dpkg.ProgramError, match="listed twice"):
        dpkg.PackageSet([FakePkg("a", "1"), FakePkg("a", "2")])


def test_order_handles_cycles():
    pkgs = [FakePkg("a", "1", depends="b"), FakePkg("b", "1", depends="a"),
            FakePkg("c", "1", depends="a")]
    pset = dpkg.PackageSet(pkgs)
    order = [p.name for p in pset.order(pkgs)]
    assert sorted(order) == ["a", "b", "c"] and order[-1] == "c"
    assert pset.closure([pkgs[2]], set(pkgs)) == set(pkgs)


def build_deb(tmp_path, name, version="1.0", depends=None, files=None):
    """Build a tiny .deb with dpkg-deb; returns (checksum, path) in tmp_path/debs."""
    import hashlib  # pylint: disable=import-outside-toplevel
    root = tmp_path / f"build-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    control = (f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
               "Maintainer: t <t@t>\nDescription: t\n")
    if depends:
        control += f"Depends: {depends}\n"
    (root / "DEBIAN" / "control").write_text(control)
    for rel, content in (files or {f"usr/share/{name}/data": "x" * 1001}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    out = tmp_path / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    debs = tmp_path / "debs"
    debs.mkdir(exist_ok=True)
    shutil.move(out, debs / f"sha256:{digest}")
    return f"sha256:{digest}", str(debs / f"sha256:{digest}")


@needs_dpkg
def test_read_control_and_repack(tmp_path):
    checksum, path = build_deb(tmp_path, "hello", "2:1.0-1", depends="libc6 (>= 2.36)")
    control = dpkg.read_control(path)
    assert control["package"] == "hello" and control["version"] == "2:1.0-1"
    pkg = dpkg.Package(checksum, path, control)
    assert pkg.depends == [[("libc6", ">=", "2.36")]]
    outdir = tmp_path / "repack"
    outdir.mkdir()
    new = dpkg.repack(pkg, str(outdir))
    assert pkg.repacked == new
    names = [m[0] for m in dpkg.ar_members(new)]
    assert names == ["debian-binary", "control.tar.xz", "data.tar"]
    def listing(path):
        return subprocess.run(["dpkg-deb", "-c", path], capture_output=True, text=True,
                              check=True).stdout
    assert listing(new) == listing(path)
    assert dpkg.read_control(new) == control
    tree = tmp_path / "tree"
    tree.mkdir()
    os.symlink("usr/lib", tree / "lib")
    (tree / "usr" / "lib").mkdir(parents=True)
    dpkg.extract(str(tree), pkg)
    assert (tree / "usr/share/hello/data").read_text() == "x" * 1001


def test_not_a_deb(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"garbage")
    with pytest.raises(dpkg.ProgramError, match="not a Debian package"):
        dpkg.read_control(str(path))


@needs_dpkg
def test_stage_reports_missing_dependency(tmp_path, capsys):
    a, _ = build_deb(tmp_path, "alpha", depends="beta (>= 2)")
    b, _ = build_deb(tmp_path, "beta", "1.0")
    tree = tmp_path / "tree"
    tree.mkdir()
    rc = dpkg.main(str(tree), {"packages": [a, b]}, get=lambda c: str(tmp_path / "debs"))
    assert rc == 1
    err = capsys.readouterr().err
    assert "alpha (1.0) depends on beta (>= 2)" in err and "Traceback" not in err
    assert os.listdir(tree) == []


@needs_dpkg
def test_stage_reports_missing_source(tmp_path, capsys):
    a, _ = build_deb(tmp_path, "alpha")
    rc = dpkg.main(str(tmp_path), {"packages": [a, "sha256:" + "0" * 64]},
                   get=lambda c: str(tmp_path / "debs"))
    assert rc == 1
    assert "did not provide sha256:000" in capsys.readouterr().err


def test_stage_reports_fetch_error(tmp_path, capsys, monkeypatch):
    import sys  # pylint: disable=import-outside-toplevel
    monkeypatch.syspath_prepend(REPO)
    import osbuild.sources  # pylint: disable=import-outside-toplevel,import-error

    def fail(source, checksums, **_):
        assert source == "org.osbuild.files" and len(checksums) == 1
        raise RuntimeError("sources: org.osbuild.files: checksum mismatch")
    monkeypatch.setattr(osbuild.sources, "get", fail)
    assert "osbuild.sources" in sys.modules
    rc = dpkg.main(str(tmp_path), {"packages": ["sha256:" + "1" * 64]})
    assert rc == 1
    err = capsys.readouterr().err
    assert "cannot fetch packages" in err and "checksum mismatch" in err


def test_stage_without_essential(tmp_path, capsys):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb")
    a, _ = build_deb(tmp_path, "alpha")
    tree = tmp_path / "tree"
    tree.mkdir()
    rc = dpkg.main(str(tree), {"packages": [a]}, get=lambda c: str(tmp_path / "debs"))
    assert rc == 1
    assert "no Essential package" in capsys.readouterr().err


def test_installed_packages_satisfy_dependencies(tmp_path):
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text("Package: libc6\nStatus: install ok installed\nVersion: 2.36-9\n"
                      "Description: x\n long text\n\n"
                      "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
                      "Package: exim4\nStatus: install ok installed\nVersion: 4\n"
                      "Provides: mail-transport-agent\n")
    installed = dpkg.installed_packages(str(tmp_path))
    assert sorted(p.name for p in installed) == ["exim4", "libc6"]
    new = FakePkg("app", "1", depends="libc6 (>= 2.36), mail-transport-agent")
    dpkg.PackageSet([new], installed).check()
    with pytest.raises(dpkg.ProgramError, match="gone"):
        dpkg.PackageSet([FakePkg("app", "1", depends="gone")], installed).check()
    with pytest.raises(dpkg.ProgramError, match=r"libc6 \(>= 2.37\)"):
        dpkg.PackageSet([FakePkg("app", "1", depends="libc6 (>= 2.37)")], installed).check()
    # a newer libc6 in the set replaces the installed one
    pset = dpkg.PackageSet([FakePkg("app", "1", depends="libc6 (>= 2.37)"),
                            FakePkg("libc6", "2.38")], installed)
    pset.check()


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_missing_dependency_through_osbuild(tmp_path):
    """A hand-edited manifest without libc6 fails in the dpkg stage with a clear message."""
    from conftest import run_osbuild  # pylint: disable=import-outside-toplevel
    import debian_samples  # pylint: disable=import-outside-toplevel
    manifest = debian_samples.load("debian12-qcow2.json")
    urls = manifest["sources"]["org.osbuild.files"]["urls"]
    libc = [c for c, u in urls.items() if "/libc6_" in u]
    assert len(libc) == 1
    stage = manifest["pipeline"]["stages"][0]
    stage["options"]["packages"].remove(libc[0])
    manifest["pipeline"]["stages"] = [stage]
    manifest["pipeline"]["assembler"] = None
    res = run_osbuild(manifest, tmp_path / "store")
    assert res.returncode == 1
    assert res.json["success"] is False
    last = res.json["stages"][-1]
    assert last["name"] == "org.osbuild.dpkg" and last["success"] is False
    assert "dependency not in the package set" in last["output"]
    assert "depends on libc6" in last["output"]
    assert "Traceback" not in last["output"]


def test_write_apt_sources(tmp_path):
    dpkg.write_apt_sources(str(tmp_path), [
        {"uris": ["http://deb.debian.org/debian"], "suites": ["bookworm", "bookworm-updates"],
         "components": ["main", "contrib"], "signed_by": "/usr/share/keyrings/k.gpg"},
        {"uris": ["http://x/sec"], "suites": ["bookworm-security"], "components": ["main"]}])
    text = (tmp_path / "etc/apt/sources.list.d/osbuild.sources").read_text()
    stanzas = [s for s in text.split("\n\n") if s.strip()]
    assert len(stanzas) == 2
    assert "URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n" \
           "Components: main contrib\nSigned-By: /usr/share/keyrings/k.gpg" in stanzas[0]
    assert "Signed-By" not in stanzas[1]
