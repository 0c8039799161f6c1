"""Install osbuild: `pip install .` (the package `osbuild` and the `osbuild` command)."""

import os
import re
import shutil

import setuptools
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    """The version, from osbuild/version.py (the one place that defines it)."""
    with open(os.path.join(HERE, "osbuild", "version.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.MULTILINE)
    if not match:
        raise RuntimeError("osbuild/version.py does not define __version__")
    return match.group(1)


class BuildPyWithSchemas(build_py):
    """Also ship schemas/*.json inside the package (osbuild/schemas/)."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "schemas")
        dst = os.path.join(self.build_lib, "osbuild", "schemas")
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            if name.endswith(".json"):
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


setuptools.setup(
    name="osbuild",
    version=read_version(),
    description="A build system for operating system images",
    long_description="osbuild builds operating-system images from declarative JSON "
                     "manifests: a pipeline of sandboxed stages and an assembler.",
    url="https://www.osbuild.org/",
    license="Apache-2.0",
    python_requires=">=3.6",
    packages=setuptools.find_packages(include=["osbuild", "osbuild.*"]),
    install_requires=["jsonschema"],
    entry_points={"console_scripts": ["osbuild = osbuild.__main__:main"]},
    cmdclass={"build_py": BuildPyWithSchemas},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Installation/Setup",
    ],
)
