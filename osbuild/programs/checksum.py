"""Checksums (`ALGO:HEX`) of content: checking their form and computing them.

Shared by the host's sources API (`osbuild/sources.py`) and the programs.
"""

import hashlib
import re

# Supported checksum algorithms and the length of their hex digests.
HASH_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
CHUNK = 1 << 20


def checksum_error(checksum):
    """Return why `checksum` is not a valid `ALGO:HEX` string, or None if it is."""
    if not isinstance(checksum, str):
        return f"checksum {checksum!r} is not a string"
    algo, sep, digest = checksum.partition(":")
    if not sep or not re.fullmatch(r"[a-z0-9]+", algo):
        return f"malformed checksum {checksum[:200]!r} (expected ALGORITHM:HEXDIGEST)"
    if algo not in HASH_LENGTHS:
        return (f"unsupported checksum algorithm {algo!r} in {checksum[:200]!r} "
                f"(supported: {', '.join(sorted(HASH_LENGTHS))})")
    if len(digest) != HASH_LENGTHS[algo] or not re.fullmatch(r"[0-9a-f]+", digest):
        return (f"malformed checksum {checksum[:200]!r} "
                f"({algo} needs {HASH_LENGTHS[algo]} lowercase hex digits)")
    return None


def file_digest(path, algo):
    """Hex digest (`algo`, a hashlib name) of the file at `path`, read in 1 MiB chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_checksum(path, algo):
    """`ALGO:HEX` of the file at `path`."""
    return f"{algo}:{file_digest(path, algo)}"
