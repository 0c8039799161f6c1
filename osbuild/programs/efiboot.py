"""Put a tree's own UEFI boot chain (shim, GRUB, MokManager) onto its EFI system partition.

Debian's packages install their EFI binaries under /usr/lib and leave copying
them to grub-install; this does that copy, taking everything from the tree
(never from the build root or the host): symbolic links in the tree are
resolved as the booted system would resolve them, inside the tree.
"""

import os
import stat

# EFI architecture name -> GRUB's CPU name (the /usr/lib/grub/<cpu>-efi directories)
EFI_ARCHES = {"x64": "x86_64", "aa64": "arm64", "ia32": "i386", "arm": "arm",
              "riscv64": "riscv64", "loongarch64": "loongarch64"}
ESP = "/boot/efi"
MAX_LINKS = 40


class EfiBootError(Exception):
    """The tree cannot provide a UEFI boot chain; the message says why."""


def resolve(tree, path):
    """`path` (absolute, in the tree) with every symbolic link resolved inside the tree.

    Returns the host path of the result, or None when it does not exist or
    the links loop.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(tree, *done, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return os.path.join(tree, *done)


def tree_file(tree, path):
    """The host path of the regular file the tree has at `path`, or None."""
    real = resolve(tree, path)
    if real is None:
        return None
    st = os.lstat(real)
    return real if stat.S_ISREG(st.st_mode) else None


def candidates(tree, arch):
    """{role: host path} of the EFI binaries the tree has for `arch`."""
    cpu = EFI_ARCHES[arch]
    paths = {
        "shim": f"/usr/lib/shim/shim{arch}.efi.signed",
        "mm": f"/usr/lib/shim/mm{arch}.efi.signed",
        "signed-grub": f"/usr/lib/grub/{cpu}-efi-signed/grub{arch}.efi.signed",
        "grub": f"/usr/lib/grub/{cpu}-efi/monolithic/grub{arch}.efi",
        "on-esp": f"{ESP}/EFI/BOOT/BOOT{arch.upper()}.EFI",
    }
    found = {}
    for role, path in paths.items():
        real = tree_file(tree, path)
        if real:
            found[role] = real
    return found


def detect_arch(tree):
    """The one EFI architecture the tree has boot binaries for."""
    arches = [arch for arch in EFI_ARCHES if candidates(tree, arch)]
    if not arches:
        raise EfiBootError("the tree has no UEFI boot loader: install shim-signed and "
                           "grub-efi-<arch>-signed, or grub-efi-<arch>-bin (Debian), before "
                           "the grub2 stage")
    if len(arches) > 1:
        raise EfiBootError(f"the tree has UEFI boot loaders for {', '.join(arches)}: "
                           "choose one with uefi.arch")
    return arches[0]


def plan(tree, vendor, arch):
    """[(ESP-relative destination, host source path)] of the boot chain for `arch`."""
    found = candidates(tree, arch)
    removable = f"EFI/BOOT/BOOT{arch.upper()}.EFI"
    grub_name = f"grub{arch}.efi"
    if "shim" in found:
        grub = found.get("signed-grub") or found.get("grub")
        if grub is None:
            raise EfiBootError(f"the tree has shim{arch}.efi.signed but no GRUB for {arch} "
                               f"(install grub-efi-{debian_arch(arch)}-signed)")
        chain = [(removable, found["shim"]), (f"EFI/BOOT/{grub_name}", grub),
                 (f"EFI/{vendor}/shim{arch}.efi", found["shim"]),
                 (f"EFI/{vendor}/{grub_name}", grub)]
        if "mm" in found:
            chain += [(f"EFI/BOOT/mm{arch}.efi", found["mm"]),
                      (f"EFI/{vendor}/mm{arch}.efi", found["mm"])]
        return chain
    grub = found.get("grub") or found.get("signed-grub")
    if grub:
        return [(removable, grub), (f"EFI/{vendor}/{grub_name}", grub)]
    if "on-esp" in found:
        return []       # installed onto the ESP by the tree's own packages (Fedora)
    raise EfiBootError(f"the tree has no UEFI boot loader for {arch}: install shim-signed and "
                       f"grub-efi-{debian_arch(arch)}-signed, or grub-efi-{debian_arch(arch)}-bin")


def debian_arch(arch):
    """Debian's name for the EFI architecture `arch` (for messages)."""
    return {"x64": "amd64", "aa64": "arm64", "ia32": "ia32"}.get(arch, arch)


def make_dirs(tree, relpath):
    """Create tree/relpath directory by directory, refusing symbolic links on the way."""
    current = tree
    for part in relpath.strip("/").split("/"):
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            where = "/" + os.path.relpath(current, tree)
            raise EfiBootError(f"{where} in the tree is {kind}; the ESP must be a directory")
    return current


def copy_file(src, dst):
    """Copy the regular file `src` to `dst` without following links at either end."""
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd_in).st_mode):
            raise EfiBootError(f"{src} is not a regular file")
        if os.path.islink(dst) or (os.path.lexists(dst) and not os.path.isfile(dst)):
            os.unlink(dst)
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o700)
        try:
            while True:
                chunk = os.read(fd_in, 1 << 20)
                if not chunk:
                    break
                os.write(fd_out, chunk)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def install(tree, vendor, arch=None):
    """Copy the tree's UEFI boot chain onto its ESP (tree/boot/efi); returns what was written.

    With shim: shim as EFI/BOOT/BOOT<ARCH>.EFI with GRUB and MokManager beside
    it, and the same under EFI/<vendor>/ (where Debian's signed GRUB finds
    grub.cfg). Without shim: the monolithic GRUB image in both places.
    """
    if arch is None:
        arch = detect_arch(tree)
    if arch not in EFI_ARCHES:
        raise EfiBootError(f"unknown EFI architecture {arch!r}")
    chain = plan(tree, vendor, arch)
    written = []
    for dest, src in chain:
        directory = make_dirs(tree, os.path.join(ESP, os.path.dirname(dest)))
        copy_file(src, os.path.join(directory, os.path.basename(dest)))
        written.append((dest, "/" + os.path.relpath(src, tree)))
    return arch, written
