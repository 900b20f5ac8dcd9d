"""``EPMoE``: a reference expert-parallel MoE layer that routes through eplb_native's ops.

It is the worked example of how a fused-MoE op uses eplb_native (and what the tests, demo and
docs run): a top-k softmax gate picks logical experts per token; ``map_and_record`` turns them
into physical slots (spreading tokens over replicas) and counts the tokens per slot into the
layer's load buffer; each (token, choice) pair travels with ``all_to_all_single`` to the rank
that holds its slot, goes through that slot's SwiGLU expert, and comes back; the layer output is
the gate-weighted sum over the k choices, summed in choice order.

Inference only (no autograd through the all-to-all). Works on any backend torch.distributed
supports for ``all_to_all_single`` (gloo on CPU, NCCL on CUDA, HCCL on NPU), and in a single
process when ``group`` is None.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops, state  # noqa: F401  (ops registers torch.ops.eplb_native)
from ..adapters.base import MoELayerAdapter


class EPMoE(torch.nn.Module):
    """An expert-parallel MoE layer with stacked per-slot weights.

    Args:
        hidden_size: H. intermediate_size: I. num_experts: E logical experts. top_k: k.
        group: the expert-parallel process group (None: a single process holds every slot).
        num_redundant_experts: extra slots, P = E + it; (E + it) % ep_size == 0. With
            ``phy2log``, 0 (the default) takes P from it; any other value must match it.
        phy2log: the initial placement [P] (default: vllm-ascend's default spread).
        seed: in [0, 2**32); logical expert e's weights are drawn from a generator seeded
            with (seed, e) on the weights' device, identically on every rank and for every slot
            holding e, so layers built with the same seed on the same device type compute the
            same function whatever their placement. A rank draws only the experts its slots
            hold.
        dtype, device: of the weights and buffers.

    Parameters / buffers (all owned by the layer; the updator writes them in place):
        gate_weight [E, H]; gate_bias [E] (added to the gate logits, e.g. to make experts hot);
        w13 [S, 2I, H] and w2 [S, H, I], row s = the expert in local slot s;
        phy2log [P], log2phy [E, P-E+1], logcnt [E] int64; local_expert_map [E] int32;
        load [P] int64 (tokens this rank sent to each slot since the updator reset it);
        record [] bool.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 *, group=None, num_redundant_experts: int = 0, phy2log=None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for key, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                       ("num_experts", num_experts), ("top_k", top_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an int >= 1, got {v!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed < 2**32:  # expert e's generator seed is derived as seed * 1000003 + e
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if isinstance(num_redundant_experts, bool) or not isinstance(num_redundant_experts, int) \
                or num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts must be an int >= 0, got "
                             f"{num_redundant_experts!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.group = group
        self.ep_size = dist.get_world_size(group) if group is not None else 1
        self.ep_rank = dist.get_rank(group) if group is not None else 0
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        if phy2log is None:
            phy2log = state.default_placement(num_experts, self.ep_size, num_redundant_experts)
        p2l = state.validate_phy2log(phy2log, num_experts, self.ep_size)
        if p2l.ndim != 1:
            raise ValueError(f"phy2log must have shape [slots], got {p2l.shape}")
        if num_redundant_experts and p2l.size != num_experts + num_redundant_experts:
            raise ValueError(f"phy2log has {p2l.size} slots, num_redundant_experts says "
                             f"{num_experts} + {num_redundant_experts}")
        self.num_slots = p2l.size
        self.num_local_slots = self.num_slots // self.ep_size
        self.seed = seed
        h, i, e = hidden_size, intermediate_size, num_experts
        gate = torch.randn(e, h, generator=torch.Generator().manual_seed(seed)) / h ** 0.5
        kw = {"dtype": dtype, "device": device}
        self.gate_weight = torch.nn.Parameter(gate.to(**kw), requires_grad=False)
        self.register_buffer("gate_bias", torch.zeros(e, **kw))
        s = self.num_local_slots
        self.w13 = torch.nn.Parameter(torch.empty(s, 2 * i, h, **kw), requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.empty(s, h, i, **kw), requires_grad=False)
        # the kind of device the original weights are drawn on (logical_expert): where they
        # were first drawn, wherever the layer moves later (a generator of another kind draws
        # other numbers; the GPU index does not matter); a layer built on meta takes it at its
        # first draw
        self._draw_device_type = None if self.w13.device.type == "meta" else self.w13.device.type
        dev = {"device": device}
        m = state.max_replicas(e, self.num_slots)
        self.register_buffer("phy2log", torch.zeros(self.num_slots, dtype=torch.int64, **dev))
        self.register_buffer("log2phy", torch.full((e, m), -1, dtype=torch.int64, **dev))
        self.register_buffer("logcnt", torch.zeros(e, dtype=torch.int64, **dev))
        self.register_buffer("local_expert_map", torch.full((e,), -1, dtype=torch.int32, **dev))
        # the recorded load and the record switch are this process's running state, not part of
        # a checkpoint (a restored mid-window count would join the next window's)
        self.register_buffer("load", torch.zeros(self.num_slots, dtype=torch.int64, **dev),
                             persistent=False)
        self.register_buffer("record", torch.ones((), dtype=torch.bool, **dev), persistent=False)
        self.register_load_state_dict_pre_hook(_drop_running_state)
        self.register_load_state_dict_post_hook(_rederive_maps)
        self._adapter = self.eplb_adapter("")
        self._adapter.set_placement(p2l)
        if self.w13.device.type != "meta":  # (meta tensors hold no values: to_empty + a load)
            self.fill_slots_from_logical()

    def eplb_adapter(self, name: str) -> MoELayerAdapter:
        """The adapter protocol (eplb_native.adapters.base): this layer's tensors, no copies."""
        return MoELayerAdapter(name=name, module=self, weights=[self.w13.data, self.w2.data],
                               phy2log=self.phy2log, log2phy=self.log2phy, logcnt=self.logcnt,
                               load=self.load, record=self.record, ep_rank=self.ep_rank,
                               ep_size=self.ep_size, local_expert_map=self.local_expert_map,
                               rotate_replicas=True)  # forward dispatches its own tokens

    def logical_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The original weights of logical expert ``e``: (w13 [2I, H], w2 [H, I]), new tensors
        of the layer's dtype on its device. Drawn on the device the layer was built on (a layer
        built on the CPU and moved to a GPU keeps its weights' values)."""
        if self._draw_device_type is None:
            self._draw_device_type = self.w13.device.type
        kind = self._draw_device_type
        if kind == self.w13.device.type:
            dev = self.w13.device
        elif kind == "cpu":
            dev = torch.device("cpu")
        elif getattr(torch, kind, None) is not None and getattr(torch, kind).is_available():
            dev = torch.device(kind)  # (the current device of that kind: same numbers)
        else:
            raise RuntimeError(f"this layer's original expert weights were drawn on {kind}, "
                               f"which this process has none of; draw them on a host with one")
        g = torch.Generator(device=dev).manual_seed(self.seed * 1_000_003 + 1 + int(e))
        h, i = self.hidden_size, self.intermediate_size
        w13 = torch.randn(2 * i, h, generator=g, device=dev) / h ** 0.5
        w2 = torch.randn(h, i, generator=g, device=dev) / i ** 0.5
        to = {"device": self.w13.device}
        return w13.to(dtype=self.w13.dtype, **to), w2.to(dtype=self.w2.dtype, **to)

    @property
    def logical_w13(self) -> torch.Tensor:
        """[E, 2I, H] every logical expert's original w13, on the CPU (drawn on each call)."""
        return torch.stack([self.logical_expert(e)[0] for e in range(self.num_experts)]).cpu()

    @property
    def logical_w2(self) -> torch.Tensor:
        """[E, H, I] every logical expert's original w2, on the CPU (drawn on each call)."""
        return torch.stack([self.logical_expert(e)[1] for e in range(self.num_experts)]).cpu()

    @torch.no_grad()
    def fill_slots_from_logical(self) -> None:
        """Writes the original weights of each slot's logical expert into this rank's slots,
        per the current ``phy2log``."""
        s = self.num_local_slots
        mine = self.phy2log[self.ep_rank * s:(self.ep_rank + 1) * s].tolist()
        drawn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for slot, e in enumerate(mine):
            if e not in drawn:
                drawn[e] = self.logical_expert(e)
            self.w13[slot].copy_(drawn[e][0])
            self.w2[slot].copy_(drawn[e][1])

    def expert(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """SwiGLU expert of local ``slot`` on tokens x [n, H] -> [n, H]."""
        gate, up = F.linear(x, self.w13[slot]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[slot])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate: x [N, H] -> (logical top-k ids [N, k] int64, weights [N, k] of x's dtype)."""
        logits = F.linear(x, self.gate_weight) + self.gate_bias
        top, ids = logits.topk(self.top_k, dim=-1)
        return ids, torch.softmax(top.float(), dim=-1).to(x.dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] (this rank's tokens) -> [N, H]."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must have shape [tokens, {self.hidden_size}], got "
                             f"{list(x.shape)}")
        if x.dtype != self.w13.dtype:
            raise TypeError(f"x must have the layer's dtype {self.w13.dtype}, got {x.dtype}")
        n, k, s = x.shape[0], self.top_k, self.num_local_slots
        ids, weights = self.route(x)
        phy = torch.ops.eplb_native.map_and_record(ids, self.log2phy, self.logcnt, self.load,
                                                   self.record)
        flat = phy.reshape(-1)
        order = torch.argsort(flat, stable=True)  # grouped by rank, then by local slot
        send_x = x[order // k]
        send_slot = (flat[order] % s).to(torch.int64)
        send_counts = torch.bincount(flat // s, minlength=self.ep_size)
        if self.group is None:
            recv_x, recv_slot, recv_counts = send_x, send_slot, send_counts
        else:
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            splits_in, splits_out = send_counts.tolist(), recv_counts.tolist()
            recv_x = x.new_empty(sum(splits_out), x.shape[1])
            dist.all_to_all_single(recv_x, send_x, splits_out, splits_in, group=self.group)
            recv_slot = send_slot.new_empty(sum(splits_out))
            dist.all_to_all_single(recv_slot, send_slot, splits_out, splits_in,
                                   group=self.group)
        y = torch.empty_like(recv_x)
        slot_order = torch.argsort(recv_slot, stable=True)
        per_slot = torch.bincount(recv_slot, minlength=s).tolist()
        start = 0
        for slot, count in enumerate(per_slot):
            if count:
                rows = slot_order[start:start + count]
                y[rows] = self.expert(recv_x[rows], slot)
                start += count
        if self.group is None:
            back = y
        else:
            back = x.new_empty(n * k, x.shape[1])
            dist.all_to_all_single(back, y, splits_in, splits_out, group=self.group)
        out_flat = torch.empty_like(back)
        out_flat[order] = back
        # the hidden size spelled out: with no tokens (n = 0) a -1 would be ambiguous
        per_choice = out_flat.view(n, k, x.shape[1]) * weights.unsqueeze(-1)
        out = per_choice[:, 0]
        for j in range(1, k):  # fixed order: the result does not depend on the placement's order
            out = out + per_choice[:, j]
        return out


def logical_weights_of_slots(layer: EPMoE) -> tuple[np.ndarray, np.ndarray]:
    """The logical experts' original weights for this rank's slots per the current placement:
    (w13 [S, 2I, H], w2 [S, H, I]) as numpy, for checking moves bit for bit."""
    s = layer.num_local_slots
    mine = layer.phy2log[layer.ep_rank * s:(layer.ep_rank + 1) * s].tolist()
    drawn = {e: layer.logical_expert(e) for e in set(mine)}
    return (torch.stack([drawn[e][0] for e in mine]).cpu().numpy(),
            torch.stack([drawn[e][1] for e in mine]).cpu().numpy())


def _rederive_maps(module, incompatible_keys) -> None:
    """After a load: log2phy / logcnt / local_expert_map follow the loaded phy2log for this rank
    (a checkpoint saved by another rank holds that rank's rotated log2phy rows; its phy2log is
    the placement the loaded weights follow). Through an adapter of the module's tensors as
    they are now (a load with assign=True, .to() or to_empty() replaced them)."""
    if module.phy2log.device.type != "meta":
        module.eplb_adapter("").set_placement(module.phy2log.detach().cpu())


def _drop_running_state(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before load / record became non-persistent carry them: dropped, so
    they still load (strict too). Refused here, before the load writes anything of the layer
    (torch would load the tensors that fit and the post-hook switch the maps to the new phy2log
    under weights that follow the old one): a tensor of the layer's whose shape differs, a
    phy2log without both w13 and w2, and a phy2log that is no placement."""
    for key in ("load", "record"):
        state_dict.pop(prefix + key, None)
    for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        v = state_dict.get(prefix + key)
        if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(t.shape):
            raise ValueError(f"{prefix}{key} in the state_dict has shape {list(v.shape)}, the "
                             f"layer's is {list(t.shape)}; nothing of this layer was loaded")
    if prefix + "phy2log" in state_dict and not all(
            prefix + k in state_dict for k in ("w13", "w2")):
        raise ValueError(f"{prefix}phy2log in the state_dict comes without {prefix}w13 and "
                         f"{prefix}w2: the placement would switch under weights that follow "
                         "the old one; load them together")
    p2l = state_dict.get(prefix + "phy2log")
    if isinstance(p2l, torch.Tensor) and p2l.device.type != "meta":
        try:
            state.validate_phy2log(p2l.detach().cpu(), module.num_experts, module.ep_size)
        except ValueError as e:
            raise ValueError(f"{prefix}phy2log in the state_dict is not a placement: "
                             f"{e}") from None
