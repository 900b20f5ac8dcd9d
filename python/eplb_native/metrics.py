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

from ._util import to_numpy

logger = logging.getLogger("eplb_native")


#: Entries each history of UpdatorStats keeps (the newest): a server runs for weeks, and at
#: DeepSeek-V3's 58 layers a cycle adds up to 58 moves.
MAX_STATS_ENTRIES = 4096


class History(list):
    """A list that keeps its newest MAX_STATS_ENTRIES entries: append drops the oldest past
    that (a list still: indexing and slicing as before, unlike a deque)."""

    def append(self, entry) -> None:
        super().append(entry)
        if len(self) > MAX_STATS_ENTRIES:
            del self[: len(self) - MAX_STATS_ENTRIES]


@dataclass
class UpdatorStats:
    """History kept by the updator; lists growing by one entry per event (dicts of plain
    values), the newest MAX_STATS_ENTRIES kept.

    windows: per gathered window: ``step``, ``balancedness`` [L] measured on the tokens each
        rank's slots received during the window, ``tokens`` (total routed (token, choice) pairs),
        ``steps`` (steps of load in it), ``skipped``: True where no plan was submitted because
        the window's mean balancedness was above ``balancedness_threshold``.
    plans: per plan: ``step``, ``balancedness_before`` / ``balancedness_after`` [L] (in
        sample), ``moved_slots`` [L], ``planner_s`` (submit to result).
    moves: per layer move: ``step``, ``layer``, ``ok``, ``reason`` (why it was kept, or ""),
        ``bytes`` received by this rank, ``move_s`` (issue to agreement).
    """

    windows: list = field(default_factory=History)
    plans: list = field(default_factory=History)
    moves: list = field(default_factory=History)

    def last_balancedness(self) -> np.ndarray | None:
        return self.windows[-1]["balancedness"] if self.windows else None


def measured_balancedness(rank_tokens: np.ndarray) -> np.ndarray:
    """[L, R] tokens each rank's slots received -> [L] mean / max (1.0 where no tokens, NaN
    where a rank's count is NaN: not a perfect balance)."""
    rank_tokens = np.asarray(rank_tokens, dtype=np.float64)
    if rank_tokens.ndim != 2:
        raise ValueError(f"rank_tokens must be [layers, ranks], got shape {rank_tokens.shape}")
    peak = rank_tokens.max(axis=1)  # (NaN when any rank's is)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(peak > 0, rank_tokens.mean(axis=1) / np.where(peak > 0, peak, 1), 1.0)
    return np.where(np.isnan(peak), np.nan, out)


def rank_loads(load, phy2log, num_ranks: int) -> np.ndarray:
    """[L, R] load of each rank under placement ``phy2log`` [L, P] for logical ``load`` [L, E]:
    the sum over the rank's slots of ``load[e] / logcnt[e]`` (each replica carries its share).
    ValueError naming the argument for shapes that do not fit, ids out of range, or an expert
    with load but no slot (its load would be dropped from every rank)."""
    load = to_numpy(load, "load")
    phy2log = to_numpy(phy2log, "phy2log")
    if load.dtype == object or load.dtype.kind not in "biuf":
        raise ValueError(f"load must hold real numbers, got dtype {load.dtype}")
    if phy2log.dtype == object or phy2log.dtype.kind not in "iu":
        raise ValueError(f"phy2log must hold integer expert ids, got dtype {phy2log.dtype}")
    load = load.astype(np.float64)
    if load.size and not (np.isfinite(load).all() and load.min() >= 0):
        raise ValueError("load must be finite and >= 0")
    if phy2log.dtype == np.uint64 and phy2log.size and phy2log.max() > np.iinfo(np.int64).max:
        raise ValueError(f"phy2log ids must lie in [0, {load.shape[-1]}), got {phy2log.max()}")
    phy2log = phy2log.astype(np.int64)
    if load.ndim != 2 or phy2log.ndim != 2 or load.shape[0] != phy2log.shape[0]:
        raise ValueError(f"load [layers, experts] and phy2log [layers, slots] must have the same "
                         f"layers, got shapes {load.shape} and {phy2log.shape}")
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int | np.integer) or (
            num_ranks < 1 or phy2log.shape[1] % num_ranks):
        raise ValueError(f"num_ranks must be a positive divisor of the slot count "
                         f"{phy2log.shape[1]}, got {num_ranks!r}")
    if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= load.shape[1]):
        raise ValueError(f"phy2log ids must lie in [0, {load.shape[1]}), got "
                         f"[{phy2log.min()}, {phy2log.max()}]")
    num_layers = phy2log.shape[0]
    logcnt = np.stack([np.bincount(r, minlength=load.shape[1]) for r in phy2log])
    lost = (logcnt == 0) & (load != 0)
    if lost.any():
        layer, e = (int(x[0]) for x in np.nonzero(lost))
        raise ValueError(f"phy2log holds no slot of expert {e} in layer {layer}, which has load "
                         f"{load[layer, e]:g}: every expert with load needs a slot")
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
