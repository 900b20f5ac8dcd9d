"""Benchmarks stay runnable: their smoke modes, as CI's only benchmark run (no timings asserted).

bench_ops --smoke and bench_updator --smoke need no GPU and no peer; bench_planner --smoke needs
the peers' policy code (../shared/tools/anchors.py with a filled EPLB_ANCHOR_CACHE) and skips
without it.
"""

import json
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


def test_bench_updator_smoke(tmp_path):
    out_json = tmp_path / "bench_updator.json"
    # a budget below one expert: one expert per rank and step, so each layer's move spans steps
    out = _run("benchmarks/bench_updator.py", "--smoke", "--max-move-bytes-per-step", "1",
               "--out", str(out_json))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["backend"] == "gloo" and result["rows_per_step"] == 1
    assert max(result["steps_per_layer_move"]) > 1
    # the rotation sends each peer consecutive slots: one message per weight tensor each way
    assert result["layer_move"]["ops_this_rank"] == 2 * 2 and result["layer_move"]["bytes"] > 0
    assert result["budget_step_move"]["bytes"] == result["slot_bytes"]
    assert set(result["planner_s"]) == {"deepseek", "balanced", "min_move"}
