"""osbuild: build operating-system images from declarative JSON manifests."""

from osbuild.version import __version__

__all__ = ["__version__"]
