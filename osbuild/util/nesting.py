"""A bound on how deeply JSON input may nest.

Python's json module, jsonschema and the loader all recurse per level, so a
document nested thousands of levels deep would end in a RecursionError deep
inside them. Input is checked here first, iteratively, so that it fails
with one clear message instead. Real manifests nest about 15 levels.

Only the standard library is imported at module level: the API code that
runs inside build roots (osbuild.util.jsoncomm) uses `text_depth`.
"""

import re

MAX_DEPTH = 100

# A JSON string (escapes included).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Brackets of either kind become [ and ]; everything else goes.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")


def depth(value, stop=None):
    """How many levels of objects/arrays `value` has (scalars: 0).

    Counting stops once `stop` is exceeded, so huge input is not walked twice.
    """
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if stop is not None and deepest > stop:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def text_depth(data, stop=None):
    """How deeply the JSON text `data` (bytes or str) nests, without parsing it.

    Brackets inside strings do not count. For text that is not valid JSON
    the answer may be too high, never too low for what a parser would
    accept. Counting stops once `stop` is exceeded.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    brackets = _STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKET)
    level = 0
    # each pass removes the innermost level: empty pairs
    while brackets and (stop is None or level <= stop):
        inner = brackets.replace(b"[]", b"")
        if inner == brackets:        # unbalanced: not JSON
            return level + len(brackets)
        brackets = inner
        level += 1
    return level


def check(value, what, limit=MAX_DEPTH):
    """Raise ValidationError if `value` nests more than `limit` levels."""
    # imported here: the module must stay importable without jsonschema
    from osbuild.meta import ValidationError  # pylint: disable=import-outside-toplevel
    if depth(value, stop=limit) > limit:
        raise ValidationError(f"{what} is nested too deeply (more than {limit} levels)")
