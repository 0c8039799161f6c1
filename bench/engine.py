#!/usr/bin/env python3
"""Engine benchmark: cold and warm build of a sample, and the fixed cost of one stage.

Usage: bench/engine.py [--stages N]   (as root, from the checkout)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def osbuild(manifest, store):
    """Run osbuild with --json; returns (seconds, result)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", store,
                           "--json", manifest], cwd=REPO, capture_output=True, text=True,
                          check=False)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"osbuild failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed, json.loads(proc.stdout)


def main():
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", type=int, default=10, help="noop stages for the overhead run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="osbuild-bench-") as tmp:
        sample = os.path.join(REPO, "samples", "script-tar.json")
        cold, res = osbuild(sample, os.path.join(tmp, "store"))
        warm, res2 = osbuild(sample, os.path.join(tmp, "store"))
        assert res2["stages"] == [] and "assembler" not in res2
        print(f"samples/script-tar.json: cold {cold:.2f} s ({len(res['stages'])} stages + "
              f"assembler), warm {warm:.2f} s (nothing run)")
        empty = os.path.join(tmp, "empty.json")
        with open(empty, "w", encoding="utf-8") as f:
            json.dump({"stages": [{"name": "org.osbuild.noop", "options": {"i": 0}}]}, f)
        one, _ = osbuild(empty, os.path.join(tmp, "store1"))
        many = os.path.join(tmp, "many.json")
        with open(many, "w", encoding="utf-8") as f:
            json.dump({"stages": [{"name": "org.osbuild.noop", "options": {"i": i}}
                                  for i in range(args.stages + 1)]}, f)
        total, _ = osbuild(many, os.path.join(tmp, "store2"))
        per_stage = (total - one) / args.stages
        print(f"fixed cost of one stage (container start + API + runner): {per_stage:.3f} s "
              f"(1 stage {one:.2f} s, {args.stages + 1} stages {total:.2f} s)")


if __name__ == "__main__":
    main()
