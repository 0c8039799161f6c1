"""What validation learnt, remembered across runs in the store (STORE/cache/meta.json).

Two kinds of facts, both keyed only by things the host controls:

* a program's declarations (STAGE_DESC, STAGE_OPTS, ...), keyed by the
  identity of its file (path, device, inode, size, mtime and ctime in ns):
  an edited or replaced program has another identity, so it is read again;
* "this JSON value fits this schema", keyed by the SHA-256 of the schema
  file's identity, jsonschema's own identity and the canonical JSON of the
  value. Only successful validations are recorded: a manifest can add the
  fact that its own (valid) options are valid, nothing else; another manifest
  hits an entry only with exactly the same value against the same schema.

A cache that is missing, unreadable or malformed is an empty one; writing is
atomic (temporary file + rename) and best effort (a read-only store just
validates every time). With no store (`--inspect`) the cache lives in memory.
"""

import contextlib
import hashlib
import json
import os
import tempfile

FORMAT = 1
MAX_VALID = 4096          # remembered validations; the oldest go first
MAX_PROGRAMS = 1024


def identity(st, path):
    """The identity of a file from its stat result: a JSON-able list."""
    return [path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_identity(path):
    """The identity of the file at `path` (following links), or None if it cannot be read."""
    try:
        return identity(os.stat(path), path)
    except OSError:
        return None


_JSONSCHEMA = []


def jsonschema_origin():
    """The path of the installed jsonschema package's __init__.py (None: not installed),
    found without importing it."""
    if not _JSONSCHEMA:
        import importlib.util  # pylint: disable=import-outside-toplevel
        try:
            spec = importlib.util.find_spec("jsonschema")
            origin = spec.origin if spec else None
        except (ImportError, ValueError):
            origin = None
        _JSONSCHEMA.append(origin)
    return _JSONSCHEMA[0]


def jsonschema_identity():
    """The identity of the installed jsonschema package: another jsonschema version may
    judge differently."""
    origin = jsonschema_origin()
    return file_identity(origin) if origin else None


def validation_key(schema_identity, value):
    """The key of "`value` fits the schema of `schema_identity`"."""
    text = json.dumps([FORMAT, schema_identity, jsonschema_identity(), value],
                      sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Cache:
    """The cache of one store (`path` None: memory only)."""

    def __init__(self, path=None):
        self.path = path
        self.programs = {}
        self.valid = {}          # key -> None, in insertion order
        self.dirty = False
        if path:
            self._read()

    def _read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                # only a file that nobody but this user could have written
                if not all(_private(st) for st in (os.fstat(f.fileno()),
                                                   os.stat(os.path.dirname(self.path)))):
                    return
                data = json.load(f)
        except (OSError, ValueError):
            return
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return
        programs, valid = data.get("programs"), data.get("valid")
        if isinstance(programs, dict):
            self.programs = {k: v for k, v in programs.items()
                             if isinstance(v, dict) and isinstance(v.get("identity"), list)
                             and isinstance(v.get("values"), dict)}
        if isinstance(valid, list):
            self.valid = dict.fromkeys(k for k in valid if isinstance(k, str))

    def program(self, ident):
        """The declarations recorded for the program file of identity `ident`, or None."""
        entry = self.programs.get(ident[0]) if ident else None
        if entry is not None and entry["identity"] == ident:
            return entry["values"]
        return None

    def add_program(self, ident, values):
        """Record the declarations `values` (a JSON-able dict) read from the file `ident`."""
        if ident:
            self.programs.pop(ident[0], None)
            self.programs[ident[0]] = {"identity": ident, "values": values}
            while len(self.programs) > MAX_PROGRAMS:
                del self.programs[next(iter(self.programs))]
            self.dirty = True

    def is_valid(self, key):
        """Whether a validation of `key` succeeded before."""
        return key in self.valid

    def add_valid(self, key):
        """Record that the validation of `key` succeeded."""
        if key not in self.valid:
            self.valid[key] = None
            while len(self.valid) > MAX_VALID:
                del self.valid[next(iter(self.valid))]
            self.dirty = True

    def save(self):
        """Write the cache if it changed (atomically; errors are ignored)."""
        if not self.path or not self.dirty:
            return
        directory = os.path.dirname(self.path)
        with contextlib.suppress(OSError):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".meta-",
                                             encoding="utf-8", delete=False) as f:
                try:
                    json.dump({"format": FORMAT, "programs": self.programs,
                               "valid": list(self.valid)}, f)
                    f.flush()
                    os.rename(f.name, self.path)
                except BaseException:
                    os.unlink(f.name)
                    raise
            self.dirty = False


def _private(st):
    """Whether the file of `st` belongs to this user and only this user may write it."""
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


_ACTIVE = [Cache()]


def active():
    """The cache in use by this process."""
    return _ACTIVE[0]


def use_store(store_path):
    """Use (and later save into) the cache of the store at `store_path`.

    Nothing is created here: the file is written by `save()` only once the
    store exists (a run that fails on bad input leaves no store behind).
    """
    _ACTIVE[0] = Cache(os.path.join(os.path.abspath(store_path), "cache", "meta.json"))
    return _ACTIVE[0]


def save():
    """Save the active cache (when its store exists)."""
    cache = _ACTIVE[0]
    if cache.path and os.path.isdir(os.path.dirname(os.path.dirname(cache.path))):
        cache.save()
