"""A bound on how deeply JSON input may nest.

Python's json module, jsonschema and the loader all recurse per level, so a
document nested thousands of levels deep would end in a RecursionError deep
inside them. Input is checked here first, iteratively, so that it fails
with one clear message instead. Real manifests nest about 15 levels.
"""

from osbuild.meta import ValidationError

MAX_DEPTH = 100


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


def check(value, what, limit=MAX_DEPTH):
    """Raise ValidationError if `value` nests more than `limit` levels."""
    if depth(value, stop=limit) > limit:
        raise ValidationError(f"{what} is nested too deeply (more than {limit} levels)")
