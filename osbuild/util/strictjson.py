"""JSON input without the values that must never reach a stage.

Python's json module accepts `NaN`, `Infinity` and `-Infinity`, which are not
JSON: echoed back (in `--json` results, `--inspect`) they make the output
unparsable. A string with U+0000 is valid JSON but ends up as a NUL byte in a
file of the image (`/etc/fstab`) or cuts a C string short. `loads()` keeps
such constants as markers, so that `check()` can name the place of the first
offending value; both are refused with one clear message.
"""

import json
import math

from osbuild.meta import ValidationError
from osbuild.schema import format_path


class Constant:
    """A `NaN`/`Infinity`/`-Infinity` token met while parsing."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def loads(text):
    """Parse `text` like `json.loads`; non-JSON constants become `Constant` markers."""
    return json.loads(text, parse_constant=Constant)


def problem(value):
    """Why the scalar `value` is refused, or None."""
    if isinstance(value, Constant):
        return f"{value.name} is not allowed (JSON has no NaN or Infinity)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not allowed (JSON has no NaN or Infinity)"
    if isinstance(value, str) and "\0" in value:
        return "a string containing a NUL character (U+0000) is not allowed"
    return None


def check(value, where=""):
    """Raise ValidationError naming the first NUL string or non-finite number in `value`.

    Object keys are checked too. `where` prefixes the reported path; the
    caller has already bounded the nesting depth.
    """
    stack = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            children = []
            for key, child in item.items():
                if isinstance(key, str) and "\0" in key:
                    raise ValidationError(f"{format_path(path, where)}: a key containing a NUL "
                                          "character (U+0000) is not allowed")
                children.append((child, path + [key]))
            stack.extend(reversed(children))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed([(child, path + [i]) for i, child in enumerate(item)]))
        else:
            message = problem(item)
            if message:
                raise ValidationError(f"{format_path(path, where)}: {message}")
