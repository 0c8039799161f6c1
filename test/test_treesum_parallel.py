"""Big files are hashed by several threads: the digest is the one-thread digest."""

import hashlib
import os

import pytest

from osbuild import treesum


def serial_digest(fd):
    """file_digest computed by one thread, chunk by chunk."""
    size = os.fstat(fd).st_size
    digest = hashlib.sha256(f"chunked-sha256 {treesum.CHUNK} {size}\n".encode())
    for chunk in treesum._chunk_digests(fd, size):  # pylint: disable=protected-access
        digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("layout", ["dense", "holes", "ragged-end", "hole-at-end"])
def test_parallel_digest_is_the_serial_one(tmp_path, layout):
    """Data, holes, a short last chunk and a trailing hole give the same digest either way."""
    path = tmp_path / "big"
    size = treesum.PARALLEL_SIZE + 3 * treesum.CHUNK + 12345
    with open(path, "wb") as f:
        if layout == "dense":
            f.write(os.urandom(size))
        else:
            f.truncate(size)
            f.seek(treesum.CHUNK // 2)
            f.write(os.urandom(2 * treesum.CHUNK))
            f.seek(40 * treesum.CHUNK)
            f.write(b"\0" * treesum.CHUNK + b"x")       # written zeros count as a hole's
            if layout == "ragged-end":
                f.seek(size - 100)
                f.write(b"y" * 100)
            elif layout == "hole-at-end":
                f.truncate(size + 5 * treesum.CHUNK)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert treesum.file_digest(fd) == serial_digest(fd)
        assert os.fstat(fd).st_size >= treesum.PARALLEL_SIZE
    finally:
        os.close(fd)
