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
    # exit 0 also means its checks held (balanced never above vLLM on a layer, deepseek never
    # above vLLM / SGLang, min_move >= 99% of balanced's balancedness)
    out = _run("benchmarks/bench_planner.py", "--smoke", "--distinct")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "CHECK FAILED" not in out.stdout
    assert "ours balanced" in out.stdout and "vLLM default" in out.stdout
    # --distinct: the distinct rows, and the repeat counts (ours distinct: none)
    assert "ours balanced distinct" in out.stdout and "ours min_move distinct" in out.stdout
    assert "ours balanced distinct 0, ours min_move distinct 0" in out.stdout


def test_bench_updator_smoke_migration_batching(tmp_path):
    out_json = tmp_path / "bench_updator.json"
    out = _run("benchmarks/bench_updator.py", "--smoke", "--migration-batching", "--out",
               str(out_json))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["shape"]["migration_batching"] is True
    # the same messages, two batches (to the peer, then from it)
    assert result["layer_move"]["ops_this_rank"] == 2 * 2 and result["layer_move"]["bytes"] > 0


def test_bench_updator_smoke(tmp_path):
    out_json = tmp_path / "bench_updator.json"
    # a budget below one expert: one expert per rank and step, so each layer's move spans steps
    out = _run("benchmarks/bench_updator.py", "--smoke", "--max-move-bytes-per-step", "1",
               "--profile", "--out", str(out_json))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["backend"] == "gloo" and result["rows_per_step"] == 1
    assert max(result["steps_per_layer_move"]) > 1
    # the rotation sends each peer consecutive slots: one message per weight tensor each way
    layer, step = result["layer_move"], result["budget_step_move"]
    assert layer["ops_this_rank"] == 2 * 2 and layer["bytes"] > 0
    assert step["bytes"] == result["slot_bytes"]
    # the whole layer copies every slot the rank already holds; a one-row budget step spends
    # its row on the receive, so its local copies wait for later steps
    assert layer["move_copied_bytes_this_rank"] == layer["local_copy_bytes"] > 0
    assert step["move_copied_bytes_this_rank"] == 0
    for part in (layer, step):
        assert part["same_ops_s"] > 0 and part["local_copy_s"] > 0 and part["prepare_host_s"] > 0
        assert set(part["phases_s"]) == {"post_host_s", "issue_host_s", "wait_host_s"}
    # --profile: tables for the move, its messages alone and raw P2P, whole layer and step
    text = (tmp_path / "bench_updator.profile.txt").read_text()
    for title in ("whole layer", "budget step (1 rows)"):
        for what in ("move", "same_ops", "raw"):
            for key in ("self_cpu_time_total", "cpu_time_total"):
                assert f"=== {title}: {what} -- sorted by {key} ===" in text
    assert "move.issue" in text and "raw.post" in text
    assert len(list(tmp_path.glob("bench_updator.profile.*.json"))) == 6
    summary = _run("benchmarks/bench_updator.py", "--summarize", str(out_json))
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "layer_move:" in summary.stdout and "budget_step_move:" in summary.stdout
    assert set(result["planner_s"]) == {"deepseek", "balanced", "min_move"}


@pytest.mark.skipif(__import__("importlib").util.find_spec("scipy") is None,
                    reason="needs scipy (the integer-program solver of the analysis tool)")
def test_optimum_two_slots_matches_brute_force():
    """benchmarks/optimum_two_slots.py's integer program (replica counts + the sorted-pairing
    condition) finds the best two-slot placement: brute force over every count vector agrees
    on small random layers, and a placement with that max exists (the tool measures it)."""
    import importlib.util
    import itertools

    import numpy as np

    spec = importlib.util.spec_from_file_location("optimum_two_slots",
                                                  ROOT / "benchmarks" / "optimum_two_slots.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rng = np.random.default_rng(3)
    for _ in range(12):
        experts, ranks = int(rng.integers(2, 6)), int(rng.integers(3, 6))
        slots = 2 * ranks
        if experts > slots:
            continue
        w = rng.integers(1, 60, experts).astype(float)
        best = min(tool._sorted_pairing_max(w, np.array(c))
                   for c in itertools.product(range(1, slots + 1), repeat=experts)
                   if sum(c) == slots)
        found, undecided = tool.best_max(w, slots, w.sum() / ranks, 2 * w.max(), steps=40,
                                         extra=slots, time_limit=30.0)
        assert undecided == 0 and abs(found - best) <= 1e-9 * best, (w, ranks, found, best)


def test_bench_hooks_smoke():
    out = _run("benchmarks/bench_hooks.py", "--smoke", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["layers"] == 4 and len(result["hooks_us_per_step_runs"]) == 2
    assert result["hooks_us_per_step"] > 0
