"""Updator benchmark: what moving expert weights costs a serving step, and how fast moves go.

Spawns one process per GPU (NCCL) or per CPU rank (gloo), rendezvous through a file in a fresh
temporary directory, builds a stack of EPMoE layers and measures, on every rank (rank 0
reports; medians of several repeats):

- step time idle (updator attached, nothing to move) vs while moving (forced with
  ``Updator.move_to`` between two placements that differ in every slot: ``layers_per_step``
  whole layers per step, or with ``--max-move-bytes-per-step`` at most that many bytes per rank
  and step, a layer's move spanning several steps); ratio = moving / idle (target <= 1.02),
  on the median moving step and on the mean one (which counts the commits);
- move bandwidth: the bytes of one whole layer's move (``LayerMove`` issue -> wait,
  synchronised, the largest count any rank receives) / its time (the slowest rank's), against
  raw NCCL P2P measured in the same run, alternating with it: one ``batch_isend_irecv`` of that
  byte count per rank, each rank sending to the next and receiving from the previous (target
  >= 80%); with a budget, the same for one step's share of the layer;
- planner time: ``Planner.submit(...).result()`` for a DeepSeek-V3-shaped load (58 layers, 256
  experts, 288 slots, 32 ranks) per policy.

    python benchmarks/bench_updator.py --ranks 2 --backend nccl --out result.json
    python benchmarks/bench_updator.py --ranks 2 --backend nccl --max-move-bytes-per-step 512M
    python benchmarks/bench_updator.py --smoke      # CPU / gloo, tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _swapped(p2l: np.ndarray, ranks: int) -> np.ndarray:
    """A placement that moves most slots: each rank's slots rotate to the next rank."""
    s = p2l.size // ranks
    return np.roll(p2l.reshape(ranks, s), 1, axis=0).reshape(-1)


def _byte_count(text: str) -> int:
    """'536870912', '512M', '1.5G' -> bytes (K/M/G/T = powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if not n >= 1:
        raise argparse.ArgumentTypeError(f"byte count must be >= 1, got {text!r}")
    return int(n)


def _max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def worker(rank, ranks, init_method, args, out_path):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import eplb_native
    from eplb_native import state
    from eplb_native.nn import EPMoE
    from eplb_native.transfer import LayerMove, StepBudget, layer_schedule

    backend = args.backend
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=ranks,
                            timeout=datetime.timedelta(seconds=300))
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
                                         "max_move_bytes_per_step": args.max_move_bytes_per_step,
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
    idle, moving, moving_mean, moving_steps = [], [], [], []
    targets = [other, default]
    for rep in range(args.repeats):
        idle.append(statistics.median(step() for _ in range(args.layers)))
        queued = updator.move_to(targets[rep % 2])
        assert queued == args.layers, queued
        times = []
        while updator.moving:
            times.append(step())
        moving.append(statistics.median(times))
        moving_mean.append(statistics.fmean(times))
        moving_steps.append(len(times))
        assert np.array_equal(updator.phy2log(), targets[rep % 2])
    assert all(m["ok"] for m in updator.stats.moves)
    move_stats = updator.stats.moves[-args.layers:]

    # one layer's move alone, and raw P2P of the same bytes, alternating
    a = updator.layers[0]
    staging = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in a.weights]
    fills = layer_schedule(a.phy2log.cpu().numpy(), _swapped(a.phy2log.cpu().numpy(), ranks),
                           ranks)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    rows_per_step = (None if args.max_move_bytes_per_step is None else
                     max(1, args.max_move_bytes_per_step // a.slot_bytes()))

    def timed_move(rows):
        """(bytes this rank received, seconds, ops posted) of one layer's move, or of its first
        step under a budget of ``rows``."""
        dist.barrier()
        _sync(device)
        t = time.perf_counter()
        move = LayerMove(a.weights, staging, fills, rank, updator._move_group, stream)
        move.issue(StepBudget(ranks, rows) if rows is not None else None)
        assert move.wait(time.perf_counter() + 120)
        _sync(device)
        return move.bytes_received, time.perf_counter() - t, move.ops_posted

    def timed_raw(nbytes):
        buf_out = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        buf_in = torch.empty_like(buf_out)
        dist.barrier()
        _sync(device)
        t = time.perf_counter()
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, buf_out, (rank + 1) % ranks, updator._move_group),
            dist.P2POp(dist.irecv, buf_in, (rank - 1) % ranks, updator._move_group)])
        for w in works:
            w.wait()
        _sync(device)
        return time.perf_counter() - t

    def versus_raw(rows):
        nbytes, _, ops = timed_move(rows)  # opens the connections
        nbytes = int(_max_over_ranks(nbytes, device))
        timed_raw(nbytes)
        move_s, raw_s = [], []
        for _ in range(args.repeats):
            move_s.append(_max_over_ranks(timed_move(rows)[1], device))
            raw_s.append(_max_over_ranks(timed_raw(nbytes), device))
        m, r = statistics.median(move_s), statistics.median(raw_s)
        return {"bytes": nbytes, "ops_this_rank": ops, "move_s": m, "raw_p2p_s": r,
                "move_GBps": nbytes / m / 1e9, "raw_p2p_GBps": nbytes / r / 1e9,
                "move_vs_raw": r / m}

    layer_move = versus_raw(None)
    step_move = versus_raw(rows_per_step) if rows_per_step is not None else None

    planner = {}
    if rank == 0:
        from eplb_native import Planner

        n_layers, n_experts, n_ranks = (4, 32, 4) if args.smoke else (58, 256, 32)
        rng = np.random.default_rng(0)
        load = rng.zipf(1.3, size=(n_layers, n_experts)).clip(max=10 ** 5).astype(np.float64)
        old = np.stack([state.default_placement(n_experts, n_ranks, n_ranks)] * n_layers)
        with Planner() as p:
            for policy in ("deepseek", "balanced", "min_move"):
                ts = []
                for _ in range(3):
                    t = time.perf_counter()
                    p.submit(load, old, num_ranks=n_ranks, policy=policy).result()
                    ts.append(time.perf_counter() - t)
                planner[policy] = statistics.median(ts)
    updator.shutdown()
    result = {
        "rank": rank, "ranks": ranks, "backend": backend, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": {k: getattr(args, k) for k in ("layers", "experts", "hidden", "inter", "top_k",
                                                "tokens", "redundant_per_rank",
                                                "layers_per_step", "max_move_bytes_per_step")},
        "slot_bytes": a.slot_bytes(), "rows_per_step": rows_per_step,
        "step_idle_s": statistics.median(idle), "step_moving_s": statistics.median(moving),
        "step_ratio": statistics.median(moving) / statistics.median(idle),
        # the mean counts the steps that commit a layer (a copy of its changed slots on the
        # forward's stream), which a budget makes rarer than the steps that only transfer
        "step_moving_mean_s": statistics.median(moving_mean),
        "step_ratio_mean": statistics.median(moving_mean) / statistics.median(idle),
        "moving_steps_per_repeat": statistics.median(moving_steps),
        "steps_per_layer_move": [m["steps"] for m in move_stats],
        "layer_move": layer_move,
        "budget_step_move": step_move,
        # flat copies of the whole-layer figures (the names of earlier runs)
        "move_bytes": layer_move["bytes"], "move_s": layer_move["move_s"],
        "raw_p2p_s": layer_move["raw_p2p_s"], "move_vs_raw": layer_move["move_vs_raw"],
        "planner_s": planner,
        "planner_shape": "4x32, 4 ranks (smoke)" if args.smoke else "DeepSeek-V3 58x256, 32 ranks",
    }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=7168)  # DeepSeek-V3 expert shape
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--top-k", dest="top_k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--redundant-per-rank", dest="redundant_per_rank", type=int, default=2)
    ap.add_argument("--layers-per-step", dest="layers_per_step", type=int, default=1)
    ap.add_argument("--max-move-bytes-per-step", dest="max_move_bytes_per_step",
                    type=_byte_count, default=None,
                    help="EplbConfig.max_move_bytes_per_step, e.g. 512M (default: whole layers)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU / gloo, tiny shapes, 2 repeats: checks the benchmark runs (seconds)")
    ap.add_argument("--out", default="bench_updator.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backend = "gloo"
        args.dtype = "float32"
        args.layers, args.experts, args.hidden, args.inter = 3, 8, 64, 32
        args.top_k, args.tokens, args.repeats = 2, 32, 2
    if args.backend is None:
        args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.backend == "nccl" and torch.cuda.device_count() < args.ranks:
        ap.error(f"--ranks {args.ranks} needs that many GPUs, found {torch.cuda.device_count()}")
    # a rendezvous file of this run's own: no port to race other processes for
    with tempfile.TemporaryDirectory(prefix="bench_updator_") as tmp:
        mp.spawn(worker, args=(args.ranks, f"file://{tmp}/rdzv", args, args.out),
                 nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
