"""Command line: parse, load, run, print (DESIGN 1.1)."""

# Ctrl-C before main() is reached (while the modules below load) must not
# print a traceback: exit 130 with one line. main() takes over from here.
# Only when this is the program (python3 -m osbuild, or the `osbuild` entry
# point): a process that merely imports the module keeps its own handler.
# osbuild/__init__.py has already done so when it saw the command line.
import os
import sys

import osbuild

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "osbuild":
    osbuild.catch_early_interrupts()
    from osbuild import rerun as _rerun  # a rebuild with nothing to build ends here
    _STATUS = _rerun.replay(sys.argv[1:])
    if _STATUS is not None:
        sys.exit(_STATUS)

# pylint: disable=wrong-import-position,wrong-import-order
import argparse
import functools
import json
import signal

from osbuild import __version__, debugshell, metacache
from osbuild import cache
from osbuild import monitor
from osbuild.formats import v1
from osbuild.manifest import host_runner, validate
from osbuild.meta import ValidationError, index
from osbuild.monitor import LogMonitor, MonitorError, Monitors
from osbuild.objectstore import ObjectStore, StoreError
from osbuild.pipeline import BuildContext
from osbuild.util import nesting, strictjson
from osbuild.util.pidlimit import DEFAULT_MAX_PROCESSES

DEFAULT_LIBDIR = "/usr/lib/osbuild"


class UsageError(Exception):
    """Bad command-line input (a file that is missing or malformed, …)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors (so --json can report them)."""

    def error(self, message):
        raise UsageError(f"{message} (see osbuild --help)")


def parse_args(argv):
    """Parse the command line."""
    parser = _Parser(
        prog="osbuild", description="Build operating-system images from a JSON manifest.")
    parser.add_argument("manifest", metavar="MANIFEST", nargs="?",
                        help="the manifest (JSON file), or - to read it from stdin")
    parser.add_argument("--store", metavar="DIR", default=".osbuild",
                        help="directory of the object store (default: .osbuild)")
    parser.add_argument("-l", "--libdir", metavar="DIR", default=DEFAULT_LIBDIR,
                        help="directory holding stages/ assemblers/ sources/ runners/ "
                             f"(default: {DEFAULT_LIBDIR})")
    parser.add_argument("--sources", metavar="FILE",
                        help="JSON file of source options; overrides the manifest's sources")
    parser.add_argument("--secrets", metavar="FILE",
                        help="JSON file of secrets handed to source programs")
    parser.add_argument("--build-env", metavar="FILE",
                        help='JSON {"runner": NAME, "pipeline": {...}} used as the innermost '
                             "build pipeline")
    parser.add_argument("--checkpoint", metavar="ID", action="append", default=[],
                        help="commit the tree after the stages with this id or name to the "
                             "store (a glob: '*' is every stage; repeatable)")
    parser.add_argument("--output-directory", metavar="DIR",
                        help="also place the assembler's output in DIR")
    parser.add_argument("--export", metavar="ID", action="append", default=[],
                        help="copy the object ID (a stage's tree, or the assembler's output) "
                             "to DIR/ID of --output-directory (repeatable)")
    parser.add_argument("--break", metavar="STAGE", dest="breaks", action="append",
                        nargs="?", const="*", default=[],
                        help="before the stages with this name or id (a glob; bare: '*', "
                             "every stage and the assembler) run, open a shell in their build "
                             "root reading commands from stdin (repeatable)")
    parser.add_argument("--break-on-failure", action="store_true",
                        help="when a stage or the assembler fails, open a shell in its build "
                             "root with the tree as it left it, then fail")
    parser.add_argument("--stage-timeout", metavar="SECONDS",
                        help="stop a stage or the assembler that runs longer than this, "
                             "and fail")
    parser.add_argument("--max-processes", metavar="N", default=str(DEFAULT_MAX_PROCESSES),
                        help="most processes (and threads) one program's build root may have "
                             f"at a time, 0 for no limit (default: {DEFAULT_MAX_PROCESSES})")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON result object instead of the human log")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print only errors and the final ids (no stage headers and output)")
    parser.add_argument("--monitor", metavar="NAME",
                        help="write machine-readable progress records; NAME is JSONSeqMonitor "
                             "(RFC 7464, see osbuild(1)); needs --monitor-fd")
    parser.add_argument("--monitor-fd", metavar="FD", type=_fd,
                        help="the open file descriptor --monitor writes to")
    parser.add_argument("--inspect", action="store_true",
                        help="print the manifest with the ids of all stages and the assembler "
                             "filled in, without building")
    parser.add_argument("--remote", metavar="s3://BUCKET/PREFIX",
                        help="share trees, outputs and source files with other build hosts "
                             "through this S3 bucket (needs boto3)")
    parser.add_argument("--cache-max-size", metavar="SIZE",
                        help="after the build, evict least recently used objects and source "
                             "files until the store fits SIZE (bytes, or with a unit: 500MB, "
                             "20GiB; or 'unlimited'); the store remembers it")
    parser.add_argument("--gc", action="store_true",
                        help="shrink the store to --cache-max-size (or its saved limit) "
                             "without building; takes no MANIFEST")
    parser.add_argument("--version", action="version", version=f"osbuild {__version__}")
    args = parser.parse_args(argv)
    if args.gc and args.manifest is not None:
        raise UsageError("--gc takes no MANIFEST (see osbuild --help)")
    if not args.gc and args.manifest is None:
        hint = ""
        if args.breaks and args.breaks[-1] != "*":
            hint = (f"; --break took {args.breaks[-1]!r} as the STAGE: write --break=STAGE, "
                    "or '--break --' before the manifest")
        raise UsageError(f"the following arguments are required: MANIFEST{hint} "
                         "(see osbuild --help)")
    return args


def _fd(text):
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a file descriptor number")
    return int(text)


def make_monitor(args):
    """The monitors the command line asks for: the human log (unless --json) and --monitor."""
    monitors = []
    if not args.json:
        monitors.append(LogMonitor(quiet=args.quiet))
    if args.monitor is not None or args.monitor_fd is not None:
        if args.monitor is None:
            raise UsageError("--monitor-fd needs --monitor JSONSeqMonitor")
        monitors.append(monitor.make(args.monitor, args.monitor_fd))
    return Monitors(monitors)


def stdin_manifest():
    """Standard input's bytes (what osbuild.rerun read of it already, if it did)."""
    rerun = sys.modules.get("osbuild.rerun")
    data = rerun.stdin_bytes() if rerun else None
    if data is not None:
        return data
    stream = sys.stdin
    return stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode()


def read_json(path, what, raw=None):
    """Read a JSON file (or stdin for '-'), naming it in errors; `raw` (a list) gets
    the file's bytes."""
    try:
        if path == "-":
            data = stdin_manifest()
            path = "<stdin>"
        else:
            with open(path, "rb") as f:
                data = f.read()
        if raw is not None:
            raw.append(data)
        text = data.decode("utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text: {e.reason}") from None
    try:
        value = strictjson.loads(text)
    except ValueError as e:
        raise UsageError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        value = None  # deeper than the json module can go: reported below
    if value is None and text.strip() != "null" or \
            nesting.depth(value, stop=nesting.MAX_DEPTH) > nesting.MAX_DEPTH:
        raise UsageError(f"{what} {path} is nested too deeply "
                         f"(more than {nesting.MAX_DEPTH} levels)")
    try:
        strictjson.check(value, "" if what == "manifest" else what.split()[0])
    except ValidationError as e:
        raise UsageError(f"{what} {path}: {e}") from None
    return value


def read_object(path, what):
    """Read a JSON file that must hold an object."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise UsageError(f"{what} {path}: expected a JSON object")
    return value


def human_result(result):
    """The closing lines of the human log."""
    if not result["success"]:
        return "Failed\n"
    return "".join(f"{name} id: {result[key]}\n" for name, key in
                   (("tree", "tree_id"), ("output", "output_id")) if result.get(key))


def print_human(result):
    """Print the closing lines of the human log."""
    sys.stdout.write(human_result(result))
    sys.stdout.flush()


def open_remote(args):
    """The --remote bucket (None without one, or when it cannot be used)."""
    if not args.remote:
        return None
    from osbuild import remote as remote_store  # pylint: disable=import-outside-toplevel
    return remote_store.open_remote(args.remote)


def share(remote, store, pipeline, checkpoints, result):
    """After a successful build, push its checkpoints, trees and output to the remote."""
    if remote is not None and result.success:
        from osbuild import remote as remote_store  # pylint: disable=import-outside-toplevel
        remote.push(store, remote_store.shared_ids(pipeline, set(checkpoints)))


def parse_max_processes(text):
    """The value of --max-processes: a count (0: no limit)."""
    if not (text.isascii() and text.isdigit()) or int(text) != 0 and \
            not 16 <= int(text) <= 4194304:
        raise UsageError(f"--max-processes {text[:40]!r}: expected 0 (no limit) or a number "
                         "of processes from 16 to 4194304")
    return int(text)


def select_checkpoints(pipeline, patterns):
    """The stage ids that the --checkpoint globs select (by id or by name).

    A pattern without glob characters that selects nothing is an error, as
    in the original osbuild; a glob that selects nothing is only a warning."""
    stages = pipeline.all_stages()
    ids = []
    for pattern in patterns:
        found = [s.id for s in stages if debugshell.matches(pattern, s)]
        if not found:
            if not any(c in pattern for c in "*?["):
                raise UsageError(f"checkpoint {pattern!r} matches no stage of the manifest")
            print(f"osbuild: warning: checkpoint {pattern!r} matches no stage of the manifest",
                  file=sys.stderr)
        ids += found
    return list(dict.fromkeys(ids))


def check_exports(pipeline, args):
    """Refuse --export ids the manifest does not build, and --export without a directory."""
    if not args.export:
        return
    if not args.output_directory:
        raise UsageError("--export needs --output-directory (where the objects are copied)")
    known = {s.id for s in pipeline.all_stages()}
    p = pipeline
    while p is not None:
        known.update(i for i in (p.output_id,) if i)
        p = p.build
    for object_id in args.export:
        if object_id not in known:
            raise UsageError(f"--export {object_id[:100]!r} is not the id of a stage or an "
                             "assembler of the manifest (see --inspect)")


def parse_timeout(text):
    """The value of --stage-timeout: seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 10 ** 9:
        raise UsageError(f"--stage-timeout {text[:40]!r}: expected a number of seconds "
                         "greater than 0")
    return value


def make_debug(pipeline, args):
    """The --break, --break-on-failure and --stage-timeout choices (None without them)."""
    timeout = parse_timeout(args.stage_timeout) if args.stage_timeout is not None else None
    if not (args.breaks or args.break_on_failure or timeout):
        return None
    if (args.breaks or args.break_on_failure) and args.manifest == "-":
        raise UsageError("--break and --break-on-failure read the shell's commands from stdin, "
                         "so the manifest cannot come from stdin (-): pass it as a file")
    steps = pipeline.all_stages() + pipeline.all_assemblers()
    try:
        debug = debugshell.Debug(args.breaks, args.break_on_failure, timeout,
                                 output_fd=2 if args.json else 1)
    except debugshell.DebugError as e:
        raise UsageError(str(e)) from None
    for pattern in debug.unmatched(steps):
        raise UsageError(f"--break {pattern[:100]!r} matches no stage or assembler of the "
                         "manifest (a name, an id or a glob)")
    return debug


def copy_results(store, pipeline, args, result):
    """After a successful build: the output and the --export objects into
    --output-directory; returns the paths written (a failure fails `result`)."""
    copied = []
    if result.success and args.output_directory:
        # pylint: disable-next=import-outside-toplevel
        from osbuild.output import OutputError, copy_output, export_object
        try:
            if pipeline.output_id:
                copied = copy_output(store, pipeline.output_id, args.output_directory)
            for object_id in dict.fromkeys(args.export):
                copied.append(export_object(store, object_id, args.output_directory))
        except OutputError as e:
            print(f"osbuild: {e}", file=sys.stderr)
            result.failed = True
    return copied


def print_json(value, indent=None):
    """Print `value` as one strict JSON document (never NaN or Infinity)."""
    sys.stdout.write(json.dumps(value, indent=indent, allow_nan=False) + "\n")
    sys.stdout.flush()


def parse_cache_max_size(text):
    """The value of --cache-max-size: bytes, None for unlimited; "keep" when not given."""
    if text is None:
        return "keep"
    try:
        return cache.parse_size(text)
    except cache.SizeError as e:
        raise UsageError(f"--cache-max-size: {e}") from None


def store_limit(store, wanted):
    """The store's limit: `wanted` (then saved) or the one it remembers."""
    if wanted == "keep":
        return cache.read_limit(store)
    cache.save_limit(store, wanted)
    return wanted


def collect(store, limit, lease, quiet):
    """After a build: record its use, then evict down to `limit` (warnings only)."""
    lease.touch()
    if limit is None:
        return
    try:
        report = cache.shrink(store, limit, own_lease=lease)
    except StoreError as e:
        print(f"osbuild: warning: {e}", file=sys.stderr)
        return
    if report.over:
        print(f"osbuild: warning: the store holds {cache.format_size(report.size)}, more than "
              f"its limit of {cache.format_size(limit)}: what running builds (this one "
              "included) use is kept", file=sys.stderr)
    if not quiet and (report.objects or report.sources):
        print(report.summary())


def gc(args):
    """--gc: shrink the store without building."""
    wanted = parse_cache_max_size(args.cache_max_size)
    if not os.path.isdir(args.store):
        raise UsageError(f"store {args.store} does not exist")
    store = ObjectStore(args.store)
    limit = store_limit(store, wanted)
    if limit is None and wanted == "keep":
        raise UsageError("--gc needs --cache-max-size SIZE (the store has no saved limit)")
    report = cache.shrink(store, limit)
    if args.json:
        print_json(dict(report.as_dict(), success=True))
    else:
        print(report.summary())
    return 0


def run(args, monitors):
    """Do what the command line asks; returns the exit status."""
    if args.gc:
        return gc(args)
    max_size = parse_cache_max_size(args.cache_max_size)
    raw = []
    desc = read_json(args.manifest, "manifest", raw)
    metacache.use_store(args.store)
    manifest = v1.load(desc, args.libdir, os.environ)
    for warning in manifest.warnings:
        print(f"osbuild: warning: {warning}", file=sys.stderr)
    pipeline = manifest.pipeline
    if args.build_env:
        v1.attach_build_env(read_json(args.build_env, "build environment"), pipeline,
                            f"build environment {args.build_env}", args.libdir, os.environ)
    sources = read_object(args.sources, "sources file") if args.sources else manifest.sources
    secrets = read_object(args.secrets, "secrets file") if args.secrets else None
    libdir = os.path.abspath(args.libdir)
    if not os.path.isdir(os.path.join(libdir, "stages")):
        raise UsageError(f"libdir {libdir} has no stages/ directory (use --libdir)")
    validate(pipeline, libdir, "pipeline" if "pipeline" in desc else "")
    for name, opts in sources.items():
        index(libdir).get("sources", name).validate(
            {} if opts is None else opts, f"sources.{name}")
    if args.inspect:
        print_json(v1.inspect(pipeline, sources), indent=2)
        return 0
    runner = host_runner(libdir)
    checkpoints = select_checkpoints(pipeline, args.checkpoint)
    check_exports(pipeline, args)
    debug = make_debug(pipeline, args)
    max_processes = parse_max_processes(args.max_processes)
    remote = open_remote(args)
    store = ObjectStore(args.store)
    metacache.save()
    limit = store_limit(store, max_size)
    lease = cache.Lease(store, cache.pipeline_ids(pipeline), cache.checksums_in(desc, sources))
    try:
        ctx = BuildContext(store, libdir, sources, secrets, monitor=monitors,
                           checkpoints=checkpoints, remote=remote,
                           max_processes=max_processes, debug=debug,
                           exports=set(args.export) - {pipeline.output_id})
        monitors.begin(pipeline.steps_to_run(ctx))
        result = pipeline.run(ctx, runner)
        share(remote, store, pipeline, checkpoints, result)
        copied = copy_results(store, pipeline, args, result)
        collect(store, limit, lease, args.json or args.quiet)
    finally:
        lease.release()
    monitors.finish(result)
    if args.json:
        print_json(result.as_dict())
    else:
        print_human(result.as_dict())
        for path in copied:
            print(f"output: {path}")
    remember(args, (store, limit), (desc, raw[0] if raw else None), manifest, sources,
             (libdir, runner), result)
    return 0 if result.success else 1


def remember(args, store_and_limit, manifest_read, manifest, sources, programs, result):
    """Record a run that built nothing, for `rerun.replay` (see osbuild/rerun.py).

    `store_and_limit`: (ObjectStore, its size limit); `manifest_read`: (the manifest's
    JSON value, its file's bytes); `programs`: (libdir, the host's runner).
    """
    from osbuild import rerun, schema  # pylint: disable=import-outside-toplevel
    (store, limit), (desc, data), (libdir, runner) = store_and_limit, manifest_read, programs
    done = result.as_dict()
    pipeline = manifest.pipeline
    wanted = pipeline.output_id if pipeline.assembler else pipeline.tree_id
    built_nothing = done["success"] and not done["stages"] and "assembler" not in done
    plain_run = data is not None and limit is None and rerun.parse(args.argv) is not None
    if not (built_nothing and plain_run and wanted and store.contains(wanted)):
        return
    files = rerun.package_files() + rerun.program_files(pipeline, sources, libdir, runner)
    files += schema.schema_paths(libdir) + ["/etc/os-release", "/usr/lib/os-release"]
    if metacache.jsonschema_origin():
        files.append(metacache.jsonschema_origin())
    checksums = cache.checksums_in(desc, sources)
    rerun.record(args.store, args.argv, {
        "manifest": args.manifest, "digest": rerun.digest(data),
        "files": [[path, rerun.file_identity(path)] for path in files],
        "found": wanted, "refs": cache.pipeline_ids(pipeline),
        "sources": cache.source_paths(store, checksums),
        "stdout": json.dumps(done, allow_nan=False) + "\n" if args.json else human_result(done),
        "log": not (args.json or args.quiet),
        "stderr": "".join(f"osbuild: warning: {w}\n" for w in manifest.warnings)})


def fail(message, as_json, status=1, monitors=None):
    """Report an error as one line on stderr (and, with --json, a JSON result on stdout)."""
    print(f"osbuild: {message}", file=sys.stderr)
    if as_json:
        print_json({"success": False, "error": message})
    for m in monitors.monitors if monitors else ():
        if isinstance(m, monitor.JSONSeqMonitor):
            m.error(message)
    return status


def _reported_errors():
    """The errors reported as their message alone."""
    # imported here, not at the top: a warm rebuild never loads these modules
    # pylint: disable=import-outside-toplevel
    from osbuild.buildroot import BuildRootError
    from osbuild.remote import RemoteError
    return (UsageError, ValidationError, StoreError, BuildRootError, MonitorError, RemoteError)


def _redeliver_interrupts(unraisable, otherwise=sys.__unraisablehook__):
    """A sys.unraisablehook: a KeyboardInterrupt that landed where Python cannot
    raise it (a weakref callback of the import system, a __del__) is not lost
    but delivered again from another thread, once the callback has returned
    (delivered from here, it would land in this hook and be dropped again).
    Anything else goes to `otherwise`."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        import _thread  # pylint: disable=import-outside-toplevel
        import threading  # pylint: disable=import-outside-toplevel
        again = threading.Timer(0.001, _thread.interrupt_main)
        again.daemon = True
        again.start()
    else:
        otherwise(unraisable)


def main(argv=None):
    """Entry point of the `osbuild` command."""
    argv = sys.argv[1:] if argv is None else argv
    # --json before parsing: a command-line error is also reported as JSON
    as_json = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    previous = signal.getsignal(signal.SIGINT)
    previous_hook = sys.unraisablehook
    monitors = None
    try:
        try:
            sys.unraisablehook = functools.partial(_redeliver_interrupts, otherwise=previous_hook)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt now
            args = parse_args(argv)
            args.argv = list(argv)
            monitors = make_monitor(args)
            return run(args, monitors)
        finally:
            # as the program, a second Ctrl-C while reporting must not print a
            # traceback either; a caller in the same process gets its handler back
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
            sys.unraisablehook = previous_hook
    except KeyboardInterrupt:
        if as_json:
            print_json({"success": False, "error": "interrupted"})
        os.write(2, b"\nosbuild: interrupted\n")
        return 130
    except _reported_errors() as e:
        return fail(str(e), as_json, monitors=monitors)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return fail(f"{e.strerror or e}{where}", as_json, monitors=monitors)
    except Exception as e:  # pylint: disable=broad-exception-caught
        if os.environ.get("OSBUILD_DEBUG"):
            raise
        return fail(f"internal error: {type(e).__name__}: {e} "
                    "(set OSBUILD_DEBUG=1 for a traceback)", as_json, monitors=monitors)


if __name__ == "__main__":
    sys.exit(main())
