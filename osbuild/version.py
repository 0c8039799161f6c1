"""The one place that defines osbuild's version."""

__version__ = "11"
