"""The programs' library (osbuild/programs): tree paths, atomic writes, checksums, entry points."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from osbuild.programs import ProgramError, str_list
from osbuild.programs.checksum import HASH_LENGTHS, checksum_error, file_checksum, file_digest
from osbuild.programs.tree import chase, in_tree, read_db, resolve_in_tree, write_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(name="tree")
def tree_fixture(tmp_path):
    """A small root tree with an outside directory beside it."""
    root = tmp_path / "tree"
    (root / "usr/share/zoneinfo/Europe").mkdir(parents=True)
    (root / "usr/share/zoneinfo/Europe/Berlin").write_bytes(b"TZif")
    (root / "etc").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/secret").write_text("host")
    return root


def test_chase_plain_and_relative_links(tree):
    os.symlink("../usr/share/zoneinfo/Europe/Berlin", tree / "etc/localtime")
    os.symlink("Europe", tree / "usr/share/zoneinfo/posix")
    assert chase(str(tree), "etc/localtime") == "/usr/share/zoneinfo/Europe/Berlin"
    assert chase(str(tree), "/usr/share/zoneinfo/posix/Berlin") == \
        "/usr/share/zoneinfo/Europe/Berlin"
    assert chase(str(tree), "/") == "/"
    assert resolve_in_tree(str(tree), "/") == str(tree)


def test_chase_dotdot_stays_in_the_tree(tree):
    assert chase(str(tree), "../../../outside/secret") == "/outside/secret"
    assert chase(str(tree), "/etc/../../..") == "/"
    os.symlink("../../../../../outside", tree / "etc/up")
    assert resolve_in_tree(str(tree), "etc/up/secret") == str(tree / "outside/secret")


def test_chase_absolute_link_starts_at_the_tree_root(tree, tmp_path):
    os.symlink(str(tmp_path / "outside"), tree / "etc/abs")
    assert resolve_in_tree(str(tree), "/etc/abs/secret") == \
        os.path.join(str(tree), str(tmp_path / "outside/secret").lstrip("/"))
    os.symlink("/usr/share/zoneinfo/Europe/Berlin", tree / "etc/localtime")
    assert resolve_in_tree(str(tree), "/etc/localtime") == \
        str(tree / "usr/share/zoneinfo/Europe/Berlin")


def test_chase_link_chain_to_outside_is_contained(tree):
    # a chain of links whose lexical sum climbs out: each `..` is taken at the tree root
    os.symlink("/etc/b", tree / "etc/a")
    os.symlink("../../../..", tree / "etc/b")
    assert chase(str(tree), "etc/a/outside/secret") == "/outside/secret"


def test_chase_loops_are_an_error(tree):
    os.symlink("b", tree / "etc/a")
    os.symlink("a", tree / "etc/b")
    with pytest.raises(ProgramError, match="Too many levels of symbolic links"):
        chase(str(tree), "/etc/a")
    os.symlink(".", tree / "etc/self")
    assert chase(str(tree), "/etc/self/self/self") == "/etc"
    os.symlink("self2/x", tree / "etc/self2")
    with pytest.raises(ProgramError):
        chase(str(tree), "/etc/self2")


def test_chase_follows_at_most_the_kernels_number_of_links(tree):
    # l0 -> l1 -> ... -> l40 -> file: 40 links resolve, 41 are too many (ELOOP)
    (tree / "etc/file").write_text("")
    for i in range(41):
        os.symlink(f"l{i + 1}" if i < 40 else "file", tree / f"etc/l{i}")
    assert chase(str(tree), "/etc/l1") == "/etc/file"
    with pytest.raises(ProgramError, match="Too many levels"):
        chase(str(tree), "/etc/l0")


def test_chase_missing_components_are_kept(tree):
    assert chase(str(tree), "/etc/nothing/here") == "/etc/nothing/here"
    assert chase(str(tree), "/etc/nothing/../x") == "/etc/x"
    (tree / "etc/file").write_text("")
    assert chase(str(tree), "/etc/file/below") == "/etc/file/below"


def test_in_tree_keeps_the_last_link(tree, tmp_path):
    os.symlink(str(tmp_path / "outside"), tree / "etc/dir")
    os.symlink(str(tmp_path / "outside/secret"), tree / "etc/hostname")
    assert in_tree(str(tree), "/etc/hostname") == str(tree / "etc/hostname")
    assert in_tree(str(tree), "/etc/dir/x") == \
        os.path.join(str(tree), str(tmp_path / "outside/x").lstrip("/"))
    write_file(in_tree(str(tree), "/etc/hostname"), "box\n")
    assert (tree / "etc/hostname").read_text() == "box\n"
    assert not (tree / "etc/hostname").is_symlink()
    assert (tmp_path / "outside/secret").read_text() == "host"


def test_write_file_is_atomic_exact_and_creates_the_directory(tmp_path):
    os.umask(0o077)
    try:
        path = tmp_path / "new/dir/file"
        write_file(str(path), "text", mode=0o644)
    finally:
        os.umask(0o022)
    assert path.read_text() == "text"
    assert path.stat().st_mode & 0o7777 == 0o644
    write_file(str(path), b"\0bytes", mode=0o600, uid=os.getuid(), gid=1)
    assert path.read_bytes() == b"\0bytes"
    assert path.stat().st_mode & 0o7777 == 0o600
    assert path.stat().st_gid == 1
    assert os.listdir(tmp_path / "new/dir") == ["file"]


def test_write_file_does_not_write_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "link")
    write_file(str(tmp_path / "link"), "new")
    assert victim.read_text() == "keep"
    assert (tmp_path / "link").read_text() == "new" and not (tmp_path / "link").is_symlink()


def test_write_file_failure_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "old").write_text("old")
    # renaming a file over a non-empty directory fails after the content was written
    (target / "sub").mkdir()
    (target / "sub/x").write_text("")
    with pytest.raises(OSError):
        write_file(str(target / "sub"), "data")
    assert sorted(os.listdir(target)) == ["old", "sub"]
    with pytest.raises(OverflowError):
        write_file(str(target / "f"), "data", uid=os.getuid(), gid=-5)
    assert sorted(os.listdir(target)) == ["old", "sub"]

    # fails after the temporary file was created (no buffer to write)
    with pytest.raises(TypeError):
        write_file(str(target / "g"), 12345)
    assert sorted(os.listdir(target)) == ["old", "sub"]


def test_read_db(tree):
    (tree / "etc/group").write_text("root:x:0:\n+nis\n#c:x:1:\nusers:x:100:a,b\nbroken\n")
    db = read_db(str(tree), "group")
    assert sorted(db) == ["root", "users"] and db["users"][3] == "a,b"
    with pytest.raises(ProgramError, match="no /etc/passwd"):
        read_db(str(tree), "passwd")


def test_str_list():
    assert str_list({}, "k") == []
    assert str_list({"k": ["a"]}, "k") == ["a"]
    for bad in ("a", [""], [1], None, {"a": 1}):
        with pytest.raises(ProgramError, match="'k' must be a list"):
            str_list({"k": bad}, "k")


def test_checksums(tmp_path):
    data = os.urandom(3 << 20 | 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    for algo in HASH_LENGTHS:
        digest = hashlib.new(algo, data).hexdigest()
        assert file_digest(str(path), algo) == digest
        assert file_checksum(str(path), algo) == f"{algo}:{digest}"
        assert checksum_error(f"{algo}:{digest}") is None
        assert "lowercase hex" in checksum_error(f"{algo}:{digest.upper()}")
        assert "lowercase hex" in checksum_error(f"{algo}:{digest[:-1]}")
    assert "unsupported" in checksum_error("md5:" + "0" * 32)
    assert "expected ALGORITHM:HEXDIGEST" in checksum_error("nocolon")
    assert "not a string" in checksum_error(5)


def run_program(source, stdin, name="org.osbuild.probe"):
    """Run a small program using the library under `name`; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-c", source, name], input=stdin, text=True,
                          capture_output=True, check=False, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))


STAGE = """
import sys
sys.argv[0] = sys.argv.pop(1)
from osbuild import programs
def main(tree, options, sources=None):
    if options.get("fail") == "program":
        raise programs.ProgramError("bad thing")
    if options.get("fail") == "os":
        open("/nonexistent/x")
    if options.get("fail") == "type":
        return options["x"] + 1
    print(tree, sorted(options), sources)
    return options.get("rc", 0)
programs.stage(main, "sources")
"""


@pytest.mark.parametrize("options,rc,stdout,stderr", [
    ({}, 0, "/t [] /s\n", ""),
    ({"rc": 3}, 3, "/t ['rc'] /s\n", ""),
    ({"fail": "program"}, 1, "", "org.osbuild.probe: bad thing\n"),
    ({"fail": "os"}, 1, "", "org.osbuild.probe: failed: [Errno 2] No such file or directory: "
                            "'/nonexistent/x'\n"),
    ({"fail": "type", "x": "s"}, 1, "",
     'org.osbuild.probe: invalid options (can only concatenate str (not "int") to str)\n'),
])
def test_stage_entry_point(options, rc, stdout, stderr):
    proc = run_program(STAGE, json.dumps({"tree": "/t", "sources": "/s", "options": options}))
    assert (proc.returncode, proc.stdout, proc.stderr) == (rc, stdout, stderr)


def test_stage_entry_point_bad_input():
    proc = run_program(STAGE, "not json")
    assert proc.returncode == 1 and proc.stderr.startswith("org.osbuild.probe: failed: ")
    assert len(proc.stderr.splitlines()) == 1
    proc = run_program(STAGE, "[1]")
    assert (proc.returncode, proc.stderr) == \
        (1, "org.osbuild.probe: arguments must be a JSON object\n")
    proc = run_program(STAGE, "{}")
    assert (proc.returncode, proc.stderr) == (1, "org.osbuild.probe: failed: 'tree'\n")
    proc = run_program(STAGE, '{"tree": "/t", "options": null}')
    assert (proc.returncode, proc.stdout) == (0, "/t [] None\n")


SOURCE = """
import sys
sys.argv[0] = sys.argv.pop(1)
from osbuild import programs
def main(args):
    what = args.get("what")
    if what == "program":
        raise programs.ProgramError("no such repository")
    if what == "os":
        raise FileNotFoundError(2, "No such file or directory", "/cache/x")
    return {"secrets": {"a": "b"}} if what == "reply" else None
programs.source(main)
"""


@pytest.mark.parametrize("stdin,rc,reply", [
    ('{}', 0, {}),
    ('{"what": "reply"}', 0, {"secrets": {"a": "b"}}),
    ('{"what": "program"}', 1, {"error": "no such repository"}),
    ('{"what": "os"}', 1, {"error": "No such file or directory: /cache/x"}),
    ('nope', 1, {"error": "invalid arguments: Expecting value: line 1 column 1 (char 0)"}),
    ('[]', 1, {"error": "arguments must be a JSON object"}),
])
def test_source_entry_point(stdin, rc, reply):
    proc = run_program(SOURCE, stdin)
    assert proc.returncode == rc and proc.stderr == ""
    assert json.loads(proc.stdout) == reply
