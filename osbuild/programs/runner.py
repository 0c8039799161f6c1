"""Container set-up shared by the runners (runs inside the build root).

The host copies the build root's /etc (see osbuild/etctemplate.py) and
starts the runner once with `--setup`, with /etc writable: the runner then
does the distribution's set-up (ldconfig, sysusers, CA trust) and exits.
Every program is started later with its path as the argument, /etc
read-only: the runner connects stdio to the host through the osbuild API
and executes it; a Python program for the runner's own interpreter runs in
the runner's process instead (`python_program`), which saves starting a
second interpreter and importing the osbuild package again. `--emulate
ARCH` before the program registers qemu's user-mode emulator for ARCH first
(see osbuild/emulation.py).
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
    flags = python_program(argv[0])
    if flags is not None:
        run_python(argv, site="-S" not in flags)
    os.execv(argv[0], argv)


def python_program(path):
    """The interpreter flags of `path` when its #! line names this interpreter with
    no flag but -S (so it can run in this process); else None."""
    try:
        with open(path, "rb") as f:
            line = f.readline(256)
    except OSError:
        return None
    if not line.startswith(b"#!") or not line.endswith(b"\n"):
        return None
    interpreter, *flags = line[2:].decode("utf-8", errors="replace").split()
    if os.path.realpath(interpreter) != os.path.realpath(sys.executable):
        return None
    if any(flag != "-S" for flag in flags):
        return None
    return flags


def run_python(argv, site):
    """Run the Python program `argv[0]` as __main__ in this process, as its own
    interpreter would (with the site packages when `site`); exits with its status."""
    path = argv[0]
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    if site:
        import site as site_module  # pylint: disable=import-outside-toplevel
        site_module.main()
    main_module = type(sys)("__main__")
    main_module.__file__ = path
    main_module.__builtins__ = __builtins__
    sys.modules["__main__"] = main_module
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(path)
    exec(code, main_module.__dict__)  # pylint: disable=exec-used
    sys.exit(0)
