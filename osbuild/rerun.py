"""Replaying a rebuild that has nothing to build, without loading the engine.

A run that found its result in the store and built nothing records
in `STORE/cache/rerun/<key>.json` what that outcome depended on:

* the command line and working directory (exactly), the environment
  variables osbuild reads (`SOURCE_DATE_EPOCH`), and the interpreter;
* the BLAKE2b digest of the manifest's bytes (a file, or standard input);
* the identity (device, inode, size, mtime and ctime in ns) of every file
  that validation and ids read: the osbuild package, the programs and
  runners the manifest names, the schema (and that the earlier places
  looked up for it are still absent), and jsonschema;
* the object the run found (`refs/<id>`), the refs and source files it
  touched for the cache's LRU clock, and what it printed.

The next identical run (`replay`) checks all of that with stat(2) and one
read of the manifest, touches the same refs and files, and prints the same
result: no jsonschema, ast, engine modules or store lock. A manifest on
standard input is read here and kept (`stdin_bytes`) for the full path.
Anything else (another option, a store with a size limit, a
missing object, a changed file, a store or cache directory that another user
can write) runs the full path, which also records the next memo.
"""

import json
import os
import stat
import sys
import time

try:
    from _blake2 import blake2b   # no OpenSSL load on this path
except ImportError:  # pragma: no cover
    from hashlib import blake2b

FORMAT = 1
DIRNAME = "rerun"
ENVIRONMENT = ("SOURCE_DATE_EPOCH",)
LIMIT_FILE = "cache.json"   # where osbuild.cache saves a size limit: a shrink may be due
DEFAULT_STORE = ".osbuild"
# options that change nothing when nothing is built (other options: full path)
_VALUE_OPTIONS = ("--store", "--libdir", "-l", "--checkpoint", "--max-processes",
                  "--stage-timeout")
_FLAGS = ("--json", "--quiet", "-q")


def file_identity(path):
    """[dev, ino, size, mtime_ns, ctime_ns] of `path`, or None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def digest(data):
    """The hex BLAKE2b-256 of `data`."""
    return blake2b(data, digest_size=32).hexdigest()


def parse(argv):
    """(store, manifest) of a command line made only of the options above, else None."""
    store, manifest, i = DEFAULT_STORE, None, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg in _FLAGS:
            pass
        elif name in _VALUE_OPTIONS and name.startswith("--") and eq:
            store = value if name == "--store" else store
        elif arg in _VALUE_OPTIONS and i + 1 < len(argv):
            i += 1
            store = argv[i] if arg == "--store" else store
        elif arg.startswith("-") and arg != "-" or manifest is not None:
            return None   # another option, or a second operand
        else:
            manifest = arg
        i += 1
    if manifest is None:
        return None
    return store, manifest


# what ObjectStore() leaves 0700 and ours on every open (else it fixes or refuses)
_STORE_DIRS = ("objects", "refs", "tmp", "sources", "index")


def _owned(path, kind, loose):
    """Whether `path` is of `kind` (stat.S_IFDIR/S_IFREG), ours, with no mode bits of `loose`."""
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode) == kind and st.st_uid == os.geteuid() \
        and not st.st_mode & loose


def _private(store, path):
    """Whether the store and the memo at `path` are as the full path leaves them: owned
    by us, not writable by others (a planted or tampered memo is ignored)."""
    dirs = [os.path.join(store, d) for d in _STORE_DIRS + ("cache",)] + [os.path.dirname(path)]
    return _owned(store, stat.S_IFDIR, 0o022) and _owned(path, stat.S_IFREG, 0o077) \
        and all(_owned(d, stat.S_IFDIR, 0o077) for d in dirs)


def memo_path(store, argv, cwd):
    """Where the memo of this command line lives."""
    key = digest(json.dumps([argv, cwd]).encode())
    return os.path.join(store, "cache", DIRNAME, key + ".json")


def environment():
    """The values of the environment variables osbuild reads (None: unset)."""
    return [os.environ.get(name) for name in ENVIRONMENT]


def interpreter():
    """What identifies the running Python."""
    return [sys.executable, sys.version, file_identity(sys.executable)]


def _ref_is_dir(store, object_id):
    ref = os.path.join(store, "refs", object_id)
    return os.path.islink(ref) and os.path.isdir(ref)


def _matches(memo, store, argv, cwd):
    """Whether everything the recorded run depended on is as it was."""
    if memo.get("format") != FORMAT or memo["argv"] != argv or memo["cwd"] != cwd \
            or memo["env"] != environment() or memo["python"] != interpreter():
        return False
    if digest(_manifest_bytes(memo["manifest"])) != memo["digest"]:
        return False
    if any(file_identity(path) != ident for path, ident in memo["files"]):
        return False
    if os.path.lexists(os.path.join(store, LIMIT_FILE)):
        return False
    return _ref_is_dir(store, memo["found"])


_STDIN = []


def _manifest_bytes(path):
    """The manifest's bytes: the file, or all of standard input (kept for the full path)."""
    if path != "-":
        with open(path, "rb") as f:
            return f.read()
    if not _STDIN:
        _STDIN.append(sys.stdin.buffer.read())
    return _STDIN[0]


def stdin_bytes():
    """What `replay` read from standard input (None: nothing, read it yourself)."""
    return _STDIN[0] if _STDIN else None


def replay(argv):
    """Print the recorded result of this command line if nothing it depended on changed.

    Returns the exit status, or None when the full path must run.
    """
    start = time.monotonic()
    parsed = parse(argv)
    if parsed is None:
        return None
    store, _ = parsed
    try:
        cwd = os.getcwd()
        store = os.path.join(cwd, store)
        path = memo_path(store, argv, cwd)
        if not _private(store, path):
            return None
        with open(path, encoding="utf-8") as f:
            memo = json.load(f)
        if not _matches(memo, store, argv, cwd):
            return None
        touch(store, memo["refs"], memo["sources"])
        stdout, stderr, log = memo["stdout"], memo["stderr"], memo["log"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    sys.stderr.write(stderr)
    if log:   # the human log's closing line, as osbuild.monitor.LogMonitor writes it
        from osbuild.monitor import format_duration  # pylint: disable=import-outside-toplevel
        sys.stdout.write(f"\ntotal time: {format_duration(time.monotonic() - start)}\n")
    sys.stdout.write(stdout)
    sys.stdout.flush()
    return 0


def touch(store, ids, source_files):
    """Record a use (osbuild.cache's LRU clock): the refs of `ids` in the store at path
    `store` and the files `source_files` get the time now."""
    now = time.time_ns()
    for object_id in ids:
        try:
            os.utime(os.path.join(store, "refs", object_id), ns=(now, now),
                     follow_symlinks=False)
        except FileNotFoundError:
            pass
    for path in source_files:
        try:
            os.utime(path, ns=(now, now))
        except FileNotFoundError:
            pass


def program_files(pipeline, source_names, libdir, host_runner):
    """The programs and runners `pipeline` (and its build pipelines) and the sources name;
    `host_runner` runs the pipelines that give no runner of their own."""
    paths = [os.path.join(libdir, "sources", name) for name in source_names]
    while pipeline is not None:
        paths.append(os.path.join(libdir, "runners", pipeline.runner or host_runner))
        paths += [os.path.join(libdir, "stages", stage.name) for stage in pipeline.stages]
        if pipeline.assembler is not None:
            paths.append(os.path.join(libdir, "assemblers", pipeline.assembler.name))
        pipeline = pipeline.build
    return paths


def package_files():
    """Every file of the osbuild package this process runs (code and schemas)."""
    root = os.path.dirname(os.path.abspath(__file__))
    found = []
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        found += [os.path.join(top, name) for name in sorted(files)
                  if name.endswith((".py", ".json"))]
    return found


def record(store, argv, memo):
    """Write the memo of `argv` (best effort, atomic); `memo` holds the keys `_matches`,
    `touch` and the replay read besides the command line, environment and interpreter."""
    cwd = os.getcwd()
    store = os.path.join(cwd, store)
    path = memo_path(store, argv, cwd)
    memo = dict(memo, format=FORMAT, argv=argv, cwd=cwd, env=environment(),
                python=interpreter())
    if memo["manifest"] != "-":
        memo["manifest"] = os.path.join(cwd, memo["manifest"])
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        for d in (os.path.dirname(os.path.dirname(path)), os.path.dirname(path)):
            if not _owned(d, stat.S_IFDIR, 0):
                return
            os.chmod(d, 0o700)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
                  encoding="utf-8") as f:
            json.dump(memo, f)
        os.rename(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
