"""The updator: records load, plans, moves expert weights and swaps placements while serving.

``updator = eplb_native.attach(model, config, group)`` finds the model's MoE layers through the
adapter protocol (``eplb_native.adapters``) and runs the cycle of DESIGN.md, one *step* per
forward of the model (forward hooks), or per ``forward_before()`` / ``forward_end()`` pair when
the engine owns its loop (``attach(..., hooks=False)``):

1. after each forward, each layer's per-slot load [P] is folded into a per-step logical load
   (on a side stream ordered after the forward by an event on CUDA / NPU; the next forward waits
   for the fold, so no count is lost or counted twice) and reset;
2. every ``expert_heat_collection_interval`` steps the window (last ``window_size`` steps) is
   all-gathered into a buffer allocated once and submitted to the C++ ``Planner`` (returns at
   once; the plan is computed on its thread);
3. ``algorithm_execution_interval`` steps later (waiting then only if the plan is late) the
   ranks agree, in one small all-reduce, that every rank has the plan and that it is the same
   one (a digest); a plan that failed anywhere is logged and the placement kept. Then the
   changed layers move, ``layers_per_step`` per step: P2P (one message per peer and weight
   tensor, see eplb_native.transfer) issued before the forward on a side stream into staging
   buffers allocated once, waited after it. With ``max_move_bytes_per_step`` a layer's
   messages may be split over several steps (at most that many bytes received and sent per
   rank and step, at least one expert), ``layers_per_step`` layers in flight at a time;
4. a layer switches (weights copied in, then phy2log / log2phy / logcnt / local map) only once
   every step of its move finished on every rank, agreed after each step by one small
   all-reduce over a CPU group; otherwise (an exception while issuing or waiting,
   ``transfer_timeout_s`` for one step) every rank drops that layer's move, keeps its old
   placement, logs why, and the next cycle plans from the old placement again.

Every rank runs the same steps in the same order, so every decision (when to gather, the plan,
which layers move) is identical on every rank.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import re
import socket
import time
import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from . import expert_map, metrics, state
from ._util import check_bool, check_int, check_writable_dir, digest
from .adapters.base import AdapterError, MoELayerAdapter, adapt_module
from .config import EplbConfig
from .planner import Planner, plan
from .transfer import LayerMove, MoveLayout, StepBudget, layer_schedule, prepare_layout

logger = logging.getLogger("eplb_native")

#: windows of recorded load kept for save_trace (58 layers x 256 experts: 119 KB each)
MAX_RECORDED_WINDOWS = 4096

#: fault_hook(cycle, layer, phase) -> delay seconds or None; may raise. Phases: "issue" (inside
#: each step's issue, just before posting this rank's P2P ops: a returned delay defers posting
#: on a thread, an exception fails the move) and "complete" (after waiting).
FaultHook = Callable[[int, int, str], "float | None"]


class _Moving:
    """A layer whose move started and has not been committed or dropped."""

    __slots__ = ("layer", "new", "move", "staging", "issued_step", "error")

    def __init__(self, layer: int, new: np.ndarray, staging: int, issued_step: int):
        self.layer, self.new, self.staging, self.issued_step = layer, new, staging, issued_step
        self.move: LayerMove | None = None
        self.error: BaseException | None = None  # building the move failed (move is None)


def _device_api(device: torch.device):
    """torch.cuda / torch.npu for a device with streams, None on CPU."""
    if device.type == "cpu":
        return None
    return getattr(torch, device.type, None)


def check_config_fits(config: EplbConfig, num_logical: int, num_slots: int,
                      num_ranks: int) -> None:
    """Raises ValueError where ``config`` does not fit MoE layers of ``num_logical`` experts in
    ``num_slots`` slots over ``num_ranks`` ranks: the redundant count, and the planner's
    topology rules, checked at attach so a bad config does not fail (and get logged) at every
    planning cycle instead."""
    if config.num_redundant_experts is not None and (
            config.num_redundant_experts != num_slots - num_logical):
        raise ValueError(f"num_redundant_experts ({config.num_redundant_experts}) must equal "
                         f"the layers' slots - experts ({num_slots} - {num_logical})")
    nodes, groups = config.node_count, config.group_count
    if num_ranks % nodes:
        raise ValueError(f"num_nodes ({nodes}) must divide the layers' ep_size ({num_ranks})")
    if _uses_groups(config) and num_logical % groups:
        raise ValueError(f"num_groups ({groups}) must divide the layers' logical experts "
                         f"({num_logical}) for the hierarchical policy (num_groups % "
                         f"num_nodes == 0{'' if nodes > 1 else ', policy deepseek'})")
    if config.distinct_ranks:
        packs = nodes if nodes > 1 and groups % nodes == 0 else 1
        per_rank = num_slots // num_ranks
        if num_logical // packs < per_rank:
            raise ValueError(f"distinct_ranks needs at least as many logical experts"
                             f"{' per node' if packs > 1 else ''} ({num_logical // packs}) as "
                             f"slots per rank ({per_rank}): otherwise some rank must hold an "
                             f"expert twice")


def layers_to_move(plan, current: np.ndarray, num_ranks: int, distinct_ranks: bool) -> list[int]:
    """The layers of ``plan`` (planned from ``current`` [L, P]) worth moving: a layer moves only
    if the plan balances its window better than the current placement does (moving costs
    bandwidth and gains nothing otherwise) or, with ``distinct_ranks``, if the current
    placement repeats an expert on one of its ranks (a loaded expert map, say: the plan removes
    what the option forbids, even where it balances no better)."""
    before, after = plan.balancedness_before, plan.balancedness_after
    repeats = ({layer for layer, _, _ in expert_map.repeated_on_a_rank(current, num_ranks)}
               if distinct_ranks else set())
    return [layer for layer in range(current.shape[0])
            if not np.array_equal(plan.phy2log[layer], current[layer])
            and (layer in repeats or not after[layer] <= before[layer] + 1e-9)]


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _short_ids(ids: list[int]) -> str:
    return str(ids) if len(ids) <= 8 else f"[{ids[0]}, {ids[1]}, ..., {ids[-1]}]"


def _hidden_layer_indices(layers: list[MoELayerAdapter]) -> list[int] | None:
    """Each MoE layer's hidden-layer index, read from its module name (``model.layers.3.mlp``:
    3, as Hugging Face, vLLM and SGLang name decoder layers), which an SGLang start file's rows
    follow; None unless every name holds one and they increase."""
    ids = []
    for a in layers:
        found = _LAYER_INDEX.findall(a.name)
        if len(found) != 1:
            return None
        ids.append(int(found[0]))
    return ids if all(b > a for a, b in zip(ids, ids[1:], strict=False)) else None


class Updator:
    """Drives the EPLB cycle over ``layers`` (one MoELayerAdapter per MoE layer, model order).

    Attributes:
        layers: the adapters. config: the EplbConfig. stats: metrics.UpdatorStats history.
        step: forwards seen. cycle: plans submitted.
        fault_hook: tests' fault injection (see FaultHook), None normally.
    """

    def __init__(self, layers: list[MoELayerAdapter], config: EplbConfig, group=None):
        if not layers:
            raise ValueError("no MoE layers to balance")
        first = layers[0]
        for a in layers[1:]:
            if (a.num_logical_experts, a.num_slots, a.ep_size, a.ep_rank) != (
                    first.num_logical_experts, first.num_slots, first.ep_size, first.ep_rank):
                raise AdapterError(f"MoE layer {a.name!r} has E={a.num_logical_experts}, "
                                   f"P={a.num_slots}, ep_size={a.ep_size} unlike layer "
                                   f"{first.name!r} (E={first.num_logical_experts}, "
                                   f"P={first.num_slots}, ep_size={first.ep_size})")
        for a in layers[1:]:  # (one load ring and one staging set serve every layer)
            if a.device != first.device:
                raise AdapterError(f"MoE layer {a.name!r} is on {a.device}, layer "
                                   f"{first.name!r} on {first.device}; every MoE layer must be "
                                   "on one device")
        self.layers, self.config = layers, config
        self.num_layers, self.num_logical = len(layers), first.num_logical_experts
        self.num_slots, self.num_ranks, self.rank = first.num_slots, first.ep_size, first.ep_rank
        self.num_local = first.num_local_slots
        self.device = first.device
        # host mirror of every layer's phy2log [L, P]: the updator is the only writer
        placement = np.stack([a.phy2log.detach().cpu().numpy() for a in layers])
        # A config that does not fit the layers: said at once where no other rank can be
        # waiting (one rank; no process group), else agreed with the other ranks' set-up below
        # (raised on one rank alone, it left the others waiting in new_group: review 18).
        misfit: Exception | None = None
        try:
            check_config_fits(config, self.num_logical, self.num_slots, self.num_ranks)
        except ValueError as e:
            if self.num_ranks == 1 or (group is None and not dist.is_initialized()):
                raise
            misfit = e
        if self.num_ranks > 1:
            if group is None:
                if not dist.is_initialized():
                    raise ValueError("group is required: the layers span "
                                     f"{self.num_ranks} ranks but torch.distributed is not "
                                     "initialized")
                group = dist.group.WORLD
            if dist.get_world_size(group) != self.num_ranks or dist.get_rank(group) != self.rank:
                raise ValueError(f"group has size {dist.get_world_size(group)} / rank "
                                 f"{dist.get_rank(group)}, the layers ep_size {self.num_ranks}"
                                 f" / ep_rank {self.rank}")
            ranks = dist.get_process_group_ranks(group)
            # Moves get their own communicator so their P2P never interleaves with the model's
            # collectives; agreement runs on a CPU (gloo) group so it never syncs the device.
            # (_take_group: created by this EP group's ranks alone, reused after a shutdown)
            self._move_group = _take_group(ranks, None)
            if dist.get_backend(group) == "gloo":
                self._cpu_group = group
            else:
                self._cpu_group = _take_group(ranks, "gloo")
        else:
            self._move_group = self._cpu_group = None
        self.group = group
        # The first collective: every rank gathers the hosts (even one whose config sets
        # num_nodes, so that ranks whose configs differ there do not wait on different calls;
        # their configs differ, and their plans then, which the plan's agreement refuses)
        try:
            nodes = self._count_nodes()
        except BaseException:
            self._release_groups()
            raise
        if config.num_nodes is None:
            config = self.config = dataclasses.replace(config, num_nodes=nodes)
        self.stats = metrics.UpdatorStats()
        self._placement = placement
        # The adapters' tensors that are the layers' own parameters / buffers (by storage): a
        # model.to(dtype or device), .half() or load_state_dict(assign=True) after attach
        # replaces them, and moving rows into the old ones, then switching the live maps,
        # would corrupt the outputs. Checked at each gather and before each map switch.
        self._tracked = [_tracked_storages(a) for a in layers]
        if config.dynamic_eplb and any(a.module.training and any(
                p.requires_grad for p in a.module.parameters()) for a in layers):
            logger.warning(
                "eplb_native: dynamic EPLB on MoE layers in training mode with trainable "
                "weights: moves rewrite expert weights in place after a forward, so a backward "
                "through that forward fails (autograd's in-place check). For inference call "
                "model.eval(); to train, attach with dynamic_eplb=False (recording only)")
        self._broken: str | None = None
        self._callback_error: str | None = None  # an on_placement that raised (_set_placement)
        self.fault_hook: FaultHook | None = None
        self.step = 0
        self._logged_step = 0  # the step of the last balancedness log (log_balancedness)
        self._empty_windows = 0  # windows in a row that counted nothing (-1: reported)
        self.cycle = 0
        self._api = _device_api(self.device)
        self._side = self._api.Stream(device=self.device) if self._api else None
        self._fold_done = None
        self._closed = False
        self._hooks: list = []
        self._planner = None  # started in the agreed block below (its failure is agreed)
        self._future = None
        # rank 0 with expert_map_record_path: writes the map after each rebalance, off the step
        self._recorder: concurrent.futures.ThreadPoolExecutor | None = None
        self._recorder_pid = 0  # (a forked child has the executor but not its thread)
        self._unrecorded = False  # a layer switched since the last record
        self._submit_step = 0
        self._submit_t = 0.0
        self._plan_s = float("nan")
        self._queue: list[tuple[int, np.ndarray]] = []  # (layer, new phy2log) still to move
        # layer -> (its queued new phy2log, the move's layout or the error building it raised),
        # built ahead for the layers the next issue may start (see _prepare_layouts)
        self._layouts: dict[int, tuple[np.ndarray, MoveLayout | Exception]] = {}
        self._inflight: list[_Moving] = []
        # dropped moves whose ops may still run, with their staging set: drained before reuse
        self._pending: list[tuple[LayerMove, int]] = []
        self._pending_logged = False
        self._awaiting = False  # moves issued before this step's forward, not yet finished
        # gathered windows' logical loads, [L, E] each (the newest MAX_RECORDED_WINDOWS)
        self._recorded: collections.deque = collections.deque(maxlen=MAX_RECORDED_WINDOWS)
        self._recorded_steps: collections.deque = collections.deque(maxlen=MAX_RECORDED_WINDOWS)
        # A sliding window needs one row per step; the default window (= the heat interval)
        # needs one running sum, reset at each gather.
        self._sliding = config.window_size is not None
        self._gathered_step = 0  # the step of the last gather (a window's steps: since then)
        # (counts up to the heat interval: from below 0 where the first plan comes later, from
        # above where it comes sooner, as vLLM's does)
        self._steps_in_window = (0 if config.first_plan_after is None else
                                 config.expert_heat_collection_interval - config.first_plan_after)
        self._staging: list[list[torch.Tensor]] = []
        # Rows (one slot's weights) each rank may receive / send per step; None: no limit.
        self._rows_per_step = None
        if config.max_move_bytes_per_step is not None:
            self._rows_per_step = max(1, config.max_move_bytes_per_step
                                      // max(1, first.slot_bytes()))
        # What may fail on one rank only (memory for the buffers and staging, a map file missing
        # or different on one host) is agreed by every rank before the first collective move or
        # gather: a rank that refuses never leaves the others waiting for it.
        # (Before the first collective nothing may raise on one rank only: the groups above
        # depend on the rank list alone, everything below on what each rank holds.)
        error: Exception | None = None
        target = None
        self._started_from_load = False
        try:
            if misfit is not None:
                raise misfit
            self._check_attachable(placement)
            self._allocate_buffers()
            if config.dynamic_eplb:  # (its threads may fail to start on one rank too)
                self._planner = Planner()
            if config.expert_map_record_path is not None and self.rank == 0:
                check_writable_dir(config.expert_map_record_path, "expert_map_record_path",
                                   create=True)
            if config.expert_map_path is not None:
                target = self._load_start(config.expert_map_path, layers, placement)
        except Exception as e:  # noqa: BLE001  (agreed below, then raised)
            error = e
        try:  # (a refused attach leaves no process group behind; every rank refuses alike)
            self._agree_attach(error, target, placement)
            self._free = list(range(len(self._staging)))  # staging sets no move holds
            if target is not None:
                self._apply_expert_map(target, config.expert_map_path)
        except BaseException:
            if self._planner is not None:
                self._planner.close()
                self._planner = None
            self._release_groups()
            raise
        # What the layers counted before this updator (forwards after an earlier one's shutdown,
        # whose record flag stays on) is no step of its own: its first window starts empty
        # (review 18: 720 tokens in a 4-step window of 576).
        with torch.no_grad():
            for a in layers:
                a.load.zero_()
        for a in layers:
            _live_updators[a.module] = weakref.ref(self)
        if self.rank == 0:  # (what the config means here, said once: defaults differ by source)
            logger.info("eplb_native: attached to %d MoE layers (%d experts, %d slots on %d "
                        "ranks); %s%s%s", self.num_layers, self.num_logical, self.num_slots,
                        self.num_ranks, _describe(config),
                        "" if target is None else
                        f"; started from {config.expert_map_path}" + (
                            f" (planned by {config.policy} from its logical_count)"
                            if self._started_from_load else ""),
                        f"; map recorded to {config.expert_map_record_path}"
                        if config.expert_map_record_path is not None else "")

    def _load_start(self, path, layers: list[MoELayerAdapter], placement: np.ndarray
                    ) -> np.ndarray:
        """expert_map_path's placement [L, P]. An SGLang file has a row per hidden layer: its
        MoE layers' rows are those the layers' module names give (``model.layers.7.mlp``: 7, as
        Hugging Face, vLLM and SGLang name decoder layers), where every name holds one and
        reading them succeeds; else the last L rows (the rows before them must then be a dense
        layer's)."""
        def read(moe_layers):
            self._started_from_load = False
            return expert_map.load(path, num_ranks=self.num_ranks, num_logical=self.num_logical,
                                   num_layers=self.num_layers, num_slots=self.num_slots,
                                   name="expert_map_path", moe_layers=moe_layers,
                                   plan_load=lambda load: self._plan_start(load, placement))[0]

        ids = _hidden_layer_indices(layers)
        if ids is None:
            return read(None)
        try:
            return read(ids)
        except ValueError as e:
            named = e
        try:
            return read(None)
        except ValueError as e:
            if "before its last" not in str(e):
                raise
            raise ValueError(f"{e}; the rows its MoE layers' names give ({_short_ids(ids)}) "
                             f"do not read either: {named}") from None

    def _plan_start(self, load: np.ndarray, placement: np.ndarray) -> np.ndarray:
        """The start placement planned from a load (SGLang's ``logical_count`` start file, as
        SGLang plans its own with its EPLB algorithm): the configured policy from the layers'
        placement (kept slots stay put), the same on every rank (the planner is
        deterministic; attach checks it)."""
        self._started_from_load = True
        return plan(load, placement, num_ranks=self.num_ranks, num_nodes=self.config.num_nodes,
                    num_groups=self.config.group_count, policy=self.config.policy,
                    transfers=False, distinct_ranks=self.config.distinct_ranks).phy2log

    def _check_attachable(self, placement: np.ndarray) -> None:
        """What this rank's layers must satisfy (raises; agreed by the caller)."""
        # Two updators on one layer would both move its weights and rewrite its maps, each
        # reporting a placement the other may have changed.
        for a in self.layers:
            ref = _live_updators.get(a.module)
            other = ref() if ref is not None else None
            if other is not None and not other._closed:
                raise ValueError(f"MoE layer {a.name!r} already has a live eplb_native Updator; "
                                 "call its shutdown() before attaching again")
        # The placement the layers start with is every plan's old placement: an invalid one
        # would make every cycle fail later (and only log it), so it refuses attach now.
        for a, row in zip(self.layers, placement, strict=True):
            try:
                state.validate_phy2log(row, self.num_logical, self.num_ranks)
            except ValueError as e:
                raise AdapterError(f"MoE layer {a.name!r}: its phy2log is not a valid "
                                   f"placement: {e}") from None

    def _allocate_buffers(self) -> None:
        """The buffers allocated once: per-step logical load ring, per-window rank tokens, the
        gather's send / receive buffers, and (dynamic EPLB) the staging sets."""
        w = self.config.window_size if self._sliding else 1
        dev = {"device": self.device}
        try:
            self._ring = torch.zeros(w, self.num_layers, self.num_logical, dtype=torch.int64,
                                     **dev)
            # tokens each rank's slots received, per step like the ring (what the window's
            # balancedness is measured on: the same steps as the load the plan sees)
            self._rank_tokens = torch.zeros(w, self.num_layers, self.num_ranks,
                                            dtype=torch.int64, **dev)
        except RuntimeError as e:  # (torch.OutOfMemoryError too)
            if not self._sliding:
                raise
            need = w * self.num_layers * (self.num_logical + self.num_ranks) * 8
            raise ValueError(f"window_size={w}: the per-step load ring needs {need} bytes on "
                             f"{self.device} ({type(e).__name__}: {e}); use a smaller "
                             "window_size") from None
        width = self.num_layers * (self.num_logical + self.num_ranks)
        self._send = torch.zeros(width, dtype=torch.int64, **dev)
        self._gathered = torch.zeros(self.num_ranks * width, dtype=torch.int64, **dev)
        if self.config.dynamic_eplb:
            self._allocate_staging()

    def _allocate_staging(self) -> None:
        """``layers_per_step`` staging sets (a move's receive buffers, one layer's weights
        each), allocated once; every layer's weights must match in shape and dtype."""
        first = self.layers[0]
        for a in self.layers[1:]:
            if [(t.shape, t.dtype) for t in a.weights] != [(t.shape, t.dtype)
                                                             for t in first.weights]:
                raise AdapterError(f"MoE layer {a.name!r}: expert weights differ in shape or "
                                   f"dtype from layer {first.name!r}")
        self._staging = [_staging_like(first.weights)
                         for _ in range(min(self.config.layers_per_step, self.num_layers))]

    def _count_nodes(self) -> int:
        """The nodes of the EP group for the planner: its hosts (one all-gather of a host key
        on the CPU group), where each holds an equal run of consecutive ranks and that many
        nodes fit the config (else 1, said once)."""
        if self.num_ranks == 1:
            return 1
        keys: list = [None] * self.num_ranks
        dist.all_gather_object(keys, _host_key(), group=self._cpu_group)
        if self.config.num_nodes is not None:
            return self.config.num_nodes  # (set: kept; gathered all the same, see the caller)
        nodes, why = nodes_of_hosts(keys)
        if why is None and nodes > 1:
            try:
                check_config_fits(dataclasses.replace(self.config, num_nodes=nodes),
                                  self.num_logical, self.num_slots, self.num_ranks)
            except ValueError as e:
                why = f"which the config does not fit ({e})"
        if why is None:
            return nodes
        if self.rank == 0:
            logger.warning("eplb_native: the EP group's %d ranks are on %d hosts, %s: planned as "
                           "one node (set num_nodes to choose)", self.num_ranks,
                           len(set(keys)), why)
        return 1

    def _agree_attach(self, error: Exception | None, target: np.ndarray | None,
                      placement: np.ndarray) -> None:
        """Collective: raises on every rank unless every rank set up without error, its layers
        hold the same placement as every other rank's, and it loaded the same expert map (or
        none). The failing rank raises its own error, the others a RuntimeError naming the
        lowest failing rank."""
        if self._cpu_group is None:
            if error is not None:
                raise error
            return
        failed, same = self._agree_digests(
            error is None, [digest(target), digest(placement), _config_digest(self.config)])
        if error is not None:
            raise error
        if failed < self.num_ranks:
            raise RuntimeError(f"attach refused: rank {failed} of the group failed to set up "
                               "(its own error says why); nothing was changed on this rank")
        if not same[2]:
            # (one rank's other heat interval, say, left the ranks in different collectives
            # mid-serving, a window size mixed windows of different lengths: review 18)
            raise ValueError("attach refused: the ranks' EPLB configs differ; every rank of the "
                             "group must attach with the same config (expert_map_path, "
                             "expert_map_record_path and the log settings aside)")
        if not same[1]:
            raise ValueError("attach refused: the ranks' MoE layers hold different placements "
                             "(phy2log); every rank must start from the same one (load the same "
                             "checkpoint / expert map everywhere)")
        if not same[0]:
            raise ValueError(f"expert_map_path {self.config.expert_map_path!r}: the ranks "
                             "loaded different expert maps (or some none); every rank must "
                             "load the same map")

    def _agree_digests(self, ok: bool, digests: list[int]) -> tuple[int, list[bool]]:
        """Collective (CPU group), one all-reduce: (the lowest rank whose ``ok`` is False, or
        num_ranks; for each digest, whether every rank holds the same)."""
        return agree(self._cpu_group, "cpu", self.rank if not ok else self.num_ranks, digests)

    def _release_groups(self) -> None:
        """Gives the process groups this updator took back for the next attach on the same
        ranks (every rank alike: attach and shutdown are collective)."""
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else []
        if self._move_group is not None:
            _give_back_group(self._move_group, ranks, None)
        if self._cpu_group is not None and self._cpu_group is not self.group:
            _give_back_group(self._cpu_group, ranks, "gloo")
        self._move_group = self._cpu_group = None

    # ----------------------------------------------------------------------------------------
    # placement

    def phy2log(self) -> np.ndarray:
        """The current placement of every layer, [L, P] int64 (a copy; read from the host
        mirror, so it never waits for the device)."""
        return self._placement.copy()

    def _set_placement(self, layer: int, phy2log: np.ndarray) -> None:
        self._check_tensors(layer)
        a = self.layers[layer]
        # The adapter's on_placement callback (an engine's own tables, say) runs once the maps
        # and the host mirror both say the new placement; if it raises, the step still ends
        # whole (the move committed, its staging freed) and EPLB stops at the next step, as
        # for replaced tensors (the engine's view of this layer can no longer be trusted).
        a.set_placement(phy2log, run_callback=False)
        self._placement[layer] = phy2log
        if a.on_placement is not None:
            try:
                a.on_placement(a)
            except Exception as e:  # noqa: BLE001  (stops EPLB at the next step)
                msg = (f"MoE layer {a.name!r}: its on_placement callback raised after the "
                       f"switch ({type(e).__name__}: {e}); EPLB stopped (the layer serves the "
                       "new placement)")
                logger.error("eplb_native: %s", msg)
                if self._callback_error is None:
                    self._callback_error = msg  # (broken from the next forward on)

    def _check_tensors(self, layer: int) -> None:
        """Raises (and keeps raising at every step) when layer's weights or EPLB buffers are no
        longer the module's own (see _tracked)."""
        a = self.layers[layer]
        if self._broken is None:
            now = _module_storages(a.module)
            if all(key in now for key in self._tracked[layer]):
                return
            self._broken = (
                f"MoE layer {a.name!r}: its expert weights or EPLB buffers were replaced after "
                "attach (model.to(dtype / device), .half(), load_state_dict(assign=True), ...); "
                "the updator holds the old tensors and would corrupt the outputs. EPLB stopped "
                "here (the placement in use is unchanged): call updator.shutdown() before such a "
                "change and eplb_native.attach(...) again after it")
        raise RuntimeError(self._broken)

    def _check_placement(self) -> None:
        """Raises when a layer's placement buffers no longer hold the placement the updator set
        (e.g. load_state_dict of a checkpoint taken at another placement): its moves would be
        planned from a placement the layer does not have."""
        if self._broken is None:
            for layer in range(self.num_layers):
                self._check_tensors(layer)
            live = torch.stack([a.phy2log for a in self.layers]).cpu().numpy()
            if np.array_equal(live, self._placement):
                return
            layer = int(np.nonzero((live != self._placement).any(1))[0][0])
            self._broken = (
                f"MoE layer {self.layers[layer].name!r}: its placement buffers changed behind "
                "the updator (load_state_dict of a checkpoint taken at another placement?); "
                "EPLB stopped here: load checkpoints before eplb_native.attach(...), or call "
                "updator.shutdown() first and attach again after")
        raise RuntimeError(self._broken)

    def _apply_expert_map(self, target: np.ndarray, path) -> None:
        """Moves every layer's weights to the expert map's placement ``target`` [L, P] (loaded
        from ``path``, the same on every rank), at attach: all layers or none. Each layer's move
        is agreed by every rank before any commits it, so all ranks commit the same layers;
        when one fails, the layers already moved are moved back, so the refused attach leaves
        the model as it was."""
        original = self._placement.copy()
        moved, failed = self._move_now(dict(enumerate(target)),
                                       self._staging[0] if self._staging else None)
        if failed is None:
            return
        layer, reason = failed
        what = (f"moving layer {self.layers[layer].name!r} to the expert map {path} failed "
                f"({reason})")
        # (fresh staging: the failed move may still receive into the first one)
        back, failed_back = self._move_now({i: original[i] for i in reversed(moved)}, None)
        if failed_back is None:
            raise RuntimeError(f"{what}; the {len(moved)} layers moved before it were moved "
                               "back, the model is as it was")
        still = sorted(set(moved) - set(back))
        raise RuntimeError(f"{what}, and moving the layers before it back failed too "
                           f"({failed_back[1]}): layers {still} hold the expert map's placement "
                           "(their routing tensors follow it), the others their original one. "
                           "Reload the model")

    def _move_now(self, targets: dict[int, np.ndarray], staging: list[torch.Tensor] | None
                  ) -> tuple[list[int], tuple[int, str] | None]:
        """Moves layers to ``targets`` (layer -> phy2log [P]) one after another, outside the
        cycle (at attach), receiving into ``staging`` (None: a new set). Collective. Every rank
        agrees on each layer's outcome before committing it; the first layer that fails on any
        rank stops the walk there on every rank. Returns (the layers moved, in order; None or
        (failed layer, reason))."""
        moved: list[int] = []
        if not targets:
            return moved, None
        if staging is None:
            reason = ""
            try:
                staging = _staging_like(self.layers[0].weights)
            except Exception as e:  # noqa: BLE001  (e.g. out of memory on one rank: agreed)
                reason = f"staging buffers: {type(e).__name__}: {e}"
            if not self._agreed(not reason):
                return moved, (next(iter(targets)),
                               reason or "another rank could not allocate staging buffers")
        stream = self._api.current_stream(self.device) if self._api else None
        for layer, new in targets.items():
            old = self._placement[layer]
            if np.array_equal(old, new):
                continue
            a = self.layers[layer]
            reason = ""
            move = None
            try:
                fills = layer_schedule(old, new, self.num_ranks, self.config.num_nodes)
                move = LayerMove(a.weights, staging, fills, self.rank, self._move_group, stream,
                                 tag=layer, batched=self.config.enable_migration_batching)
                move.issue()
                if not move.wait(time.perf_counter() + self.config.transfer_timeout_s):
                    reason = (f"transfers not done within transfer_timeout_s="
                              f"{self.config.transfer_timeout_s}")
            except Exception as e:  # noqa: BLE001  (agreed below, then reported)
                reason = f"{type(e).__name__}: {e}"
            if not self._agreed(not reason):
                self._sync_device()
                return moved, (layer, reason or "another rank failed its transfers")
            self._check_tensors(layer)  # before any weight is written: nothing half-switched
            move.commit()
            self._set_placement(layer, new)
            moved.append(layer)
        self._sync_device()
        return moved, None

    def _agreed(self, ok: bool) -> bool:
        """Collective (CPU group): True when ``ok`` on every rank."""
        if self._cpu_group is None:
            return ok
        return self._agree_digests(ok, [])[0] == self.num_ranks

    # ----------------------------------------------------------------------------------------
    # the step

    def forward_before(self) -> None:
        """Call before each forward of the model (the pre-hook does): makes the forward wait for
        the last fold, and issues the next layers' moves. Not with hooks (attach's default):
        they call it, and a second call a forward would count two steps."""
        self._not_hooked("forward_before")
        self._before()

    def _not_hooked(self, name: str) -> None:
        if self._hooks:
            raise RuntimeError(f"{name}: this Updator's forward hooks step it (attach's "
                               f"hooks=True, the default); attach with hooks=False to call "
                               f"forward_before() / forward_end() yourself")

    def _before(self) -> None:
        if self._closed:
            return
        if self._broken is None and self._callback_error is not None:
            self._broken = self._callback_error
        if self._broken is not None:
            raise RuntimeError(self._broken)
        if self._fold_done is not None:
            self._api.current_stream(self.device).wait_event(self._fold_done)
            self._fold_done = None
        if (self._queue or self._inflight) and not self._awaiting:
            self._issue_moves()

    def forward_end(self) -> None:
        """Call after each forward (the hook does): folds the load, finishes in-flight moves,
        gathers / plans on schedule. Not with hooks (see forward_before)."""
        self._not_hooked("forward_end")
        self._end()

    def _end(self) -> None:
        if self._closed:
            return
        if self._broken is not None:
            raise RuntimeError(self._broken)
        self.step += 1
        self._fold()
        if self._awaiting:
            self._finish_moves()
        self._steps_in_window += 1
        if self._steps_in_window >= self.config.expert_heat_collection_interval:
            self._steps_in_window = 0
            self._gather_and_plan()
        if (self._future is not None and
                self.step - self._submit_step >= self.config.algorithm_execution_interval):
            self._take_plan()

    @torch.no_grad()
    def _fold(self) -> None:
        ring = self._ring[(self.step - 1) % self._ring.shape[0]]
        tokens = self._rank_tokens[(self.step - 1) % self._ring.shape[0]]
        sliding = self._sliding
        if self._api is not None:
            produced = self._api.Event()
            produced.record(self._api.current_stream(self.device))
            self._side.wait_event(produced)
            ctx = self._api.stream(self._side)
        else:
            ctx = _Null()
        with ctx:
            loads = [a.load for a in self.layers]
            if len({t.dtype for t in loads}) == 1:
                # every layer in a handful of kernels (a few per layer made the fold's host
                # time, paid every step, grow with the layer count: ~350 launches at 58 layers)
                slot_load = torch.stack(loads).to(torch.int64)  # [L, P]
                if sliding:
                    ring.zero_()
                    tokens.zero_()
                ring.scatter_add_(1, torch.stack([a.phy2log for a in self.layers]), slot_load)
                tokens += slot_load.view(self.num_layers, self.num_ranks, -1).sum(2)
                torch._foreach_zero_(loads)
            else:  # (layers counting in different dtypes: one at a time)
                for layer, a in enumerate(self.layers):
                    row = ring[layer]
                    if sliding:
                        row.zero_()
                        tokens[layer].zero_()
                    row.scatter_add_(0, a.phy2log, a.load.to(torch.int64))
                    tokens[layer] += a.load.view(self.num_ranks, -1).sum(1).to(torch.int64)
                    a.load.zero_()
        if self._api is not None:
            self._fold_done = self._api.Event()
            self._fold_done.record(self._side)

    def _gather_and_plan(self) -> None:
        """All-gathers the window and submits it to the planner (every rank, same step)."""
        if self._planner is not None:  # (recording only moves nothing: nothing to corrupt)
            self._check_placement()
        e, r, n = self.num_logical, self.num_ranks, self.num_layers
        # steps of load in the window: a sliding one's last window_size steps (fewer at
        # first); else every step since the last gather (the first may differ from the heat
        # interval: first_plan_after)
        steps = (min(self.step, self.config.window_steps) if self._sliding else
                 self.step - self._gathered_step)
        self._gathered_step = self.step
        ctx = self._api.stream(self._side) if self._api is not None else _Null()
        with ctx:
            self._send[:n * e].copy_(self._ring.sum(0).view(-1))
            self._send[n * e:].copy_(self._rank_tokens.sum(0).view(-1))
            if not self._sliding:
                self._ring.zero_()
                self._rank_tokens.zero_()
            if self.group is not None:
                _all_gather_into_tensor(self._gathered, self._send, group=self.group)
                total = self._gathered.view(r, -1).sum(0)
            else:
                total = self._send
            total = total.cpu().numpy()  # waits for the gather (once per window)
        load = total[:n * e].reshape(n, e)
        rank_tokens = total[n * e:].reshape(n, r)
        balancedness = metrics.measured_balancedness(rank_tokens)
        window = {"step": self.step, "balancedness": balancedness,
                  "tokens": int(rank_tokens.sum()), "steps": steps, "skipped": False}
        self.stats.windows.append(window)
        self._recorded.append(load.copy())
        self._recorded_steps.append(steps)
        if self._empty_windows >= 0:
            # Layers whose routing does not call eplb_native's ops count nothing, and nothing is
            # ever rebalanced: said once, by rank 0 (every rank gathered the same sum), after
            # two windows in a row (one may be warm-up or graph capture without tokens)
            self._empty_windows = 0 if load.any() else self._empty_windows + 1
            if self._empty_windows == 2:
                self._empty_windows = -1
                if self.rank == 0:
                    logger.warning(
                        "eplb_native: two windows in a row (to step %d) counted no tokens on any "
                        "MoE layer: the layers' routing does not call eplb_native's "
                        "map_and_record (or its adapter's), or no tokens reached them; %s",
                        self.step, "nothing is rebalanced while it lasts" if
                        self.config.dynamic_eplb else "the recorded load is empty")
        # Every log_balancedness_interval steps, as vLLM's: the first window gathered at or
        # after each multiple of it (balancedness is measured per window, so an interval
        # shorter than the window logs every window).
        interval = self.config.log_balancedness_interval
        if self.config.log_balancedness and self.step // interval > self._logged_step // interval:
            self._logged_step = self.step
            metrics.log_window(self.step, balancedness)
        if self._planner is None or self._future is not None or self._queue or self._inflight:
            return  # recording only, or the previous cycle is still running
        mean = float(balancedness.mean())
        if mean > self.config.balancedness_threshold:
            # balanced enough (SGLang's eplb_min_rebalancing_utilization_threshold): no plan,
            # no moves; every rank gathered the same tokens, so every rank skips alike
            window["skipped"] = True
            if self.rank == 0:
                logger.info("eplb_native: step %d: balancedness %.4f is above "
                            "balancedness_threshold %.4f: no rebalance this window", self.step,
                            mean, self.config.balancedness_threshold)
            return
        self.cycle += 1
        self._submit_step, self._submit_t = self.step, time.perf_counter()
        # transfers=False: each layer's move is scheduled when it is queued (the same C++
        # transfer plan, one layer at a time: transfer.layer_schedule / MoveLayout), so layers a
        # later plan drops or replaces cost nothing
        try:
            self._future = self._planner.submit(
                load.astype(np.float64), self.phy2log(), num_ranks=self.num_ranks,
                num_nodes=self.config.num_nodes, num_groups=self.config.group_count,
                policy=self.config.policy, transfers=False,
                distinct_ranks=self.config.distinct_ranks)
        except Exception as e:  # noqa: BLE001  (a failed plan: agreed and logged at the take)
            self._future = concurrent.futures.Future()
            self._future.set_exception(e)
        self._future.add_done_callback(self._plan_done)
        if not self.config.use_async:
            concurrent.futures.wait([self._future])  # its failure is the take's to report

    def _plan_done(self, _fut) -> None:
        self._plan_s = time.perf_counter() - self._submit_t

    def _take_plan(self) -> None:
        fut, self._future = self._future, None
        plan, error, to_move = None, None, None
        current = self.phy2log()
        try:
            plan = fut.result()  # blocks only if the plan is late
            to_move = layers_to_move(plan, current, self.num_ranks, self.config.distinct_ranks)
        except Exception as e:  # noqa: BLE001  (agreed below)
            error = e
        # Every rank takes the plan at the same step. Bad input fails on every rank alike, but
        # a resource failure (memory, a dead thread) may fail on one only, and a plan that came
        # out different on one rank would pair the moves' messages wrongly: the ranks agree on
        # the outcome and on the plan itself (a digest of it and of the layers it moves, which
        # compare floats of each rank's own) before any moves.
        if self._cpu_group is not None:
            agreed = None if plan is None else np.concatenate(
                [plan.phy2log.ravel(), np.asarray(to_move, dtype=np.int64)])
            failed, same = self._agree_digests(error is None, [digest(agreed)])
            if error is None and failed < self.num_ranks:
                error = RuntimeError(f"rank {failed} could not plan (its log says why)")
            elif error is None and not same[0]:
                error = RuntimeError("the ranks computed different plans")
        if error is not None:
            logger.warning("eplb cycle %d: planning failed, placement unchanged: %s",
                           self.cycle, error)
            return
        self.stats.plans.append({
            "step": self.step, "cycle": self.cycle,
            "balancedness_before": plan.balancedness_before,
            "balancedness_after": plan.balancedness_after,
            "moved_slots": plan.moved_slots.copy(),
            "planner_s": self._plan_s,
        })
        self._queue = [(layer, plan.phy2log[layer].copy()) for layer in to_move]
        self._prepare_layouts()
        self.stats.plans[-1]["layers_to_move"] = [layer for layer, _ in self._queue]
        if self.config.log_balancedness:
            logger.info("eplb cycle %d: plan in sample balancedness before %s after %s; "
                        "%d layers to move", self.cycle,
                        metrics.summary(plan.balancedness_before),
                        metrics.summary(plan.balancedness_after), len(self._queue))

    def move_to(self, phy2log) -> int:
        """Queues a move of every layer to ``phy2log`` [L, P] (e.g. a placement planned
        elsewhere); the layers move at the next steps exactly like a plan's. Collective: every
        rank calls it at the same step with the same placement (agreed in one small all-reduce:
        a rank refusing it, or a different placement anywhere, refuses it on every rank, nothing
        queued). Refused, as a plan is, where a layer's placement buffers or tensors changed
        behind the updator (load_state_dict of a checkpoint at another placement). Returns the
        layers queued."""
        if self._closed:
            raise RuntimeError("this Updator is shut down; attach again to move")
        error: Exception | None = None
        target = None
        try:
            target = state.validate_phy2log(phy2log, self.num_logical, self.num_ranks)
            if target.shape != (self.num_layers, self.num_slots):
                raise ValueError(f"phy2log must have shape [{self.num_layers}, "
                                 f"{self.num_slots}], got {list(target.shape)}")
            if self._queue or self._inflight or self._future is not None:
                raise RuntimeError("a move or plan is in progress; call move_to between cycles")
            # (a move planned from a placement the layers no longer hold lands rows in the
            # wrong slots: load_state_dict of another placement's checkpoint, review 18)
            self._check_placement()
        except (ValueError, TypeError, RuntimeError) as e:
            error, target = e, None
        if self._cpu_group is not None:
            # (different placements would pair the moves' messages wrongly: they time out, or
            # land rows in the wrong slots)
            failed, same = self._agree_digests(error is None, [digest(target)])
            if error is None and failed < self.num_ranks:
                error = RuntimeError(f"move_to refused: rank {failed} refused it (its error says "
                                     "why); nothing was queued")
            elif error is None and not same[0]:
                error = ValueError("move_to: the ranks passed different placements; every rank "
                                   "must pass the same phy2log (nothing was queued)")
        if error is not None:
            raise error
        current = self.phy2log()
        self._queue = [(layer, target[layer].copy()) for layer in range(self.num_layers)
                       if not np.array_equal(target[layer], current[layer])]
        if self._queue and not self._staging:  # dynamic_eplb off: no staging allocated yet
            # (agreed: a rank that cannot allocate, out of memory say, must not leave the others
            # posting moves it never joins)
            error = None
            try:
                self._allocate_staging()
            except Exception as e:  # noqa: BLE001  (agreed, then raised)
                error = e
            if not self._agreed(error is None):
                self._queue, self._staging = [], []
                raise error if error is not None else RuntimeError(
                    "move_to refused: another rank could not allocate its staging buffers; "
                    "nothing was queued")
            self._free = list(range(len(self._staging)))
        self._prepare_layouts()
        return len(self._queue)

    def _prepare_layouts(self) -> None:
        """Builds the layouts (schedule + messages, host work) of the queued layers the next
        issue may start, so the step that issues them only posts. Called after a forward was
        queued (before waiting for its transfers) or between steps, where the host is ahead
        of the device; a failure is kept and reported when the layer is issued."""
        for layer, new in self._queue[:len(self._staging)]:
            if layer in self._layouts:
                continue
            try:
                lay: MoveLayout | Exception = prepare_layout(
                    self._placement[layer], new, self.num_ranks, self.config.num_nodes)
            except Exception as e:  # noqa: BLE001  (the same on every rank: a pure function)
                lay = e
            self._layouts[layer] = (new, lay)

    def _layout(self, layer: int, new: np.ndarray) -> MoveLayout:
        """The layout prepared for ``layer``'s move to ``new`` (built now if it was not)."""
        ready = self._layouts.pop(layer, None)
        if ready is None or ready[0] is not new:
            return prepare_layout(self._placement[layer], new, self.num_ranks,
                                  self.config.num_nodes)
        if isinstance(ready[1], Exception):
            raise ready[1]
        return ready[1]

    @property
    def moving(self) -> bool:
        """A move is queued or in flight (layers still to switch)."""
        return bool(self._queue or self._inflight)

    def _issue_moves(self) -> None:
        """Before a forward: the in-flight layers' next steps, then new layers from the queue
        while staging sets are free and the step's budget has room. Never raises: a failure
        is the layer's, reported through the agreement in :meth:`_finish_moves`."""
        # A dropped move's ops must end before its staging is reused, and before any new op
        # is posted (a late rank's ops would otherwise cross the next move's, same tag / same
        # order). Never waited for here (a peer that never posts would stall every forward
        # until the process group's timeout): while they have not ended on every rank (agreed:
        # the dropped moves are the same everywhere), nothing is issued and serving goes on.
        # (Agreed at every issue, whether this rank holds dropped moves or not: a move whose
        # building failed on one rank only, out of memory say, leaves nothing pending there.)
        if not self._agreed(all(move.finished() for move, _ in self._pending)):
            if not self._pending_logged:
                self._pending_logged = True
                logger.warning("eplb cycle %d: moves wait until the dropped moves' transfers "
                               "end on every rank", self.cycle)
            return
        for move, k in self._pending:
            move.drain()  # (ended: returns at once, orders the device stream after them)
            self._free.append(k)
        self._pending = []
        self._pending_logged = False
        if self._api is not None:
            self._side.wait_stream(self._api.current_stream(self.device))
        budget = (StepBudget(self.num_ranks, self._rows_per_step)
                  if self._rows_per_step is not None else None)
        after = None
        for m in self._inflight:
            after = self._issue_step(m, budget, after)
        while self._queue and self._free and (budget is None or not budget.exhausted):
            layer, new = self._queue.pop(0)
            m = _Moving(layer, new, self._free.pop(0), self.step)
            try:
                m.move = LayerMove(self.layers[layer].weights, self._staging[m.staging], None,
                                   self.rank, self._move_group, self._side, tag=layer,
                                   layout=self._layout(layer, new),
                                   batched=self.config.enable_migration_batching)
            except Exception as e:  # noqa: BLE001  (the same on every rank: a pure function)
                m.error = e
            self._inflight.append(m)
            after = self._issue_step(m, budget, after)
        self._awaiting = True

    def _issue_step(self, m: _Moving, budget, after):
        if m.move is None:
            return after
        hook = self.fault_hook
        before_post = None
        if hook is not None:
            cycle, layer = self.cycle, m.layer

            def before_post():
                return hook(cycle, layer, "issue")

        m.move.issue(budget, before_post, after)
        return m.move.posted

    def _finish_moves(self) -> None:
        """After the forward: waits for this step's transfers, agrees with every rank, then
        commits the layers whose every step is done, drops the failed ones."""
        self._awaiting = False
        # the device still runs the forward: the host builds the next layers' layouts meanwhile
        self._prepare_layouts()
        timeout = self.config.transfer_timeout_s
        ok = []
        reasons = []
        for m in self._inflight:
            reason = ""
            try:
                if m.move is None:
                    reason = f"{type(m.error).__name__}: {m.error}"
                elif not m.move.wait(m.move.t_issue + timeout):
                    reason = f"transfers not done within transfer_timeout_s={timeout}"
                elif self.fault_hook is not None:
                    self.fault_hook(self.cycle, m.layer, "complete")
            except Exception as e:  # noqa: BLE001  (the layer keeps its placement)
                reason = f"{type(e).__name__}: {e}"
            ok.append(0 if reason else 1)
            reasons.append(reason)
        flags = torch.tensor(ok, dtype=torch.int32)
        if self._cpu_group is not None and ok:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self._cpu_group)
        if self._api is not None:
            self._api.current_stream(self.device).wait_stream(self._side)
        still = []
        switched = False
        for m, agreed, reason in zip(self._inflight, flags.tolist(), reasons, strict=True):
            move = m.move
            if agreed and not move.all_issued:
                still.append(m)  # more steps to come
                continue
            a = self.layers[m.layer]
            if agreed:
                self._check_tensors(m.layer)  # before any weight is written: nothing half-switched
                move.commit()
                self._set_placement(m.layer, m.new)
                self._free.append(m.staging)
                switched = True
            else:
                if not reason:
                    reason = "another rank failed its transfers"
                logger.warning("eplb cycle %d: layer %d (%s) keeps its placement: %s",
                               self.cycle, m.layer, a.name, reason)
                if move is None:
                    self._free.append(m.staging)
                else:
                    self._pending.append((move, m.staging))
            self.stats.moves.append({
                "step": self.step, "cycle": self.cycle, "layer": m.layer, "ok": bool(agreed),
                "reason": "" if agreed else reason,
                "bytes": move.bytes_received if move is not None else 0,
                "ops": move.ops_posted if move is not None else 0,
                "steps": move.steps if move is not None else 0,
                "move_s": time.perf_counter() - move.t_first if move is not None else 0.0,
                "issued_step": m.issued_step})
        self._inflight = still
        # once the rebalance has nothing left to move, whether its last layers switched or
        # failed: any layer switched since the last record makes a new one
        self._unrecorded |= switched
        if self._unrecorded and not self._queue and not still:
            self._unrecorded = False
            self._record_map()

    def _record_map(self) -> None:
        """Rank 0 with expert_map_record_path: writes the placement served now, on a thread of
        its own (several ms of Python at large shapes), as vllm-ascend rewrites its record file
        every cycle: a server that is killed leaves its last rebalance's map. A failed write is
        logged, serving goes on; shutdown writes the final map and raises."""
        path = self.config.expert_map_record_path
        if path is None or self.rank != 0:
            return
        try:  # (a thread that cannot start must not end this rank's step alone)
            if self._recorder is None or self._recorder_pid != os.getpid():
                self._recorder = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="eplb-native-record")
                self._recorder_pid = os.getpid()
            # one worker: the writes land in order; a copy: the placement may switch meanwhile
            self._recorder.submit(_write_record, path, self.phy2log(), self.num_ranks)
        except Exception as e:  # noqa: BLE001
            logger.warning("eplb_native: expert_map_record_path %s not written after a "
                           "rebalance: %s: %s", path, type(e).__name__, e)

    def _sync_device(self) -> None:
        if self._api is not None:
            self._api.synchronize(self.device)

    # ----------------------------------------------------------------------------------------
    # lifecycle

    def warm_up(self) -> None:
        """Opens the P2P connections between every pair of ranks (one small exchange), so the
        first real move does not pay for it. Collective: every rank calls it, with no move
        queued or in flight (its messages would share the moves' communicator)."""
        if self._move_group is None:
            return
        if self._queue or self._inflight or self._pending:
            raise RuntimeError("warm_up: moves are queued or in flight; call it before serving "
                               "or between cycles")
        x = torch.zeros(1, dtype=torch.int64, device=self.device)
        out = torch.empty(self.num_ranks, dtype=torch.int64, device=self.device)
        ops = []
        for peer in range(self.num_ranks):
            if peer != self.rank:
                g = dist.get_global_rank(self._move_group, peer)
                ops.append(dist.P2POp(dist.isend, x, g, self._move_group))
                ops.append(dist.P2POp(dist.irecv, out[peer:peer + 1], g, self._move_group))
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        dist.barrier(group=self._cpu_group)

    def attach_hooks(self, model: torch.nn.Module) -> None:
        """One step per ``model`` forward: forward_before / forward_end as hooks. Once: a second
        pair of hooks would count two steps a forward."""
        if self._closed:
            raise RuntimeError("this Updator is shut down (shutdown removed its hooks); attach "
                               "again")
        if self._hooks:
            raise RuntimeError("attach_hooks: this Updator's forward hooks are on already (one "
                               "step per forward)")
        self._hooks.append(model.register_forward_pre_hook(lambda *_: self._before()))
        self._hooks.append(model.register_forward_hook(lambda *_: self._end()))

    def save_trace(self, path, **meta) -> None:
        """Writes the gathered windows' logical loads [W, L, E] with eplb_native.traces, and in
        its meta the deployment (ranks, slots, redundant slots, nodes, expert groups), which
        ``eplb-native plan / simulate`` take as their defaults, and each window's steps
        (``window_steps``: the first may be shorter, ``first_plan_after``)."""
        from . import traces

        if not self._recorded:
            raise ValueError(f"save_trace: no load window gathered yet (one is gathered every "
                             f"expert_heat_collection_interval = "
                             f"{self.config.expert_heat_collection_interval} steps)")
        loads = np.stack(self._recorded)
        # the deployment's keys, when the caller gives them (a demo's one group, say), hold what
        # `eplb-native plan / simulate` read them as (they refused such a file only when read)
        for key, least in (("num_ranks", 1), ("num_slots", 1), ("num_redundant", 0),
                           ("num_nodes", 1), ("num_groups", 1)):
            if key in meta:
                meta[key] = check_int(meta[key], f"save_trace: {key}", least)
        if "window_steps" in meta and not traces.window_steps_ok(meta["window_steps"],
                                                                 len(loads)):
            raise ValueError(f"save_trace: window_steps must be a list of {len(loads)} ints in "
                             f"[0, 2**62] (one per window), got {meta['window_steps']!r}"[:300])
        # the deployment, so that `eplb-native plan / simulate` replay it as planned here
        meta.setdefault("num_ranks", self.num_ranks)
        meta.setdefault("num_slots", self.num_slots)
        meta.setdefault("num_redundant", self.num_slots - self.num_logical)
        meta.setdefault("num_nodes", self.config.num_nodes)
        meta.setdefault("num_groups", self.config.group_count)
        # steps of load in each window (the first may be shorter: first_plan_after)
        meta.setdefault("window_steps", list(self._recorded_steps))
        traces.save_trace(path, loads, **meta)

    def shutdown(self) -> None:
        """Finishes: drains moves, writes expert_map_record_path (rank 0), removes the hooks,
        joins the planner, gives the process groups attach took back for the next attach on the
        same ranks. Collective, as attach: every rank calls it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for a in self.layers:
            ref = _live_updators.get(a.module)
            if ref is not None and ref() is self:
                del _live_updators[a.module]
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self._inflight:  # moves not finished: keep the old maps
            if m.move is not None:
                self._pending.append((m.move, m.staging))
        self._inflight = []
        self._awaiting = False
        # bounded: a peer that never posts would hold shutdown for the process group's timeout
        deadline = time.perf_counter() + self.config.transfer_timeout_s
        # (dropped or unfinished moves are the same on every rank, agreed step by step; whether
        # their ops ended in time is each rank's own: agreed below before the groups are reused)
        had_pending = bool(self._pending)
        stuck = [move for move, _ in self._pending if not move.drain(deadline)]
        # the groups may be reused when every rank's dropped moves ended (one CPU all-reduce;
        # before, any dropped move left them open, finished or not: one leaked per fault)
        all_ended = not had_pending or self._agreed(not stuck)
        self._pending = []
        self._queue = []
        self._layouts = {}
        if self._future is not None:
            self._future.cancel()
            self._future = None
        if self._planner is not None:
            self._planner.close()
        if stuck:
            logger.warning("eplb_native shutdown: %d dropped moves still wait for a peer after "
                           "transfer_timeout_s=%s", len(stuck), self.config.transfer_timeout_s)
        if not all_ended:  # (every rank alike: a move's ops may still be posted on a group)
            logger.warning("eplb_native shutdown: dropped or unfinished moves had not ended on "
                           "every rank; the process groups attach took are left open, not "
                           "reused")
        else:
            self._release_groups()
        if self._recorder is not None:  # (its writes first: the final map is the last)
            if self._recorder_pid == os.getpid():
                self._recorder.shutdown(wait=True)
            self._recorder = None
        path = self.config.expert_map_record_path
        if path is not None and self.rank == 0:
            expert_map.save(path, self.phy2log(), self.num_ranks)

    def __enter__(self) -> Updator:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _host_key() -> str:
    """This machine, as the node count sees it: the kernel's boot id (shared by the containers
    of one host, unlike their host names), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            key = f.read().strip()
        if key:
            return key
    except (OSError, ValueError):
        pass
    return socket.gethostname()


def nodes_of_hosts(keys: list) -> tuple[int, str | None]:
    """(nodes, None) for the host key of each rank in rank order, where the hosts hold equal
    runs of consecutive ranks (rank r on node r // (ranks / nodes), the planner's model of a
    node, which torchrun and vLLM's launchers follow); else (1, why not)."""
    hosts = list(dict.fromkeys(keys))
    if len(hosts) == 1:
        return 1, None
    if len(keys) % len(hosts):
        return 1, "which do not divide the ranks"
    per = len(keys) // len(hosts)
    if any(k != hosts[r // per] for r, k in enumerate(keys)):
        return 1, "not in equal runs of consecutive ranks"
    return len(hosts), None


def _uses_groups(config: EplbConfig) -> bool:
    """Whether the planner places by the expert groups: hierarchical for every policy across
    nodes, and `deepseek`'s grouped path on one node too (DeepSeek's own rule, num_groups %
    num_nodes == 0)."""
    groups, nodes = config.group_count, config.node_count
    return groups > 1 and groups % nodes == 0 and (nodes > 1 or config.policy == "deepseek")


def _describe(config: EplbConfig) -> str:
    """What config does, in a few words (attach's log line)."""
    if not config.dynamic_eplb:
        return "dynamic_eplb off: load recorded, no rebalancing"
    # vLLM's transport options: the communicator is read and not acted on (said here, not left
    # silent); migration batching is
    transport = "".join(
        [f"; communicator {config.communicator!r} ignored (weights move by torch.distributed "
         f"P2P on the EP group)" if config.communicator is not None else "",
         "; migration batching (in a layer's move every rank talks to one peer at a time)"
         if config.enable_migration_batching else ""])
    topology = "".join([f", {config.node_count} nodes" if config.node_count > 1 else "",
                        f", {config.group_count} expert groups" if _uses_groups(config)
                        else ""])
    first = config.first_plan_after
    return (f"a {config.policy} plan{topology} every {config.expert_heat_collection_interval} "
            f"steps"
            + (f" (the first after {first})" if first not in (None,
               config.expert_heat_collection_interval) else "")
            + " from the "
            f"last {config.window_steps} steps of load, its moves starting "
            f"{config.algorithm_execution_interval + 1} steps after that window, "
            f"{config.layers_per_step} layer(s) a step"
            + (f", only after windows of balancedness <= {config.balancedness_threshold:g}"
               if config.balancedness_threshold < 1 else "") + transport)


def _write_record(path, phy2log: np.ndarray, num_ranks: int) -> None:
    """Updator._record_map's job (holds no Updator)."""
    try:
        expert_map.save(path, phy2log, num_ranks, warn=False)
    except Exception as e:  # noqa: BLE001  (serving goes on; shutdown's write raises)
        logger.warning("eplb_native: expert_map_record_path %s not written after a rebalance: "
                       "%s: %s", path, type(e).__name__, e)


def _storage_key(t: torch.Tensor) -> tuple:
    """(storage address, dtype, device) of t's data (a DTensor's local shard)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return (local.untyped_storage().data_ptr(), local.dtype, local.device)


def _module_storages(module: torch.nn.Module) -> set:
    return {_storage_key(t) for t in (*module.parameters(), *module.buffers())}


def _tracked_storages(a: MoELayerAdapter) -> frozenset:
    """The storage keys of the adapter's tensors that belong to its module's parameters or
    buffers (an adapter may also hold tensors of its own, which nothing can replace)."""
    own = _module_storages(a.module)
    tensors = [*a.weights, a.phy2log, a.log2phy, a.logcnt, a.load, a.record]
    if a.local_expert_map is not None:
        tensors.append(a.local_expert_map)
    return frozenset(k for k in map(_storage_key, tensors) if k in own)


#: The live Updator of each adapted module (weak on both sides): attach refuses a second one.
_live_updators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# torch >= 2.12 renamed all_gather_into_tensor (same semantics) and warns on the old name.
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


#: Process groups updators created and gave back, by (EP ranks, backend): the next attach on
#: those ranks takes one instead of creating another. Weak references: torch's registry keeps a
#: group alive until dist.destroy_process_group() drops it, and then it goes at once. (Kept
#: alive here past that, a gloo group's worker threads ran on into interpreter shutdown, where
#: one releasing a finished barrier's tensors aborted the process: "terminate called without an
#: active exception", about 1 demo run in 30.)
_FREE_GROUPS: dict[tuple[tuple[int, ...], str | None], list] = {}


def _take_group(ranks: list[int], backend: str | None):
    """A process group over ``ranks`` for one updator: one given back before (still alive), else
    a new one. Created with local synchronization: only these ranks call it (several EP groups
    in one world, PP x EP or DP x EP, each attach on their own; a world-wide new_group waited
    for ranks that never call it). Reused rather than destroyed and created again: such a
    group's name is a hash of its ranks, so a new one after a destroy would read the old one's
    rendezvous keys from the store and fail to connect."""
    pool = _FREE_GROUPS.get((tuple(ranks), backend), [])
    while pool:
        g = pool.pop()()
        if g is None:
            continue  # destroyed and collected since
        try:
            if dist.get_process_group_ranks(g) == list(ranks):
                return g
        except (ValueError, RuntimeError, KeyError):
            pass  # destroyed since (dist.destroy_process_group() of the world, say)
    kw = {} if backend is None else {"backend": backend}
    return dist.new_group(list(ranks), use_local_synchronization=True, **kw)


def _give_back_group(g, ranks: list[int], backend: str | None) -> None:
    _FREE_GROUPS.setdefault((tuple(ranks), backend), []).append(weakref.ref(g))


def _staging_like(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """One staging set: a contiguous tensor per weight tensor, same shape and dtype."""
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in weights]


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def attach(model: torch.nn.Module, config=None, group=None, *, hooks: bool = True) -> Updator:
    """Finds ``model``'s MoE layers and returns the :class:`Updator` balancing them.

    Args:
        model: any torch module; its MoE layers are found through ``eplb_native.adapters``.
        config: an :class:`EplbConfig`, a dict in vLLM's / vllm-ascend's / SGLang's / our
            vocabulary (or ``{"eplb_config": {...}}``), a JSON string, or None (defaults).
        group: the expert-parallel process group (None: the default group when distributed,
            else a single process). Collective: every rank of the group calls attach, and only
            those: with several EP groups in one world (pipeline stages, DP x EP) each attaches
            on its own.
        hooks: drive the cycle from ``model``'s forward hooks (one step per forward); False for
            engines that call ``forward_before()`` / ``forward_end()`` themselves.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_group(group)
    if _unprepared_transformers_model(model):
        # A Hugging Face model under transformers' own expert parallelism: the integration grows
        # its slots and routes through our ops first, then comes back here with its layers.
        from .integrations import transformers as hf

        return hf.attach(model, config, group, hooks=hooks)
    # A config or flag this rank refuses is agreed with the adapters' errors below: raised here
    # alone, it left the other ranks waiting in the agreement (review 18).
    refused: Exception | None = None
    cfg = None
    try:
        hooks = check_bool(hooks, "hooks")
        cfg = EplbConfig.parse(config)
    except (TypeError, ValueError) as e:
        refused = e
    if group is not None:
        ep_rank, ep_size = dist.get_rank(group), dist.get_world_size(group)
    elif dist.is_available() and dist.is_initialized():
        ep_rank, ep_size = dist.get_rank(), dist.get_world_size()
    else:
        ep_rank, ep_size = 0, 1
    # Adapters register buffers on the layers they adapt (the fused one: eplb_phy2log, ...); if
    # any later layer or the Updator refuses, the ones already adapted are left as they were.
    buffers_before = {id(m): set(m._buffers) for m in model.modules()}
    try:
        error: Exception | None = None
        layers = []
        try:
            if refused is not None:
                raise refused
            inside: list[str] = []
            for name, module in model.named_modules():
                if any(name.startswith(p + ".") for p in inside):
                    continue  # the experts of a layer already adapted
                adapter = adapt_module(name or type(model).__name__, module, ep_rank, ep_size)
                if adapter is not None:
                    layers.append(adapter)
                    inside.append(name)
            if not layers:
                raise ValueError(f"model {type(model).__name__} has no MoE layer eplb_native "
                                 "can adapt: none exposes eplb_adapter() or w13_weight / "
                                 "w2_weight (see eplb_native.adapters.base)")
        except Exception as e:  # noqa: BLE001  (agreed below, then raised)
            error = e
        # An adapter may refuse on one rank only (a fused layer's expert_map that differs on
        # this rank): every rank agrees first, so none is left waiting in the Updator's
        # collectives for a rank that raised.
        if ep_size > 1:
            _agree_adapted(error, group, model)
        elif error is not None:
            raise error
        updator = Updator(layers, cfg, group)
    except BaseException:
        for m in model.modules():
            for key in set(m._buffers) - buffers_before.get(id(m), set()):
                del m._buffers[key]
        raise
    if hooks:
        updator.attach_hooks(model)
    return updator


#: EplbConfig fields that may differ between the ranks of a group: the expert map's path (its
#: content is agreed), the record path (rank 0 writes it), the logging (each rank's own).
_RANK_LOCAL_FIELDS = ("expert_map_path", "expert_map_record_path", "log_balancedness",
                      "log_balancedness_interval")


def _config_digest(config: EplbConfig) -> int:
    """digest of the config's fields every rank must share."""
    shared = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
              if f.name not in _RANK_LOCAL_FIELDS]
    return digest(np.frombuffer(repr(shared).encode(), dtype=np.uint8))


def check_group(group) -> None:
    """attach's ``group``: None, or a process group of an initialised torch.distributed. Refused
    with an error naming it (torch's own, raised from deep inside, named neither the argument nor
    the fix)."""
    if group is None:
        return
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (the expert-parallel "
                        f"group) or None, got {type(group).__name__} {group!r}")
    if not dist.is_initialized():
        raise ValueError("group is given but torch.distributed is not initialized: call "
                         "torch.distributed.init_process_group first (group=None runs as a "
                         "single process)")


def agree(group, device, code: int, digests: list[int]) -> tuple[int, list[bool]]:
    """Collective over ``group``, one all-reduce (MIN, on ``device``): (the smallest ``code``
    of any rank; for each digest, whether every rank holds the same)."""
    t = torch.tensor([code, *[v for d in digests for v in (d, -d)]], dtype=torch.int64,
                     device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    v = t.tolist()
    return v[0], [v[1 + 2 * i] == -v[2 + 2 * i] for i in range(len(digests))]


def _agree_adapted(error: Exception | None, group, model: torch.nn.Module) -> None:
    """Collective over ``group`` (None: the default group), one all-reduce: raises on every rank
    unless every rank adapted its layers. The failing rank raises its own error, the others a
    RuntimeError naming the lowest failing rank."""
    group = dist.group.WORLD if group is None else group
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    device = torch.device("cpu")
    if dist.get_backend(group) != "gloo":  # (NCCL / HCCL reduce on the model's device)
        device = next((t.device for t in itertools.chain(model.parameters(), model.buffers())
                       if t.device.type != "cpu"), device)
    failed, _ = agree(group, device, size if error is None else rank, [])
    if error is not None:
        raise error
    if failed < size:
        raise RuntimeError(f"attach refused: rank {failed} of the group could not adapt its MoE "
                           "layers (its own error says why); nothing was changed on this rank")


def _unprepared_transformers_model(model: torch.nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` whose experts the integration has not prepared yet."""
    if not type(model).__module__.startswith("transformers.") or not hasattr(model, "config"):
        return False
    return not any(hasattr(m, "eplb_phy2log") for m in model.modules())
