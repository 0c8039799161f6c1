"""Manifest formats: `v1` is the format of DESIGN 1.2 (the only one)."""
