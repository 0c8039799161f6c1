"""Small helpers of the host side (osbuild's engine and the source programs,
which run on the host); jsoncomm and nesting are also used inside the build
root. What runs only in the build root is osbuild.programs (runner, fsimage,
vfat, efiboot); host executables are osbuild.executables."""
