#!/usr/bin/env python3
"""Benchmark: two build hosts sharing the Debian image through an S3 bucket.

Starts a one-node Ceph radosgw on 127.0.0.1 (test/s3server.py), then builds
samples/debian12-qcow2.json (or, once a package it pins is gone from the
archive, the manifest test/debian_samples.py resolves today)
  * on host A: empty store and source cache, --remote (builds and pushes),
  * on host B: another empty store, same --remote (pulls, runs no stage),
  * on host C: like B, but with the image size changed (an assembler option),
    so it pulls the finished tree and runs only the assembler,
and prints the times, the ratio B/A (goal: at most 0.2) and what the bucket
holds (bytes per kind of key).

Usage (root, from the checkout):
    python3 bench/remote.py [--workdir DIR] [--json FILE] [--keep]
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "samples", "debian12-qcow2.json")
sys.path.insert(0, os.path.join(REPO, "test"))

import debian_samples  # noqa: E402  pylint: disable=wrong-import-position,import-error
from s3server import S3Server, available  # noqa: E402  pylint: disable=wrong-import-position,import-error


def build(manifest, store, url, env, label):
    """Run osbuild --json --remote; returns (seconds, programs that ran, stderr)."""
    path = os.path.join(os.path.dirname(store), f"{label}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", store, "--json",
           "--remote", url, path]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"osbuild failed on host {label}:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    ran = []
    while result:
        ran += [s["name"] for s in result.get("stages", [])]
        if result.get("assembler"):
            ran.append(result["assembler"]["name"])
        result = result.get("build")
    return seconds, ran, proc.stderr


def bucket_bytes(client, bucket):
    """{kind: (count, bytes)} of the bucket's keys (refs, archives, sources)."""
    kinds = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            kind = item["Key"].split("/")[1]
            count, size = kinds.get(kind, (0, 0))
            kinds[kind] = (count + 1, size + item["Size"])
    return kinds


def report(numbers):
    """Print the numbers."""
    print(f"S3 server start:                 {numbers['s3_startup_s']:6.1f} s")
    print(f"host A, cold, pushes:            {numbers['host_a_cold_s']:6.1f} s "
          f"({numbers['host_a_ran']} programs ran)")
    for line in numbers["host_a_log"]:
        print(f"    A {line}")
    print(f"host B, from the remote:         {numbers['host_b_from_remote_s']:6.1f} s "
          f"(programs ran: {len(numbers['host_b_ran'])}) = "
          f"{numbers['ratio_b_over_a']:.3f} x A (goal <= 0.2)")
    for line in numbers["host_b_log"]:
        print(f"    B {line}")
    print(f"host C, tree from the remote:    {numbers['host_c_tree_from_remote_s']:6.1f} s "
          f"(ran: {', '.join(numbers['host_c_ran']) or 'nothing'})")
    total = sum(v["bytes"] for v in numbers["bucket"].values())
    print(f"bucket: {total / 1e6:.1f} MB in total")
    for kind, v in sorted(numbers["bucket"].items()):
        print(f"  {kind:10s} {v['keys']:5d} keys {v['bytes'] / 1e6:9.1f} MB")


def main():
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where stores and the S3 state go (default: /var/tmp)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    args = parser.parse_args()
    if not available():
        raise SystemExit("needs Debian packages ceph-mon ceph-osd radosgw (tools/install-deps)")
    manifest = debian_samples.load(os.path.basename(SAMPLE))
    work = tempfile.mkdtemp(prefix="osbuild-bench-remote-", dir=args.workdir or "/var/tmp")
    server = S3Server(os.path.join(work, "s3"))
    t0 = time.monotonic()
    server.start()
    startup = time.monotonic() - t0
    try:
        client = server.client()
        client.create_bucket(Bucket="osbuild-bench")
        url = "s3://osbuild-bench/debian"
        env = dict(os.environ, **server.env())
        numbers = {"s3_startup_s": round(startup, 2)}
        a, ran_a, err_a = build(manifest, os.path.join(work, "a"), url, env, "A")
        numbers["host_a_log"] = err_a.strip().splitlines()
        numbers["host_a_cold_s"] = round(a, 1)
        numbers["host_a_ran"] = len(ran_a)
        b, ran_b, err_b = build(manifest, os.path.join(work, "b"), url, env, "B")
        numbers["host_b_from_remote_s"] = round(b, 1)
        numbers["host_b_ran"] = ran_b
        numbers["ratio_b_over_a"] = round(b / a, 3)
        changed = copy.deepcopy(manifest)
        changed["pipeline"]["assembler"]["options"]["size"] = \
            changed["pipeline"]["assembler"]["options"].get("size", 0) + 1024 * 1024 * 1024
        c, ran_c, _ = build(changed, os.path.join(work, "c"), url, env, "C")
        numbers["host_c_tree_from_remote_s"] = round(c, 1)
        numbers["host_c_ran"] = ran_c
        numbers["bucket"] = {k: {"keys": n, "bytes": s}
                             for k, (n, s) in bucket_bytes(client, "osbuild-bench").items()}
        numbers["host_b_log"] = err_b.strip().splitlines()
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(numbers)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(numbers, f, indent=2)


if __name__ == "__main__":
    main()
