"""The structural check of a manifest against schemas/osbuild1.json.

The schema is looked up in the library directory first (`LIBDIR/schemas/`,
which is where a checkout and the installed package keep it), then next to
this package (`osbuild/schemas/`, shipped as package data by setup.py), then
in the checkout this package was imported from.
"""

import functools
import json
import os
import re

from osbuild import metacache
from osbuild.meta import ValidationError
from osbuild.util import nesting

SCHEMA_NAME = "osbuild1.json"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:-]+")


def schema_paths(libdir=None):
    """Where the manifest schema is looked for, in order."""
    paths = []
    if libdir:
        paths.append(os.path.join(os.path.abspath(libdir), "schemas", SCHEMA_NAME))
    paths.append(os.path.join(_PACKAGE_DIR, "schemas", SCHEMA_NAME))
    paths.append(os.path.join(os.path.dirname(_PACKAGE_DIR), "schemas", SCHEMA_NAME))
    return paths


def find_schema(libdir=None):
    """The path of the manifest schema, or None if there is none."""
    for path in schema_paths(libdir):
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=None)
def _load(path):
    import jsonschema  # pylint: disable=import-outside-toplevel
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
        jsonschema.Draft7Validator.check_schema(schema)
    except (OSError, ValueError) as e:
        raise ValidationError(f"cannot read the manifest schema {path}: {e}") from None
    except jsonschema.SchemaError as e:
        raise ValidationError(f"the manifest schema {path} is invalid: {e.message}") from None
    return schema


def load_schema(libdir=None):
    """The manifest schema as a dict; ValidationError when there is none."""
    path = find_schema(libdir)
    if path is None:
        raise ValidationError("cannot find the manifest schema "
                              f"(looked for {', '.join(schema_paths(libdir))})")
    return _load(path)


MAX_PATH_CHARS = 300


def format_path(parts, where=""):
    """`pipeline.stages[3].options` for the path parts of a value."""
    path = where
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(str(part)):
            path += f"[{json.dumps(str(part))}]"  # keys with odd characters stay on one line
        else:
            path += f".{part}" if path else str(part)
    if len(path) > MAX_PATH_CHARS:  # a hostile manifest nests deeply: keep the error on one screen
        path = path[:MAX_PATH_CHARS // 2] + "…" + path[-MAX_PATH_CHARS // 2:]
    return path or "manifest"


def _message(error):
    message = error.message
    if error.validator == "pattern" and "description" in error.schema:
        message = f"{error.instance!r} is not valid: {error.schema['description']}"
    if len(message) > 300:
        message = message[:300] + "…"
    return message


def _first_error(errors):
    """The error to report: the one at the earliest place in the document."""
    def key(error):
        return [(0, p, "") if isinstance(p, int) else (1, 0, str(p))
                for p in error.absolute_path]
    return min(errors, key=key) if errors else None


def _check(instance, schema, where):
    # jsonschema recurses per level: bound the depth first (a clear error, no RecursionError).
    nesting.check(instance, where or "manifest")
    import jsonschema  # pylint: disable=import-outside-toplevel
    validator = jsonschema.Draft7Validator(schema)
    error = _first_error(list(validator.iter_errors(instance)))
    if error is not None:
        raise ValidationError(f"{format_path(error.absolute_path, where)}: {_message(error)}")


def check_manifest(desc, libdir=None):
    """Raise ValidationError naming the offending place if `desc` is not a manifest.

    A manifest that fitted this very schema file before is not checked again
    (osbuild.metacache).
    """
    path = find_schema(libdir)
    nesting.check(desc, "manifest")   # before anything that recurses per level
    ident = metacache.file_identity(path) if path else None
    key = metacache.validation_key(["manifest", ident], desc) if ident else None
    if key and metacache.active().is_valid(key):
        return
    _check(desc, load_schema(libdir), "")
    if key:
        metacache.active().add_valid(key)


def check_pipeline(desc, where, libdir=None):
    """Check a bare pipeline description (e.g. of --build-env); `where` prefixes errors."""
    schema = load_schema(libdir)
    sub = dict(schema["definitions"]["pipeline"], definitions=schema["definitions"])
    _check(desc, sub, where)
