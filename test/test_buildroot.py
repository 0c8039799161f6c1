"""Unit tests of osbuild.buildroot: the binds as data and how they are rendered."""

import os

import pytest

import osbuild
from osbuild import buildroot
from osbuild.buildroot import IDMAP, IDMAP_IF_POSSIBLE, NO_IDMAP, Bind, BuildRootError
from osbuild.layout import CONTAINER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeMounts:
    """An idmap.MountTable stand-in: `supported` paths can be idmapped."""

    def __init__(self, supported):
        self.supported = supported

    def supports_idmap(self, path):
        """Whether `path` is one of the supported ones."""
        return self.supported is None or path in self.supported

    def fstype(self, _path):
        """The filesystem type named in errors."""
        return "fakefs"


def test_bind_renders_each_option():
    mounts = FakeMounts({"/a", "/b:c"})
    assert Bind("/a", "/x").option(mounts) == "--bind=/a:/x:idmap"
    assert Bind("/a", "/x", readonly=True).option(mounts) == "--bind-ro=/a:/x:idmap"
    assert Bind("/b:c", "/x").option(mounts) == "--bind=/b\\:c:/x:idmap"
    assert Bind("/n", "/x", idmap=IDMAP_IF_POSSIBLE).option(mounts) == "--bind=/n:/x"
    assert Bind("/a", "/x", idmap=IDMAP_IF_POSSIBLE).option(mounts) == "--bind=/a:/x:idmap"
    assert Bind("/a", "/x", readonly=True, idmap=NO_IDMAP, recursive=False).option(mounts) \
        == "--bind-ro=/a:/x:norbind"


def test_bind_refuses_a_tree_that_cannot_be_idmapped():
    with pytest.raises(BuildRootError, match="/n is on a fakefs filesystem"):
        Bind("/n", "/x", idmap=IDMAP).option(FakeMounts(set()))


@pytest.fixture(name="root")
def root_fixture(tmp_path):
    """A BuildRoot on a small tree with a real /usr and a merged /bin."""
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    os.symlink("usr/bin", tree / "bin")
    (tree / "etc").mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with buildroot.BuildRoot(str(tree), "org.osbuild.debian12", REPO, str(tmp),
                             max_processes=0) as br:
        yield br


def test_binds_of_a_program(root):
    binds = root.binds("/api", "/priv", False, [("/t", CONTAINER.tree)],
                       [("/s", CONTAINER.sources)])
    by_target = {b.target: b for b in binds}
    assert [b.target for b in binds] == [
        CONTAINER.api, "/var", "/tmp", "/root", CONTAINER.tree, "/etc", CONTAINER.sources,
        "/usr", CONTAINER.lib, CONTAINER.python + "/osbuild"]
    assert by_target["/etc"] == Bind(root.etc, "/etc", readonly=True)
    assert by_target["/var"] == Bind("/priv/var", "/var")
    assert by_target[CONTAINER.tree] == Bind("/t", CONTAINER.tree)
    assert by_target[CONTAINER.sources].readonly
    # the symlinked /bin is mirrored in the container root, never bound
    assert "/bin" not in by_target
    assert os.readlink(os.path.join(root.machine_root, "bin")) == "usr/bin"
    assert by_target["/usr"].idmap == IDMAP_IF_POSSIBLE and by_target["/usr"].readonly
    package = os.path.dirname(os.path.abspath(osbuild.__file__))
    for bind, src in ((by_target[CONTAINER.lib], REPO),
                      (by_target[CONTAINER.python + "/osbuild"], package)):
        assert bind.source == src and bind.readonly and not bind.recursive
        assert bind.idmap == NO_IDMAP


def test_setup_gets_etc_writable(root):
    binds = root.binds("/api", "/priv", True)
    etc = [b for b in binds if b.target == "/etc"]
    assert etc == [Bind(root.etc, "/etc")]


def test_nspawn_argv_renders_every_bind(root):
    mounts = FakeMounts(None)
    argv = root._nspawn_argv("/api", "/priv", False, (), (), False,  # pylint: disable=protected-access
                             mounts=mounts)
    rendered = [a for a in argv if a.startswith("--bind")]
    assert rendered == [b.option(mounts) for b in root.binds("/api", "/priv", False)]
    assert "--private-network" in argv
    assert f"--setenv=PYTHONPATH={CONTAINER.python}" in argv


def test_container_paths_are_below_run_osbuild():
    assert CONTAINER.socket("sources") == "/run/osbuild/api/sources"
    assert CONTAINER.program("stages", "org.osbuild.noop") == \
        "/run/osbuild/lib/stages/org.osbuild.noop"
    for name in ("api", "lib", "python", "tree", "sources", "output", "dev"):
        assert getattr(CONTAINER, name) == "/run/osbuild/" + name
