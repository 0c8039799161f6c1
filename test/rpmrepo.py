"""Test fixtures for the RPM stages: small RPMs, a signing key, a repository on 127.0.0.1.

Everything is made here with `rpmbuild`, `gpg`, `rpmsign` and `createrepo_c`;
nothing is downloaded.
"""

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import textwrap
import threading

KEY_NAME = "osbuild test key <osbuild-test@example.invalid>"
OTHER_KEY_NAME = "osbuild other key <osbuild-other@example.invalid>"


def sha256(path):
    """`sha256:<hex>` of the file at `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return "sha256:" + h.hexdigest()


def make_key(gnupghome, name):
    """Create a signing key in `gnupghome`; return its armored public key."""
    os.makedirs(gnupghome, mode=0o700, exist_ok=True)
    env = dict(os.environ, GNUPGHOME=gnupghome)
    subprocess.run(["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", "",
                    "--quick-gen-key", name, "rsa2048", "sign", "never"],
                   env=env, check=True, capture_output=True)
    return subprocess.run(["gpg", "--batch", "--armor", "--export", name], env=env, check=True,
                          capture_output=True, text=True).stdout


def sign(path, gnupghome, name):
    """Sign the RPM at `path` in place with the key `name`."""
    subprocess.run(["rpmsign", "--addsign", "--define", "__gpg /usr/bin/gpg",
                    "--define", f"_gpg_name {name}", "--define", f"_gpg_path {gnupghome}", path],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL,
                   env=dict(os.environ, GNUPGHOME=gnupghome))


def build_rpm(workdir, name, version, release="1", requires=(), recommends=(), files=None,
              post=None):
    """Build a noarch RPM; `files` maps absolute paths to text content. Returns its path."""
    files = files or {}
    top = os.path.join(workdir, "rpmbuild")
    for sub in ("SPECS", "RPMS", "BUILD", "BUILDROOT", "SOURCES", "SRPMS"):
        os.makedirs(os.path.join(top, sub), exist_ok=True)
    install = []
    for path, content in files.items():
        install.append(f"mkdir -p %{{buildroot}}{os.path.dirname(path)}")
        install.append(f"cat > %{{buildroot}}{path} <<'OSBUILD_EOF'\n{content}OSBUILD_EOF")
    spec = textwrap.dedent(f"""\
        Name: {name}
        Version: {version}
        Release: {release}
        Summary: osbuild test package {name}
        License: MIT
        BuildArch: noarch
        """)
    spec += "".join(f"Requires: {r}\n" for r in requires)
    spec += "".join(f"Recommends: {r}\n" for r in recommends)
    spec += f"\n%description\nTest package {name} for the osbuild test suite.\n\n"
    spec += "%install\n" + "\n".join(install) + "\n\n"
    if post:
        spec += f"%post\n{post}\n\n"
    owned = sorted({os.path.dirname(p) for p in files if name in os.path.dirname(p)})
    spec += ("%files\n" + "".join(f"%dir {d}\n" for d in owned)
             + "".join(f"{p}\n" for p in files) + "\n")
    spec_path = os.path.join(top, "SPECS", f"{name}-{version}-{release}.spec")
    with open(spec_path, "w", encoding="utf-8") as f:
        f.write(spec)
    subprocess.run(["rpmbuild", "-bb", "--nodeps", "--quiet",
                    "--define", f"_topdir {top}",
                    "--define", "_build_id_links none",
                    "--define", "_binary_payload w2.xzdio",
                    "--define", "source_date_epoch_from_changelog 0",
                    "--define", "use_source_date_epoch_as_buildtime 1",
                    spec_path], check=True, capture_output=True,
                   env=dict(os.environ, SOURCE_DATE_EPOCH="1600000000"))
    out = os.path.join(top, "RPMS", "noarch", f"{name}-{version}-{release}.noarch.rpm")
    assert os.path.isfile(out), out
    return out


COMPS = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE comps PUBLIC "-//Red Hat, Inc.//DTD Comps info//EN" "comps.dtd">
<comps>
  <group>
    <id>osb-group</id>
    <name>osbuild test group</name>
    <description>Packages of the osbuild test group</description>
    <default>true</default>
    <uservisible>true</uservisible>
    <packagelist>
      <packagereq type="mandatory">osb-extra</packagereq>
      <packagereq type="default">osb-other</packagereq>
    </packagelist>
  </group>
</comps>
"""


class RpmRepo:  # pylint: disable=too-many-instance-attributes
    """Signed test packages, a createrepo_c repository and an HTTP server for it.

    Attributes: `key` (armored public key of the signing key), `other_key`,
    `packages` (name -> path of the signed .rpm), `unsigned` (name -> path),
    `badsig` (name -> path signed with the other key), `url` (repository
    base URL once started), `repomd_checksum` (sha256 of repodata/repomd.xml),
    `files` (sha256 -> path for all .rpm files made), `badsig_url` and
    `badsig_repomd_checksum` (a repository of the badsig packages).
    """

    def __init__(self, workdir):
        self.workdir = workdir
        self.gnupghome = os.path.join(workdir, "gnupg")
        self.key = make_key(self.gnupghome, KEY_NAME)
        self.other_key = make_key(self.gnupghome, OTHER_KEY_NAME)
        build = os.path.join(workdir, "build")
        specs = [
            ("osb-base", "1.0", {}, {"/usr/share/osb-base/data.txt": "base data\n"}),
            ("osb-app", "2.0", {"requires": ["osb-base"], "recommends": ["osb-weak"]},
             {"/usr/share/osb-app/app.txt": "app 2.0\n", "/etc/osb-app.conf": "setting=1\n"}),
            ("osb-app", "2.1", {"requires": ["osb-base"], "recommends": ["osb-weak"]},
             {"/usr/share/osb-app/app.txt": "app 2.1\n", "/etc/osb-app.conf": "setting=1\n"}),
            ("osb-weak", "1.0", {}, {"/usr/share/osb-weak/weak.txt": "weak\n"}),
            ("osb-extra", "1.0", {}, {"/usr/share/osb-extra/extra.txt": "extra\n"}),
            ("osb-other", "1.0", {}, {"/usr/share/osb-other/other.txt": "other\n"}),
            ("osb-needs-missing", "1.0", {"requires": ["osb-does-not-exist"]},
             {"/usr/share/osb-needs-missing/x.txt": "x\n"}),
        ]
        self.packages = {}
        self.unsigned = {}
        self.badsig = {}
        self.files = {}
        repo = os.path.join(workdir, "repo")
        os.makedirs(os.path.join(repo, "Packages"), exist_ok=True)
        for name, version, deps, files in specs:
            path = build_rpm(build, name, version, requires=deps.get("requires", ()),
                             recommends=deps.get("recommends", ()), files=files)
            nvr = f"{name}-{version}"
            unsigned = os.path.join(workdir, "unsigned", os.path.basename(path))
            os.makedirs(os.path.dirname(unsigned), exist_ok=True)
            shutil.copy2(path, unsigned)
            badsig = os.path.join(workdir, "badsig", os.path.basename(path))
            os.makedirs(os.path.dirname(badsig), exist_ok=True)
            shutil.copy2(path, badsig)
            sign(badsig, self.gnupghome, OTHER_KEY_NAME)
            sign(path, self.gnupghome, KEY_NAME)
            signed = os.path.join(repo, "Packages", os.path.basename(path))
            shutil.copy2(path, signed)
            self.packages[nvr] = signed
            self.unsigned[nvr] = unsigned
            self.badsig[nvr] = badsig
            for p in (signed, unsigned, badsig):
                self.files[sha256(p)] = p
        with open(os.path.join(workdir, "comps.xml"), "w", encoding="utf-8") as f:
            f.write(COMPS)
        subprocess.run(["createrepo_c", "--quiet", "--no-database", "--simple-md-filenames",
                        "-g", os.path.join(workdir, "comps.xml"), repo],
                       check=True, capture_output=True)
        self.repo = repo
        self.repomd_checksum = sha256(os.path.join(repo, "repodata", "repomd.xml"))
        # a second repository whose packages are signed with the other key
        badrepo = os.path.join(workdir, "badsig")
        subprocess.run(["createrepo_c", "--quiet", "--no-database", "--simple-md-filenames",
                        badrepo], check=True, capture_output=True)
        self.badsig_repomd_checksum = sha256(os.path.join(badrepo, "repodata", "repomd.xml"))
        self.url = None
        self.root_url = None
        self.badsig_url = None
        self._server = None
        self._thread = None

    def checksum(self, nvr, kind="signed"):
        """The checksum of package `nvr` in its signed, unsigned or badsig form."""
        forms = {"signed": self.packages, "unsigned": self.unsigned, "badsig": self.badsig}
        path = forms[kind][nvr]
        return sha256(path)

    def populate_sources(self, directory):
        """Copy every package file into `directory/<sha256:...>` (a files source output)."""
        os.makedirs(directory, exist_ok=True)
        for checksum, path in self.files.items():
            shutil.copy2(path, os.path.join(directory, checksum))

    def file_urls(self):
        """`{checksum: URL}` for all package files (the server serves the work directory)."""
        urls = {}
        for checksum, path in self.files.items():
            urls[checksum] = f"{self.root_url}/{os.path.relpath(path, self.workdir)}"
        return urls

    def start(self):
        """Serve the work directory on 127.0.0.1; sets `root_url` and `url` (the repo)."""
        handler = functools.partial(_QuietHandler, directory=self.workdir)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.root_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.url = f"{self.root_url}/repo"
        self.badsig_url = f"{self.root_url}/badsig"
        return self

    def stop(self):
        """Stop the HTTP server and the gpg-agent that signing started."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        subprocess.run(["gpgconf", "--homedir", self.gnupghome, "--kill", "gpg-agent"],
                       check=False, capture_output=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        pass


def sha256_text(text):
    """Hex sha256 of a text (as tree-diff reports file contents)."""
    return hashlib.sha256(text.encode()).hexdigest()
