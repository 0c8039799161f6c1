"""Attacks on the secrets (--secrets) of an entitled dnf repository, against real builds.

The repository is served over HTTPS on 127.0.0.1 and refuses clients without
the test CA's client certificate. The secrets file holds the client key as
PEM text with a unique marker line; each test asserts that the marker shows
up nowhere it must not: a stage that does not declare STAGE_SECRETS, a
package scriptlet, the log, the JSON result, the tree, the store, the output
tarball, /run/osbuild, /tmp, /var/tmp, and no file is left after a SIGKILL.
"""

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import pytest

from hygiene import leftovers
from pki import make_pki

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DNF_SOURCE = "org.osbuild.dnf"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not all(shutil.which(p) for p in
                                         ("rpmbuild", "createrepo_c", "dnf", "openssl")),
                                 reason="needs rpm, createrepo-c, dnf and openssl")]

# The scriptlet of osb-spy: mount /proc in the tree and read every regular
# file (memfds included) any process of the container has open, looking for
# the secret. It records what it could do, so the test knows it really looked.
# (The tree has no /dev: no redirection to /dev/null, or dash skips the command.)
SPY_POST = r"""
mkdir -p /proc /var/spy
mount -t proc proc /proc 2>/var/spy/mount-error && echo mounted > /var/spy/status
n=0
for f in /proc/[0-9]*/fd/* /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do
  if [ -f "$f" ]; then
    n=$((n + 1))
    cat "$f" 2>&1 | grep -a -o 'BEGIN [A-Z ]*PRIVATE KEY' >> /var/spy/found || true
  fi
done
echo "$n" > /var/spy/scanned
umount /proc || true
"""

# A stage without STAGE_SECRETS that tries every way to the secret through the
# sources API, and copies whatever it finds into the tree (and so the store and
# the output tarball).
THIEF = r"""
import glob, os, sys
from osbuild import sources
from osbuild.util import jsoncomm
cs = sys.argv[1]
tree = os.environ["TREE"]
loot = []
try:
    directory, fds = sources.get_secrets("org.osbuild.dnf", [cs])
    for keys in fds.values():
        for fd in keys.values():
            loot.append(open(f"/proc/self/fd/{fd}").read())
except RuntimeError as e:
    print("get_secrets:", e)
with jsoncomm.Socket.new_client(sources.API_PATH) as sock:
    reply, fds = sock.call({"source": "org.osbuild.dnf", "checksums": [cs], "secrets": True})
    print("raw request:", reply, len(fds))
    for fd in fds:
        loot.append(os.read(fd, 1 << 20).decode(errors="replace"))
directory = sources.get("org.osbuild.dnf", [cs])
for path in glob.glob(os.path.join(directory, "*")) + glob.glob("/run/osbuild/sources/*/*"):
    loot.append(open(path, errors="replace").read())
for path in glob.glob("/proc/[0-9]*/fd/*"):
    try:
        loot.append(open(path, errors="replace").read(1 << 20))
    except OSError:
        pass
text = "\n".join(loot)
print(text)
with open(os.path.join(tree, "stolen"), "w") as f:
    f.write(text)
"""


@pytest.fixture(name="pki", scope="module")
def pki_fixture(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate (EC keys)."""
    return make_pki(tmp_path_factory.mktemp("pki"), "osbuild attack CA", "client")


def build_spy_rpm(workdir, post):
    """A noarch RPM `osb-spy` whose %post is `post` (no automatic /bin/sh requirement)."""
    top = os.path.join(workdir, "rpmbuild")
    for sub in ("SPECS", "RPMS", "BUILD", "BUILDROOT", "SOURCES", "SRPMS"):
        os.makedirs(os.path.join(top, sub), exist_ok=True)
    spec = textwrap.dedent("""\
        Name: osb-spy
        Version: 1.0
        Release: 1
        Summary: looks for secrets from its scriptlet
        License: MIT
        BuildArch: noarch
        AutoReqProv: no
        # the tree has a shell, but no package of it says so
        Provides: /bin/sh

        %description
        Test package for the osbuild secrets attack tests.

        %install
        mkdir -p %{buildroot}/usr/share/osb-spy
        echo spy > %{buildroot}/usr/share/osb-spy/spy.txt

        %post
        """) + post + "\n%files\n/usr/share/osb-spy/spy.txt\n"
    path = os.path.join(top, "SPECS", "osb-spy.spec")
    with open(path, "w", encoding="utf-8") as f:
        f.write(spec)
    subprocess.run(["rpmbuild", "-bb", "--nodeps", "--quiet", "--define", f"_topdir {top}",
                    "--define", "_build_id_links none", path], check=True, capture_output=True)
    return os.path.join(top, "RPMS", "noarch", "osb-spy-1.0-1.noarch.rpm")


class EntitledRepo:
    """An rpm-md repository behind HTTPS with required client certificates.

    `stall` (an Event) makes package downloads wait until it is set;
    `package_requested` is set when a package is first requested.
    """

    def __init__(self, workdir, pki):
        self.dir = os.path.join(workdir, "repo")
        os.makedirs(os.path.join(self.dir, "Packages"))
        rpm = build_spy_rpm(os.path.join(workdir, "build"), SPY_POST)
        shutil.copy(rpm, os.path.join(self.dir, "Packages"))
        subprocess.run(["createrepo_c", "--quiet", "--no-database", "--simple-md-filenames",
                        self.dir], check=True, capture_output=True)
        with open(os.path.join(self.dir, "repodata", "repomd.xml"), "rb") as f:
            self.checksum = "sha256:" + hashlib.sha256(f.read()).hexdigest()
        self.stall = threading.Event()
        self.stall.set()
        self.package_requested = threading.Event()
        repo = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            """Serves the repository; packages wait for `stall`."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=repo.dir, **kwargs)

            def do_GET(self):  # pylint: disable=invalid-name
                """GET, waiting for `stall` for packages."""
                if self.path.endswith(".rpm"):
                    repo.package_requested.set()
                    repo.stall.wait(120)
                super().do_GET()

            def log_message(self, *args):  # pylint: disable=arguments-differ
                """Quiet."""

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
        ctx.load_verify_locations(pki / "ca.crt")
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        """Stop serving."""
        self.stall.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(name="entitled")
def entitled_fixture(tmp_path, pki):
    """The entitled repository, and a secrets file whose client key carries a marker.

    Yields (repo, secrets path, marker). The marker is a PEM comment-free line
    of the key file as osbuild reads it: an EC key with an extra marker line
    would not parse, so the key's own base64 body is the marker.
    """
    repo = EntitledRepo(str(tmp_path / "entitled"), pki)
    key = (pki / "client.key").read_text()
    marker = key.splitlines()[1]
    secrets = tmp_path / "secrets" / "secrets.json"
    secrets.parent.mkdir()
    secrets.write_text(json.dumps({"cdn": {
        "ssl_client_cert": (pki / "client.crt").read_text(),
        "ssl_client_key": key,
        "ssl_ca_cert": (pki / "ca.crt").read_text()}}))
    os.chmod(secrets, 0o600)
    try:
        yield repo, secrets, marker
    finally:
        repo.close()


# A tree with a shell and the few tools the scriptlet uses (from the host,
# with their libraries), so rpm can run %post chrooted into it.
TOOLS = "sh dash cat grep mkdir mount umount"
BASE = {"name": "org.osbuild.script", "options": {"chroot": False, "script": textwrap.dedent(f"""\
    mkdir -p etc usr/bin usr/sbin var
    ln -s usr/bin bin
    ln -s usr/sbin sbin
    for t in {TOOLS}; do
      p=$(command -v $t)
      cp -L "$p" usr/bin/
      ldd "$p" | grep -o '/[^ ]*' | while read -r l; do cp -L --parents "$l" .; done
    done
    """)}}


def manifest(repo, *extra_stages, assembler=None):
    """Base tree, the dnf stage installing osb-spy from the entitled repository, `extra_stages`."""
    pipeline = {"stages": [BASE, {"name": "org.osbuild.dnf", "options": {
        "repos": [repo.checksum], "packages": ["osb-spy"],
        "releasever": "1", "basearch": "x86_64"}}, *extra_stages]}
    if assembler:
        pipeline["assembler"] = assembler
    return {"pipeline": pipeline, "sources": {DNF_SOURCE: {"repos": {repo.checksum: {
        "baseurl": repo.url, "sslverify": True, "secrets": {"name": "cdn"}}}}}}


def osbuild_cmd(store, secrets, manifest_path):
    """The osbuild command line for a build with `secrets`."""
    return [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(store), "--json",
            "--secrets", str(secrets), str(manifest_path)]


def files_containing(top, needle, since=None, skip=()):
    """Regular files under `top` (modified after `since`, if given) that contain `needle`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        # other sessions' trees may be nested absurdly deep (robustness tests)
        deep = dirpath.count("/") - top.count("/") > 24
        dirnames[:] = [] if deep else [d for d in dirnames
                                       if os.path.join(dirpath, d) not in skip]
        for name in filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if not os.path.isfile(path) or os.path.islink(path) or \
                        since is not None and max(st.st_mtime, st.st_ctime) < since:
                    continue
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(path)
    return found


def assert_nowhere(marker, store, tmp_path, since, *texts):
    """The marker is in none of `texts`, the store, /run/osbuild, or new files in /tmp, /var/tmp."""
    needle = marker.encode()
    for text in texts:
        assert marker not in text
    assert files_containing(str(store), needle) == [], "secret in the store"
    assert files_containing("/run/osbuild", needle) == [], "secret in /run/osbuild"
    # pytest's directories hold the test CA's files and other sessions' trees: this
    # test's own directory is scanned apart below
    skip = {str(tmp_path.parent), str(tmp_path.parent.parent)}
    for top in ("/tmp", "/var/tmp"):
        assert files_containing(top, needle, since, skip) == [], f"secret left in {top}"
    # this test's files: the secrets file is the only one expected to hold the key
    assert files_containing(str(tmp_path), needle, skip={str(tmp_path / "secrets")}) == []


def run_build(tmp_path, store, secrets, mf):
    """Run a build; returns (CompletedProcess, result JSON or None)."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(mf))
    proc = subprocess.run(osbuild_cmd(store, secrets, path), cwd=REPO, capture_output=True,
                          text=True, timeout=900, check=False)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = None
    return proc, result


def test_scriptlet_cannot_read_secret(tmp_path, entitled):
    """A package scriptlet that mounts /proc and reads every open file of every process
    in the container finds no secret: the transaction runs after the stage dropped it."""
    repo, secrets, marker = entitled
    store = tmp_path / "store"
    since = time.time() - 1
    proc, result = run_build(tmp_path, store, secrets, manifest(repo))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tree = store / "refs" / result["tree_id"]
    assert (tree / "usr/share/osb-spy/spy.txt").read_text() == "spy\n"
    # the spy really looked: /proc was mounted and it read open files
    assert (tree / "var/spy/status").read_text() == "mounted\n"
    assert int((tree / "var/spy/scanned").read_text()) > 0
    assert not (tree / "var/spy/found").exists() or \
        (tree / "var/spy/found").read_text() == "", "the scriptlet found the secret"
    assert_nowhere(marker, store, tmp_path, since, proc.stdout, proc.stderr)
    assert leftovers(tmp_path) == {}


def test_stage_without_declaration_gets_no_secret(tmp_path, entitled):
    """A script stage (no STAGE_SECRETS) asks the sources API for the repository's
    secret in every way it can and copies what it gets into the tree: it gets a
    refusal, and the secret is neither in its log, the tree, the store nor the tar."""
    repo, secrets, marker = entitled
    store = tmp_path / "store"
    thief = {"name": "org.osbuild.script", "options": {
        "chroot": False, "script": f"python3 - {repo.checksum} <<'EOF'\n{THIEF}\nEOF\n"}}
    tar = {"name": "org.osbuild.tar", "options": {"filename": "tree.tar"}}
    since = time.time() - 1
    proc, result = run_build(tmp_path, store, secrets, manifest(repo, thief, assembler=tar))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = store / "refs" / result["output_id"] / "tree.tar"
    with tarfile.open(output) as tf:
        stolen = tf.extractfile("./stolen").read()
    assert marker.encode() not in stolen
    assert b"PRIVATE KEY" not in stolen
    assert_nowhere(marker, store, tmp_path, since, proc.stdout, proc.stderr)
    log = result["stages"][-1]["output"]
    assert "only programs that declare STAGE_SECRETS receive secrets" in log
    assert "raw request: {'error'" in log
    assert leftovers(tmp_path) == {}


def test_sigkill_while_dnf_holds_secret(tmp_path, entitled):
    """SIGKILL osbuild while dnf downloads with the client key: no file with the key is
    left under the store, /run/osbuild, /tmp or /var/tmp (it only ever was in memory)."""
    repo, secrets, marker = entitled
    store = tmp_path / "store"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest(repo)))
    repo.stall.clear()
    since = time.time() - 1
    # pylint: disable-next=consider-using-with
    proc = subprocess.Popen(osbuild_cmd(store, secrets, path), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert repo.package_requested.wait(300), "dnf never downloaded the package"
        # dnf is in the middle of a download it authenticated with the key
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert_nowhere(marker, store, tmp_path, since)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        repo.stall.set()
    assert leftovers(tmp_path) == {}


def test_only_dnf_and_yum_declare_secrets(tmp_path):
    """STAGE_SECRETS = True is declared by dnf and yum only; anything but a bool is an error."""
    from osbuild.meta import ProgramInfo, ValidationError  # pylint: disable=import-outside-toplevel
    declared = {name for kind in ("stages", "assemblers")
                for name in os.listdir(os.path.join(REPO, kind))
                if name.startswith("org.osbuild.") and ProgramInfo.load(REPO, kind, name).secrets}
    assert declared == {"org.osbuild.dnf", "org.osbuild.yum"}
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "org.osbuild.bad").write_text('STAGE_SECRETS = "yes"\n')
    with pytest.raises(ValidationError, match="STAGE_SECRETS must be True or False"):
        ProgramInfo.load(str(tmp_path), "stages", "org.osbuild.bad")


@pytest.mark.parametrize("allowed", [True, False])
def test_sources_api_hands_sealed_memfds_only_when_allowed(tmp_path, pki, allowed):
    """The sources API gives the named secret as sealed memfds to a declaring stage, and
    a refusal (without running anything that writes the secret) to any other."""
    # pylint: disable=import-outside-toplevel
    from osbuild import sources
    checksum = "sha256:" + "ab" * 32
    key = (pki / "client.key").read_text()
    secrets = {"cdn": {"ssl_client_key": key, "ssl_client_cert": str(pki / "client.crt")}}
    options = {DNF_SOURCE: {"repos": {checksum: {"baseurl": "https://cdn.example/repo",
                                                 "secrets": {"name": "cdn"}}}}}
    api_dir, out = tmp_path / "api", tmp_path / "out"
    api_dir.mkdir()
    server = sources.SourcesServer(REPO, options, tmp_path / "cache", out, secrets,
                                   stage_secrets=allowed)
    server.start(str(api_dir))
    try:
        if not allowed:
            with pytest.raises(RuntimeError, match="only programs that declare STAGE_SECRETS"):
                sources.get_secrets(DNF_SOURCE, [checksum], api_path=server.path,
                                    sources_dir=str(out))
        else:
            directory, fds = sources.get_secrets(DNF_SOURCE, [checksum], api_path=server.path,
                                                 sources_dir=str(out))
            try:
                assert set(fds[checksum]) == {"ssl_client_key", "ssl_client_cert"}
                fd = fds[checksum]["ssl_client_key"]
                with open(f"/proc/self/fd/{fd}", encoding="utf-8") as f:
                    assert f.read() == key
                with pytest.raises(PermissionError):
                    os.write(fd, b"x")     # sealed: the stage cannot change it
                assert os.listdir(directory) == [checksum]
            finally:
                for fd in set(fds[checksum].values()):
                    os.close(fd)
        # a plain request (no "secrets": true) gets the configuration alone
        assert sources.get(DNF_SOURCE, [checksum], api_path=server.path, sources_dir=str(out))
    finally:
        server.stop()
    assert files_containing(str(tmp_path), key.splitlines()[1].encode()) == []


# A script stage that leaves code in the build root's /etc for the programs of
# later stages: Python runs sitecustomize.py at start, so dnf would run it while
# it holds the secret, and it copies every memory file dnf has open into the tree.
TROJAN = r"""
import glob, os
for fd in glob.glob("/proc/self/fd/*"):
    try:
        if "memfd:" in os.readlink(fd):
            with open(fd, errors="replace") as src, \
                    open("/run/osbuild/tree/trojan-loot", "a") as dst:
                dst.write(src.read())
    except OSError:
        pass
"""


def test_earlier_stage_cannot_plant_code_for_dnf(tmp_path, entitled):
    """An earlier stage tries to leave a sitecustomize.py in the build root's /etc (now
    read-only) and a user site in /root (fresh per program): dnf, which holds the
    secret, must not run it (and a stage that receives secrets also gets a build
    root of its own)."""
    repo, secrets, marker = entitled
    store = tmp_path / "store"
    plant = {"name": "org.osbuild.script", "options": {
        "chroot": False, "script": textwrap.dedent(f"""\
        for d in /etc/python3*/ /root/.local/lib/python3.11/site-packages/; do
          mkdir -p "$d" || true
          cat > "$d/sitecustomize.py" <<'EOF' || echo "refused: $d"
        {textwrap.indent(TROJAN, "        ").strip()}
        EOF
          cp "$d/sitecustomize.py" "$d/usercustomize.py" 2>/dev/null || true
        done
        """)}}
    mf = manifest(repo)
    mf["pipeline"]["stages"].insert(1, plant)
    since = time.time() - 1
    proc, result = run_build(tmp_path, store, secrets, mf)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tree = store / "refs" / result["tree_id"]
    assert (tree / "usr/share/osb-spy/spy.txt").exists()
    loot = tree / "trojan-loot"
    assert not loot.exists() or marker not in loot.read_text(), "dnf ran the planted code"
    assert_nowhere(marker, store, tmp_path, since, proc.stdout, proc.stderr)
