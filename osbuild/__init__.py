"""osbuild: build operating-system images from declarative JSON manifests.

The original osbuild's library names are available here for tools that
import osbuild: `osbuild.load`, `osbuild.Pipeline`, `osbuild.Stage`,
`osbuild.Assembler` (from `osbuild.pipeline` and
`osbuild.manifest`). They are imported on first
use, so that programs running in a build root can import `osbuild.<module>`
helpers without the host-only dependencies (jsonschema) being loaded.
"""

import importlib

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
