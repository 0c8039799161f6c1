"""Container set-up shared by the runners (runs inside the build root).

The host copies the build root's /etc (see osbuild/etctemplate.py) and
starts the runner once with `--setup`, with /etc writable: the runner then
does the distribution's set-up (ldconfig, sysusers, CA trust) and exits.
Every program is started later with its path as the argument, /etc
read-only: the runner connects stdio to the host through the osbuild API
and executes it. `--emulate ARCH` before the program registers qemu's
user-mode emulator for ARCH first (see osbuild/emulation.py).
"""

import os
import sys

from osbuild import api


def run_if_present(argv):
    """Run a set-up command if the build tree has it; failures are reported, not fatal."""
    # only --setup needs these (not every program's start)
    import shutil  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel
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


def debian_setup():
    """Debian and Ubuntu: the linker cache (alternatives and CA certificates come with /etc)."""
    ldconfig()


def fedora_setup():
    """Fedora and RHEL: linker cache, system users from sysusers.d, CA trust store."""
    ldconfig()
    sysusers()
    update_ca_trust()


def main(setup):
    """A runner's entry point: `run` with the program's arguments."""
    run(sys.argv[1:], setup)


def run(argv, setup):
    """`--setup`: run `setup` and exit; else set up stdio and exec `argv`
    (after registering the emulator when it starts with `--emulate ARCH`)."""
    if argv == ["--setup"]:
        setup()
        sys.exit(0)
    api.setup_stdio()
    if argv[:1] == ["--emulate"]:
        from osbuild import emulation  # pylint: disable=import-outside-toplevel
        try:
            emulation.register(argv[1] if len(argv) > 1 else None)
        except emulation.EmulationError as e:
            print(f"osbuild: {e}", file=sys.stderr)
            sys.exit(1)
        argv = argv[2:]
    if not argv:
        print("runner: no program given", file=sys.stderr)
        sys.exit(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
