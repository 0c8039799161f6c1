#!/usr/bin/python3
"""Prepare a man page's reStructuredText source for rst2man.

Replaces `@VERSION@` with the version and a line `.. @PROGRAMS@` with a
reference of the stages, assemblers and sources found in LIBDIR, made from
what each program declares (STAGE_DESC, STAGE_INFO, STAGE_OPTS). Standard
library only: it reads the programs with `ast`, like osbuild does.

    mkman.py [--version V] [--libdir DIR] SOURCE.rst > OUT.rst
"""

import argparse
import ast
import json
import os
import re
import sys

KINDS = (("stages", "STAGES"), ("assemblers", "ASSEMBLERS"), ("sources", "SOURCE PROGRAMS"))
_SPECIAL = re.compile(r"([\\*_|`\[\]])")
_ITEM = re.compile(r"^([-*]|\d+\.)\s+(.*)$")


def read_program(path):
    """STAGE_DESC, STAGE_INFO and the parsed STAGE_OPTS of a program (None if missing)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            values[node.targets[0].id] = node.value.value
    opts_text = values.get("STAGE_OPTS", "").strip()
    try:
        opts = json.loads("{" + opts_text + "}") if opts_text else {}
    except ValueError:
        opts = {}
    return values.get("STAGE_DESC", "").strip(), values.get("STAGE_INFO", "").strip(), opts


def inline(text):
    """Markdown-ish text (with `code` spans) as reStructuredText inline markup."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # unbalanced backticks: no code spans
        return _SPECIAL.sub(r"\\\1", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"\\ ``{part}``\\ " if part.strip() else _SPECIAL.sub(r"\\\1", part))
        else:
            out.append(_SPECIAL.sub(r"\\\1", part))
    return "".join(out)


def paragraphs(text):
    """Reflow a STAGE_INFO text: paragraphs joined, `-`, `*`, `1.` lines kept as list items."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        items, para = [], []
        for line in lines:
            item = _ITEM.match(line)
            if item:
                items.append((item.group(1), item.group(2)))
            elif items:
                items[-1] = (items[-1][0], items[-1][1] + " " + line)
            else:
                para.append(line)
        if para:
            out.append(inline(" ".join(para)))
        for marker, item in items:
            out.append(("* " if marker in "-*" else marker + " ") + inline(item))
    return out


def type_of(schema):
    """A short description of a property's JSON type."""
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind:
        return kind
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " or ".join(type_of(s) for s in schema[key] if isinstance(s, dict))
    return "any"


def options_list(opts):
    """The options of a program as a definition list."""
    props = opts.get("properties") or {}
    required = set(opts.get("required") or [])
    lines = []
    for name in sorted(props, key=lambda n: (n not in required, n)):
        prop = props[name] if isinstance(props[name], dict) else {}
        flag = ", required" if name in required else ""
        head = f"``{name}`` ({inline(type_of(prop))}{flag})"
        desc = prop.get("description", "")
        if "default" in prop:
            desc += f" (default: {json.dumps(prop['default'])})"
        lines += [head, "    " + (inline(desc.strip()) or "No description."), ""]
    return lines


def programs_reference(libdir):
    """The reference of all stages, assemblers and sources in `libdir`."""
    lines = []
    for kind, title in KINDS:
        directory = os.path.join(libdir, kind)
        names = sorted(n for n in os.listdir(directory)
                       if n.startswith("org.") and os.path.isfile(os.path.join(directory, n))) \
            if os.path.isdir(directory) else []
        lines += [title, "=" * len(title), ""]
        if not names:
            lines += ["None.", ""]
        for name in names:
            path = os.path.join(directory, name)
            target = os.path.realpath(path)
            desc, info, opts = read_program(target)
            lines += [name, "-" * len(name), ""]
            if os.path.islink(path):
                lines += [f"The same program as **{os.path.basename(target)}**.", ""]
                continue
            if desc:
                lines += [f"*{inline(desc)}*", ""]
            for para in paragraphs(info):
                lines += [para, ""]
            if (opts.get("properties") or {}):
                lines += ["Options:", ""] + options_list(opts)
            elif opts.get("additionalProperties") is False:
                lines += ["Takes no options.", ""]
    return lines


def main(argv):
    """Write the prepared page to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--version", default="")
    parser.add_argument("--libdir", default=".")
    args = parser.parse_args(argv)
    with open(args.source, encoding="utf-8") as f:
        text = f.read()
    out = []
    for line in text.replace("@VERSION@", args.version).splitlines():
        if line.strip() == ".. @PROGRAMS@":
            out += programs_reference(args.libdir)
        else:
            out.append(line)
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
