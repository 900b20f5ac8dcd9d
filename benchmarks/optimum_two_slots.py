"""How far `balanced` is from the best placement with two slots per rank (global policy).

With two slots per rank a placement is a choice of replica counts plus a pairing of the
replicas into ranks, and for given counts the best pairing is the sorted one (i-th lightest
replica with the i-th heaviest). It fits under a max rank load T iff, for every replica value
b > T / 2, the replicas weighing >= b are no more than those weighing <= T - b (each heavy
replica needs its own light partner; the sorted pairing finds one whenever these counts allow).
So "is there a placement with max <= T" is an integer program over the replica counts (one
binary per expert and count, those counts summing to the slots, one inequality per threshold),
solved here with scipy's HiGHS; bisection on T between our lower bound and `balanced`'s max
finds the best placement within the counts tried (each expert from the fewest replicas that
keep it <= T up to `--extra` past the count that makes its replicas <= T / 2), unless the
solver runs out of time on a step without a placement (counted in the output: the bisection
then takes that T as infeasible, and a better placement may exist). The placement found is
built and its max measured, so the number reported is one that exists.

Slow (minutes a layer): an analysis tool, not a benchmark of speed.

    python benchmarks/optimum_two_slots.py --skew lognormal --sigma 0.5 --layers 0,1,2
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _solve(w: np.ndarray, slots: int, T: float, extra: int, time_limit: float):
    """(replica counts [E] with sorted-pairing max <= T, or None; whether the solver's time ran
    out before it knew: then None means "not found", not "none exists")."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    opts = []  # (expert, count, load per replica)
    for e, we in enumerate(w):
        lo = max(1, int(np.ceil(we / T - 1e-12)))
        hi = max(lo, int(np.ceil(2.0 * we / T))) + extra
        opts += [(e, c, we / c) for c in range(lo, hi + 1) if we / c <= T * (1 + 1e-12)]
    if not opts:
        return None, False
    cs = np.array([o[1] for o in opts], float)
    vs = np.array([o[2] for o in opts])
    bigs = np.unique(vs[vs > T / 2])
    E = len(w)
    a = lil_matrix((E + 1 + len(bigs), len(opts)))
    for j, (e, _, _) in enumerate(opts):
        a[e, j] = 1
    a[E, :] = cs
    low = [1.0] * E + [float(slots)] + [-np.inf] * len(bigs)
    high = [1.0] * E + [float(slots)] + [0.0] * len(bigs)
    for k, b in enumerate(bigs):
        coef = cs * ((vs >= b * (1 - 1e-12)).astype(float)
                     - (vs <= (T - b) * (1 + 1e-12)).astype(float))
        for j in np.nonzero(coef)[0]:
            a[E + 1 + k, j] = coef[j]
    res = milp(np.zeros(len(opts)), constraints=LinearConstraint(a.tocsr(), low, high),
               integrality=np.ones(len(opts)), bounds=Bounds(0, 1),
               options={"time_limit": time_limit})
    timed_out = res.status == 1  # (time or iteration limit; a solution may have been found)
    if res.x is None or res.status not in (0, 1):
        return None, timed_out
    cnt = np.zeros(E, np.int64)
    for j in np.nonzero(res.x > 0.5)[0]:
        cnt[opts[j][0]] = opts[j][1]
    return cnt, timed_out


def _sorted_pairing_max(w: np.ndarray, cnt: np.ndarray) -> float:
    v = np.sort(np.repeat(w / cnt, cnt))
    return float((v + v[::-1]).max())


def best_max(w: np.ndarray, slots: int, lo: float, hi: float, steps: int, extra: int,
             time_limit: float) -> tuple[float, int]:
    """(the smallest max rank load found by bisection in [lo, hi], hi when nothing lower; the
    steps whose solver ran out of time without a placement, which the bisection then counted
    as infeasible: with any, a better placement may exist)."""
    best, undecided = hi, 0
    for _ in range(steps):
        mid = 0.5 * (lo + best)
        cnt, timed_out = _solve(w, slots, mid, extra, time_limit)
        if cnt is None:
            undecided += timed_out
            lo = mid
        else:
            best = min(best, _sorted_pairing_max(w, cnt))  # the placement's own max
    return best, undecided


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skew", default="lognormal", choices=("lognormal", "zipf"))
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--layers", default="0", help="comma-separated layer indices")
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12, help="bisection steps")
    ap.add_argument("--extra", type=int, default=4)
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per integer program")
    args = ap.parse_args(argv)
    import eplb_native
    from eplb_native import traces

    layers, experts, slots, ranks = 61, 384, 512, 256  # the benchmark's Kimi-K2-like shape
    loads = traces.synth(args.window + 1, layers, experts, drift=0.05, seed=args.seed,
                         tokens_per_window=16384, skew=args.skew,
                         sigma=args.sigma).astype(np.float64)[args.window]
    kw = dict(num_ranks=ranks, num_replicas=slots)
    bal = eplb_native.plan(loads, policy="balanced", **kw)
    ds = eplb_native.plan(loads, policy="deepseek", **kw)
    print("| layer | mean rank load | our bound | best found | balanced | deepseek | balanced / "
          "best | steps timed out | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layer in (int(x) for x in args.layers.split(",")):
        t0 = time.time()
        best, undecided = best_max(loads[layer], slots, bal.lower_bound[layer],
                                   bal.max_load_after[layer], args.steps, args.extra,
                                   args.time_limit)
        print(f"| {layer} | {bal.mean_load[layer]:.2f} | {bal.lower_bound[layer]:.2f} | "
              f"{best:.2f} | {bal.max_load_after[layer]:.2f} | {ds.max_load_after[layer]:.2f} | "
              f"{bal.max_load_after[layer] / best:.4f} | {undecided} | {time.time() - t0:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
