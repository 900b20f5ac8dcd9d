"""EPMoE over a process group (spawned by tests/test_epmoe.py): every rank's output equals the
dense reference on its own tokens, and every slot's tokens were recorded."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from mp_exit import leave
from reference.updator import dense_moe

from eplb_native.nn import EPMoE


def check_ep(rank, world, init_method, placements):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    for phy2log in placements:
        _check(rank, phy2log, 9 + rank)
    _check(rank, None, 0 if rank == 1 else 9)  # a rank with no tokens still takes part
    dist.barrier()  # no rank tears gloo down while a peer still talks to it
    dist.destroy_process_group()
    leave()


def _check(rank, phy2log, tokens):
    layer = EPMoE(12, 10, 6, 2, group=dist.group.WORLD, phy2log=phy2log, seed=7)
    layer.gate_bias.copy_(torch.randn(6, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(tokens, 12, generator=torch.Generator().manual_seed(rank))
    y = layer(x)
    ref = dense_moe(x, layer.gate_weight, layer.gate_bias, layer.logical_w13, layer.logical_w2, 2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # every (token, choice) counted once, on a slot holding the chosen logical expert
    assert int(layer.load.sum()) == x.shape[0] * 2
    ids, _ = layer.route(x)
    got = torch.zeros(6, dtype=torch.int64).scatter_add_(0, layer.phy2log, layer.load)
    assert torch.equal(got, torch.bincount(ids.reshape(-1), minlength=6))
