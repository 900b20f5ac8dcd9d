"""The ``eplb-native`` command line, driven as a user would: subprocesses, real files."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference.cli import balancedness as ref_balancedness
from reference.cli import simulate as ref_simulate

import eplb_native
from eplb_native import expert_map
from eplb_native.cli import default_placement_layers
from eplb_native.metrics import balancedness
from eplb_native.traces import load_trace, save_trace, synth

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(eplb_native.__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cli_env(path_first=None) -> dict:
    """``path_first``: a folder searched before the package's (to shadow a module)."""
    first = [] if path_first is None else [os.fspath(path_first)]
    path = os.pathsep.join([*first, PKG_PARENT, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, MPLBACKEND="Agg")


def run_cli(*args, cwd, expect=0, path_first=None):
    proc = subprocess.run([sys.executable, "-m", "eplb_native.cli", *map(str, args)], cwd=cwd,
                          env=_cli_env(path_first), capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def assert_one_line_error(proc, command, *fragments):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"eplb-native {command}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_valid_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something was drawn, not a blank canvas


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    """A small drifting trace with a recorded deployment (synth's meta), via the CLI."""
    d = tmp_path_factory.mktemp("trace")
    run_cli("synth", "--shape", "custom", "--layers", 3, "--experts", 16, "--windows", 7,
            "--tokens", 512, "--top-k", 2, "--seed", 5, "-o", "t.npz", cwd=d)
    return d / "t.npz"


# --------------------------------------------------------------------------- synth


def test_synth_writes_a_trace_of_the_model_shape(tmp_path):
    proc = run_cli("synth", "--shape", "qwen3-235b", "--windows", 2, "--layers", 4, "--seed", 3,
                   "-o", "q.npz", cwd=tmp_path)
    assert "wrote q.npz" in proc.stdout
    loads, meta = load_trace(tmp_path / "q.npz")
    assert loads.shape == (2, 4, 128) and loads.dtype == np.int64
    assert (loads.sum(axis=2) == 4096 * 8).all()  # default tokens x Qwen3's top-8
    assert meta["shape"] == "qwen3-235b" and meta["seed"] == 3 and meta["top_k"] == 8
    assert meta["num_ranks"] == 32 and meta["num_redundant"] == 32
    assert meta["expert_bytes"] == 3 * 4096 * 1536 * 2
    # same arguments, same trace
    run_cli("synth", "--shape", "qwen3-235b", "--windows", 2, "--layers", 4, "--seed", 3,
            "-o", "q2.npz", cwd=tmp_path)
    assert np.array_equal(load_trace(tmp_path / "q2.npz")[0], loads)
    assert np.array_equal(loads, synth(2, 4, 128, seed=3))


@pytest.mark.parametrize("args, fragments", [
    (["--shape", "custom", "--layers", "2"], ["--layers and --experts"]),
    (["--shape", "custom", "--layers", "2", "--experts", "4", "--top-k", "8"],
     ["--top-k must be <= --experts (4), got 8"]),
    (["--shape", "deepseek-v3", "--drift", "2"], ["--drift must be", "got 2.0"]),
    (["--shape", "deepseek-v3", "--windows", "0"], ["--windows must be an int >= 1, got 0"]),
    (["--shape", "deepseek-v3", "--layers", "0"], ["--layers must be an int >= 1, got 0"]),
    (["--shape", "deepseek-v3", "--tokens", "0"], ["--tokens must be an int >= 1, got 0"]),
    (["--shape", "deepseek-v3", "--zipf-a", "0"], ["--zipf-a must be", "got 0.0"]),
    (["--shape", "deepseek-v3", "--seed", "-1"], ["--seed must be an int >= 0, got -1"]),
    # sizes past memory: the flags named, before numpy is asked for terabytes
    (["--shape", "custom", "--layers", "2", "--experts", "8", "--windows", "1000000000000"],
     ["--windows must be <= 1048576"]),
    (["--shape", "custom", "--layers", "100", "--experts", "1000", "--windows", "1000000"],
     ["--windows 1000000 x --layers 100 x --experts 1000 need about", "GiB"]),
])
def test_synth_bad_arguments(tmp_path, args, fragments):
    proc = run_cli("synth", *args, "-o", "x.npz", cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "synth", *fragments)
    for param in ("num_windows", "num_layers", "num_experts", "tokens_per_window", "top_k",
                  "zipf_a"):
        assert param not in proc.stderr, proc.stderr
    assert not (tmp_path / "x.npz").exists()


def test_synth_custom_top_k_defaults_to_at_most_the_experts(tmp_path):
    # (it defaulted to 8 and refused 4 experts with an error about a --top-k never typed)
    run_cli("synth", "--shape", "custom", "--layers", 2, "--experts", 4, "-o", "t.npz",
            cwd=tmp_path)
    loads, meta = load_trace(tmp_path / "t.npz")
    assert meta["top_k"] == 4 and loads.shape[1:] == (2, 4)
    assert (loads.sum(axis=2) == meta["tokens_per_window"] * 4).all()


def test_synth_needs_npz_and_existing_directory(tmp_path):
    proc = run_cli("synth", "--shape", "kimi-k2", "-o", "x.npy", cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "synth", "*.npz")
    proc = run_cli("synth", "--shape", "kimi-k2", "-o", "nodir/x.npz", cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "synth", "does not exist")


# --------------------------------------------------------------------------- plan


def test_plan_bundled_example_writes_an_expert_map(tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "loads",
                           "deepseek_v3_like.npz")
    assert os.path.getsize(example) < 1 << 20
    proc = run_cli("plan", "--load", example, "--ranks", 32, "--nodes", 4, "--groups", 8,
                   "--redundant", 32, "-o", "map.json", cwd=tmp_path)
    for word in ("before", "after", "bound", "hierarchical", "wrote map.json"):
        assert word in proc.stdout
    phy2log, ranks = expert_map.load(tmp_path / "map.json")
    assert ranks == 32 and phy2log.shape == (58, 288)
    for row in phy2log:
        assert set(row.tolist()) == set(range(256))


def test_plan_json_numbers_match_the_reference(tmp_path):
    loads = synth(3, 4, 16, top_k=2, tokens_per_window=300, seed=11)
    np.save(tmp_path / "w.npy", loads)
    proc = run_cli("plan", "--load", "w.npy", "--ranks", 4, "--redundant", 4, "--policy",
                   "deepseek", "--allow-repeats", "-o", "m.json", "--json", cwd=tmp_path)
    out = json.loads(proc.stdout)
    phy2log, _ = expert_map.load(tmp_path / "m.json")
    total = loads.sum(axis=0)  # a multi-window trace is planned from the sum
    # deepseek without --old is DeepSeek EPLB's rebalance_experts on the summed load
    want, _, _ = eplb_native.rebalance_experts(total, 20, 1, 1, 4)
    assert np.array_equal(phy2log, want)
    assert out["distinct_ranks"] is False
    assert out["repeated_on_a_rank"] == len(expert_map.repeated_on_a_rank(want, 4)) > 0
    # by default no rank repeats an expert (vllm-ascend's reader needs it): plan's
    # distinct_ranks=True, the same numbers reported
    dist = json.loads(run_cli("plan", "--load", "w.npy", "--ranks", 4, "--redundant", 4,
                              "--policy", "deepseek", "-o", "d.json", "--json",
                              cwd=tmp_path).stdout)
    got, _ = expert_map.load(tmp_path / "d.json")
    assert np.array_equal(got, eplb_native.plan(total, num_ranks=4, num_replicas=20,
                                                policy="deepseek", distinct_ranks=True).phy2log)
    assert dist["distinct_ranks"] is True and dist["repeated_on_a_rank"] == 0
    assert np.allclose(dist["per_layer"]["after"], ref_balancedness(total, got, 4))
    assert out["windows"] == 3 and out["planned_from"] == "sum" and out["num_slots"] == 20
    default = default_placement_layers(4, 16, 4, 4)
    assert np.allclose(out["per_layer"]["before"], ref_balancedness(total, default, 4))
    assert np.allclose(out["per_layer"]["after"], ref_balancedness(total, phy2log, 4))
    assert np.all(np.array(out["per_layer"]["bound"]) >= np.array(out["per_layer"]["after"])
                  - 1e-9)
    assert out["balancedness_after"]["mean"] == pytest.approx(np.mean(out["per_layer"]["after"]))
    assert out["moved_slots"] is None  # nothing to move from without --old
    assert out["per_layer"]["moved_slots"] is None


def test_plan_last_window_and_other_formats(tmp_path):
    loads = synth(2, 3, 8, top_k=2, tokens_per_window=200, seed=2)
    torch.save({"loads": torch.from_numpy(loads)}, tmp_path / "l.pt")
    (tmp_path / "l.json").write_text(json.dumps(loads[-1].tolist()))
    a = json.loads(run_cli("plan", "--load", "l.pt", "--ranks", 2, "--window", "last",
                           "-o", "a.json", "--json", cwd=tmp_path).stdout)
    b = json.loads(run_cli("plan", "--load", "l.json", "--ranks", 2, "-o", "b.json", "--json",
                           cwd=tmp_path).stdout)
    assert a["planned_from"] == "last" and b["windows"] == 1
    # redundant default: smallest K >= ranks making experts + K divisible by ranks
    assert a["num_redundant"] == 2 and a["num_slots"] == 10
    assert a["per_layer"] == b["per_layer"]
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_plan_of_an_npz_trace_loads_no_torch(tmp_path, small_trace):
    """plan (numpy trace, default placement) runs without importing torch: about a second of
    start-up less a run (it came in through the default placement's module)."""
    code = ("import sys; from eplb_native import cli; rc = cli.main(['plan', '--load', "
            f"{str(small_trace)!r}, '--ranks', '4', '-o', 'm.json']); "
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.split()[-2:] == ["0", "False"], (proc.stdout, proc.stderr)


def test_plan_from_old_map_min_move(tmp_path, small_trace):
    first = json.loads(run_cli("plan", "--load", small_trace, "--ranks", 4, "--redundant", 4,
                               "-o", "old.json", "--json", cwd=tmp_path).stdout)
    loads, _ = load_trace(small_trace)
    shifted = loads[::-1].copy()
    shifted[0, :, 0] += 5000  # a newly hot expert
    np.save(tmp_path / "new.npy", shifted)
    out = json.loads(run_cli("plan", "--load", "new.npy", "--old", "old.json", "--policy",
                             "min_move", "-o", "new.json", "--json", cwd=tmp_path).stdout)
    old, _ = expert_map.load(tmp_path / "old.json")
    new, ranks = expert_map.load(tmp_path / "new.json")
    assert ranks == 4 and out["num_ranks"] == 4  # taken from the old map
    assert out["before_placement"] == "--old placement"
    total = shifted.sum(axis=0)
    assert np.allclose(out["per_layer"]["before"], ref_balancedness(total, old, 4))
    assert np.allclose(out["per_layer"]["after"], ref_balancedness(total, new, 4))
    assert out["moved_slots"] == int((new != old).sum())
    assert out["per_layer"]["moved_slots"] == (new != old).sum(axis=1).tolist()
    assert first["num_redundant"] == out["num_redundant"] == 4


def _map_with(layer, device, experts, **layer_keys):
    """An 8-expert, 2-rank, 2-layer expert map with one device's ids or one layer's keys set."""
    doc = expert_map.to_json_dict(np.tile(np.arange(8), (2, 1)), 2)
    if device is not None:
        doc["layer_list"][layer]["device_list"][device]["device_expert"] = experts
    doc["layer_list"][layer].update(layer_keys)
    return doc


@pytest.mark.parametrize("setup, args, fragments", [
    (None, ["--load", "missing.npz", "--ranks", "4"], ["missing.npz", "no such file"]),
    (lambda d: np.savez(d / "k.npz", weights=np.ones((2, 8))), ["--load", "k.npz", "--ranks", "4"],
     ["k.npz", "missing key 'loads'"]),
    (lambda d: np.save(d / "v.npy", np.ones(8)), ["--load", "v.npy", "--ranks", "4"],
     ["v.npy", "ndim 1"]),
    (lambda d: (d / "n.json").write_text('{"not": "a trace"}'),
     ["--load", "n.json", "--ranks", "4"], ["n.json", "missing key 'loads'"]),
    (lambda d: (d / "x.txt").write_text("1 2 3"), ["--load", "x.txt", "--ranks", "4"],
     ["unsupported trace file extension"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", "4",
                                                       "--redundant", "3"], ["divisible"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", "0"],
     ["--ranks"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy"], ["--ranks is required"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", "4",
                                                       "--old", "nope.json"], ["nope.json"]),
    (lambda d: (np.save(d / "g.npy", np.ones((2, 8))), expert_map.save(
        d / "o.json", np.tile(np.arange(8), (2, 1)), 2)),
     ["--load", "g.npy", "--ranks", "4", "--old", "o.json"], ["2 ranks", "--ranks is 4"]),
    (lambda d: (np.save(d / "g.npy", np.ones((3, 8))), expert_map.save(
        d / "o.json", np.tile(np.arange(8), (2, 1)), 2)),
     ["--load", "g.npy", "--old", "o.json"], ["2 layers", "3"]),
    (lambda d: (np.save(d / "g.npy", np.ones((2, 8))), expert_map.save(
        d / "o.json", np.tile(np.arange(8) % 7, (2, 1)), 2)),
     ["--load", "g.npy", "--old", "o.json"], ["no copy of logical experts [7]"]),
    (lambda d: (np.save(d / "g.npy", np.ones((2, 8))), (d / "o.json").write_text("{}")),
     ["--load", "g.npy", "--old", "o.json"], ["o.json", "moe_layer_count"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", "4", "-o",
                                                       "no/dir/m.json"], ["does not exist"]),
    (lambda d: (np.save(d / "g.npy", np.ones((2, 8))), (d / "m.json").mkdir()),
     ["--load", "g.npy", "--ranks", "4", "-o", "m.json"], ["-o: m.json is a directory"]),
    (lambda d: (np.save(d / "g.npy", np.ones((2, 8))), (d / "o.json").write_text(json.dumps(
        _map_with(0, 0, [0, 2**70])))),
     ["--load", "g.npy", "--old", "o.json"], ["--old o.json", "2**62"]),
    (lambda d: (np.save(d / "g.npy", np.ones((2, 8))), (d / "o.json").write_text(json.dumps(
        _map_with(1, None, None, layer_id="1")))),
     ["--load", "g.npy", "--old", "o.json"], ["--old o.json", "layer_id", "'1'"]),
    (lambda d: (np.save(d / "g.npy", np.ones((2, 8))), (d / "o.json").write_bytes(b"{\xff}")),
     ["--load", "g.npy", "--old", "o.json"], ["o.json", "not UTF-8"]),
    # output paths that cannot be written, named by their flag before any work (a temporary
    # file beside it was named instead, after the work)
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", "4", "-o",
                                                       "/proc/m.json"],
     ["-o '/proc/m.json': folder '/proc'"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", "4", "-o",
                                                       ""], ["-o: empty path"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--old", "none.json"],
     ["--old none.json: no such file"]),
    (lambda d: (np.save(d / "g.npy", np.ones((2, 8))), (d / "adir").mkdir()),
     ["--load", "g.npy", "--old", "adir"], ["--old adir: is a directory"]),
    (lambda d: (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000),
     ["--load", "deep.json", "--ranks", "4"], ["deep.json", "nested too deeply"]),
    # counts too large: an error at once, not an OverflowError or a default placement built
    # for hours
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", 10**23],
     ["--ranks must be <= 1048576"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", "4",
                                                       "--redundant", 4_000_000_000],
     ["(8 + 4000000000) must be <= 1048576 slots per layer"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", "4",
                                                       "--threads", 10**20],
     ["--threads must be <= 4096"]),
    (lambda d: np.save(d / "g.npy", np.ones((2, 8))), ["--load", "g.npy", "--ranks", "4",
                                                       "--nodes", 10**23],
     ["--nodes must be <= 1048576"]),
])
def test_plan_bad_input_is_one_line_exit_2(tmp_path, setup, args, fragments):
    if setup:
        setup(tmp_path)
    if "-o" not in args:
        args = [*args, "-o", "m.json"]
    proc = run_cli("plan", *args, cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", *fragments)
    assert not (tmp_path / "m.json").is_file()


@pytest.mark.parametrize("meta, fragment", [
    ({"num_groups": 10**30}, "the trace's meta 'num_groups' must be <= 1048576"),
    ({"num_groups": 0}, "the trace's meta 'num_groups' must be an int >= 1"),
    ({"num_ranks": 4, "num_nodes": 10**9}, "the trace's meta 'num_nodes' must be <= 1048576"),
    ({"num_ranks": 4, "num_redundant": -1}, "the trace's meta 'num_redundant' must be an int"),
])
def test_plan_names_trace_meta_values_not_flags(tmp_path, meta, fragment):
    save_trace(tmp_path / "t.npz", np.ones((2, 2, 8)), **meta)
    proc = run_cli("plan", "--load", "t.npz", "--ranks", 4, "-o", "m.json", cwd=tmp_path,
                   expect=2)
    assert_one_line_error(proc, "plan", fragment)


def test_argparse_errors_exit_2(tmp_path):
    proc = run_cli("plan", "--ranks", "four", "--load", "x.npz", "-o", "m.json", cwd=tmp_path,
                   expect=2)
    assert "expected an integer" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("nonsense", cwd=tmp_path, expect=2)
    assert "invalid choice" in proc.stderr


# --------------------------------------------------------------------------- simulate


def test_balancedness_helper_matches_reference():
    rng = np.random.default_rng(4)
    load = rng.lognormal(0, 1, (5, 12))
    phy2log = np.stack([rng.permutation(np.r_[np.arange(12), rng.integers(0, 12, 4)])
                        for _ in range(5)])
    assert np.allclose(balancedness(load, phy2log, 4), ref_balancedness(load, phy2log, 4))


def test_simulate_json_matches_the_reference_loop(tmp_path, small_trace):
    proc = run_cli("simulate", "--trace", small_trace, "--ranks", 4, "--redundant", 4,
                   "--every", 2, "--policy", "deepseek,balanced", "--expert-bytes", 1000,
                   "--png", "sim.png", "--json", cwd=tmp_path)
    out = json.loads(proc.stdout)
    loads, _ = load_trace(small_trace)
    assert out["windows"] == 7 and out["judged_windows"] == 5 and out["every"] == 2
    assert out["distinct_ranks"] is None  # (what the plans ran with: balanced's preference)
    assert set(out["policies"]) == {"static", "deepseek", "balanced"}
    default = default_placement_layers(3, 16, 4, 4)

    def deepseek(window, placement):
        p = eplb_native.plan(window, placement, num_ranks=4, policy="deepseek")
        return p.phy2log

    want, moved = ref_simulate(loads, default, 4, 2, deepseek)
    got = out["policies"]["deepseek"]
    per_window = np.array([np.nan if v is None else v for v in
                           got["out_of_sample"]["per_window"]])
    assert np.isnan(per_window[:2]).all()
    assert np.allclose(per_window[2:], want[2:])
    assert got["out_of_sample"]["mean"] == pytest.approx(want[2:].mean())
    assert got["out_of_sample"]["min"] == pytest.approx(want[2:].min())
    assert got["moved_slots_per_rebalance"] == moved and got["rebalances"] == 3
    assert got["moved_bytes"] == sum(moved) * 1000
    assert got["in_sample"]["mean"] is not None
    static = out["policies"]["static"]
    assert static["moved_slots"] == 0 and static["in_sample"] is None
    assert np.allclose(static["out_of_sample"]["per_window"],
                       [ref_balancedness(w, default, 4).mean() for w in loads])
    assert out["png"] == "sim.png"
    assert_valid_png(tmp_path / "sim.png")


def test_simulate_text_table_and_shape_defaults(tmp_path):
    # a synth trace of a known shape records its deployment: groups, nodes, redundant, bytes
    run_cli("synth", "--shape", "deepseek-v3", "--layers", 2, "--windows", 3, "--tokens", 256,
            "-o", "ds.npz", cwd=tmp_path)
    proc = run_cli("simulate", "--trace", "ds.npz", "--ranks", 32, cwd=tmp_path)
    text = proc.stdout
    assert "288 slots (256 experts + 32 redundant) on 32 ranks, 4 node(s), 8 group(s)" in text
    for name in ("no EPLB", "deepseek", "balanced", "min_move", "GiB", "wrote simulate.png"):
        assert name in text
    assert_valid_png(tmp_path / "simulate.png")


def test_simulate_weighs_windows_by_their_steps(tmp_path, small_trace):
    """A trace whose meta gives each window's steps (Updator.save_trace; the first window is
    shorter under first_plan_after) weighs the out-of-sample mean by them: a window served for
    twice the steps counts twice; one of no steps is out of the mean and of the min."""
    loads, _ = load_trace(small_trace)
    steps = [5, 20, 40, 10, 0, 20, 30]
    save_trace(tmp_path / "w.npz", loads, window_steps=steps)
    args = ["--ranks", 4, "--redundant", 4, "--every", 2, "--policy", "deepseek", "--json"]
    plain = json.loads(run_cli("simulate", "--trace", small_trace, *args, cwd=tmp_path).stdout)
    out = json.loads(run_cli("simulate", "--trace", "w.npz", *args, cwd=tmp_path).stdout)
    assert plain["window_steps"] is None and out["window_steps"] == steps
    assert plain["judged_windows"] == 5 and out["judged_windows"] == 4  # (one of 0 steps)
    for name in ("static", "deepseek"):
        per_window = np.array(out["policies"][name]["out_of_sample"]["per_window"][2:])
        assert per_window.tolist() == plain["policies"][name]["out_of_sample"]["per_window"][2:]
        w = np.array(steps[2:], dtype=float)
        got = out["policies"][name]["out_of_sample"]
        assert got["mean"] == pytest.approx((per_window * w).sum() / w.sum())
        assert got["mean"] != pytest.approx(per_window.mean())
        assert got["min"] == pytest.approx(np.delete(per_window, 2).min())
    text = run_cli("simulate", "--trace", "w.npz", *args[:-1], "--no-png", cwd=tmp_path).stdout
    assert "weighted by the steps of load each window sums" in text


@pytest.mark.parametrize("steps, fragment", [
    ([1, 2], "a list of 7 ints"),
    ([1, 2, 3, 4, 5, 6, -1], "a list of 7 ints"),
    ([1, 2, 3, 4, 5, 6, True], "a list of 7 ints"),
    ([1, 2, 3, 4, 5, 6, 2.0], "a list of 7 ints"),
    ("1234567", "a list of 7 ints"),
    ([1, 2, 3, 4, 5, 6, 2**62 + 1], "a list of 7 ints"),
    ([9, 9, 0, 0, 0, 0, 0], "no steps"),
])
def test_simulate_bad_window_steps(tmp_path, small_trace, steps, fragment):
    loads, _ = load_trace(small_trace)
    save_trace(tmp_path / "w.npz", loads, window_steps=steps)
    proc = run_cli("simulate", "--trace", "w.npz", "--ranks", 4, "--every", 2, "--json",
                   cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "simulate", "meta 'window_steps'")
    assert fragment in proc.stderr


def test_simulate_json_writes_no_plot_it_was_not_asked_for(tmp_path, small_trace):
    out = json.loads(run_cli("simulate", "--trace", small_trace, "--ranks", 4, "--json",
                             cwd=tmp_path).stdout)
    assert out["png"] is None and not any(tmp_path.iterdir())


def test_simulate_distinct_ranks(tmp_path, small_trace):
    """--distinct-ranks plans every rebalance with distinct_ranks=True: the same numbers as
    the library, and said so in the JSON and the text."""
    out = json.loads(run_cli("simulate", "--trace", small_trace, "--ranks", 4, "--policy",
                             "deepseek", "--distinct-ranks", "--no-png", "--json",
                             cwd=tmp_path).stdout)
    assert out["distinct_ranks"] is True
    loads, _ = load_trace(small_trace)
    default = default_placement_layers(loads.shape[1], loads.shape[2], 4, out["num_redundant"])
    placement, want = default, []
    for w in range(1, loads.shape[0]):
        placement = eplb_native.plan(loads[w - 1], placement, num_ranks=4, policy="deepseek",
                                     distinct_ranks=True).phy2log
        assert not expert_map.repeated_on_a_rank(placement, 4)
        want.append(ref_balancedness(loads[w], placement, 4).mean())
    assert np.allclose(out["policies"]["deepseek"]["out_of_sample"]["per_window"][1:], want)
    text = run_cli("simulate", "--trace", small_trace, "--ranks", 4, "--distinct-ranks",
                   "--no-png", cwd=tmp_path).stdout
    assert "no rank holds an expert twice" in text


@pytest.mark.parametrize("flag, layout, label", [
    ([], "vllm", "vLLM / vllm-ascend >= 0.24 default placement"),  # the default
    (["--default-layout", "vllm"], "vllm", "vLLM / vllm-ascend >= 0.24 default placement"),
    (["--default-layout", "vllm-ascend"], "vllm-ascend", "vllm-ascend <= 0.23 default placement"),
])
def test_default_layout(tmp_path, small_trace, flag, layout, label):
    """--default-layout: "before" and min_move's start are that server's initial placement;
    without the flag vLLM's (vllm-ascend's too from 0.24 on)."""
    loads, meta = load_trace(small_trace)
    total = loads.sum(axis=0)
    out = json.loads(run_cli("plan", "--load", small_trace, "--ranks", 4, "--redundant", 4,
                             *flag, "--policy", "min_move", "-o", "m.json",
                             "--json", cwd=tmp_path).stdout)
    start = default_placement_layers(3, 16, 4, 4, layout)
    assert out["before_placement"] == label
    assert out["default_layout"] == layout
    assert np.allclose(out["per_layer"]["before"], ref_balancedness(total, start, 4))
    got, _ = expert_map.load(tmp_path / "m.json")
    want = eplb_native.plan(total, start, num_ranks=4, policy="min_move", distinct_ranks=True)
    assert np.array_equal(got, want.phy2log)
    sim = json.loads(run_cli("simulate", "--trace", small_trace, "--ranks", 4, "--policy",
                             "deepseek", *flag, "--no-png", "--json",
                             cwd=tmp_path).stdout)
    assert sim["default_layout"] == layout
    assert np.allclose(sim["policies"]["static"]["out_of_sample"]["per_window"],
                       [ref_balancedness(w, start, 4).mean() for w in loads])


def test_plan_distinct_ranks_refused_names_the_flag(tmp_path):
    # 4 experts on 2 ranks of 6 slots: some rank must hold an expert twice
    np.save(tmp_path / "w.npy", np.arange(1.0, 5.0)[None, :])
    proc = run_cli("plan", "--load", "w.npy", "--ranks", 2, "--redundant", 8, "-o", "m.json",
                   cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", "--allow-repeats", "slots per rank (6)")
    assert not (tmp_path / "m.json").exists()
    run_cli("plan", "--load", "w.npy", "--ranks", 2, "--redundant", 8, "--allow-repeats",
            "-o", "m.json", cwd=tmp_path)
    # simulate's own flag (review: it named plan's --allow-repeats, which simulate lacks)
    np.save(tmp_path / "t.npy", np.tile(np.arange(1.0, 5.0), (3, 1, 1)))
    proc = run_cli("simulate", "--trace", "t.npy", "--ranks", 2, "--redundant", 8,
                   "--distinct-ranks", "--no-png", cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "simulate", "--distinct-ranks", "slots per rank (6)")
    assert "--allow-repeats" not in proc.stderr
    # one rank: the default redundancy is 0 (one copy a rank was 1 slot there, which the
    # default distinct ranks refused: review 18)
    run_cli("plan", "--load", "w.npy", "--ranks", 1, "-o", "one.json", cwd=tmp_path)
    doc = json.loads((tmp_path / "one.json").read_text())
    assert sorted(doc["layer_list"][0]["device_list"][0]["device_expert"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("args, fragments", [
    (["--every", "7"], ["7 window(s)", "--every 7"]),
    (["--policy", "deepseek,fastest"], ["--policy"]),
    (["--policy", "deepseek,deepseek"], ["twice"]),
    (["--every", "0"], ["--every"]),
    (["--redundant", "3"], ["divisible"]),
    (["--png", "no/dir/x.png"], ["does not exist"]),
    (["--no-png", "--expert-bytes", "9" * 400], ["--expert-bytes must be in [0, 2**62]"]),
])
def test_simulate_bad_arguments(tmp_path, small_trace, args, fragments):
    proc = run_cli("simulate", "--trace", small_trace, "--ranks", 4, *args, cwd=tmp_path,
                   expect=2)
    assert_one_line_error(proc, "simulate", *fragments)
    assert not (tmp_path / "simulate.png").exists()


def test_simulate_without_matplotlib_fails_first(tmp_path, small_trace):
    """--png without matplotlib: one line naming it, before the simulation runs (the error
    came after it)."""
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    proc = run_cli("simulate", "--trace", small_trace, "--ranks", 4, "--png", "s.png",
                   cwd=tmp_path, expect=2, path_first=fake)
    assert_one_line_error(proc, "simulate", "needs matplotlib", "--no-png")
    assert not proc.stdout and not (tmp_path / "s.png").exists()


def test_plan_sum_overflowing_float64_is_one_line(tmp_path):
    np.save(tmp_path / "f.npy", np.full((2, 2, 8), 1e308))
    proc = run_cli("plan", "--load", "f.npy", "--ranks", 2, "-o", "o.json", cwd=tmp_path,
                   expect=2)
    assert_one_line_error(proc, "plan", "--load f.npy", "overflow float64 at [layer, expert] "
                          "[0, 0]")
    assert not (tmp_path / "o.json").exists()
    # one window whose layer sums past the planner's bound: the file named, not `load`
    np.save(tmp_path / "g.npy", np.full((1, 2, 8), 4e307))
    proc = run_cli("plan", "--load", "g.npy", "--ranks", 2, "-o", "o.json", cwd=tmp_path,
                   expect=2)
    assert_one_line_error(proc, "plan", "--load g.npy: layer 0 sums to")


def test_simulate_bad_trace_file(tmp_path):
    save_trace(tmp_path / "ok.npz", np.ones((2, 2, 4)))
    (tmp_path / "bad.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:40])
    proc = run_cli("simulate", "--trace", "bad.npz", "--ranks", 2, cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "simulate", "bad.npz")


# --------------------------------------------------------------------------- demo

TINY_DEMO = ["--ranks", 2, "--layers", 2, "--experts", 8, "--redundant", 2, "--top-k", 2,
             "--steps", 12, "--interval", 4, "--tokens", 16, "--hidden", 16]


def test_demo_does_not_report_a_stale_trace(tmp_path):
    """With fewer steps than one window no trace is saved: a file of that name from before is
    neither reported as written nor touched."""
    (tmp_path / "rec.npz").write_text("STALE")
    short = [str(x) for x in TINY_DEMO]
    short[short.index("--steps") + 1] = "3"
    proc = run_cli("demo", *short, "--png", "", "--save-trace", "rec.npz", cwd=tmp_path)
    assert "not written" in proc.stdout and "wrote rec.npz" not in proc.stdout
    assert (tmp_path / "rec.npz").read_text() == "STALE"
    out = json.loads(run_cli("demo", *short, "--png", "", "--save-trace", "rec.npz", "--json",
                             cwd=tmp_path).stdout)
    assert out["trace"] is None and "trace_written" not in out


def test_demo_json_rebalances_and_keeps_outputs(tmp_path):
    proc = run_cli("demo", *TINY_DEMO, "--png", "demo.png", "--save-trace", "rec.npz", "--json",
                   cwd=tmp_path)
    out = json.loads(proc.stdout)
    assert out["backend"] == "gloo" and out["ranks"] == 2
    assert out["outputs_close"] is True  # same function with EPLB on and off
    on = np.array(out["balancedness_per_step"])
    off = np.array(out["balancedness_per_step_eplb_off"])
    assert on.shape == off.shape == (12, 2)
    assert ((on > 0) & (on <= 1)).all() and ((off > 0) & (off <= 1)).all()
    # both stacks start on the same (default) placement and see the same tokens
    assert np.array_equal(on[:4], off[:4])
    rebalances = out["rebalances"]
    assert len(rebalances) == 2 and [r["step"] for r in rebalances] == [5, 9]
    expert_bytes = out["expert_bytes"]
    assert expert_bytes == 3 * 16 * 16 * 4
    for r in rebalances:
        assert 0 < r["balancedness_before"] <= 1 and 0 < r["balancedness_after"] <= 1
        assert r["balancedness_bound"] >= r["balancedness_after"] - 1e-9
        assert 0 <= r["moved_bytes"] <= r["moved_slots"] * expert_bytes
        assert r["plan_ms"] > 0 and r["move_span_ms"] >= 0
        # what switched, not what was planned: a layer still queued at the end is dropped
        assert 0 <= r["switched_layers"] <= r["planned_layers"] <= 2 and r["failed_layers"] == 0
        assert 0 <= r["moved_slots"] <= r["planned_slots"]
        assert (r["moved_slots"] == r["planned_slots"]) == (
            r["switched_layers"] == r["planned_layers"])
        assert (r["move_steps"] is None) == (r["switched_layers"] == 0)
    first = rebalances[0]
    assert first["switched_layers"] == first["planned_layers"] > 0
    assert first["moved_slots"] > 0 and first["moved_bytes"] > 0
    assert first["move_steps"] >= 1  # the layers moved while the steps ran on
    assert out["failed_layer_moves"] == 0
    # what serving sees after the first move: better balance than the EPLB-off twin
    assert on[6:].mean() > off[6:].mean()
    assert_valid_png(tmp_path / "demo.png")
    loads, meta = load_trace(tmp_path / "rec.npz")
    # 3 gathered windows of 4 steps x 16 tokens x 2 ranks x top-2
    assert loads.shape == (3, 2, 8) and (loads.sum(axis=2) == 4 * 16 * 2 * 2).all()
    assert meta["num_ranks"] == 2 and meta["num_redundant"] == 2
    assert "[" not in proc.stderr  # no progress bar in --json mode


def test_demo_text_summary(tmp_path):
    proc = run_cli("demo", *TINY_DEMO, "--policy", "min_move", "--png", "d.png", cwd=tmp_path)
    text = proc.stdout
    for fragment in ("bal before", "bal after", "bound", "slots moved", "bytes moved",
                     "plan ms", "move steps", "layers", "outputs identical to EPLB-off: yes", "wrote d.png",
                     "policy min_move"):
        assert fragment in text, fragment
    assert "step 12/12" in proc.stderr and "balancedness" in proc.stderr
    assert_valid_png(tmp_path / "d.png")


def test_demo_counts_what_switched_not_what_was_planned(tmp_path):
    """A plan taken one step before the end switches one of its two layers (one a step): the
    table says 1/2 and counts that layer's slots only, and a line says what was dropped (the
    planned slots were reported as moved)."""
    proc = run_cli("demo", *TINY_DEMO, "--steps", "10", "--json", cwd=tmp_path)
    assert json.loads(proc.stdout)["png"] is None  # --json: no plot unless named
    assert not (tmp_path / "demo.png").exists()
    last = json.loads(proc.stdout)["rebalances"][-1]
    assert (last["step"], last["planned_layers"], last["switched_layers"]) == (9, 2, 1)
    assert 0 < last["moved_slots"] < last["planned_slots"] and last["move_steps"] == 1
    assert last["failed_layers"] == 0
    text = run_cli("demo", *TINY_DEMO, "--steps", "10", "--png", "", cwd=tmp_path).stdout
    assert ("rebalance 2: 1 of its 2 layers had not moved when the run ended (dropped at "
            "shutdown; their slots are not counted)") in text, text


def test_demo_planned_slots_are_those_of_the_layers_it_moves(tmp_path):
    """planned_slots counts the layers the updator moves, not every layer the plan changed (a
    layer that would not balance better stays): with every planned layer switched, moved and
    planned slots are equal (a review's seed: 12 planned against 11 moved before)."""
    out = json.loads(run_cli("demo", "--ranks", 2, "--layers", 4, "--experts", 8, "--redundant",
                             2, "--top-k", 2, "--steps", 24, "--interval", 4, "--tokens", 16,
                             "--hidden", 16, "--png", "", "--json", "--policy", "balanced",
                             "--seed", 0, cwd=tmp_path).stdout)
    done = [r for r in out["rebalances"] if r["switched_layers"] == r["planned_layers"]]
    assert done and all(r["moved_slots"] == r["planned_slots"] for r in done), done


@pytest.mark.parametrize("args, fragments", [
    (["--ranks", "2", "--experts", "8", "--redundant", "3"], ["divisible by --ranks (2)"]),
    (["--experts", "4", "--top-k", "5", "--redundant", "0"], ["--top-k (5)"]),
    (["--steps", "0"], ["--steps"]),
    (["--drift", "1.5"], ["--drift"]),
    (["--device", "cuda", "--ranks", "80"], ["GPUs"]),
    (["--png", "no/dir/d.png"], ["does not exist"]),
    (["--seed", "-1"], ["--seed must be >= 0, got -1"]),
    (["--skew", "1e308"], ["--skew must lie in [0, 1e+06], got 1e+308"]),
    (["--ranks", "80"], ["--ranks on --device cpu must be <= 64", "80"]),
    (["--tokens", "1000000000000"], ["--tokens must be <= 1048576"]),
    (["--save-trace", "rec.npy"], ["--save-trace rec.npy", "*.npz"]),
    (["--seed", str(2**48)], [f"--seed must be <= {2**32 - 1}"]),
    (["--hidden", "1048576"], ["--hidden 1048576", "GiB of expert weights"]),
    (["--png", "/proc/d.png"], ["--png '/proc/d.png': folder '/proc'"]),
    (["--save-trace", "/proc/t.npz"], ["--save-trace '/proc/t.npz': folder '/proc'"]),
    (["--png", "both.npz", "--save-trace", "both.npz"],
     ["--png both.npz is the --save-trace file"]),
    (["--steps", "1048576", "--layers", "64", "--experts", "4096", "--hidden", "1",
      "--ranks", "1", "--redundant", "0"], ["--steps 1048576 x", "GiB of gate biases"]),
])
def test_demo_bad_arguments(tmp_path, args, fragments):
    proc = run_cli("demo", *args, cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "demo", *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written


# --------------------------------------------------------------------------- fuzz (in process)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       kind=st.sampled_from(["uniform", "zeros", "negative", "nan", "skewed"]),
       ranks=st.integers(-1, 5), nodes=st.integers(0, 3), groups=st.integers(0, 4),
       redundant=st.integers(-1, 6), policy=st.sampled_from(["deepseek", "balanced",
                                                             "min_move"]))
def test_fuzz_plan_never_crashes(tmp_path, capsys, shape, kind, ranks, nodes, groups, redundant,
                                 policy):
    from eplb_native.cli import main

    rng = np.random.default_rng(len(shape) * 7 + ranks)
    loads = {"uniform": np.ones(shape), "zeros": np.zeros(shape),
             "negative": -np.ones(shape), "nan": np.full(shape, np.nan),
             "skewed": rng.lognormal(0, 2, shape)}[kind]
    np.save(tmp_path / "f.npy", loads)
    out = tmp_path / "m.json"
    if out.exists():
        out.unlink()
    rc = main(["plan", "--load", str(tmp_path / "f.npy"), "--ranks", str(ranks), "--nodes",
               str(nodes), "--groups", str(groups), "--redundant", str(redundant), "--policy",
               policy, "-o", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc in (0, 2)
    if rc == 2:
        assert captured.err.startswith("eplb-native plan: error: ")
        assert len(captured.err.strip().splitlines()) == 1
        assert not out.exists()
    else:
        result = json.loads(captured.out)
        phy2log, got_ranks = expert_map.load(out)
        experts = shape[-1]
        assert got_ranks == ranks and phy2log.shape[1] == experts + redundant
        assert all(set(row.tolist()) == set(range(experts)) for row in phy2log)
        assert len(shape) in (2, 3)  # a 1-D file is not a trace
        total = loads.sum(axis=0) if len(shape) == 3 else loads  # windows are summed
        assert np.allclose(result["per_layer"]["after"], ref_balancedness(total, phy2log, ranks))


def test_plan_sums_huge_counts_without_wrapping(tmp_path):
    # 3 windows of ~2**62: the int64 sum would wrap negative; the planner gets the float64 sum
    rng = np.random.default_rng(11)
    loads = rng.integers(2**61, 2**62, (3, 2, 8), dtype=np.int64)
    np.save(tmp_path / "huge.npy", loads)
    out = json.loads(run_cli("plan", "--load", "huge.npy", "--ranks", 4, "-o", "m.json", "--json",
                             cwd=tmp_path).stdout)
    total = loads.astype(np.float64).sum(axis=0)
    before = ref_balancedness(total, default_placement_layers(2, 8, 4, 4), 4)
    assert np.allclose(out["per_layer"]["before"], before)


@pytest.mark.parametrize("command, args, fragments", [
    ("plan", ["--load", "g.npy", "--ranks", "4", "--groups", "6", "--nodes", "2", "-o", "m.json"],
     ["divisible by --groups (6)", "--groups % --nodes"]),
    ("plan", ["--load", "g.npy", "--ranks", "4", "--nodes", "3", "-o", "m.json"],
     ["--ranks (4) must be divisible by --nodes (3)"]),
    ("plan", ["--load", "g.npy", "--ranks", "4", "--threads", "0", "-o", "m.json"],
     ["--threads must be >= 1, got 0"]),
    ("simulate", ["--trace", "g.npy", "--ranks", "4", "--threads", "0", "--no-png"],
     ["--threads must be >= 1, got 0"]),
])
def test_planner_errors_name_the_flags(tmp_path, command, args, fragments):
    np.save(tmp_path / "g.npy", np.ones((3, 2, 16)))
    proc = run_cli(command, *args, cwd=tmp_path, expect=2)
    assert_one_line_error(proc, command, *fragments)
    for param in ("num_ranks", "num_nodes", "num_groups", "threads must"):
        assert param not in proc.stderr.replace("--threads must", ""), proc.stderr


def test_output_piped_into_a_reader_that_leaves_is_not_an_error(tmp_path):
    """`eplb-native plan ... | head -1`: the reader leaving is no usage error (it printed
    "error: Broken pipe" and exited 2 although the map was written): quiet, the command's own
    status when it had finished, else 141 as a process killed by SIGPIPE."""
    np.save(tmp_path / "g.npy", np.ones((3, 8)))
    env = dict(os.environ, PYTHONPATH=PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "eplb_native.cli", "plan", "--load", "g.npy",
                             "--ranks", "4", "--per-layer", "-o", "m.json"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 141) and not err, (proc.returncode, err)
    assert (tmp_path / "m.json").is_file()


def test_demo_summary_counts_the_steps_it_ran(tmp_path):
    proc = run_cli("demo", *TINY_DEMO, "--steps", "3", "--png", "", cwd=tmp_path)
    assert "the last 3 steps" in proc.stdout, proc.stdout


@pytest.mark.parametrize("args, command, fragment", [
    (["plan", "--load", "x.npz", "--ranks", "abc", "-o", "m.json"], "plan",
     "argument --ranks: expected an integer, got 'abc'"),
    (["plan", "--ranks", "2"], "plan", "required: --load, -o/--output"),
    (["simulate", "--trace", "t.npz", "--ranks", "2", "--every", "x"], "simulate", "--every"),
    (["demo", "--policy", "fast"], "demo", "argument --policy: invalid choice: 'fast'"),
])
def test_usage_errors_are_one_line(tmp_path, args, command, fragment):
    """argparse's own errors are one line too (it printed its usage block first)."""
    proc = run_cli(*args, cwd=tmp_path, expect=2)
    assert_one_line_error(proc, command, fragment, f"(see eplb-native {command} --help)")
    top = run_cli(cwd=tmp_path, expect=2)
    assert top.stderr.strip().splitlines() == [
        "eplb-native: error: the following arguments are required: COMMAND "
        "(see eplb-native --help)"]


def test_an_output_is_never_the_input_it_reads(tmp_path, small_trace):
    """-o / --png naming the file the run reads (links followed) is refused before any work, and
    the input is left as it was (it was replaced by the map / the plot, exit 0); -o may be --old
    (a map updated in place); --old "" is no path (it was taken as no --old)."""
    import shutil

    trace = tmp_path / "t.npz"
    shutil.copy(small_trace, trace)
    (tmp_path / "link.npz").symlink_to(trace)
    before = trace.read_bytes()
    for command, args, fragment in [
            ("plan", ["--load", "t.npz", "--ranks", 4, "-o", "t.npz"], "-o t.npz is the --load"),
            ("plan", ["--load", "t.npz", "--ranks", 4, "-o", "link.npz"], "is the --load file"),
            ("simulate", ["--trace", "t.npz", "--ranks", 4, "--png", "link.npz"],
             "--png link.npz is the --trace file"),
            ("plan", ["--load", "t.npz", "--ranks", 4, "--old", "", "-o", "m.json"],
             "--old: empty path"),
            # a trace's name for the map: a slip (vllm-ascend reads *.json maps only)
            ("plan", ["--load", "t.npz", "--ranks", 4, "-o", "m.NPZ"],
             "-o m.NPZ: plan writes an expert map (JSON); name it *.json")]:
        proc = run_cli(command, *args, cwd=tmp_path, expect=2)
        assert_one_line_error(proc, command, fragment)
        assert trace.read_bytes() == before
    run_cli("plan", "--load", "t.npz", "--ranks", 4, "-o", "m.json", cwd=tmp_path)
    first = json.loads((tmp_path / "m.json").read_text())
    run_cli("plan", "--load", "t.npz", "--old", "m.json", "--policy", "min_move", "-o", "m.json",
            cwd=tmp_path)
    assert json.loads((tmp_path / "m.json").read_text())["moe_layer_count"] == first[
        "moe_layer_count"]


def test_devices_and_closed_stdout(tmp_path, small_trace):
    """-o /dev/null throws the map away (it replaced the device with a plain file as root) and
    keeps --json; a run started with stdout closed ends 0, --json too (an AttributeError
    traceback); -o /dev/stdout prints the map before the summary, and is refused beside
    --json."""
    proc = run_cli("plan", "--load", small_trace, "--ranks", 4, "-o", os.devnull, "--json",
                   cwd=tmp_path)
    assert json.loads(proc.stdout)["num_ranks"] == 4
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    for json_flag in ([], ["--json"]):
        (tmp_path / "m.json").unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-m", "eplb_native.cli", "plan", "--load",
                               str(small_trace), "--ranks", "4", "-o", "m.json", *json_flag],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=_cli_env(), preexec_fn=lambda: os.close(1),
                              timeout=120)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert (tmp_path / "m.json").is_file()
    # stdout on the null device (or closed, then opened on it): no clash with -o /dev/null
    proc = subprocess.run([sys.executable, "-m", "eplb_native.cli", "plan", "--load",
                           str(small_trace), "--ranks", "4", "-o", os.devnull, "--json"],
                          cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=_cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the map on stdout beside --json's result would be two documents in one stream
    proc = run_cli("plan", "--load", small_trace, "--ranks", 4, "-o", "/dev/stdout", "--json",
                   cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", "-o /dev/stdout is stdout, where --json prints")
    proc = run_cli("plan", "--load", small_trace, "--ranks", 4, "-o", "/dev/stdout",
                   cwd=tmp_path)
    assert proc.stdout.startswith("{") and '"moe_layer_count": 3' in proc.stdout
    assert "wrote /dev/stdout" in proc.stdout


# --------------------------------------------------------------------------- plan for SGLang


def test_plan_writes_sglangs_placement_file(tmp_path, small_trace):
    """--format sglang: SGLang's --init-expert-location JSON, a row per hidden layer (the MoE
    layers last; dense rows SGLang's trivial placement); --old reads one (with --ranks) and
    min_move updates it in place; repeats allowed (SGLang serves them)."""
    out = json.loads(run_cli("plan", "--load", small_trace, "--ranks", 4, "--redundant", 4,
                             "--format", "sglang", "--hidden-layers", 5, "-o", "init.json",
                             "--json", cwd=tmp_path).stdout)
    assert out["format"] == "sglang" and out["hidden_layers"] == 5
    assert out["distinct_ranks"] is False
    rows = np.asarray(json.loads((tmp_path / "init.json").read_text())
                      ["physical_to_logical_map"])
    assert rows.shape == (5, 20)
    np.testing.assert_array_equal(rows[:2], np.tile(np.arange(20) % 16, (2, 1)))
    total = load_trace(small_trace)[0].sum(axis=0)
    assert np.allclose(out["per_layer"]["after"], ref_balancedness(total, rows[2:], 4))
    again = json.loads(run_cli("plan", "--load", small_trace, "--ranks", 4, "--format",
                               "sglang", "--hidden-layers", 5, "--old", "init.json", "--policy",
                               "min_move", "-o", "init.json", "--json", cwd=tmp_path).stdout)
    assert again["before_placement"] == "--old placement" and again["moved_slots"] == 0
    assert np.array_equal(json.loads((tmp_path / "init.json").read_text())
                          ["physical_to_logical_map"], rows.tolist())
    # the same file as SGLang's .pt (torch.save, a tensor) reads as --old too
    torch.save({"physical_to_logical_map": torch.from_numpy(rows)}, tmp_path / "init.pt")
    again = json.loads(run_cli("plan", "--load", small_trace, "--ranks", 4, "--format",
                               "sglang", "--hidden-layers", 5, "--old", "init.pt", "--policy",
                               "min_move", "-o", "again.json", "--json", cwd=tmp_path).stdout)
    assert again["moved_slots"] == 0
    # an SGLang file read for vllm-ascend's map: the same placement, repeats undone
    run_cli("plan", "--load", small_trace, "--ranks", 4, "--old", "init.json", "--policy",
            "min_move", "-o", "ascend.json", cwd=tmp_path)
    phy2log, ranks = expert_map.load(tmp_path / "ascend.json")
    assert ranks == 4 and not expert_map.repeated_on_a_rank(phy2log, 4)


def test_plan_sglang_dump_to_sglang_file_keeps_its_layers(tmp_path):
    """Planned from SGLang's own dump, the file's rows are the dump's layers: the dense layers
    the trace dropped come back at their places, with the trivial placement."""
    g = torch.Generator().manual_seed(2)
    counts = torch.zeros(3, 6, 8, dtype=torch.int32)
    counts[:, [1, 3, 4, 5]] = torch.randint(1, 50, (3, 4, 8), generator=g, dtype=torch.int32)
    torch.save({"rank": 0, "logical_count": counts}, tmp_path / "dump.pt")
    run_cli("plan", "--load", "dump.pt", "--ranks", 2, "--redundant", 2, "--format", "sglang",
            "-o", "init.json", cwd=tmp_path)
    rows = np.asarray(json.loads((tmp_path / "init.json").read_text())
                      ["physical_to_logical_map"])
    assert rows.shape == (6, 10)
    np.testing.assert_array_equal(rows[[0, 2]], np.tile(np.arange(10) % 8, (2, 1)))
    for r in rows[[1, 3, 4, 5]]:
        assert set(r.tolist()) == set(range(8))
    proc = run_cli("plan", "--load", "dump.pt", "--ranks", 2, "--format", "sglang",
                   "--hidden-layers", 7, "-o", "x.json", cwd=tmp_path, expect=2)
    last = proc.stderr.strip().splitlines()[-1]  # (after the reader's warning)
    assert last.startswith("eplb-native plan: error: --hidden-layers 7 disagrees")
    assert "counts 6 layers" in last and not (tmp_path / "x.json").exists()


def test_plan_sglang_rows_of_a_known_model_and_none_guessed(tmp_path):
    """A synth trace of a known model takes its hidden layers (DeepSeek-V3: 61, the 3 dense
    ones first); a trace that says nothing of them needs --hidden-layers: a file of one row per
    MoE layer would shift every layer of a model with dense layers (SGLang finds rows by
    hidden-layer index)."""
    run_cli("synth", "--shape", "deepseek-v3", "--windows", 2, "--tokens", 512, "-o", "ds.npz",
            cwd=tmp_path)
    run_cli("plan", "--load", "ds.npz", "--ranks", 32, "--format", "sglang", "-o", "ds.json",
            cwd=tmp_path)
    rows = np.asarray(json.loads((tmp_path / "ds.json").read_text())
                      ["physical_to_logical_map"])
    assert rows.shape == (61, 288)
    np.testing.assert_array_equal(rows[:3], np.tile(np.arange(288) % 256, (3, 1)))
    proc = run_cli("plan", "--load", "ds.npz", "--ranks", 32, "--format", "sglang",
                   "--hidden-layers", 62, "-o", "x.json", cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", "--hidden-layers 62 disagrees with the trace's model "
                          "(deepseek-v3), which has 61 layers")
    np.save(tmp_path / "plain.npy", load_trace(tmp_path / "ds.npz")[0])
    proc = run_cli("plan", "--load", "plain.npy", "--ranks", 32, "--format", "sglang",
                   "-o", "x.json", cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", "--format sglang needs --hidden-layers")
    # --old's rows must be the model's hidden layers
    proc = run_cli("plan", "--load", "plain.npy", "--ranks", 32, "--format", "sglang",
                   "--hidden-layers", 60, "--old", "ds.json", "-o", "x.json", cwd=tmp_path,
                   expect=2)
    assert_one_line_error(proc, "plan", "--old ds.json: has 61 rows (hidden layers), the "
                          "model 60")
    assert not (tmp_path / "x.json").exists()


def test_plan_from_sglangs_logical_count_file(tmp_path):
    """SGLang's --init-expert-location file holding a load ({"logical_count": [hidden layers,
    E]}, which SGLang plans from at start) is a trace here, read as its dumps are (dense
    layers' zero rows dropped, their places kept): plan it into SGLang's placement file. A
    ragged or non-numeric one is refused by name."""
    rng = np.random.default_rng(4)
    counts = np.zeros((5, 8), dtype=np.int64)
    counts[[1, 3, 4]] = rng.integers(1, 40, (3, 8))
    (tmp_path / "lc.json").write_text(json.dumps({"logical_count": counts.tolist()}))
    out = json.loads(run_cli("plan", "--load", "lc.json", "--ranks", 2, "--redundant", 2,
                             "--format", "sglang", "-o", "init.json", "--json",
                             cwd=tmp_path).stdout)
    assert out["num_layers"] == 3 and out["hidden_layers"] == 5
    rows = np.asarray(json.loads((tmp_path / "init.json").read_text())
                      ["physical_to_logical_map"])
    np.testing.assert_array_equal(rows[[0, 2]], np.tile(np.arange(10) % 8, (2, 1)))
    assert np.allclose(out["per_layer"]["after"],
                       ref_balancedness(counts[[1, 3, 4]].astype(float), rows[[1, 3, 4]], 2))
    loads, meta = load_trace(tmp_path / "lc.json")
    assert loads.shape == (1, 3, 8) and meta["sglang_layers"] == [1, 3, 4]
    for bad, fragment in (([[1, 2], [3]], "ragged"), ([[1, "x"]], "nested list of numbers"),
                          ([1, 2], "must be [layers, experts]")):
        (tmp_path / "bad.json").write_text(json.dumps({"logical_count": bad}))
        proc = run_cli("plan", "--load", "bad.json", "--ranks", 2, "--format", "sglang",
                       "--hidden-layers", 2, "-o", "x.json", cwd=tmp_path, expect=2)
        assert_one_line_error(proc, "plan", "bad.json", fragment)


def test_plan_sglang_dump_meta_is_checked(tmp_path):
    save_trace(tmp_path / "t.npz", np.ones((2, 3, 8)), sglang_num_layers="x")
    proc = run_cli("plan", "--load", "t.npz", "--ranks", 2, "--format", "sglang", "-o",
                   "x.json", cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", "meta 'sglang_num_layers' / 'sglang_layers'")
    save_trace(tmp_path / "t.npz", np.ones((2, 3, 8)), sglang_num_layers=5)  # (3 kept: which?)
    proc = run_cli("plan", "--load", "t.npz", "--ranks", 2, "--format", "sglang", "-o",
                   "x.json", cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", "do not describe its 3 layers")
    save_trace(tmp_path / "t.npz", np.ones((2, 3, 8)), sglang_num_layers=5,
               sglang_layers=[0, 4, 2])
    proc = run_cli("plan", "--load", "t.npz", "--ranks", 2, "--format", "sglang", "-o",
                   "x.json", cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", "do not describe its 3 layers")


@pytest.mark.parametrize("args, fragments", [
    (["--format", "sglang", "-o", "init.txt"], ["-o init.txt", "name it *.json"]),
    (["--format", "sglang", "-o", "INIT.JSON"], ["-o INIT.JSON", "name it *.json"]),
    (["--format", "sglang", "--hidden-layers", "3", "--default-layout", "vllm-ascend", "-o",
      "m.json"], ["--default-layout vllm-ascend with --format sglang"]),
    (["--hidden-layers", "5", "-o", "m.json"], ["--hidden-layers is for --format sglang"]),
    (["--format", "sglang", "--hidden-layers", "2", "-o", "m.json"],
     ["--hidden-layers 2 is fewer than the trace's 3 MoE layers"]),
    (["--format", "sglang", "--hidden-layers", "0", "-o", "m.json"], ["--hidden-layers"]),
    # (a MemoryError, "error: MemoryError"; 2 * 10**7 wrote 420 MB: review 18's fuzz)
    (["--format", "sglang", "--hidden-layers", "99999999999", "-o", "m.json"],
     ["--hidden-layers must be <= 65536, got 99999999999"]),
])
def test_plan_sglang_bad_flags(tmp_path, small_trace, args, fragments):
    proc = run_cli("plan", "--load", small_trace, "--ranks", 4, *args, cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", *fragments)
    assert not any(tmp_path.iterdir())


def test_plan_old_sglang_file_needs_ranks(tmp_path, small_trace):
    (tmp_path / "init.json").write_text(json.dumps(
        {"physical_to_logical_map": [list(range(16)) + [0, 1, 2, 3]] * 3}))
    proc = run_cli("plan", "--load", small_trace, "--old", "init.json", "-o", "m.json",
                   cwd=tmp_path, expect=2)
    assert_one_line_error(proc, "plan", "--old init.json", "give the ranks (--ranks)")
