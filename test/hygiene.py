"""Checks that builds leave nothing behind, and that a store is consistent.

Used by the robustness, concurrency and sandbox tests: no mount under a
directory or /run/osbuild, no loop device backed by a file under a
directory, no process whose command line mentions a directory; and every
entry of a store's objects/ and refs/ is complete.
"""

import glob
import os
import re
import time

import pytest

from osbuild.treesum import treesum

RUNTIME_DIR = "/run/osbuild"
_ID = re.compile(r"^[0-9a-f]{64}$")


def _unescape(path):
    """Undo mountinfo's octal escapes (\\040 for a space, ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _under(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def mounts_under(*roots):
    """Mount points (in this mount namespace) at or below any of `roots`."""
    roots = [os.path.realpath(r) for r in roots]
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if _under(point, roots):
                found.append(point)
    return found


def loops_backed_under(*roots, markers=()):
    """Loop devices whose backing file is at or below any of `roots` or mentions a marker.

    A device attached for a container shows the container's path of the file
    (e.g. /run/osbuild/output/...), hence the markers (unique file names).
    """
    roots = [os.path.realpath(r) for r in roots]
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing, encoding="utf-8") as f:
                path = f.read().strip()
        except OSError:
            continue
        if _under(path.removesuffix(" (deleted)"), roots) or any(m in path for m in markers):
            found.append(f"{backing.split('/')[3]} -> {path}")
    return found


def processes_mentioning(text):
    """(pid, command line) of processes other than this one whose argv contains `text`."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").replace("\0", " ")
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in argv and state != "Z":
            found.append((int(entry), argv.strip()))
    return found


def leftovers(directory, markers=(), timeout=10):
    """What builds under `directory` left behind; waits up to `timeout` s for processes.

    Processes count when their command line mentions `directory` (osbuild,
    nspawn) or one of `markers` (unique strings in a stage's script: the
    processes inside a container see other paths).
    """
    directory = os.path.realpath(str(directory))
    deadline = time.monotonic() + timeout
    while True:
        procs = [p for text in (directory, *markers) for p in processes_mentioning(text)]
        if not procs or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    problems = {}
    if procs:
        problems["processes"] = procs
    mounts = mounts_under(directory, RUNTIME_DIR)
    if mounts:
        problems["mounts"] = mounts
    loops = loops_backed_under(directory, markers=markers)
    if loops:
        problems["loop devices"] = loops
    return problems


def open_fds():
    """The number of file descriptors open in this process."""
    return len(os.listdir("/proc/self/fd"))


def check_store(store):
    """Assert that every entry under objects/ and refs/ is complete.

    objects/<name> must be a directory whose tree hashes to `name` (so a
    partially written tree cannot hide there); refs/<id> must be a symlink to
    ../objects/<name> of an existing object. Returns (objects, refs).
    """
    store = str(store)
    objects_dir = os.path.join(store, "objects")
    refs_dir = os.path.join(store, "refs")
    objects = sorted(os.listdir(objects_dir)) if os.path.isdir(objects_dir) else []
    refs = sorted(os.listdir(refs_dir)) if os.path.isdir(refs_dir) else []
    for name in objects:
        path = os.path.join(objects_dir, name)
        assert _ID.match(name), f"odd entry objects/{name}"
        assert os.path.isdir(path) and not os.path.islink(path), f"objects/{name} is no directory"
        assert treesum(path) == name, f"objects/{name} is incomplete or modified"
    for name in refs:
        path = os.path.join(refs_dir, name)
        assert _ID.match(name), f"odd entry refs/{name}"
        assert os.path.islink(path), f"refs/{name} is not a symlink"
        target = os.readlink(path)
        assert target.startswith("../objects/"), f"refs/{name} -> {target}"
        assert os.path.basename(target) in objects, f"refs/{name} -> {target} dangles"
    return objects, refs


@pytest.fixture(name="no_leftovers", autouse=True)
def no_leftovers_fixture(tmp_path):
    """Autouse in every module that imports it: after each test, no process, mount
    or loop device of the test's builds (under its tmp_path) is left."""
    yield
    problems = leftovers(tmp_path)
    assert problems == {}, f"the test left {problems}"
