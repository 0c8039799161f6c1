"""Helpers to run one stage program directly on a tree and to check its option schema."""

import json
import os
import subprocess

from osbuild import meta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"   # what the build root runs programs with
KERNEL = "6.1.0-13-amd64"
# A build-root script stage that makes a tree with a Debian-style kernel, initrd and os-release.
FAKE_DEBIAN = {"name": "org.osbuild.script", "options": {"chroot": False, "script": (
    "mkdir -p boot etc usr/lib\n"
    f"echo kernel > boot/vmlinuz-{KERNEL}\n"
    f"echo initrd > boot/initrd.img-{KERNEL}\n"
    f"ln -s boot/vmlinuz-{KERNEL} vmlinuz\n"
    f"ln -s boot/initrd.img-{KERNEL} initrd.img\n"
    "echo 'PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"' > usr/lib/os-release\n"
    "ln -s ../usr/lib/os-release etc/os-release\n")}}


def run_stage(name, tree, options, sources="/nonexistent", env=None):
    """Run stages/<name> on `tree` with the build root's python; return the CompletedProcess."""
    args = {"tree": str(tree), "sources": str(sources), "options": options}
    return subprocess.run([PYTHON, os.path.join(REPO, "stages", name)], input=json.dumps(args),
                          capture_output=True, text=True, check=False, timeout=300, env=env)


def ok(name, tree, options, sources="/nonexistent"):
    """Run a stage that must succeed."""
    proc = run_stage(name, tree, options, sources)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def fails(name, tree, options, message, sources="/nonexistent", env=None):
    """Run a stage that must fail with a one-line error (no traceback) containing `message`."""
    proc = run_stage(name, tree, options, sources, env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc


def schema_error(name, options):
    """The validation message for `options` of stage `name` (None when valid)."""
    info = meta.ProgramInfo.load(REPO, "stages", name)
    try:
        info.validate(options, "options")
    except meta.ValidationError as e:
        return str(e)
    return None
