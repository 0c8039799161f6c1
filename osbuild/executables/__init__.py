"""Host executables: modules osbuild runs on the host as processes of their own
(`python3 -m osbuild.executables.NAME`), e.g. in private namespaces."""
