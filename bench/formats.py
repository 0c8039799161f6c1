#!/usr/bin/env python3
"""Format benchmark: loading, inspecting and attaching --build-env to big manifests.

Ids are computed on demand (one pass per pipeline), so these stay linear in
the number of stages. Usage: bench/formats.py [--stages N]
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from osbuild.formats import v1  # pylint: disable=wrong-import-position


def timed(what, func):
    """Run `func`, print how long it took; returns its value."""
    start = time.monotonic()
    value = func()
    print(f"{what}: {time.monotonic() - start:.3f} s")
    return value


def main():
    """Print the timings."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=2000)
    n = parser.parse_args().stages
    stages = [{"name": "org.osbuild.hostname", "options": {"hostname": f"h{i}"}}
              for i in range(n)]
    desc = {"pipeline": {"stages": stages, "assembler": {"name": "org.osbuild.noop"}}}
    manifest = timed(f"load {n} stages", lambda: v1.load(desc, REPO))
    shown = timed("inspect", lambda: v1.inspect(manifest.pipeline, {}))
    timed("load the inspected form (ids checked)", lambda: v1.load(shown, REPO))
    env = {"runner": "org.osbuild.debian12", "pipeline": {"stages": stages[:10]}}
    timed("attach --build-env", lambda: v1.attach_build_env(env, manifest.pipeline, "env",
                                                           REPO))
    timed("all ids after --build-env", manifest.pipeline.all_stage_ids)


if __name__ == "__main__":
    main()
