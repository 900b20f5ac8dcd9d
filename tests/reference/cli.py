"""References for the command line's numbers: balancedness of a placement, and the simulation
loop of ``eplb-native simulate``, written as plain loops."""

import numpy as np


def balancedness(load, phy2log, num_ranks):
    """[L] mean / max rank load of ``phy2log`` [L, P] on ``load`` [L, E]; each replica of an
    expert carries load / replicas. 1.0 for a layer without load."""
    load = np.asarray(load, dtype=np.float64)
    out = []
    for layer_load, row in zip(load, np.asarray(phy2log), strict=True):
        replicas = {}
        for e in row:
            replicas[int(e)] = replicas.get(int(e), 0) + 1
        per_rank = len(row) // num_ranks
        rank_loads = []
        for r in range(num_ranks):
            rank_loads.append(sum(layer_load[int(e)] / replicas[int(e)]
                                  for e in row[r * per_rank:(r + 1) * per_rank]))
        peak = max(rank_loads)
        out.append(1.0 if peak == 0 else (sum(rank_loads) / num_ranks) / peak)
    return np.array(out)


def simulate(loads, first_phy2log, num_ranks, every, plan_fn):
    """Per-window out-of-sample balancedness (mean over layers) and moved slots per rebalance.

    ``plan_fn(window_load [L, E], current phy2log [L, P]) -> new phy2log``. Windows before the
    first rebalance (``every``) are not judged (NaN)."""
    placement = np.asarray(first_phy2log)
    per_window, moved = [], []
    for w in range(len(loads)):
        if w >= every and w % every == 0:
            new = plan_fn(np.sum(loads[w - every:w], axis=0), placement)
            moved.append(int((new != placement).sum()))
            placement = new
        per_window.append(balancedness(loads[w], placement, num_ranks).mean()
                          if w >= every else float("nan"))
    return np.array(per_window), moved
