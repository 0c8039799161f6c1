"""Small helpers shared by osbuild's modules and programs."""
