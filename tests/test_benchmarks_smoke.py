"""Benchmarks stay runnable: their smoke modes, as CI's only benchmark run (no timings asserted).

bench_ops --smoke needs no GPU and no peer; bench_planner --smoke needs the peers' policy code
(../shared/tools/anchors.py with a filled EPLB_ANCHOR_CACHE) and skips without it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import eplb_native

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(Path(eplb_native.__file__).resolve().parents[1])}


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_bench_ops_smoke():
    out = _run("benchmarks/bench_ops.py", "--smoke", "--smoke-reps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| E, P | T·k | eplb µs | torch µs | torch/eplb |" in out.stdout
    assert out.stdout.count("| 256, 288 |") >= 2


@pytest.mark.skipif(not os.environ.get("EPLB_ANCHOR_CACHE")
                    or not (ROOT.parent / "shared" / "tools" / "anchors.py").exists(),
                    reason="needs ../shared/tools/anchors.py and a filled EPLB_ANCHOR_CACHE")
def test_bench_planner_smoke():
    out = _run("benchmarks/bench_planner.py", "--smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ours balanced" in out.stdout and "vLLM default" in out.stdout
