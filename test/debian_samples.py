"""The Debian sample manifests as tests build them: pinned while the archive serves them.

`manifest_path("debian13-qcow2.json")` is samples/NAME as long as the archive
still serves every package it pins; once one is gone (HTTP 404/410) it is a
manifest resolved against today's archive by tools/osbuild-debian-manifest
(the same configuration, today's packages; see osbuild.pinned), kept in
/var/cache/osbuild-test/resolved/NAME. So the tests do not depend on the state
of the archive on the day the sample was written. When the archive cannot be
reached the pinned sample is used (its build then names the network problem).
"""

import fcntl
import json
import os
import sys

from stagetest import CACHE_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from osbuild import pinned  # noqa: E402  pylint: disable=wrong-import-position

GENERATOR = os.path.join(REPO, "tools", "osbuild-debian-manifest")
RESOLVED = os.path.join(CACHE_DIR, "resolved")
SAMPLES = os.path.join(REPO, "samples")
# archive metadata, kept between runs (apt fetches only what changed)
APT_LISTS = os.path.join(RESOLVED, "apt-lists")
_CHOSEN = {}


def manifest_path(name, resolved=RESOLVED, samples=SAMPLES):
    """Path of the manifest to build for `samples`/`name` (see the module docstring)."""
    if (samples, name) in _CHOSEN:
        return _CHOSEN[samples, name]
    path = os.path.join(samples, name)
    with open(path, encoding="utf-8") as f:
        desc = json.load(f)
    try:
        gone = pinned.gone_urls(pinned.source_urls(desc).values())
    except pinned.ArchiveUnreachable as e:
        print(f"debian_samples: cannot reach the archive ({e}); using the pinned {name}",
              file=sys.stderr)
        return path
    if gone:
        print(f"debian_samples: pinned package {pinned.package_name(gone[0])} is no longer in "
              f"the archive; using a freshly resolved {name}", file=sys.stderr)
        os.makedirs(APT_LISTS, exist_ok=True)
        with open(APT_LISTS + ".lock", "w", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fresh = os.path.join(resolved, name)
            pinned.resolve_fresh(desc, GENERATOR, fresh, APT_LISTS)
        path = fresh
    _CHOSEN[samples, name] = path
    return path


def load(name):
    """The manifest dict manifest_path(name) names."""
    with open(manifest_path(name), encoding="utf-8") as f:
        return json.load(f)
