"""Built-in adapter for the fused layout of vLLM's FusedMoE (and layers built like it).

Such a layer holds ``w13_weight`` [S, 2I, H] and ``w2_weight`` [S, H, I] stacked per local
expert, plus optional per-expert scales, biases and quantization factors (every parameter or
buffer with S rows moves with its expert, as vLLM's own EPLB moves them), and an
``expert_map`` (int32 or int64, -1 where the rank holds none). What the map is indexed by
decides what a move rewrites:

- Without vLLM's EPLB maps, ``expert_map`` [E] is logical expert -> local slot: rewritten at
  every placement switch (the layer's routing follows it).
- With them (``logical_to_physical_map`` [E, M], ``logical_replica_count`` [E] on the layer,
  vLLM's layout before its maps moved into ``layer.eplb_state``), the router picks a physical
  slot of the logical expert from those maps and ``expert_map`` [P] takes the physical slot to
  the local row. Slot p lives on rank p // S at row p % S, which that fixed map already says:
  the maps are rewritten, ``expert_map`` is checked and left alone, and the number of logical
  experts is ``logical_num_experts`` (vLLM's ``global_num_experts`` counts the slots).

The adapter reuses the placement tensors the layer already has under vLLM's names
(``logical_to_physical_map``, ``logical_replica_count``, ``expert_load_view`` [P]) when their
shapes fit, and registers the missing ones as buffers ``eplb_phy2log``, ``eplb_log2phy``,
``eplb_logcnt``, ``eplb_load``, ``eplb_record`` on the module, which the layer's routing must
then read (the protocol in ``adapters/base.py``).

The initial ``phy2log`` is the layer's ``eplb_phy2log`` buffer if it has one, else the one its
``logical_to_physical_map`` describes, else vLLM's linear placement (rank r holds experts
r*S .. r*S+S-1, no redundancy). The layer's maps must already say that placement (nothing is
rewritten while the layer is adapted, so a refused attach leaves it as it was).

Refused, naming the layer: layers whose routing reads maps this adapter does not drive
(vllm-ascend's ``log2phy`` / ``ascend_expert_map`` and per-expert weight lists, vLLM's
``eplb_state``, recent vLLM's ``RoutedExperts`` / layers with an ``expert_map_manager``: use
that engine's own EPLB with eplb_native's policy, docs/integrations.md),
per-expert tensors kept as plain attributes (a move would leave another expert's values in
the slot), and an EP rank or size of the layer's own that differs from attach's group.
"""

from __future__ import annotations

import torch

from .. import state
from .base import AdapterError, MoELayerAdapter, register_adapter

#: Never moved as expert rows: the layer's placement tensors, and vLLM's routing bias per
#: logical expert (vLLM's own EPLB leaves it too).
_MAPS = frozenset({"expert_map", "_expert_map", "logical_to_physical_map",
                   "logical_replica_count", "expert_load_view", "e_score_correction_bias"})
#: Attributes of layers whose routing reads maps this adapter does not drive.
_FOREIGN_ROUTING = {
    "log2phy": "vllm-ascend's routing maps the top-k ids through layer.log2phy",
    "_ascend_expert_map": "vllm-ascend's kernels take layer.ascend_expert_map",
    "w13_weight_list": "vllm-ascend's kernels read per-expert weight lists",
    "eplb_state": "vLLM keeps this layer's EPLB maps in layer.eplb_state",
    # (recent vLLM: the weights sit on a RoutedExperts child of a MoERunner, whose router maps
    # and counts the top-k ids; the child has no eplb_state of its own)
    "expert_map_manager": "a vLLM layer with an ExpertMapManager is routed by vLLM's own router "
                          "and EPLB state, whose kernels never call eplb_native's ops (no load "
                          "would be counted)",
}


def _tensor(module, name):
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) else None


def _buffer(module, name, value: torch.Tensor, missing: dict) -> torch.Tensor:
    """The module's buffer ``name``, else ``value``, noted in ``missing`` to be registered once
    the adapter is known to be valid (a refused layer is left as it was)."""
    t = _tensor(module, name)
    if t is None:
        missing[name] = t = value
    return t


def _int_attr(module, *names):
    for name in names:
        v = getattr(module, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _expert_rows(module, where: str, s: int) -> list[torch.Tensor]:
    """Every parameter / buffer with S rows but the maps (a broadcast view, stride 0 along the
    experts, holds one value for all of them and stays); refuses per-expert tensors kept as
    plain attributes, which no move would carry."""
    rows = []
    for pname, t in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)):
        if pname in _MAPS or pname.startswith("eplb_") or t.dim() < 1 or t.shape[0] != s:
            continue
        if t.stride(0) == 0:
            continue
        rows.append(t.data if isinstance(t, torch.nn.Parameter) else t)
    plain = sorted(k for k, v in vars(module).items()
                   if isinstance(v, torch.Tensor) and k not in _MAPS and not k.startswith("eplb_")
                   and v.dim() >= 1 and v.shape[0] == s and v.stride(0) != 0)
    if plain:
        raise AdapterError(f"{where}: per-expert tensors {plain} are plain attributes, not "
                           "parameters or buffers: a move would leave another expert's values "
                           "in the slot (register them as buffers, or give the layer an "
                           "eplb_adapter)")
    return rows


def _from_l2p(l2p: torch.Tensor, num_slots: int, where: str) -> torch.Tensor:
    """phy2log [P] of a logical_to_physical_map [E, M] (-1 padded): each slot once."""
    p2l = torch.full((num_slots,), -1, dtype=torch.int64)
    for e, row in enumerate(l2p.detach().cpu().to(torch.int64).tolist()):
        for p in row:
            if p < 0:
                continue
            if p >= num_slots or p2l[p] >= 0:
                raise AdapterError(f"{where}: logical_to_physical_map names slot {p} twice or "
                                   f"out of [0, {num_slots})")
            p2l[p] = e
    if (p2l < 0).any():
        raise AdapterError(f"{where}: logical_to_physical_map leaves slots "
                           f"{(p2l < 0).nonzero().view(-1).tolist()} without an expert")
    return p2l


@register_adapter
def fused_moe_adapter(name: str, module: torch.nn.Module, ep_rank: int, ep_size: int
                      ) -> MoELayerAdapter | None:
    """Adapts a module with ``w13_weight`` / ``w2_weight``; None for any other module."""
    w13, w2 = _tensor(module, "w13_weight"), _tensor(module, "w2_weight")
    if w13 is None or w2 is None:
        return None
    where = f"MoE layer {name!r} ({type(module).__name__})"
    for attr, why in _FOREIGN_ROUTING.items():
        if getattr(module, attr, None) is not None:
            raise AdapterError(f"{where}: {why}, which this adapter does not drive (a move "
                               "would leave routing on the old placement): use that engine's "
                               "EPLB with eplb_native's policy (docs/integrations.md), or give "
                               "the layer an eplb_adapter")
    own = (_int_attr(module, "ep_rank"), _int_attr(module, "ep_size"))
    if None not in own and own != (ep_rank, ep_size):
        raise AdapterError(f"{where}: the layer is EP rank {own[0]} of {own[1]}, attach's group "
                           f"gives {ep_rank} of {ep_size}: pass the layer's EP group")
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
        raise AdapterError(f"{where}: w13_weight / w2_weight must be [S, 2I, H] / [S, H, I] with "
                           f"the same S, got {list(w13.shape)} / {list(w2.shape)}")
    s = w13.shape[0]
    num_slots = s * ep_size
    weights = _expert_rows(module, where, s)
    expert_map = _tensor(module, "expert_map")
    if expert_map is None:
        expert_map = _tensor(module, "_expert_map")
    l2p = _tensor(module, "logical_to_physical_map")
    physical = l2p is not None  # vLLM's EPLB routing: expert_map is indexed by slot
    if physical:
        num_logical = _int_attr(module, "logical_num_experts")
        if num_logical is None:
            num_logical = _int_attr(getattr(module, "moe_config", None), "num_logical_experts")
        if num_logical is None and l2p.dim() == 2:
            num_logical = l2p.shape[0]
    else:
        num_logical = _int_attr(module, "logical_num_experts", "global_num_experts")
        if num_logical is None and expert_map is not None:
            num_logical = expert_map.numel()
    if num_logical is None:
        raise AdapterError(f"{where}: cannot tell the number of logical experts (no "
                           "logical_num_experts / global_num_experts and no expert_map)")
    if expert_map is not None:
        size = num_slots if physical else num_logical
        if list(expert_map.shape) != [size] or expert_map.dtype not in (torch.int32,
                                                                         torch.int64):
            raise AdapterError(f"{where}: expert_map must be [{'P' if physical else 'E'}="
                               f"{size}] int32/int64, got {list(expert_map.shape)} "
                               f"{expert_map.dtype}")
    dev = w13.device
    missing: dict[str, torch.Tensor] = {}  # buffers to register once the adapter is valid
    p2l = _tensor(module, "eplb_phy2log")
    if p2l is None and physical:
        if l2p.dim() != 2 or l2p.shape[0] != num_logical:
            raise AdapterError(f"{where}: logical_to_physical_map must be [E={num_logical}, M], "
                               f"got {list(l2p.shape)}")
        p2l = _buffer(module, "eplb_phy2log", _from_l2p(l2p, num_slots, where).to(dev), missing)
    elif p2l is None:
        if num_slots != num_logical:
            raise AdapterError(f"{where}: {s} local experts x {ep_size} ranks != {num_logical} "
                               "logical experts; with redundant experts the layer must hold an "
                               "eplb_phy2log [P] buffer or vLLM's logical_to_physical_map")
        p2l = _buffer(module, "eplb_phy2log",
                      torch.arange(num_slots, dtype=torch.int64, device=dev), missing)
    if p2l.numel() != num_slots:
        raise AdapterError(f"{where}: its placement has {p2l.numel()} slots, the weights "
                           f"{s} x {ep_size} ranks (S={s})")
    # One table on every rank (rotate_replicas False): the adapter cannot tell whether the
    # engine maps each rank's own tokens. vLLM's use_all2all_kernels is no such sign: its naive
    # and all-gather / reduce-scatter DP + EP paths map the gathered tokens on every rank and
    # sum the results, where tables differing by rank would compute a (token, choice) twice or
    # not at all (review).
    log2phy, logcnt, local = state.placement_tensors(p2l.cpu(), num_logical, ep_size, ep_rank)

    # The layer's own maps must already say this placement: adapting it rewrites none of them.
    def differs(t, want, rows_as_sets=False):
        have = t.detach().cpu().to(torch.int64)
        if rows_as_sets:  # (replica order within a row is free: replicas hold the same rows)
            have, want = have.sort(dim=1).values, want.sort(dim=1).values
        return not torch.equal(have, want.to(torch.int64))

    if expert_map is not None:
        if physical:  # slot p on rank p // S at row p % S, fixed
            want = torch.full((num_slots,), -1, dtype=torch.int64)
            want[ep_rank * s:(ep_rank + 1) * s] = torch.arange(s)
        else:
            want = local
        if differs(expert_map, want):
            raise AdapterError(f"{where}: expert_map does not match the layer's placement "
                               f"(rank {ep_rank}: {want.tolist()}); give the layer an "
                               "eplb_phy2log [P] buffer that says where its experts are")

    def fits(t, like):  # (int64: the ops and the updator write these maps as int64, as vLLM)
        return t is not None and t.shape == like.shape and t.dtype == torch.int64

    if fits(l2p, log2phy):
        if differs(l2p, log2phy, rows_as_sets=True):
            raise AdapterError(f"{where}: logical_to_physical_map does not match the layer's "
                               "placement (eplb_phy2log)")
    else:
        if physical and l2p is not None:
            raise AdapterError(f"{where}: logical_to_physical_map must be [E={num_logical}, "
                               f"M={log2phy.shape[1]}] int64, got {list(l2p.shape)} "
                               f"{l2p.dtype}: vLLM's router reads it, so it must follow moves")
        l2p = _buffer(module, "eplb_log2phy", log2phy.to(dev), missing)
    cnt = _tensor(module, "logical_replica_count")
    if fits(cnt, logcnt):
        if differs(cnt, logcnt):
            raise AdapterError(f"{where}: logical_replica_count does not match the layer's "
                               "placement (eplb_phy2log)")
    else:
        if physical and cnt is not None:
            raise AdapterError(f"{where}: logical_replica_count must be [E={num_logical}] "
                               f"int64, got {list(cnt.shape)} {cnt.dtype}")
        cnt = _buffer(module, "eplb_logcnt", logcnt.to(dev), missing)
    load = _tensor(module, "expert_load_view")
    if load is None or load.shape != (num_slots,) or load.dtype not in (torch.int32, torch.int64):
        load = _buffer(module, "eplb_load", torch.zeros(num_slots, dtype=torch.int64, device=dev),
                       missing)
    record = _buffer(module, "eplb_record", torch.ones((), dtype=torch.bool, device=dev),
                     missing)
    adapter = MoELayerAdapter(name=name, module=module, weights=weights, phy2log=p2l,
                              log2phy=l2p, logcnt=cnt, load=load, record=record, ep_rank=ep_rank,
                              ep_size=ep_size,
                              local_expert_map=None if physical else expert_map)
    for key, t in missing.items():  # the same tensor objects the adapter holds
        module.register_buffer(key, t, persistent=False)
    return adapter
