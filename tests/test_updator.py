"""The updator end to end: multi-process (gloo on CPU; NCCL on GPUs with EPLB_TEST_BACKEND=nccl)
and single-process checks. Scenarios live in tests/updator_mp.py."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import eplb_native
from eplb_native import expert_map, state
from eplb_native.adapters import AdapterError
from eplb_native.nn import EPMoE, logical_weights_of_slots
from eplb_native.transfer import LayerMove, MoveLayout, StepBudget, layer_schedule, prepare_layout

BACKEND = os.environ.get("EPLB_TEST_BACKEND", "gloo")


@pytest.mark.parametrize("world,fault,budget_rows,batched", [
    (2, "raise", None, False), (4, "timeout", None, False), (2, "issue", 1, False),
    (4, "issue", 2, False), (4, "timeout", None, True), (4, "issue", 2, True)])
def test_multiprocess_rebalance(world, fault, budget_rows, batched, tmp_path):
    if BACKEND == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    import updator_mp

    # a rendezvous file of this test's own: no port to race other processes for
    init = f"file://{tmp_path}/rdzv"
    mp.spawn(updator_mp.scenario,
             args=(world, init, BACKEND, str(tmp_path), fault, budget_rows, batched),
             nprocs=world, join=True)


@pytest.mark.parametrize("world,budget_rows,batched", [(2, None, False), (4, 1, False),
                                                       (4, None, True), (4, 2, True)])
def test_multiprocess_move_to_random_placements(world, budget_rows, batched, tmp_path):
    if BACKEND == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    import updator_mp

    mp.spawn(updator_mp.scenario_move_to,
             args=(world, f"file://{tmp_path}/rdzv", BACKEND, str(tmp_path), budget_rows,
                   batched),
             nprocs=world, join=True)


def test_peer_batches():
    """vLLM's migration batching: every rank talks to at most one peer in a batch, every piece
    in one batch, the first batch free for it (the same on every rank: a pure function)."""
    from eplb_native.transfer import Piece, peer_batches

    rng = np.random.default_rng(8)
    for _ in range(300):
        ranks = int(rng.integers(2, 9))
        pairs = {(int(s), int(d)) for s, d in rng.integers(0, ranks, (int(rng.integers(0, 30)), 2))
                 if s != d}
        pieces = [Piece(s, d, 0, 1, ((0, 1),), -1) for s, d in sorted(pairs)]
        got = peer_batches(pieces)
        assert len(got) == len(pieces)
        for b in set(got):
            ends = [r for p, g in zip(pieces, got, strict=True) if g == b
                    for r in (p.src_rank, p.dst_rank)]
            assert len(ends) == len(set(ends)), (b, ends)
        for i, (p, b) in enumerate(zip(pieces, got, strict=True)):  # first fit
            for earlier in range(b):
                ends = {r for q, g in zip(pieces[:i], got[:i], strict=True) if g == earlier
                        for r in (q.src_rank, q.dst_rank)}
                assert p.src_rank in ends or p.dst_rank in ends
        assert peer_batches(pieces) == got
    assert peer_batches([]) == []


def test_two_ep_groups_in_one_world(tmp_path):
    if BACKEND == "nccl" and torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs")
    import updator_mp

    mp.spawn(updator_mp.two_ep_groups, args=(4, f"file://{tmp_path}/rdzv", BACKEND), nprocs=4,
             join=True)


def test_num_nodes_unset_counts_the_groups_hosts(tmp_path):
    if BACKEND == "nccl" and torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs")
    import updator_mp

    mp.spawn(updator_mp.node_count, args=(4, f"file://{tmp_path}/rdzv", BACKEND), nprocs=4,
             join=True)


def test_balancedness_threshold_is_agreed_by_every_rank(tmp_path):
    if BACKEND == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import updator_mp

    mp.spawn(updator_mp.balancedness_threshold, args=(2, f"file://{tmp_path}/rdzv", BACKEND),
             nprocs=2, join=True)


def test_configs_one_rank_refuses_or_that_differ_are_refused_on_every_rank(tmp_path):
    if BACKEND == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import updator_mp

    mp.spawn(updator_mp.config_refusals, args=(2, f"file://{tmp_path}/rdzv", BACKEND),
             nprocs=2, join=True)


@pytest.mark.parametrize("keys, want", [
    (["a"], (1, None)), (["a", "a", "a", "a"], (1, None)),
    (["a", "a", "b", "b"], (2, None)), (["x", "y", "z"], (3, None)),
    (["a", "a", "b", "b", "c", "c"], (3, None)),
    (["a", "b", "a", "b"], (1, "not in equal runs of consecutive ranks")),
    (["a", "a", "b", "c"], (1, "which do not divide the ranks")),
    (["a", "a", "a", "b"], (1, "not in equal runs of consecutive ranks")),
    (["a", "a", "b", "b", "b", "b"], (1, "not in equal runs of consecutive ranks")),
])
def test_nodes_of_hosts(keys, want):
    from eplb_native.updator import nodes_of_hosts

    assert nodes_of_hosts(keys) == want


def test_shutdown_after_a_fault_gives_its_groups_back(tmp_path):
    if BACKEND == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import updator_mp

    mp.spawn(updator_mp.shutdown_after_fault, args=(2, f"file://{tmp_path}/rdzv", BACKEND),
             nprocs=2, join=True)


def test_layer_move_from_prepared_layout():
    """One process: a move built from a layout prepared ahead stages the same rows as one built
    from the fills (local copies only here), and commits the new placement; a layout of
    another shape or neither fills nor layout is a ValueError."""
    rng = np.random.default_rng(3)
    old = rng.permutation(6)
    new = rng.permutation(6)
    g = torch.Generator().manual_seed(3)
    # slot i holds logical old[i]: rows of w are the logical experts' weights in slot order
    weights = [torch.stack([t[e] for e in old]) for t in
               (torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g))]
    logical = [torch.empty_like(t) for t in weights]
    for t, lt in zip(weights, logical, strict=True):
        lt[torch.from_numpy(old)] = t
    for how in ("fills", "layout"):
        live = [t.clone() for t in weights]
        staging = [torch.empty_like(t) for t in live]
        if how == "fills":
            move = LayerMove(live, staging, layer_schedule(old, new, 1), 0, None)
        else:
            move = LayerMove(live, staging, None, 0, None, layout=prepare_layout(old, new, 1))
        move.issue(StepBudget(1, 2))  # 2 rows a step: local copies spread over steps
        steps = 1
        while not move.all_issued:
            assert move.wait(1e18)
            move.issue(StepBudget(1, 2))
            steps += 1
        assert move.wait(1e18)
        changed = int((old != new).sum())
        assert changed > 2  # the seed makes the budget split the copies
        assert steps == max(1, -(-changed // 2)) and move.bytes_copied == changed * 4 * 6
        move.commit()
        for t, lt in zip(live, logical, strict=True):
            assert torch.equal(t, lt[torch.from_numpy(new)])
    with pytest.raises(ValueError, match="fills or a layout"):
        LayerMove(weights, [torch.empty_like(t) for t in weights], None, 0, None)
    with pytest.raises(ValueError, match="layout is for 2 ranks"):
        LayerMove(weights, [torch.empty_like(t) for t in weights], None, 0, None,
                  layout=prepare_layout(np.arange(6), np.arange(6)[::-1], 2))


def test_schedule_properties():
    rng = np.random.default_rng(3)
    for _ in range(200):
        ranks, e = int(rng.integers(1, 5)), int(rng.integers(2, 10))
        p = ranks * int(rng.integers(-(-e // ranks), -(-e // ranks) + 3))
        old = np.concatenate([rng.permutation(e), rng.integers(0, e, p - e)])
        new = np.concatenate([rng.permutation(e), rng.integers(0, e, p - e)])
        fills = layer_schedule(old, new, ranks)
        s = p // ranks
        got = old.copy()
        staged = {}
        for f in fills:
            if f.kind == "local":
                assert old[f.dst_rank * s + f.src_slot] == f.logical
            elif f.kind == "p2p":
                assert old[f.src_rank * s + f.src_slot] == f.logical
                assert f.logical not in old[f.dst_rank * s:(f.dst_rank + 1) * s]
            else:
                assert staged[(f.dst_rank, f.src_slot)] == f.logical
            staged[(f.dst_rank, f.dst_slot)] = f.logical
            got[f.dst_rank * s + f.dst_slot] = f.logical
        assert np.array_equal(got, new)
        p2p = [(f.dst_rank, f.logical) for f in fills if f.kind == "p2p"]
        assert len(p2p) == len(set(p2p)), "an expert sent twice to one rank"


def _random_placement(rng, ranks, e, p):
    return np.concatenate([rng.permutation(e), rng.integers(0, e, p - e)])


def test_move_layout_messages_and_budget():
    """Plays the layout's messages on integer "weights" (each row = its logical id), every rank
    at once: the committed rows equal the new placement; each step's pieces and local copies
    keep to the budget (shared by the moves of one step; a local copy counts as a row its rank
    writes) and never send or copy a row twice; one message per (pair, step)
    unless the sender lacks free staging rows to gather into; gather rows never overlap the
    rows the sender receives into."""
    rng = np.random.default_rng(7)
    kinds = {"direct": 0, "gather": 0, "runs": 0, "split": 0}
    for _ in range(300):
        ranks, e = int(rng.integers(1, 6)), int(rng.integers(2, 12))
        s = int(rng.integers(-(-e // ranks), -(-e // ranks) + 3))
        p = ranks * s
        budget_rows = None if rng.random() < 0.3 else int(rng.integers(1, 4))
        moves = []
        for _ in range(int(rng.integers(1, 3))):  # moves sharing each step's budget
            old, new = _random_placement(rng, ranks, e, p), _random_placement(rng, ranks, e, p)
            lay = MoveLayout(layer_schedule(old, new, ranks), ranks, s)
            weights = old.reshape(ranks, s).copy()
            staging = np.full((ranks, s), -1)
            moves.append((lay, weights, staging, {pair: 0 for pair in lay.pairs}, new,
                          [0] * ranks))
        total = sum(m[0].rows_total() + sum(map(len, m[0].local)) for m in moves)
        for _step in range(total + 1):
            if all(all(c[k] == len(m[0].pairs[k]) for k in c) and
                   m[5] == [len(v) for v in m[0].local] for m in moves for c in [m[3]]):
                break
            budget = StepBudget(ranks, budget_rows)
            got_recv, got_send = np.zeros(ranks, int), np.zeros(ranks, int)
            for lay, weights, staging, cursor, _, local_cursor in moves:
                before = dict(cursor)
                before_local = list(local_cursor)
                pieces = lay.take(cursor, budget)
                local = lay.take_local(local_cursor, budget)
                for r, (a, b) in enumerate(local):
                    assert a == before_local[r] <= b <= len(lay.local[r])
                    got_recv[r] += b - a
                    for slot, row in lay.local[r][a:b]:
                        assert staging[r, row] == -1  # no receive or copy wrote it yet
                        staging[r, row] = weights[r, slot]
                for pc in pieces:
                    rows = lay.pairs[(pc.src_rank, pc.dst_rank)]
                    assert pc.start == before[(pc.src_rank, pc.dst_rank)] < pc.stop <= len(rows)
                    n = pc.stop - pc.start
                    got_recv[pc.dst_rank] += n
                    got_send[pc.src_rank] += n
                    src = [slot for slot, _ in rows[pc.start:pc.stop]]
                    assert [a for a, _ in pc.runs] == [pc.start] + [b for _, b in pc.runs[:-1]]
                    assert pc.runs[-1][1] == pc.stop
                    base = lay.recv_row[(pc.src_rank, pc.dst_rank)]
                    if pc.gather_row >= 0:
                        kinds["gather"] += 1
                        g = pc.gather_row
                        assert lay.changed[pc.src_rank] <= g and g + n <= s
                        staging[pc.src_rank, g:g + n] = weights[pc.src_rank, src]
                        staging[pc.dst_rank, base + pc.start:base + pc.stop] = (
                            staging[pc.src_rank, g:g + n])
                    else:
                        kinds["direct" if len(pc.runs) == 1 else "runs"] += 1
                        for a, b in pc.runs:
                            first = rows[a][0]
                            assert src[a - pc.start:b - pc.start] == list(range(first,
                                                                                first + b - a))
                            staging[pc.dst_rank, base + a:base + b] = (
                                weights[pc.src_rank, first:first + b - a])
                    if n < len(rows):
                        kinds["split"] += 1
                gathered = {}
                for pc in pieces:
                    if pc.gather_row >= 0:
                        gathered.setdefault(pc.src_rank, []).append(
                            (pc.gather_row, pc.gather_row + pc.stop - pc.start))
                    elif len(pc.runs) > 1:  # fell back: the sender had no room left to gather
                        used = sum(b - a for a, b in gathered.get(pc.src_rank, []))
                        assert pc.stop - pc.start > s - lay.changed[pc.src_rank] - used
                for spans in gathered.values():  # a step's gathers never overlap
                    spans.sort()
                    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
            if budget_rows is not None:
                assert got_recv.max(initial=0) <= budget_rows
                assert got_send.max(initial=0) <= budget_rows
            assert got_recv.sum() > 0, "a step made no progress"
        for lay, weights, staging, cursor, new, local_cursor in moves:
            assert all(cursor[k] == len(v) for k, v in lay.pairs.items())
            assert local_cursor == [len(v) for v in lay.local]
            for r in range(ranks):
                for row, slot, n in lay.commit_runs[r]:
                    weights[r, slot:slot + n] = staging[r, row:row + n]
            assert np.array_equal(weights.reshape(-1), new)
    assert all(kinds.values()), kinds  # every kind of message was exercised
    with pytest.raises(ValueError, match="rows"):
        StepBudget(2, 0)


class Stack(torch.nn.Module):
    def __init__(self, n, **kw):
        super().__init__()
        self.layers = torch.nn.ModuleList([EPMoE(8, 6, 8, 2, seed=i, **kw) for i in range(n)])
        for layer in self.layers:
            layer.gate_bias[:2] = 3.0

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_single_process_equal_outputs_and_explicit_steps(tmp_path):
    model, reference = Stack(3, num_redundant_experts=4), Stack(3, num_redundant_experts=4)
    up = eplb_native.attach(model, {"step_interval": 2, "algorithm_execution_interval": 0,
                                    "layers_per_step": 2, "policy": "default"}, hooks=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        x = torch.randn(10, 8, generator=g)
        up.forward_before()
        y = model(x)
        up.forward_end()
        torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
        for layer in model.layers:
            w13, w2 = logical_weights_of_slots(layer)
            assert np.array_equal(w13, layer.w13.numpy()) and np.array_equal(w2, layer.w2.numpy())
    assert up.step == 12 and up.cycle >= 3 and len(up.stats.windows) == 6
    # one rank is always balanced: plans are made (one per window), nothing is worth moving
    assert len(up.stats.plans) == len(up.stats.windows) == 6
    assert all(p["layers_to_move"] == [] for p in up.stats.plans) and not up.stats.moves
    assert np.array_equal(up.phy2log(), np.stack([state.default_placement(8, 1, 4)] * 3))
    assert sum(w["tokens"] for w in up.stats.windows) == 12 * 10 * 2 * 3
    up.shutdown()
    up.shutdown()


def test_balancedness_threshold_skips_balanced_windows(caplog):
    """balancedness_threshold (SGLang's eplb_min_rebalancing_utilization_threshold): a window
    whose mean balancedness is above it submits no plan (said at INFO by rank 0); at or below
    it, or at the default 1.0, plans as before. One rank is always balanced (1.0)."""
    for threshold, planned in ((1.0, 3), (0.999, 0)):
        model = Stack(2, num_redundant_experts=4)
        up = eplb_native.attach(model, {"step_interval": 2, "algorithm_execution_interval": 0,
                                        "balancedness_threshold": threshold}, hooks=False)
        g = torch.Generator().manual_seed(1)
        with caplog.at_level("INFO", logger="eplb_native"):
            for _ in range(6):
                up.forward_before()
                model(torch.randn(10, 8, generator=g))
                up.forward_end()
        assert len(up.stats.windows) == 3 and len(up.stats.plans) == planned
        assert [w["skipped"] for w in up.stats.windows] == [planned == 0] * 3
        skips = [r for r in caplog.records if "above balancedness_threshold" in r.getMessage()]
        assert len(skips) == (3 if planned == 0 else 0)
        up.shutdown()
        caplog.clear()


def test_on_placement_that_raises_stops_eplb_after_a_whole_step(caplog):
    """An adapter's on_placement callback that raises after its layer's switch: the step ends
    whole (the mirror says the new placement, the maps follow it, the move's staging is free),
    an error is logged, and the next forward refuses (the step was left half-finished: the
    mirror stale, the move in flight, the later layers not processed)."""
    import logging

    model = Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 10**6, "layers_per_step": 2})
    seen = []

    def callback(adapter):
        seen.append(adapter.name)
        raise KeyError("the engine's table")

    up.layers[0].on_placement = callback
    target = np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 6], [0, 1, 2, 3, 4, 5, 6, 7, 1, 0]])
    g = torch.Generator().manual_seed(1)
    assert up.move_to(target) == 2
    with caplog.at_level(logging.ERROR, logger="eplb_native"):
        model(torch.randn(6, 8, generator=g))  # both layers move in this step
    assert seen == [up.layers[0].name]
    assert any("on_placement callback raised" in r.getMessage() for r in caplog.records)
    assert np.array_equal(up.phy2log(), target)  # both layers switched, the mirror too
    for layer, row in zip(model.layers, target, strict=True):
        assert layer.phy2log.tolist() == row.tolist()
        w13, w2 = logical_weights_of_slots(layer)
        assert np.array_equal(w13, layer.w13.numpy()) and np.array_equal(w2, layer.w2.numpy())
    assert not up._inflight and len(up._free) == len(up._staging)
    with pytest.raises(RuntimeError, match="on_placement callback raised"):
        model(torch.randn(6, 8, generator=g))
    up.shutdown()


def test_expert_map_roundtrip_vllm_ascend_file(tmp_path):
    # a map written by hand in vllm-ascend's format (1 rank, 2 layers, 10 slots)
    layers = [[7, 6, 5, 4, 3, 2, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 2, 2]]
    doc = {"moe_layer_count": 2, "layer_list": [
        {"layer_id": i, "device_count": 1,
         "device_list": [{"device_id": 0, "device_expert": row}]} for i, row in enumerate(layers)]}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(doc))
    # (a missing folder is made, parents too, as vllm-ascend does)
    record = tmp_path / "made" / "twice" / "record.json"
    model, reference = Stack(2, num_redundant_experts=2), Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"expert_map_path": str(path), "dynamic_eplb": False,
                                    "expert_map_record_path": str(record)})
    assert np.array_equal(up.phy2log(), np.array(layers))
    for layer in model.layers:
        w13, _ = logical_weights_of_slots(layer)
        assert np.array_equal(w13, layer.w13.numpy())
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    up.shutdown()
    assert json.loads(record.read_text()) == doc
    assert np.array_equal(expert_map.load(record)[0], np.array(layers))


class Hidden(torch.nn.Module):
    """Decoder layers model.layers.0 .. n-1, the ``dense`` ones a Linear, the others EPMoE."""

    def __init__(self, n, dense=(), **kw):
        super().__init__()
        self.layers = torch.nn.ModuleList([
            torch.nn.Linear(8, 8) if i in dense else EPMoE(8, 6, 8, 2, seed=i, **kw)
            for i in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_sglang_start_file_of_a_load_is_planned_at_attach(tmp_path, caplog):
    """SGLang's init_expert_location may name a load (its expert-distribution dump, a .pt with
    logical_count [steps, hidden layers, E]): SGLang plans its start placement from it with its
    EPLB algorithm, attach with the configured policy (SGLang's default: deepseek), from the
    layers' placement; outputs unchanged."""
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 100, (3, 3, 8)).astype(np.int64)
    counts[:, 0] = 0  # a dense first layer counts nothing
    counts[:, 1:, 5] *= 20  # a hot expert, replicated
    torch.save({"logical_count": torch.from_numpy(counts)}, tmp_path / "dump.pt")
    model, reference = (Hidden(3, dense=(0,), num_redundant_experts=2) for _ in range(2))
    reference.load_state_dict(model.state_dict())
    start = np.stack([layer.phy2log.numpy() for layer in model.layers[1:]])
    want = eplb_native.plan(counts.sum(0)[1:].astype(np.float64), start, num_ranks=1,
                            policy="deepseek").phy2log
    assert (want == 5).sum(axis=1).tolist() == [3, 3]
    with caplog.at_level("INFO", logger="eplb_native"):
        up = eplb_native.attach(model, {"enable_eplb": True,
                                        "init_expert_location": str(tmp_path / "dump.pt")})
    assert np.array_equal(up.phy2log(), want)
    assert any("planned by deepseek from its logical_count" in r.getMessage()
               for r in caplog.records)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    up.shutdown()
    # a placement in a .pt file starts there as it is
    torch.save({"physical_to_logical_map": torch.from_numpy(np.concatenate(
        [np.arange(10)[None] % 8, want]))}, tmp_path / "init.pt")
    model = Hidden(3, dense=(0,), num_redundant_experts=2)
    up = eplb_native.attach(model, {"init_expert_location": str(tmp_path / "init.pt"),
                                    "enable_eplb": False})
    assert np.array_equal(up.phy2log(), want)
    up.shutdown()
    # a load for other experts is refused, naming the file
    torch.save({"logical_count": torch.ones(2, 6)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"^expert_map_path .*other\.pt: SGLang's "
                                         r"'logical_count' counts 6 experts per layer, the model "
                                         r"has 8"):
        eplb_native.attach(Stack(2, num_redundant_experts=2),
                           {"init_expert_location": str(tmp_path / "other.pt")})


def test_sglang_start_file_rows_follow_the_layer_names(tmp_path):
    """An SGLang file has a row per hidden layer: attach takes the rows its MoE layers' module
    names give (model.layers.N), dense layers between MoE layers included, a placement file or
    a load alike; where the names hold no index, or their rows do not read (a file of the MoE
    layers' rows only), the last L rows."""
    rng = np.random.default_rng(5)
    trivial = np.arange(10) % 8

    def placements(n):
        return np.stack([rng.permutation(np.r_[np.arange(8), rng.integers(0, 8, 2)])
                         for _ in range(n)])

    def attach_file(model, rows, name="init.json"):
        (tmp_path / name).write_text(json.dumps({"physical_to_logical_map": rows.tolist()}))
        up = eplb_native.attach(model, {"init_expert_location": str(tmp_path / name),
                                        "enable_eplb": False})
        got = up.phy2log()
        up.shutdown()
        return got

    # hidden layers 0 and 2 dense, 1 and 3 MoE; outputs unchanged
    want = placements(2)
    rows = np.tile(trivial, (4, 1))
    rows[[1, 3]] = want
    model, reference = (Hidden(4, dense=(0, 2), num_redundant_experts=2) for _ in range(2))
    reference.load_state_dict(model.state_dict())
    assert np.array_equal(attach_file(model, rows), want)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    # MoE, MoE, dense, MoE where the first MoE layer's row is the trivial placement: the last
    # rows would read (every row before them trivial) but shifted; the names are right
    rows = np.tile(trivial, (4, 1))
    rows[[1, 3]] = placements(2)
    assert np.array_equal(attach_file(Hidden(4, dense=(2,), num_redundant_experts=2), rows),
                          rows[[0, 1, 3]])
    # a file of the MoE layers' rows only (names 1, 2 past its 2 rows): the last rows
    want = placements(2)
    assert np.array_equal(attach_file(Hidden(3, dense=(0,), num_redundant_experts=2), want),
                          want)
    # a load: rows 0 and 2 count nothing (dense); rows 1 and 3 are planned
    counts = rng.integers(1, 50, (4, 8)).astype(float)
    counts[[0, 2]] = 0
    (tmp_path / "load.json").write_text(json.dumps({"logical_count": counts.tolist()}))
    model = Hidden(4, dense=(0, 2), num_redundant_experts=2)
    start = np.stack([layer.phy2log.numpy() for layer in model.layers[1::2]])
    up = eplb_native.attach(model, {"init_expert_location": str(tmp_path / "load.json")})
    assert np.array_equal(up.phy2log(), eplb_native.plan(counts[[1, 3]], start, num_ranks=1,
                                                         policy="deepseek").phy2log)
    up.shutdown()
    # names without a layer index: the last rows' refusal stands
    rows = np.tile(trivial, (4, 1))
    rows[[1, 3]] = placements(2)
    (tmp_path / "init.json").write_text(json.dumps({"physical_to_logical_map": rows.tolist()}))
    flat = torch.nn.Sequential(*Hidden(4, dense=(0, 2), num_redundant_experts=2).layers)
    with pytest.raises(ValueError, match=r"rows \[1\] before its last 2 .* moe_layers="):
        eplb_native.attach(flat, {"init_expert_location": str(tmp_path / "init.json")})
    # names whose rows do not read (past the file's 4 rows), nor do the last rows: both said
    wrong = Hidden(6, dense=(0, 2, 3, 4), num_redundant_experts=2)
    with pytest.raises(ValueError, match=r"rows \[1\] before its last 2 .* the rows its MoE "
                                         r"layers' names give \(\[1, 5\]\) do not read either: "
                                         r".*moe_layers 5 is past the 4 hidden layers"):
        eplb_native.attach(wrong, {"init_expert_location": str(tmp_path / "init.json")})


def test_attach_errors(tmp_path):
    with pytest.raises(ValueError, match="no MoE layer"):
        eplb_native.attach(torch.nn.Linear(3, 3))
    # layers on two devices (they failed at the first step, or the first move)
    mixed = torch.nn.Sequential(EPMoE(8, 6, 8, 2), EPMoE(8, 6, 8, 2, device="meta"))
    with pytest.raises(AdapterError, match="MoE layer '1' is on meta, layer '0' on cpu"):
        eplb_native.attach(mixed)
    up = eplb_native.attach(torch.nn.Sequential(mixed[0]))  # no updator was left on it
    up.shutdown()

    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w13_weight = torch.nn.Parameter(torch.zeros(4, 6, 3))
            self.w2_weight = torch.nn.Parameter(torch.zeros(3, 3, 3))

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Bad())
    with pytest.raises(AdapterError, match="'1'"):
        eplb_native.attach(model)
    with pytest.raises(ValueError, match="num_redundant_experts"):
        eplb_native.attach(Stack(1, num_redundant_experts=2), {"num_redundant_experts": 3})
    with pytest.raises(TypeError, match="model"):
        eplb_native.attach("model")
    # a flag from a config file ("false" would read as True: hooks on top of the engine's own
    # forward_before / forward_end, every forward counted twice) and a group that is no group
    # (torch said "Default process group has not been initialized", naming neither)
    for hooks in ("false", None, 0):
        m = Stack(1)
        buffers = set(dict(m.named_buffers()))
        with pytest.raises(TypeError, match="hooks must be a bool"):
            eplb_native.attach(m, hooks=hooks)
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert set(dict(m.named_buffers())) == buffers
    for group in ("world", 0):
        with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
            eplb_native.attach(Stack(1), group=group)
    with pytest.raises(FileNotFoundError, match="no_such_map.json"):
        eplb_native.attach(Stack(1), {"expert_map_path": "/no/such/dir/no_such_map.json"})
    # the record path's folder is checked at attach, not found missing at shutdown
    with pytest.raises(ValueError, match="expert_map_record_path .*folder '/dev/null/dir' "
                                         "cannot be made"):
        eplb_native.attach(Stack(1), {"expert_map_record_path": "/dev/null/dir/out.json"})
    with pytest.raises(ValueError, match="expert_map_record_path .* holds a NUL byte"):
        eplb_native.attach(Stack(1), {"expert_map_record_path": str(tmp_path / "a\0b" / "m.json")})
    # topologies the planner rejects fail at attach, not at every planning cycle
    with pytest.raises(ValueError, match=r"num_nodes \(2\) must divide the layers' ep_size"):
        eplb_native.attach(Stack(1, num_redundant_experts=2), {"num_nodes": 2})
    # one rank with redundant slots must hold an expert twice
    with pytest.raises(ValueError, match=r"distinct_ranks needs .* \(8\) as slots per rank "
                                         r"\(10\)"):
        eplb_native.attach(Stack(1, num_redundant_experts=2), {"distinct_ranks": True})
    with pytest.raises(ValueError, match="distinct_ranks must be a bool"):
        eplb_native.attach(Stack(1), {"distinct_ranks": "yes"})
    from eplb_native.adapters import MoELayerAdapter
    from eplb_native.updator import Updator

    one = EPMoE(8, 6, 8, 2).eplb_adapter("m")
    fields = {k: getattr(one, k) for k in ("name", "module", "phy2log", "log2phy", "logcnt",
                                            "load", "record", "ep_rank", "local_expert_map")}
    # rank 0 of 2 (checked before any process group is needed)
    two = MoELayerAdapter(**fields, ep_size=2, weights=[w[:4] for w in one.weights])
    with pytest.raises(ValueError, match=r"num_groups \(6\) must divide the layers' logical"):
        Updator([two], eplb_native.EplbConfig(num_nodes=2, num_groups=6))
    # a starting placement that is not one (expert 7 has no slot; an id out of range) refuses
    # attach at once: every cycle would fail on it later
    for bad in ([0, 1, 2, 3, 4, 5, 6, 6], [0, 1, 2, 3, 4, 5, 6, 8]):
        broken = MoELayerAdapter(**{**fields, "phy2log": torch.tensor(bad)},
                                 ep_size=1, weights=one.weights)
        with pytest.raises(AdapterError, match="'m': its phy2log is not a valid placement"):
            Updator([broken], eplb_native.EplbConfig(dynamic_eplb=False))


def test_fused_layout_adapter():
    class Fused(torch.nn.Module):
        """vLLM FusedMoE-like: stacked w13/w2, a scale, an expert map (rank 0 of 1)."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(5)
            self.w13_weight = torch.nn.Parameter(torch.randn(6, 4, 3, generator=g))
            self.w2_weight = torch.nn.Parameter(torch.randn(6, 3, 2, generator=g))
            self.w13_weight_scale = torch.nn.Parameter(torch.randn(6, 4, generator=g))
            self.register_buffer("expert_map", torch.arange(6, dtype=torch.int32))
            self.global_num_experts = 6

    model = torch.nn.Sequential(Fused(), Fused())
    up = eplb_native.attach(model, {"dynamic_eplb": True})
    assert [a.name for a in up.layers] == ["0", "1"]
    a = up.layers[0]
    assert len(a.weights) == 3 and a.local_expert_map is model[0].expert_map
    before = [t.clone() for t in a.weights]
    new = np.array([5, 4, 3, 2, 1, 0])
    a.set_placement(new)
    assert torch.equal(model[0].expert_map, torch.tensor([5, 4, 3, 2, 1, 0], dtype=torch.int32))
    assert torch.equal(model[0].eplb_logcnt, torch.ones(6, dtype=torch.int64))
    assert all(torch.equal(x, y) for x, y in zip(before, a.weights, strict=True))
    up.shutdown()


def test_fused_expert_map_int64_follows_moves_and_bad_shape_refuses():
    """An int64 expert_map is rewritten at every switch like an int32 one (it used to be
    dropped silently, leaving routing on the old placement); one of the wrong shape refuses the
    layer, with no buffers added."""

    class Fused(torch.nn.Module):
        def __init__(self, expert_map):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.w13_weight = torch.nn.Parameter(torch.randn(4, 4, 3, generator=g))
            self.w2_weight = torch.nn.Parameter(torch.randn(4, 3, 2, generator=g))
            self.register_buffer("expert_map", expert_map)
            self.global_num_experts = 4

    model = torch.nn.Sequential(Fused(torch.arange(4, dtype=torch.int64)))
    up = eplb_native.attach(model, {"dynamic_eplb": False}, hooks=False)
    assert up.layers[0].local_expert_map is model[0].expert_map
    rows = [t.clone() for t in up.layers[0].weights]
    up.move_to([[3, 1, 0, 2]])
    for _ in range(3):
        up.forward_before()
        up.forward_end()
    assert up.phy2log().tolist() == [[3, 1, 0, 2]]
    # expert e now sits in the slot that holds it: expert_map[e] = slot
    assert model[0].expert_map.dtype == torch.int64
    assert model[0].expert_map.tolist() == [2, 1, 3, 0]
    for w, old in zip(up.layers[0].weights, rows, strict=True):
        assert torch.equal(w, old[[3, 1, 0, 2]])
    up.shutdown()

    bad = torch.nn.Sequential(Fused(torch.arange(8, dtype=torch.int32).view(2, 4)))
    with pytest.raises(AdapterError, match=r"expert_map must be \[E=4\]"):
        eplb_native.attach(bad)
    assert [n for n, _ in bad[0].named_buffers()] == ["expert_map"]


def test_refused_fused_layer_is_left_as_it_was():
    """A fused layer the adapter refuses (8 slots in its eplb_phy2log, 6 rows of weights) gets
    none of the eplb_* buffers the adapter would have added."""

    class Fused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(9)
            self.w13_weight = torch.nn.Parameter(torch.randn(6, 4, 3, generator=g))
            self.w2_weight = torch.nn.Parameter(torch.randn(6, 3, 2, generator=g))
            self.register_buffer("eplb_phy2log", torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]))
            self.global_num_experts = 6

    model = torch.nn.Sequential(Fused())
    with pytest.raises(AdapterError, match=r"placement has 8 slots, the weights 6 x 1 ranks"):
        eplb_native.attach(model)
    assert [n for n, _ in model[0].named_buffers()] == ["eplb_phy2log"]


def test_refused_attach_removes_the_buffers_it_added():
    """Both fused layers adapt (each gets eplb_* buffers), then the Updator refuses the config:
    attach leaves the model with the buffers it had, and a corrected attach works."""

    class Fused(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.w13_weight = torch.nn.Parameter(torch.randn(6, 4, 3, generator=g))
            self.w2_weight = torch.nn.Parameter(torch.randn(6, 3, 2, generator=g))
            self.register_buffer("expert_map", torch.arange(6, dtype=torch.int32))
            self.global_num_experts = 6

    model = torch.nn.Sequential(Fused(1), Fused(2))
    before = [sorted(n for n, _ in m.named_buffers()) for m in model]
    with pytest.raises(ValueError, match="num_redundant_experts"):
        eplb_native.attach(model, {"num_redundant_experts": 3})
    assert [sorted(n for n, _ in m.named_buffers()) for m in model] == before
    up = eplb_native.attach(model, {"num_redundant_experts": 0})
    assert "eplb_phy2log" in dict(model[1].named_buffers())
    up.shutdown()


def test_default_placement_vllm_layout():
    """layout="vllm": vLLM's initial physical-to-logical map (experts in slot order, then
    redundant copy i of expert i mod E), vllm-ascend's too after its 0.23 release."""
    for e, r, k in [(8, 2, 2), (8, 4, 0), (3, 4, 5), (256, 32, 32)]:
        want = np.array(list(range(e)) + [i % e for i in range(k)])
        assert np.array_equal(state.default_placement(e, r, k, layout="vllm"), want)
    assert state.default_placement(8, 2, 2, 3, layout="vllm").shape == (3, 10)
    with pytest.raises(ValueError, match="layout must be one of"):
        state.default_placement(8, 2, 2, layout="sglang")
    with pytest.raises(ValueError, match="divisible by num_ranks"):
        state.default_placement(8, 3, 2, layout="vllm")


def test_default_placement_follows_the_rule():
    """state.default_placement (no per-copy loop) equals the rule as written, for every small
    shape (E < ranks included) and one with a million redundant copies."""
    from reference.placement import default_placement as rule

    cases = [(e, r, k) for e in range(1, 13) for r in range(1, 9) for k in range(0, 20)]
    cases.append((256, 64, 10 ** 6))
    for e, r, k in cases:
        want = rule(e, r, k) if (e + k) % r == 0 else None
        if want is None:
            with pytest.raises(ValueError, match="num_ranks|uneven"):
                state.default_placement(e, r, k)
        else:
            got = state.default_placement(e, r, k)
            assert got.dtype == np.int64 and np.array_equal(got, want), (e, r, k)


def test_placement_tensors_rotate_rows_by_rank_so_decode_spreads():
    """With rotate, each rank's log2phy row of an expert is its slots in increasing order
    rotated by rank % c (random placements), and with one token per rank per call (decode), the
    ranks' tokens of a hot expert reach all its replicas evenly (with the same table everywhere
    all of them went to its lowest slot). EPMoE (an all-to-all dispatch) rotates."""
    rng = np.random.default_rng(21)
    for _ in range(200):
        E, R = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        S = int(rng.integers(1, 5))
        if E > R * S:
            continue
        p2l = np.concatenate([np.arange(E), rng.integers(0, E, R * S - E)])[rng.permutation(R * S)]
        for r in range(R):
            log2phy, logcnt, _ = state.placement_tensors(p2l, E, R, r, rotate=True)
            assert log2phy.shape == (E, R * S - E + 1)
            for e in range(E):
                slots = np.nonzero(p2l == e)[0]
                c = len(slots)
                assert int(logcnt[e]) == c
                assert log2phy[e, :c].tolist() == np.roll(slots, -(r % c)).tolist()
                assert (log2phy[e, c:] == -1).all()
    # 8 ranks of 2 slots, expert 0 in 4 slots: one token per rank per call, 10 calls
    p2l = np.array([0, 1, 0, 2, 0, 3, 0, 4, 5, 6, 7, 1, 2, 3, 4, 5])
    for rotate, want in ((True, [160] * 4), (False, [640, 0, 0, 0])):
        per_slot = torch.zeros(16, dtype=torch.int64)
        for r in range(8):
            log2phy, logcnt, _ = state.placement_tensors(p2l, 8, 8, r, rotate=rotate)
            for _ in range(10):
                eplb_native.ops.map_and_record(torch.zeros(1, 8, dtype=torch.int64), log2phy,
                                               logcnt, per_slot, torch.tensor(True))
        assert per_slot[[0, 2, 4, 6]].tolist() == want
    assert EPMoE(8, 6, 8, 2, num_redundant_experts=8).eplb_adapter("").rotate_replicas


def test_placement_tensors_and_default_spread():
    log2phy, logcnt, local = state.placement_tensors([0, 1, 2, 0], 3, 2, 1)
    assert log2phy.tolist() == [[0, 3], [1, -1], [2, -1]]
    assert logcnt.tolist() == [2, 1, 1] and local.tolist() == [1, -1, 0]
    # a rank holding an expert twice routes it to its first local slot (vllm-ascend's maps)
    assert state.placement_tensors([1, 0, 2, 0], 3, 1, 0)[2].tolist() == [1, 0, 2]
    assert state.placement_tensors([0, 1, 2, 2, 1, 0, 1, 2], 3, 2, 1)[2].tolist() == [1, 0, 3]
    rotated = state.placement_tensors([0, 1, 2, 0], 3, 2, 1, rotate=True)[0]
    assert rotated.tolist() == [[3, 0], [1, -1], [2, -1]]  # rank 1 starts at replica 1 % 2
    with pytest.raises(TypeError, match="rotate must be a bool"):
        state.placement_tensors([0, 1, 2, 0], 3, 2, 1, rotate=1)
    assert state.default_placement(8, 2, 2).tolist() == [0, 1, 2, 3, 4, 4, 5, 6, 7, 0]
    layers = state.default_placement(8, 2, 2, num_layers=3)
    assert layers.shape == (3, 10) and (layers == state.default_placement(8, 2, 2)).all()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_layers"):
            state.default_placement(8, 2, 2, num_layers=bad)
    with pytest.raises(ValueError, match="num_ranks"):
        state.default_placement(7, 2, 0)
    with pytest.raises(ValueError, match="holds no copy"):
        state.validate_phy2log([0, 0, 1, 1], 3, 2)
    for bad_rank in (2, -1, 1.0, True):
        with pytest.raises(ValueError, match="rank must be an int in"):
            state.placement_tensors([0, 1, 2, 0], 3, 2, bad_rank)
    for num_ranks in (0, -2, 2.0):
        with pytest.raises(ValueError, match="num_ranks"):
            state.placement_tensors([0, 1, 2, 0], 3, num_ranks, 0)
    with pytest.raises(ValueError, match="num_logical"):
        state.validate_phy2log([0, 1, 2, 0], 0, 2)


def test_second_attach_on_a_live_model_is_refused():
    """Two updators on one layer would both move its weights and rewrite its maps: the second
    attach is refused (nothing added to the model) until the first is shut down."""
    model = Stack(2, num_redundant_experts=2)
    first = eplb_native.attach(model, {"dynamic_eplb": False})
    buffers = sorted(n for n, _ in model.named_buffers())
    hooks = len(model._forward_pre_hooks) + len(model._forward_hooks)
    with pytest.raises(ValueError, match="already has a live eplb_native Updator"):
        eplb_native.attach(model, {"dynamic_eplb": False})
    assert sorted(n for n, _ in model.named_buffers()) == buffers
    assert len(model._forward_pre_hooks) + len(model._forward_hooks) == hooks
    first.shutdown()
    second = eplb_native.attach(model, {"dynamic_eplb": False})
    assert np.array_equal(second.phy2log(), first.phy2log())
    second.shutdown()


def test_move_to_after_shutdown_is_refused():
    """A move queued after shutdown() would never run (the hooks are gone) and leave `moving`
    set for good: refused, nothing queued."""
    model = Stack(1, num_redundant_experts=0)
    up = eplb_native.attach(model, {"dynamic_eplb": False})
    before = up.phy2log().copy()
    up.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        up.move_to(before[:, ::-1].copy())
    assert not up.moving and np.array_equal(up.phy2log(), before)


def test_sliding_window_and_trace(tmp_path):
    model = Stack(2, num_redundant_experts=0)
    up = eplb_native.attach(model, {"step_interval": 4, "window_size": 2, "dynamic_eplb": False})
    with pytest.raises(ValueError, match="no load window gathered yet"):
        up.save_trace(tmp_path / "early.npz")
    assert list(tmp_path.iterdir()) == []
    g = torch.Generator().manual_seed(6)
    for tokens in (3, 5, 7, 11, 13, 17, 19, 23):
        model(torch.randn(tokens, 8, generator=g))
    # each window sees the last 2 steps only: (7 + 11) and (19 + 23) tokens x 2 choices
    assert [w["steps"] for w in up.stats.windows] == [2, 2]
    loads = np.stack(up._recorded)
    assert loads.shape == (2, 2, 8)
    assert loads.sum(axis=(1, 2)).tolist() == [(7 + 11) * 2 * 2, (19 + 23) * 2 * 2]
    from eplb_native import traces

    up.save_trace(tmp_path / "t.npz", shape="test")
    got, meta = traces.load_trace(tmp_path / "t.npz")
    assert np.array_equal(got, loads) and meta["shape"] == "test" and meta["num_ranks"] == 1
    assert (meta["num_slots"], meta["num_redundant"], meta["num_nodes"], meta["num_groups"]) == (
        8, 0, 1, 1)
    up.shutdown()
    # the deployment's topology, so that a replay plans as here
    model = Stack(2, num_redundant_experts=0)
    up = eplb_native.attach(model, {"step_interval": 2, "dynamic_eplb": False, "num_groups": 4,
                                    "policy": "deepseek"})
    for _ in range(2):
        model(torch.randn(5, 8, generator=g))
    up.save_trace(tmp_path / "g.npz")
    assert traces.load_trace(tmp_path / "g.npz")[1]["num_groups"] == 4
    # (review 18: an .npz archive under another name, or the deployment's keys given wrong, was
    # written and refused only when read back; a missing folder named a temporary file)
    for path, meta, match in ((tmp_path / "t.json", {}, "must end in .npz"),
                              (tmp_path / "no" / "t.npz", {}, "folder .* does not exist"),
                              (tmp_path / "w.npz", {"window_steps": [1, 2, 3]},
                               "window_steps must be a list of 1 ints"),
                              (tmp_path / "r.npz", {"num_ranks": "x"}, "num_ranks must be an int")):
        with pytest.raises(ValueError, match=match):
            up.save_trace(path, **meta)
        assert not path.exists()
    up.shutdown()


def test_hooks_step_once_and_explicit_calls_are_refused_beside_them():
    """(review 18: hooks=True with forward_before / forward_end called too, or attach_hooks
    twice, counted two steps a forward; attach_hooks after shutdown left hooks nothing removed)"""
    model = Stack(1)
    up = eplb_native.attach(model, {"dynamic_eplb": False})
    for call in (up.forward_before, up.forward_end):
        with pytest.raises(RuntimeError, match="hooks=False"):
            call()
    with pytest.raises(RuntimeError, match="hooks are on already"):
        up.attach_hooks(model)
    model(torch.randn(3, 8))
    assert up.step == 1
    up.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        up.attach_hooks(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_first_window_counts_only_its_own_steps():
    """(review 18: forwards after a shutdown still counted into the layers' load, and the next
    attach took them into its first window)"""
    model = Stack(1)
    up = eplb_native.attach(model, {"dynamic_eplb": False, "step_interval": 2})
    up.shutdown()
    g = torch.Generator().manual_seed(2)
    model(torch.randn(50, 8, generator=g))  # nobody's step
    up = eplb_native.attach(model, {"dynamic_eplb": False, "step_interval": 2})
    for _ in range(2):
        model(torch.randn(4, 8, generator=g))
    assert up.stats.windows[0]["tokens"] == 2 * 4 * 2  # 2 steps x 4 tokens x top-2
    up.shutdown()


def test_move_to_refuses_a_placement_the_layers_no_longer_hold():
    """(review 18: after load_state_dict of a checkpoint at another placement, move_to planned
    from the updator's own copy, moved the wrong rows and switched: wrong outputs, no error)"""
    model = Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"dynamic_eplb": False})
    start = up.phy2log()
    other = start.copy()
    other[:, [0, 3]] = other[:, [3, 0]]
    for layer, row in zip(model.layers, other, strict=True):
        layer.phy2log.copy_(torch.from_numpy(row))  # in place, as load_state_dict does
    target = start.copy()
    target[:, [1, 5]] = target[:, [5, 1]]
    with pytest.raises(RuntimeError, match="placement buffers changed behind the updator"):
        up.move_to(target)
    assert not up._queue
    up.shutdown()


def _adapter_fields(name: str):
    """An EPMoE layer's adapter and its fields, to build variants of it."""
    good = EPMoE(8, 6, 8, 2, num_redundant_experts=2).eplb_adapter(name)
    return good, {k: getattr(good, k) for k in ("name", "module", "weights", "phy2log",
                                                  "log2phy", "logcnt", "load", "record",
                                                  "ep_rank", "ep_size", "local_expert_map")}


def test_adapter_validation_names_the_layer():
    from eplb_native.adapters import MoELayerAdapter

    good, fields = _adapter_fields("model.layers.3.mlp")
    for key, bad in (("log2phy", torch.zeros(8, 2, dtype=torch.int64)),
                     ("load", torch.zeros(10)),
                     ("weights", [torch.zeros(9, 3)]),
                     ("ep_rank", 1),
                     ("record", torch.ones(1, dtype=torch.bool))):
        with pytest.raises(AdapterError, match=r"model\.layers\.3\.mlp") as info:
            MoELayerAdapter(**{**fields, key: bad})
        assert key.rstrip("s") in str(info.value) or key == "ep_rank"
    with pytest.raises(ValueError, match="expert ids"):
        good.set_placement([0, 1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert good.phy2log.tolist() == state.default_placement(8, 1, 2).tolist()  # untouched


def test_move_to_keeps_outputs_and_weights():
    model, reference = Stack(2, num_redundant_experts=2), Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1000, "layers_per_step": 1})
    target = np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7], [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]])
    assert up.move_to(target) == 2
    with pytest.raises(RuntimeError, match="in progress"):
        up.move_to(target)
    g = torch.Generator().manual_seed(8)
    for step in range(3):
        x = torch.randn(9, 8, generator=g)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        assert len(up.stats.moves) == min(step + 1, 2)
    assert np.array_equal(up.phy2log(), target)
    for layer in model.layers:
        w13, w2 = logical_weights_of_slots(layer)
        assert np.array_equal(w13, layer.w13.numpy()) and np.array_equal(w2, layer.w2.numpy())
    with pytest.raises(ValueError, match="shape"):
        up.move_to(target[:1])
    up.shutdown()


def test_replaced_weights_stop_eplb_instead_of_corrupting():
    """model.to(dtype) after attach replaces the expert weights: the updator would move rows
    into the old tensors and switch the live maps over the new ones (wrong outputs). It raises
    instead, at the switch and at every step after, and the model keeps its placement."""
    model = Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1000, "layers_per_step": 2})
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(9))
    model(x)
    before = up.phy2log()
    model.to(torch.float64)
    reference = Stack(2, num_redundant_experts=2).to(torch.float64)
    # (refused at move_to since review 18: it checks the layers before queueing)
    with pytest.raises(RuntimeError, match="replaced after attach.*shutdown"):
        up.move_to(np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7], [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]]))
    for _ in range(2):  # and at every step after
        with pytest.raises(RuntimeError, match="replaced after attach"):
            model(x.double())
    assert np.array_equal(up.phy2log(), before)
    for layer in model.layers:  # the live maps were not switched: still the weights' order
        assert np.array_equal(layer.phy2log.numpy(), before[0])
        w13, w2 = logical_weights_of_slots(layer)
        assert np.array_equal(w13, layer.w13.numpy()) and np.array_equal(w2, layer.w2.numpy())
    up.shutdown()
    torch.testing.assert_close(model(x.double()), reference(x.double()))


def test_placement_loaded_behind_the_updator_stops_eplb():
    """A state_dict taken at another placement, loaded after attach, rewrites the maps in place
    behind the updator's mirror: its next plan would start from a placement the layers do not
    have. The next gather raises instead."""
    model = Stack(1, num_redundant_experts=2)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    up = eplb_native.attach(model, {"step_interval": 2, "layers_per_step": 1})
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(10))
    up.move_to(np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7]]))
    model(x)
    model(x)  # moved (and a window gathered, fine)
    assert not np.array_equal(up.phy2log(), snapshot["layers.0.phy2log"].numpy()[None])
    model.load_state_dict(snapshot)
    with pytest.raises(RuntimeError, match="placement buffers changed behind the updator"):
        for _ in range(2):
            model(x)
    up.shutdown()


def test_recording_only_tolerates_a_cast_after_attach():
    """Without dynamic EPLB nothing moves, so a cast after attach breaks nothing: no error."""
    model = Stack(1, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1, "dynamic_eplb": False})
    model.to(torch.float64)
    x = torch.randn(9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    for _ in range(3):
        model(x)
    assert len(up.stats.windows) == 3
    up.shutdown()


def test_dynamic_eplb_in_training_mode_warns(caplog):
    import logging

    model = Stack(1, num_redundant_experts=2)  # nn.Module default: training mode
    for p in model.parameters():  # trainable (EPMoE's are frozen by default)
        p.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="eplb_native"):
        eplb_native.attach(model, {"step_interval": 1000}).shutdown()
        assert any("training mode" in r.getMessage() for r in caplog.records)
        caplog.clear()
        model.eval()
        eplb_native.attach(model, {"step_interval": 1000}).shutdown()
        eplb_native.attach(model.train(), {"step_interval": 1000, "dynamic_eplb": False}).shutdown()
        assert not caplog.records


class _VllmFused(torch.nn.Module):
    """vLLM's FusedMoE as it stood with its EPLB maps on the layer: expert_map indexed by
    physical slot (fixed), logical_to_physical_map [E, M] / logical_replica_count [E] read by
    its router, global_num_experts = P, logical_num_experts = E, per-expert quantization
    factors (g1_alphas: NVFP4's, without the w13_ prefix), a broadcast input scale and the
    per-logical-expert routing bias. Rank 0 of 1, E = 4, P = 6 (experts 0 and 1 twice)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(12)
        s = 6
        self.w13_weight = torch.nn.Parameter(torch.randn(s, 4, 3, generator=g),
                                             requires_grad=False)
        self.w2_weight = torch.nn.Parameter(torch.randn(s, 3, 2, generator=g),
                                            requires_grad=False)
        self.g1_alphas = torch.nn.Parameter(torch.randn(s, generator=g), requires_grad=False)
        self.w13_input_scale = torch.nn.Parameter(torch.ones(1).expand(s), requires_grad=False)
        self.e_score_correction_bias = torch.nn.Parameter(torch.randn(4, generator=g),
                                                          requires_grad=False)
        self.global_num_experts, self.logical_num_experts, self.local_num_experts = 6, 4, 6
        self.register_buffer("_expert_map", torch.arange(6, dtype=torch.int32))
        self.expert_load_view = torch.zeros(6, dtype=torch.int32)
        self.logical_to_physical_map = torch.tensor([[0, 4, -1], [1, 5, -1], [2, -1, -1],
                                                     [3, -1, -1]])
        self.logical_replica_count = torch.tensor([2, 2, 1, 1])

    @property
    def expert_map(self):
        return self._expert_map


def test_fused_vllm_eplb_layer_keeps_its_physical_expert_map():
    """With vLLM's EPLB maps the router picks a physical slot from logical_to_physical_map and
    expert_map takes it to the local row: a move rewrites the maps, never expert_map (it used to
    be rewritten as a logical map: tokens went to another expert's rows), the logical experts
    are E = 4 (not global_num_experts = P = 6), every per-expert tensor moves with its expert
    (g1_alphas included), the broadcast scale and the logical routing bias stay."""
    m = _VllmFused()
    up = eplb_native.attach(torch.nn.Sequential(m), {"dynamic_eplb": False}, hooks=False)
    a = up.layers[0]
    assert (a.num_logical_experts, a.num_slots) == (4, 6)
    assert a.log2phy is m.logical_to_physical_map and a.logcnt is m.logical_replica_count
    assert a.local_expert_map is None
    assert up.phy2log().tolist() == [[0, 1, 2, 3, 0, 1]]
    rows = {n: t.detach().clone() for n, t in m.named_parameters()}
    target = [3, 2, 1, 0, 3, 3]
    up.move_to([target])
    for _ in range(3):
        up.forward_before()
        up.forward_end()
    assert up.phy2log().tolist() == [target]
    assert m.expert_map.tolist() == list(range(6))
    old_slot = {0: 0, 1: 1, 2: 2, 3: 3}  # where each expert's rows were
    for name in ("w13_weight", "w2_weight", "g1_alphas"):
        for p, e in enumerate(target):
            assert torch.equal(getattr(m, name)[p], rows[name][old_slot[e]]), (name, p)
    assert torch.equal(m.w13_input_scale, rows["w13_input_scale"])
    assert torch.equal(m.e_score_correction_bias, rows["e_score_correction_bias"])
    # vLLM's route: logical e -> a physical slot from its map -> expert_map -> a row holding e
    for e in range(4):
        for k in range(int(m.logical_replica_count[e])):
            p = int(m.logical_to_physical_map[e, k])
            assert target[int(m.expert_map[p])] == e
    up.shutdown()


def test_fused_adapter_refuses_what_it_cannot_move_and_changes_nothing():
    """Layers whose routing reads maps the adapter does not drive (vllm-ascend's log2phy /
    ascend_expert_map, vLLM's eplb_state or expert_map_manager), per-expert tensors kept as
    plain attributes, maps that contradict the layer's placement, and an EP rank of the layer's own that attach's group
    contradicts: refused, naming the layer, with the layer as it was."""
    cases = {
        "log2phy": (lambda m: m.register_buffer("log2phy", torch.arange(4, dtype=torch.int32)),
                    "vllm-ascend's routing maps the top-k ids through layer.log2phy"),
        "ascend": (lambda m: setattr(m, "_ascend_expert_map", torch.arange(4)),
                   "ascend_expert_map"),
        "eplb_state": (lambda m: setattr(m, "eplb_state", object()), "layer.eplb_state"),
        # vLLM >= 0.28's RoutedExperts (the weights' module under a MoERunner; no eplb_state):
        # adapted, it counted no load and never moved (review15_peers)
        "routed_experts": (lambda m: setattr(m, "expert_map_manager", object()),
                           "a vLLM layer with an ExpertMapManager is routed by vLLM's own"),
        "plain": (lambda m: setattr(m, "w13_weight_scale_fp32", torch.ones(6, 2)),
                  r"per-expert tensors \['w13_weight_scale_fp32'\] are plain attributes"),
        "maps": (lambda m: m.logical_to_physical_map.copy_(torch.tensor(
            [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]]).flip(0)),
            "logical_to_physical_map names slot|does not match"),
        "counts": (lambda m: m.logical_replica_count.copy_(torch.tensor([1, 2, 2, 1])),
                   "logical_replica_count does not match"),
        "int32": (lambda m: setattr(m, "logical_replica_count",
                                    m.logical_replica_count.to(torch.int32)),
                  r"logical_replica_count must be \[E=4\] int64, got \[4\] torch.int32"),
        "rank": (lambda m: setattr(m, "ep_rank", 1) or setattr(m, "ep_size", 2),
                 "the layer is EP rank 1 of 2, attach's group gives 0 of 1"),
    }
    for key, (spoil, match) in cases.items():
        m = _VllmFused()
        spoil(m)
        before = {n: t.detach().clone() for n, t in [*m.named_parameters(), *m.named_buffers()]}
        maps = (m.logical_to_physical_map.clone(), m.logical_replica_count.clone())
        with pytest.raises(AdapterError, match=match):
            eplb_native.attach(torch.nn.Sequential(m), {"dynamic_eplb": False})
        after = dict([*m.named_parameters(), *m.named_buffers()])
        assert sorted(after) == sorted(before), key
        assert all(torch.equal(after[n], t) for n, t in before.items()), key
        assert torch.equal(m.logical_to_physical_map, maps[0]), key
        assert torch.equal(m.logical_replica_count, maps[1]), key


CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CPU-only host)")


@needs_cuda
def test_cuda_model_rebalances_with_equal_outputs_and_stops_when_cast():
    """One process, the model on a GPU: the counts come from the CUDA kernels, the moves keep
    outputs and weights, and a cast after attach stops EPLB instead of corrupting it."""
    dev = torch.device("cuda")
    model = Stack(2, num_redundant_experts=2).to(dev)
    reference = Stack(2, num_redundant_experts=2).to(dev)
    up = eplb_native.attach(model, {"step_interval": 2, "algorithm_execution_interval": 0,
                                    "layers_per_step": 1})
    assert model.layers[0].load.device.type == "cuda"
    g = torch.Generator().manual_seed(12)
    target = np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7], [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]])
    assert up.move_to(target) == 2
    for _ in range(6):
        x = torch.randn(9, 8, generator=g).to(dev)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert np.array_equal(up.phy2log(), target) and len(up.stats.moves) == 2
    assert sum(w["tokens"] for w in up.stats.windows) == 6 * 9 * 2 * 2
    for layer in model.layers:
        w13, w2 = logical_weights_of_slots(layer)
        assert np.array_equal(w13, layer.w13.cpu().numpy())
        assert np.array_equal(w2, layer.w2.cpu().numpy())
    model.half()
    up.move_to(np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]] * 2))
    with pytest.raises(RuntimeError, match="replaced after attach"):
        model(torch.randn(9, 8, generator=g).to(dev).half())
    assert np.array_equal(up.phy2log(), target)
    up.shutdown()


class _FailingPlanner:
    """A Planner whose plans fail as the C++ worker reports an error (e.g. std::bad_alloc)."""

    def submit(self, *args, **kwargs):
        import concurrent.futures

        fut = concurrent.futures.Future()
        fut.set_exception(RuntimeError("planner worker: std::bad_alloc (injected)"))
        return fut

    def close(self):
        pass


class _RaisingPlanner(_FailingPlanner):
    """A Planner whose submit itself raises (as bad input or a full queue would)."""

    def submit(self, *args, **kwargs):
        raise ValueError("num_groups must be <= 2**62 (injected at submit)")


@pytest.mark.parametrize("use_async", [True, False])
@pytest.mark.parametrize("planner", [_FailingPlanner, _RaisingPlanner])
def test_failed_plan_is_logged_and_serving_goes_on(use_async, planner, monkeypatch, caplog):
    """A plan that fails (or a submit that raises) keeps the placement and is logged; it never
    raises out of the model's forward, with use_async False (vLLM's default) too."""
    from eplb_native import updator as updator_mod

    monkeypatch.setattr(updator_mod, "Planner", planner)
    model, reference = Stack(2, num_redundant_experts=2), Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1, "algorithm_execution_interval": 0,
                                    "use_async": use_async})
    before = up.phy2log()
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(13))
    with caplog.at_level("WARNING", logger="eplb_native"):
        for _ in range(3):
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert up.cycle == 3 and np.array_equal(up.phy2log(), before) and not up.stats.plans
    assert caplog.text.count("planning failed, placement unchanged") == 3
    assert ("std::bad_alloc (injected)" if planner is _FailingPlanner else
            "injected at submit") in caplog.text
    up.shutdown()


def test_sliding_window_stats_cover_the_planned_steps():
    """With window_size < the heat interval, a window's tokens and balancedness cover the
    window_size steps the plan sees (they covered the whole interval)."""
    model = torch.nn.Sequential(EPMoE(8, 6, 8, 2, num_redundant_experts=0))
    up = eplb_native.attach(model, {"step_interval": 4, "window_size": 2, "dynamic_eplb": False})
    g = torch.Generator().manual_seed(6)
    for tokens in (3, 5, 7, 11, 13, 2, 4, 6):
        model(torch.randn(tokens, 8, generator=g))
    assert [w["steps"] for w in up.stats.windows] == [2, 2]
    # top-2 routing: two counts per token, the last two steps of each interval
    assert [w["tokens"] for w in up.stats.windows] == [(7 + 11) * 2, (4 + 6) * 2]
    assert [int(load.sum()) for load in up._recorded] == [(7 + 11) * 2, (4 + 6) * 2]
    up.shutdown()


@pytest.mark.parametrize("heat,interval,want", [(4, 1, [4, 8, 12, 16, 20, 24]),
                                                 (4, 8, [8, 16, 24]), (3, 5, [6, 12, 15, 21]),
                                                 (2, 100, [])])
def test_log_balancedness_interval_counts_steps(heat, interval, want, caplog):
    """log_balancedness_interval is in steps, as vLLM's: one log at the first window gathered
    at or after each multiple (windows every `heat` steps), never more than one a window."""
    import logging

    model = torch.nn.Sequential(EPMoE(8, 6, 8, 2, num_redundant_experts=0))
    up = eplb_native.attach(model, {"step_interval": heat, "dynamic_eplb": False,
                                    "log_balancedness": True,
                                    "log_balancedness_interval": interval})
    g = torch.Generator().manual_seed(3)
    with caplog.at_level(logging.INFO, logger="eplb_native"):
        for _ in range(24):
            model(torch.randn(5, 8, generator=g))
    logged = [int(r.getMessage().split()[2].rstrip(":")) for r in caplog.records
              if r.getMessage().startswith("eplb step")]
    assert logged == want
    assert len(up.stats.windows) == 24 // heat
    up.shutdown()


def test_replaced_maps_stop_eplb_before_any_weight_moves():
    """A layer whose map buffers were replaced (its weights not) refuses the switch before the
    move writes a weight: nothing is half-switched."""
    model = Stack(1, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1000, "layers_per_step": 1})
    layer = model.layers[0]
    w13, w2 = layer.w13.clone(), layer.w2.clone()
    layer.log2phy = layer.log2phy.clone()  # the buffer replaced, as an assign=True load does
    with pytest.raises(RuntimeError, match="replaced after attach"):  # (at move_to: review 18)
        up.move_to(np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7]]))
    with pytest.raises(RuntimeError, match="replaced after attach"):
        model(torch.randn(9, 8, generator=torch.Generator().manual_seed(14)))
    assert torch.equal(layer.w13, w13) and torch.equal(layer.w2, w2)
    up.shutdown()


def test_window_size_too_large_for_memory_names_window_size(monkeypatch):
    """A window whose per-step ring cannot be allocated refuses attach naming window_size and
    the bytes it needs (it was the allocator's own error)."""
    from eplb_native import updator as updator_mod

    real = torch.zeros

    def zeros(*shape, **kw):
        if shape and shape[0] == 5000:  # the ring: [window_size, layers, ...]
            raise torch.OutOfMemoryError("cannot allocate (injected)")
        return real(*shape, **kw)

    monkeypatch.setattr(updator_mod.torch, "zeros", zeros)
    model = torch.nn.Sequential(EPMoE(8, 6, 8, 2))
    with pytest.raises(ValueError, match=r"window_size=5000: the per-step load ring needs "
                                         r"360000 bytes .*OutOfMemoryError"):
        eplb_native.attach(model, {"window_size": 5000, "step_interval": 10 ** 4})


class _FixedPlanner:
    """A Planner returning one fixed placement for every layer, better balanced by fiat: the
    cycle's timing without a second rank (one rank is always balanced, so nothing would move)."""

    def __init__(self, target):
        self.target, self.submitted = target, []

    def submit(self, load, old, **kwargs):
        import concurrent.futures
        from types import SimpleNamespace

        self.submitted.append(old.copy())
        layers = old.shape[0]
        fut = concurrent.futures.Future()
        fut.set_result(SimpleNamespace(
            phy2log=np.stack([self.target] * layers), balancedness_before=np.full(layers, 0.5),
            balancedness_after=np.ones(layers), moved_slots=np.ones(layers, dtype=np.int64)))
        return fut

    def close(self):
        pass


def test_cycle_timing_interval_execution_delay_and_layers_per_step(monkeypatch):
    """A window gathered at the end of step N (every step_interval steps) is planned, taken at
    the end of step N + algorithm_execution_interval, and its layers move layers_per_step per
    step from the next step on (issued before its forward, switched after it), outputs equal."""
    from eplb_native import updator as updator_mod

    target = np.array([7, 6, 5, 4, 3, 2, 1, 0, 7, 7])
    planner = _FixedPlanner(target)
    monkeypatch.setattr(updator_mod, "Planner", lambda: planner)
    model, reference = Stack(3, num_redundant_experts=2), Stack(3, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 4, "algorithm_execution_interval": 2,
                                    "layers_per_step": 2})
    g = torch.Generator().manual_seed(15)
    for _ in range(9):
        x = torch.randn(9, 8, generator=g)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert [w["step"] for w in up.stats.windows] == [4, 8]
    assert [(p["step"], p["cycle"]) for p in up.stats.plans] == [(6, 1)]
    assert [(m["issued_step"], m["step"], m["layer"], m["ok"]) for m in up.stats.moves] == [
        (6, 7, 0, True), (6, 7, 1, True), (7, 8, 2, True)]
    # the second window was submitted once the first cycle's moves were all done
    assert len(planner.submitted) == 2 and (planner.submitted[1] == target).all()
    assert np.array_equal(up.phy2log(), np.stack([target] * 3))
    for layer in model.layers:
        w13, w2 = logical_weights_of_slots(layer)
        assert np.array_equal(w13, layer.w13.numpy()) and np.array_equal(w2, layer.w2.numpy())
    up.shutdown()


@pytest.mark.parametrize("config, windows", [
    ({"step_interval": 8}, [8, 16]),
    ({"step_interval": 8, "first_plan_after": 3}, [3, 11, 19]),
    ({"step_interval": 8, "first_plan_after": 10}, [10, 18]),
    ({"step_interval": 8, "window_size": 8, "first_plan_after": 2}, [2, 10, 18]),
    ({"enable_eplb": True, "eplb_config": {"step_interval": 8, "window_size": 8}}, [2, 10, 18]),
])
def test_first_plan_after(config, windows, tmp_path):
    """first_plan_after: the first window is gathered after that many steps, then one every
    heat interval; vLLM's shape takes a quarter of step_interval, as vLLM's counter starts at
    three quarters. The first window holds the steps so far (never more than its size)."""
    model = Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, config)
    g = torch.Generator().manual_seed(2)
    for _ in range(19):
        model(torch.randn(5, 8, generator=g))
    assert [w["step"] for w in up.stats.windows] == windows
    first = up.stats.windows[0]
    assert first["steps"] == (min(windows[0], up.config.window_size) if up.config.window_size
                              else windows[0])
    assert first["tokens"] == first["steps"] * 5 * 2 * 2  # tokens x top-2 x layers
    for w, before in zip(up.stats.windows[1:], windows, strict=False):
        assert w["steps"] == (up.config.window_size or w["step"] - before)
    assert len(up.stats.plans) >= 1 and up.stats.plans[0]["step"] >= windows[0]
    from eplb_native import traces

    up.save_trace(tmp_path / "t.npz")  # (each window's steps in the meta)
    assert traces.load_trace(tmp_path / "t.npz")[1]["window_steps"] == [
        w["steps"] for w in up.stats.windows]
    # (the stats are the user's to trim: a window's steps do not depend on them)
    up.stats.windows.clear()
    for _ in range(8):
        model(torch.randn(5, 8, generator=g))
    assert [w["steps"] for w in up.stats.windows] == [up.config.window_size or 8]
    up.shutdown()


def test_dropped_moves_never_stall_a_forward():
    """A dropped move whose ops have not ended (a peer posting late, or never) is not waited
    for in a forward: nothing new is issued until it ended (on every rank), serving goes on,
    and then the queued moves proceed."""

    class LateMove:
        def __init__(self):
            self.checks, self.drained = 0, 0

        def finished(self):
            self.checks += 1
            return self.checks > 3

        def drain(self, deadline=None):
            self.drained += 1
            return True

    model, reference = Stack(1, num_redundant_experts=2), Stack(1, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1000, "layers_per_step": 1})
    target = np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7]])
    up.move_to(target)
    late = LateMove()
    up._pending = [(late, up._free.pop(0))]
    g = torch.Generator().manual_seed(16)
    for step in range(6):
        x = torch.randn(9, 8, generator=g)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        if step < 3:
            assert up.moving and not up.stats.moves and late.drained == 0
    assert late.drained == 1 and not up._pending and not up.moving
    assert np.array_equal(up.phy2log(), target) and up.stats.moves[0]["ok"]
    up.shutdown()


def test_fused_adapter_keeps_one_table_on_every_rank():
    """The fused adapter cannot tell whether ranks map their own tokens (vLLM's
    use_all2all_kernels is true for DP + EP paths that map gathered tokens on every rank and sum
    the results): its rows are never rotated by rank, whatever the layer's config says."""
    from types import SimpleNamespace

    from eplb_native import state
    from eplb_native.adapters.fused import fused_moe_adapter

    p2l = torch.tensor([0, 1, 0, 2, 3, 0])  # rank 1 of 2: slots 3..5; expert 0 three times
    for config in (SimpleNamespace(use_all2all_kernels=True), None):
        layer = torch.nn.Module()
        layer.w13_weight = torch.nn.Parameter(torch.randn(3, 4, 2), requires_grad=False)
        layer.w2_weight = torch.nn.Parameter(torch.randn(3, 2, 2), requires_grad=False)
        layer.global_num_experts = 4
        layer.register_buffer("eplb_phy2log", p2l.clone())
        layer.register_buffer("expert_map", torch.tensor([2, -1, 0, 1], dtype=torch.int32))
        if config is not None:
            layer.moe_parallel_config = config
        a = fused_moe_adapter("m", layer, 1, 2)
        assert a.rotate_replicas is False
        a.set_placement(torch.tensor([0, 1, 2, 0, 3, 0]))
        assert torch.equal(a.log2phy, state.placement_tensors([0, 1, 2, 0, 3, 0], 4, 2, 0)[0])


def test_failed_gloo_move_counts_as_finished(tmp_path):
    import updator_mp

    mp.spawn(updator_mp.dropped_gloo_move_ends, args=(2, f"file://{tmp_path}/rdzv"), nprocs=2,
             join=True)


# ------------------------------------------------------------------ refusals no other test reaches


def test_adapter_and_updator_refusals():
    from eplb_native.adapters import MoELayerAdapter
    from eplb_native.config import EplbConfig
    from eplb_native.updator import Updator

    good, fields = _adapter_fields("l0")
    for key, bad, what in (("ep_size", 0, "ep_size must be an int >= 1, got 0"),
                           ("ep_size", 2.0, "ep_size must be an int >= 1, got 2.0"),
                           ("rotate_replicas", 1, "rotate_replicas must be a bool, got 1")):
        with pytest.raises(AdapterError, match=f"MoE layer 'l0' .*{what}"):
            MoELayerAdapter(**{**fields, key: bad})
    # a layer of 2 ranks with no process group to reach the other: refused, nothing created
    two = MoELayerAdapter(**{**fields, "ep_size": 2, "local_expert_map": None,
                             "weights": [w[:5] for w in good.weights]})
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="group is required: the layers span 2 ranks"):
        Updator([two], EplbConfig())


def test_register_adapter_order_and_checks(monkeypatch):
    from eplb_native.adapters import base

    monkeypatch.setattr(base, "_ADAPTERS", list(base._ADAPTERS))  # (restored after the test)
    with pytest.raises(TypeError, match="adapter must be callable, got int"):
        base.register_adapter(3)
    seen = []

    def first(name, module, ep_rank, ep_size):
        seen.append("first")

    def second(name, module, ep_rank, ep_size):
        seen.append("second")

    base.register_adapter(first)
    assert base.register_adapter(second) is second  # (usable as a decorator)
    base.register_adapter(first)  # registered once only
    order = base.registered_adapters()
    assert order[:2] == [second, first] and order.count(first) == 1
    order.clear()  # a copy: the registry is untouched
    assert base.registered_adapters()[:2] == [second, first]
    assert base.adapt_module("m", torch.nn.Linear(2, 2), 0, 1) is None
    assert seen[:2] == ["second", "first"]  # the later registration is tried first

    class Wrong(torch.nn.Module):
        def eplb_adapter(self, name):
            return {"phy2log": None}

    with pytest.raises(AdapterError, match="eplb_adapter\\(\\) must return a MoELayerAdapter, "
                                           "got dict"):
        base.adapt_module("odd", Wrong(), 0, 1)


def test_transfer_refusals():
    with pytest.raises(ValueError, match="logical expert 2 has no copy in the old placement"):
        layer_schedule(np.array([0, 1, 0, 1]), np.array([0, 2, 0, 1]), 2)
    with pytest.raises(ValueError, match=r"num_nodes must divide num_ranks \(2\), got 3"):
        layer_schedule(np.array([0, 1, 0, 1]), np.array([1, 0, 0, 1]), 2, 3)
    weights = [torch.zeros(4, 3)]
    for staging in ([torch.zeros(4, 2)], [torch.zeros(4, 3, dtype=torch.float64)],
                    [torch.zeros(3, 4).t()], []):
        with pytest.raises(ValueError, match="staging must match weights tensor by tensor"):
            LayerMove(weights, staging, [], 0, None)


def test_warm_up_refuses_with_moves_queued():
    model = Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1000, "layers_per_step": 1})
    up.move_to(np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7]] * 2))
    up._move_group = object()  # (one rank has none: stand in for a multi-rank updator's)
    with pytest.raises(RuntimeError, match="warm_up: moves are queued or in flight"):
        up.warm_up()
    up._move_group = None
    up.shutdown()


@pytest.mark.parametrize("mixed", [False, True])
def test_fold_counts_every_layer_per_logical_expert(mixed):
    """The per-step fold (every layer at once, or one at a time when the layers count in
    different dtypes) adds each slot's count to its logical expert and to its rank's tokens, and
    zeroes the layers' counters: random counts against a plain loop."""
    model = Stack(3, num_redundant_experts=2)
    if mixed:  # (before attach: the layer counts in int32 from the start)
        model.layers[1].load = torch.zeros(10, dtype=torch.int32)
    up = eplb_native.attach(model, {"step_interval": 3, "dynamic_eplb": False}, hooks=False)
    assert {layer.load.dtype for layer in model.layers} == (
        {torch.int64, torch.int32} if mixed else {torch.int64})
    g = torch.Generator().manual_seed(12)
    want = np.zeros((3, 8), dtype=np.int64)
    for _ in range(3):
        up.forward_before()
        for i, (layer, row) in enumerate(zip(model.layers, up.phy2log(), strict=True)):
            counts = torch.randint(0, 1000, (10,), generator=g)
            layer.load.copy_(counts)
            np.add.at(want[i], row, counts.numpy())
        up.forward_end()
        assert all(not layer.load.any() for layer in model.layers)
    assert len(up._recorded) == 1
    np.testing.assert_array_equal(up._recorded[0], want)
    assert up.stats.windows[0]["tokens"] == int(want.sum())
    up.shutdown()


def _record_threads():
    return [t for t in threading.enumerate() if t.name.startswith("eplb-native-record")]


def test_record_path_is_written_after_each_rebalance(tmp_path, monkeypatch, caplog):
    """Rank 0 rewrites expert_map_record_path once a rebalance has nothing left to move (as
    vllm-ascend rewrites its record every cycle: a killed server leaves its last map), on one
    thread of its own, each write a copy of the placement then served, in order; a failed write
    there is logged and serving goes on; shutdown waits for them, then writes the final map."""
    record = tmp_path / "record.json"
    model = Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1000, "expert_map_record_path": record})
    g = torch.Generator().manual_seed(8)
    real_save = expert_map.save
    started, done, gates = [], [], {}

    def gated_save(path, phy2log, num_ranks, warn=True):  # writes in `gates` wait for theirs
        started.append(phy2log)
        k = len(started) - 1
        if k in gates:
            assert gates[k].wait(10)
        real_save(path, phy2log, num_ranks, warn=warn)
        done.append(k)

    def wait_done(n):
        deadline = time.monotonic() + 10
        while len(done) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(done)

    monkeypatch.setattr(expert_map, "save", gated_save)
    first = np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7], [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]])
    second = first[:, ::-1].copy()
    gates[0] = threading.Event()
    assert up.move_to(first) == 2
    model(torch.randn(9, 8, generator=g))  # layer 0 switched, layer 1 still queued: no write
    time.sleep(0.05)
    assert up.moving and started == []
    model(torch.randn(9, 8, generator=g))  # write 0 starts, waits at its gate
    up.move_to(second)
    for _ in range(2):
        model(torch.randn(9, 8, generator=g))  # write 1 queues behind it (one thread)
    assert np.array_equal(up.phy2log(), second)
    gates[0].set()
    assert wait_done(2) == [0, 1]  # in order: the newer map last
    assert np.array_equal(expert_map.load(record, num_ranks=1)[0], second)
    # shutdown with a write still waiting: it waits for it, then writes the final map
    gates[2] = threading.Event()
    up.move_to(first)
    for _ in range(2):
        model(torch.randn(9, 8, generator=g))
    threading.Timer(0.2, gates[2].set).start()
    up.shutdown()
    assert _record_threads() == [] and done == [0, 1, 2, 3]
    # each write a copy of the placement served when it was queued
    assert [w.tolist() for w in started] == [first.tolist(), second.tolist(), first.tolist(),
                                             first.tolist()]
    assert np.array_equal(expert_map.load(record, num_ranks=1)[0], first)

    # a failed write after a rebalance: a warning, the old file kept, the step completes
    def failing_save(path, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(expert_map, "save", failing_save)
    up = eplb_native.attach(model, {"step_interval": 1000, "expert_map_record_path": record})
    up.move_to(second)
    with caplog.at_level("WARNING", logger="eplb_native"):
        for _ in range(2):
            model(torch.randn(9, 8, generator=g))
        up._recorder.shutdown(wait=True)
    assert np.array_equal(up.phy2log(), second)
    assert "not written after a rebalance: OSError" in caplog.text
    assert np.array_equal(expert_map.load(record, num_ranks=1)[0], first)
    monkeypatch.setattr(expert_map, "save", real_save)
    up.shutdown()
    assert np.array_equal(expert_map.load(record, num_ranks=1)[0], second)


def test_record_thread_that_cannot_start_ends_no_step(tmp_path, monkeypatch, caplog):
    """The record's thread failing to start (a process limit) is logged; the step completes on
    rank 0 as on the others (an exception there would leave them at the next collective)."""
    import concurrent.futures

    def no_thread(self, *a, **k):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", no_thread)
    model = Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1000,
                                    "expert_map_record_path": tmp_path / "m.json"})
    target = np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7], [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]])
    up.move_to(target)
    with caplog.at_level("WARNING", logger="eplb_native"):
        for _ in range(2):
            model(torch.randn(9, 8))
    assert np.array_equal(up.phy2log(), target) and not up.moving
    assert "not written after a rebalance: RuntimeError: can't start new thread" in caplog.text
    up.shutdown()
    assert np.array_equal(expert_map.load(tmp_path / "m.json", num_ranks=1)[0], target)


def test_record_path_after_a_rebalance_whose_last_layer_failed(tmp_path):
    """Layer 0 switches, layer 1's move fails a step later: layer 0 serves the new placement,
    so the record is rewritten (the failing step switched nothing itself)."""
    record = tmp_path / "record.json"
    model = Stack(2, num_redundant_experts=2)
    up = eplb_native.attach(model, {"step_interval": 1000, "expert_map_record_path": record})

    def fail_layer_1(cycle, layer, phase):
        if layer == 1 and phase == "complete":
            raise RuntimeError("injected")

    up.fault_hook = fail_layer_1
    before = up.phy2log()
    target = np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7], [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]])
    up.move_to(target)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(9, 8, generator=g))
    assert [(m["layer"], m["ok"]) for m in up.stats.moves] == [(0, True), (1, False)]
    assert not up.moving
    up._recorder.shutdown(wait=True)
    want = np.stack([target[0], before[1]])
    assert np.array_equal(up.phy2log(), want)
    assert np.array_equal(expert_map.load(record, num_ranks=1)[0], want)
    up.shutdown()


def test_attach_says_what_the_config_means(caplog, tmp_path):
    """Defaults differ by where a config comes from (ours, vLLM's, vllm-ascend's wrapper): attach
    logs once what it will do."""
    with caplog.at_level("INFO", logger="eplb_native"):
        eplb_native.attach(Stack(2), {"eplb_config": {}}).shutdown()
    assert ("attached to 2 MoE layers (8 experts, 8 slots on 1 ranks); dynamic_eplb off: load "
            "recorded, no rebalancing") in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="eplb_native"):
        eplb_native.attach(Stack(2), {"eplb_config": {
            "expert_map_record_path": str(tmp_path / "m.json")}}).shutdown()
    assert ("a balanced plan every 600 steps from the last 600 steps of load, its moves "
            "starting 51 steps after that window, 1 layer(s) a step; map recorded to ") in (
        caplog.text)
    # vLLM's shape: vLLM's defaults; its communicator, read and not acted on, said so
    caplog.clear()
    with caplog.at_level("INFO", logger="eplb_native"):
        eplb_native.attach(Stack(2), {"enable_eplb": True, "eplb_config": {
            "communicator": "pynccl", "enable_migration_batching": True}}).shutdown()
    assert ("a deepseek plan every 3000 steps (the first after 750) from the last 1000 steps "
            "of load, its moves starting 2 steps after that window, 1 layer(s) a step; communicator 'pynccl' "
            "ignored (weights move by torch.distributed P2P on the EP group); "
            "migration batching (in a layer's move every rank talks to one peer at a "
            "time)") in caplog.text
    # expert groups named where the policy uses them (deepseek on one node), not otherwise
    for policy, said in (("deepseek", True), ("balanced", False)):
        caplog.clear()
        with caplog.at_level("INFO", logger="eplb_native"):
            eplb_native.attach(Stack(2), {"num_groups": 4, "policy": policy}).shutdown()
        assert (f"a {policy} plan, 4 expert groups every 100 steps" in caplog.text) == said
        assert f"a {policy} plan" in caplog.text


def test_windows_that_counted_nothing_are_reported_once(caplog):
    """Layers whose routing never calls our ops (an engine's own kernels) count nothing and are
    never rebalanced: two empty windows in a row say so, once (one alone may be warm-up or graph
    capture); windows with tokens between reset the count."""
    import logging

    def said():
        return [r for r in caplog.records if "counted no tokens" in r.getMessage()]

    model = torch.nn.Sequential(EPMoE(8, 6, 8, 2, num_redundant_experts=0))
    up = eplb_native.attach(model, {"step_interval": 2, "dynamic_eplb": False}, hooks=False)
    g = torch.Generator().manual_seed(2)

    def window(tokens: bool):
        for _ in range(2):
            up.forward_before()
            if tokens:
                model(torch.randn(5, 8, generator=g))
            up.forward_end()

    with caplog.at_level(logging.WARNING, logger="eplb_native"):
        for tokens in (False, True, False, True):  # never two empty in a row
            window(tokens)
        assert not said()
        for tokens in (False, False, False, False):
            window(tokens)
    assert len(said()) == 1 and "to step 12" in said()[0].getMessage()
    assert "the recorded load is empty" in said()[0].getMessage()
    assert len(up.stats.windows) == 8
    up.shutdown()
    caplog.clear()
    model = torch.nn.Sequential(EPMoE(8, 6, 8, 2, num_redundant_experts=0))
    up = eplb_native.attach(model, {"step_interval": 2})
    with caplog.at_level(logging.WARNING, logger="eplb_native"):
        for _ in range(8):
            model(torch.randn(5, 8, generator=g))
    assert not said()
    up.shutdown()
