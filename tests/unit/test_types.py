"""mypy over the package with pyproject.toml's configuration: strict on the seams
(rlpost.groups and tests/typecheck/seams.py, which assigns every Ray and in-process
group to its Protocol), the rest checked except the listed type debt."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_passes():
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    assert mypy, "mypy is not installed: `pip install -e '.[test]'` (scripts/setup.sh does it)"
    proc = subprocess.run([mypy, "--python-executable", sys.executable], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
