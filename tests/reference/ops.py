"""NumPy references of the hot-path ops (contract: python/eplb_native/ops.py).

Written from the contract, element-wise in NumPy, int64 throughout. Each returns new arrays;
nothing is updated in place.
"""

from __future__ import annotations

import numpy as np


def ids_per_token(shape) -> int:
    """k: ids per token (last dim of a >= 2-D topk_ids, else 1)."""
    return max(shape[-1], 1) if len(shape) >= 2 else 1


def map_and_record(topk_ids, log2phy, logcnt, load, record, num_valid_tokens=None,
                   mode="spread"):
    """Returns (physical ids shaped like topk_ids, int64; new load, int64)."""
    ids = np.asarray(topk_ids, dtype=np.int64)
    k = ids_per_token(ids.shape)
    flat = ids.reshape(-1)
    table = np.asarray(log2phy, dtype=np.int64)
    E = table.shape[0]
    in_range = (flat >= 0) & (flat < E)
    e = np.where(in_range, flat, 0)
    if E == 0:
        slots = np.full(flat.size, -1, dtype=np.int64)
    elif mode == "rank_local":
        slots = table[e]
    else:
        M = table.shape[1]
        c = np.clip(np.asarray(logcnt, dtype=np.int64), 1, M)[e]
        token = np.arange(flat.size, dtype=np.int64) // k
        slots = table[e, token % c]
    slots = np.where(in_range, slots, -1)
    new_load = np.asarray(load, dtype=np.int64) + _counts(slots, k, np.size(load), record,
                                                          num_valid_tokens)
    return slots.reshape(ids.shape), new_load


def record_topk(load, topk_ids, record, num_valid_tokens=None):
    """Returns the new load (int64)."""
    ids = np.asarray(topk_ids, dtype=np.int64)
    k = ids_per_token(ids.shape)
    return np.asarray(load, dtype=np.int64) + _counts(ids.reshape(-1), k, np.size(load), record,
                                                      num_valid_tokens)


def record_counts(load, expert_tokens, group_list_type=1, offset=0):
    """Returns the new load (int64)."""
    load = np.array(load, dtype=np.int64)
    c = np.asarray(expert_tokens, dtype=np.int64)
    per_expert = c if group_list_type == 1 else c - np.concatenate(([0], c[:-1]))
    load[offset : offset + c.size] += per_expert
    return load


def _counts(slots, k, P, record, num_valid_tokens):
    """Per-slot count of the ids that are recorded: record set, token below num_valid_tokens,
    slot in [0, P)."""
    if not record:
        return np.zeros(P, dtype=np.int64)
    token = np.arange(slots.size, dtype=np.int64) // k
    keep = (slots >= 0) & (slots < P)
    if num_valid_tokens is not None:
        keep &= token < int(num_valid_tokens)
    return np.bincount(slots[keep], minlength=P).astype(np.int64)
