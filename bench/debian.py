#!/usr/bin/env python3
"""Benchmark: build the Debian 13 and Debian 12 samples; compare with the reference recipe.

Prints, for samples/debian13-qcow2.json and samples/debian12-qcow2.json (or
the --manifest files), from one run each (a sample whose pinned packages the
archive no longer serves is replaced by one resolved today, see
test/debian_samples.py):
  * cold build (empty store, so an empty source cache too),
  * warm rebuild (nothing changed: everything comes from the store),
  * rebuild after changing only the last configuration stage (grub2),
  * the time of each phase of the cold build (sources, package install and its
    sub-steps, each configuration stage, the assembler), from timestamps of
    osbuild's streamed log,
  * peak memory (largest process RSS, and the host's used-memory growth),
  * for Debian 12 only, the reference recipe
    (../shared/reference/debian12-bootable-recipe.sh, a bookworm recipe) on
    the same initramfs setting: fetch + install + image, its floor.
and finally a table of cold / warm / last-stage figures side by side.
Every timed run (and each timed step of the recipe) starts after a sync(2),
so none pays for writing back the data of the run before it.

`--arch arm64` measures samples/debian13-arm64-qcow2.json instead, built on
this host with its dpkg stage under qemu's user-mode emulation: the cold build
with its phases and the warm rebuild (the checkpoint rebuild, a second cold
build, is left out there: it would double a long run).

Usage (root, from the checkout):
    python3 bench/debian.py [--manifest FILE]... [--arch arm64] [--repeat N] [--skip-recipe]
                            [--json FILE]
"""

import argparse
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = ["debian13-qcow2.json", "debian12-qcow2.json"]
sys.path.insert(0, os.path.join(REPO, "test"))

import debian_samples  # noqa: E402  pylint: disable=wrong-import-position,import-error
ARCH_SAMPLES = {"arm64": ["debian13-arm64-qcow2.json"]}
RECIPE = os.path.join(os.path.dirname(REPO), "shared", "reference", "debian12-bootable-recipe.sh")
# the human log's stage header: "[3/9] org.osbuild.locale: ID (24.7 s elapsed)"
HEADER = re.compile(r"^(?:\[\d+/\d+\] )?(org\.osbuild\.[A-Za-z0-9._-]+): ([0-9a-f]{64})"
                    r"(?: \{| \()")
DPKG_STEP = re.compile(r"^org\.osbuild\.dpkg: (sources ready|\d+ base packages extracted|"
                       r"base installed|packages configured|done)")

STEP_NAMES = {"sources ready": "sources (.debs by checksum)",
              "base packages extracted": "check + extract base",
              "base installed": "dpkg --install base",
              "packages configured": "unpack + configure rest",
              "done": "initramfs + dpkg --audit"}


class MemoryWatch:
    """Samples the host's used memory (MemTotal - MemAvailable); reports the growth."""

    def __init__(self, interval=0.2):
        self.interval = interval
        self.base = self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used():
        """Used memory in bytes right now."""
        info = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"] - info["MemAvailable"]

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.used())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth(self):
        """Peak used memory above the starting point, bytes."""
        return self.peak - self.base


def stage_ids(manifest):
    """The ids of the pipeline's stages (DESIGN 1.3; no build pipeline)."""
    ids, base = [], None
    for stage in manifest["pipeline"]["stages"]:
        digest = hashlib.sha256()
        for part in (stage["name"], None, base, stage.get("options") or {}):
            digest.update(json.dumps(part, sort_keys=True).encode())
        base = digest.hexdigest()
        ids.append(base)
    return ids


def settle():
    """Write back what earlier runs left dirty, so no timed run pays for another's data."""
    os.sync()


def run_osbuild(manifest, store, workdir, label, extra=()):
    """Run osbuild (human log), timestamping each line. Returns a result dict."""
    # repeated runs (label + digits) share the manifest's path, as a user's rebuild does
    path = os.path.join(workdir, f"manifest-{label.rstrip('0123456789')}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    rusage = os.path.join(workdir, f"time-{label}.txt")
    settle()
    cmd = ["/usr/bin/time", "-f", "%M", "-o", rusage,
           sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", store, *extra, path]
    lines = []
    with MemoryWatch() as mem, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True,
                                                errors="replace") as proc:
        start = time.monotonic()
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
        proc.wait()
        total = time.monotonic() - start
    with open(os.path.join(workdir, f"log-{label}.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"[{t:8.2f}] {line}\n" for t, line in lines)
    try:
        with open(rusage, encoding="ascii") as f:
            maxrss = int(f.read().split()[-1]) * 1024
    except (OSError, ValueError, IndexError):
        maxrss = None
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"osbuild failed ({label}, exit {proc.returncode}):\n{tail}")
    return {"total": total, "lines": lines, "maxrss": maxrss, "mem_growth": mem.growth}


def phases(result):
    """[(name, seconds)] per stage/assembler from the header timestamps, plus dpkg sub-steps."""
    marks = [(t, m.group(1)) for t, line in result["lines"] if (m := HEADER.match(line))]
    out = []
    for i, (t, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else result["total"]
        out.append((name, end - t))
    subs = []
    dpkg_start = next((t for t, name in marks if name == "org.osbuild.dpkg"), None)
    if dpkg_start is not None:
        prev = dpkg_start
        for t, line in result["lines"]:
            m = DPKG_STEP.match(line)
            if m and t >= dpkg_start:
                step = STEP_NAMES.get(re.sub(r"^\d+ ", "", m.group(1)), m.group(1))
                subs.append((f"  {step}", t - prev))
                prev = t
    return out, subs


def run_recipe(workdir, fast_initrd):
    """Run the reference recipe (depsolve, then timed fetch + install + image)."""
    if not os.path.exists(RECIPE):
        return None
    env = dict(os.environ, W=os.path.join(workdir, "recipe-w"),
               CACHE=os.path.join(workdir, "recipe-cache"),
               FAST_INITRD="1" if fast_initrd else "0")
    times = {}
    with open(os.path.join(workdir, f"recipe-{int(fast_initrd)}.log"), "w",
              encoding="utf-8") as log:
        for step in ("depsolve", "fetch", "install", "image"):
            settle()
            start = time.monotonic()
            proc = subprocess.run(["bash", RECIPE, step], env=env, stdout=log, stderr=log,
                                  check=False)
            times[step] = time.monotonic() - start
            if proc.returncode != 0:
                print(f"recipe step {step} failed (exit {proc.returncode}); see {log.name}",
                      file=sys.stderr)
                return None
    times["floor"] = times["fetch"] + times["install"] + times["image"]
    subprocess.run(["rm", "-rf", env["W"], env["CACHE"]], check=False)
    return times


def measure(manifest, workdir, skip_recipe, repeat=1, checkpoint=True):
    """Run all builds; returns the figures.

    With `repeat` > 1 the cold build and the recipe run that many times,
    interleaved, and the fastest of each is reported (the machine is shared).
    Without `checkpoint` the checkpoint and last-stage rebuilds are left out.
    """
    store = os.path.join(workdir, "store")
    store2 = os.path.join(workdir, "store-checkpoint")
    dpkg_opts = next(s["options"] for s in manifest["pipeline"]["stages"]
                     if s["name"] == "org.osbuild.dpkg")
    fast = (dpkg_opts.get("initramfs") or {}).get("modules") == "list"
    if manifest["pipeline"]["stages"][-1]["name"] != "org.osbuild.grub2":
        raise SystemExit(f"the last stage is {manifest['pipeline']['stages'][-1]['name']}, "
                         "expected org.osbuild.grub2")

    def changed(k):
        """The manifest with the k-th change of its last stage (grub2's timeout)."""
        new = copy.deepcopy(manifest)
        last = new["pipeline"]["stages"][-1]
        last["options"]["timeout"] = last["options"].get("timeout", 1) + 1 + k
        return new

    colds, recipes = [], []
    for i in range(repeat):
        subprocess.run(["rm", "-rf", store], check=True)
        colds.append(run_osbuild(manifest, store, workdir, f"cold{i or ''}"))
        if not skip_recipe:
            recipes.append(run_recipe(workdir, fast))
    cold = min(colds, key=lambda r: r["total"])
    # the first rebuild runs the engine and records its memo; the next ones replay it
    first_warm = run_osbuild(manifest, store, workdir, "warm")
    warm = min((run_osbuild(manifest, store, workdir, f"warm{i + 1}") for i in range(repeat)),
               key=lambda r: r["total"])
    cold_cp = last_change = None
    if checkpoint:
        # The engine keeps only the final tree (and checkpoints): to rebuild from
        # the stage before the last one, a second cold build checkpoints it.
        subprocess.run(["rm", "-rf", store2], check=True)
        cold_cp = run_osbuild(manifest, store2, workdir, "cold-checkpoint",
                              ["--checkpoint", stage_ids(manifest)[-2]])
        last_change = min((run_osbuild(changed(k), store2, workdir, f"last-stage{k or ''}")
                           for k in range(repeat)), key=lambda r: r["total"])
    subprocess.run(["rm", "-rf", store, store2], check=False)
    stage_phases, dpkg_steps = phases(cold)
    recipes = [r for r in recipes if r]
    return {"packages": len(dpkg_opts["packages"]), "fast_initrd": fast,
            "load": os.getloadavg()[0], "repeat": repeat,
            "cold": cold["total"], "cold_all": [r["total"] for r in colds],
            "warm": warm["total"], "first_warm": first_warm["total"],
            "cold_checkpoint": cold_cp["total"] if cold_cp else None,
            "last_stage": last_change["total"] if last_change else None,
            "last_stage_phases": phases(last_change)[0] if last_change else [],
            "phases": stage_phases, "dpkg_steps": dpkg_steps,
            "maxrss": max(r["maxrss"] or 0 for r in colds),
            "mem_growth": max(r["mem_growth"] for r in colds),
            "recipe": min(recipes, key=lambda r: r["floor"]) if recipes else None,
            "recipe_all": [r["floor"] for r in recipes]}


def label_of(manifest_path):
    """A short name for a manifest: `debian13` for samples/debian13-qcow2.json,
    `debian13-arm64` for samples/debian13-arm64-qcow2.json."""
    return os.path.basename(manifest_path).removesuffix(".json").removesuffix("-qcow2")


def report(fig):
    """Print the figures."""
    print(f"\nosbuild {fig['label']} benchmark ({fig['packages']} packages, initramfs: "
          f"{'module list' if fig['fast_initrd'] else 'MODULES=most'}; {os.cpu_count()} CPUs; "
          f"load average at the end {fig['load']:.1f})")
    print(f"  cold build (empty store, cold source cache):  {fig['cold']:7.2f} s"
          + (f" (fastest of {', '.join(f'{t:.1f}' for t in fig['cold_all'])})"
             if fig["repeat"] > 1 else ""))
    print(f"  first rebuild (nothing changed, engine):      {fig['first_warm']:7.2f} s")
    print(f"  warm rebuild (nothing changed, replayed):     {fig['warm']:7.3f} s")
    if fig["cold_checkpoint"] is not None:
        print(f"  cold build, --checkpoint before last stage:   {fig['cold_checkpoint']:7.2f} s")
        ran = ", ".join(f"{name} {secs:.2f} s" for name, secs in fig["last_stage_phases"])
        print(f"  rebuild, last config stage changed:           {fig['last_stage']:7.2f} s "
              f"({ran or 'nothing ran'})")
    print("  phases of the cold build (from log timestamps; a stage's time includes committing "
          "the tree after the last stage):")
    for name, secs in fig["phases"]:
        print(f"    {name:32s} {secs:7.2f} s")
        if name == "org.osbuild.dpkg":
            for sub, ssecs in fig["dpkg_steps"]:
                print(f"    {sub:32s} {ssecs:7.2f} s")
    small = [secs for name, secs in fig["phases"]
             if name in ("org.osbuild.hostname", "org.osbuild.timezone", "org.osbuild.fstab")]
    if small:
        print(f"  fixed cost of one stage (min of hostname/timezone/fstab): {min(small):.2f} s")
    if fig["maxrss"]:
        print(f"  peak memory: largest process {fig['maxrss'] / 2**20:.0f} MiB, host used-memory "
              f"growth {fig['mem_growth'] / 2**20:.0f} MiB (includes other load)")
    recipe = fig["recipe"]
    if recipe:
        print(f"  reference recipe, same packages (FAST_INITRD={int(fig['fast_initrd'])}): "
              f"fetch {recipe['fetch']:.2f} s + install {recipe['install']:.2f} s + image "
              f"{recipe['image']:.2f} s = floor {recipe['floor']:.2f} s "
              f"(its depsolve {recipe['depsolve']:.2f} s not counted)"
              + (f"; floors: {', '.join(f'{t:.1f}' for t in fig['recipe_all'])}"
                 if fig["repeat"] > 1 else ""))
        print(f"  cold build / floor: {fig['cold'] / recipe['floor']:.2f} (goal <= 0.7)")
    if fig["last_stage"] is not None:   # not measured with --arch
        print(f"  last config stage changed / cold build: {fig['last_stage'] / fig['cold']:.3f} "
              "(goal <= 0.1)")
    print(f"  warm rebuild / cold build: {fig['warm'] / fig['cold']:.4f} (goal <= 0.01)")
    if fig["maxrss"]:
        print(f"  peak RSS of the build's largest process (osbuild or a program it ran): "
              f"{fig['maxrss'] / 2**20:.0f} MiB (goal for osbuild itself < 150 MiB)")


def main():
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--manifest", action="append",
                        help="manifest to measure (repeatable; default: the Debian 13 and 12 "
                             "samples)")
    parser.add_argument("--workdir",
                        help="keep logs here (default: a temporary directory)")
    parser.add_argument("--skip-recipe", action="store_true",
                        help="do not run the reference recipe")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run the cold build and the recipe N times (interleaved) and "
                             "report the fastest of each")
    parser.add_argument("--arch", choices=sorted(ARCH_SAMPLES),
                        help="measure the sample of this foreign architecture (built under "
                             "emulation) instead of the amd64 ones")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/debian.py must run as root (nspawn, loop devices)")
    workdir = args.workdir or tempfile.mkdtemp(prefix="osbuild-bench-debian-", dir="/var/tmp")
    all_figures = {}
    for path in args.manifest or [debian_samples.manifest_path(name)
                                  for name in ARCH_SAMPLES.get(args.arch, SAMPLES)]:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        label = label_of(path)
        sub = os.path.join(workdir, label)
        os.makedirs(sub, exist_ok=True)
        # the reference recipe installs bookworm: compare it with Debian 12 only
        skip_recipe = args.skip_recipe or label != "debian12"
        figures = measure(manifest, sub, skip_recipe, max(1, args.repeat),
                          checkpoint=args.arch is None)
        figures["label"] = label
        report(figures)
        print(f"  logs: {sub}")
        all_figures[label] = figures
    print("\nside by side (seconds):  " + "".join(f"{label:>12s}" for label in all_figures))
    for key, name in (("cold", "cold build"), ("warm", "warm rebuild"),
                      ("last_stage", "last stage changed")):
        print(f"  {name:22s}" + "".join(f"{fig[key]:12.2f}" if fig[key] is not None
                                        else f"{'-':>12s}" for fig in all_figures.values()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(all_figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
