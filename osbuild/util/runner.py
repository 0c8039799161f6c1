"""Container set-up shared by the runners (runs inside the build root).

A runner prepares the container's /etc from the build tree's /etc once per
build root (a marker file records that it was done), then connects stdio
to the host through the osbuild API and executes the program.
"""

import os
import shutil
import subprocess
import sys

from osbuild import api

SOURCE_ETC = "/run/osbuild/buildroot-etc"
_MARKER = "/etc/.osbuild-runner-ready"
# Host secrets and identity that programs have no business reading.
_SKIP_ETC = {"shadow", "shadow-", "gshadow", "gshadow-", "ssh", "sudoers", "sudoers.d",
             "machine-id", "security", "ssl/private", ".osbuild-runner-ready"}


def _ignore(directory, names):
    rel = os.path.relpath(directory, SOURCE_ETC)
    return [n for n in names if os.path.normpath(os.path.join(rel, n)) in _SKIP_ETC]


def copy_etc(skip=frozenset(_SKIP_ETC)):
    """Copy the build tree's /etc into the container's /etc, minus secrets."""
    if not os.path.isdir(SOURCE_ETC):
        return
    for entry in sorted(os.listdir(SOURCE_ETC)):
        if entry in skip:
            continue
        src = os.path.join(SOURCE_ETC, entry)
        dst = os.path.join("/etc", entry)
        try:
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True, ignore=_ignore)
            else:
                shutil.copy2(src, dst, follow_symlinks=False)
        except OSError as e:
            print(f"runner: not copying /etc/{entry}: {e.strerror}", file=sys.stderr)


def run_if_present(argv):
    """Run a set-up command if the build tree has it; failures are reported, not fatal."""
    if shutil.which(argv[0]) is None:
        return
    res = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if res.returncode != 0:
        print(f"runner: {' '.join(argv)} failed: {res.stderr.decode(errors='replace').strip()}",
              file=sys.stderr)


def ldconfig():
    """Make sure /etc/ld.so.cache matches the build tree's libraries."""
    if not os.path.exists("/etc/ld.so.cache"):
        run_if_present(["ldconfig"])


def sysusers():
    """Create the system users the build tree's packages declare."""
    run_if_present(["systemd-sysusers"])


def update_ca_trust():
    """Extract the CA trust store (Fedora/RHEL)."""
    run_if_present(["update-ca-trust", "extract"])


def run(argv, setup):
    """Do `setup` once per build root, set up stdio, exec `argv`."""
    if not os.path.exists(_MARKER):
        setup()
        with open(_MARKER, "w", encoding="utf-8"):
            pass
    api.setup_stdio()
    if not argv:
        print("runner: no program given", file=sys.stderr)
        sys.exit(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
