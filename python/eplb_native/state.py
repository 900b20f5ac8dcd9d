"""Placement state: the pure functions that turn a ``phy2log`` into the tensors routing reads.

Glossary (DESIGN.md): a *logical* expert is an expert of the model (E per layer); a *physical*
expert (slot) is one copy of its weights on one rank (P = E + redundant per layer). Rank r owns
global slots ``r*S .. r*S+S-1`` (S = P / num_ranks), its *local* slots 0..S-1.

Per layer (these functions work on one layer; stack them for [L, ...]):

- ``phy2log`` [P] int64: logical id held by each slot, e.g. ``[0, 1, 2, 0]`` (E=3, P=4).
- ``log2phy`` [E, M] int64: slots of each logical expert in increasing order, -1 padded;
  M = P - E + 1 (the most replicas any expert can have), so the tensor never changes shape.
  For the example: ``[[0, 3], [1, -1], [2, -1]]``. With ``rotate``, rank r's row of an expert
  with c replicas is rotated left by ``r % c`` (rank 1: ``[[3, 0], [1, -1], [2, -1]]``): the
  spread kernels send a call's token t to column ``t % c`` and every call starts at t = 0, so
  with one table everywhere, calls of fewer tokens than replicas (decode) send an expert's
  tokens to its lowest slots from every rank; rotated, ranks start on different replicas
  (vllm-ascend offsets the replica by rank too). Only where each rank maps its own tokens (an
  all-to-all dispatch): ranks that map the same tokens (all-reduce EP, a TP group) must pick
  the same slots, so their tables must be equal.
- ``logcnt`` [E] int64: replica count of each logical expert, ``[2, 1, 1]``.
- ``local_expert_map`` [E] int32 (vLLM's / vllm-ascend's ``expert_map``): the local slot of
  each logical expert on this rank, -1 if the rank holds none; with several local replicas, the
  first. For rank 1 of 2 in the example (slots 2, 3): ``[1, -1, 0]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from ._util import check_bool, validate_phy2log  # noqa: F401  (validate_phy2log: its API)


def max_replicas(num_logical: int, num_slots: int) -> int:
    """M, the column count of ``log2phy``: the most replicas one expert can have."""
    return num_slots - num_logical + 1


def placement_tensors(phy2log, num_logical: int, num_ranks: int, rank: int, *,
                      rotate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``phy2log`` [P] -> (``log2phy`` [E, M] int64, ``logcnt`` [E] int64,
    ``local_expert_map`` [E] int32) for ``rank``, as new CPU tensors (see the module docstring;
    ``rotate``: each row starts at replica ``rank % count``).
    """
    rotate = check_bool(rotate, "rotate")
    p2l = validate_phy2log(phy2log, num_logical, num_ranks)
    if p2l.ndim != 1:
        raise ValueError(f"phy2log must have shape [slots] here, got {p2l.shape}")
    if isinstance(rank, bool | np.bool_) or not isinstance(rank, int | np.integer) or not (
            0 <= rank < num_ranks):
        raise ValueError(f"rank must be an int in [0, {num_ranks}), got {rank!r}")
    num_slots = p2l.size
    per_rank = num_slots // num_ranks
    m = max_replicas(num_logical, num_slots)
    log2phy = np.full((num_logical, m), -1, dtype=np.int64)
    logcnt = np.zeros(num_logical, dtype=np.int64)
    for slot, e in enumerate(p2l):
        log2phy[e, logcnt[e]] = slot
        logcnt[e] += 1
    if rotate:  # rank r starts each expert's row at replica r % c (see the module docstring)
        cols = np.arange(m)
        rotated = (cols[None, :] + rank) % logcnt[:, None]
        log2phy = np.where(cols[None, :] < logcnt[:, None],
                           np.take_along_axis(log2phy, rotated, axis=1), -1)
    local = np.full(num_logical, -1, dtype=np.int32)
    mine = p2l[rank * per_rank:(rank + 1) * per_rank]
    for s in range(per_rank - 1, -1, -1):  # backwards so the first local replica wins
        local[mine[s]] = s
    import torch  # (here: the CLI's planning, which uses the rest of this module, loads no torch)

    return torch.from_numpy(log2phy), torch.from_numpy(logcnt), torch.from_numpy(local)


#: default_placement's layouts: what a server holds before any expert map or EPLB plan.
DEFAULT_LAYOUTS = ("vllm-ascend", "vllm")


def default_placement(num_logical: int, num_ranks: int, num_redundant: int = 0,
                      num_layers: int | None = None, *, layout: str = "vllm-ascend"
                      ) -> np.ndarray:
    """A server's default placement, ``phy2log`` [P] with P = E + num_redundant, or [L, P]
    (the same row for every layer) when ``num_layers`` = L is given.

    ``layout``:

    - ``"vllm-ascend"`` (vllm-ascend's releases up to 0.23, and its layout with shared experts
      mixed in): experts are cut into ``num_ranks`` contiguous groups (the first
      ``E % num_ranks`` groups one longer); redundant copy i goes to rank
      ``num_ranks - 1 - (i % num_ranks)`` and holds the expert after the last one that rank
      holds (mod E); a rank with no expert (E < R) starts from expert ``num_ranks - r`` (mod E:
      vllm-ascend's own rule writes that id unreduced, past the last expert when E <= R - r).
    - ``"vllm"`` (vLLM's EPLB state, and vllm-ascend's from 0.24.0rc1 on without shared
      experts mixed in): slots
      in order hold experts 0 .. E-1, then redundant copy i holds expert i mod E; rank r owns
      slots r*S .. r*S+S-1.

    Every rank must end with the same slot count, so ``(E + num_redundant) % num_ranks == 0``.
    """
    if layout not in DEFAULT_LAYOUTS:
        raise ValueError(f"layout must be one of {list(DEFAULT_LAYOUTS)}, got {layout!r}")
    checks = [("num_logical_experts", num_logical, 1), ("num_ranks", num_ranks, 1),
              ("num_redundant_experts", num_redundant, 0)]
    if num_layers is not None:
        checks.append(("num_layers", num_layers, 1))
    for key, v, lo in checks:
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
            raise ValueError(f"{key} must be an int >= {lo}, got {v!r}")
    if (num_logical + num_redundant) % num_ranks:
        raise ValueError(f"num_logical_experts + num_redundant_experts ({num_logical} + "
                         f"{num_redundant}) must be divisible by num_ranks ({num_ranks})")
    if layout == "vllm":
        row = np.concatenate([np.arange(num_logical, dtype=np.int64),
                              np.arange(num_redundant, dtype=np.int64) % num_logical])
        return row if num_layers is None else np.tile(row, (num_layers, 1))
    # Rank r gets the copies i with i % R == R - 1 - r: that many experts following its last
    # one (mod E); a rank with no expert (E < R) starts from expert (R - r) % E (its first i
    # is R - 1 - r, and vllm-ascend writes i % R + 1 there).
    groups = np.array_split(np.arange(num_logical, dtype=np.int64), num_ranks)
    rows = []
    for r, g in enumerate(groups):
        k = num_redundant // num_ranks + (1 if (num_ranks - 1 - r) < num_redundant % num_ranks
                                          else 0)
        start = g[-1] + 1 if len(g) else num_ranks - r
        rows.append(np.concatenate([g, (start + np.arange(k, dtype=np.int64)) % num_logical]))
    sizes = {len(g) for g in rows}
    if len(sizes) != 1:
        raise ValueError(f"the default placement of {num_logical} experts and {num_redundant} "
                         f"redundant ones over {num_ranks} ranks is uneven {sorted(sizes)}; "
                         "give an expert_map_path")
    row = np.concatenate(rows)
    return row if num_layers is None else np.tile(row, (num_layers, 1))
