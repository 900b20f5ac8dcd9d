"""eplb_native.nn.EPMoE against the dense reference (tests/reference/updator.py)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from reference.updator import dense_moe

from eplb_native.nn import EPMoE


@pytest.mark.parametrize("phy2log", [None, [5, 4, 3, 2, 1, 0, 0, 5], [0, 0, 0, 1, 2, 3, 4, 5]])
def test_single_process_matches_dense(phy2log):
    layer = EPMoE(12, 10, 6, 2, phy2log=phy2log, num_redundant_experts=2, seed=3)
    g = torch.Generator().manual_seed(11)
    layer.gate_bias.copy_(torch.randn(6, generator=g))
    x = torch.randn(17, 12, generator=g)
    ref = dense_moe(x, layer.gate_weight, layer.gate_bias, layer.logical_w13, layer.logical_w2, 2)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    # every (token, choice) counted once, on a slot holding the chosen logical expert
    assert int(layer.load.sum()) == 17 * 2
    ids, _ = layer.route(x)
    got = torch.zeros(6, dtype=torch.int64).scatter_add_(0, layer.phy2log, layer.load)
    assert torch.equal(got, torch.bincount(ids.reshape(-1), minlength=6))
    layer.record.fill_(False)
    layer.load.zero_()
    layer(x)
    assert int(layer.load.sum()) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        EPMoE(4, 4, 2, 3)
    with pytest.raises(ValueError, match="hidden_size"):
        EPMoE(0, 4, 2, 1)
    with pytest.raises(ValueError, match="holds no copy"):
        EPMoE(4, 4, 3, 1, phy2log=[0, 0, 1])
    with pytest.raises(ValueError, match="x must have shape"):
        EPMoE(4, 4, 2, 1)(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="x must have the layer's dtype"):
        EPMoE(4, 4, 2, 1)(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        EPMoE(4, 4, 2, 1)([[0.0] * 4])
    with pytest.raises(TypeError, match="seed"):
        EPMoE(4, 4, 2, 1, seed=1.5)
    for seed in (-1, 2**32, 2**62):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
            EPMoE(4, 4, 2, 1, seed=seed)
    for bad in (-3, 1.0, True):
        with pytest.raises(ValueError, match="num_redundant_experts must be an int >= 0"):
            EPMoE(4, 4, 2, 1, num_redundant_experts=bad)
    # with a phy2log, a non-zero num_redundant_experts must agree with it (0: taken from it)
    with pytest.raises(ValueError, match=r"phy2log has 6 slots, num_redundant_experts says 6 \+ 4"):
        EPMoE(4, 4, 6, 2, num_redundant_experts=4, phy2log=[0, 1, 2, 3, 4, 5])
    assert EPMoE(4, 4, 6, 2, phy2log=[0, 1, 2, 3, 4, 5, 0, 1]).num_slots == 8
    with pytest.raises(TypeError, match="dtype"):
        EPMoE(4, 4, 2, 1, dtype=torch.int64)


def test_no_tokens():
    """A rank may serve a step with no tokens: an empty output, nothing counted."""
    layer = EPMoE(12, 10, 6, 2, num_redundant_experts=2, seed=3)
    y = layer(torch.zeros(0, 12))
    assert y.shape == (0, 12) and y.dtype == torch.float32
    assert int(layer.load.sum()) == 0


def test_two_ranks_match_dense(tmp_path):
    import epmoe_mp

    placements = [None, [5, 4, 3, 0, 0, 0, 1, 2]]
    mp.spawn(epmoe_mp.check_ep, args=(2, f"file://{tmp_path}/rdzv", placements), nprocs=2, join=True)


def test_running_state_is_not_in_checkpoints():
    """The recorded load and the record switch stay out of state_dict; a checkpoint that has
    them (written before) still loads, strictly, without restoring them."""
    layer = EPMoE(8, 6, 8, 2, seed=1, num_redundant_experts=2)
    layer.load.fill_(7)
    sd = layer.state_dict()
    assert "load" not in sd and "record" not in sd and "phy2log" in sd
    old = {**sd, "load": torch.full_like(layer.load, 5), "record": torch.tensor(False)}
    fresh = EPMoE(8, 6, 8, 2, seed=1, num_redundant_experts=2)
    fresh.load_state_dict(old, strict=True)
    assert int(fresh.load.sum()) == 0 and bool(fresh.record)


def test_checkpoint_that_does_not_fit_leaves_the_layer_as_it_was():
    """A state_dict with a tensor of the wrong shape, or a phy2log without the weights that
    follow it (strict=False), is refused before anything of the layer changes (torch loaded
    the tensors that fit and the maps switched to the new phy2log under the old weights)."""
    layer = EPMoE(8, 8, 4, 2, phy2log=[3, 2, 1, 0])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    want = layer(x)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    other = EPMoE(8, 8, 4, 2).state_dict()  # placement [0, 1, 2, 3]
    wrong = {**other, "w13": torch.zeros(3, 16, 8)}
    with pytest.raises(ValueError, match=r"w13 in the state_dict has shape \[3, 16, 8\], the "
                                         r"layer's is \[4, 16, 8\]"):
        layer.load_state_dict(wrong)
    with pytest.raises(ValueError, match="phy2log in the state_dict comes without w13 and w2"):
        layer.load_state_dict({"phy2log": other["phy2log"]}, strict=False)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(layer(x), want)
    layer.load_state_dict(other)  # the whole checkpoint loads, and computes the same function
    assert layer.phy2log.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(layer(x), want)


def test_loaded_checkpoint_rederives_this_ranks_maps():
    """log2phy / logcnt / local_expert_map follow the loaded phy2log for the loading rank: a
    checkpoint saved by another rank holds that rank's rotated log2phy rows (and one saved
    at another placement, that placement's maps); an invalid phy2log is refused."""
    from eplb_native import state

    layer = EPMoE(8, 6, 8, 2, seed=1, num_redundant_experts=2)
    sd = layer.state_dict()
    sd["phy2log"] = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 7, 7])
    sd["log2phy"] = torch.roll(sd["log2phy"], 1, dims=1)  # another rank's rows, say
    sd["logcnt"] = torch.ones_like(sd["logcnt"])
    layer.load_state_dict(sd)
    log2phy, logcnt, local = state.placement_tensors(sd["phy2log"], 8, 1, 0, rotate=True)
    assert torch.equal(layer.log2phy, log2phy) and torch.equal(layer.logcnt, logcnt)
    assert torch.equal(layer.local_expert_map, local)
    # an invalid phy2log is refused before anything is written (it was refused after the load
    # had written it, the weights and the maps)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = {k: (torch.zeros_like(v) if k != "phy2log" else torch.zeros(10, dtype=torch.int64))
           for k, v in sd.items()}
    with pytest.raises(ValueError, match="phy2log in the state_dict is not a placement.*"
                                         "holds no copy"):
        layer.load_state_dict(bad)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    # tensors replaced by the load (assign=True): the maps derived are the new ones'
    sd2 = {k: v.clone() for k, v in sd.items()}
    sd2["phy2log"] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
    layer.load_state_dict(sd2, assign=True)
    want = state.placement_tensors(sd2["phy2log"], 8, 1, 0, rotate=True)
    assert torch.equal(layer.log2phy, want[0]) and torch.equal(layer.logcnt, want[1])


def test_built_on_meta_then_loaded():
    """EPMoE(device="meta") builds (it raised reaching for an accelerator), and to_empty +
    load_state_dict gives the layer the checkpoint describes."""
    ref = EPMoE(8, 8, 4, 2, seed=3, phy2log=[3, 2, 1, 0])
    layer = EPMoE(8, 8, 4, 2, seed=3, phy2log=[3, 2, 1, 0], device="meta")
    assert layer.w13.device.type == "meta" and layer.phy2log.device.type == "meta"
    layer.to_empty(device="cpu")
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(layer(x), ref(x))
    assert torch.equal(layer.log2phy, ref.log2phy) and torch.equal(layer.logcnt, ref.logcnt)
