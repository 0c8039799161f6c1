"""The dnf and yum stages' implementation (stages/org.osbuild.dnf, stages/org.osbuild.yum).

Runs inside the build root. The repositories come from the org.osbuild.dnf
source (their secrets as memfds through the sources API) or inline from the
options; the transaction runs with `--installroot` on the tree.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

from osbuild.programs import ProgramError
from osbuild.programs.checksum import file_digest

SOURCE = "org.osbuild.dnf"
LOCATIONS = ("baseurl", "metalink", "mirrorlist")
# the secrets' keys (osbuild.credentials.KEYS) and the dnf options for them
SSL_OPTIONS = {"ssl_client_cert": "sslclientcert", "ssl_client_key": "sslclientkey",
               "ssl_ca_cert": "sslcacert"}
# the yum stage's `verbosity`: extra arguments for the front end
VERBOSITY = {"quiet": ["--quiet"], "info": [], "verbose": ["--verbose"], "debug": ["--verbose"]}


def close_fds(fds):
    """Close the secrets' descriptors `fds` ({checksum: {key: fd}}), each once."""
    for fd in {fd for keys in fds.values() for fd in keys.values()}:
        os.close(fd)
    fds.clear()


def fetch_repos(checksums, sources_dir):
    """Ask the sources API for `checksums`; return (directory, {checksum: {key: fd}}).

    Without the API (the stage run by hand), the configurations must be in
    `sources_dir` already, and repositories that need a secret cannot work.
    """
    try:
        from osbuild import sources  # pylint: disable=import-outside-toplevel
    except ImportError:
        sources = None
    if sources is not None and os.path.exists(sources.API_PATH):
        try:
            return sources.get_secrets(SOURCE, checksums)
        except (RuntimeError, OSError) as e:
            raise ProgramError(f"cannot get the repositories from the sources: {e}") from None
    local = os.path.join(sources_dir, SOURCE) if sources_dir else None
    if local and all(os.path.isfile(os.path.join(local, c)) for c in checksums):
        return local, {}
    raise ProgramError(f"repository {checksums[0]} is not in the sources "
                       "(and there is no sources API)")


def lookup_repos(checksums, sources_dir, fds):
    """Repository configurations for metadata `checksums` from the org.osbuild.dnf source.

    Returns `{checksum: config dict}`; fills `fds` with the secrets'
    descriptors `{checksum: {key: fd}}`, which the caller must close.
    """
    if not checksums:
        return {}
    directory, received = fetch_repos(checksums, sources_dir)
    fds.update(received)
    result = {}
    for checksum in checksums:
        path = os.path.join(directory, checksum)
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise ProgramError(f"repository {checksum} is not in the sources") from None
        except ValueError:
            raise ProgramError(f"repository {checksum}: the source's answer is not JSON") from None
        if not isinstance(config, dict) or not any(config.get(k) for k in LOCATIONS):
            raise ProgramError(f"repository {checksum}: the source gives no baseurl, "
                               "metalink or mirrorlist")
        if config.get("secrets") and not fds.get(checksum):
            raise ProgramError(f"repository {checksum} needs the secret "
                               f"{str(config['secrets'])[:200]!r}, which only the osbuild "
                               "sources API hands out")
        result[checksum] = config
    return result


def resolve_repos(repos, sources_dir, fds):
    """The list of repository dicts (with `checksum` where known) for the options' `repos`.

    Repositories with a secret get `secret_fds` {dnf option: fd}; see lookup_repos().
    """
    looked_up = lookup_repos(sorted({r for r in repos if isinstance(r, str)}), sources_dir, fds)
    result = []
    for i, repo in enumerate(repos):
        if isinstance(repo, str):
            config = looked_up[repo]
            entry = {k: config[k] for k in LOCATIONS + ("gpgkey", "sslverify")
                     if config.get(k) is not None}
            secret = fds.get(repo, {})
            entry["secret_fds"] = {SSL_OPTIONS[k]: fd for k, fd in secret.items()
                                   if k in SSL_OPTIONS}
            entry["checksum"] = repo
            result.append(entry)
        else:
            entry = dict(repo)
            # inline PEM texts (the original's form) are held like the sources'
            # secrets: memory files, never in the .repo file, dropped before the
            # transaction runs
            inline = {k: entry.pop(k) for k in SSL_OPTIONS.values() if k in entry}
            if inline:
                fds[f"repos[{i}]"] = {k: memory_file(k, text) for k, text in inline.items()}
                entry["secret_fds"] = dict(fds[f"repos[{i}]"])
            result.append(entry)
    return result


def memory_file(name, text):
    """A memfd holding `text`, for dnf to open as /proc/self/fd/N."""
    fd = os.memfd_create(f"osbuild-{name}", os.MFD_CLOEXEC)
    data = text.encode("utf-8")
    while data:
        data = data[os.write(fd, data):]
    return fd


def write_config(tmp, repos, secrets=True):
    """Write dnf.conf and the .repo file into `tmp`; return the dnf.conf path.

    With `secrets`, repositories point dnf at their secrets' descriptors.
    """
    reposdir = os.path.join(tmp, "repos.d")
    os.makedirs(reposdir, exist_ok=True)
    lines = []
    for i, repo in enumerate(repos):
        repoid = f"osbuild-{i}"
        lines.append(f"[{repoid}]")
        lines.append(f"name=osbuild repository {i}")
        for key in LOCATIONS:
            if repo.get(key):
                lines.append(f"{key}={repo[key]}")
        if repo.get("gpgkey"):
            keyfile = os.path.join(tmp, f"{repoid}.asc")
            with open(keyfile, "w", encoding="utf-8") as f:
                f.write(repo["gpgkey"])
            lines.append(f"gpgkey=file://{keyfile}")
            lines.append("gpgcheck=1")
        else:
            lines.append("gpgcheck=0")
        lines.append("repo_gpgcheck=0")
        if "sslverify" in repo:
            lines.append(f"sslverify={1 if repo['sslverify'] else 0}")
        if secrets:
            # dnf opens these itself: its own copies of the descriptors (pass_fds)
            for key, fd in sorted(repo.get("secret_fds", {}).items()):
                lines.append(f"{key}=/proc/self/fd/{fd}")
        lines.append("enabled=1")
        lines.append("skip_if_unavailable=0")
        lines.append("metadata_expire=-1")
        lines.append("")
    with open(os.path.join(reposdir, "osbuild.repo"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    conf = os.path.join(tmp, "dnf.conf")
    with open(conf, "w", encoding="utf-8") as f:
        f.write("[main]\n"
                f"reposdir={reposdir}\n"
                "keepcache=0\n"
                "plugins=0\n"
                "best=1\n"
                "strict=1\n"
                "clean_requirements_on_remove=0\n"
                "check_config_file_age=0\n")
    # rpm's database path follows the tree, whatever the build root's rpm defaults to
    return conf


def rpm_dbpath(tree):
    """Where the tree's rpm database is (or will be)."""
    if os.path.isdir(os.path.join(tree, "usr/lib/sysimage/rpm")):
        return "/usr/lib/sysimage/rpm"
    return "/var/lib/rpm"


def dnf_error(output):
    """The most telling lines of a failed dnf run, joined into one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    picked = []
    prefixes = ("Error", "No match for argument", "Problem", "- ", "Curl error", "Cannot download",
                "Failed to download", "Public key", "GPG", "Failing package", "Package ")
    for line in lines:
        if line.startswith("Package  "):   # a table header
            continue
        if (line.startswith(prefixes) or "is not signed" in line or "not available" in line
                or "conflicts" in line):
            if line not in picked:
                picked.append(line)
    return " | ".join((picked or lines[-5:])[:10])


def run_dnf(frontend, argv, env, what, pass_fds=()):
    """Run dnf (or yum); stream its output; raise ProgramError when it fails."""
    proc = subprocess.run([frontend] + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, check=False, pass_fds=pass_fds)
    sys.stdout.write(proc.stdout)
    sys.stdout.flush()
    if proc.returncode != 0:
        raise ProgramError(f"{what} failed (exit status {proc.returncode}): "
                           f"{dnf_error(proc.stdout)}")
    return proc.stdout


def check_metadata(tmp, repos):
    """Compare each repository's repomd.xml with its `checksum`."""
    for i, repo in enumerate(repos):
        checksum = repo.get("checksum")
        location = next(repo[k] for k in LOCATIONS if repo.get(k))
        pattern = os.path.join(f"osbuild-{i}-*", "repodata", "repomd.xml")
        found = glob.glob(os.path.join(tmp, "cache", "**", pattern), recursive=True)
        if not found:
            raise ProgramError(f"repos[{i}] ({location}): no repomd.xml was downloaded")
        if checksum:
            algo, digest = checksum.split(":", 1)
            actual = file_digest(found[0], algo)
            if actual != digest:
                raise ProgramError(f"repos[{i}] ({location}): metadata checksum {algo}:{actual} "
                                   f"does not match the expected {checksum}")
            print(f"repos[{i}]: metadata matches {checksum}")


def outside(tree, path):
    """`path` written so that it means the same with or without the tree as prefix."""
    return "/" + os.path.relpath(os.path.realpath(path), os.path.realpath(tree))


def find_frontend(preferred):
    """The first of `preferred` program names found in PATH."""
    for name in preferred:
        path = shutil.which(name)
        if path:
            return path
    raise ProgramError(f"the build root has no {' or '.join(preferred)}")


def main(tree, options, sources_dir, frontends=("dnf",)):
    """Run the transaction; return the exit status."""
    frontend = find_frontend(frontends)
    operation = options.get("operation", "install")
    packages = options["packages"]
    if not packages and operation not in ("upgrade", "update", "distro-sync"):
        raise ProgramError(f"'packages' is empty: nothing to {operation}")
    fds = {}
    try:
        repos = resolve_repos(options["repos"], sources_dir, fds)
        transaction(os.path.abspath(tree), options, frontend, repos, fds)
    finally:
        close_fds(fds)
    return 0


def transaction(tree, options, frontend, repos, fds):
    """Fetch the metadata and run the transaction; closes `fds` before it runs."""
    # pylint: disable=too-many-locals
    operation = options.get("operation", "install")
    tmpbase = "/var/tmp" if os.path.isdir("/var/tmp") else None
    with tempfile.TemporaryDirectory(prefix="osbuild-dnf-", dir=tmpbase) as tmp:
        conf = write_config(tmp, repos)
        home = os.path.join(tmp, "home")
        os.makedirs(home)
        with open(os.path.join(home, ".rpmmacros"), "w", encoding="utf-8") as f:
            f.write(f"%_dbpath {rpm_dbpath(tree)}\n")
        env = dict(os.environ, HOME=home, LC_ALL="C.UTF-8")
        is_dnf = os.path.basename(os.path.realpath(frontend)).startswith("dnf")
        common = [
            f"--installroot={tree}", f"--config={conf}", f"--releasever={options['releasever']}",
            "--setopt=reposdir=" + os.path.join(tmp, "repos.d"),
            # dnf puts some of its cache and log files under the installroot and
            # others not: a path that leads out of the tree names the same
            # place either way, so nothing of this ends up in the tree
            "--setopt=cachedir=" + outside(tree, os.path.join(tmp, "cache")),
            "--noplugins", "--assumeyes",
        ]
        basearch = options.get("basearch", os.uname().machine)
        common += VERBOSITY[options.get("verbosity", "info")]
        if "fastestmirror" in options:
            common.append(f"--setopt=fastestmirror={options['fastestmirror']}")
        if is_dnf:
            common += [f"--forcearch={basearch}",
                       "--setopt=varsdir=" + os.path.join(tmp, "vars"),
                       "--setopt=logdir=" + outside(tree, os.path.join(tmp, "log"))]
        elif basearch != os.uname().machine:
            raise ProgramError(f"yum cannot install for basearch {basearch} on "
                               f"{os.uname().machine} (it has no --forcearch)")
        held = sorted({fd for keys in fds.values() for fd in keys.values()})
        run_dnf(frontend, common + ["makecache"], env, "fetching the repository metadata", held)
        check_metadata(tmp, repos)

        argv = list(common)
        if is_dnf:
            argv.append(f"--setopt=install_weak_deps={options.get('install_weak_deps', True)}")
            if "module_platform_id" in options:
                argv.append(f"--setopt=module_platform_id={options['module_platform_id']}")
        for name in options.get("exclude_packages", []):
            argv.append(f"--exclude={name}")
        command = "upgrade" if operation == "update" else operation
        tail = [command, "--"] + options["packages"]
        name = f"{os.path.basename(frontend)} {command}"
        if held:
            # Download with the secret, then drop it: the transaction (and every
            # scriptlet in it) runs from the cache with no secret in any process.
            if command != "remove":
                run_dnf(frontend, argv + ["--downloadonly"] + tail, env,
                        f"{name} (downloading)", held)
            close_fds(fds)
            write_config(tmp, repos, secrets=False)
            argv.append("--cacheonly")
        run_dnf(frontend, argv + tail, env, name)
