#!/usr/bin/python3
"""Benchmark the org.osbuild.files source: sequential vs. parallel downloads.

Serves N random files from a local HTTP server on 127.0.0.1 (optionally
adding a per-request latency to imitate a remote mirror) and times:

  * one curl process per file, one after another (the naive way),
  * the files source with one curl and --parallel-max 1 (sequential transfers),
  * the files source with one curl and --parallel-max P,
  * the files source again with a warm cache (no download at all).

Usage: python3 bench/sources.py [--count N] [--size BYTES] [--latency SEC] [--parallel P]
"""

import argparse
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = os.path.join(REPO, "sources", "org.osbuild.files")


def serve(files, latency):
    """Start an HTTP server for `files` {path: bytes}; return (server, base URL)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        """Serve the files, after `latency` seconds."""

        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # pylint: disable=arguments-differ
            pass

        def do_GET(self):  # pylint: disable=invalid-name
            """Answer one GET."""
            if latency:
                time.sleep(latency)
            data = files.get(self.path)
            self.send_response(200 if data is not None else 404)
            data = data if data is not None else b""
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def run_source(urls, cache, output, parallel):
    """Run the files source for all `urls`; return seconds taken."""
    request = {"options": {"urls": urls}, "checksums": list(urls), "cache": cache,
               "output": output, "secrets": None}
    env = dict(os.environ, OSBUILD_SOURCES_MAX_PARALLEL=str(parallel))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, FILES], input=json.dumps(request), text=True,
                          capture_output=True, env=env, check=False)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"files source failed: {proc.stdout.strip()} {proc.stderr.strip()}")
    return elapsed


def naive(urls, directory):
    """One curl process per file, sequentially; return seconds taken."""
    start = time.monotonic()
    for checksum, url in urls.items():
        subprocess.run(["curl", "--silent", "--fail", "--output",
                        os.path.join(directory, checksum), url], check=True)
    return time.monotonic() - start


def main():
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=200, help="number of files (200)")
    parser.add_argument("--size", type=int, default=64 * 1024, help="bytes per file (65536)")
    parser.add_argument("--latency", type=float, default=0.05,
                        help="seconds the server waits before each answer (0.05)")
    parser.add_argument("--parallel", type=int, default=8, help="parallel transfers (8)")
    args = parser.parse_args()

    files, urls = {}, {}
    httpd, base = serve(files, args.latency)
    for i in range(args.count):
        data = os.urandom(args.size)
        files[f"/f{i}"] = data
        urls["sha256:" + hashlib.sha256(data).hexdigest()] = f"{base}/f{i}"

    work = tempfile.mkdtemp(prefix="osbuild-bench-sources-")
    try:
        rows = []
        os.mkdir(os.path.join(work, "naive"))
        rows.append(("one curl per file, sequential", naive(urls, os.path.join(work, "naive"))))
        for label, parallel in (("files source, --parallel-max 1", 1),
                                (f"files source, --parallel-max {args.parallel}", args.parallel)):
            cache = os.path.join(work, f"cache-{parallel}")
            rows.append((label, run_source(urls, cache, os.path.join(work, f"out-{parallel}"),
                                           parallel)))
        cache = os.path.join(work, f"cache-{args.parallel}")
        rows.append(("files source, warm cache", run_source(urls, cache,
                                                            os.path.join(work, "out-warm"),
                                                            args.parallel)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        httpd.shutdown()

    total = args.count * args.size / (1 << 20)
    print(f"{args.count} files x {args.size} bytes ({total:.1f} MiB), "
          f"server latency {args.latency * 1000:.0f} ms per request")
    for label, seconds in rows:
        print(f"  {label:<36} {seconds:7.2f} s  {args.count / seconds:8.1f} files/s")
    base_time = rows[0][1]
    print(f"  speed-up of parallel over naive sequential: {base_time / rows[2][1]:.1f}x")


if __name__ == "__main__":
    main()
