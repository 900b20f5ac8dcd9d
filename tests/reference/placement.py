"""Reference placement code for the planner tests: plain numpy, written for clarity, not speed.

- :func:`deepseek` — DeepSeek EPLB's algorithm from its description (groups -> nodes, replicate
  inside each node, pack replicas onto ranks), lowest index first on every tie.
- :func:`rank_loads`, :func:`check_placement`, :func:`check_hierarchical` — what every placement
  must satisfy.
- :func:`preserve_slots`, :func:`apply_transfers`, :func:`optimum` (brute force, tiny shapes).
- :func:`paired_max`, :func:`paired_optimum` — two slots per rank, where the best packing of given
  replica counts is known (the i-th lightest replica with the i-th heaviest).
"""

from __future__ import annotations

import itertools

import numpy as np


def _pack(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Items heaviest first (lower index first on ties), each into the lightest pack (lowest
    index on ties) that has fewer than len(weight) / num_packs items; with one item per pack,
    item i goes to pack i.
    Returns (pack [n], position in pack [n])."""
    n = len(weight)
    per_pack = n // num_packs
    pack = np.zeros(n, np.int64)
    pos = np.zeros(n, np.int64)
    if per_pack == 1:  # DeepSeek keeps the item order when every pack takes one item
        return np.arange(n, dtype=np.int64), pos
    totals = [0.0] * num_packs
    sizes = [0] * num_packs
    order = sorted(range(n), key=lambda i: (-weight[i], i))
    for i in order:
        open_packs = [p for p in range(num_packs) if sizes[p] < per_pack]
        p = min(open_packs, key=lambda q: (totals[q], q))
        pack[i] = p
        pos[i] = sizes[p]
        sizes[p] += 1
        totals[p] += weight[i]
    return pack, pos


def _replicate(weight: np.ndarray, num_phy: int) -> tuple[list[int], list[int], np.ndarray]:
    """Each expert once, then every extra slot to the expert with the largest load per replica
    (lowest index on ties). Returns (phy2log, replica ordinal of each slot, logcnt)."""
    n = len(weight)
    phy2log = list(range(n))
    ordinal = [0] * n
    cnt = np.ones(n, np.int64)
    for _ in range(num_phy - n):
        per_replica = [weight[e] / cnt[e] for e in range(n)]
        best = max(range(n), key=lambda e: (per_replica[e], -e))
        phy2log.append(best)
        ordinal.append(int(cnt[best]))
        cnt[best] += 1
    return phy2log, ordinal, cnt


def deepseek(weight, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int):
    """DeepSeek EPLB: hierarchical when num_groups % num_nodes == 0 (one node included: its
    experts are then ordered by group load), else global (one group, one node). weight [L, E] -> (phy2log [L, P], log2phy [L, E, P - E + 1], logcnt
    [L, E]); log2phy columns are replica ordinals, -1 padded."""
    weight = np.asarray(weight, np.float64)
    num_layers, num_experts = weight.shape
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    group_size = num_experts // num_groups
    per_node_groups = num_groups // num_nodes
    log_per_node = num_experts // num_nodes
    phy_per_node = num_replicas // num_nodes
    ranks_per_node = num_ranks // num_nodes
    slots = num_replicas // num_ranks
    phy2log = np.full((num_layers, num_replicas), -1, np.int64)
    ordinal = np.zeros((num_layers, num_replicas), np.int64)
    for layer in range(num_layers):
        w = weight[layer]
        group_load = w.reshape(num_groups, group_size).sum(1)
        gpack, gpos = _pack(group_load, num_nodes)
        # node-local order: groups by their position in the node, experts by id
        local2log = np.zeros(num_experts, np.int64)
        for g in range(num_groups):
            base = (gpack[g] * per_node_groups + gpos[g]) * group_size
            local2log[base:base + group_size] = np.arange(g * group_size, (g + 1) * group_size)
        for node in range(num_nodes):
            experts = local2log[node * log_per_node:(node + 1) * log_per_node]
            node_phy, node_ord, cnt = _replicate(w[experts], phy_per_node)
            per_replica = np.array([w[experts[m]] / cnt[m] for m in node_phy])
            rpack, rpos = _pack(per_replica, ranks_per_node)
            for j in range(phy_per_node):
                slot = node * phy_per_node + rpack[j] * slots + rpos[j]
                phy2log[layer, slot] = experts[node_phy[j]]
                ordinal[layer, slot] = node_ord[j]
    logcnt = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    # DeepSeek's width: num_redundant_experts + 1 columns, whatever the largest count
    log2phy = np.full((num_layers, num_experts, num_replicas - num_experts + 1), -1, np.int64)
    for layer in range(num_layers):
        for p in range(num_replicas):
            log2phy[layer, phy2log[layer, p], ordinal[layer, p]] = p
    return phy2log, log2phy, logcnt


def rank_loads(load, phy2log, num_ranks: int) -> np.ndarray:
    """[L, R]: sum over each rank's slots of load[logical] / logcnt[logical]."""
    load = np.asarray(load, np.float64)
    num_layers, num_slots = phy2log.shape
    out = np.zeros((num_layers, num_ranks))
    slots = num_slots // num_ranks
    for layer in range(num_layers):
        cnt = np.bincount(phy2log[layer], minlength=load.shape[1])
        per_slot = load[layer, phy2log[layer]] / cnt[phy2log[layer]]
        out[layer] = per_slot.reshape(num_ranks, slots).sum(1)
    return out


def duplicates(phy2log, num_ranks: int) -> np.ndarray:
    """[L]: replicas beyond the first of an expert on one rank (slots holding the same weights
    as another slot of their rank), summed over ranks."""
    phy2log = np.asarray(phy2log)
    per_rank = np.sort(phy2log.reshape(phy2log.shape[0], num_ranks, -1), axis=-1)
    return (per_rank[..., 1:] == per_rank[..., :-1]).sum((1, 2))


def check_placement(phy2log, log2phy, logcnt, num_experts: int, num_ranks: int) -> None:
    """Asserts the invariants of a placement (slot i of rank r is r * S + i)."""
    num_layers, num_slots = phy2log.shape
    assert num_slots % num_ranks == 0
    assert phy2log.min() >= 0 and phy2log.max() < num_experts
    for layer in range(num_layers):
        cnt = np.bincount(phy2log[layer], minlength=num_experts)
        assert (cnt >= 1).all(), "every logical expert needs a slot"
        np.testing.assert_array_equal(logcnt[layer], cnt)
        for e in range(num_experts):
            row = log2phy[layer, e]
            assert (row[cnt[e]:] == -1).all()
            slots = row[:cnt[e]]
            assert len(set(slots.tolist())) == cnt[e]
            assert (phy2log[layer, slots] == e).all()


def check_hierarchical(phy2log, num_experts: int, num_groups: int, num_nodes: int) -> None:
    """Asserts DeepSeek's node constraint: each group (and all replicas of its experts) sits on
    one node, num_groups / num_nodes groups per node."""
    num_layers, num_slots = phy2log.shape
    per_node = num_slots // num_nodes
    group_size = num_experts // num_groups
    for layer in range(num_layers):
        nodes_of_group: dict[int, set[int]] = {}
        for p, e in enumerate(phy2log[layer]):
            nodes_of_group.setdefault(int(e) // group_size, set()).add(p // per_node)
        assert all(len(v) == 1 for v in nodes_of_group.values())
        groups_per_node = np.bincount([next(iter(v)) for v in nodes_of_group.values()],
                                      minlength=num_nodes)
        assert (groups_per_node == num_groups // num_nodes).all()


def preserve_slots(phy2log, old_phy2log, num_ranks: int) -> np.ndarray:
    """vLLM's preserve_intragpu_slots semantics: per rank, each old slot whose expert is still
    wanted on the rank keeps it (first match); the other new experts fill the remaining slots in
    their new order."""
    new = np.array(phy2log, np.int64)
    out = new.copy()
    slots = new.shape[1] // num_ranks
    for layer in range(new.shape[0]):
        for r in range(num_ranks):
            sl = slice(r * slots, (r + 1) * slots)
            pending = list(new[layer, sl])
            old = list(old_phy2log[layer, sl])
            kept = [None] * slots
            for j, e in enumerate(old):
                if e in pending:
                    pending[pending.index(e)] = None
                    kept[j] = e
            rest = iter(e for e in pending if e is not None)
            out[layer, sl] = [k if k is not None else next(rest) for k in kept]
    return out


def apply_transfers(old_phy2log, transfers) -> np.ndarray:
    """Applies a transfer plan (rows as TRANSFER_COLUMNS, in order) to old_phy2log; wire and
    local rows (kind 0, 1) read the old placement, a dup row (kind 2) the slot an earlier row
    filled. Asserts every source slot holds the expert it sends."""
    old = np.asarray(old_phy2log)
    new = old.copy()
    filled = set()
    for layer, _batch, logical, _src_rank, src_slot, _dst_rank, dst_slot, kind in transfers:
        if kind == 2:
            assert (layer, src_slot) in filled and new[layer, src_slot] == logical
        else:
            assert old[layer, src_slot] == logical
        new[layer, dst_slot] = logical
        filled.add((layer, dst_slot))
    return new


def optimum(load, num_replicas: int, num_ranks: int, distinct: bool = False) -> float:
    """Smallest max rank load over every placement (global topology), by brute force; with
    ``distinct``, over those where no rank holds an expert twice. Only for tiny shapes (E ** P
    placements)."""
    load = np.asarray(load, np.float64)
    num_experts = len(load)
    slots = num_replicas // num_ranks
    best = np.inf
    for phy in itertools.product(range(num_experts), repeat=num_replicas):
        cnt = np.bincount(phy, minlength=num_experts)
        if (cnt == 0).any():
            continue
        if distinct and any(len(set(phy[r * slots:(r + 1) * slots])) < slots
                            for r in range(num_ranks)):
            continue
        per_slot = load[list(phy)] / cnt[list(phy)]
        best = min(best, per_slot.reshape(num_ranks, slots).sum(1).max())
    return float(best)


def paired_max(load, logcnt, num_ranks: int) -> tuple[float, int, set[int]]:
    """Two slots per rank: the max rank load of the best packing of these replica counts (the
    replicas sorted, the i-th lightest on one rank with the i-th heaviest), the number of ranks
    at it (within a relative 1e-12) and the logical experts on those ranks."""
    load = np.asarray(load, np.float64)
    logcnt = np.asarray(logcnt, np.int64)
    assert logcnt.sum() == 2 * num_ranks and (logcnt >= 1).all()
    per = np.repeat(load / logcnt, logcnt)
    expert = np.repeat(np.arange(len(load)), logcnt)
    order = np.argsort(per, kind="stable")
    per, expert = per[order], expert[order]
    sums = per[:num_ranks] + per[::-1][:num_ranks]
    top = float(sums.max())
    at = sums >= top * (1 - 1e-12)
    return top, int(at.sum()), {int(e) for e in expert[:num_ranks][at]} | {
        int(e) for e in expert[::-1][:num_ranks][at]}


def paired_optimum(load, num_ranks: int) -> float:
    """Two slots per rank: the smallest max rank load over every placement, by enumerating the
    replica counts (each packed by :func:`paired_max`). Small shapes only (C(2R - 1, E - 1)
    count vectors)."""
    load = np.asarray(load, np.float64)
    num_experts, num_slots = len(load), 2 * num_ranks
    best = np.inf
    for cuts in itertools.combinations(range(1, num_slots), num_experts - 1):
        bounds = (0, *cuts, num_slots)
        cnt = np.diff(bounds)
        best = min(best, paired_max(load, cnt, num_ranks)[0])
    return float(best)


def default_placement(num_logical: int, num_ranks: int, num_redundant: int) -> np.ndarray | None:
    """vllm-ascend's default placement as its rule reads (its generate_global_placement without
    shared experts, releases up to 0.23; eplb_native.state.default_placement computes it
    without the per-copy loop): experts in num_ranks contiguous groups, redundant copy i to
    group -(i % num_ranks + 1), holding the expert after that group's last one (mod E), or, in
    an empty group, i % num_ranks + 1 (taken mod E here: vllm-ascend writes it unreduced).
    None when the ranks end uneven."""
    groups = [list(g) for g in np.array_split(np.arange(num_logical), num_ranks)]
    for i in range(num_redundant):
        j = i % num_ranks + 1
        g = groups[-j]
        g.append((g[-1] + 1) % num_logical if g else j % num_logical)
    if len({len(g) for g in groups}) != 1:
        return None
    return np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
