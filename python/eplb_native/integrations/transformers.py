"""EPLB for Hugging Face transformers MoE models, under transformers' own expert parallelism.

Checked against transformers 5.23, 5.24 and 5.25 (the ``transformers`` extra pins the range that
is tested).

What transformers gives
-----------------------
A model loaded with ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N,
ep_size=N, tp_plan="auto"))`` has, in every MoE layer, an *experts module* (the class is
decorated with ``@use_experts_implementation``) whose stacked parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]; GPT-OSS: [E, H, 2I], [E, I, H] plus ``*_bias`` [E, ...])
are DTensors sharded ``Shard(0)`` over the EP mesh: rank r holds the contiguous rows
``r*E/R .. (r+1)*E/R - 1`` and ``module.num_experts`` is that local count. The MoE block calls
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` with the router's logical
ids; the ``ep_dispatch_experts`` style routes id ``p`` to rank ``p // num_experts``, local row
``p % num_experts``, through an ``EPImplementation`` registered in
``EPImplementationInterface`` (``auto``, ``all_to_all``, ``all_reduce``).

What :func:`attach` changes (per experts module, nothing in transformers' code)
--------------------------------------------------------------------------------
1. **Slots.** Every stacked parameter grows from E/R to S = P/R rows per rank (P = E +
   redundant, or the slot count of a JSON expert map). Row s of rank r holds the logical expert
   ``phy2log[r*S + s]``; rows this rank did not load are fetched once from the rank that did
   (P2P). ``num_experts`` becomes S; the parameters stay ``Shard(0)`` DTensors of P rows.
2. **Routing.** The forward is reinstalled through transformers' own ``ep_dispatch_experts``
   style with the EP implementation ``"eplb"`` (:class:`EplbEPImplementation`, registered in
   ``EPImplementationInterface``). It maps the logical top-k ids to physical slots with
   ``torch.ops.eplb_native.map_and_record`` (the load is recorded in the same op) and hands them
   to the implementation the model was loaded with. Slot p lives on rank p // S at row p % S,
   which is transformers' own layout rule with S local experts, so the dispatch and the
   experts functions (``grouped_mm``, ``batched_mm``, ...) run unchanged.
3. **State** for the updator: non-persistent buffers on the experts module, read by routing at
   every forward and rewritten in place by the updator: ``eplb_phy2log`` [P], ``eplb_log2phy``
   [E, M], ``eplb_logcnt`` [E], ``eplb_load`` [P] int64, ``eplb_record`` (0-dim bool). The
   adapter registered here (:func:`transformers_experts_adapter`) hands them, with the local
   rows of every stacked parameter, to ``eplb_native.attach`` (protocol in adapters/base.py).
4. **Checkpoints.** ``model.save_pretrained`` saves :func:`logical_state_dict`: the grown
   parameters gathered and put back in logical order [E, ...], which the plain model loads.
   ``model.state_dict()`` itself stays the grown, slot-ordered one (no collective in it), and
   the EPLB buffers are not in it: a slot-ordered state dict taken at one placement is only
   valid at that placement (load checkpoints before attach).

Why the EP implementation and not the other hooks: an experts function runs after the
dispatch, on local ids, too late to choose a replica; a forward hook on the router depends on
each family's router module and output tuple. The EP implementation sees every token's logical
ids once per layer, for every family whose plan uses ``ep_dispatch_experts``.

Load recording: the ranks of one TP group hold the same batch (with ``tp_size == ep_size``
every rank runs the whole batch), so only the first rank of each TP group records; the load
gathered over the EP group counts every token once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

try:
    import transformers
    from transformers.distributed.expert_parallel import (
        ALL_PARALLEL_STYLES,
        EPImplementation,
        EPImplementationInterface,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "eplb_native.integrations.transformers needs transformers >= 5.23: "
        "pip install 'eplb_native[transformers]'"
    ) from exc

from torch.distributed.tensor import DTensor, Shard

from .. import expert_map as _expert_map
from .. import ops as _ops  # noqa: F401  (registers torch.ops.eplb_native)
from .. import state
from .._util import check_bool, check_int, check_writable_dir, digest
from ..adapters.base import AdapterError, MoELayerAdapter, register_adapter

__all__ = [
    "EP_IMPLEMENTATION",
    "TESTED_VERSIONS",
    "EplbEPImplementation",
    "TransformersMoELayer",
    "attach",
    "find_moe_layers",
    "logical_state_dict",
    "prepare",
    "transformers_experts_adapter",
]

#: transformers versions the tests run against (the ``transformers`` extra pins them).
TESTED_VERSIONS = ">=5.23,<5.26"
if not transformers.__version__.startswith(("5.23.", "5.24.", "5.25.")):
    warnings.warn(f"eplb_native.integrations.transformers is tested with transformers "
                  f"{TESTED_VERSIONS}, found {transformers.__version__}", stacklevel=2)

#: Name of the EP implementation this module registers in transformers'
#: ``EPImplementationInterface``.
EP_IMPLEMENTATION = "eplb"

# Names of the buffers attach registers on an experts module (the layer's EPLB state).
_BUFFERS = ("eplb_phy2log", "eplb_log2phy", "eplb_logcnt", "eplb_load", "eplb_record")

logger = logging.getLogger("eplb_native")


@dataclass(frozen=True)
class TransformersMoELayer:
    """One MoE layer of a transformers model, as :func:`find_moe_layers` finds it.

    Attributes:
        name: qualified name of the experts module (``model.layers.3.mlp.experts``).
        experts: the experts module (owns the stacked parameters).
        block: the MoE block holding it (``...mlp``), whose router picks the top-k ids.
        num_logical_experts: E, the layer's logical experts.
    """

    name: str
    experts: torch.nn.Module
    block: torch.nn.Module
    num_logical_experts: int


def _where(name: str, module: torch.nn.Module) -> str:
    return f"MoE experts module {name!r} ({type(module).__name__})"


def _stacked_params(experts: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The experts module's own parameters stacked per expert (first dim = experts), in
    registration order: every one moves with its expert."""
    params = list(experts.named_parameters(recurse=False))
    first = {p.shape[0] for _, p in params if p.dim() >= 1}
    if len(first) != 1:
        return []
    return [(n, p) for n, p in params if p.dim() >= 1]


def _check_experts(name: str, experts: torch.nn.Module) -> None:
    """Raises AdapterError naming ``experts`` and why attach cannot serve it."""
    where = _where(name, experts)
    if not all(hasattr(experts, a) for a in ("has_gate", "is_transposed", "config")):
        raise AdapterError(
            f"{where}: not a transformers stacked-experts module (@use_experts_implementation):"
            " attach needs the expert weights as [E, ...] parameters of this module, sharded by "
            "transformers' expert parallelism, and the module called as experts(hidden, "
            "top_k_index, top_k_weights) with the router's top-k ids, where logical ids are "
            "mapped to slots")
    params = _stacked_params(experts)
    if not params:
        raise AdapterError(f"{where}: has no parameters stacked per expert")
    impl = getattr(experts.config, "_experts_implementation", None)
    if impl == "deepgemm_megamoe":
        raise AdapterError(
            f"{where}: experts_implementation='deepgemm_megamoe' exchanges tokens inside its "
            "kernel by logical expert id; load with 'grouped_mm' or 'batched_mm'")
    if not all(isinstance(p, DTensor) for _, p in params) or "forward" not in vars(experts):
        raise AdapterError(
            f"{where}: not sharded by transformers' expert parallelism; load the model with "
            "distributed_config=DistributedConfig(ep_size=N, ...) and an ep_plan with the "
            "'ep_dispatch_experts' (module) and 'grouped_gemm' (parameters) rules")
    for pname, p in params:
        if tuple(p.placements) != (Shard(0),):
            raise AdapterError(f"{where}: parameter {pname!r} must be sharded Shard(0) over the "
                               f"EP mesh, got {p.placements}")


def find_moe_layers(model: torch.nn.Module) -> list[TransformersMoELayer]:
    """Every MoE layer of ``model``, in module order: each module with an ``experts`` child.

    Raises AdapterError naming the first experts module that attach cannot serve, and
    ValueError if the model has no MoE layer at all.
    """
    layers = []
    for block_name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        name = f"{block_name}.experts" if block_name else "experts"
        _check_experts(name, experts)
        num_logical = getattr(experts, "eplb_num_logical_experts", None)
        if num_logical is None:
            num_logical = _stacked_params(experts)[0][1].shape[0]
        layers.append(TransformersMoELayer(name, experts, block, int(num_logical)))
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no MoE layer: no module has an "
                         "'experts' child")
    return layers


def _meshes(model: torch.nn.Module):
    """(ep_mesh, tp_mesh) of a model transformers loaded with expert parallelism."""
    dcfg = getattr(getattr(model, "config", None), "distributed_config", None)
    manager = getattr(model, "_mesh_manager", None)
    if dcfg is None or manager is None or getattr(dcfg, "ep_size", 1) <= 1:
        raise ValueError(
            f"model ({type(model).__name__}) was not loaded with transformers' expert "
            "parallelism: pass distributed_config=DistributedConfig(tp_size=N, ep_size=N, "
            "tp_plan='auto') to from_pretrained on every rank (ep_size > 1)")
    return manager.get_mesh("ep"), manager.get_mesh("tp")


def _initial_placement(layers, num_ranks: int, num_redundant_experts, expert_map
                       ) -> np.ndarray:
    """``phy2log`` [L, P] to start from: the expert map when given, else vllm-ascend's default
    placement with ``num_redundant_experts`` redundant slots per layer."""
    num_logical = {layer.num_logical_experts for layer in layers}
    if len(num_logical) != 1:
        raise ValueError(f"MoE layers have different expert counts {sorted(num_logical)}; "
                         "one placement shape is needed for all layers")
    (e,) = num_logical
    if expert_map is not None:
        phy2log, _ = _expert_map.load(expert_map, num_ranks=num_ranks, num_logical=e,
                                      num_layers=len(layers), name="expert_map")
        return phy2log
    redundant = 0 if num_redundant_experts is None else num_redundant_experts
    return state.default_placement(e, num_ranks, redundant, len(layers))


def _fill_slots(local_rows: list[torch.Tensor], phy2log: np.ndarray, num_logical: int,
                ep_rank: int, ep_size: int, group) -> list[torch.Tensor]:
    """New per-slot tensors ``[S, ...]`` for this rank's slots of ``phy2log`` [P], from the rows
    transformers loaded (rank q holds logical experts q*E/R .. (q+1)*E/R - 1). Rows of other
    ranks travel by P2P, one message per (peer, parameter). Collective over ``group``."""
    loaded = num_logical // ep_size
    slots = phy2log.size // ep_size
    owner, row = phy2log // loaded, phy2log % loaded
    mine = range(ep_rank * slots, (ep_rank + 1) * slots)
    out = [t.new_empty((slots,) + tuple(t.shape[1:])) for t in local_rows]
    for s, p in enumerate(mine):
        if owner[p] == ep_rank:
            for dst, src in zip(out, local_rows, strict=True):
                dst[s].copy_(src[row[p]])
    ops, pending = [], []
    for q in range(ep_size):
        if q == ep_rank:
            continue
        peer = dist.get_global_rank(group, q)
        theirs = np.arange(q * slots, (q + 1) * slots)
        send_rows = row[theirs][owner[theirs] == ep_rank]
        if send_rows.size:
            index = torch.from_numpy(send_rows).to(local_rows[0].device)
            for src in local_rows:
                ops.append(dist.P2POp(dist.isend, src.index_select(0, index).contiguous(), peer,
                                      group))
        recv_slots = [s for s, p in enumerate(mine) if owner[p] == q]
        if recv_slots:
            for dst in out:
                buf = dst.new_empty((len(recv_slots),) + tuple(dst.shape[1:]))
                ops.append(dist.P2POp(dist.irecv, buf, peer, group))
                pending.append((dst, recv_slots, buf))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for dst, recv_slots, buf in pending:
        dst[torch.tensor(recv_slots, device=dst.device)] = buf
    return out


class EplbEPImplementation(EPImplementation):
    """transformers EP implementation ``"eplb"``: logical top-k ids -> physical slots (recording
    the load), then the implementation the model was loaded with.

    Built by transformers' ``ep_dispatch_experts`` style for one experts module that
    :func:`prepare` has grown to S slots per rank; it reads the module's ``eplb_log2phy``,
    ``eplb_logcnt``, ``eplb_load`` and ``eplb_record`` buffers at every call, so a placement
    switch (in place) takes effect at the next forward.
    """

    def __init__(self, experts: torch.nn.Module, ep_mesh, tp_mesh):
        inner_name = getattr(experts, "eplb_inner_ep_implementation", None)
        if inner_name is None:
            raise ValueError(
                f"ep_implementation={EP_IMPLEMENTATION!r} is installed by "
                "eplb_native.integrations.transformers.attach(); load the model with 'auto', "
                "'all_to_all' or 'all_reduce' and call attach() afterwards")
        super().__init__(experts, ep_mesh, tp_mesh)
        self.experts = experts
        self.inner = EPImplementationInterface()[inner_name](experts, ep_mesh, tp_mesh)
        # Ranks of one TP group hold the same tokens: only the first records them.
        self.records_here = tp_mesh.get_local_rank() == 0
        self._never = torch.zeros((), dtype=torch.bool, device=experts.eplb_record.device)
        experts.eplb_ep_implementation = self  # the module's dispatch, for inspection

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        ex = self.experts
        record = ex.eplb_record if self.records_here else self._never
        slots = torch.ops.eplb_native.map_and_record(top_k_index, ex.eplb_log2phy,
                                                     ex.eplb_logcnt, ex.eplb_load, record)
        return self.inner(hidden_states, slots, top_k_weights)


EPImplementationInterface.register(EP_IMPLEMENTATION, EplbEPImplementation)


def _register_state(experts, phy2log: np.ndarray, num_logical: int, ep_rank: int, ep_size: int,
                    device) -> None:
    log2phy, logcnt, _ = state.placement_tensors(phy2log, num_logical, ep_size, ep_rank)
    values = (torch.from_numpy(phy2log.copy()), log2phy, logcnt,
              torch.zeros(phy2log.size, dtype=torch.int64), torch.ones((), dtype=torch.bool))
    for name, value in zip(_BUFFERS, values, strict=True):
        experts.register_buffer(name, value.to(device), persistent=False)


@torch.no_grad()
def prepare(model: torch.nn.Module, group=None, *, num_redundant_experts: int | None = None,
            expert_map=None, ep_implementation: str | None = None
            ) -> list[TransformersMoELayer]:
    """Grows every MoE layer of ``model`` to its physical slots and installs the remapping
    routing (module docstring, steps 1-3). Collective over the EP group: call on every rank.

    Args:
        model: a transformers MoE model loaded with ``DistributedConfig(ep_size > 1)``.
        group: the EP process group (default: the model's EP mesh group); must hold exactly the
            ranks of the model's EP mesh.
        num_redundant_experts: redundant slots per layer for vllm-ascend's default placement
            (default 0); E + redundant must divide by the EP size.
        expert_map: the initial placement instead: a vllm-ascend expert-map JSON path or dict,
            or ``phy2log`` [L, P] (one row per MoE layer, in module order).
        ep_implementation: how tokens reach the slots (a name registered in transformers'
            ``EPImplementationInterface``); default: the one the model was loaded with.

    Returns the layers, each with its EPLB buffers registered. Raises ValueError / AdapterError
    (or the OSError reading ``expert_map``) before changing anything when the model, the group
    or the placement does not fit; every rank raises together (those where nothing failed a
    RuntimeError naming the rank that did).
    """
    from ..updator import check_group

    check_group(group)
    layers = _grow(_agreed_preparation(model, group, num_redundant_experts, expert_map,
                                       ep_implementation))
    _install_logical_save(model)
    return layers


def logical_state_dict(model: torch.nn.Module) -> dict:
    """``model.state_dict()`` as the model before :func:`prepare`: every grown experts
    parameter gathered whole and in logical order ``[E, ...]`` (each expert from its first
    slot; replicas hold the same weights), so that a checkpoint saved from it loads into the
    plain model. Collective over the EP group (the gather): call on every rank.
    ``save_pretrained`` of a prepared model saves this (prepare installs it)."""
    sd = model.state_dict()
    for name, module in model.named_modules():
        if not hasattr(module, "eplb_phy2log"):
            continue
        l2p = module.eplb_log2phy  # each expert's slots (rows rotated by rank), -1 padded
        first = torch.where(l2p >= 0, l2p, torch.iinfo(l2p.dtype).max).amin(1)  # lowest slot
        for pname, p in _stacked_params(module):
            full = p.full_tensor()
            key = f"{name}.{pname}" if name else pname
            sd[key] = full.index_select(0, first.to(full.device)).detach()
    return sd


def _install_logical_save(model: torch.nn.Module) -> None:
    """Makes ``model.save_pretrained`` save :func:`logical_state_dict` (unless given a
    state_dict): the grown, slot-ordered parameters would make a checkpoint that loads into no
    model (P rows where the config says E)."""
    if getattr(model, "_eplb_logical_save", False) or not hasattr(model, "save_pretrained"):
        return
    original = model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory, *args, **kwargs):
        if len(args) < 2 and kwargs.get("state_dict") is None:  # (args[1]: a state_dict)
            kwargs["state_dict"] = logical_state_dict(model)
        return original(save_directory, *args, **kwargs)

    model.save_pretrained = save_pretrained
    model._eplb_logical_save = True


@dataclass
class _Preparation:
    """What prepare() checked and will apply: the model's meshes, the EP group, its layers and
    their initial placement phy2log [L, P]."""
    ep_mesh: object
    tp_mesh: object
    group: object
    layers: list[TransformersMoELayer]
    phy2log: np.ndarray
    ep_implementation: str

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])


def _check_prepare(model, group, num_redundant_experts, expert_map,
                   ep_implementation) -> _Preparation:
    """prepare()'s checks of what this rank holds, all of them before anything changes
    (``group``: the EP group, checked by the caller): raises ValueError / AdapterError (or
    OSError reading the expert map), or returns what _grow applies."""
    ep_mesh, tp_mesh = _meshes(model)
    ep_size = ep_mesh.size()
    layers = find_moe_layers(model)
    for layer in layers:
        if hasattr(layer.experts, "eplb_phy2log"):
            raise ValueError(f"{_where(layer.name, layer.experts)}: EPLB is already attached")
    if num_redundant_experts is not None:
        num_redundant_experts = check_int(num_redundant_experts, "num_redundant_experts", 0)
    if ep_implementation is None:
        ep_implementation = model.config.distributed_config.ep_implementation
    if ep_implementation == EP_IMPLEMENTATION or ep_implementation not in (
            EPImplementationInterface()):
        raise ValueError(f"ep_implementation must name a registered transformers EP "
                         f"implementation other than {EP_IMPLEMENTATION!r}, got "
                         f"{ep_implementation!r}")
    phy2log = _initial_placement(layers, ep_size, num_redundant_experts, expert_map)
    num_slots = phy2log.shape[1]
    if num_redundant_experts is not None and (
            num_slots - layers[0].num_logical_experts != num_redundant_experts):
        raise ValueError(f"num_redundant_experts ({num_redundant_experts}) contradicts the expert "
                         f"map ({num_slots} slots for {layers[0].num_logical_experts} experts)")
    # Every layer is checked before any is grown: growing is collective (_fill_slots) and
    # cannot be undone, so a refusal must come before the first layer changes.
    for layer in layers:
        for pname, p in _stacked_params(layer.experts):
            if p.shape[0] != layer.num_logical_experts or p.device_mesh != ep_mesh:
                raise AdapterError(f"{_where(layer.name, layer.experts)}: parameter {pname!r} "
                                   f"must hold {layer.num_logical_experts} experts on the EP "
                                   f"mesh, got {p.shape[0]}")
    return _Preparation(ep_mesh, tp_mesh, group, layers, phy2log, ep_implementation)


@torch.no_grad()
def _grow(prep: _Preparation) -> list[TransformersMoELayer]:
    """Grows every layer of ``prep`` to its slots and installs the routing (collective)."""
    ep_mesh, tp_mesh, group = prep.ep_mesh, prep.tp_mesh, prep.group
    layers, phy2log, num_slots = prep.layers, prep.phy2log, prep.num_slots
    ep_implementation = prep.ep_implementation
    ep_rank, ep_size = ep_mesh.get_local_rank(), ep_mesh.size()
    dispatch = ALL_PARALLEL_STYLES["ep_dispatch_experts"]
    for layer, row in zip(layers, phy2log, strict=True):
        experts = layer.experts
        params = _stacked_params(experts)
        local = [p.to_local() for _, p in params]
        grown = _fill_slots(local, row, layer.num_logical_experts, ep_rank, ep_size, group)
        for (pname, p), rows in zip(params, grown, strict=True):
            global_shape = (num_slots,) + tuple(rows.shape[1:])
            dt = DTensor.from_local(rows, ep_mesh, [Shard(0)], run_check=False,
                                    shape=global_shape,
                                    stride=torch.empty(global_shape, device="meta").stride())
            experts._parameters[pname] = torch.nn.Parameter(dt, requires_grad=p.requires_grad)
        experts.num_experts = num_slots // ep_size
        experts.eplb_num_logical_experts = layer.num_logical_experts
        experts.eplb_inner_ep_implementation = ep_implementation
        experts.eplb_ep_rank, experts.eplb_ep_size = ep_rank, ep_size
        _register_state(experts, row, layer.num_logical_experts, ep_rank, ep_size,
                        local[0].device)
        # Drop transformers' ep_forward (an instance attribute) so the style reinstalls the
        # dispatch around the class forward, now with S local experts.
        del experts.forward
        dispatch.install_forward(experts, ep_mesh=ep_mesh, tp_mesh=tp_mesh,
                                 ep_implementation=EP_IMPLEMENTATION)
    return layers




def _check_same_experts(layers: list[TransformersMoELayer]) -> None:
    """Dynamic EPLB moves every layer's weights through the same staging buffers: the layers'
    experts must agree in shape and dtype (what the updator checks after the grow, checked
    here before it, when a refusal still changes nothing)."""
    def kind(layer):
        return [(pname, tuple(p.shape[1:]), p.dtype) for pname, p in _stacked_params(layer.experts)]

    first = kind(layers[0])
    for layer in layers[1:]:
        if kind(layer) != first:
            raise AdapterError(f"{_where(layer.name, layer.experts)}: expert weights "
                               f"{kind(layer)} differ in shape or dtype from layer "
                               f"{layers[0].name!r} {first}; dynamic EPLB moves every layer "
                               "through the same buffers (dynamic_eplb=False records only)")


def _agreed_preparation(model, group, num_redundant_experts, expert_map, ep_implementation,
                        cfg=None) -> _Preparation:
    """:func:`_check_prepare` (with ``cfg``, attach's: also what the updator would refuse about
    it, and rank 0's check of its expert_map_record_path folder) agreed by every rank of the EP
    group in one all-reduce before anything changes. What can fail on one rank alone (the
    expert map file missing there, a different map there, rank 0's record folder) is refused
    on every rank together: the failing rank raises its own error, the others one naming it,
    and ranks whose initial placements differ all raise ValueError; no rank is left waiting in
    the grow's exchange for one that raised, and none grows from another placement."""
    from ..updator import agree, check_config_fits

    ep_mesh, _ = _meshes(model)
    ep_group = ep_mesh.get_group()
    if group is not None and (dist.get_process_group_ranks(group)
                              != dist.get_process_group_ranks(ep_group)):
        raise ValueError(f"group must hold the ranks of the model's EP mesh "
                         f"{dist.get_process_group_ranks(ep_group)}, got "
                         f"{dist.get_process_group_ranks(group)}")  # (the same on every rank)
    group = ep_group if group is None else group
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    error, record_error, prep = None, False, None
    try:
        prep = _check_prepare(model, group, num_redundant_experts, expert_map,
                              ep_implementation)
        if cfg is not None:
            # Growing cannot be undone, so what the updator would refuse about the config is
            # refused here, before the first layer changes.
            check_config_fits(cfg, prep.layers[0].num_logical_experts, prep.num_slots, size)
            if cfg.dynamic_eplb:
                _check_same_experts(prep.layers)
            if cfg.expert_map_record_path is not None and rank == 0:  # (rank 0 writes it)
                record_error = True
                check_writable_dir(cfg.expert_map_record_path, "expert_map_record_path",
                                   create=True)
                record_error = False
    except (ValueError, OSError) as e:  # (AdapterError is a ValueError)
        error = e
    d = digest(prep.phy2log) if prep is not None else 0
    # the smallest of (2 * failing rank + whether it was the record folder, or 2 * size)
    code = 2 * size if error is None else 2 * rank + int(record_error)
    device = ep_mesh.device_type
    if device != "cpu":
        device = torch.device(device, getattr(torch, device).current_device())
    code, (same,) = agree(group, device, code, [d])
    if error is not None:
        raise error
    if code < 2 * size and code % 2:
        raise ValueError(f"expert_map_record_path: rank {code // 2} of the EP group cannot "
                         "write it (its own error says why); nothing was changed")
    if code < 2 * size:
        raise RuntimeError(f"rank {code // 2} of the EP group refused (its own error says "
                           "why); nothing was changed on this rank")
    if not same:
        raise ValueError("the EP group's ranks start from different placements (an expert map "
                         "that differs between hosts?); every rank must load the same one; "
                         "nothing was changed")
    return prep


@register_adapter
def transformers_experts_adapter(name: str, module: torch.nn.Module, ep_rank: int,
                                 ep_size: int) -> MoELayerAdapter | None:
    """Adapter for ``eplb_native.attach``: a transformers experts module prepared by
    :func:`prepare` -> its MoELayerAdapter; None for any other module. An experts module that
    was not prepared raises AdapterError (it has no slots or routing yet)."""
    if not hasattr(module, "is_transposed") or not _stacked_params(module):
        return None
    where = _where(name, module)
    if not hasattr(module, "eplb_phy2log"):
        raise AdapterError(f"{where}: call eplb_native.integrations.transformers.attach(model, "
                           "config, group): it grows the slots and installs the routing")
    if (module.eplb_ep_rank, module.eplb_ep_size) != (ep_rank, ep_size):
        raise AdapterError(f"{where}: prepared for EP rank {module.eplb_ep_rank} of "
                           f"{module.eplb_ep_size}, attach's group gives {ep_rank} of {ep_size}")
    # detached views of the parameters' local shards: the updator writes rows in place
    weights = [p.to_local().detach() for _, p in _stacked_params(module)]
    return MoELayerAdapter(name=name, module=module, weights=weights,
                           phy2log=module.eplb_phy2log, log2phy=module.eplb_log2phy,
                           logcnt=module.eplb_logcnt, load=module.eplb_load,
                           record=module.eplb_record, ep_rank=ep_rank, ep_size=ep_size)


def _expert_groups(model: torch.nn.Module, num_logical: int) -> int:
    """The model's expert groups (DeepSeek-V3's ``n_group`` = 8: its router picks the top
    groups first, and DeepSeek's placement keeps a group's experts together), as vLLM
    (``num_expert_groups``) and SGLang (``n_group``) read them; 1 when the config has none or
    they do not divide the experts."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("n_group", "num_expert_group"):
        n = getattr(text, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 1 and num_logical % n == 0:
            return n
    return 1


def attach(model: torch.nn.Module, config=None, group=None, *,
           num_redundant_experts: int | None = None, expert_map=None,
           ep_implementation: str | None = None, hooks: bool = True):
    """``eplb_native.attach`` for a transformers MoE model under transformers' expert
    parallelism: :func:`prepare` (slots + routing), then the updator on the prepared layers.

    Args:
        model: loaded on every rank with ``DistributedConfig(tp_size=N, ep_size=N,
            tp_plan="auto")`` (or any layout with ``ep_size > 1``).
        config: anything ``eplb_native.EplbConfig.parse`` takes; its ``num_redundant_experts``
            and ``expert_map_path`` give the initial slots unless the keywords do. Its
            ``num_groups`` left unset takes the model's expert groups (``n_group``).
        group: the EP process group (default: the model's EP mesh group).
        num_redundant_experts, expert_map, ep_implementation: see :func:`prepare`.
        hooks: one updator step per forward of ``model`` (False: call
            ``updator.forward_before()`` / ``forward_end()`` yourself).

    Collective: call on every rank of the EP group. Returns the ``eplb_native`` updator.
    """
    from ..config import EplbConfig
    from ..updator import attach as _attach
    from ..updator import check_group

    check_group(group)  # (before anything grows: the updator's own checks come after)
    hooks = check_bool(hooks, "hooks")
    cfg = EplbConfig.parse(config)
    # The keywords win over the config's keys: the updator gets the config as prepared (the
    # keyword's redundancy; no expert_map_path, which would move every layer again to another
    # map right after the grow placed them by the keyword's).
    if num_redundant_experts is None:
        num_redundant_experts = cfg.num_redundant_experts
    else:
        cfg = dataclasses.replace(
            cfg, num_redundant_experts=check_int(num_redundant_experts, "num_redundant_experts", 0))
    if expert_map is None:
        expert_map = cfg.expert_map_path
    else:
        cfg = dataclasses.replace(cfg, expert_map_path=None)
    if cfg.num_groups is None:
        # the model's expert groups, as vLLM and SGLang plan with them; before the agreed check
        # of the config against the layers, which must see them (after it, a config they do not
        # fit failed once the layers had grown)
        try:
            layers = find_moe_layers(model)
        except Exception:  # noqa: BLE001  (the agreed preparation refuses such a model)
            layers = []
        groups = _expert_groups(model, layers[0].num_logical_experts) if layers else 1
        if groups > 1:
            cfg = dataclasses.replace(cfg, num_groups=groups)
            logger.info("eplb_native: num_groups %d, the model's expert groups (n_group); "
                        "set num_groups in the config to plan otherwise", groups)
    prep = _agreed_preparation(model, group, num_redundant_experts, expert_map,
                               ep_implementation, cfg)
    _grow(prep)
    _install_logical_save(model)
    try:
        return _attach(model, cfg, prep.group, hooks=hooks)
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note("eplb_native: the model's MoE layers were already grown to their "
                         "slots and route through eplb_native's ops (outputs unchanged); "
                         "eplb_native.attach(model, config, group) on the prepared model "
                         "retries the updator alone")
        raise
