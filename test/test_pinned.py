"""osbuild.pinned and tools/build-image's choice: a gone package (404/410) vs. no network.

A local HTTP server answers 200, 404, 410 or 503 by path; a port nobody
listens on stands for "offline". Only 404 and 410 count as "gone"; refused
connections, timeouts and server errors are ArchiveUnreachable. build-image's
`choose` is run against a store laid out by hand: offline it builds whatever
the store holds completely (the pinned manifest or the last resolved one)
and otherwise fails with one line that names the network.
"""

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest

import debian_samples
from conftest import REPO, import_program
from osbuild import pinned

BUILD_IMAGE = import_program(os.path.join(REPO, "tools", "build-image"), "build_image_pinned")
SAMPLE = os.path.join(REPO, "samples", "debian13-qcow2.json")


class Handler(http.server.BaseHTTPRequestHandler):
    """HEAD/GET /STATUS/anything answers STATUS; /redirect/X redirects to /X."""

    protocol_version = "HTTP/1.1"

    def do_HEAD(self):  # noqa: N802  pylint: disable=invalid-name
        """Answer by the first path component."""
        first, _, rest = self.path.lstrip("/").partition("/")
        self.server.seen.append(self.path)
        if first == "redirect":
            self.send_response(302)
            self.send_header("Location", "/" + rest)
        else:
            self.send_response(int(first))
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *_):  # pylint: disable=arguments-differ
        pass


@pytest.fixture(name="server")
def server_fixture():
    """Base URL of the local server."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(name="refused")
def refused_fixture():
    """A base URL on a port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_404_and_410_are_gone(server):
    """Of many URLs on one kept-alive connection, exactly the 404/410 ones are gone."""
    base, httpd = server
    urls = [f"{base}/200/p{i}_1.0_amd64.deb" for i in range(20)]
    gone = [f"{base}/404/zstd_1.5_amd64.deb", f"{base}/410/old_2_all.deb"]
    assert pinned.gone_urls(urls + gone) == sorted(gone)
    assert len(httpd.seen) == 22
    assert pinned.package_name(gone[0]) == "zstd"


def test_redirect_is_followed(server):
    """A redirect to a 404 is gone, to a 200 is served."""
    base, _ = server
    assert pinned.gone_urls([f"{base}/redirect/404/a", f"{base}/redirect/200/b"]) == \
        [f"{base}/redirect/404/a"]


def test_refused_connection_is_not_gone(refused, server):
    """Offline (connection refused) raises ArchiveUnreachable, even next to 404s."""
    base, _ = server
    with pytest.raises(pinned.ArchiveUnreachable, match="127.0.0.1"):
        pinned.gone_urls([f"{refused}/pool/x_1_all.deb"])
    with pytest.raises(pinned.ArchiveUnreachable):
        pinned.gone_urls([f"{base}/404/a", f"{refused}/b"])


@pytest.mark.parametrize("status", [403, 500, 503])
def test_server_errors_are_not_gone(server, status):
    """An answer that is neither 2xx nor 404/410 is no evidence of removal."""
    base, _ = server
    with pytest.raises(pinned.ArchiveUnreachable, match=f"HTTP {status}"):
        pinned.gone_urls([f"{base}/200/a", f"{base}/{status}/b"])


def test_unresolvable_name_is_unreachable():
    """A name that does not resolve is a network problem."""
    with pytest.raises(pinned.ArchiveUnreachable):
        pinned.gone_urls(["http://archive.invalid/pool/a_1_all.deb"], timeout=5)


def load_sample():
    """The pinned Debian 13 sample as a dict."""
    with open(SAMPLE, encoding="utf-8") as f:
        return json.load(f)


def point_at(desc, base):
    """`desc` with every URL moved to `base` (keeping the file names)."""
    urls = desc["sources"]["org.osbuild.files"]["urls"]
    for checksum, url in urls.items():
        urls[checksum] = f"{base}/{url.rsplit('/', 1)[1]}"
    return desc


def write(path, desc):
    """Write `desc` as JSON to `path`; return the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(desc))
    return str(path)


def test_needed_downloads(tmp_path):
    """The cache, a committed package-stage tree or the output in the store satisfy downloads."""
    desc = load_sample()
    _, _, ids = BUILD_IMAGE.load(SAMPLE)
    store = tmp_path / "store"
    urls = pinned.source_urls(desc)
    assert pinned.needed_downloads(desc, str(store), ids) == urls
    cache = store / "sources" / "org.osbuild.files"
    cache.mkdir(parents=True)
    first = sorted(urls)[0]
    (cache / first).write_text("x")
    assert first not in pinned.needed_downloads(desc, str(store), ids)
    assert len(pinned.needed_downloads(desc, str(store), ids)) == len(urls) - 1
    (store / "refs").mkdir()
    os.symlink("../objects/x", store / "refs" / ids[0])     # the dpkg stage's checkpoint
    assert pinned.needed_downloads(desc, str(store), ids) == {}


def test_generator_args_and_configuration():
    """The samples' generator arguments; the configuration ignores only the package set."""
    desc = load_sample()
    assert pinned.generator_args(desc) == ["--suite", "trixie", "--boot", "hybrid"]
    other = json.loads(json.dumps(desc))
    other["pipeline"]["stages"][0]["options"]["packages"] = ["sha256:" + "1" * 64]
    other["sources"]["org.osbuild.files"]["urls"] = {"sha256:" + "1" * 64: "http://x/y_1_all.deb"}
    assert pinned.configuration(other) == pinned.configuration(desc)
    other["pipeline"]["source-epoch"] = 1700000000   # the generator derives it from the archive
    assert pinned.configuration(other) == pinned.configuration(desc)
    other["pipeline"]["stages"][1]["options"]["hostname"] = "changed"
    assert pinned.configuration(other) != pinned.configuration(desc)


@pytest.mark.parametrize("suites", [["--mirror=http://evil.example/"], ["-o/etc/passwd"],
                                    ["trixie-updates"], ["trixie/updates"], [7]])
def test_generator_args_take_only_plain_suites(suites):
    """A suite that could pass as an option (or is not a base suite) is never handed on."""
    desc = load_sample()
    desc["pipeline"]["stages"][0]["options"]["apt_sources"] = [{"uris": ["http://x"],
                                                                "suites": suites,
                                                                "components": ["main"]}]
    with pytest.raises(pinned.ResolveError, match="names no apt_sources suite"):
        pinned.generator_args(desc)


def test_choose_offline_uses_store(tmp_path, refused, capsys):
    """Offline: the pinned manifest if the store has it all, else the last resolved one."""
    store = tmp_path / "store"
    pinned_path = write(tmp_path / "in" / "debian13-qcow2.json",
                        point_at(load_sample(), refused + "/gone"))
    with pytest.raises(BUILD_IMAGE.Failure, match="cannot reach the archive .*network problem"):
        BUILD_IMAGE.choose(pinned_path, str(store))
    # the last resolved manifest (other packages), complete in the store: that one is built
    fresh = load_sample()
    stage = fresh["pipeline"]["stages"][0]["options"]
    stage["packages"] = stage["packages"][1:]
    kept = write(store / "resolved" / "debian13-qcow2.json", point_at(fresh, refused + "/new"))
    _, _, kept_ids = BUILD_IMAGE.load(kept)
    (store / "refs").mkdir(parents=True)
    os.symlink("../objects/x", store / "refs" / kept_ids[-1])
    assert BUILD_IMAGE.choose(pinned_path, str(store)) == kept
    assert "building the last resolved manifest" in capsys.readouterr().out
    # the pinned manifest's output in the store wins, without asking the network
    _, _, ids = BUILD_IMAGE.load(pinned_path)
    os.symlink("../objects/x", store / "refs" / ids[-1])
    assert BUILD_IMAGE.choose(pinned_path, str(store)) == pinned_path


def test_choose_served_keeps_pinned(tmp_path, server):
    """While the archive serves every pinned package, the pinned manifest is built."""
    base, httpd = server
    path = write(tmp_path / "debian13-qcow2.json", point_at(load_sample(), base + "/200"))
    assert BUILD_IMAGE.choose(path, str(tmp_path / "store")) == path
    assert len(httpd.seen) == len(pinned.source_urls(load_sample()))


def test_choose_gone_without_recipe_is_one_line(tmp_path, server):
    """Gone, but the manifest is not the generator's: a clear error, no fresh manifest kept."""
    base, _ = server
    desc = point_at(load_sample(), base + "/404")
    desc["pipeline"]["stages"][0]["options"].pop("apt_sources")
    path = write(tmp_path / "mine.json", desc)
    with pytest.raises(BUILD_IMAGE.Failure, match="cannot resolve .*names no apt_sources suite"):
        BUILD_IMAGE.choose(path, str(tmp_path / "store"))
    assert not (tmp_path / "store" / "resolved" / "mine.json").exists()


def has_apt_pkg():
    """Debian's python3 with python3-apt (what the generator needs)."""
    if not os.path.exists("/usr/bin/python3"):
        return False
    return subprocess.run(["/usr/bin/python3", "-c", "import apt_pkg"], capture_output=True,
                          check=False).returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(not has_apt_pkg(), reason="needs /usr/bin/python3 with python3-apt")
@pytest.mark.parametrize("name", ["debian13-qcow2.json", "debian12-qcow2.json"])
def test_debian_samples_resolve_when_gone(tmp_path, name):
    """The tests' helper: a sample whose zstd is gone gives today's manifest, same configuration.

    Also proves that the generator's arguments read off each sample reproduce
    its configuration, so the fallback works on the day the sample goes stale.
    """
    with open(os.path.join(REPO, "samples", name), encoding="utf-8") as f:
        text = f.read()
    desc = json.loads(text)
    urls = desc["sources"]["org.osbuild.files"]["urls"]
    zstd = next(c for c, u in urls.items() if "/zstd_" in u)
    urls[zstd] = re.sub(r"/zstd_[^_/]*_", "/zstd_99.0-osbuild-gone_", urls[zstd])
    write(tmp_path / "samples" / name, desc)
    samples = str(tmp_path / "samples")
    path = debian_samples.manifest_path(name, str(tmp_path / "resolved"), samples)
    assert path == str(tmp_path / "resolved" / name)
    with open(path, encoding="utf-8") as f:
        fresh = json.load(f)
    assert pinned.configuration(fresh) == pinned.configuration(desc)
    assert not [u for u in pinned.source_urls(fresh).values() if "osbuild-gone" in u]
    # the unchanged sample is served as is: the pinned file itself
    write(tmp_path / "ok" / name, json.loads(text))
    assert debian_samples.manifest_path(name, str(tmp_path / "r2"),
                                        str(tmp_path / "ok")) == \
        str(tmp_path / "ok" / name)
    assert not (tmp_path / "r2").exists()


class DroppingHandler(Handler):
    """HEAD answers 200 until `server.heads` were answered; then every request is dropped."""

    def do_HEAD(self):  # noqa: N802  pylint: disable=invalid-name
        """200, or a closed connection once the archive "went away"."""
        self.server.seen.append((self.command, self.path))
        if self.command == "HEAD" and len(self.server.seen) <= self.server.heads:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.close_connection = True    # no answer at all: like a network that went down

    do_GET = do_HEAD


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_build_image_download_failure_is_the_network(tmp_path):
    """The archive goes away between build-image's check and the download: said so, not a bug."""
    desc = load_sample()
    desc["pipeline"]["stages"] = desc["pipeline"]["stages"][:1]
    desc["pipeline"]["assembler"] = None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DroppingHandler)
    httpd.seen, httpd.heads = [], len(pinned.source_urls(desc))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        path = write(tmp_path / "debian13-qcow2.json",
                     point_at(desc, f"http://127.0.0.1:{httpd.server_address[1]}/pool"))
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "build-image"), path,
                               "--store", str(tmp_path / "store"),
                               "--output-directory", str(tmp_path / "out")],
                              capture_output=True, text=True, check=False, timeout=600)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any(c == "GET" for c, _ in httpd.seen), "the build never tried to download"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("build-image: downloading the packages failed: cannot reach the "
                           "archive") and "network problem" in last, proc.stderr[-3000:]
    assert "no longer in the archive" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.listdir(tmp_path / "store" / "refs")
    assert not (tmp_path / "out" / "manifest.json").exists()
