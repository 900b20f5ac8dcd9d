"""Builds the pure-C++ planner unit tests (no Python, no torch) and runs them.

The planner core must stand alone (DESIGN.md): this builds csrc/planner with warnings as errors
from the source tree, as CMake's EPLB_NATIVE_PYTHON=OFF configuration, and runs its tests.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpp_planner_tests_pass(tmp_path):
    if not (ROOT / "csrc" / "planner").is_dir():
        pytest.skip("source tree not available (installed package only)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), *gen, "-DEPLB_NATIVE_PYTHON=OFF",
                    "-DEPLB_NATIVE_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True, text=True)
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j", str(os.cpu_count() or 1)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    run = subprocess.run([str(tmp_path / "planner_tests")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert " 0 failed" in run.stdout
