"""The policy recipes of docs/integrations.md, run as written (their code blocks executed against
stand-ins for vLLM's policy module): a recipe users paste must plan what the engine asks for,
elastic EP's scale events included (review15_peers: the vLLM recipe raised on both)."""

from __future__ import annotations

import pathlib
import re
import sys
import types

import numpy as np
import pytest
import torch
from reference.placement import preserve_slots as ref_preserve_slots

import eplb_native
from eplb_native._util import validate_phy2log

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "integrations.md"


def _block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (code,) = [b for b in blocks if marker in b]
    return code


def _check(phy2log: np.ndarray, num_logical: int, num_ranks: int) -> None:
    """Every id in range, every expert placed, each rank its slots (raises otherwise)."""
    validate_phy2log(phy2log, num_logical, num_ranks)


@pytest.fixture
def vllm_policy(monkeypatch):
    """vLLM's policy module as the recipe imports it: the EPLB_POLICIES dict and the abstract
    class (vllm/distributed/eplb/policy, v0.28 .. v0.34)."""
    policy = types.ModuleType("vllm.distributed.eplb.policy")

    class AbstractEplbPolicy:
        pass

    policy.AbstractEplbPolicy = AbstractEplbPolicy
    policy.EPLB_POLICIES = {"default": AbstractEplbPolicy}
    for name in ("vllm", "vllm.distributed", "vllm.distributed.eplb"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.distributed.eplb.policy", policy)
    exec(compile(_block("class EplbNativePolicy"), str(DOC), "exec"), {})
    return policy.EPLB_POLICIES["default"]


def test_vllm_recipe_plans_steady_and_elastic_rebalances(vllm_policy):
    rng = np.random.default_rng(0)
    L, E, S = 3, 12, 4
    weight = torch.from_numpy(rng.integers(1, 1000, size=(L, E)))  # vLLM's int load, on the CPU
    # steady: the old map of the same shape is the plan's starting point, as plan() takes it
    old = torch.from_numpy(np.tile(np.arange(16) % E, (L, 1)))
    got = vllm_policy.rebalance_experts(weight, 16, 1, 1, 4, old)
    assert isinstance(got, torch.Tensor) and got.shape == (L, 16)
    want = eplb_native.plan(weight.float(), old, num_ranks=4, num_replicas=16, policy="balanced")
    assert np.array_equal(got.numpy(), want.phy2log)
    _check(got.numpy(), E, 4)
    # scale-down 4 -> 3 ranks: the old map is still 4 ranks wide
    got = vllm_policy.rebalance_experts(weight, 3 * S, 1, 1, 3, old)
    assert got.shape == (L, 3 * S)
    _check(got.numpy(), E, 3)
    fresh = eplb_native.plan(weight.float(), num_ranks=3, num_replicas=3 * S).phy2log
    # (the surviving ranks keep their experts' slots, as vLLM's own policy does)
    assert np.array_equal(got.numpy(), ref_preserve_slots(fresh, old.numpy(), 3))
    # scale-up 4 -> 5 ranks: the map widened, the new rank's slots -1
    wide = torch.cat([old, torch.full((L, S), -1, dtype=old.dtype)], dim=1)
    got = vllm_policy.rebalance_experts(weight, 5 * S, 1, 1, 5, wide)
    assert got.shape == (L, 5 * S)
    _check(got.numpy(), E, 5)
    fresh = eplb_native.plan(weight.float(), num_ranks=5, num_replicas=5 * S).phy2log
    assert np.array_equal(got.numpy(), ref_preserve_slots(fresh, wide.numpy(), 5))
    kept = (got.numpy()[:, :4 * S] == old.numpy()).sum()
    assert kept > (fresh[:, :4 * S] == old.numpy()).sum()
    # no old map
    _check(vllm_policy.rebalance_experts(weight, 16, 1, 1, 4).numpy(), E, 4)


def test_vllm_ascend_recipe_returns_its_triple():
    scope: dict = {}
    exec(compile(_block("class EplbNativeAscendPolicy"), str(DOC), "exec"), scope)
    policy = scope["EplbNativeAscendPolicy"]()
    rng = np.random.default_rng(1)
    L, R, S, E = 2, 4, 3, 10
    table = np.stack([rng.permutation(np.r_[np.arange(E), rng.integers(0, E, R * S - E)])
                      for _ in range(L)])
    # (one slot per expert and rank, as vllm-ascend's maps need)
    for layer in table:
        while True:
            ranks = layer.reshape(R, S)
            if all(len(set(r)) == S for r in ranks):
                break
            rng.shuffle(layer)
    workload = rng.integers(1, 500, size=(L, R, S))
    changed, priority, new = policy.rebalance_experts(table.reshape(L, R, S).tolist(),
                                                      workload.tolist())
    new = np.asarray(new)
    assert changed in (0, 1) and new.shape == (L, R, S)
    assert sorted(np.asarray(priority).tolist()) == list(range(L))
    _check(new.reshape(L, -1), E, R)
    assert all(len(set(r)) == S for layer in new for r in layer)


def test_sglang_recipe_and_our_rebalance_experts_take_its_call(monkeypatch):
    """SGLang's dispatcher calls deepseek.rebalance_experts with keywords (num_groups None for
    models without groups); the recipe's function, and ours as it is, answer that call with a
    consistent (phy2log, log2phy, logcnt) of torch tensors."""
    deepseek = types.ModuleType("sglang.srt.eplb.eplb_algorithms.deepseek")
    deepseek.rebalance_experts = None
    algorithms = types.ModuleType("sglang.srt.eplb.eplb_algorithms")
    algorithms.deepseek = deepseek
    for name in ("sglang", "sglang.srt", "sglang.srt.eplb"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.eplb.eplb_algorithms", algorithms)
    monkeypatch.setitem(sys.modules, "sglang.srt.eplb.eplb_algorithms.deepseek", deepseek)
    exec(compile(_block("from sglang.srt.eplb"), str(DOC), "exec"), {})
    rng = np.random.default_rng(2)
    weight = torch.from_numpy(rng.integers(0, 900, size=(3, 16)))  # steps summed, int
    for fn in (deepseek.rebalance_experts, eplb_native.rebalance_experts):
        for groups, nodes, hier in ((4, 2, True), (4, 2, False), (None, 1, False)):
            phy2log, log2phy, logcnt = fn(weight=weight, num_replicas=24, num_groups=groups,
                                          num_nodes=nodes, num_gpus=4, enable_hierarchical=hier)
            assert all(isinstance(t, torch.Tensor) for t in (phy2log, log2phy, logcnt))
            _check(phy2log.numpy(), 16, 4)
            for layer in range(3):
                counts = np.bincount(phy2log[layer].numpy(), minlength=16)
                assert np.array_equal(logcnt[layer].numpy(), counts)
                for e in range(16):
                    slots = log2phy[layer, e][log2phy[layer, e] >= 0].numpy()
                    assert len(slots) == counts[e] and (phy2log[layer, slots] == e).all()
    # the recipe plans what SGLang asks: hierarchical when told, else global
    for groups, nodes, hier in ((4, 2, True), (4, 2, False), (None, 1, False)):
        recipe = deepseek.rebalance_experts(weight=weight, num_replicas=24, num_groups=groups,
                                            num_nodes=nodes, num_gpus=4, enable_hierarchical=hier)
        want = eplb_native.plan(weight.float(), num_ranks=4, num_replicas=24,
                                num_groups=groups if hier else 1, num_nodes=nodes if hier else 1,
                                policy="balanced")
        assert np.array_equal(recipe[0].numpy(), want.phy2log), (groups, nodes, hier)
    hier = eplb_native.plan(weight.float(), num_ranks=4, num_replicas=24, num_groups=4,
                            num_nodes=2, policy="balanced").phy2log
    flat = eplb_native.plan(weight.float(), num_ranks=4, num_replicas=24,
                            policy="balanced").phy2log
    assert not np.array_equal(hier, flat)  # (so the two cases above tell them apart)
