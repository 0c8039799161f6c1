"""Ctrl-C is never lost or turned into a traceback by the import system's callbacks."""

import os
import subprocess
import sys

import pytest

import osbuild

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A KeyboardInterrupt raised inside a weakref callback, as when SIGINT's handler
# runs while the import system drops a module lock.
LOST_IN_CALLBACK = r"""
import signal, sys, time, weakref
sys.path.insert(0, sys.argv[1])
from osbuild.__main__ import _redeliver_interrupts
if sys.argv[2] == "hook":
    sys.unraisablehook = _redeliver_interrupts
signal.signal(signal.SIGINT, signal.default_int_handler)
class Lock:
    pass
def dropped(_ref):
    raise KeyboardInterrupt
lock = Lock()
ref = weakref.ref(lock, dropped)
try:
    del lock
    for _ in range(50):
        time.sleep(0.001)
    print("lost")
except KeyboardInterrupt:
    print("raised")
"""


@pytest.mark.parametrize("hook, printed", [("hook", "raised"), ("none", "lost")])
def test_interrupt_in_a_callback_is_delivered_again(hook, printed):
    """With osbuild's unraisablehook the KeyboardInterrupt is raised after the
    callback; without it (Python's own behaviour) it is dropped."""
    proc = subprocess.run([sys.executable, "-c", LOST_IN_CALLBACK, REPO, hook],
                          capture_output=True, text=True, check=True, timeout=30)
    assert proc.stdout.strip() == printed, proc.stderr
    assert ("Exception ignored" in proc.stderr) == (hook == "none"), proc.stderr


@pytest.mark.parametrize("orig_argv, module", [
    (["python3", "-m", "osbuild", "m.json"], "osbuild"),
    (["python3", "-mosbuild"], "osbuild"),
    (["python3", "-Sm", "osbuild"], "osbuild"),
    (["python3", "-X", "importtime", "-m", "osbuild"], "osbuild"),
    (["python3", "-Ximporttime", "-W", "ignore", "-m", "osbuild"], "osbuild"),
    (["python3", "-S", "-m", "osbuild.executables.populate", "{}"],
     "osbuild.executables.populate"),
    (["python3", "-X", "m", "-m", "x"], "x"),
])
def test_module_run_by_python(monkeypatch, orig_argv, module):
    """The -m module is read from the interpreter's own command line."""
    monkeypatch.setattr(sys, "argv", ["-m"] + orig_argv[orig_argv.index(module) + 1:]
                        if module in orig_argv else ["-m"])
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    # pylint: disable-next=protected-access
    assert osbuild._module_run_by_python() == module


def test_no_module_once_running(monkeypatch):
    """Once the module runs (sys.argv[0] is its path), or for `-c`, there is none."""
    monkeypatch.setattr(sys, "argv", ["/usr/lib/osbuild/osbuild/__main__.py"])
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "osbuild"])
    assert osbuild._module_run_by_python() is None  # pylint: disable=protected-access


@pytest.mark.parametrize("argv", [["-c", "import osbuild.__main__"],
                                  ["-m", "osbuild.version"]])
def test_importing_keeps_the_callers_handler(argv):
    """A process that imports osbuild (or runs another of its modules) keeps
    its SIGINT handler (Python's own, or SIG_IGN when started in the background)."""
    code = ("import signal, sys; sys.path.insert(0, sys.argv[1]); "
            "before = signal.getsignal(signal.SIGINT); import osbuild.__main__; "
            "print(signal.getsignal(signal.SIGINT) is before)")
    if argv[0] == "-m":
        code = code.replace("import osbuild.__main__",
                            f"import runpy; runpy.run_module({argv[1]!r})")
    proc = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True,
                          check=True, timeout=30, cwd=REPO)
    assert proc.stdout.strip() == "True", proc.stderr


def test_running_osbuild_installs_the_handler_in_the_package():
    """`python3 -m osbuild`: the handler is in place once the package is imported,
    before `signal` (and its enum import) loads."""
    code = ("import sys; sys.argv[0] = '-m'; sys.orig_argv = [sys.executable, '-m', 'osbuild']; "
            "sys.path.insert(0, sys.argv[1]); import _signal, osbuild; "
            "print(_signal.getsignal(_signal.SIGINT).__name__, 'enum' in sys.modules)")
    proc = subprocess.run([sys.executable, "-S", "-c", code, REPO], capture_output=True,
                          text=True, check=True, timeout=30, cwd=REPO)
    assert proc.stdout.split() == ["_interrupted_early", "False"], proc.stderr
