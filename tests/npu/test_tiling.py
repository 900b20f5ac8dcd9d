"""Host tiling of the Ascend C kernels (csrc/ops/ascendc/record_tiling.h, plain C++) on the CPU:
builds tests/npu/tiling_check.cpp with the host C++ compiler (warnings as errors) and runs it.
Needs no CANN, torch_npu or NPU, so it runs everywhere the source tree is."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on this host")
def test_tiling_invariants(tmp_path):
    source = ROOT / "tests" / "npu" / "tiling_check.cpp"
    if not (ROOT / "csrc" / "ops" / "ascendc").is_dir():
        pytest.skip("source tree not available (installed package only)")
    exe = tmp_path / "tiling_check"
    build = subprocess.run(
        [CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Wshadow", "-Wconversion",
         "-Wno-sign-conversion", "-Werror", f"-I{ROOT / 'csrc'}", str(source), "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:]
    assert run.stdout.strip().endswith(" 0 failed"), run.stdout[-4000:]
