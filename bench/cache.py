#!/usr/bin/env python3
"""Benchmark: store size over Debian rebuilds, with and without --cache-max-size.

Builds samples/debian12-qcow2.json once (checkpointing the dpkg stage, so a
rebuild starts from the installed tree), copies that store, then rebuilds N
times (default 10) in both stores, each time with another hostname (the
stage right after dpkg): one store without a limit, one with
`--cache-max-size LIMIT`. Prints, after each rebuild, both stores' sizes
(osbuild's measure: objects + index + source caches, allocated blocks) and
`du -s` of the whole store, the build times, and finally how long shrinking
a store of thousands of small objects takes.

Usage (root, from the checkout):
    python3 bench/cache.py [--manifest FILE] [--rebuilds N] [--limit SIZE] [--workdir DIR]
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
sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position
from osbuild import cache  # noqa: E402
from osbuild.manifest import load  # noqa: E402
from osbuild.objectstore import ObjectStore  # noqa: E402


def osbuild(store, manifest, *extra):
    """Run one build; returns seconds."""
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", store,
                          "--json", *extra, manifest], cwd=REPO, capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        sys.exit(f"build failed in {store}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    if res.stderr.strip():
        print("   ", res.stderr.strip().splitlines()[-1][:150])
    return time.monotonic() - start


def measured(store):
    """(osbuild's measure, du -s) of a store in bytes."""
    report = cache.shrink(ObjectStore(store), None)
    du = subprocess.run(["du", "-s", "-B1", store], capture_output=True, text=True, check=True)
    return report.size, int(du.stdout.split()[0])


def gib(size):
    """Bytes as GiB text."""
    return f"{size / 1024 ** 3:6.2f}"


def bench_shrink(workdir, count=3000):
    """Seconds to shrink a store of `count` small objects to half (sizes cached / not)."""
    store = ObjectStore(os.path.join(workdir, "many"))
    for i in range(count):
        with store.new(f"{i:064x}") as obj:
            tree = obj.write()
            with open(os.path.join(tree, "f"), "w", encoding="utf-8") as f:
                f.write(str(i) * 100)
    total = cache.shrink(store, None).size
    start = time.monotonic()
    report = cache.shrink(store, total // 2)
    first = time.monotonic() - start
    start = time.monotonic()
    cache.shrink(store, total // 4)
    second = time.monotonic() - start
    return count, report.objects, first, second


def main():
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=os.path.join(REPO, "samples", "debian12-qcow2.json"))
    parser.add_argument("--rebuilds", type=int, default=10)
    parser.add_argument("--limit", default="4GiB")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-cache-", dir=args.workdir or "/var/tmp")
    try:
        with open(args.manifest, encoding="utf-8") as f:
            desc = json.load(f)
        dpkg = load(desc).pipeline.stages[0]
        unlimited, limited = os.path.join(workdir, "unlimited"), os.path.join(workdir, "limited")
        first = os.path.join(workdir, "m0.json")
        shutil.copyfile(args.manifest, first)
        took = osbuild(unlimited, first, "--checkpoint", dpkg.id)
        subprocess.run(["cp", "-a", "--reflink=auto", unlimited, limited], check=True)
        size = measured(unlimited)
        print(f"first build: {took:.0f} s, store {gib(size[0])} GiB (du {gib(size[1])} GiB); "
              f"limit {args.limit}")
        print(f"{'rebuild':>7} | {'no limit GiB':>12} {'du':>6} {'s':>4} | "
              f"{'limit GiB':>9} {'du':>6} {'s':>4}")
        for i in range(1, args.rebuilds + 1):
            changed = copy.deepcopy(desc)
            changed["pipeline"]["stages"][1]["options"]["hostname"] = f"bench-{i}"
            path = os.path.join(workdir, f"m{i}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(changed, f)
            t_free = osbuild(unlimited, path, "--checkpoint", dpkg.id)
            t_limited = osbuild(limited, path, "--checkpoint", dpkg.id, "--cache-max-size",
                                args.limit)
            free, limit = measured(unlimited), measured(limited)
            print(f"{i:>7} | {gib(free[0]):>12} {gib(free[1])} {t_free:4.0f} | "
                  f"{gib(limit[0]):>9} {gib(limit[1])} {t_limited:4.0f}", flush=True)
        count, evicted, cold, warm = bench_shrink(workdir)
        print(f"shrink a store of {count} objects to half: {cold:.2f} s measuring sizes "
              f"({evicted} evicted), {warm:.2f} s with sizes cached")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
