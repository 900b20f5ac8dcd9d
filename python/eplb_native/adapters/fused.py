"""Built-in adapter for the fused layout of vLLM's and vllm-ascend's FusedMoE.

Such a layer holds ``w13_weight`` [S, 2I, H] and ``w2_weight`` [S, H, I] stacked per local
expert (plus optional per-expert ``w13_*`` / ``w2_*`` scales and biases with the same first
dimension) and an ``expert_map`` [E] int32 or int64 (logical -> local slot, -1 elsewhere). The
adapter reuses the placement tensors the layer already has under vLLM's names
(``logical_to_physical_map`` [E, M], ``logical_replica_count`` [E], ``expert_load_view`` [P])
when their shapes fit, and registers the missing ones as buffers ``eplb_phy2log``,
``eplb_log2phy``, ``eplb_logcnt``, ``eplb_load``, ``eplb_record`` on the module, which the
layer's routing must then read (the protocol in ``adapters/base.py``).

The initial ``phy2log`` is the layer's ``eplb_phy2log`` buffer if it has one; otherwise vLLM's
linear placement (rank r holds experts r*S .. r*S+S-1, no redundancy), which the layer's
``expert_map`` must confirm.
"""

from __future__ import annotations

import torch

from .. import state
from .base import AdapterError, MoELayerAdapter, register_adapter


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


@register_adapter
def fused_moe_adapter(name: str, module: torch.nn.Module, ep_rank: int, ep_size: int
                      ) -> MoELayerAdapter | None:
    """Adapts a module with ``w13_weight`` / ``w2_weight``; None for any other module."""
    w13, w2 = _tensor(module, "w13_weight"), _tensor(module, "w2_weight")
    if w13 is None or w2 is None:
        return None
    where = f"MoE layer {name!r} ({type(module).__name__})"
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
        raise AdapterError(f"{where}: w13_weight / w2_weight must be [S, 2I, H] / [S, H, I] with "
                           f"the same S, got {list(w13.shape)} / {list(w2.shape)}")
    s = w13.shape[0]
    weights = []
    for pname, t in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)):
        if pname.startswith(("w13_", "w2_")) and t.dim() >= 1 and t.shape[0] == s:
            weights.append(t.data if isinstance(t, torch.nn.Parameter) else t)
    expert_map = _tensor(module, "expert_map")
    if expert_map is None:
        expert_map = _tensor(module, "_expert_map")
    num_logical = getattr(module, "global_num_experts", None)
    if not isinstance(num_logical, int):
        num_logical = expert_map.numel() if expert_map is not None else None
    if num_logical is None:
        raise AdapterError(f"{where}: cannot tell the number of logical experts (no "
                           "global_num_experts and no expert_map)")
    # The layer dispatches by expert_map: it must follow every move, so one that cannot be
    # rewritten in place refuses the layer (ignoring it would leave routing on the old placement).
    if expert_map is not None and (list(expert_map.shape) != [num_logical]
                                   or expert_map.dtype not in (torch.int32, torch.int64)):
        raise AdapterError(f"{where}: expert_map must be [E={num_logical}] int32/int64, got "
                           f"{list(expert_map.shape)} {expert_map.dtype}")
    dev = w13.device
    missing: dict[str, torch.Tensor] = {}  # buffers to register once the adapter is valid
    p2l = _tensor(module, "eplb_phy2log")
    if p2l is None:
        if s * ep_size != num_logical:
            raise AdapterError(f"{where}: {s} local experts x {ep_size} ranks != {num_logical} "
                               "logical experts; with redundant experts the layer must hold an "
                               "eplb_phy2log [P] buffer")
        p2l = torch.arange(s * ep_size, dtype=torch.int64, device=dev)
        if expert_map is not None:
            want = torch.full((num_logical,), -1, dtype=torch.int64)
            want[ep_rank * s:(ep_rank + 1) * s] = torch.arange(s)
            if not torch.equal(expert_map.detach().cpu().to(torch.int64), want):
                raise AdapterError(f"{where}: expert_map is not vLLM's linear placement for rank "
                                   f"{ep_rank}; give the layer an eplb_phy2log [P] buffer")
        p2l = _buffer(module, "eplb_phy2log", p2l, missing)
    num_slots = p2l.numel()
    log2phy, logcnt, _ = state.placement_tensors(p2l.cpu(), num_logical, ep_size, ep_rank)

    def fits(t, like):
        return t is not None and t.shape == like.shape and t.dtype == like.dtype

    l2p = _tensor(module, "logical_to_physical_map")
    if not fits(l2p, log2phy):
        l2p = _buffer(module, "eplb_log2phy", log2phy.to(dev), missing)
    cnt = _tensor(module, "logical_replica_count")
    if not fits(cnt, logcnt):
        cnt = _buffer(module, "eplb_logcnt", logcnt.to(dev), missing)
    load = _tensor(module, "expert_load_view")
    if load is None or load.shape != (num_slots,) or load.dtype not in (torch.int32, torch.int64):
        load = _buffer(module, "eplb_load", torch.zeros(num_slots, dtype=torch.int64, device=dev),
                       missing)
    record = _buffer(module, "eplb_record", torch.ones((), dtype=torch.bool, device=dev),
                     missing)
    adapter = MoELayerAdapter(name=name, module=module, weights=weights, phy2log=p2l,
                              log2phy=l2p, logcnt=cnt, load=load, record=record, ep_rank=ep_rank,
                              ep_size=ep_size, local_expert_map=expert_map)
    for key, t in missing.items():  # the same tensor objects the adapter holds
        module.register_buffer(key, t, persistent=False)
    adapter.set_placement(p2l.cpu())
    return adapter
