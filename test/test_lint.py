"""pylint reports nothing on the package, programs, tools and tests (tools/lint, `make lint`)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pylint_is_clean():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "lint"), "-j", "2"],
                          capture_output=True, text=True, check=False, timeout=1200)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
