"""Start osbuild from this checkout as a process (--json) and collect its result."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(store, manifest_path, *extra, umask=None):
    """Start `osbuild --json` on the manifest file; returns the Popen."""
    cmd = [sys.executable, "-m", "osbuild", "--libdir", REPO, "--store", str(store), "--json",
           *extra, str(manifest_path)]
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    # pylint: disable-next=subprocess-popen-preexec-fn,consider-using-with
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec)


def finish(proc, timeout=600):
    """Wait for a started osbuild; returns (exit status, JSON result or None, stderr)."""
    stdout, stderr = proc.communicate(timeout=timeout)
    try:
        result = json.loads(stdout)
    except ValueError:
        result = None
    return proc.returncode, result, stderr
