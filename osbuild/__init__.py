"""osbuild: build operating-system images from declarative JSON manifests.

The original osbuild's library names are available here for tools that
import osbuild: `osbuild.load`, `osbuild.Pipeline`, `osbuild.Stage`,
`osbuild.Assembler` (from `osbuild.pipeline` and
`osbuild.manifest`). They are imported on first
use, so that programs running in a build root can import `osbuild.<module>`
helpers without the host-only dependencies (jsonschema) being loaded.
"""

import importlib
import os
import sys

import _signal  # not `signal`: its import of enum is a window in which Ctrl-C is lost

from osbuild.version import __version__

__all__ = ["__version__"]

# name -> (module, attribute), imported on first access
_LAZY = {
    "Assembler": ("osbuild.pipeline", "Assembler"),
    "BuildError": ("osbuild.pipeline", "BuildError"),
    "Pipeline": ("osbuild.pipeline", "Pipeline"),
    "Stage": ("osbuild.pipeline", "Stage"),
    "load": ("osbuild.manifest", "load_original"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'osbuild' has no attribute {name!r}")


def _interrupted_early(_signum, _frame):
    if "--json" in sys.argv:
        os.write(1, b'{"success": false, "error": "interrupted"}\n')
    os.write(2, b"\nosbuild: interrupted\n")
    os._exit(130)  # pylint: disable=protected-access


def catch_early_interrupts():
    """Ctrl-C before the command line's own handling is set up: one line, exit 130.

    Python's default handler raises KeyboardInterrupt, which prints a traceback
    and is lost when it lands in one of the import system's callbacks."""
    _signal.signal(_signal.SIGINT, _interrupted_early)


def _module_run_by_python():
    """The module named by `python3 … -m MODULE`, while its package is imported
    (sys.argv[0] is "-m" until then), else None."""
    if sys.argv[:1] != ["-m"]:
        return None
    args = iter(sys.orig_argv[1:])
    for arg in args:
        if not arg.startswith("-") or arg.startswith("--"):
            continue
        for index, flag in enumerate(arg[1:], start=2):
            rest = arg[index:]
            if flag == "m":
                return rest or next(args, None)
            if flag in "XW":
                if not rest:
                    next(args, None)
                break
    return None


if _module_run_by_python() == "osbuild" or os.path.basename(sys.argv[0]) == "osbuild":
    catch_early_interrupts()
