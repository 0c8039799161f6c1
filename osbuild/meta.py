"""What programs in the library declare about themselves, and option checks.

A program's STAGE_DESC, STAGE_INFO, STAGE_OPTS, STAGE_NETWORK and
STAGE_SECRETS are read from its source with `ast`, without running it, once
per process and libdir: `index(libdir)` is the one `Index` that the
manifest check, the sources check and the pipeline ask. Across processes,
what was read and which options validated are remembered by file identity
(osbuild.metacache), so a rebuild of the same manifest imports neither `ast`
nor jsonschema.
"""

import functools
import json
import os
import re

from osbuild import emulation as emulation_mod
from osbuild import metacache

KINDS = ("stages", "assemblers", "sources", "runners")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ValidationError(Exception):
    """A manifest (or part of it) is not acceptable; the message names where."""


def check_name(name, what):
    """Reject program names that are not plain file names (no paths, no `..`)."""
    # fullmatch: with match(), "$" would also accept a trailing newline
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name \
            or len(name) > 200:
        raise ValidationError(f"invalid {what} name: {shorten(name)}")


def shorten(value, limit=100):
    """`repr(value)`, cut to about `limit` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def program_path(libdir, kind, name):
    """The path of program `name` of `kind`, or a ValidationError if it is missing."""
    what = kind[:-1]
    check_name(name, what)
    path = os.path.join(libdir, kind, name)
    if not os.path.isfile(path):
        raise ValidationError(f"unknown {what} '{name}' (no {kind}/{name} in {libdir})")
    return path


def _string_assignment(node, ast):
    """(name, value) for `STAGE_xxx = "text"` (or `= True/False`) at module level, else None."""
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
        return None
    target, value = node.targets[0], node.value
    if isinstance(target, ast.Name) and \
            target.id in ("STAGE_DESC", "STAGE_INFO", "STAGE_OPTS", "STAGE_NETWORK",
                          "STAGE_SECRETS", "STAGE_EMULATION") \
            and isinstance(value, ast.Constant) and isinstance(value.value, (str, bool)):
        return target.id, value.value
    return None


class Index:
    """The programs of one libdir: what each declares, read once (`ProgramInfo`)."""

    def __init__(self, libdir):
        self.libdir = libdir
        self._infos = {}

    def get(self, kind, name):
        """The `ProgramInfo` of `<libdir>/<kind>/<name>`; ValidationError if it is unusable."""
        key = (kind, name)
        if key not in self._infos:
            self._infos[key] = ProgramInfo.load(self.libdir, kind, name)
        return self._infos[key]

    def path(self, kind, name):
        """The program's path (see `program_path`)."""
        return program_path(self.libdir, kind, name)


@functools.lru_cache(maxsize=16)
def index(libdir):
    """The process's one `Index` of `libdir`."""
    return Index(libdir)


def uses_host_network(libdir, kind, name):
    """Whether the program declares STAGE_NETWORK = "host"."""
    return index(libdir).get(kind, name).network


def receives_secrets(libdir, kind, name):
    """Whether the program declares STAGE_SECRETS = True."""
    return index(libdir).get(kind, name).secrets


@functools.lru_cache(maxsize=256)
def emulates(libdir, kind, name):
    """Whether the program declares STAGE_EMULATION = True (read once per process)."""
    return ProgramInfo.load(libdir, kind, name).emulation


class ProgramInfo:
    """The declared description and option schema of one program."""

    def __init__(self, kind, name, desc, info, opts, network=False, secrets=False,
                 emulation=False):
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        # the identity of the file it was read from (osbuild.metacache), if known
        self.identity = None
        self.kind = kind
        self.name = name
        self.desc = desc
        self.info = info
        self.opts = opts
        # STAGE_NETWORK = "host": the program needs the host's network (e.g. dnf
        # fetching from its repositories); all others get loopback only.
        self.network = network
        # STAGE_SECRETS = True: the sources API hands the program the secrets
        # (as memfds) that its repositories need; all others never get them.
        self.secrets = secrets
        # STAGE_EMULATION = True: the option `emulation` names an architecture
        # whose binaries run under qemu's user-mode emulator (osbuild/emulation.py).
        self.emulation = emulation

    @property
    def schema(self):
        """The full JSON schema of the program's options."""
        return {"$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object", **self.opts}

    @classmethod
    def load(cls, libdir, kind, name):
        """Read the info of `<libdir>/<kind>/<name>` (or take it from the cache)."""
        path = program_path(libdir, kind, name)
        cache = metacache.active()
        try:
            with open(path, "rb") as f:
                ident = metacache.identity(os.fstat(f.fileno()), os.path.abspath(path))
                values = cache.program(ident)
                if values is None:
                    values = _declarations(f.read().decode("utf-8"), path)
                    cache.add_program(ident, values)
        except (OSError, SyntaxError, ValueError) as e:
            raise ValidationError(f"cannot read {kind}/{name}: {e}") from None
        info = cls._from_values(kind, name, values)
        info.identity = ident
        return info

    @classmethod
    def _from_values(cls, kind, name, values):
        opts_text = values.get("STAGE_OPTS", "")
        opts_text = opts_text.strip() if isinstance(opts_text, str) else ""
        try:
            opts = json.loads("{" + opts_text + "}") if opts_text else {}
        except ValueError as e:
            raise ValidationError(f"{kind}/{name}: STAGE_OPTS is not a JSON schema body: {e}") \
                from None
        network = values.get("STAGE_NETWORK", "")
        if network not in ("", "host"):
            raise ValidationError(f"{kind}/{name}: STAGE_NETWORK must be \"host\" if set")
        secrets = values.get("STAGE_SECRETS", False)
        if not isinstance(secrets, bool):
            raise ValidationError(f"{kind}/{name}: STAGE_SECRETS must be True or False")
        emulation = values.get("STAGE_EMULATION", False)
        if not isinstance(emulation, bool):
            raise ValidationError(f"{kind}/{name}: STAGE_EMULATION must be True or False")
        texts = {k: v.strip() if isinstance(v, str) else "" for k, v in values.items()}
        return cls(kind, name, texts.get("STAGE_DESC", ""), texts.get("STAGE_INFO", ""), opts,
                   network == "host", secrets, emulation)

    def validate(self, options, where):
        """Raise ValidationError naming `where` if `options` break the schema.

        Options that validated against this very program file before are
        not checked again (and jsonschema is not even imported).
        """
        if self.emulation and isinstance(options, dict) and "emulation" in options:
            # osbuild's own check, whatever the program's schema allows (and every
            # time: whether this host can emulate is not a property of the file)
            try:
                emulation_mod.check(options["emulation"])
            except emulation_mod.EmulationError as e:
                raise ValidationError(f"{where}.emulation: {e}") from None
        key = metacache.validation_key(self.identity, options) if self.identity else None
        if key and metacache.active().is_valid(key):
            return
        import jsonschema  # pylint: disable=import-outside-toplevel
        try:
            validator = jsonschema.Draft7Validator(self.schema)
            errors = sorted(validator.iter_errors(options), key=lambda e: list(e.absolute_path))
        except jsonschema.SchemaError as e:
            raise ValidationError(f"{self.kind}/{self.name}: invalid option schema: {e.message}") \
                from None
        if errors:
            raise ValidationError(format_error(errors[0], where))
        if key:
            metacache.active().add_valid(key)


def _declarations(source, path):
    """{STAGE_xxx: value} of the module-level string/bool assignments in `source`."""
    import ast  # pylint: disable=import-outside-toplevel
    tree = ast.parse(source, filename=path)
    return dict(filter(None, (_string_assignment(node, ast) for node in tree.body)))


def format_error(error, where):
    """`where.path.to[3].value: message` for a jsonschema error."""
    path = where
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    message = error.message
    if len(message) > 300:
        message = message[:300] + "…"
    return f"{path}: {message}"
