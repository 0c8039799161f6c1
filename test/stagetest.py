"""Helpers for stage tests: a cached Debian base tree, running stages, tree diffs."""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = "/var/cache/osbuild-test"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Extra packages on top of minbase so the configuration stages find the
# tools and data they work with in a real Debian 12 system.
DEBIAN_INCLUDE = ["systemd", "tzdata", "chrony", "passwd", "locales", "kbd"]
# Extra packages for a tree with firewalld (debootstrap does not resolve the
# virtual default-logind; firewalld needs /etc/protocols from netbase).
FIREWALLD_EXTRA = ["libpam-systemd", "netbase", "firewalld"]


def debian_tar(extra=()):
    """Return the path of a cached Debian 12 minbase tarball, building it once.

    Built with `debootstrap --variant=minbase bookworm` plus DEBIAN_INCLUDE
    and the packages in `extra` (each set of extras is its own tarball);
    concurrent callers serialize on a lock file, so it is only built once.
    """
    name = "debian-minbase" + "".join(f"+{p}" for p in extra) + ".tar"
    tar = os.path.join(CACHE_DIR, name)
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(tar + ".lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(tar):
            return tar
        work = tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE_DIR)
        try:
            root = os.path.join(work, "root")
            res = subprocess.run(["debootstrap", "--variant=minbase",
                                  "--include=" + ",".join(DEBIAN_INCLUDE + list(extra)),
                                  "bookworm", root, DEBIAN_MIRROR],
                                 check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
            if res.returncode != 0:
                log = os.path.join(root, "debootstrap", "debootstrap.log")
                tail = ""
                if os.path.exists(log):
                    with open(log, encoding="utf-8", errors="replace") as f:
                        tail = "".join(f.readlines()[-30:])
                raise RuntimeError(f"debootstrap failed ({res.returncode}):\n"
                                   f"{res.stdout[-3000:]}\n{tail}")
            # Drop what only makes the tree large (documentation, message
            # catalogs, package caches) and what debootstrap copies from the
            # host (hostname, resolv.conf).
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                        "usr/share/man", "usr/share/info", "usr/share/locale"):
                path = os.path.join(root, sub)
                for entry in os.listdir(path):
                    p = os.path.join(path, entry)
                    if entry == "locale.alias":   # used by locale-gen
                        continue
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p)
                    else:
                        os.unlink(p)
            for sub in ("etc/hostname", "etc/resolv.conf"):
                if os.path.lexists(os.path.join(root, sub)):
                    os.unlink(os.path.join(root, sub))
            tmp_tar = tar + ".tmp"
            subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", root, "-cf", tmp_tar, "."],
                           check=True)
            os.rename(tmp_tar, tar)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tar


def debian_base_tar():
    """The cached Debian 12 base tarball the configuration stage tests start from."""
    return debian_tar()


TREE_DIFF = os.path.join(REPO, "tools", "tree-diff")
# libdir subdirectories the build needs (the programs that run inside the container)
LIBDIR_PARTS = ("stages", "assemblers", "sources", "runners")


class _Any:
    """Compares equal to anything (for unpredictable values in expected diffs)."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    def __repr__(self):
        return "ANY"


ANY = _Any()


def stage_ids(stages, build_id=None):
    """The ids of `stages` (a list of manifest stage entries), as DESIGN.md 1.3 defines them."""
    ids = []
    base = None
    for entry in stages:
        text = "".join(json.dumps(x, sort_keys=True) for x in
                       (entry["name"], build_id, base, entry.get("options") or {}))
        base = hashlib.sha256(text.encode()).hexdigest()
        ids.append(base)
    return ids


def tree_diff(tree1, tree2):
    """Run tools/tree-diff on two trees and return the parsed JSON."""
    res = subprocess.run([TREE_DIFF, tree1, tree2], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise AssertionError(f"tree-diff failed: {res.stderr}")
    return json.loads(res.stdout)


def sha256(data):
    """Hex SHA-256 of text or bytes."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


def file_attrs(content, mode="0644", uid=0, gid=0):
    """tree-diff attributes of a regular file with `content`."""
    return {"type": "file", "mode": mode, "uid": uid, "gid": gid, "sha256": sha256(content)}


def dir_attrs(mode="0755", uid=0, gid=0):
    """tree-diff attributes of a directory."""
    return {"type": "dir", "mode": mode, "uid": uid, "gid": gid}


def link_attrs(target, uid=0, gid=0):
    """tree-diff attributes of a symbolic link."""
    return {"type": "symlink", "mode": "0777", "uid": uid, "gid": gid, "target": target}


def read(tree, path):
    """Text content of the tree's absolute path `path`."""
    with open(os.path.join(tree, path.lstrip("/")), encoding="utf-8") as f:
        return f.read()


def content_change(base, path, new_content):
    """The tree-diff 'differences' entry of a file whose content became `new_content`."""
    with open(os.path.join(base, path.lstrip("/")), "rb") as f:
        old = f.read()
    return {"sha256": [sha256(old), sha256(new_content)]}


def assert_diff(diff, added=None, deleted=None, changed=None):
    """Assert that a tree-diff result is exactly the expected one (with readable output)."""
    expected = {"added_files": added or {}, "deleted_files": deleted or {},
                "differences": changed or {}}
    for key, want in expected.items():
        got = diff[key]
        assert sorted(got) == sorted(want), \
            f"{key}: paths differ: unexpected {sorted(set(got) - set(want))}, " \
            f"missing {sorted(set(want) - set(got))}"
        for path in want:
            assert got[path] == want[path], f"{key} {path}: got {got[path]}, want {want[path]}"


def make_libdir(dest, tars=None):
    """A libdir for builds that also holds base tarballs (default: the Debian base tar).

    The build root only sees the libdir (at /run/osbuild/lib), so the cached
    tarballs are placed in its data/ (hard-linked when possible) beside
    hard-linked copies of the checkout's programs.
    """
    os.makedirs(dest, exist_ok=True)
    for part in LIBDIR_PARTS:
        src = os.path.join(REPO, part)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, part), symlinks=True,
                            copy_function=_link_or_copy)
    os.symlink(os.path.join(REPO, "osbuild"), os.path.join(dest, "osbuild"))
    data = os.path.join(dest, "data")
    os.makedirs(data)
    for tar in tars or [debian_base_tar()]:
        _link_or_copy(tar, os.path.join(data, os.path.basename(tar)))
    return dest


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def base_stages(tar=None):
    """Stages that unpack a cached tarball (from the libdir's data/) into the empty tree.

    The tarball's size and mtime are part of the options, so a rebuilt
    tarball gives the stage a new id.
    """
    tar = tar or debian_base_tar()
    name = os.path.basename(tar)
    st = os.stat(tar)
    return [{
        "name": "org.osbuild.script",
        "options": {
            "chroot": False,
            # stages cannot create device nodes: debootstrap's /dev stays out
            "script": f"tar --numeric-owner --xattrs -xpf /run/osbuild/lib/data/{name} "
                      f"-C \"$TREE\" --exclude='./dev/*'  # {st.st_size}-{int(st.st_mtime)}"
        }
    }]


def run_stage_direct(name, tree, options, sources="/nonexistent"):
    """Run stages/<name> on `tree` directly on the host (no container)."""
    path = os.path.join(REPO, "stages", name)
    args = json.dumps({"tree": tree, "sources": sources, "options": options})
    return subprocess.run([path], input=args, capture_output=True, text=True, check=False)


def unpack_base(dest):
    """Unpack the cached Debian tree into `dest` (for direct runs)."""
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "-xpf", debian_base_tar(), "-C", dest],
                   check=True)
    return dest


def load_stage_schema(name):
    """The full JSON schema of stages/<name> (read by osbuild's program index, never imported)."""
    from osbuild import meta  # pylint: disable=import-outside-toplevel
    return meta.index(REPO).get("stages", name).schema


if __name__ == "__main__":
    print(debian_base_tar())
    sys.exit(0)
