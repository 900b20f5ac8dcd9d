"""The adapter protocol: what one MoE layer must expose so ``eplb_native.attach`` can balance it.

``attach(model)`` walks ``model.named_modules()`` and turns every MoE layer into a
:class:`MoELayerAdapter`, in this order:

1. the module has a method ``eplb_adapter(name) -> MoELayerAdapter`` (the protocol a layer
   implements itself, knowing its own EP rank and size; ``eplb_native.nn.EPMoE`` does);
2. a function registered with :func:`register_adapter` returns an adapter for it (the built-in
   ones cover EPMoE and the fused layout ``w13_weight`` / ``w2_weight`` of vLLM's and
   vllm-ascend's FusedMoE, see ``adapters/fused.py``);
3. otherwise the module is not an MoE layer. A module that *looks* like one (a registered
   adapter recognises it but cannot adapt it) raises :class:`AdapterError` naming the module.

What a layer exposes (all tensors are owned by the layer; the updator never reallocates them,
it only writes into them with ``copy_`` *between* two forwards of the model, so captured
graphs and kernels holding their pointers stay valid):

- **expert weights** (``weights``): a list of tensors, each stacked per *local slot*:
  ``[S, ...]`` with S = P / ep_size, e.g. ``w13 [S, 2I, H]``, ``w2 [S, H, I]``, plus any
  per-expert scales or biases. Row ``s`` of every tensor is the weights of the logical expert
  ``phy2log[ep_rank * S + s]``. Every rank's tensors have the same shapes and dtypes. The
  updator moves whole rows between ranks and copies them in place.
- **placement** (global for the layer, identical on every rank):
  ``phy2log [P]`` int64, ``log2phy [E, M]`` int64 (M = P - E + 1, -1 padded, slots in
  increasing order), ``logcnt [E]`` int64, and optionally ``local_expert_map [E]`` int32
  (logical -> local slot on this rank or -1, vLLM's ``expert_map``). Meaning and examples in
  ``eplb_native.state``. The updator rewrites all of them together, at one step boundary,
  through :meth:`MoELayerAdapter.set_placement`.
- **load** (``load [P]`` int64 or int32): tokens routed to each *global* slot by this rank's
  tokens since the updator last zeroed it; ``record`` (0-dim bool tensor on the same device)
  says whether the layer should count at all. The layer adds into ``load`` on its device (the
  ops ``map_and_record`` / ``record_topk`` / ``record_counts`` with ``offset = ep_rank * S``
  do exactly this); the updator reads and zeroes it between forwards, ordered after the
  forward on the device, so no count is lost or counted twice.
- **routing** reads the placement at every forward, on the device, never from Python ints
  cached earlier: logical top-k ids go through ``map_and_record(topk_ids, log2phy, logcnt,
  load, record)`` to physical slots; slot ``p`` lives on rank ``p // S`` at local row
  ``p % S``. A layer that dispatches by logical id instead reads ``local_expert_map``.

Keep this file stable: integrations (transformers, engines) build on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import state

__all__ = ["AdapterError", "MoELayerAdapter", "register_adapter", "registered_adapters"]


class AdapterError(ValueError):
    """A module looks like an MoE layer but cannot be adapted (the message names it)."""


@dataclass(eq=False)
class MoELayerAdapter:
    """One MoE layer as the updator sees it. Every tensor is the layer's own (no copies).

    Attributes:
        name: the module's qualified name in the model (used in errors and logs).
        module: the layer itself.
        weights: expert weight tensors, each ``[S, ...]`` stacked per local slot.
        phy2log: ``[P]`` int64, logical expert of every global slot.
        log2phy: ``[E, M]`` int64, M = P - E + 1, slots of each logical expert, -1 padded.
        logcnt: ``[E]`` int64, replicas of each logical expert.
        load: ``[P]`` int64/int32, tokens per global slot recorded by this rank since the last
            reset.
        record: 0-dim bool tensor, True while the layer should record into ``load``.
        ep_rank, ep_size: this rank and the number of ranks the layer's slots are spread over.
        local_expert_map: ``[E]`` int32 (or int64) or None, logical -> local slot on this rank
            (-1: none).
        on_placement: optional callback ``f(adapter)`` run after every placement switch (e.g. to
            refresh a kernel's derived tables).
        rotate_replicas: True when each rank maps only its own tokens (an all-to-all
            dispatch): each rank's ``log2phy`` rows then start at replica ``ep_rank % count``,
            so that calls of few tokens (decode) spread an expert's tokens over its replicas
            across ranks (``state.placement_tensors``). False (default) where ranks map the
            same tokens (all-reduce EP, TP groups): they must pick the same slots.
    """

    name: str
    module: torch.nn.Module
    weights: list[torch.Tensor]
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    load: torch.Tensor
    record: torch.Tensor
    ep_rank: int
    ep_size: int
    local_expert_map: torch.Tensor | None = None
    on_placement: Callable[[MoELayerAdapter], None] | None = field(default=None, repr=False)
    rotate_replicas: bool = False

    def __post_init__(self):
        where = f"MoE layer {self.name!r} ({type(self.module).__name__})"
        if not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise AdapterError(f"{where}: ep_size must be an int >= 1, got {self.ep_size!r}")
        if not isinstance(self.ep_rank, int) or not 0 <= self.ep_rank < self.ep_size:
            raise AdapterError(f"{where}: ep_rank must be in [0, {self.ep_size}), got "
                               f"{self.ep_rank!r}")
        if not isinstance(self.rotate_replicas, bool):
            raise AdapterError(f"{where}: rotate_replicas must be a bool, got "
                               f"{self.rotate_replicas!r}")
        if not self.weights:
            raise AdapterError(f"{where}: no expert weight tensors")
        for name in ("phy2log", "log2phy", "logcnt", "load", "record"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise AdapterError(f"{where}: {name} must be a torch.Tensor")
        p = self.phy2log.numel()
        e = self.logcnt.numel()
        if self.phy2log.dim() != 1 or self.phy2log.dtype != torch.int64:
            raise AdapterError(f"{where}: phy2log must be [P] int64, got "
                               f"{list(self.phy2log.shape)} {self.phy2log.dtype}")
        if p % self.ep_size:
            raise AdapterError(f"{where}: slots ({p}) not divisible by ep_size ({self.ep_size})")
        s = p // self.ep_size
        m = state.max_replicas(e, p)
        if list(self.log2phy.shape) != [e, m] or self.log2phy.dtype != torch.int64:
            raise AdapterError(f"{where}: log2phy must be [E={e}, M={m}] int64, got "
                               f"{list(self.log2phy.shape)} {self.log2phy.dtype}")
        if self.logcnt.dim() != 1 or self.logcnt.dtype != torch.int64:
            raise AdapterError(f"{where}: logcnt must be [E] int64, got {self.logcnt.dtype}")
        if list(self.load.shape) != [p] or self.load.dtype not in (torch.int64, torch.int32):
            raise AdapterError(f"{where}: load must be [P={p}] int64/int32, got "
                               f"{list(self.load.shape)} {self.load.dtype}")
        if self.record.dim() != 0 or self.record.dtype != torch.bool:
            raise AdapterError(f"{where}: record must be a 0-dim bool tensor")
        if self.local_expert_map is not None and (
                list(self.local_expert_map.shape) != [e]
                or self.local_expert_map.dtype not in (torch.int32, torch.int64)):
            raise AdapterError(f"{where}: local_expert_map must be [E={e}] int32/int64, got "
                               f"{list(self.local_expert_map.shape)} "
                               f"{self.local_expert_map.dtype}")
        for i, w in enumerate(self.weights):
            if not isinstance(w, torch.Tensor) or w.dim() < 1 or w.shape[0] != s:
                shape = list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise AdapterError(f"{where}: weights[{i}] must be stacked per local slot "
                                   f"[S={s}, ...], got {shape}")
            if not w.is_contiguous():
                raise AdapterError(f"{where}: weights[{i}] must be contiguous")

    @property
    def num_logical_experts(self) -> int:
        """E, logical experts of the layer."""
        return self.logcnt.numel()

    @property
    def num_slots(self) -> int:
        """P, global physical slots of the layer (E + redundant)."""
        return self.phy2log.numel()

    @property
    def num_local_slots(self) -> int:
        """S, slots on each rank."""
        return self.num_slots // self.ep_size

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def slot_bytes(self) -> int:
        """Bytes of one slot's weights over all weight tensors (what one move sends)."""
        return sum(w[0].numel() * w.element_size() for w in self.weights)

    @torch.no_grad()
    def set_placement(self, phy2log, run_callback: bool = True) -> None:
        """Rewrites ``phy2log``, ``log2phy``, ``logcnt`` and ``local_expert_map`` in place for
        the placement ``phy2log`` [P] (validated first; nothing is written if it is invalid),
        then runs ``on_placement`` (unless ``run_callback`` is False: the caller runs it). Does
        not touch the weights: the caller copies them first.
        """
        p2l = torch.from_numpy(state.validate_phy2log(phy2log, self.num_logical_experts,
                                                      self.ep_size))
        if p2l.shape != self.phy2log.shape:
            raise ValueError(f"phy2log for {self.name!r} must have shape "
                             f"{list(self.phy2log.shape)}, got {list(p2l.shape)}")
        log2phy, logcnt, local = state.placement_tensors(p2l, self.num_logical_experts,
                                                         self.ep_size, self.ep_rank,
                                                         rotate=self.rotate_replicas)
        _copy_from_host(self.phy2log, p2l)
        _copy_from_host(self.log2phy, log2phy)
        _copy_from_host(self.logcnt, logcnt)
        if self.local_expert_map is not None:
            _copy_from_host(self.local_expert_map, local)
        if run_callback and self.on_placement is not None:
            self.on_placement(self)


def _copy_from_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a host tensor ``src``. To a device it goes through pinned memory
    with ``non_blocking``: queued on the current stream like a kernel (after what that stream
    already holds, before the next forward), without a host sync, which a copy from pageable
    memory would cost at every layer's switch; the caching host allocator keeps the pinned
    block until the copy completed."""
    if dst.device.type in ("cpu", "meta"):  # (meta: no data, a copy only checks the shape)
        dst.copy_(src)
    else:
        # converted on the host first: a conversion inside copy_ would stage through pageable
        # memory again
        dst.copy_(src.to(dst.dtype).pin_memory(), non_blocking=True)


#: An adapter function: ``fn(name, module, ep_rank, ep_size)`` -> MoELayerAdapter, or None when
#: the module is not a layer it knows; raises AdapterError when it knows the kind but cannot
#: adapt this one.
AdapterFn = Callable[[str, torch.nn.Module, int, int], "MoELayerAdapter | None"]

_ADAPTERS: list[AdapterFn] = []


def register_adapter(fn: AdapterFn) -> AdapterFn:
    """Registers an adapter function (usable as a decorator). Later registrations are tried
    first, so an integration can override a built-in one."""
    if not callable(fn):
        raise TypeError(f"adapter must be callable, got {type(fn).__name__}")
    if fn not in _ADAPTERS:
        _ADAPTERS.insert(0, fn)
    return fn


def registered_adapters() -> list[AdapterFn]:
    """The adapter functions in the order they are tried."""
    return list(_ADAPTERS)


def adapt_module(name: str, module: torch.nn.Module, ep_rank: int, ep_size: int
                 ) -> MoELayerAdapter | None:
    """The adapter of ``module`` by the protocol's rules (module docstring), or None.
    ``ep_rank`` / ``ep_size`` are those of attach's group, for layouts that do not know them."""
    hook = getattr(module, "eplb_adapter", None)
    if callable(hook):
        out = hook(name)
        if not isinstance(out, MoELayerAdapter):
            raise AdapterError(f"module {name!r}: eplb_adapter() must return a MoELayerAdapter, "
                               f"got {type(out).__name__}")
        return out
    for fn in _ADAPTERS:
        out = fn(name, module, ep_rank, ep_size)
        if out is not None:
            return out
    return None
