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
  synchronised, the largest count any rank receives; the move built ahead, as the updator
  builds it while the previous forward runs) / its time (the slowest rank's), against raw NCCL
  P2P measured in the same run, alternating with it: one ``batch_isend_irecv`` of that byte
  count per rank, each rank sending to the next and receiving from the previous (target
  >= 80%); with a budget, the same for one step's share of the layer. Where the difference
  goes: the move's own P2P messages posted alone (``same_ops_s``), its local copies alone,
  host time of its phases, the host time to build it; ``--profile`` records one of each with
  torch.profiler (tables in ``<out stem>.profile.txt``);
- planner time: ``Planner.submit(...).result()`` for a DeepSeek-V3-shaped load (58 layers, 256
  experts, 288 slots, 32 ranks) per policy.

    python benchmarks/bench_updator.py --ranks 2 --backend nccl --out result.json
    python benchmarks/bench_updator.py --ranks 2 --backend nccl --max-move-bytes-per-step 512M
    python benchmarks/bench_updator.py --smoke      # CPU / gloo, tiny shapes, seconds
    python benchmarks/bench_updator.py --ranks 2 --backend nccl --profile --out r.json
"""

from __future__ import annotations

import argparse
import contextlib
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
    if not 1 <= n < float("inf"):
        raise argparse.ArgumentTypeError(f"byte count must be finite and >= 1, got {text!r}")
    return int(n)


def _int_at_least(low: int):
    """argparse type: an int >= ``low`` (a clear usage error, not a traceback in a worker)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n
    return parse


def _max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _profile_path(out_path: str) -> str:
    """bench.json -> bench.profile.txt (next to --out)."""
    root, _ = os.path.splitext(out_path)
    return root + ".profile.txt"


class _Labels:
    """``label(name)``: a torch.profiler.record_function range when profiling, else nothing
    (so unprofiled timings carry no profiler calls)."""

    def __init__(self, on: bool):
        self.on = on

    def __call__(self, name: str):
        if self.on:
            return torch.profiler.record_function(name)
        return contextlib.nullcontext()


def _write_profiles(profiles, path: str, device) -> None:
    """key_averages tables of each recorded profile: by self CPU time, and by device time
    (CUDA) or total CPU time (CPU), top 25 rows each; and each profile's timeline as a Chrome
    trace (``<path stem>.<i>.json``, open in chrome://tracing or Perfetto)."""
    second = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    root = path.removesuffix(".txt")
    with open(path, "w") as f:
        for i, (title, prof) in enumerate(profiles):
            trace = f"{root}.{i}.json"
            prof.export_chrome_trace(trace)
            f.write(f"### {title}: timeline in {os.path.basename(trace)}\n")
            ka = prof.key_averages()
            for key in ("self_cpu_time_total", second):
                f.write(f"=== {title} -- sorted by {key} ===\n")
                f.write(ka.table(sort_by=key, row_limit=25, max_name_column_width=70))
                f.write("\n\n")
    print(f"profile tables written to {path}")


def worker(rank, ranks, init_method, args, out_path):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import eplb_native
    from eplb_native import state
    from eplb_native.nn import EPMoE
    from eplb_native.transfer import LayerMove, StepBudget, _runs, prepare_layout

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
                                         "enable_migration_batching": args.migration_batching,
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
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    rows_per_step = (None if args.max_move_bytes_per_step is None else
                     max(1, args.max_move_bytes_per_step // a.slot_bytes()))

    layout = prepare_layout(a.phy2log.cpu().numpy(), _swapped(a.phy2log.cpu().numpy(), ranks),
                            ranks)
    label = _Labels(False)  # on only inside the profiled calls (rank 0), never the timed ones

    def new_move():
        return LayerMove(a.weights, staging, None, rank, updator._move_group, stream,
                         layout=layout, batched=args.migration_batching)

    def timed_move(rows):
        """One layer's move, or its first step under a budget of ``rows``, built ahead (as the
        updator builds it while the previous forward runs): (bytes this rank received, seconds
        issue -> done, ops posted, phases: host seconds of issue up to posting / of the whole
        issue (posting plus the local copies queued after it) / of waiting, bytes this rank
        copied locally)."""
        move = new_move()
        budget = StepBudget(ranks, rows) if rows is not None else None
        dist.barrier()
        _sync(device)
        t = time.perf_counter()
        with label("move.issue"):
            move.issue(budget)
        t_issued = time.perf_counter()
        with label("move.wait"):
            assert move.wait(time.perf_counter() + 120)
        t_waited = time.perf_counter()
        with label("move.sync"):
            _sync(device)
        end = time.perf_counter()
        return move.bytes_received, end - t, move.ops_posted, {
            "post_host_s": move.t_posted - t, "issue_host_s": t_issued - t,
            "wait_host_s": t_waited - t_issued}, move.bytes_copied

    def timed_same_ops(rows):
        """The P2P messages that move posts (same tensors, views, count and order), alone:
        no LayerMove, no local copies."""
        move = new_move()
        pieces = move.layout.take(move.cursor, StepBudget(ranks, rows) if rows else None)
        batches, gathers = move._ops(pieces)
        ops = [op for batch in batches for op in batch]  # (all at once, batched or not)
        move._copy(gathers)
        dist.barrier()
        _sync(device)
        t = time.perf_counter()
        with label("same_ops.post"):
            works = dist.batch_isend_irecv(ops) if ops else []
        with label("same_ops.wait"):
            for w in works:
                w.wait()
        with label("same_ops.sync"):
            _sync(device)
        return time.perf_counter() - t

    def timed_local():
        """The move's local copies (slots this rank already holds) alone."""
        move = new_move()
        dist.barrier()
        _sync(device)
        t = time.perf_counter()
        with label("local.copy"):
            move._copy(_runs(move.layout.local[rank]))
            _sync(device)
        return time.perf_counter() - t

    def timed_raw(nbytes):
        buf_out = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        buf_in = torch.empty_like(buf_out)
        dist.barrier()
        _sync(device)
        t = time.perf_counter()
        with label("raw.post"):
            works = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, buf_out, (rank + 1) % ranks, updator._move_group),
                dist.P2POp(dist.irecv, buf_in, (rank - 1) % ranks, updator._move_group)])
        with label("raw.wait"):
            for w in works:
                w.wait()
        with label("raw.sync"):
            _sync(device)
        return time.perf_counter() - t

    def prepare_s():
        """Host seconds to build one layer's move (schedule, layout, LayerMove): what the
        updator now does ahead, off the issue path."""
        t = time.perf_counter()
        lay = prepare_layout(a.phy2log.cpu().numpy(), _swapped(a.phy2log.cpu().numpy(), ranks),
                             ranks)
        LayerMove(a.weights, staging, None, rank, updator._move_group, stream, layout=lay)
        return time.perf_counter() - t

    def versus_raw(rows, name):
        nbytes, _, ops, _, copied = timed_move(rows)  # opens the connections
        nbytes = int(_max_over_ranks(nbytes, device))
        timed_raw(nbytes)
        timed_same_ops(rows)
        timed_local()
        move_s, raw_s, same_s, local_s, prep_s = [], [], [], [], []
        phases: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            _, m, _, ph, _ = timed_move(rows)
            move_s.append(_max_over_ranks(m, device))
            for k, v in ph.items():
                phases.setdefault(k, []).append(_max_over_ranks(v, device))
            raw_s.append(_max_over_ranks(timed_raw(nbytes), device))
            same_s.append(_max_over_ranks(timed_same_ops(rows), device))
            local_s.append(_max_over_ranks(timed_local(), device))
            prep_s.append(_max_over_ranks(prepare_s(), device))
        if args.profile:
            # one more of each, recorded on rank 0 (every rank takes part in the transfers)
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                             if device.type == "cuda" else [])
            for what, fn in (("move", lambda: timed_move(rows)),
                             ("same_ops", lambda: timed_same_ops(rows)),
                             ("raw", lambda: timed_raw(nbytes))):
                if rank == 0:
                    label.on = True
                    try:
                        with profile(activities=acts) as prof:
                            fn()
                    finally:
                        label.on = False
                    profiles.append((f"{name}: {what}", prof))
                else:
                    fn()
        m, r = statistics.median(move_s), statistics.median(raw_s)
        same, local = statistics.median(same_s), statistics.median(local_s)
        return {"bytes": nbytes, "ops_this_rank": ops, "move_s": m, "raw_p2p_s": r,
                "move_GBps": nbytes / m / 1e9, "raw_p2p_GBps": nbytes / r / 1e9,
                "move_vs_raw": r / m,
                # where a move's time goes (medians, slowest rank): the same P2P messages
                # alone, the local copies alone, host time of its phases, and building it
                "same_ops_s": same, "same_ops_vs_raw": r / same, "local_copy_s": local,
                "local_copy_bytes": len(layout.local[rank]) * a.slot_bytes(),
                # local copies the timed move (or budget step) made on this rank: a budget
                # gives them only the rows its receives leave
                "move_copied_bytes_this_rank": copied,
                "phases_s": {k: statistics.median(v) for k, v in phases.items()},
                "prepare_host_s": statistics.median(prep_s)}

    profiles: list = []  # (title, torch.profiler.profile) recorded on rank 0
    layer_move = versus_raw(None, "whole layer")
    step_move = (versus_raw(rows_per_step, f"budget step ({rows_per_step} rows)")
                 if rows_per_step is not None else None)
    if profiles:
        _write_profiles(profiles, _profile_path(out_path), device)

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
                                                "layers_per_step", "max_move_bytes_per_step",
                                                "migration_batching")},
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


def summarize(paths) -> None:
    """Prints the figures of result files (``--out`` of earlier runs), a few lines each."""
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        print(f"{path}: {r['device']}, slot {r['slot_bytes'] / 1e6:.1f} MB, step ratio "
              f"{r['step_ratio']:.4f} (mean {r['step_ratio_mean']:.4f}), planner {r['planner_s']}")
        for k in ("layer_move", "budget_step_move"):
            m = r.get(k)
            if not m:
                continue
            ms = {a: round(b * 1e3, 3) for a, b in m["phases_s"].items()}
            print(f"  {k}: {m['bytes'] / 1e6:.1f} MB; ms: move {m['move_s'] * 1e3:.3f}, raw "
                  f"{m['raw_p2p_s'] * 1e3:.3f}, same ops {m['same_ops_s'] * 1e3:.3f}, local "
                  f"copies {m['local_copy_s'] * 1e3:.3f}, build {m['prepare_host_s'] * 1e3:.3f};"
                  f" move/raw {m['move_vs_raw']:.2f}, same ops/raw {m['same_ops_vs_raw']:.2f};"
                  f" copied {m['move_copied_bytes_this_rank'] / 1e6:.1f} MB; host ms {ms}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=_int_at_least(2), default=2,
                    help="processes (a move needs a peer)")
    ap.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=_int_at_least(1), default=12)
    ap.add_argument("--experts", type=_int_at_least(1), default=32)
    ap.add_argument("--hidden", type=_int_at_least(1), default=7168)  # DeepSeek-V3 expert shape
    ap.add_argument("--inter", type=_int_at_least(1), default=2048)
    ap.add_argument("--top-k", dest="top_k", type=_int_at_least(1), default=8)
    ap.add_argument("--tokens", type=_int_at_least(1), default=4096)
    ap.add_argument("--redundant-per-rank", dest="redundant_per_rank", type=_int_at_least(0),
                    default=2)
    ap.add_argument("--layers-per-step", dest="layers_per_step", type=_int_at_least(1),
                    default=1)
    ap.add_argument("--max-move-bytes-per-step", dest="max_move_bytes_per_step",
                    type=_byte_count, default=None,
                    help="EplbConfig.max_move_bytes_per_step, e.g. 512M (default: whole layers)")
    ap.add_argument("--migration-batching", dest="migration_batching", action="store_true",
                    help="EplbConfig.enable_migration_batching (vLLM's): a move's messages in "
                         "batches where every rank talks to one peer (its 'same_ops' baseline "
                         "still posts them all at once)")
    ap.add_argument("--repeats", type=_int_at_least(1), default=5)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU / gloo, tiny shapes, 2 repeats: checks the benchmark runs (seconds)")
    ap.add_argument("--out", default="bench_updator.json")
    ap.add_argument("--profile", action="store_true",
                    help="also record one layer move (and one budget step), the same P2P "
                         "messages alone and raw P2P with torch.profiler on rank 0; tables "
                         "(by self CPU and by device time) go to <out stem>.profile.txt")
    ap.add_argument("--summarize", nargs="+", metavar="JSON",
                    help="only print the figures of these result files (no run)")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return
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
