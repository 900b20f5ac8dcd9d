"""Multi-process scenarios of the updator (spawned by tests/test_updator.py, one process per rank;
also run on GPUs with ``backend="nccl"``). Every check is an assert inside the rank; a failing
rank fails the spawn with its traceback.

The model: ``NUM_LAYERS`` EPMoE layers in a residual stack, gate biased so experts 0 and 1 are
hot. The same model with EPLB off runs beside it on the same inputs; outputs must match at
every step, every slot's weights must equal its logical expert's original weights bit for bit,
and every rank must hold the same maps.
"""

from __future__ import annotations

import datetime
import os
import re
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist
from mp_exit import leave

import eplb_native
from eplb_native import expert_map
from eplb_native.adapters import AdapterError
from eplb_native.nn import EPMoE, logical_weights_of_slots

NUM_LAYERS = 3
HIDDEN, INTER, EXPERTS, TOP_K = 16, 8, 8, 2
TOKENS = 24


class Stack(torch.nn.Module):
    def __init__(self, group, redundant, device):
        super().__init__()
        self.layers = torch.nn.ModuleList([
            EPMoE(HIDDEN, INTER, EXPERTS, TOP_K, group=group, num_redundant_experts=redundant,
                  seed=100 + i, device=device) for i in range(NUM_LAYERS)])
        for layer in self.layers:
            layer.gate_bias[1:3] = 2.5  # experts 1 and 2 hot (both on rank 0 at first)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _inputs(step, rank, device):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(TOKENS, HIDDEN, generator=g).to(device)


def _check_slots(model):
    for layer in model.layers:
        w13, w2 = logical_weights_of_slots(layer)
        assert np.array_equal(w13, layer.w13.cpu().numpy()), "w13 differs from the logical expert"
        assert np.array_equal(w2, layer.w2.cpu().numpy()), "w2 differs from the logical expert"


def _check_same_maps(updator, group):
    mine = torch.from_numpy(updator.phy2log()).to(updator.device)  # NCCL needs device tensors
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    for other in everyone:
        assert torch.equal(other, mine), "ranks disagree on the placement"
    for layer, row in zip(updator.layers, updator.phy2log(), strict=True):
        # the layer's own phy2log is the host mirror's, and the derived tensors follow it
        assert np.array_equal(layer.phy2log.cpu().numpy(), row), "mirror != layer phy2log"
        log2phy, logcnt, local = eplb_native.state.placement_tensors(
            layer.phy2log.cpu(), layer.num_logical_experts, layer.ep_size, layer.ep_rank,
            rotate=layer.rotate_replicas)
        assert torch.equal(layer.log2phy.cpu(), log2phy)
        assert torch.equal(layer.logcnt.cpu(), logcnt)
        assert torch.equal(layer.local_expert_map.cpu(), local)


def _run(model, reference, updator, steps, rank, device, first_step=0, on_step=None):
    for step in range(first_step, first_step + steps):
        x = _inputs(step, rank, device)
        y = model(x)
        y_ref = reference(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        _check_slots(model)
        if on_step is not None:
            on_step(step)


def _setup(rank, world, init_method, backend):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group(backend, init_method=init_method, rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


#: bytes of one slot's weights (w13 [2I, H] + w2 [H, I], fp32): the unit of the move budget
SLOT_BYTES = (2 * INTER * HIDDEN + HIDDEN * INTER) * 4


def scenario(rank, world, init_method, backend, tmpdir, fault, budget_rows=None,
             batched=False):
    """The whole test on one rank: rebalancing with equal outputs, then a fault, then the
    expert-map round trip. ``fault``: "raise" (after waiting), "timeout" (posting delayed past
    transfer_timeout_s) or "issue" (raised while issuing, in the second step of the layer's move
    when a budget splits it). ``budget_rows``: max_move_bytes_per_step in slots' weights (a
    little more, which must round down), None for whole layers. ``batched``:
    enable_migration_batching."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # ranks share the CI machine's few cores
    device = _setup(rank, world, init_method, backend)
    group = dist.group.WORLD
    redundant = world  # one extra slot per rank
    model, reference = Stack(group, redundant, device), Stack(group, redundant, device)
    record = os.path.join(tmpdir, "record.json")
    config = {"eplb_config": {
        "dynamic_eplb": True, "expert_heat_collection_interval": 4,
        "algorithm_execution_interval": 1, "num_redundant_experts": redundant,
        "expert_map_record_path": record, "policy": "balanced",
        # (the 4-rank runs plan as vllm-ascend needs: no rank holds an expert twice)
        "distinct_ranks": world == 4,
        "transfer_timeout_s": 0.5 if fault == "timeout" else 10.0,
        "enable_migration_batching": batched,
        # 4 ranks move every layer at once: concurrent moves must not cross their messages
        "layers_per_step": NUM_LAYERS if world == 4 else 1}}
    if budget_rows is not None:
        config["eplb_config"]["max_move_bytes_per_step"] = budget_rows * SLOT_BYTES + 100
    updator = eplb_native.attach(model, config, group)
    updator.warm_up()

    # the first move of layer 1 fails; the next cycle must move it
    fault_cycle, fault_layer, fault_rank = 1, 1, world - 1
    default = eplb_native.state.default_placement(EXPERTS, world, redundant)
    injected = []
    issues = []  # steps at which the faulty layer's move issued on the faulty rank

    def hook(cycle, layer, phase):
        if (cycle, layer, rank) != (fault_cycle, fault_layer, fault_rank):
            return None
        if phase == "issue":
            issues.append(updator.step)
        if fault == "issue" and phase == "issue" and len(issues) == (
                1 if budget_rows is None else 2):
            injected.append(phase)
            raise RuntimeError("injected failure while issuing")
        if fault == "raise" and phase == "complete":
            injected.append(phase)
            raise RuntimeError("injected transfer failure")
        if fault == "timeout" and phase == "issue":
            injected.append(phase)
            return 1.5  # seconds; transfer_timeout_s is 0.5
        return None

    updator.fault_hook = hook
    def on_step(step):
        _check_same_maps(updator, group)
        moves = updator.stats.moves
        if moves and not moves[-1]["ok"] and moves[-1]["step"] == updator.step:
            # the failed layer kept its old placement on every rank
            assert np.array_equal(updator.phy2log()[fault_layer], default)

    _run(model, reference, updator, 24 if budget_rows is None else 40, rank, device,
         on_step=on_step)
    # a dropped move whose late ops are still on their way holds new moves back (never waited
    # for in a forward): serving goes on until they end on every rank, then moves resume.
    # (The stop is the same on every rank: cycles and moves are agreed.)
    step = 24 if budget_rows is None else 40

    def moved_again():
        return updator.cycle >= 4 and any(m["ok"] and m["layer"] == fault_layer and
                                          m["cycle"] > fault_cycle for m in updator.stats.moves)

    while not moved_again() and step < 600:
        time.sleep(0.01)
        _run(model, reference, updator, 1, rank, device, first_step=step, on_step=on_step)
        step += 1

    moves = updator.stats.moves
    assert updator.cycle >= 4, f"expected several cycles, got {updator.cycle}"
    failed = [m for m in moves if not m["ok"]]
    assert [(m["cycle"], m["layer"]) for m in failed] == [(fault_cycle, fault_layer)], failed
    if budget_rows is not None:
        # the budget split moves over steps; the failed one was dropped after its second step
        assert any(m["steps"] > 1 for m in moves if m["ok"]), moves
        if fault == "issue":
            assert failed[0]["steps"] == 2, failed
    if rank == fault_rank:
        assert injected, "the fault was never injected"
        expect = {"raise": "injected transfer failure", "timeout": "transfer_timeout_s",
                  "issue": "injected failure while issuing"}[fault]
        assert expect in failed[0]["reason"], failed[0]["reason"]
    else:
        assert failed[0]["reason"], "a kept layer must say why"
    # the layer that failed moved in a later cycle
    assert any(m["ok"] and m["layer"] == fault_layer and m["cycle"] > fault_cycle
               for m in moves), moves
    windows = updator.stats.windows
    before = windows[0]["balancedness"].mean()
    after = np.mean([w["balancedness"].mean() for w in windows[-2:]])
    assert after >= 1.5 * before, (before, after)
    for p in updator.stats.plans:  # only layers the plan balances better move
        assert all(p["balancedness_after"][i] > p["balancedness_before"][i]
                   for i in p["layers_to_move"])
    final = updator.phy2log()
    if world == 4:
        assert not expert_map.repeated_on_a_rank(final, world)
    # rank 0 alone wrote the record after the rebalances (their thread), the others none
    assert any(m["ok"] for m in updator.stats.moves)
    assert (updator._recorder is not None) == (rank == 0)
    updator.shutdown()
    updator.shutdown()  # idempotent
    dist.barrier()

    # expert_map_record_path was written by rank 0, in vllm-ascend's format
    recorded, ranks = expert_map.load(record)
    assert ranks == world and np.array_equal(recorded, final)

    # a fresh model started from that map: weights are moved into place at attach
    fresh, reference2 = Stack(group, redundant, device), Stack(group, redundant, device)
    up2 = eplb_native.attach(fresh, {"expert_map_path": record, "dynamic_eplb": False}, group)
    assert np.array_equal(up2.phy2log(), final)
    _check_same_maps(up2, group)
    _run(fresh, reference2, up2, 3, rank, device, first_step=100)
    up2.shutdown()
    dist.barrier()
    dist.destroy_process_group()
    leave()


def scenario_move_to(rank, world, init_method, backend, tmpdir, budget_rows, batched=False):
    """Random placements forced with ``Updator.move_to`` (whole reshuffles: direct, gathered and
    per-run messages), with or without a byte budget: outputs equal and weights bit-exact at
    every step, identical maps, every move lands. ``batched``: vLLM's
    enable_migration_batching: each batch this rank posts talks to one peer."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = _setup(rank, world, init_method, backend)
    group = dist.group.WORLD
    redundant = world
    model, reference = Stack(group, redundant, device), Stack(group, redundant, device)
    config = {"expert_heat_collection_interval": 10 ** 6, "layers_per_step": 2,
              "transfer_timeout_s": 20.0, "enable_migration_batching": batched}
    if budget_rows is not None:
        config["max_move_bytes_per_step"] = budget_rows * SLOT_BYTES
    groups_before = len(dist.distributed_c10d._world.pg_map)
    updator = eplb_native.attach(model, config, group)
    updator.warm_up()
    peers_per_post = []  # the moves' posts (warm_up's, to every peer, before)
    if batched:
        post = dist.batch_isend_irecv

        def recording(ops):
            peers_per_post.append({op.peer for op in ops})
            return post(ops)

        dist.batch_isend_irecv = recording
    rng = np.random.default_rng(5)  # the same draws on every rank
    p = EXPERTS + redundant
    step = 0
    for _ in range(4):
        target = np.stack([np.concatenate([rng.permutation(EXPERTS),
                                           rng.integers(0, EXPERTS, p - EXPERTS)])
                           for _ in range(NUM_LAYERS)])
        assert updator.move_to(target) > 0
        while updator.moving:
            _run(model, reference, updator, 1, rank, device, first_step=step)
            step += 1
        _check_same_maps(updator, group)
        assert np.array_equal(updator.phy2log(), target)
    moves = updator.stats.moves
    assert all(m["ok"] for m in moves), moves
    if budget_rows is not None:
        assert any(m["steps"] > 1 for m in moves), moves
    if batched:  # one peer a batch; whole reshuffles talk to several peers, in several batches
        assert peers_per_post and all(len(p) == 1 for p in peers_per_post), peers_per_post
        assert len({frozenset(p) for p in peers_per_post}) > 1, peers_per_post
    # move_to is agreed: another placement on the last rank, or one it refuses, refuses it on
    # every rank with nothing queued (the others used to post moves that timed out)
    last = rank == world - 1
    current = updator.phy2log()
    other = current.copy()
    other[0] = np.roll(other[0], 1)
    try:
        updator.move_to(other if last else current[::-1].copy())
        raise AssertionError("move_to with different placements was not refused")
    except ValueError as e:
        assert "the ranks passed different placements" in str(e), e
    bad = current.copy()
    bad[0, :] = 0  # experts 1.. hold no slot
    try:
        updator.move_to(bad if last else current[::-1].copy())
        raise AssertionError("move_to refused on one rank was not refused everywhere")
    except (ValueError, RuntimeError) as e:
        assert ("holds no copy" if last else f"rank {world - 1} refused it") in str(e), e
    assert not updator.moving and np.array_equal(updator.phy2log(), current)
    _run(model, reference, updator, 2, rank, device, first_step=step)
    updator.shutdown()
    # the process groups attach took are kept for the next attach on these ranks: its move
    # group, and its CPU group unless the EP group is gloo already (each attach used to leave
    # one or two behind); the attaches below, refused ones too, take those again
    kept = groups_before + (1 if backend == "gloo" else 2)
    assert len(dist.distributed_c10d._world.pg_map) == kept
    dist.barrier()
    _attach_fails_on_one_rank(rank, world, group, device, tmpdir, redundant)
    _expert_map_fault(rank, world, group, device, tmpdir, redundant)
    _plan_fails_on_one_rank(rank, world, group, device, redundant)
    assert len(dist.distributed_c10d._world.pg_map) == kept
    dist.barrier()
    dist.destroy_process_group()
    leave()


def _attach_fails_on_one_rank(rank, world, group, device, tmpdir, redundant):
    """What fails on one rank only at attach (its expert map file missing, a different map,
    buffers or staging it cannot allocate) is refused on every rank, none waits for another,
    and the model is left as it was."""
    import eplb_native.updator as updator_mod

    last = rank == world - 1
    p = EXPERTS + redundant
    rng = np.random.default_rng(12)  # the same draws on every rank
    maps = [np.stack([np.concatenate([rng.permutation(EXPERTS),
                                      rng.integers(0, EXPERTS, p - EXPERTS)])
                      for _ in range(NUM_LAYERS)]) for _ in range(2)]
    paths = [os.path.join(tmpdir, f"one_rank_map{i}.json") for i in range(2)]
    if rank == 0:
        for path, m in zip(paths, maps, strict=True):
            expert_map.save(path, m, world)
    dist.barrier()
    model, reference = Stack(group, redundant, device), Stack(group, redundant, device)
    default = eplb_native.state.default_placement(EXPERTS, world, redundant)
    missing = os.path.join(tmpdir, "no_such_map.json")
    buffers = [set(layer._buffers) for layer in model.layers]

    def refused(config, mine, others):
        expected = mine if last else others
        try:
            eplb_native.attach(model, config, group)
        except Exception as e:  # noqa: BLE001  (checked below)
            assert isinstance(e, expected), f"rank {rank}: {e!r}, expected {expected.__name__}"
            return str(e)
        raise AssertionError(f"attach with {config} was not refused on rank {rank}")

    static = {"dynamic_eplb": False}
    # the map file is missing on the last rank only
    msg = refused({**static, "expert_map_path": missing if last else paths[0]},
                  FileNotFoundError, RuntimeError)
    assert last or f"rank {world - 1} " in msg, msg
    # the last rank loads another map than the others
    msg = refused({**static, "expert_map_path": paths[1] if last else paths[0]},
                  ValueError, ValueError)
    assert "different expert maps" in msg, msg
    # the last rank cannot allocate its buffers
    real_alloc = updator_mod.Updator._allocate_buffers

    def alloc(self):
        if last:
            raise torch.OutOfMemoryError("no memory for the buffers (injected)")
        real_alloc(self)

    updator_mod.Updator._allocate_buffers = alloc
    try:
        msg = refused({**static, "expert_map_path": paths[0]}, torch.OutOfMemoryError,
                      RuntimeError)
        assert last or f"rank {world - 1} " in msg, msg
    finally:
        updator_mod.Updator._allocate_buffers = real_alloc
    # the last rank cannot allocate the staging the expert map's move needs
    real_staging = updator_mod._staging_like

    def staging(weights):
        if last:
            raise torch.OutOfMemoryError("no memory for staging (injected)")
        return real_staging(weights)

    updator_mod._staging_like = staging
    try:
        msg = refused({**static, "expert_map_path": paths[0]}, RuntimeError, RuntimeError)
        assert ("staging buffers: OutOfMemoryError" if last else
                "another rank could not allocate staging") in msg, msg
        assert "the model is as it was" in msg, msg
    finally:
        updator_mod._staging_like = real_staging
    # the last rank's layers hold no valid placement: it says so, the others name it (they
    # waited in the group's creation before)
    p2l = model.layers[1].phy2log
    if last:
        p2l.fill_(0)  # experts 1.. hold no slot
    msg = refused(static, AdapterError, RuntimeError)
    assert ("its phy2log is not a valid placement" if last else f"rank {world - 1} ") in msg, msg
    p2l.copy_(torch.from_numpy(default))
    # the last rank's layers hold another valid placement than the others': every rank refuses
    if last:
        p2l.copy_(p2l.roll(1))
    msg = refused(static, ValueError, ValueError)
    assert "hold different placements" in msg, msg
    p2l.copy_(torch.from_numpy(default))
    # a live updator on the last rank's layers only (attach there would move them twice)
    if last:
        class _Live:
            _closed = False

        live = _Live()
        for layer in model.layers:
            updator_mod._live_updators[layer] = weakref.ref(live)
    msg = refused(static, ValueError, RuntimeError)
    assert ("already has a live eplb_native Updator" if last else f"rank {world - 1} ") in msg
    for layer in model.layers:
        updator_mod._live_updators.pop(layer, None)
    # an adapter refuses the last rank's layer only (a fused layer's expert_map that differs
    # there): the others name it instead of waiting in the Updator's collectives
    real_adapt = updator_mod.adapt_module

    def adapt(name, module, ep_rank, ep_size):
        if last and module is model.layers[1]:
            raise AdapterError(f"MoE layer {name!r}: refused on this rank only (injected)")
        return real_adapt(name, module, ep_rank, ep_size)

    updator_mod.adapt_module = adapt
    try:
        msg = refused(static, AdapterError, RuntimeError)
        assert ("refused on this rank only" if last else
                f"rank {world - 1} of the group could not adapt") in msg, msg
    finally:
        updator_mod.adapt_module = real_adapt
    for layer, before in zip(model.layers, buffers, strict=True):
        assert np.array_equal(layer.phy2log.cpu().numpy(), default)
        assert set(layer._buffers) == before
    _check_slots(model)
    _run(model, reference, None, 2, rank, device, first_step=400)
    dist.barrier()


def _plan_fails_on_one_rank(rank, world, group, device, redundant):
    """A plan that fails on one rank only (a resource error: memory, a dead thread), or comes
    out different there, is agreed: every rank keeps its placement and serves on (the others
    used to queue its moves and hang in their agreement, meeting the failed rank's model
    collectives)."""
    import concurrent.futures

    import eplb_native.updator as updator_mod

    last = rank == world - 1
    real = updator_mod.Planner

    class OneRank(real):
        def __init__(self, how):
            super().__init__()
            self.how = how

        def submit(self, *args, **kwargs):
            fut = super().submit(*args, **kwargs)
            if not last:
                return fut
            out = concurrent.futures.Future()
            if self.how == "fail":
                fut.result()
                out.set_exception(MemoryError("std::bad_alloc (injected on one rank)"))
            else:  # another plan: two slots of rank 0 exchanged (a valid placement still)
                plan = fut.result()
                plan.phy2log[:, [0, 1]] = plan.phy2log[:, [1, 0]]
                out.set_result(plan)
            return out

    for how in ("fail", "differ"):
        model, reference = Stack(group, redundant, device), Stack(group, redundant, device)
        updator_mod.Planner = lambda h=how: OneRank(h)
        try:
            up = eplb_native.attach(model, {"step_interval": 2, "algorithm_execution_interval": 0,
                                            "transfer_timeout_s": 10.0}, group)
        finally:
            updator_mod.Planner = real
        start = up.phy2log()
        _run(model, reference, up, 6, rank, device, first_step=500)
        assert up.cycle == 3 and not up.stats.plans and not up.stats.moves, (how, up.stats.moves)
        assert np.array_equal(up.phy2log(), start)
        _check_same_maps(up, group)
        up.shutdown()
    dist.barrier()


def _expert_map_fault(rank, world, group, device, tmpdir, redundant):
    """attach with an expert map whose second layer's move fails on the last rank: every rank
    refuses the attach, the first layer is moved back (outputs, weights and maps as before),
    and the same attach without the fault then lands the map."""
    import eplb_native.updator as updator_mod

    p = EXPERTS + redundant
    rng = np.random.default_rng(11)  # the same draws on every rank
    target = np.stack([np.concatenate([rng.permutation(EXPERTS),
                                       rng.integers(0, EXPERTS, p - EXPERTS)])
                       for _ in range(NUM_LAYERS)])
    path = os.path.join(tmpdir, "fault_map.json")
    if rank == 0:
        expert_map.save(path, target, world)
    dist.barrier()
    model, reference = Stack(group, redundant, device), Stack(group, redundant, device)
    default = eplb_native.state.default_placement(EXPERTS, world, redundant)
    real = updator_mod.LayerMove

    class FailingMove(real):
        def wait(self, deadline):
            done = super().wait(deadline)  # the ops complete: staging is never left in use
            return done and not (self.tag == 1 and rank == world - 1)

    updator_mod.LayerMove = FailingMove
    try:
        eplb_native.attach(model, {"expert_map_path": path, "dynamic_eplb": False}, group)
        raise AssertionError("attach with a failing move was not refused")
    except RuntimeError as e:
        msg = str(e)
        assert "layer 1" in msg or "layers.1" in msg, msg
        assert "moved back, the model is as it was" in msg, msg
    finally:
        updator_mod.LayerMove = real
    for layer in model.layers:
        assert np.array_equal(layer.phy2log.cpu().numpy(), default)
    _run(model, reference, None, 2, rank, device, first_step=200)
    up = eplb_native.attach(model, {"expert_map_path": path, "dynamic_eplb": False}, group)
    assert np.array_equal(up.phy2log(), target)
    _check_same_maps(up, group)
    _run(model, reference, up, 2, rank, device, first_step=300)
    up.shutdown()


def dropped_gloo_move_ends(rank, world, init_method):
    """A gloo move whose op failed (a peer past the group's timeout) counts as finished once its
    thread ended: every op waited for, the first error kept (gloo marks an op completed only
    when waited for, and finished() stayed False for good: no move was issued again)."""
    from eplb_native.transfer import LayerMove, layer_schedule

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=1))
    weights = [torch.full((2, 4), float(rank)), torch.full((2, 3), float(rank))]
    staging = [torch.empty_like(t) for t in weights]
    move = LayerMove(weights, staging, layer_schedule(np.array([0, 1, 2, 3]),
                                                      np.array([2, 3, 0, 1]), world),
                     rank, group, tag=1)
    if rank == 0:
        time.sleep(2.5)  # posts after the peer's ops timed out
    move.issue()
    deadline = time.monotonic() + 30
    while not move.finished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert move.finished() and move.error is not None, (rank, move.error)
    assert move.drain(time.perf_counter() + 5)
    leave()


def two_ep_groups(rank, world, init_method, backend):
    """Two EP groups in one world (DP x EP): ranks [0, 1] and [2, 3] each attach to their own
    group (every rank creates both groups, as torch requires) and move; each group's ranks end
    with the same placement, outputs unchanged (attach hung: its new_group calls were
    world-wide)."""
    device = _setup(rank, world, init_method, backend)
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    model, reference = Stack(group, 2, device), Stack(group, 2, device)
    updator = eplb_native.attach(model, {"step_interval": 10**6}, group)
    rng = np.random.default_rng(5 + rank // 2)  # the same target within a group, not across
    target = np.stack([np.concatenate([rng.permutation(EXPERTS), rng.integers(0, EXPERTS, 2)])
                       for _ in range(NUM_LAYERS)])
    assert updator.move_to(target) == NUM_LAYERS
    _run(model, reference, updator, 8, rank, device)
    assert np.array_equal(updator.phy2log(), target)
    assert all(m["ok"] for m in updator.stats.moves), updator.stats.moves
    _check_same_maps(updator, group)
    updator.shutdown()
    dist.barrier()
    leave()


def shutdown_after_fault(rank, world, init_method, backend):
    """A move dropped by a fault on one rank (raised once its transfers had completed) and
    shutdown right after: its ops ended on every rank, so the process groups attach took are
    given back, and the next attach takes them (they were left open whenever a dropped move
    was pending: one or two more per fault)."""
    device = _setup(rank, world, init_method, backend)
    group = dist.group.WORLD
    model = Stack(group, 2, device)
    updator = eplb_native.attach(model, {"step_interval": 10**6, "transfer_timeout_s": 10.0},
                                 group)
    groups = len(dist.distributed_c10d._world.pg_map)
    move_group = updator._move_group

    def hook(cycle, layer, phase):
        if rank == world - 1 and layer == 0 and phase == "complete":
            raise RuntimeError("injected after the transfers completed")

    updator.fault_hook = hook
    rng = np.random.default_rng(3)
    target = np.stack([np.concatenate([rng.permutation(EXPERTS), rng.integers(0, EXPERTS, 2)])
                       for _ in range(NUM_LAYERS)])
    updator.move_to(target)
    model(_inputs(0, rank, device))
    assert [m["ok"] for m in updator.stats.moves if m["layer"] == 0] == [False]
    assert updator._pending, "the dropped move is pending at shutdown"
    updator.shutdown()
    again = eplb_native.attach(model, {"step_interval": 10**6}, group)
    assert again._move_group is move_group
    assert len(dist.distributed_c10d._world.pg_map) == groups
    again.shutdown()
    dist.barrier()
    leave()


def node_count(rank, world, init_method, backend):
    """num_nodes unset: attach counts the EP group's hosts (one key per rank, gathered), as
    vLLM counts its nodes; hosts in equal runs of consecutive ranks are the planner's nodes,
    any other layout, or a count the config does not fit, plans as one node with a warning
    (rank 0); a num_nodes set is kept as set. Host keys are patched per rank."""
    import logging

    import eplb_native.updator as updator_module

    device = _setup(rank, world, init_method, backend)
    group = dist.group.WORLD
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    logging.getLogger("eplb_native").addHandler(Keep(level=logging.WARNING))
    for hosts, config, want, warning in [
            ("aabb", {}, 2, None),
            ("abab", {}, 1, "not in equal runs of consecutive ranks"),
            ("aabb", {"num_groups": 6}, 1, "which the config does not fit (num_groups (6)"),
            ("abcd", {"num_nodes": 2}, 2, None),
            ("aaaa", {}, 1, None)]:
        said.clear()
        updator_module._host_key = lambda: f"host-{hosts[rank]}"  # noqa: B023
        model, reference = Stack(group, 4, device), Stack(group, 4, device)
        updator = eplb_native.attach(model, {"step_interval": 10**6, **config}, group)
        assert updator.config.num_nodes == want, (hosts, config, updator.config.num_nodes)
        warned = [m for m in said if "hosts" in m]
        if warning is None or rank != 0:
            assert not warned, warned
        else:
            assert len(warned) == 1 and warning in warned[0], warned
        rng = np.random.default_rng(11)
        target = np.stack([np.concatenate([rng.permutation(EXPERTS), rng.integers(0, EXPERTS, 4)])
                           for _ in range(NUM_LAYERS)])
        assert updator.move_to(target) == NUM_LAYERS
        _run(model, reference, updator, 4, rank, device)
        assert np.array_equal(updator.phy2log(), target)
        updator.shutdown()
    dist.barrier()
    leave()


def balancedness_threshold(rank, world, init_method, backend):
    """With experts 1 and 2 hot on rank 0, the windows' balancedness is low: a threshold below
    it skips every window on every rank alike (no plan, no move), one above it rebalances, and
    the ranks end with the same maps and unchanged outputs."""
    device = _setup(rank, world, init_method, backend)
    group = dist.group.WORLD
    for threshold in (0.05, 0.95):
        model, reference = Stack(group, 2, device), Stack(group, 2, device)
        updator = eplb_native.attach(model, {"step_interval": 2, "algorithm_execution_interval": 0,
                                             "balancedness_threshold": threshold}, group)
        _run(model, reference, updator, 8, rank, device)
        first = updator.stats.windows[0]["balancedness"].mean()
        assert 0.05 < first < 0.95, first
        if threshold == 0.05:
            assert all(w["skipped"] for w in updator.stats.windows) and not updator.stats.plans
            assert not updator.stats.moves
        else:
            assert not updator.stats.windows[0]["skipped"] and updator.stats.plans
            assert any(m["ok"] for m in updator.stats.moves)
        _check_same_maps(updator, group)
        updator.shutdown()
    dist.barrier()
    leave()


def config_refusals(rank, world, init_method, backend):
    """A config (or flag) one rank refuses, or a config that differs between the ranks, is
    refused on every rank at attach, nothing attached (it raised on one rank alone and left the
    others waiting in the agreement or in new_group; differing configs attached and broke the
    collectives mid-serving: review 18). Then a plain attach still works."""
    device = _setup(rank, world, init_method, backend)
    group = dist.group.WORLD
    good = {"step_interval": 4}
    cases = [
        ({**good, "not_a_key": 1} if rank == 1 else good, {}, "unknown EPLB config key",
         "rank 1"),
        (good, {"hooks": "yes"} if rank == 1 else {}, "hooks must be a bool", "rank 1"),
        ({**good, "num_redundant_experts": 4} if rank == 1 else good, {},
         r"num_redundant_experts \(4\)", "rank 1"),
        ({"step_interval": 5} if rank == 1 else good, {}, "configs differ", "configs differ"),
    ]
    for config, kwargs, own, others in cases:
        model = Stack(group, 2, device)
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            eplb_native.attach(model, config, group, **kwargs)
        except (ValueError, TypeError, RuntimeError) as e:
            message = str(e)
        else:
            raise AssertionError(f"rank {rank}: attach took {config} {kwargs}")
        assert re.search(own if rank == 1 else others, message), (rank, message)
        assert not model._forward_pre_hooks
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    model, reference = Stack(group, 2, device), Stack(group, 2, device)
    updator = eplb_native.attach(model, good, group)
    _run(model, reference, updator, 8, rank, device)
    updator.shutdown()
    dist.barrier()
    leave()
