"""References for the command line's numbers: balancedness of a placement, and the simulation
loop of ``eplb-native simulate``, written as plain loops."""

import numpy as np

from reference.placement import rank_loads


def balancedness(load, phy2log, num_ranks):
    """[L] mean / max rank load of ``phy2log`` [L, P] on ``load`` [L, E] (rank loads from the
    one reference, ``reference.placement.rank_loads``). 1.0 for a layer without load."""
    loads = rank_loads(load, np.asarray(phy2log), num_ranks)
    peak = loads.max(1)
    return np.array([1.0 if p == 0 else m / p for m, p in zip(loads.mean(1), peak, strict=True)])


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
