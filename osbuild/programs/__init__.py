"""The library of the programs: stages, assemblers and sources.

A program is a standalone executable; what programs share lives here, never
copied between them. Stages and assemblers run inside the build root, which
puts the host's `osbuild` package on `PYTHONPATH`; sources run on the host.
This package imports only the standard library (and `osbuild` modules that
do the same), so it works with the build root's python.

The entry points read the program's JSON arguments from stdin, call its
`main` and turn the one error type, `ProgramError`, into a one-line message
and exit status 1:

    def main(tree, options):
        ...
        return 0

    if __name__ == "__main__":
        programs.stage(main)
"""

import json
import os
import sys

__all__ = ["ProgramError", "arguments", "assembler", "run_tool", "source", "stage", "str_list"]


class ProgramError(Exception):
    """A problem with the options, the tree or a tool; the message is shown to the user."""


def name():
    """The program's name (`org.osbuild.hostname`), from the path it was started by."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "program"


def arguments(stream=None):
    """The program's arguments: the JSON object on stdin (or `stream`)."""
    args = json.load(sys.stdin if stream is None else stream)
    if not isinstance(args, dict):
        raise ProgramError("arguments must be a JSON object")
    return args


def options(args):
    """`args["options"]`, with an absent or null value meaning no options."""
    return args.get("options") or {}


def _run(call, errors):
    """Call `call()`; a failure becomes one line on stderr and exit status 1."""
    prog = name()
    try:
        sys.exit(call())
    except (ProgramError, *errors) as e:
        print(f"{prog}: {e}", file=sys.stderr)
    except (OSError, ValueError, KeyError) as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
    except (TypeError, AttributeError) as e:
        print(f"{prog}: invalid options ({e})", file=sys.stderr)
    sys.exit(1)


def stage(main, *extra, errors=()):
    """Run a stage: `main(tree, options, *[args[key] for key in extra])`.

    Its return value is the exit status. `ProgramError` and the exception
    types in `errors` are shown as `NAME: MESSAGE`, operating-system and
    value errors as `NAME: failed: MESSAGE`; either way exit status 1.
    """
    os.umask(0o022)

    def call():
        args = arguments()
        return main(args["tree"], options(args), *(args.get(key) for key in extra))
    _run(call, errors)


def assembler(main, errors=()):
    """Run an assembler: `main(tree, output_dir, options)`, errors as in `stage`."""
    os.umask(0o022)

    def call():
        args = arguments()
        return main(args["tree"], args["output_dir"], options(args))
    _run(call, errors)


def source(main):
    """Run a source program: `main(args)` returns its reply (None for `{}`).

    The reply, or `{"error": MESSAGE}` with exit status 1, is printed on
    stdout as one JSON object, which is what the host reads.
    """
    try:
        reply = main(arguments())
    except ValueError as e:
        reply, status = {"error": f"invalid arguments: {e}"}, 1
    except ProgramError as e:
        reply, status = {"error": str(e)}, 1
    except OSError as e:
        reply, status = {"error": f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")}, 1
    else:
        status = 0
    print(json.dumps(reply or {}))
    sys.exit(status)


def str_list(opts, key):
    """`opts[key]` as a list of non-empty strings (`[]` when absent)."""
    value = opts.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ProgramError(f"'{key}' must be a list of non-empty strings")
    return value


def run_tool(argv):
    """Run a command, print its output; raise `ProgramError` with that output if it fails."""
    # imported here: most programs never run a tool through this
    import subprocess  # pylint: disable=import-outside-toplevel
    res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, check=False)
    if res.returncode != 0:
        msg = " ".join(res.stdout.split()) or f"exit status {res.returncode}"
        raise ProgramError(f"{os.path.basename(argv[0])} failed: {msg}")
    if res.stdout:
        print(res.stdout, end="")
