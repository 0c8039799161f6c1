"""Client-certificate secrets (`--secrets`): their material, fingerprint and memory files.

The secrets file maps a name to an entry whose `ssl_client_cert`,
`ssl_client_key` and `ssl_ca_cert` are each PEM text or an absolute host
path. The file is the host operator's, so its paths are trusted; manifests
only name an entry. Material is only ever kept in memory: a sealed memfd,
which a program opens as `/proc/self/fd/N` (or curl as `/dev/fd/N`), so
nothing is left on any disk, not even after a SIGKILL.
"""

import hashlib
import os

from osbuild.util import jsoncomm

KEYS = ("ssl_client_cert", "ssl_client_key", "ssl_ca_cert")


class SecretError(Exception):
    """A secret is missing or malformed; the message never contains its value."""


def material(secrets, name, user):
    """`{key: bytes}` of the secret `name` that `user` (for messages) needs."""
    entry = secrets.get(name) if isinstance(secrets, dict) else None
    if not isinstance(entry, dict):
        raise SecretError(f"{user} needs the secret {str(name)[:200]!r}, which was not "
                          "provided (pass it with --secrets)")
    found = {}
    for key in KEYS:
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise SecretError(f"secret {name!r}: {key} must be a string")
        if "-----BEGIN" in value:
            found[key] = value.encode()
        elif os.path.isabs(value) and os.path.isfile(value):
            with open(value, "rb") as f:
                found[key] = f.read()
        else:
            raise SecretError(f"secret {name!r}: {key} is neither PEM text nor an existing "
                              "absolute file path")
    if not found:
        raise SecretError(f"secret {name!r} has none of {', '.join(KEYS)}")
    return found


def fingerprint(mat):
    """A hex digest identifying the material `mat` (to key caches by), not revealing it."""
    h = hashlib.sha256(b"osbuild secret fingerprint 1\0")
    for key in sorted(mat):
        h.update(f"{key}\0{len(mat[key])}\0".encode())
        h.update(mat[key])
    return h.hexdigest()


def memfd(label, data):
    """A sealed, close-on-exec memory file holding `data`, positioned at its start."""
    return jsoncomm.sealed_memfd(data, label)
