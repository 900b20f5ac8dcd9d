"""eplb_native.integrations.transformers on tiny transformers MoE models (CPU, gloo, 2 ranks).

One spawn of 2 processes runs every family (tests/transformers_ep_worker.py); the tests below
assert on what each rank returned. Single-process tests cover the refusals that need no ranks.
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

# the integration needs transformers >= 5.23 (the extra's range); an older one skips, saying so
transformers = pytest.importorskip("transformers", minversion="5.23")

import transformers_ep_worker as worker  # noqa: E402  (tests/ is on sys.path, see conftest)

from eplb_native import expert_map, state  # noqa: E402
from eplb_native.adapters import AdapterError  # noqa: E402
from eplb_native.integrations import transformers as eplb_tf  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks returned, per family (and "prepare"): [rank0, rank1]."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("transformers_ep")
    paths = {}
    for family in worker.FAMILIES:
        paths[family] = str(root / family)
        worker.build_checkpoint(family, paths[family])
    init_method = f"file://{root / 'rdzv'}"  # fresh per run: no port to race for
    mp.spawn(worker.worker, args=(init_method, paths, str(root)), nprocs=worker.NUM_RANKS)
    return [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=False)
            for r in range(worker.NUM_RANKS)]


def _family(ranks, family):
    out = [r[family] for r in ranks]
    for rank, res in enumerate(out):
        assert "error" not in res, f"{family} failed on rank {rank}:\n{res['error']}"
    return out


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_outputs_unchanged_at_every_step(ranks, family):
    for res in _family(ranks, family):
        assert len(res["logits"]) == worker.STEPS
        for step, (got, want) in enumerate(zip(res["logits"], res["ref_logits"], strict=True)):
            # fp32: TP attention and the changed summation order of replicas round differently
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_save_pretrained_after_rebalances_loads_into_the_plain_model(ranks, family):
    for res in _family(ranks, family):
        torch.testing.assert_close(res["reloaded_logits"], res["reloaded_ref_logits"],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_generate_unchanged(ranks, family):
    for res in _family(ranks, family):
        assert torch.equal(res["generated"], res["ref_generated"])


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_recorded_load_is_router_bincount(ranks, family):
    for res in _family(ranks, family):
        for step, (load, count) in enumerate(zip(res["load"], res["router_count"],
                                                 strict=True)):
            assert (count.sum(1) == worker.BATCH * worker.SEQ * worker.TOP_K).all()
            assert torch.equal(load, count), f"step {step}: recorded {load} router {count}"


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_slots_grow_and_hold_their_logical_expert(ranks, family):
    slots = (worker.EXPERTS + worker.REDUNDANT) // worker.NUM_RANKS
    for res in _family(ranks, family):
        assert res["slots_before"] == worker.EXPERTS // worker.NUM_RANKS
        assert res["slots_after"] == slots
        want = {"all_to_all": "AllToAllEP"}.get(worker.EP_IMPLEMENTATION.get(family), "AutoEP")
        assert res["inner"] == want
        assert res["mismatched_initial"] == []
        assert res["mismatched_slots"] == []


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_rebalances_keep_ranks_identical(ranks, family):
    r0, r1 = _family(ranks, family)
    for a, b in zip(r0["phy2log"], r1["phy2log"], strict=True):
        assert torch.equal(a, b)
    for (p0, l0, c0), (p1, l1, c1) in zip(r0["maps"], r1["maps"], strict=True):
        assert torch.equal(p0, p1) and torch.equal(l0, l1) and torch.equal(c0, c1)
        log2phy, logcnt, _ = state.placement_tensors(p0, worker.EXPERTS, worker.NUM_RANKS, 0)
        assert torch.equal(l0, log2phy) and torch.equal(c0, logcnt)
    # several rebalances: the placement changed at least twice, every move agreed
    placements = {tuple(p.reshape(-1).tolist()) for p in r0["phy2log"]}
    assert len(placements) >= 3
    assert r0["moves_ok"] and all(r0["moves_ok"]) and r0["moves_ok"] == r1["moves_ok"]


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_balancedness_improves(ranks, family):
    res = _family(ranks, family)[0]
    # in sample (the planner's numbers on the window it planned from), mean over layers
    before, after = (np.array([p[i].mean() for p in res["plans"]]) for i in (0, 1))
    assert after[0] > before[0] and after.mean() > before.mean(), (before, after)
    windows = [w.mean() for w in res["windows"]]  # out of sample, mean over layers
    per_phase = worker.STEPS // 2 // worker.INTERVAL
    for phase in range(2):
        seen = windows[phase * per_phase:(phase + 1) * per_phase]
        # the phase ends no worse than it began and above its worst window (a placement
        # planned from phase a can serve phase b's first window well already: qwen2_moe's
        # distinct one did, 0.98 -> 0.92 -> 0.98)
        assert seen[-1] >= seen[0] and seen[-1] > min(seen), f"phase {phase}: {windows}"


def test_prepare_refuses_bad_input_and_places_an_expert_map(ranks):
    for rank, res in enumerate(_family(ranks, "prepare")):
        errors = res["errors"]
        assert "(8 + 1) must be divisible by num_ranks (2)" in errors["uneven_slots"]
        assert "num_redundant_experts must be an int >= 0" in errors["negative_redundant"]
        assert "one row per MoE layer" in errors["map_layers"]
        assert "holds no copy of logical experts [7]" in errors["map_missing_expert"]
        assert "ep_implementation" in errors["ep_implementation"]
        assert "num_redundant_experts (2) contradicts the expert map" in errors[
            "map_vs_redundant"]
        assert "already attached" in errors["twice"]
        assert "num_nodes (3) must divide the layers' ep_size (2)" in errors["attach_nodes"]
        assert "num_groups (6) must divide the layers' logical experts (8)" in errors[
            "attach_groups"]
        # rank 0 writes the map and checks its folder; the others refuse with it
        assert errors["record_path"].startswith("expert_map_record_path") and (
            "cannot be made" if rank == 0 else "rank 0 of the EP group cannot write it") in (
            errors["record_path"])
        assert errors["map_missing_on_one_rank"] == (
            "RuntimeError: rank 1 of the EP group refused (its own error says why); nothing "
            "was changed on this rank" if rank == 0 else
            "FileNotFoundError: expert_map /no/such/map.json: no such file")
        assert errors["map_differs_on_one_rank"].startswith(
            "ValueError: the EP group's ranks start from different placements")
        assert errors["mixed_experts"] is not None and re.search(
            r"'model\.layers\.1\.mlp\.experts'.*differ in shape or dtype",
            errors["mixed_experts"])
        assert errors["last_layer_params"] is not None and re.search(
            r"'model\.layers\.1\.mlp\.experts' .*parameter 'gate_up_proj' must hold 8 "
            r"experts on the EP mesh, got 10", errors["last_layer_params"])
        assert res["untouched"]
        assert res["slots"] == 6
        want = torch.tensor([[e for r in layer for e in r] for layer in worker.EXPERT_MAP_SLOTS])
        assert torch.equal(res["phy2log"], want)
        assert res["mismatched"] == [], f"rank {rank}"
        torch.testing.assert_close(res["logits"], res["ref_logits"], rtol=1e-5, atol=1e-5)
        num_layers, phy2log = res["generic_attach"]
        assert num_layers == worker.LAYERS and np.array_equal(phy2log, want.numpy())


def test_the_models_expert_groups_reach_the_planner(ranks):
    """num_groups left unset takes the model's expert groups (deepseek_v3's n_group = 4), as
    vLLM and SGLang plan with them; models without groups keep it unset (1)."""
    for family in worker.FAMILIES:
        for res in _family(ranks, family):
            assert res["num_groups"] == (4 if family == "deepseek_v3" else None), family
    model = _tiny("deepseek_v3")
    assert eplb_tf._expert_groups(model, worker.EXPERTS) == 4
    # taken before the ranks' agreed check of the config against the layers (which must see
    # them; after it, a config the groups did not fit failed once the layers had grown); an
    # explicit num_groups stays
    seen = []

    def stop(model_, group, redundant, expert_map_, implementation, cfg):
        seen.append(cfg.num_groups)
        raise RuntimeError("stop before the grow")

    import unittest.mock

    # (find_moe_layers needs an EP-loaded model: its layers stood in for)
    layers = [SimpleNamespace(num_logical_experts=worker.EXPERTS)]
    with unittest.mock.patch.object(eplb_tf, "_agreed_preparation", stop), \
            unittest.mock.patch.object(eplb_tf, "find_moe_layers", lambda m: layers):
        for config, want in ((None, 4), ({"num_groups": 1}, 1), ({"num_groups": 2}, 2)):
            with pytest.raises(RuntimeError, match="stop before the grow"):
                eplb_tf.attach(model, config)
            assert seen[-1] == want, config
    assert eplb_tf._expert_groups(model, worker.EXPERTS + 2) == 1  # (4 does not divide 10)
    assert eplb_tf._expert_groups(_tiny("qwen3_moe"), worker.EXPERTS) == 1


def test_attach_keywords_win_over_the_config(ranks):
    want = np.array([[e for r in layer for e in r] for layer in worker.EXPERT_MAP_SLOTS])
    for res in _family(ranks, "attach_keywords"):
        assert np.array_equal(res["phy2log"], want)
        assert np.array_equal(res["buffers"].numpy(), want)


def _tiny(family):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(worker.family_config(family))


def test_model_without_expert_parallelism_is_refused():
    model = _tiny("qwen3_moe")
    with pytest.raises(ValueError, match="not loaded with transformers' expert parallelism"):
        eplb_tf.attach(model)
    with pytest.raises(AdapterError, match=r"'model.layers.0.mlp.experts' \(Qwen3MoeExperts\): "
                                           "not sharded by transformers' expert parallelism"):
        eplb_tf.find_moe_layers(model)


def test_attach_and_prepare_check_hooks_and_group_first():
    model = _tiny("qwen3_moe")  # (not under EP either: these are refused before that is seen)
    with pytest.raises(TypeError, match="hooks must be a bool, got str 'false'"):
        eplb_tf.attach(model, hooks="false")
    for call in (eplb_tf.attach, eplb_tf.prepare):
        with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
            call(model, group="world")


def test_unprepared_experts_module_names_attach():
    experts = _tiny("mixtral").model.layers[0].mlp.experts
    with pytest.raises(AdapterError, match="integrations.transformers.attach"):
        eplb_tf.transformers_experts_adapter("layers.0.mlp.experts", experts, 0, 1)
    assert eplb_tf.transformers_experts_adapter("norm", torch.nn.LayerNorm(4), 0, 1) is None


def test_family_without_stacked_experts_is_refused():
    # DBRX keeps its experts flattened in a child module and has no expert-parallel plan
    config = transformers.DbrxConfig(d_model=64, n_heads=4, n_layers=1, max_seq_len=32,
                                     vocab_size=128,
                                     attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
                                     ffn_config={"ffn_hidden_size": 32,
                                                                 "moe_num_experts": 4,
                                                                 "moe_top_k": 2})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(AdapterError, match=r"'transformer.blocks.0.ffn.experts' \(DbrxExperts\)"
                                           ": not a transformers stacked-experts module"):
        eplb_tf.find_moe_layers(model)


def test_model_without_moe_layer_is_refused():
    with pytest.raises(ValueError, match="has no MoE layer"):
        eplb_tf.find_moe_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


MUTATIONS = ("none", "out_of_range", "negative", "drop_expert", "one_layer", "extra_slot",
             "ragged")


@st.composite
def expert_maps(draw):
    """(rows, num_ranks, mutation): a valid 2-layer map of 8 experts (each layer a permutation
    of the experts plus replicas, S slots on each of num_ranks ranks), then maybe one mutation
    that makes it invalid."""
    num_ranks = draw(st.integers(1, 4))
    per_rank = draw(st.integers(-(-8 // num_ranks), -(-8 // num_ranks) + 2))
    rows = []
    for _ in range(2):
        extra = draw(st.lists(st.integers(0, 7), min_size=per_rank * num_ranks - 8,
                              max_size=per_rank * num_ranks - 8))
        rows.append(draw(st.permutations(list(range(8)) + extra)))
    mutation = draw(st.sampled_from(MUTATIONS))
    layer, slot = draw(st.integers(0, 1)), draw(st.integers(0, len(rows[0]) - 1))
    if mutation == "out_of_range":
        rows[layer][slot] = draw(st.integers(8, 2**40))
    elif mutation == "negative":
        rows[layer][slot] = draw(st.integers(-2**40, -1))
    elif mutation == "drop_expert":
        gone = rows[layer][slot]
        keep = [e for e in range(8) if e != gone]
        rows[layer] = [e if e != gone else draw(st.sampled_from(keep)) for e in rows[layer]]
    elif mutation == "one_layer":
        rows = rows[:1]
    elif mutation == "extra_slot":
        for row in rows:
            row.append(draw(st.integers(0, 7)))
    elif mutation == "ragged":
        rows[layer].append(draw(st.integers(0, 7)))
    return rows, num_ranks, mutation


def _is_valid_map(rows, num_ranks) -> bool:
    """The rule, stated plainly: one row per layer (2), equal rows, slots divisible by the ranks,
    every row holding exactly the experts 0..7 (each at least once, nothing else)."""
    return (len(rows) == 2 and len({len(r) for r in rows}) == 1
            and len(rows[0]) % num_ranks == 0
            and all(set(r) == set(range(8)) for r in rows))


@settings(max_examples=200, deadline=None)
@given(case=expert_maps(), redundant=st.one_of(st.none(), st.integers(-2, 12)))
@example(case=([list(range(8)) + [0, 1], list(range(7, -1, -1)) + [2, 3]], 2, "none"),
         redundant=None)
def test_initial_placement_accepts_valid_maps_and_refuses_the_rest(case, redundant):
    rows, num_ranks, mutation = case
    layers = [SimpleNamespace(num_logical_experts=8)] * 2
    valid = _is_valid_map(rows, num_ranks)
    assert valid == (mutation == "none" or (mutation == "extra_slot" and num_ranks == 1))
    try:
        phy2log = eplb_tf._initial_placement(layers, num_ranks, redundant, rows)
    except (ValueError, TypeError) as e:
        assert not valid, f"valid map refused: {e}"
        assert "expert_map" in str(e), str(e)
    else:
        assert valid, f"invalid map ({mutation}) accepted"
        assert phy2log.dtype == np.int64 and phy2log.tolist() == rows


@settings(max_examples=100, deadline=None)
@given(num_ranks=st.integers(1, 4), redundant=st.one_of(st.none(), st.integers(-2, 12)))
def test_default_initial_placement_parses_or_refuses(num_ranks, redundant):
    layers = [SimpleNamespace(num_logical_experts=8)] * 2
    try:
        phy2log = eplb_tf._initial_placement(layers, num_ranks, redundant, None)
    except (ValueError, TypeError):
        assert (redundant or 0) < 0 or (8 + (redundant or 0)) % num_ranks
        return
    assert phy2log.dtype == np.int64 and phy2log.shape == (2, 8 + (redundant or 0))
    for row in phy2log:
        assert set(row.tolist()) == set(range(8))
    assert phy2log.shape[1] % num_ranks == 0


def test_initial_placement_from_expert_map_file(tmp_path):
    layers = [SimpleNamespace(num_logical_experts=worker.EXPERTS)] * worker.LAYERS
    want = np.array([[e for r in layer for e in r] for layer in worker.EXPERT_MAP_SLOTS])
    path = tmp_path / "expert_map.json"
    expert_map.save(path, want, worker.NUM_RANKS)
    got = eplb_tf._initial_placement(layers, worker.NUM_RANKS, None, str(path))
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="expert_map .*expert_map.json is for 2 ranks, expected 4"):
        eplb_tf._initial_placement(layers, 4, None, str(path))


def test_initial_placement_checks_a_dict_map_against_the_ep_size():
    layers = [SimpleNamespace(num_logical_experts=worker.EXPERTS)] * worker.LAYERS
    want = np.array([[e for r in layer for e in r] for layer in worker.EXPERT_MAP_SLOTS])
    doc = expert_map.to_json_dict(want, worker.NUM_RANKS)
    assert np.array_equal(eplb_tf._initial_placement(layers, worker.NUM_RANKS, None, doc), want)
    with pytest.raises(ValueError, match="expert_map is for 2 ranks, expected 4"):
        eplb_tf._initial_placement(layers, 4, None, doc)
