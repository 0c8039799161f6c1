"""Pinned manifests against an archive that moves on.

A manifest pins every package by checksum and URL. The archive replaces
versions (Debian: security updates, point releases) and then serves 404 for the
old ones. This module answers, before a build, which downloads a manifest
still needs given a store (`needed_downloads`), whether the archive still
serves them (`gone_urls`: "gone" is HTTP 404/410 only; a refused connection, a
timeout or a 5xx raises `ArchiveUnreachable`, never counts as gone), and
resolves a fresh manifest with tools/osbuild-debian-manifest when a pinned one
went stale (`resolve_fresh`), checked to differ from the pinned one only in
its package set.
"""

import copy
import http.client
import json
import os
import queue
import re
import subprocess
import tempfile
import threading
import urllib.parse

GONE_STATUS = (404, 410)
FILES_SOURCE = "org.osbuild.files"
PACKAGE_STAGE = "org.osbuild.dpkg"
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
# keys a generator derives from the package set (e.g. a timestamp from the newest package)
DERIVED_KEYS = ("packages", "source-epoch", "source_epoch")


class ArchiveUnreachable(Exception):
    """The archive could not be asked (no network, refused, timeout, server error)."""


class ResolveError(Exception):
    """A fresh manifest could not be resolved."""


def source_urls(manifest):
    """{checksum: url} of the manifest's org.osbuild.files source."""
    urls = ((manifest.get("sources") or {}).get(FILES_SOURCE) or {}).get("urls") or {}
    return {c: (u if isinstance(u, str) else u.get("url")) for c, u in urls.items()}


def needed_downloads(manifest, store, stage_ids=None):
    """{checksum: url} a build of `manifest` into `store` would still download.

    Nothing when the assembler's output, or the tree of any stage at or after
    the last one naming a checksum, is in `store` (the build starts there);
    otherwise the checksums missing from the files source's cache. `stage_ids`
    is the list of stage ids followed by the assembler's id (from
    osbuild.manifest); without it only the cache is looked at.
    """
    urls = source_urls(manifest)
    if not urls or store is None:
        return dict(urls)
    stages = (manifest.get("pipeline") or {}).get("stages") or []
    if stage_ids:
        last = max((i for i, s in enumerate(stages)
                    if any(c in json.dumps(s.get("options") or {}) for c in urls)), default=0)
        for ident in stage_ids[last:]:
            if ident and os.path.lexists(os.path.join(store, "refs", ident)):
                return {}
    cache = os.path.join(store, "sources", FILES_SOURCE)
    return {c: u for c, u in urls.items() if not os.path.isfile(os.path.join(cache, c))}


def probe(conn, url, timeout, redirects=5):
    """(status, connection to reuse) of a HEAD request for `url`; follows redirects."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ArchiveUnreachable(f"{url}: not an http(s) URL")
    key = (parts.scheme, parts.netloc)
    if conn is None or conn[0] != key:
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = (key, cls(parts.netloc, timeout=timeout))
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    for attempt in (0, 1):
        try:
            conn[1].request("HEAD", path, headers={"User-Agent": "osbuild"})
            resp = conn[1].getresponse()
            resp.read()
            break
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
            conn[1].close()    # a kept-alive connection the server closed: once more
            if attempt:
                raise ArchiveUnreachable(f"{parts.netloc}: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            conn[1].close()
            raise ArchiveUnreachable(f"{parts.netloc}: {e or type(e).__name__}") from None
    if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
        conn[1].close()
        if not redirects:
            raise ArchiveUnreachable(f"{url}: too many redirects")
        return probe(None, urllib.parse.urljoin(url, resp.getheader("Location")), timeout,
                     redirects - 1)
    if resp.will_close:
        conn[1].close()
        conn = None
    return resp.status, conn


def url_status(urls, timeout=20, parallel=4):
    """{url: HTTP status} for `urls` (HEAD, kept-alive connections, `parallel` at a time).

    Raises ArchiveUnreachable when any of them cannot be asked at all.
    """
    todo = queue.Queue()
    for url in sorted(set(urls)):
        todo.put(url)
    status, errors = {}, []

    def worker():
        conn = None
        while not errors:
            try:
                url = todo.get_nowait()
            except queue.Empty:
                break
            try:
                status[url], conn = probe(conn, url, timeout)
            except ArchiveUnreachable as e:
                errors.append(str(e))
        if conn is not None:
            conn[1].close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise ArchiveUnreachable(errors[0])
    return status


def gone_urls(urls, timeout=20):
    """The sorted subset of `urls` the archive no longer serves (HTTP 404 or 410).

    Raises ArchiveUnreachable for network failures and for answers that say
    neither "here" (2xx) nor "gone" (e.g. 403, 5xx): those are not evidence
    that a package was removed.
    """
    status = url_status(urls, timeout)
    odd = sorted((u, s) for u, s in status.items() if s not in GONE_STATUS and not 200 <= s < 300)
    if odd:
        raise ArchiveUnreachable(f"{odd[0][0]}: HTTP {odd[0][1]}")
    return sorted(u for u, s in status.items() if s in GONE_STATUS)


def package_name(url):
    """`linux-image-amd64` for `.../linux-image-amd64_6.1.1_amd64.deb`."""
    return urllib.parse.unquote(url.rsplit("/", 1)[-1]).split("_", 1)[0]


def generator_args(manifest):
    """tools/osbuild-debian-manifest arguments that should reproduce `manifest`'s configuration."""
    stages = (manifest.get("pipeline") or {}).get("stages") or []
    dpkg = next((s for s in stages if s.get("name") == PACKAGE_STAGE), None)
    if dpkg is None:
        raise ResolveError(f"it has no {PACKAGE_STAGE} stage to resolve again")
    suites = [s for entry in (dpkg.get("options") or {}).get("apt_sources") or []
              for s in entry.get("suites") or []
              if isinstance(s, str) and re.fullmatch(r"[a-z0-9][a-z0-9.]*", s)]
    if not suites:
        raise ResolveError(f"its {PACKAGE_STAGE} stage names no apt_sources suite")
    args = ["--suite", suites[0]]
    arches = {urllib.parse.unquote(url).rsplit("_", 1)[-1].removesuffix(".deb")
              for url in source_urls(manifest).values()} - {"all"}
    if len(arches) == 1 and arches != {"amd64"}:
        args += ["--arch", arches.pop()]
    asm = ((manifest.get("pipeline") or {}).get("assembler") or {}).get("options") or {}
    if asm.get("pttype") == "mbr":
        args += ["--boot", "bios"]
    elif any(p.get("type", "").upper() == BIOS_BOOT_GUID for p in asm.get("partitions") or []):
        args += ["--boot", "hybrid"]
    elif asm.get("partitions"):
        args += ["--boot", "uefi"]
    return args


def configuration(manifest):
    """`manifest` without what depends on the package set: the part a fresh one must keep."""
    out = copy.deepcopy(manifest)
    for key in DERIVED_KEYS:
        out.pop(key, None)
        (out.get("pipeline") or {}).pop(key, None)
    for stage in (out.get("pipeline") or {}).get("stages") or []:
        if stage.get("name") == PACKAGE_STAGE:
            for key in DERIVED_KEYS:
                (stage.get("options") or {}).pop(key, None)
    (out.get("sources") or {}).pop(FILES_SOURCE, None)
    return out


def resolve_fresh(manifest, generator, output, apt_lists=None, python="/usr/bin/python3"):
    """Resolve `manifest`'s image against today's archive with `generator`; write it to `output`.

    The fresh manifest must equal `manifest` in everything but the package
    set (else ResolveError: the pinned one was not written by the generator
    with options it can guess). Written atomically; returns the fresh manifest.
    """
    cmd = [python, generator] + generator_args(manifest)
    if apt_lists:
        os.makedirs(apt_lists, exist_ok=True)
        cmd += ["--apt-lists", apt_lists]
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".resolve-", suffix=".json", dir=directory)
    os.close(fd)
    try:
        proc = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            raise ResolveError(lines[-1])
        with open(tmp, encoding="utf-8") as f:
            fresh = json.load(f)
        if configuration(fresh) != configuration(manifest):
            raise ResolveError(f"'{' '.join(cmd[1:])}' writes a configuration that differs from "
                               "the pinned manifest's beyond its packages")
        os.chmod(tmp, 0o644)
        os.rename(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return fresh
