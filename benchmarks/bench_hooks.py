"""Host time the updator adds to every serving step: ``forward_before()`` + ``forward_end()``
of an attached stack of EPMoE layers, with no plan due (the steady state between rebalances:
the fold of each layer's counts into the load window, every step).

One process, one rank. Per run: ``--steps`` timed steps after ``--warmup``, each step's
counters first filled with random counts (as a forward's kernels would, untimed), then the two
hooks timed with ``time.perf_counter`` around them, on a CUDA device synchronised before each
timed pair so that only the hooks' own host time (launches, Python) is measured; the median
step of each run, the median of ``--runs`` runs reported. The time is host time: the fold's
kernels run on a side stream and overlap the next forward.

    PYTHONPATH=python python benchmarks/bench_hooks.py          # CPU, DeepSeek-V3's 58 layers
    PYTHONPATH=python python benchmarks/bench_hooks.py --device cuda
    PYTHONPATH=python python benchmarks/bench_hooks.py --smoke  # seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import eplb_native
from eplb_native.nn import EPMoE


class Stack(torch.nn.Module):
    def __init__(self, layers: int, experts: int, redundant: int, device: str):
        super().__init__()
        self.layers = torch.nn.ModuleList([
            EPMoE(16, 8, experts, 8, seed=i, num_redundant_experts=redundant, device=device)
            for i in range(layers)])


def run_once(up, model, steps: int, warmup: int, device: str, gen) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for step in range(warmup + steps):
        for layer in model.layers:
            layer.load.copy_(torch.randint(0, 1000, layer.load.shape, generator=gen))
        sync()
        t0 = time.perf_counter()
        up.forward_before()
        up.forward_end()
        dt = time.perf_counter() - t0
        if step >= warmup:
            times.append(dt)
    sync()
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--redundant", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few steps")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.experts, args.redundant = 4, 16, 4
        args.steps, args.warmup, args.runs = 10, 2, 2
    torch.set_num_threads(1)
    model = Stack(args.layers, args.experts, args.redundant, args.device)
    # no plan due during the runs (a heat interval longer than them): the steady state
    up = eplb_native.attach(model, {"step_interval": 10**9}, hooks=False)
    gen = torch.Generator().manual_seed(0)
    runs = [run_once(up, model, args.steps, args.warmup, args.device, gen)
            for _ in range(args.runs)]
    up.shutdown()
    result = {"device": args.device, "layers": args.layers, "experts": args.experts,
              "slots": args.experts + args.redundant, "steps": args.steps, "runs": args.runs,
              "hooks_us_per_step": statistics.median(runs) * 1e6,
              "hooks_us_per_step_runs": [r * 1e6 for r in runs],
              "torch": torch.__version__}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"updator hooks, host time per step ({args.device}, {args.layers} layers x "
              f"{args.experts}+{args.redundant} slots): median {result['hooks_us_per_step']:.1f}"
              f" us (runs: {', '.join(f'{r * 1e6:.1f}' for r in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
