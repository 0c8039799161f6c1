"""Packaging: version, man pages, tarball, setup.py (pip), the RPMs and an installed osbuild."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from osbuild.version import __version__

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB_KINDS = ("stages", "assemblers", "sources", "runners")
SAMPLE = {
    "pipeline": {
        "stages": [{"name": "org.osbuild.script",
                    "options": {"chroot": False,
                                "script": "mkdir -p etc; echo installed > etc/motd; "
                                          "python3 -c 'import osbuild.api'"}}],
        "assembler": {"name": "org.osbuild.noop", "options": {"sample": True}},
    }
}


def have(*programs):
    """Whether all `programs` are on PATH."""
    return all(shutil.which(p) for p in programs)


def make(*args, **kwargs):
    """Run make in the checkout; returns the CompletedProcess (raises on failure)."""
    res = subprocess.run(["make", "-s", "-C", REPO, "--no-print-directory"] + list(args),
                         capture_output=True, text=True, check=False,
                         timeout=kwargs.get("timeout", 600))
    assert res.returncode == 0, f"make {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def checkout_programs(kind):
    """Names of the programs of `kind` in the checkout."""
    d = os.path.join(REPO, kind)
    return sorted(n for n in os.listdir(d) if n.startswith("org."))


# --- version ---------------------------------------------------------------

def test_version_is_defined_once():
    assert re.fullmatch(r"[0-9][0-9A-Za-z.+~]*", __version__)
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == __version__
    assert make("version").stdout.strip() == __version__
    with open(os.path.join(REPO, "osbuild.spec"), encoding="utf-8") as f:
        spec = f.read()
    assert re.search(r"^Version:\s+%\{osbuild_version\}$", spec, re.M), \
        "the spec must take its version from the Makefile, not hard-code it"
    res = subprocess.run([sys.executable, "-m", "osbuild", "--version"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == f"osbuild {__version__}"


@pytest.mark.skipif(not have("make", "sed"), reason="needs make")
def test_spec_target_fills_in_version(tmp_path):
    make("spec", f"RPMBUILD_DIR={tmp_path}")
    with open(tmp_path / "SPECS" / "osbuild.spec", encoding="utf-8") as f:
        first = f.readline()
    assert first == f"%global osbuild_version {__version__}\n"


# --- checkout layout ---------------------------------------------------------

@pytest.mark.parametrize("kind", LIB_KINDS)
def test_checkout_helper_links(kind):
    link = os.path.join(REPO, kind, "osbuild")
    assert os.path.islink(link) and os.readlink(link) == "../osbuild"


@pytest.mark.parametrize("kind", LIB_KINDS)
def test_checkout_programs_are_executable(kind):
    for name in checkout_programs(kind):
        path = os.path.join(REPO, kind, name)
        assert os.access(path, os.X_OK), f"{kind}/{name} is not executable"
        with open(path, "rb") as f:
            assert f.read(2) == b"#!", f"{kind}/{name} has no #! line"


# --- man pages ---------------------------------------------------------------

@pytest.fixture(name="man_pages", scope="module")
def man_pages_fixture(tmp_path_factory):
    """Build the man pages into a temporary BUILDDIR; returns its man/ directory."""
    if not have("make") or not (have("rst2man") or have("rst2man.py")):
        pytest.skip("needs make and rst2man (python3-docutils)")
    builddir = tmp_path_factory.mktemp("build")
    make("man", f"BUILDDIR={builddir}")
    return builddir / "man"


def render(path):
    """The man page as text, rendered by `man -l`; fails on groff warnings."""
    if not have("man", "groff"):
        pytest.skip("needs man-db and groff")
    env = dict(os.environ, MANWIDTH="100", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
    res = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True, env=env,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    warn = subprocess.run(["groff", "-man", "-ww", "-z", str(path)], capture_output=True,
                          text=True, check=False)
    assert warn.stderr == "", warn.stderr
    return res.stdout


def cli_options():
    """The long options `osbuild --help` lists."""
    res = subprocess.run([sys.executable, "-m", "osbuild", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    options = set(re.findall(r"(--[a-z][a-z-]+)", res.stdout))
    assert {"--store", "--libdir", "--json", "--inspect", "--version"} <= options
    return options


def test_man_osbuild_1(man_pages):
    text = render(man_pages / "osbuild.1")
    assert text.startswith("OSBUILD(1)")
    for section in ("SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "FILES", "EXAMPLES",
                    "SEE ALSO"):
        assert re.search(rf"^{section}$", text, re.M), section
    options = text[text.index("\nOPTIONS"):text.index("\nOUTPUT")]
    for option in cli_options():
        assert re.search(rf"^\s+(-[a-z]( [A-Z]+)?, )?{option}\b", options, re.M), \
            f"{option} is not documented"
    status = text[text.index("\nEXIT STATUS"):text.index("\nENVIRONMENT")]
    for code in ("0", "1", "2", "130"):
        assert re.search(rf"^\s+{code}\s", status, re.M), f"exit status {code}"
    assert f"osbuild {__version__}" in text


def test_man_osbuild_manifest_5(man_pages):
    text = render(man_pages / "osbuild-manifest.5")
    assert text.startswith("OSBUILD-MANIFEST(5)")
    for section in ("PIPELINE", "IDS", "SOURCES", "STAGES", "ASSEMBLERS", "SOURCE PROGRAMS",
                    "EXAMPLE"):
        assert re.search(rf"^{section}$", text, re.M), section
    # Every program of this version is described, with its one-line description.
    for kind in ("stages", "assemblers", "sources"):
        for name in checkout_programs(kind):
            assert re.search(rf"^\s+{re.escape(name)}$", text, re.M), f"{kind}/{name} missing"
    assert "Run a script in the tree" in text
    # Option names of a stage are listed.
    script = text[text.index("\n   org.osbuild.script\n"):]
    assert re.search(r"^\s+script \(string, required\)$", script, re.M)


# --- tarball and setup.py ----------------------------------------------------

@pytest.fixture(name="tarball", scope="module")
def tarball_fixture(tmp_path_factory):
    """`make tarball` into a temporary RPMBUILD_DIR; returns the tarball's path."""
    if not have("make", "git", "tar"):
        pytest.skip("needs make, git and tar")
    if not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    topdir = tmp_path_factory.mktemp("rpmbuild")
    make("tarball", f"RPMBUILD_DIR={topdir}")
    path = topdir / "SOURCES" / f"osbuild-{__version__}.tar.gz"
    assert path.is_file()
    return path


def test_tarball_contents(tarball):
    prefix = f"osbuild-{__version__}/"
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert all(name.startswith(prefix) for name in members)
    names = {name[len(prefix):] for name in members}
    for needed in ("setup.py", "osbuild.spec", "Makefile", "schemas/osbuild1.json",
                   "osbuild/__main__.py", "osbuild/version.py", "docs/osbuild.1.rst",
                   "docs/osbuild-manifest.5.rst", "stages/org.osbuild.script"):
        assert needed in names, needed
    for kind in LIB_KINDS:
        link = members[prefix + kind + "/osbuild"]
        assert link.issym() and link.linkname == "../osbuild"
    assert not any("__pycache__" in n or n.endswith(".pyc") or n.startswith(".git/")
                   or n.startswith("rpmbuild/") for n in names)


def test_pip_install_into_venv(tmp_path, tarball):
    """`pip install .` (of the released sources) in a fresh venv gives a working osbuild."""
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path, filter="tar")
    src = tmp_path / f"osbuild-{__version__}"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, check=False, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    osbuild = str(venv / "bin" / "osbuild")
    res = subprocess.run([osbuild, "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=False)
    assert res.returncode == 0 and "--libdir" in res.stdout, res.stderr
    res = subprocess.run([osbuild, "--version"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True)
    assert res.stdout.strip() == f"osbuild {__version__}"
    # The module and its schema come from the venv, not from the checkout.
    code = ("import osbuild, osbuild.schema as s; print(osbuild.__file__); "
            "print(s.find_schema('/nonexistent'))")
    res = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, env=env, cwd=tmp_path, check=True)
    module, schema = res.stdout.split()
    assert module.startswith(str(venv)) and schema.startswith(str(venv))
    assert schema.endswith("/osbuild/schemas/osbuild1.json")
    # A wrong manifest is reported by path, using the packaged schema.
    manifest = tmp_path / "bad.json"
    manifest.write_text(json.dumps({"pipeline": {"stages": [{"name": "org.osbuild.noop",
                                                             "options": 5}]}}))
    res = subprocess.run([osbuild, "--libdir", str(src), "--store", str(tmp_path / "store"),
                          "--inspect", str(manifest)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert res.returncode == 1
    assert res.stderr == "osbuild: pipeline.stages[0].options: 5 is not of type 'object', 'null'\n"


# --- RPMs --------------------------------------------------------------------

@pytest.fixture(name="rpms", scope="module")
def rpms_fixture(tmp_path_factory):
    """`make rpm` into a temporary RPMBUILD_DIR; returns {package name: path}."""
    if not have("make", "git", "tar", "rpmbuild", "rpm"):
        pytest.skip("needs make, git, tar, rpm and rpmbuild")
    if not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    topdir = tmp_path_factory.mktemp("rpmbuild")
    make("rpm", f"RPMBUILD_DIR={topdir}", timeout=1200)
    found = {}
    for name in ("osbuild", "python3-osbuild"):
        path = topdir / "RPMS" / "noarch" / f"{name}-{__version__}-1.noarch.rpm"
        assert path.is_file(), f"{path} was not built"
        found[name] = path
    return found


def rpm_query(path, fmt):
    """`rpm -qp --qf FMT PATH` output."""
    return subprocess.run(["rpm", "-qp", "--qf", fmt, str(path)], capture_output=True,
                          text=True, check=True).stdout


def rpm_files(path):
    """The files of an RPM package."""
    return set(subprocess.run(["rpm", "-qpl", str(path)], capture_output=True, text=True,
                              check=True).stdout.split())


def test_rpms_are_noarch_and_split(rpms):
    for name, path in rpms.items():
        assert rpm_query(path, "%{NAME} %{VERSION} %{ARCH}") == f"{name} {__version__} noarch"
    main, module = rpm_files(rpms["osbuild"]), rpm_files(rpms["python3-osbuild"])
    assert "/usr/bin/osbuild" in main
    for kind in LIB_KINDS:
        assert f"/usr/lib/osbuild/{kind}/osbuild" in main
    assert "/usr/lib/osbuild/schemas/osbuild1.json" in main
    assert any(f.startswith("/usr/share/man/man1/osbuild.1") for f in main)
    assert any(f.startswith("/usr/share/man/man5/osbuild-manifest.5") for f in main)
    assert not any(f.endswith("/osbuild/__main__.py") for f in main)
    assert any(f.endswith("/osbuild/__main__.py") for f in module)
    assert any(f.endswith("/osbuild/schemas/osbuild1.json") for f in module)
    assert not any(f.startswith("/usr/lib/osbuild") or f.startswith("/usr/bin") for f in module)
    requires = rpm_query(rpms["osbuild"], "[%{REQUIRENAME} %{REQUIREVERSION}\n]")
    assert f"python3-osbuild {__version__}-1" in requires
    assert "python3-jsonschema" in rpm_query(rpms["python3-osbuild"], "[%{REQUIRENAME}\n]")


@pytest.fixture(name="scratch_root", scope="module")
def scratch_root_fixture(rpms, tmp_path_factory):
    """The RPMs installed into a scratch root with `rpm --root --nodeps`."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = tmp_path_factory.mktemp("root")
    res = subprocess.run(["rpm", "--root", str(root), "--nodeps", "-i"]
                         + [str(p) for p in rpms.values()],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    return root


def site_dir(root):
    """The directory python3-osbuild installed the module into (inside `root`)."""
    found = [os.path.dirname(d) for d, _, files in os.walk(root / "usr" / "lib")
             if d.endswith("/osbuild") and "__main__.py" in files]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.integration
def test_installed_layout(scratch_root):
    root = scratch_root
    res = subprocess.run(["rpm", "--root", str(root), "-q", "osbuild", "python3-osbuild"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    cmd = root / "usr" / "bin" / "osbuild"
    assert os.access(cmd, os.X_OK)
    assert cmd.read_text().startswith("#!/usr/bin/python3\n")
    site = site_dir(root)
    # The system python3 must find the module there.
    sys_path = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('\\n'.join(sys.path))"],
                              capture_output=True, text=True, check=True).stdout.split()
    assert site[len(str(root)):] in sys_path
    assert os.path.isfile(os.path.join(site, "osbuild", "schemas", "osbuild1.json"))
    lib = root / "usr" / "lib" / "osbuild"
    for kind in LIB_KINDS:
        link = lib / kind / "osbuild"
        assert link.is_symlink()
        target = os.path.realpath(link)
        assert target == os.path.join(site, "osbuild"), f"{link} -> {target}"
        assert os.path.isfile(os.path.join(target, "__init__.py"))
        for name in checkout_programs(kind):
            installed = lib / kind / name
            source = os.path.join(REPO, kind, name)
            if os.path.islink(source):
                assert installed.is_symlink() and os.readlink(installed) == os.readlink(source)
            else:
                assert os.access(installed, os.X_OK), f"{kind}/{name}"
                with open(source, "rb") as a, open(installed, "rb") as b:
                    assert a.read() == b.read(), f"{kind}/{name} differs"
    assert (lib / "schemas" / "osbuild1.json").is_file()
    man1 = [p for p in (root / "usr/share/man/man1").iterdir() if p.name.startswith("osbuild.1")]
    assert man1 and render(man1[0]).startswith("OSBUILD(1)")


def in_installed_system(root, command, cwd):
    """Run `command` with the scratch root's /usr laid over the host's /usr.

    A private mount namespace gets an overlay of ROOT/usr on top of /usr, so
    /usr/bin/osbuild, /usr/lib/osbuild and the module are exactly what the
    RPMs installed, at their real paths, while the host stays untouched.
    """
    script = ('mount -t overlay overlay -o "lowerdir=$1/usr:/usr" /usr && shift && '
              'cd "$1" && shift && exec "$@"')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           "sh", str(root), str(cwd)] + command,
                          capture_output=True, text=True, env=env, check=False, timeout=1200)


@pytest.mark.integration
def test_installed_osbuild_runs_sample_with_default_libdir(scratch_root, tmp_path):
    if not have("unshare", "systemd-nspawn"):
        pytest.skip("needs unshare and systemd-nspawn")
    if not os.path.exists("/etc/os-release") and not os.path.exists("/usr/lib/os-release"):
        pytest.skip("no os-release")
    # Sanity: outside the namespace nothing is installed, so the default libdir must come
    # from the installed copy.
    manifest = tmp_path / "sample.json"
    manifest.write_text(json.dumps(SAMPLE))
    code = "import osbuild, osbuild.schema as s; print(osbuild.__file__, s.find_schema())"
    res = in_installed_system(scratch_root, ["/usr/bin/python3", "-c", code], tmp_path)
    assert res.returncode == 0, res.stderr
    module, schema = res.stdout.split()
    site = site_dir(scratch_root)[len(str(scratch_root)):]
    assert module == f"{site}/osbuild/__init__.py"
    assert schema == f"{site}/osbuild/schemas/osbuild1.json"

    res = in_installed_system(scratch_root, ["osbuild", "--version"], tmp_path)
    assert res.stdout.strip() == f"osbuild {__version__}", res.stderr

    store = tmp_path / "store"
    res = in_installed_system(scratch_root, ["osbuild", "--store", str(store), "--json",
                                             str(manifest)], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert result["success"] is True
    assert [s["name"] for s in result["stages"]] == ["org.osbuild.script"]
    assert result["assembler"]["output"].strip() == '{"sample": true}'
    with open(store / "refs" / result["tree_id"] / "etc" / "motd", encoding="utf-8") as f:
        assert f.read() == "installed\n"
    assert os.path.isdir(store / "refs" / result["output_id"])

    # --inspect and the schema check work from the installed copy too.
    res = in_installed_system(scratch_root, ["osbuild", "--inspect", str(manifest)], tmp_path)
    assert res.returncode == 0, res.stderr
    inspected = json.loads(res.stdout)
    assert inspected["pipeline"]["tree_id"] == result["tree_id"]
    assert inspected["pipeline"]["output_id"] == result["output_id"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pipeline": {"stages": [{"name": "org.osbuild.script",
                                                        "options": {"chroot": False,
                                                                    "script": 1}}]}}))
    res = in_installed_system(scratch_root, ["osbuild", "--store", str(store), str(bad)],
                              tmp_path)
    assert res.returncode == 1
    assert res.stderr == "osbuild: pipeline.stages[0].options.script: 1 is not of type 'string'\n"
