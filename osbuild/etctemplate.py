"""The build root's /etc, made by the host before any program runs.

Without a build pipeline the build root is the host itself, but its /etc is
never shown to programs: only an allow-list of public files the tools need
(linker cache, alternatives, name-service and TLS trust configuration,
package-manager configuration, ...) is copied, and only what is readable
by everybody; passwd and group lose their password fields. With a build
pipeline the build tree's /etc (made by the manifest) is copied whole, but
the directory is checked and opened without following symlinks, so a tree
whose `etc` points elsewhere on the host gets an empty /etc instead.

The copy is a template: the runner's set-up (ldconfig, sysusers, ...) runs
once in it, then every program gets it read-only.
"""

import os
import stat
import subprocess

# Paths below the host's /etc that a build root may see (names or prefixes
# ending in "*"). Everything else, secrets and host identity included, stays out.
HOST_ALLOW = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
    "nsswitch.conf", "passwd", "group", "hosts", "host.conf", "gai.conf", "resolv.conf",
    "protocols", "services", "shells", "login.defs", "mtab", "filesystems",
    "ssl/certs", "ssl/openssl.cnf", "ca-certificates", "ca-certificates.conf",
    "pki/ca-trust", "pki/tls/certs", "pki/tls/openssl.cnf", "pki/rpm-gpg", "crypto-policies",
    "os-release", "debian_version", "lsb-release", "redhat-release", "fedora-release",
    "system-release", "system-release-cpe", "localtime", "timezone", "locale.alias",
    "locale.conf", "python3*", "dpkg", "apt", "rpm", "dnf", "yum", "yum.conf",
    "yum.repos.d", "mke2fs.conf", "xattr.conf", "selinux/config",
)
# Files whose second field is a password (hash): only "x" is copied there.
_PASSWORD_FILES = ("passwd", "group")


class EtcError(Exception):
    """The template cannot be made; the message says why."""


def _allowed(host_etc):
    names = set()
    try:
        present = os.listdir(host_etc)
    except OSError:
        present = []
    for pattern in HOST_ALLOW:
        if pattern.endswith("*"):
            names.update(n for n in present if n.startswith(pattern[:-1]))
        else:
            names.add(pattern)
    return sorted(names)


def _copy_public(src_dir_fd, name, dst):
    """Copy `name` (relative to the open directory) to `dst`, never following
    symlinks and skipping whatever is not readable by everybody."""
    try:
        st = os.stat(name, dir_fd=src_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=src_dir_fd), dst)
    elif not st.st_mode & stat.S_IROTH:
        return
    elif stat.S_ISDIR(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=src_dir_fd)
        try:
            os.mkdir(dst, 0o700)
            for entry in sorted(os.listdir(fd)):
                _copy_public(fd, entry, os.path.join(dst, entry))
        finally:
            os.close(fd)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir_fd)
        with open(fd, "rb") as src, open(dst, "xb") as out:
            data = src.read()
            if os.path.basename(dst) in _PASSWORD_FILES:
                data = _drop_passwords(data)
            out.write(data)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    else:
        return  # no device nodes, fifos or sockets
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)


def _drop_passwords(data):
    lines = []
    for line in data.split(b"\n"):
        fields = line.split(b":")
        if len(fields) > 2:
            fields[1] = b"x"
        lines.append(b":".join(fields))
    return b"\n".join(lines)


def from_host(dst, host_etc="/etc"):
    """Fill the empty directory `dst` with the allow-listed public part of `host_etc`."""
    fd = os.open(host_etc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in _allowed(host_etc):
            parent = os.path.dirname(name)
            if parent:
                # e.g. ssl/certs: the parent is made here, without its other entries
                try:
                    pst = os.stat(parent, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(pst.st_mode):
                    continue
                os.makedirs(os.path.join(dst, parent), 0o755, exist_ok=True)
            _copy_public(fd, name, os.path.join(dst, name))
    finally:
        os.close(fd)


def _open_etc(tree):
    """An O_PATH fd of `tree/etc` when that is a real directory, else None."""
    tree_fd = os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return os.open("etc", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=tree_fd)
    except OSError:  # missing, a symlink (ELOOP), a file (ENOTDIR)
        return None
    finally:
        os.close(tree_fd)


def from_tree(dst, tree):
    """Fill the empty directory `dst` with a copy of `tree/etc` (symlinks kept
    as they are, never followed); nothing when `etc` is not a real directory."""
    fd = _open_etc(tree)
    if fd is None:
        return
    try:
        # cp resolves /proc/self/fd/N to exactly the directory checked above
        res = subprocess.run(["cp", "--reflink=auto", "-a", "--no-dereference", "--",
                              f"/proc/self/fd/{fd}/.", dst], pass_fds=(fd,), check=False,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        os.close(fd)
    if res.returncode != 0:
        lines = res.stderr.decode(errors="replace").strip().splitlines() or ["cp failed"]
        raise EtcError(f"cannot copy the build tree's /etc: {lines[0][:500]}")
