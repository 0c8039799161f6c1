#!/usr/bin/env python3
"""Engine benchmark: cold and warm build of a sample, and the fixed cost of one stage.

The warm rebuild (nothing changed) is compared with starting the same
Python and parsing the manifest (`python3 -c` + json.load): the goal is at
most 1.3 times that. The first rebuild runs the engine and records what a
rebuild with nothing to build depends on (osbuild/rerun.py); the next ones
replay it. The osbuild package's bytecode is compiled first, as an
installed package has it (PYTHONDONTWRITEBYTECODE=1 would otherwise make
every run compile every module). Timed figures are the best of --repeat runs.

Usage: bench/engine.py [--stages N] [--repeat N]   (as root, from the checkout)
"""

import argparse
import compileall
import json
import os
import resource
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


def cpu_seconds(fn):
    """User + system CPU seconds of the child processes `fn` runs (robust to other load)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    fn()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def best(repeat, fn):
    """The fastest of `repeat` calls of `fn` (which returns seconds)."""
    return min(fn() for _ in range(repeat))


def python_and_parse(manifest):
    """Seconds to start this Python and parse `manifest` as JSON."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import json, sys\n"
                    "with open(sys.argv[1], encoding='utf-8') as f: json.load(f)", manifest],
                   check=True)
    return time.monotonic() - start


def main():
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", type=int, default=20, help="noop stages for the overhead run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timed figure (best)")
    args = parser.parse_args()
    compileall.compile_dir(os.path.join(REPO, "osbuild"), quiet=1)
    print(f"python: {sys.executable} {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="osbuild-bench-") as tmp:
        sample = os.path.join(REPO, "samples", "script-tar.json")
        cold, res = osbuild(sample, os.path.join(tmp, "store"))
        first, res2 = osbuild(sample, os.path.join(tmp, "store"))
        assert res2["stages"] == [] and "assembler" not in res2
        warm = best(args.repeat, lambda: osbuild(sample, os.path.join(tmp, "store"))[0])
        base = best(args.repeat, lambda: python_and_parse(sample))
        print(f"samples/script-tar.json: cold {cold:.2f} s ({len(res['stages'])} stages + "
              f"assembler), first rebuild {first:.3f} s (engine, nothing run), "
              f"warm {warm:.3f} s (replayed)")
        print(f"python3 start-up + JSON parse of the manifest: {base:.3f} s; warm rebuild / that: "
              f"{warm / base:.2f} (goal <= 1.3)")
        warm_cpu = best(args.repeat, lambda: cpu_seconds(
            lambda: osbuild(sample, os.path.join(tmp, "store"))))
        base_cpu = best(args.repeat, lambda: cpu_seconds(lambda: python_and_parse(sample)))
        print(f"  the same in CPU time (user + system): warm {warm_cpu:.3f} s, python3 + parse "
              f"{base_cpu:.3f} s, ratio {warm_cpu / base_cpu:.2f}")
        empty = os.path.join(tmp, "empty.json")
        with open(empty, "w", encoding="utf-8") as f:
            json.dump({"stages": [{"name": "org.osbuild.noop", "options": {"i": 0}}]}, f)
        one = best(args.repeat,
                   lambda: osbuild(empty, os.path.join(tmp, f"store1-{time.monotonic()}"))[0])
        many = os.path.join(tmp, "many.json")
        with open(many, "w", encoding="utf-8") as f:
            json.dump({"stages": [{"name": "org.osbuild.noop", "options": {"i": i}}
                                  for i in range(args.stages + 1)]}, f)
        total = best(args.repeat,
                     lambda: osbuild(many, os.path.join(tmp, f"store2-{time.monotonic()}"))[0])
        per_stage = (total - one) / args.stages
        print(f"fixed cost of one stage (container start + API + runner): {per_stage:.3f} s "
              f"(goal <= 0.1; 1 stage {one:.2f} s, {args.stages + 1} stages {total:.2f} s)")


if __name__ == "__main__":
    main()
