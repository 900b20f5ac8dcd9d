"""Placement planning: the Python face of the C++ planner (csrc/planner).

Glossary (DESIGN.md): a *logical* expert is an expert of the model; a *physical* expert (slot)
is one copy of its weights on one rank. Rank r owns slots ``r*S .. r*S+S-1``.

- ``phy2log`` [L, P]: logical id held by each slot.
- ``log2phy`` [L, E, M]: slots of each logical expert, -1 padded.
- ``logcnt`` [L, E]: replicas of each logical expert (>= 1).
- rank load: sum over the rank's slots of ``load[logical] / logcnt[logical]``;
  balancedness = mean rank load / max rank load (1.0 is perfect).

Nothing here touches torch except to accept and return torch tensors where given them; the
planning itself runs in C++ with the GIL released.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import _planner
from ._util import check_bool, is_torch, to_numpy

logger = logging.getLogger(__name__)

POLICIES = {"deepseek": 0, "balanced": 1, "min_move": 2}

#: Columns of :attr:`Plan.transfers`. kind: 0 over the wire, 1 a local copy (the destination
#: rank held the expert: src_slot there, old placement), 2 a copy of what a wire transfer of the
#: same rank brings (src_slot is that transfer's dst_slot: an expert crosses the wire once per
#: rank).
TRANSFER_COLUMNS = ("layer", "batch", "logical", "src_rank", "src_slot", "dst_rank", "dst_slot",
                    "kind")


@dataclass(frozen=True, eq=False)  # arrays: no meaningful ==; identity, hashable by id
class Plan:
    """A placement for every layer and how to get there from the old one.

    Arrays are numpy and owned by the Plan. L layers, E logical experts, P slots, M max replicas.
    """

    phy2log: np.ndarray  #: [L, P] int64, logical expert held by each slot
    log2phy: np.ndarray  #: [L, E, M] int64, slots of each logical expert, -1 padded
    logcnt: np.ndarray  #: [L, E] int64, replicas per logical expert (>= 1)
    mean_load: np.ndarray  #: [L] float64, mean rank load (the ideal max rank load)
    max_load_before: np.ndarray  #: [L] float64, max rank load of the old placement (NaN if none)
    max_load_after: np.ndarray  #: [L] float64, max rank load of the new placement
    lower_bound: np.ndarray  #: [L] float64, no placement of these slots has a lower max rank load
    moved_slots: np.ndarray  #: [L] int64, slots whose logical expert changed (0 with no old)
    transfers: np.ndarray  #: [T, 8] int64, columns TRANSFER_COLUMNS, sorted by layer, batch
    policy: str = "balanced"
    num_ranks: int = 1
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def balancedness_before(self) -> np.ndarray:
        """[L] mean / max rank load of the old placement on this load (NaN without one)."""
        return _ratio(self.mean_load, self.max_load_before)

    @property
    def balancedness_after(self) -> np.ndarray:
        """[L] mean / max rank load of the new placement on this load (1.0 is perfect)."""
        return _ratio(self.mean_load, self.max_load_after)

    @property
    def balancedness_bound(self) -> np.ndarray:
        """[L] the best balancedness any placement of these slots could reach."""
        return _ratio(self.mean_load, self.lower_bound)

    @property
    def total_moved_slots(self) -> int:
        return int(self.moved_slots.sum())

    def __repr__(self) -> str:  # a summary: the arrays are the fields (p.phy2log, ...)
        layers, slots = self.phy2log.shape
        experts = self.logcnt.shape[1] if self.logcnt.ndim == 2 else 0

        def mean(a):
            return "nan" if np.isnan(a).all() else f"{np.nanmean(a):.4f}"

        return (f"Plan(policy={self.policy!r}, layers={layers}, experts={experts}, "
                f"slots={slots}, ranks={self.num_ranks}, balancedness mean before="
                f"{mean(self.balancedness_before)} after={mean(self.balancedness_after)} "
                f"bound={mean(self.balancedness_bound)}, moved_slots={self.total_moved_slots}, "
                f"transfers={len(self.transfers)})")


def _ratio(mean: np.ndarray, peak: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0)
    # mean <= max: a ratio above 1 is rounding (the mean and the rank loads are summed in
    # different orders; one ulp on ~2% of random layers)
    return np.where(np.isnan(peak), np.nan, np.minimum(out, 1.0))


def _as_numpy(x, name: str, dtype) -> np.ndarray:
    if not (is_torch(x) or isinstance(x, np.ndarray | list | tuple)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    a = to_numpy(x, name)
    # (bool, integers, floats: not complex, whose imaginary part the cast would drop, nor
    # timedelta64, which numpy counts as an integer)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.ndim == 0:  # (ascontiguousarray would make it 1-D: a layer of one expert)
        raise ValueError(f"{name} must be an array, got a 0-d one ({a.item()!r})")
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if (np.issubdtype(dtype, np.integer) and a.dtype.kind == "u" and a.size
            and a.max() > np.iinfo(np.int64).max):
        # (the cast to int64 would wrap it to a negative id and the error would name that)
        raise ValueError(f"{name} holds {a.max()}, beyond int64")
    return np.ascontiguousarray(a, dtype=dtype)


#: Largest num_replicas (physical slots per layer) a plan takes: far above any model's
#: (Kimi-K2-like: 512), low enough that a mistyped value is refused, not a failed allocation or
#: a search that runs for minutes (`balanced`'s grows about quadratically with the slots of a
#: layer: 0.05 s at 16,384, 0.8 s at 65,536 on one rank, 200 s at 2**20; review 18).
MAX_SLOTS = 1 << 16

#: Largest thread count a plan takes (the C++ side holds it in an int; more threads than
#: layers are never started anyway).
MAX_THREADS = 4096


def _as_int(x, name: str, minimum: int = 1, maximum: int = 2**62) -> int:
    if isinstance(x, bool) or not isinstance(x, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    if x > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {x}")
    return int(x)


def _as_distinct(x) -> tuple[bool, bool]:
    """distinct_ranks: None (``balanced`` prefers no repeats), True or False -> the planner's
    keyword arguments distinct_ranks, prefer_distinct."""
    if x is None:
        return {"distinct_ranks": False, "prefer_distinct": True}
    return {"distinct_ranks": check_bool(x, "distinct_ranks (or None)"), "prefer_distinct": False}


def _as_target(x) -> float:
    """min_move_target: a real number in (0, 1]."""
    if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
        raise TypeError(f"min_move_target must be a real number, got {type(x).__name__}")
    if not 0 < x <= 1:  # (compared, not converted: 10**400 is no float)
        raise ValueError(f"min_move_target must be in (0, 1], got {x}")
    return float(x)


def _prepare(load, old_phy2log, num_ranks, num_replicas, num_nodes, num_groups, policy, threads,
             name: str = "load"):
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a str, one of {sorted(POLICIES)}, got "
                        f"{type(policy).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    w = _as_numpy(load, name, np.float64)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2 or w.shape[1] == 0:
        raise ValueError(f"{name} must have shape [layers, experts] with experts >= 1, got "
                         f"{w.shape}")
    if w.shape[0] == 0:
        raise ValueError(f"{name} must have at least one layer")
    num_ranks = _as_int(num_ranks, "num_ranks")
    num_nodes = _as_int(num_nodes, "num_nodes")
    num_groups = _as_int(num_groups, "num_groups")
    threads = _as_int(threads, "threads", maximum=MAX_THREADS)
    if num_replicas is not None:  # (a bound, so that a typo is no std::bad_alloc)
        num_replicas = _as_int(num_replicas, "num_replicas", maximum=MAX_SLOTS)
    old = None
    if old_phy2log is not None:
        old = _as_numpy(old_phy2log, "old_phy2log", np.int64)
        if old.ndim == 1:
            old = old[None, :]
        if old.ndim != 2 or old.shape[0] != w.shape[0]:
            raise ValueError(f"old_phy2log must have shape [layers={w.shape[0]}, slots], got "
                             f"{old.shape}")
        if num_replicas is None:
            num_replicas = _as_int(old.shape[1], "num_replicas (old_phy2log.shape[1])",
                                   maximum=MAX_SLOTS)
        elif num_replicas != old.shape[1]:
            raise ValueError(f"num_replicas ({num_replicas}) must equal old_phy2log.shape[1] "
                             f"({old.shape[1]})")
    if num_replicas is None:
        raise ValueError("num_replicas (total physical slots) is required without old_phy2log")
    return w, old, num_ranks, num_replicas, num_nodes, num_groups, threads


def plan(load, old_phy2log=None, *, num_ranks: int, num_replicas: int | None = None,
         num_nodes: int = 1, num_groups: int = 1, policy: str = "balanced",
         preserve_slots: bool = True, threads: int = 1, min_move_target: float = 0.99,
         transfers: bool = True, distinct_ranks: bool | None = None) -> Plan:
    """Plans a placement of every layer for ``load``.

    Args:
        load: [L, E] (or [E]) tokens routed to each logical expert over a window; numpy or torch;
            finite and >= 0, each layer summing to at most ``sys.float_info.max / 4`` (rank
            loads are sums of it). A 1-D load is one layer: the Plan's arrays keep their layer
            axis (L = 1).
        old_phy2log: [L, P] current placement, or None. Needed by ``min_move``; with it,
            moved slots, balancedness before and the transfer plan are reported.
        num_ranks: ranks (GPUs / NPUs) the P slots are spread over; P % num_ranks == 0.
        num_replicas: P, total physical slots per layer (E + redundant), at most MAX_SLOTS
            (65,536). Taken from old_phy2log when given.
        num_nodes, num_groups: topology; hierarchical placement when num_groups % num_nodes == 0
            (DeepSeek EPLB's rule), global otherwise. One node is global for ``balanced`` and
            ``min_move``; ``deepseek`` follows DeepSeek's code there too (experts ordered by
            group load, which decides ties), so num_groups must then divide the experts.
        policy: ``"deepseek"`` (DeepSeek EPLB exactly), ``"balanced"`` (best balance, default;
            never worse than ``deepseek`` on any layer), ``"min_move"`` (from ``old_phy2log``,
            the fewest changed slots reaching ``min_move_target`` x ``balanced``'s balancedness).
        preserve_slots: an expert that stays on a rank keeps its old slot.
        threads: plan layers on this many threads.
        min_move_target: fraction of ``balanced``'s balancedness that ``min_move`` must reach.
            (It first tries for this fraction of the lower bound's balancedness, a stricter
            stop that needs no ``balanced`` plan, and plans ``balanced`` only when that fails.
            On a layer it changes, an expert whose load per replica is above the smallest
            possible heaviest replica / ``min_move_target`` first gets the replicas that bring
            it under: a rank holding one heavy replica swings with that expert's load in the
            windows after.)
        transfers: build the transfer plan (with an old placement); False leaves
            ``Plan.transfers`` empty, for callers that only want the placement.
        distinct_ranks: True: no rank holds one expert in two slots, as vllm-ascend's expert maps
            and dispatch require (their policies never do it; DeepSeek's algorithm does, and
            ``balanced`` keeps such a pair where moving it would raise the max). Each such
            pair is undone by the trade or replica-count change that raises the ranks it
            touches least; ``balanced`` then searches again under the constraint
            (csrc/planner/distinct.cpp). Needs at least as many experts as slots per rank (per
            node when hierarchical). With ``deepseek`` the result is DeepSeek's placement
            wherever it already was distinct, no longer its algorithm as such (and log2phy
            lists replicas in slot order, as for the other policies, not by DeepSeek's
            replica ordinal). ``balanced`` stays no worse than ``deepseek`` and ``min_move``
            reaches ``min_move_target`` x ``balanced``'s balancedness, all three with the
            option. None (the default): ``balanced`` takes its placement with the option
            where that is within 0.1% of its max rank load and not above ``deepseek``'s (a
            rank holding a hot expert twice swings twice with it in the windows after: better
            out of sample, placements vllm-ascend can serve on most layers), the other
            policies as with False. False: the lowest max found, repeats or not.

    Returns:
        A :class:`Plan`. ``lower_bound`` [L] is a proven floor on the max rank load of any
        placement with these slots and topology (csrc/planner/bound.cpp), so
        ``balancedness_bound`` is the best balancedness any policy could reach. ``transfers``
        rows (TRANSFER_COLUMNS) read the OLD placement, except a kind-2 row, which copies the
        slot a wire row of the same rank fills (same batch, earlier in the order); a row is
        local (kind 1) when the destination rank already held the expert; within one (layer,
        batch) every rank talks to at most one peer (csrc/planner/placement.h).
    """
    w, old, num_ranks, num_replicas, num_nodes, num_groups, threads = _prepare(
        load, old_phy2log, num_ranks, num_replicas, num_nodes, num_groups, policy, threads)
    out = _planner.plan(w, old, num_replicas, num_ranks, num_nodes, num_groups, POLICIES[policy],
                        check_bool(preserve_slots, "preserve_slots"), threads,
                        _as_target(min_move_target), check_bool(transfers, "transfers"),
                        **_as_distinct(distinct_ranks))
    return Plan(policy=policy, num_ranks=num_ranks, **out)


def rebalance_experts(weight, num_replicas: int, num_groups: int | None, num_nodes: int,
                      num_gpus: int | None = None, enable_hierarchical: bool | None = None, *,
                      num_ranks: int | None = None):
    """DeepSeek EPLB's ``rebalance_experts``: same signature, same meaning, same outputs.

    Args:
        weight: [L, E] load statistics of every logical expert (numpy or torch); [E] is one
            layer, and the outputs then have no layer axis either ([P], [E, P - E + 1], [E]).
        num_replicas: physical experts per layer (a multiple of num_gpus).
        num_groups: expert groups; num_nodes: server nodes (hierarchical placement when
            num_groups % num_nodes == 0, global otherwise); num_gpus: ranks (DeepSeek's name;
            ``num_ranks=``, vLLM's policy's name, is accepted as the keyword instead).
        enable_hierarchical: SGLang's choice (its ``deepseek.rebalance_experts`` takes it):
            True plans hierarchically (num_groups must be divisible by num_nodes), False
            globally (groups and nodes taken as 1, as SGLang's code does); None (DeepSeek's and
            vLLM's call) decides by the rule above. num_groups None (SGLang's, for models without
            groups) is one group.

    Returns:
        ``(phy2log [L, P], log2phy [L, E, P - E + 1], logcnt [L, E])``, int64, torch tensors
        when ``weight`` is a torch tensor, numpy arrays otherwise. As in DeepSeek EPLB,
        ``log2phy`` has num_redundant_experts + 1 columns whatever the largest replica count,
        column j is the expert's j-th replica (replica ordinal, not slot order), -1 padded.
        Ties in ``weight`` go to the lowest index (DeepSeek's own sorts leave them unspecified).
        The arithmetic is float64, DeepSeek's code's float32 (vLLM casts to float32 too): where
        float32 rounding makes two sums tie that float64 tells apart, or the reverse, the two
        may place those experts differently (10 of 1,500 random small-integer loads, review 18;
        a float64 run of DeepSeek's code matched on all of them).
    """
    if num_gpus is None and num_ranks is None:
        raise TypeError("rebalance_experts is missing the number of ranks: num_gpus (the 5th "
                        "positional argument, DeepSeek's name) or num_ranks= (keyword)")
    if num_gpus is not None and num_ranks is not None:
        raise TypeError("rebalance_experts takes the number of ranks once, got both num_gpus "
                        f"({num_gpus!r}) and num_ranks= ({num_ranks!r})")
    name = "num_gpus" if num_ranks is None else "num_ranks"
    if enable_hierarchical is not None:
        if not isinstance(enable_hierarchical, bool | np.bool_):
            raise TypeError(f"enable_hierarchical must be a bool or None, got "
                            f"{type(enable_hierarchical).__name__}")
        if enable_hierarchical and num_groups is None:
            raise ValueError("enable_hierarchical=True needs num_groups (the model's expert "
                             "groups), got None")
        # (checked before False sets them aside)
        groups = 1 if num_groups is None else _as_int(num_groups, "num_groups")
        nodes = _as_int(num_nodes, "num_nodes")
        if not enable_hierarchical:
            num_groups = num_nodes = 1  # (SGLang's global policy: one group on one node)
        elif groups % nodes:
            raise ValueError(f"enable_hierarchical=True needs num_groups ({groups}) divisible by "
                             f"num_nodes ({nodes})")
    elif num_groups is None:
        num_groups = 1
    try:
        return _rebalance_experts(weight, num_replicas, num_groups, num_nodes, name,
                                  num_gpus if num_ranks is None else num_ranks)
    except ValueError as e:
        if name == "num_ranks":
            raise
        # the checks below (and the planner's) say num_ranks: name the argument as given
        raise ValueError(re.sub(r"\bnum_ranks\b", "num_gpus", str(e))) from None


def _rebalance_experts(weight, num_replicas, num_groups, num_nodes, name, ranks):
    ranks = _as_int(ranks, name)  # named as given
    w, _, ranks, slots, num_nodes, num_groups, _ = _prepare(
        weight, None, ranks, num_replicas, num_nodes, num_groups, "deepseek", 1, name="weight")
    bad = ~(w >= 0.0) | ~np.isfinite(w)  # (the planner would check it too, naming it "load")
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"weight must be finite and >= 0, got {w[at]} at {list(at)}")
    # log2phy written at DeepSeek's width by the planner (padding a narrower one here took a
    # third of the call on DeepSeek-V3).
    width = slots - w.shape[1] + 1
    if width < 1:  # fewer slots than experts: the planner says so, naming num_replicas
        width = 0
    out = _planner.plan(w, None, slots, ranks, num_nodes, num_groups, POLICIES["deepseek"], False,
                        1, 0.99, False, width)
    out = (out["phy2log"], out["log2phy"], out["logcnt"])
    one_layer = weight.dim() == 1 if is_torch(weight) else np.ndim(weight) == 1
    if one_layer:
        out = tuple(a[0] for a in out)  # the one layer, as given (a view of the fresh array)
    if is_torch(weight):
        import torch

        return tuple(torch.from_numpy(a) for a in out)  # fresh arrays: shared, not copied
    return out


def preserve_slots(phy2log, old_phy2log, num_ranks: int):
    """vLLM's ``preserve_intragpu_slots``: permute each rank's slots of ``phy2log`` [L, P] so an
    expert the rank held in ``old_phy2log`` keeps its old slot. Returns a new int64 array (or
    int64 tensor, if given one, whatever its integer dtype); each rank keeps the same multiset
    of experts.

    ``old_phy2log`` is [L, P], or, across a scale event of elastic EP (vLLM's), [L, P'] for
    another rank count with the same slots per rank: rank r's old slots are columns r*S ..
    r*S+S-1 of it, ranks beyond it have none (a scale-up), ranks beyond ``num_ranks`` are
    dropped (a scale-down). ``-1`` in it is an empty slot (vLLM marks a joining rank's slots
    so), which keeps nothing."""
    new = _as_numpy(phy2log, "phy2log", np.int64)
    old = _as_numpy(old_phy2log, "old_phy2log", np.int64)
    squeeze = new.ndim == 1
    if squeeze:
        new, old = new[None], old[None] if old.ndim == 1 else old
    if new.ndim != 2:
        raise ValueError(f"phy2log must have shape [layers, slots], got {new.shape}")
    num_ranks = _as_int(num_ranks, "num_ranks")
    if new.shape[1] % num_ranks:
        raise ValueError(f"slots ({new.shape[1]}) must be divisible by num_ranks ({num_ranks})")
    per_rank = new.shape[1] // num_ranks
    if old.ndim != 2 or old.shape[0] != new.shape[0] or (per_rank and old.shape[1] % per_rank):
        raise ValueError(f"old_phy2log must have the layers of phy2log {new.shape} and a whole "
                         f"number of ranks of {per_rank} slots, got {old.shape}")
    if new.size and new.min() < 0:
        raise ValueError(f"phy2log must hold expert ids >= 0, got {new.min()}")
    if old.size and old.min() < -1:
        raise ValueError(f"old_phy2log must hold expert ids >= 0 (or -1, an empty slot), got "
                         f"{old.min()}")
    refit = old.shape[1] != new.shape[1] or (old.size and old.min() == -1)
    if refit:  # other ranks, or empty slots: the smallest id no new slot holds means "none"
        ids = np.unique(new)
        gaps = np.flatnonzero(ids != np.arange(ids.size))
        fill = int(gaps[0]) if gaps.size else ids.size
        width = old.shape[1]
        old = np.where(old < 0, fill, old)[:, :new.shape[1]]
        if width < new.shape[1]:
            old = np.concatenate([old, np.full((old.shape[0], new.shape[1] - width), fill,
                                               dtype=np.int64)], axis=1)
        old = np.ascontiguousarray(old)
    out = _planner.preserve_slots(new, old, num_ranks)
    if squeeze:
        out = out[0]
    if is_torch(phy2log):
        import torch

        return torch.from_numpy(out).to(phy2log.device)
    return out


class Planner:
    """A background C++ planner thread.

    ``submit(load, old_phy2log=None, **plan_kwargs)`` queues a job and returns a
    ``concurrent.futures.Future`` whose result is a :class:`Plan` (bad input raises at submit,
    as :func:`plan` would; an internal error reaches the future as RuntimeError).
    Jobs run one at a time in submission order on a C++ thread that never takes the GIL; a
    small Python thread waits for results with the GIL released and completes the futures.
    As ``concurrent.futures`` futures do, a job is ``running()`` once the C++ thread took it, and
    ``cancel()`` then returns False (a running plan is not interrupted); a queued job's
    ``cancel()`` removes it. ``close()`` (also on ``with`` exit and at interpreter exit) cancels
    queued jobs (their futures report ``cancelled()``), lets the running one finish, and joins
    both threads. A Planner dropped without ``close()`` behaves as a dropped
    ``ThreadPoolExecutor``: the futures it handed out still complete, then its threads end (the
    collecting thread does not wait). A Planner belongs to the process that made it: using it
    after ``fork()`` raises RuntimeError.
    """

    def __init__(self, threads: int = 1):
        self._threads = _as_int(threads, "threads", maximum=MAX_THREADS)
        self._pid = os.getpid()
        self._worker = _planner.Worker()
        self._futures: dict[int, tuple[concurrent.futures.Future, dict]] = {}
        self._lock = threading.Lock()
        self._closed = False
        # The waiter thread and the futures' callbacks hold the worker, not the Planner. A
        # Planner dropped without close() is collected as an executor is: the futures it handed
        # out still complete, then both threads end (_dropped); close() and interpreter exit
        # cancel what is queued instead (_stop, _stop_all).
        self._state = _State(self._worker, self._futures, self._lock, self._pid)
        self._waiter = threading.Thread(target=_wait_loop, args=(self._state,),
                                        name="eplb-planner-waiter", daemon=True)
        self._state.waiter = self._waiter
        with _LIVE_LOCK:
            _LIVE.add(self._state)
        self._waiter.start()
        self._finalizer = weakref.finalize(self, _dropped, self._state)
        self._finalizer.atexit = False  # (interpreter exit: _stop_all)

    def _check_process(self):
        if os.getpid() != self._pid:
            raise RuntimeError("this eplb_native.Planner was created in another process (before a "
                               "fork); create a new Planner in the child")

    def submit(self, load, old_phy2log=None, *, num_ranks: int, num_replicas: int | None = None,
               num_nodes: int = 1, num_groups: int = 1, policy: str = "balanced",
               preserve_slots: bool = True, min_move_target: float = 0.99,
               transfers: bool = True, distinct_ranks: bool | None = None
               ) -> concurrent.futures.Future:
        """Queues a plan; arguments as :func:`plan` (threads: the Planner's own, given to
        ``Planner(threads=...)``). Bad input raises here at once, nothing queued: every check
        :func:`plan` makes before it plans (shapes, counts, values, the old placement)."""
        self._check_process()
        w, old, num_ranks, num_replicas, num_nodes, num_groups, threads = _prepare(
            load, old_phy2log, num_ranks, num_replicas, num_nodes, num_groups, policy,
            self._threads)
        target = _as_target(min_move_target)
        preserve_slots = check_bool(preserve_slots, "preserve_slots")
        transfers = check_bool(transfers, "transfers")
        distinct = _as_distinct(distinct_ranks)
        fut = _PlanFuture()
        fut._pid = self._pid
        worker = self._worker
        with self._lock:
            if self._closed:
                raise RuntimeError("Planner is closed")
            job = worker.submit(w, old, num_replicas, num_ranks, num_nodes, num_groups,
                                POLICIES[policy], preserve_slots, threads, target, transfers,
                                **distinct)
            fut._take_back = lambda job=job: worker.cancel(job)
            self._futures[job] = (fut, {"policy": policy, "num_ranks": num_ranks})
        return fut

    def close(self) -> None:
        """Cancels queued jobs, finishes the running one, joins the threads (from a future's
        done-callback, which runs on the waiter thread, all but that one). Idempotent; a second
        close() racing the first returns once the threads are joined too."""
        with self._lock:
            self._closed = True
        self._finalizer.detach()
        _stop(self._state)

    def __enter__(self) -> Planner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PlanFuture(concurrent.futures.Future):
    """A Future whose cancel() asks the C++ thread first: False once that took the job (the
    base class said True until the waiter thread heard the job had started, and the plan then
    ran to its end anyway: review 18)."""

    _take_back = None  # () -> bool: the job out of the worker's queue, False once it runs
    _pid = None  # the process whose Planner completes it

    def cancel(self) -> bool:
        self._check_process()
        take_back = self._take_back
        if take_back is not None and not self.done() and not take_back():
            return False
        return super().cancel()

    def result(self, timeout=None):
        self._check_process()
        return super().result(timeout)

    def exception(self, timeout=None):
        self._check_process()
        return super().exception(timeout)

    def _check_process(self) -> None:
        # (a child of fork() waiting on it waited for ever: no thread of its own completes it)
        if self._pid is not None and os.getpid() != self._pid and not self.done():
            raise RuntimeError("this plan's Planner runs in another process (this one was "
                               "forked from it after the submit): its result never comes here")


class _State:
    """What a Planner's waiter thread and finalizers share (never the Planner itself)."""

    def __init__(self, worker, futures: dict, lock: threading.Lock, pid: int):
        self.worker = worker
        self.futures = futures
        self.lock = lock
        self.pid = pid
        self.waiter: threading.Thread | None = None
        self.dropped = False  # the Planner was collected: close the worker once drained


_LIVE: set[_State] = set()  # states whose waiter has not ended (for interpreter exit)
_LIVE_LOCK = threading.Lock()


def _wait_loop(state: _State) -> None:
    """The waiter thread: completes each job's future until the worker is closed and drained,
    then joins the worker's thread (the one place that joins it)."""
    worker, futures, lock = state.worker, state.futures, state.lock
    try:
        while True:
            item = worker.wait_next()
            if item is None:
                break
            try:
                _complete(item, futures, lock)
            except Exception:  # noqa: BLE001  (one misused future must not stall the others)
                logger.exception("eplb_native.Planner: completing a future failed (was it "
                                 "completed or cancelled from outside?); the others go on")
            with lock:
                drained = state.dropped and not futures
            if drained:
                worker.close()  # nothing left that anyone waits for: end both threads
        worker.join()
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(state)


def _complete(item, futures: dict, lock: threading.Lock) -> None:
    job, status, payload = item
    with lock:
        if status == "started":  # running from now on: cancel() says False, running() True
            fut, _ = futures.get(job, (None, None))
            if fut is None:
                return
            # cancelled just before it started (notified here), or completed by its holder:
            # its result is dropped
            if ((fut.done() and not fut.cancelled())
                    or not fut.set_running_or_notify_cancel()):
                futures.pop(job, None)
            return
        fut, meta = futures.pop(job, (None, None))
    if fut is None or (fut.done() and not fut.cancelled()):
        return  # (completed by its holder: nothing to report to it)
    if status == "cancelled":  # never started: cancelled by the user or by close()
        # (the base class's cancel: the job is out of the queue already, which _PlanFuture's
        # would take for "running")
        concurrent.futures.Future.cancel(fut)
        fut.set_running_or_notify_cancel()  # notifies wait() / as_completed()
        return
    if status == "ok":
        fut.set_result(Plan(**meta, **payload))
    elif status == "invalid":
        fut.set_exception(ValueError(payload))
    else:
        fut.set_exception(RuntimeError(payload))


def _dropped(state: _State) -> None:
    """A Planner collected without close(): its futures still complete (the worker goes on
    with what is queued), then the waiter closes the worker. Never blocks the collecting
    thread, and takes no lock: the cyclic gc may run it on any thread, the waiter's too while
    that holds the lock (a non-reentrant lock deadlocked it there). Without one it is still
    exact: the waiter pops a finished job before it reads ``dropped``, and this sets
    ``dropped`` before it reads the futures, so one of the two sees the other and closes."""
    if os.getpid() != state.pid:
        return  # the threads live in the parent
    state.dropped = True
    if not state.futures:
        state.worker.close()  # (idempotent: the waiter may close it too)


def _stop(state: _State) -> None:
    """close() and interpreter exit: cancels queued jobs, lets the running one finish, and
    joins both threads (the waiter joins the worker's), except the waiter itself when called
    on it (a done-callback calling close())."""
    if os.getpid() != state.pid:
        return  # the threads live in the parent; nothing of ours to join here
    state.worker.close()
    if threading.current_thread() is state.waiter:
        state.worker.join()
    elif state.waiter is not None:
        state.waiter.join()


@atexit.register
def _stop_all() -> None:
    """Interpreter exit: close every worker still running (dropped Planners' included), so no
    C++ thread outlives the interpreter."""
    with _LIVE_LOCK:
        states = list(_LIVE)
    for state in states:
        _stop(state)
