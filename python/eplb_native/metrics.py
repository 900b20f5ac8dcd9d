"""What the updator measured: ``updator.stats`` history and the balancedness log lines.

Balancedness = mean rank load / max rank load over the ranks of a layer (1.0 is perfect); its
inverse is the peak-to-average ratio (PAR). Here it is measured on tokens the ranks really
received in a window (out of sample for the placement that served them), and, for each plan, in
sample (the planner's own numbers on the window it planned from).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("eplb_native")


@dataclass
class UpdatorStats:
    """History kept by the updator; lists grow by one entry per event (dicts of plain values).

    windows: per gathered window: ``step``, ``balancedness`` [L] measured on the tokens each
        rank's slots received during the window, ``tokens`` (total routed (token, choice) pairs).
    plans: per plan: ``step``, ``balancedness_before`` / ``balancedness_after`` [L] (in
        sample), ``moved_slots`` [L], ``planner_s`` (submit to result).
    moves: per layer move: ``step``, ``layer``, ``ok``, ``reason`` (why it was kept, or ""),
        ``bytes`` received by this rank, ``move_s`` (issue to agreement).
    """

    windows: list = field(default_factory=list)
    plans: list = field(default_factory=list)
    moves: list = field(default_factory=list)

    def last_balancedness(self) -> np.ndarray | None:
        return self.windows[-1]["balancedness"] if self.windows else None


def measured_balancedness(rank_tokens: np.ndarray) -> np.ndarray:
    """[L, R] tokens each rank's slots received -> [L] mean / max (1.0 where no tokens)."""
    rank_tokens = np.asarray(rank_tokens, dtype=np.float64)
    peak = rank_tokens.max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(peak > 0, rank_tokens.mean(axis=1) / np.where(peak > 0, peak, 1), 1.0)


def rank_loads(load, phy2log, num_ranks: int) -> np.ndarray:
    """[L, R] load of each rank under placement ``phy2log`` [L, P] for logical ``load`` [L, E]:
    the sum over the rank's slots of ``load[e] / logcnt[e]`` (each replica carries its share)."""
    load = np.asarray(load, dtype=np.float64)
    phy2log = np.asarray(phy2log, dtype=np.int64)
    num_layers = phy2log.shape[0]
    logcnt = np.stack([np.bincount(r, minlength=load.shape[1]) for r in phy2log])
    per_slot = np.take_along_axis(load / np.maximum(logcnt, 1), phy2log, axis=1)
    return per_slot.reshape(num_layers, num_ranks, -1).sum(-1)


def balancedness(load, phy2log, num_ranks: int) -> np.ndarray:
    """[L] balancedness (mean / max rank load) of placement ``phy2log`` [L, P] on logical
    ``load`` [L, E]; 1.0 where a layer has no load."""
    return measured_balancedness(rank_loads(load, phy2log, num_ranks))


def summary(values: np.ndarray) -> str:
    """``mean=… max=… min=…`` over layers (NaN-aware)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.all(np.isnan(v)):
        return "n/a"
    return f"mean={np.nanmean(v):.4f} max={np.nanmax(v):.4f} min={np.nanmin(v):.4f}"


def log_window(step: int, balancedness: np.ndarray) -> None:
    par = 1.0 / np.maximum(balancedness, 1e-12)
    logger.info("eplb step %d: balancedness %s; peak/avg %s", step, summary(balancedness),
                summary(par))
