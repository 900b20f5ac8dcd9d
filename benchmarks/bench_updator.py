"""Updator benchmark: what moving expert weights costs a serving step, and how fast moves go.

Spawns one process per GPU (NCCL) or per CPU rank (gloo), builds a stack of EPMoE layers and
measures, on every rank (rank 0 reports; medians of several repeats):

- step time idle (updator attached, nothing to move) vs while moving (``layers_per_step``
  layers per step, forced with ``Updator.move_to`` between two placements that differ in most
  slots); ratio = moving / idle (target <= 1.02);
- move bandwidth: bytes this rank received in one layer's move / time of that move alone
  (``LayerMove`` issue -> wait, synchronised), against raw NCCL P2P bandwidth measured in the
  same run with one ``batch_isend_irecv`` of the same byte count in each direction (target
  >= 80%);
- planner time: ``Planner.submit(...).result()`` for a DeepSeek-V3-shaped load (58 layers, 256
  experts, 288 slots, 32 ranks) per policy.

    python benchmarks/bench_updator.py --ranks 2 --backend nccl --out result.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _swapped(p2l: np.ndarray, ranks: int) -> np.ndarray:
    """A placement that moves most slots: each rank's slots rotate to the next rank."""
    s = p2l.size // ranks
    return np.roll(p2l.reshape(ranks, s), 1, axis=0).reshape(-1)


def worker(rank, ranks, port, args, out_path):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import eplb_native
    from eplb_native import state
    from eplb_native.nn import EPMoE
    from eplb_native.transfer import LayerMove, layer_schedule

    backend = args.backend
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=ranks, timeout=datetime.timedelta(seconds=300))
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    group = dist.group.WORLD
    red = args.redundant_per_rank * ranks

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([
                EPMoE(args.hidden, args.inter, args.experts, args.top_k, group=group,
                      num_redundant_experts=red, seed=i, dtype=dtype, device=device)
                for i in range(args.layers)])

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    model = Stack()
    updator = eplb_native.attach(model, {"expert_heat_collection_interval": 10 ** 9,
                                         "layers_per_step": args.layers_per_step,
                                         "transfer_timeout_s": 120.0}, group)
    updator.warm_up()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)

    def step():
        _sync(device)
        t = time.perf_counter()
        model(x)
        _sync(device)
        return time.perf_counter() - t

    for _ in range(5):
        step()
    default = updator.phy2log()
    other = np.stack([_swapped(row, ranks) for row in default])
    idle, moving = [], []
    targets = [other, default]
    for rep in range(args.repeats):
        idle.append(statistics.median(step() for _ in range(args.layers)))
        queued = updator.move_to(targets[rep % 2])
        assert queued == args.layers, queued
        steps = -(-queued // args.layers_per_step)
        moving.append(statistics.median(step() for _ in range(steps)))
        assert np.array_equal(updator.phy2log(), targets[rep % 2])
    assert all(m["ok"] for m in updator.stats.moves)

    # one layer's move alone, and raw P2P of the same bytes, alternating
    a = updator.layers[0]
    staging = [torch.empty_like(t) for t in a.weights]
    fills = layer_schedule(a.phy2log.cpu().numpy(), _swapped(a.phy2log.cpu().numpy(), ranks),
                           ranks)
    move_s, raw_s, nbytes = [], [], 0
    for _ in range(args.repeats + 2):
        dist.barrier()
        _sync(device)
        t = time.perf_counter()
        move = LayerMove(a.weights, staging, fills, rank, updator._move_group,
                         torch.cuda.current_stream(device) if device.type == "cuda" else None)
        move.issue()
        assert move.wait(time.perf_counter() + 120)
        _sync(device)
        move_s.append(time.perf_counter() - t)
        nbytes = move.bytes_received
        buf_out = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        buf_in = torch.empty_like(buf_out)
        peer = (rank + 1) % ranks
        src = (rank - 1) % ranks
        dist.barrier()
        _sync(device)
        t = time.perf_counter()
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, buf_out, peer),
                                        dist.P2POp(dist.irecv, buf_in, src)])
        for w in works:
            w.wait()
        _sync(device)
        raw_s.append(time.perf_counter() - t)
    move_s, raw_s = move_s[2:], raw_s[2:]  # the first ones open connections

    # the updator's own cycle once: gather, plan, move, with real recorded load
    planner = {}
    if rank == 0:
        from eplb_native import Planner

        rng = np.random.default_rng(0)
        load = rng.zipf(1.3, size=(58, 256)).clip(max=10 ** 5).astype(np.float64)
        old = np.stack([state.default_placement(256, 32, 32)] * 58)
        with Planner() as p:
            for policy in ("deepseek", "balanced", "min_move"):
                ts = []
                for _ in range(3):
                    t = time.perf_counter()
                    p.submit(load, old, num_ranks=32, policy=policy).result()
                    ts.append(time.perf_counter() - t)
                planner[policy] = statistics.median(ts)
    updator.shutdown()
    result = {
        "rank": rank, "ranks": ranks, "backend": backend, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": {k: getattr(args, k) for k in ("layers", "experts", "hidden", "inter", "top_k",
                                                "tokens", "redundant_per_rank",
                                                "layers_per_step")},
        "step_idle_s": statistics.median(idle), "step_moving_s": statistics.median(moving),
        "step_ratio": statistics.median(moving) / statistics.median(idle),
        "move_bytes": nbytes, "move_s": statistics.median(move_s),
        "raw_p2p_s": statistics.median(raw_s),
        "move_GBps": nbytes / statistics.median(move_s) / 1e9,
        "raw_p2p_GBps": nbytes / statistics.median(raw_s) / 1e9,
        "planner_s_deepseek_v3_shape": planner,
    }
    result["move_vs_raw"] = result["move_GBps"] / result["raw_p2p_GBps"]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=7168)  # DeepSeek-V3 expert shape
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--top-k", dest="top_k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--redundant-per-rank", dest="redundant_per_rank", type=int, default=2)
    ap.add_argument("--layers-per-step", dest="layers_per_step", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench_updator.json")
    args = ap.parse_args()
    mp.spawn(worker, args=(args.ranks, _free_port(), args, args.out), nprocs=args.ranks,
             join=True)


if __name__ == "__main__":
    main()
