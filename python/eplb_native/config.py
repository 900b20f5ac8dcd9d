"""``EplbConfig``: the updator's settings, in the vocabularies users already have.

Accepted keys (``EplbConfig.parse`` takes a dict or any mapping (OmegaConf's ``DictConfig``,
read as a dict: every key checked), a ``{"eplb_config": {...}}`` wrapper, a JSON
string, an object with these attributes such as vLLM's ``EPLBConfig``, or an EplbConfig). The
keys are vLLM's and vllm-ascend's (SGLang's server arguments: see below); a key left out takes
the default below, which is ours, except inside vllm-ascend's ``{"eplb_config": {...}}`` wrapper
(its ``additional_config``), where it takes vllm-ascend's: ``dynamic_eplb`` False (True when
``expert_map_record_path`` is given, as there; but an explicit ``dynamic_eplb: false`` is kept
here, where vllm-ascend turns it on all the same), ``expert_heat_collection_interval`` 600,
``algorithm_execution_interval`` 50. Keys other than vllm-ascend's in a wrapper left static
that way are warned about (rebalancing stays off; vLLM's keys belong beside ``enable_eplb``).
vLLM's own shape, ``enable_eplb`` beside ``eplb_config`` (its ``ParallelConfig``, or
``LLM(enable_eplb=..., eplb_config={...})`` as a dict), is read as that switch for
``dynamic_eplb`` and vLLM's keys inside, which take vLLM's defaults where they differ from
ours (``step_interval`` 3000, ``window_size`` 1000, ``policy`` "default": DeepSeek's
algorithm; and the first plan after a quarter of ``step_interval``, as vLLM's counter starts at
three quarters of it), so the dict means what vLLM's object does (no placement or load file
there: the ``expert_map_*`` keys are vllm-ascend's). A bare ``EPLBConfig`` has no switch: ``dynamic_eplb``
stays on (its first plan comes after a quarter of its ``step_interval`` too).
Objects (vLLM's ``EPLBConfig``, vllm-ascend's ``EplbConfig``) carry every field of their own.
A flat dict takes ours: vLLM's ``step_interval`` 3000 and ``window_size`` 1000 are not our
defaults (100 and the heat interval); pass them when you mean vLLM's. The constructor
``EplbConfig(...)`` takes the canonical names only; aliases and the peers' values (``"default"``,
``eplb_policy_type``) are read by ``EplbConfig.parse`` / a dict.

=================================  ==================================  =========================
key (aliases)                      meaning                             default
=================================  ==================================  =========================
``dynamic_eplb`` (``enabled``,     rebalance while serving; off: only  True
``enable_eplb``)                   record and log balancedness
``num_redundant_experts``          extra slots per layer (P = E + it)  0 (or what the layer has)
``expert_heat_collection_interval``  steps between two plans (vLLM      100
(``step_interval``)                ``step_interval``)
``first_plan_after``               steps before the first plan (then   None (= heat interval;
                                   one every heat interval)            vLLM's shape: a quarter
                                                                       of it, as vLLM starts
                                                                       its counter at 3/4)
``window_size``                    recent steps of load a plan sees    = heat interval
                                   (at most 10**6: its ring is
                                   [window_size, layers, experts]
                                   int64 on the device)
``algorithm_execution_interval``   steps from submitting a plan to     1
                                   taking it (its first layers move
                                   in the step after: submitted at
                                   the end of step N, moved in step
                                   N + interval + 1)
``layers_per_step``                layers moved per step (with a byte  1
                                   budget: layers in flight at once)
``max_move_bytes_per_step``        per-step budget of moves: bytes     None (whole layers)
                                   each rank may receive and send in
                                   one step (at least one expert); a
                                   layer's move then spans steps, its
                                   placement switches when all of it
                                   arrived on every rank
``policy`` (``eplb_policy_type``)  ``deepseek`` | ``balanced`` |       ``balanced``
                                   ``min_move`` (vLLM ``default`` =
                                   deepseek; vllm-ascend types 0
                                   (its random test policy), 1 =
                                   deepseek, 2, 3 = balanced; its
                                   ``stair`` = min_move, warned)
``distinct_ranks``                 True: no rank holds one expert in   None
                                   two slots (vllm-ascend's maps need
                                   it); None: ``balanced`` avoids it
                                   where that costs <= 0.1% of the
                                   max; False: never spends on it
                                   (plan(distinct_ranks=...))
``transfer_timeout_s``             a layer whose transfers take longer 30.0
                                   (in one step) keeps its old
                                   placement
``expert_map_path``                initial placement (vllm-ascend      None (default spread)
                                   expert-map JSON)
``expert_map_record_path``         placement written here by rank 0    None
                                   after each rebalance and at
                                   shutdown (its folder is made if
                                   missing); weights move as without
                                   it (vllm-ascend plans, records and
                                   moves nothing)
``log_balancedness``               log balancedness with ``logging``   False
``log_balancedness_interval``      every this many steps (at the       1
                                   window gathered at or after each
                                   multiple; at most once a window)
``balancedness_threshold``         plan only when the window's         1.0
                                   balancedness on the current
                                   placement, mean over layers of
                                   mean / max rank load, is at or
                                   below this (a number in [0, 1]);
                                   1.0: always
``use_async``                      plan on the background thread       True
                                   (False: wait for the plan at once)
``num_nodes``, ``num_groups``      topology for hierarchical policies  None, None
                                   (nodes None: the hosts of the EP
                                   group, counted by attach (vLLM
                                   counts its nodes too), where they
                                   hold equal runs of consecutive
                                   ranks; else 1.
                                   groups: the model's expert groups;
                                   None: those attach can tell, a
                                   transformers model's ``n_group``,
                                   as vLLM and SGLang take them; else
                                   1)
``eplb_heat_collection_stage``,    vllm-ascend's phase (``all`` |      ``all``
``load_collection_phase``          ``prefill`` | ``decode``) whose
                                   load is collected: only ``all`` is
                                   supported (load of every step is
                                   collected); accepted, not stored
``communicator``                   accepted for vLLM compatibility;    None
                                   moves use torch.distributed P2P
                                   (a communicator string we do not
                                   know is taken with a warning)
``enable_migration_batching``      vLLM's: a layer's move sends its    False
                                   messages in batches in which every
                                   rank talks to at most one peer, one
                                   batch after the other (False: all
                                   at once)
=================================  ==================================  =========================

vllm-ascend's names from before v0.14.0rc1 (which renamed them and moved them into
``eplb_config``) are aliases too: ``num_iterations_eplb_update`` (heat interval),
``num_wait_worker_iterations`` (execution interval), ``init_redundancy_expert``
(``num_redundant_experts``); its removed ``gate_eplb`` is taken when false (rebalance every
cycle, as here) and refused when true (rebalance once). A dict wholly in that vocabulary (one
of these four; besides them only ``dynamic_eplb``, ``expert_map_path``,
``expert_map_record_path``, ``eplb_policy_type``) takes that vllm-ascend's defaults for what it
leaves out: ``dynamic_eplb`` False (True with a record path), intervals 400 / 30, ``policy``
deepseek (its ``eplb_policy_type`` 1). Beside an
``eplb_config`` wrapper ``gate_eplb`` is ignored with a warning, as vllm-ascend ignores it.

SGLang's EPLB server arguments (checked against SGLang 0.5.23) are read too. A dict holding one
of its own keys is in its vocabulary and takes SGLang's defaults for what it leaves out:
``dynamic_eplb`` False unless ``enable_eplb``, heat interval 1000, ``policy`` deepseek (its
``eplb_algorithm`` ``auto``). One holding ``ep_num_redundant_experts``, ``eplb_algorithm`` and
``eplb_rebalance_num_iterations`` together is a whole ServerArgs (the object, or its dict:
``msgspec.structs.asdict`` in 0.5.23, where it is a msgspec Struct; ``dataclasses.asdict`` or
``vars`` where it was a dataclass): its keys other than SGLang's below and ours are ignored;
elsewhere an unknown key stays an error. Our canonical keys may stand beside SGLang's (where both
name one setting they must agree); the other peers' own keys (``step_interval``, ``enabled``,
``eplb_policy_type``, vllm-ascend's old names, ``gate_eplb``, the phase keys, an ``eplb_config``
beside or around them) are refused: whose defaults apply would be unclear.

- ``enable_eplb`` -> ``dynamic_eplb``; ``ep_num_redundant_experts`` -> ``num_redundant_experts``
  (left out: unset, the layers' own count, rather than SGLang's 0);
  ``eplb_rebalance_num_iterations`` (forward passes between rebalances) -> the heat interval.
- ``expert_distribution_recorder_buffer_size`` -> ``window_size``; None is the heat interval,
  as SGLang sets it. -1 (SGLang's unbounded buffer) is refused: the window is a ring of at most
  10**6 steps. A buffer longer than the interval while EPLB is on is refused, as SGLang asserts;
  one equal to it is read as unset (the same steps, without the per-step ring on the device),
  unless ``window_size`` is given too or ``first_plan_after`` exceeds the interval (an unset
  first window spans ``first_plan_after`` steps).
- ``eplb_algorithm``: ``auto`` and ``deepseek_hierarchical`` -> ``deepseek`` with the model's
  groups (hierarchical where the nodes divide them, as ``auto`` is; where they do not, SGLang's
  ``deepseek_hierarchical`` fails, ours plans globally); ``deepseek`` -> ``deepseek`` with
  ``num_groups`` 1 (SGLang's is DeepSeek's global policy); ``deepseek_vec`` and
  ``deepseek_vec_hierarchical`` are read as those two with a warning (SGLang's vec variant
  chooses replicas against each forward pass's load, a plan here sees the window's sum);
  ``elasticity_aware`` and ``elasticity_aware_hierarchical`` (elastic EP, over the ranks still
  alive) are refused: no counterpart. Our ``balanced`` and ``min_move`` are taken there too.
- ``eplb_rebalance_layers_per_chunk`` -> ``layers_per_step``. None (SGLang: every layer in one
  forward pass) keeps 1 here: our moves run in the background, layer by layer, so None does not
  mean all at once.
- ``eplb_min_rebalancing_utilization_threshold`` -> ``balancedness_threshold``. SGLang's
  utilization is the mean over its last 1000 forward passes of each pass's mean / max rank load
  (averaged over every hidden layer, its dense layers counting 1.0), tracked only while
  ``expert_balancedness_report_mode`` is not off; here it is the window's summed load on the
  current placement, averaged over the MoE layers, whatever the report mode (so a threshold
  skips a little less often here on a model with dense layers).
- ``init_expert_location``: ``trivial`` -> no map (our default spread is SGLang's trivial
  placement); a path ending in ``.json`` or ``.pt`` (``torch.load``, weights only, as SGLang
  reads it) -> ``expert_map_path``, read at attach by ``expert_map.load``: SGLang's
  ``physical_to_logical_map`` file is the start placement; one of ``logical_count``, a load (an
  SGLang expert-distribution dump, say), is planned from at attach with ``policy`` (SGLang
  plans it with its ``eplb_algorithm``), every rank alike. Inline JSON cannot be read here
  (expert_map_path is a file): refused.
- ``expert_balancedness_report_mode`` ``server_log`` or ``both`` -> ``log_balancedness`` True
  (``off`` and ``prometheus`` leave it as it is). It, ``expert_distribution_recorder_mode`` and
  ``ep_dispatch_algorithm`` are checked against SGLang's values and not stored otherwise: our
  recorder counts every step, and replicas are chosen by our ops' spread mode.

Counts are ints from their minimum up to ``MAX_COUNT`` = 2**62 (the planner's bound); a float
holding an integer (``1000.0``, ``1e9``: JSON and YAML write them) counts as that int, any other
float is refused. numpy scalars count as the Python values they hold. An attribute object is read
with ``getattr`` of the keys above (so ``__getattr__`` objects, pydantic models and slots classes
work); one whose values sit in a ``.config`` dict, as vllm-ascend's ``EplbConfig`` keeps them, is
read from that dict. Unknown keys, wrong types and impossible values raise ValueError naming the
key.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ._util import plain_scalar, same_file

logger = logging.getLogger("eplb_native")

POLICIES = ("deepseek", "balanced", "min_move")
_POLICY_ALIASES = {"default": "deepseek"}
_ASCEND_POLICY_TYPES = {0: "deepseek", 1: "deepseek", 2: "balanced", 3: "balanced"}
#: vLLM's communicator values (v0.34.0; symm_mem from it) and vllm-ascend's (hixl); ours always
#: move through torch.distributed, so any other string is taken too, with a warning
_COMMUNICATORS = (None, "torch_nccl", "torch_gloo", "torch_xccl", "pynccl", "nixl", "symm_mem",
                  "hixl", "torch")

#: vllm-ascend's keys choosing the phase whose load is collected (V1 / V2 model runner) and their
#: values; "all" collects in every phase, as we always do, so it is the only one we take.
_PHASE_KEYS = ("eplb_heat_collection_stage", "load_collection_phase")
_PHASES = ("all", "prefill", "decode")

#: vllm-ascend's defaults (its ascend_config.EplbConfig), taken for the keys a
#: ``{"eplb_config": {...}}`` wrapper leaves out
_ASCEND_DEFAULTS = {"dynamic_eplb": False, "expert_heat_collection_interval": 600,
                    "algorithm_execution_interval": 50}

#: the keys of vllm-ascend's wrapper (it refuses any other); a wrapper holding others while it
#: takes vllm-ascend's dynamic_eplb default (false: static placement) is warned about
_ASCEND_KEYS = frozenset(_ASCEND_DEFAULTS) | {"expert_map_path", "expert_map_record_path",
                                              "num_redundant_experts", "eplb_policy_type",
                                              *_PHASE_KEYS}

#: vLLM's EPLBConfig defaults (v0.11 .. v0.34) where they differ from ours, taken for the keys
#: its shape (enable_eplb beside eplb_config) leaves out: its object carries them all, so a dict
#: of that shape means the same as the object (policy "default" is DeepSeek's algorithm)
_VLLM_DEFAULTS = {"expert_heat_collection_interval": 3000, "window_size": 1000,
                  "policy": "deepseek"}

#: alias -> canonical key
_ALIASES = {
    "enabled": "dynamic_eplb",
    "enable_eplb": "dynamic_eplb",
    "step_interval": "expert_heat_collection_interval",
    "eplb_policy_type": "policy",
    # vllm-ascend's names before v0.14.0rc1 (#5533 renamed them; same meanings)
    "num_iterations_eplb_update": "expert_heat_collection_interval",
    "num_wait_worker_iterations": "algorithm_execution_interval",
    "init_redundancy_expert": "num_redundant_experts",
}

#: vllm-ascend's gate_eplb (removed in v0.14.0rc1): False (its default) rebalanced every cycle,
#: as we do, and is accepted; True (rebalance once) has no counterpart here
_GATE = "gate_eplb"
#: vllm-ascend's keys before v0.14.0rc1 that the new vocabulary lacks
_OLD_ONLY = ("num_iterations_eplb_update", "num_wait_worker_iterations",
             "init_redundancy_expert", _GATE)
#: vllm-ascend's defaults before v0.14.0rc1 (v0.9.1 .. v0.13.0rc1, flat additional_config),
#: taken for the keys a dict wholly in _OLD_VOCABULARY, with one of _OLD_ONLY, leaves out
#: (eplb_policy_type 1 was its DefaultEplb, DeepSeek's algorithm)
_OLD_VOCABULARY = frozenset(_OLD_ONLY) | {"dynamic_eplb", "expert_map_path",
                                           "expert_map_record_path", "eplb_policy_type"}
_OLD_ASCEND_DEFAULTS = {"dynamic_eplb": False, "expert_heat_collection_interval": 400,
                        "algorithm_execution_interval": 30, "policy": "deepseek"}

#: SGLang's EPLB server arguments (0.5.23: its ServerArgs, sglang/srt/arg_groups/fields/exec_.py);
#: enable_eplb is vLLM's too (an alias above), the others are SGLang's alone: one of them makes a
#: dict SGLang's
_SGLANG_ONLY = frozenset({"ep_num_redundant_experts", "eplb_rebalance_num_iterations",
                          "expert_distribution_recorder_buffer_size", "eplb_algorithm",
                          "eplb_rebalance_layers_per_chunk",
                          "eplb_min_rebalancing_utilization_threshold", "init_expert_location",
                          "expert_distribution_recorder_mode", "ep_dispatch_algorithm",
                          "expert_balancedness_report_mode"})
#: all three in one dict: a whole ServerArgs (its asdict / vars), whose other keys are not EPLB's
#: and are ignored (each of them has a default there, so a whole one always holds them)
_SGLANG_SERVER_ARGS = frozenset({"ep_num_redundant_experts", "eplb_algorithm",
                                 "eplb_rebalance_num_iterations"})
#: SGLang's defaults where they differ from ours (its eplb_algorithm "auto" is DeepSeek's
#: algorithm with the model's groups: our deepseek with num_groups unset)
_SGLANG_DEFAULTS = {"dynamic_eplb": False, "expert_heat_collection_interval": 1000,
                    "policy": "deepseek"}
#: eplb_algorithm -> (policy, num_groups: None leaves them to the model, as auto does). SGLang's
#: deepseek is DeepSeek's global policy (one group); our own policy names are taken there too
_SGLANG_ALGORITHMS = {"auto": ("deepseek", None), "deepseek": ("deepseek", 1),
                      "deepseek_hierarchical": ("deepseek", None),
                      "deepseek_vec": ("deepseek", 1),
                      "deepseek_vec_hierarchical": ("deepseek", None),
                      "balanced": ("balanced", None), "min_move": ("min_move", None)}
#: SGLang's keys read only to be checked (our recorder counts every step; replicas are chosen by
#: our ops' spread mode), and its report mode; their values there
_SGLANG_CHOICES = {"expert_distribution_recorder_mode": (None, "stat", "stat_approx", "per_pass",
                                                         "per_token"),
                   "ep_dispatch_algorithm": (None, "static", "dynamic", "fake", "lp"),
                   "expert_balancedness_report_mode": ("off", "server_log", "prometheus",
                                                       "both")}
#: the other peers' own keys (vLLM's, vllm-ascend's): refused beside SGLang's, whose defaults
#: would then be unclear
_PEER_ONLY = frozenset(_ALIASES) - {"enable_eplb"} | set(_PHASE_KEYS) | {_GATE}


#: Longest transfer_timeout_s (a week).
MAX_TRANSFER_TIMEOUT_S = 7 * 24 * 3600
#: Largest value of any count: the planner's bound on its counts (planner._as_int), so a
#: topology that parses is never refused later, at every gather.
MAX_COUNT = 2**62
#: Largest window_size. The load ring is [window_size, layers, experts] int64 on the device:
#: vLLM's default 1000 steps of DeepSeek-V3 (58 x 256) is 119 MB; 10**6 steps of it would be
#: 119 GB, so beyond this a window is a mistake, refused here rather than by the allocator.
MAX_WINDOW_SIZE = 10**6

#: int keys -> (minimum, maximum); those also in _OPTIONAL may be None
#: (the step intervals only meet the step counter, never the planner: unbounded, so that
#: sys.maxsize, "never", stays a valid interval)
_INT_BOUNDS = {
    "num_redundant_experts": (0, MAX_COUNT),
    "expert_heat_collection_interval": (1, None),
    "window_size": (1, MAX_WINDOW_SIZE),
    "algorithm_execution_interval": (0, None),
    "layers_per_step": (1, MAX_COUNT),
    "max_move_bytes_per_step": (1, MAX_COUNT),
    "log_balancedness_interval": (1, None),
    "first_plan_after": (1, None),
    "num_nodes": (1, MAX_COUNT),
    "num_groups": (1, MAX_COUNT),
}
_OPTIONAL = ("num_redundant_experts", "window_size", "max_move_bytes_per_step", "num_groups",
             "num_nodes", "first_plan_after")


@dataclass(frozen=True)
class EplbConfig:
    """The updator's settings (canonical names; see the module docstring for aliases)."""

    dynamic_eplb: bool = True
    num_redundant_experts: int | None = None
    expert_heat_collection_interval: int = 100
    first_plan_after: int | None = None  # None: one heat interval
    window_size: int | None = None  # <= MAX_WINDOW_SIZE steps (the ring is on the device)
    algorithm_execution_interval: int = 1
    layers_per_step: int = 1
    max_move_bytes_per_step: int | None = None
    policy: str = "balanced"
    distinct_ranks: bool | None = None
    transfer_timeout_s: float = 30.0
    expert_map_path: str | None = None
    expert_map_record_path: str | None = None
    log_balancedness: bool = False
    log_balancedness_interval: int = 1
    use_async: bool = True
    num_nodes: int | None = None  # None: the EP group's hosts, counted at attach (else 1)
    num_groups: int | None = None  # None: the model's expert groups where attach can tell, else 1
    communicator: str | None = None
    enable_migration_batching: bool = False
    balancedness_threshold: float = 1.0  # in [0, 1]; 1.0: plan after every window

    def __post_init__(self):
        # checked as converted (numpy scalars, integral floats), stored once every check passed
        values = {f.name: plain_scalar(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for key in ("dynamic_eplb", "log_balancedness", "use_async", "enable_migration_batching",
                    "distinct_ranks"):
            if key == "distinct_ranks" and values[key] is None:
                continue  # (None: balanced's preference; see the table above)
            _check_bool(key, values[key], "a bool or None" if key == "distinct_ranks" else "a bool")
        for key, (lo, hi) in _INT_BOUNDS.items():
            if values[key] is not None or key not in _OPTIONAL:
                values[key] = _as_int(key, values[key], lo, hi)
        t = values["transfer_timeout_s"]
        # (bounded: a wait on a longer timeout overflows the platform's time_t in threading;
        # compared, not converted, so an int too large for a float is refused, not an
        # OverflowError, and NaN fails the comparison)
        if isinstance(t, bool) or not isinstance(t, int | float) or not (
                0 < t <= MAX_TRANSFER_TIMEOUT_S):
            raise ValueError(f"transfer_timeout_s must be a number in (0, "
                             f"{MAX_TRANSFER_TIMEOUT_S}] seconds, got {_show(t)}")
        b = values["balancedness_threshold"]
        # (compared, not converted: NaN fails the comparison, a huge int is no OverflowError)
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b <= 1:
            raise ValueError(f"balancedness_threshold must be a number in [0, 1], got {_show(b)}")
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {_show(self.policy)}")
        for key in ("expert_map_path", "expert_map_record_path"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str | os.PathLike):
                raise ValueError(f"{key} must be a path (str) or None, got {type(v).__name__}")
            if isinstance(v, str) and not v:
                raise ValueError(f"{key} must be a non-empty path or None")
        # expert_map_path is not opened here: a file missing on one host must fail attach on
        # every rank together (the updator agrees on the load), not this rank alone before the
        # collective part of attach, where the others would wait for it.
        if self.communicator is not None and not isinstance(self.communicator, str):
            raise ValueError(f"communicator must be a string or None, got "
                             f"{_show(self.communicator)}")
        if self.communicator not in _COMMUNICATORS:
            logger.warning("EPLB config: communicator %r is not one eplb_native knows (%s); it "
                           "is ignored as the others are: moves use torch.distributed P2P",
                           self.communicator, ", ".join(map(str, _COMMUNICATORS[1:])))
        for name, v in values.items():
            object.__setattr__(self, name, v)

    @property
    def window_steps(self) -> int:
        """Steps of load each plan sees (``window_size``, else the heat interval)."""
        return self.window_size or self.expert_heat_collection_interval

    @property
    def node_count(self) -> int:
        """The nodes the planner is given (``num_nodes``; 1 while unset: attach sets it)."""
        return 1 if self.num_nodes is None else self.num_nodes

    @property
    def group_count(self) -> int:
        """The expert groups the planner is given (``num_groups``; 1 when unset)."""
        return 1 if self.num_groups is None else self.num_groups

    @classmethod
    def from_dict(cls, doc: dict, *, _defaults: dict | None = None) -> EplbConfig:
        """Builds from a dict in any accepted vocabulary (or the ``eplb_config`` wrapper).
        ``_defaults``: canonical keys -> values for the keys ``doc`` leaves out (vLLM's shape
        takes vLLM's)."""
        doc = _as_dict(doc)
        if not isinstance(doc, dict):
            raise ValueError(f"config must be a dict, got {type(doc).__name__}")
        if "eplb_config" in doc:
            _refuse_sglang_in_a_peers_shape(doc, "beside")
            # vllm-ascend's wrapper, alone or inside a whole additional_config (whose other keys
            # are vllm-ascend's own), or vLLM's shape (enable_eplb beside it: its ParallelConfig,
            # LLM(enable_eplb=..., eplb_config=...), whose other keys are vLLM's own); not beside
            # keys of ours: which would win is unclear
            ours = sorted(k for k in doc if k not in ("eplb_config", "enable_eplb") and (
                _ALIASES.get(k, k) in {f.name for f in dataclasses.fields(cls)}
                or k in _PHASE_KEYS))
            if ours:
                raise ValueError(f"EPLB config keys {ours} beside 'eplb_config': put them "
                                 f"inside it")
            if _GATE in doc:  # (vllm-ascend ignores it there too)
                logger.warning("EPLB config: %r beside 'eplb_config' ignored (vllm-ascend "
                               "removed it in v0.14.0rc1)", _GATE)
            if "enable_eplb" in doc:
                return cls._from_vllm_shape(doc["enable_eplb"], doc["eplb_config"])
            doc = _as_dict(doc["eplb_config"])
            if not isinstance(doc, dict):
                raise ValueError("eplb_config must be a dict")
            wrapped = True
        else:
            wrapped = False
        if wrapped or _defaults is not None:  # (inside vllm-ascend's wrapper or vLLM's shape)
            _refuse_sglang_in_a_peers_shape(doc, "inside")
        # SGLang's server arguments: one of its own keys makes the dict SGLang's (its defaults for
        # what it leaves out, ours beside it); all three of _SGLANG_SERVER_ARGS a whole ServerArgs
        sglang = [k for k in doc if k in _SGLANG_ONLY]
        server_args = all(k in doc for k in _SGLANG_SERVER_ARGS)
        if sglang:
            foreign = sorted(k for k in doc if k in _PEER_ONLY)
            if foreign:
                canon = _ALIASES.get(foreign[0])
                raise ValueError(f"{foreign[0]!r} (vLLM's or vllm-ascend's key) beside SGLang's "
                                 f"keys {sorted(sglang)}: one peer's vocabulary at a time (whose "
                                 f"defaults apply would be unclear)"
                                 + (f"; our {canon!r} may stand beside SGLang's" if canon else ""))
        fields = {f.name for f in dataclasses.fields(cls)}
        out: dict = {}
        source: dict = {}  # canonical key -> the key that set it, as spelled
        shown: dict = {}  # canonical key -> the value that set it, as given (for a contradiction)

        def put(key, canon, value, given):
            if canon in out and not _same(out[canon], value):
                raise ValueError(f"{key!r} ({given}) contradicts {source[canon]!r} "
                                 f"({shown[canon]})")
            out[canon], source[canon], shown[canon] = value, key, given

        for key, value in doc.items():
            if not isinstance(key, str):
                raise ValueError(f"config keys must be strings, got {key!r}")
            value = plain_scalar(value)
            if key in _SGLANG_ONLY:
                for canon, setting in _sglang_setting(key, value):
                    put(key, canon, setting, _show(value) if setting is value else
                        f"{_show(value)}: {canon} {_show(setting)}")
                continue
            if key in _PHASE_KEYS:
                _check_phase(key, value)
                continue
            canon = _ALIASES.get(key, key)
            if key == _GATE:
                if value is not False:
                    raise ValueError(f"{_GATE} must be false (its default: rebalance every cycle, "
                                     f"as here); true (rebalance once) has no counterpart here, "
                                     f"and vllm-ascend removed it in v0.14.0rc1; got "
                                     f"{_show(value)}")
                continue
            if canon not in fields:
                if server_args:
                    continue  # (a whole ServerArgs: its other keys are not EPLB's)
                raise ValueError(f"unknown EPLB config key {key!r}; known: "
                                 f"{sorted(fields | set(_ALIASES) | set(_PHASE_KEYS) | {_GATE})}"
                                 f" and SGLang's {sorted(_SGLANG_ONLY)}")
            if canon == "policy":
                value = _policy(key, value)
            put(key, canon, value, _show(value))
        # (only a dict wholly in that vocabulary: one old key among ours or vLLM's keeps ours)
        old_style = not wrapped and any(k in doc for k in _OLD_ONLY) and all(
            k in _OLD_VOCABULARY for k in doc)
        if wrapped or old_style:
            # vllm-ascend's additional_config (now, or before v0.14.0rc1: flat, its old names):
            # what it leaves out means what it meant there (static placement unless
            # dynamic_eplb, which a record path turns on; its intervals), not our defaults
            foreign = sorted(k for k in doc if k not in _ASCEND_KEYS) if wrapped else []
            if foreign and "dynamic_eplb" not in source and out.get(
                    "expert_map_record_path") is None:
                # (vLLM's keys in vllm-ascend's wrapper: vllm-ascend refuses them, vLLM reads
                # them only beside enable_eplb; here they would configure a balancer left off)
                logger.warning("EPLB config: 'eplb_config' without 'enable_eplb' beside it is "
                               "read as vllm-ascend's additional_config, where dynamic_eplb "
                               "defaults to false: with %s in it, rebalancing stays off (load "
                               "is recorded, never moved); set dynamic_eplb: true inside it, "
                               "or pass vLLM's shape {'enable_eplb': True, 'eplb_config': "
                               "{...}}", foreign)
            for key, value in (_ASCEND_DEFAULTS if wrapped else _OLD_ASCEND_DEFAULTS).items():
                out.setdefault(key, value)
            if "dynamic_eplb" not in source and out.get("expert_map_record_path") is not None:
                out["dynamic_eplb"] = True
        for key, value in (_defaults or (_SGLANG_DEFAULTS if sglang else {})).items():
            out.setdefault(key, value)
        try:
            config = cls(**out)
        except ValueError as e:
            # name the key as the user spelled it (an alias) as well as ours
            msg = str(e)
            for canon, key in source.items():
                if key != canon and msg.startswith(canon + " "):
                    raise ValueError(f"{key} (= {msg})") from None
            raise
        buffer = "expert_distribution_recorder_buffer_size"
        if doc.get(buffer) is not None and config.dynamic_eplb and (
                config.window_size > config.expert_heat_collection_interval):
            # (SGLang's EPLB manager asserts it; ours would plan on such a window all the same)
            interval = source.get("expert_heat_collection_interval")
            raise ValueError(f"{buffer} ({config.window_size}) must be at most "
                             f"{interval or 'eplb_rebalance_num_iterations'} "
                             f"({config.expert_heat_collection_interval}"
                             f"{'' if interval else ', its default'}) while EPLB is on, as "
                             f"SGLang requires (its EPLB manager asserts it)")
        if source.get("window_size") == buffer and "window_size" not in doc and (
                config.window_size == config.expert_heat_collection_interval) and (
                config.first_plan_after is None
                or config.first_plan_after <= config.expert_heat_collection_interval):
            # (SGLang's own default sets it so: the steps since the last plan, which the
            # unset window sums without a [steps, layers, experts] ring on the device)
            config = dataclasses.replace(config, window_size=None)
        if source.get("expert_map_path") == "init_expert_location" and (
                config.expert_map_record_path is not None and same_file(
                    config.expert_map_path, config.expert_map_record_path)):
            raise ValueError(f"init_expert_location and expert_map_record_path are one file "
                             f"({_show(config.expert_map_path)}): the record (vllm-ascend's "
                             f"format) would overwrite SGLang's placement file")
        return config

    @classmethod
    def _from_vllm_shape(cls, switch, inner) -> EplbConfig:
        """vLLM's ``enable_eplb`` beside its ``eplb_config`` (a dict, the EPLBConfig object or
        None): the switch is dynamic_eplb; the keys inside take our defaults, as a flat dict's."""
        if isinstance(inner, str):  # (vLLM's --eplb-config takes JSON)
            try:
                inner = json.loads(inner)
            except (ValueError, RecursionError) as e:  # (RecursionError: nested past the stack)
                raise ValueError(f"eplb_config string is not valid JSON "
                                 f"({str(e)[:200] or type(e).__name__})") from None
        given = inner = _as_dict(inner)
        inner = {} if inner is None else inner if isinstance(inner, dict) else _object_doc(
            cls, inner)
        if inner is None:
            raise ValueError(f"eplb_config must be a dict or an EPLB config object, got "
                             f"{type(given).__name__}")
        if "eplb_config" in inner:  # (an object answering itself would recurse for ever)
            raise ValueError("eplb_config must not hold an 'eplb_config' of its own")
        switch = plain_scalar(switch)
        if not isinstance(switch, bool):
            raise ValueError(f"enable_eplb (= dynamic_eplb must be a bool, got {_show(switch)})")
        switches = ("dynamic_eplb", "enabled", "enable_eplb")
        for key in switches:
            v = plain_scalar(inner[key]) if key in inner else switch
            if not (isinstance(v, bool) and v == switch):  # (1 is no switch, as flat)
                raise ValueError(f"{key!r} in eplb_config ({_show(v)}) contradicts "
                                 f"'enable_eplb' beside it ({_show(switch)})")
        config = cls.from_dict({k: v for k, v in inner.items() if k not in switches}
                               | {"enable_eplb": switch}, _defaults=_VLLM_DEFAULTS)
        return _vllm_first_plan(config)

    @classmethod
    def parse(cls, config) -> EplbConfig:
        """None, an EplbConfig, a dict (mapping), a JSON string or an attribute object ->
        EplbConfig."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except (ValueError, RecursionError) as e:
                # JSONDecodeError, an int literal of > 4300 digits, or nesting past the stack
                raise ValueError(f"config string is not valid JSON "
                                 f"({str(e)[:200] or type(e).__name__})") from None
            if config is None:
                return cls()  # ("null": as None)
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        doc = _object_doc(cls, config)
        if doc is not None:
            out = cls.from_dict(doc)
            if dataclasses.is_dataclass(config) and "step_interval" in doc and (
                    "eplb_config" not in doc):
                # vLLM's EPLBConfig object alone (a dataclass with its step_interval): vLLM's
                # first rebalance, after a quarter of the interval, as in its shape
                out = _vllm_first_plan(out)
            return out
        raise ValueError(f"config must be None, an EplbConfig, a dict, a JSON string or an object "
                         f"with EPLB config attributes, got {type(config).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _vllm_first_plan(config: EplbConfig) -> EplbConfig:
    """vLLM starts its step counter at three quarters of step_interval: its first rebalance
    comes after a quarter of it (750 steps by default), not a whole one. Kept where set."""
    if config.first_plan_after is not None:
        return config
    return dataclasses.replace(
        config, first_plan_after=max(1, config.expert_heat_collection_interval // 4))


def _check_bool(key, v, what="a bool"):
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be {what}, got {_show(v)}")


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # (an array's == is elementwise: no single truth value)
        return False


def _integral(v):
    """A float holding an integer (1000.0, 1e9: JSON and YAML write counts so) as that int, as
    vLLM's pydantic config takes it; anything else as it is."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _show(v) -> str:
    """A value for an error message, cut short (a huge int's repr is long, and beyond 4300
    digits Python refuses to make it)."""
    if isinstance(v, int) and v.bit_length() > 64:
        return f"an int of {v.bit_length()} bits"
    r = repr(v)
    return r if len(r) <= 80 else f"{r[:60]}... ({len(r)} characters)"


def _as_int(key, v, lo, hi) -> int:
    v = _integral(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{key} must be an int >= {lo}, got {_show(v)}")
    if hi is not None and v > hi:
        raise ValueError(f"{key} must be an int <= {hi}, got {_show(v)}")
    return v


def _as_dict(x):
    """A mapping that is no dict (OmegaConf's DictConfig, MappingProxyType) as a dict of its
    items, so that its every key is checked as a dict's (read as an object, only our keys were
    looked up and a misspelt one went unseen); its None values are left out, as an attribute
    object's are (OmegaConf's structured configs hold None for a field left unset). Anything
    else as it is."""
    if isinstance(x, Mapping) and not isinstance(x, dict):
        # (the shape's own keys keep their None: it means what it means in a dict)
        return {k: v for k, v in x.items()
                if v is not None or k in ("eplb_config", "enable_eplb")}
    return x


def _check_phase(key, value):
    if not isinstance(value, str) or value not in _PHASES:
        raise ValueError(f"{key} must be one of {list(_PHASES)}, got {_show(value)}")
    if value != "all":
        raise ValueError(f"{key}: only 'all' is supported (load is collected in every phase; "
                         f"there is no prefill / decode filter), got {value!r}")


def _object_doc(cls, config) -> dict | None:
    """The keys of a config object as a dict (None: no settings object): vLLM's ParallelConfig
    (its ``enable_eplb`` and ``eplb_config``), a dataclass (vLLM's EPLBConfig), vllm-ascend's
    EplbConfig (a ``.config`` dict), or any object with our keys as attributes."""
    if isinstance(config, type) or callable(config) or inspect.ismodule(config):
        return None  # (a function, class or module has attributes too, but they are no settings)
    missing = object()
    switch = getattr(config, "enable_eplb", missing)
    inner = getattr(config, "eplb_config", missing)
    vllm_shape = (switch is not missing and switch is not None and inner is not missing
                  and inner is not None and not isinstance(inner, str))
    if dataclasses.is_dataclass(config) and not vllm_shape:
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if isinstance(getattr(config, "config", None), dict) and not vllm_shape:
        # vllm-ascend's EplbConfig: its values in a .config dict, read via __getattr__
        return dict(config.config)
    # getattr, not vars(): __getattr__ objects, class attributes, pydantic models and slots
    # classes hold settings that vars() does not list
    known = ({f.name for f in dataclasses.fields(cls)} | set(_ALIASES) | set(_PHASE_KEYS) | {_GATE}
             | _SGLANG_ONLY)
    doc = {}
    for name in sorted(known):
        try:
            value = getattr(config, name)
        except AttributeError:
            continue
        if value is not None:  # (None: unset, as OmegaConf-style objects answer)
            doc[name] = value
    if vllm_shape:  # (vLLM's ParallelConfig: its other attributes are its own; ours beside the
        # pair are refused by from_dict, as in a dict)
        return doc | {"enable_eplb": switch, "eplb_config": inner}
    if all(k in doc for k in _SGLANG_SERVER_ARGS):
        return doc  # (SGLang's whole ServerArgs: its other attributes are not EPLB's)
    # a public attribute of its own that is no key is a misspelt one, as in a dict
    unknown = sorted(k for k in getattr(config, "__dict__", {})
                     if isinstance(k, str) and not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"unknown EPLB config key {unknown[0]!r}; known: {sorted(known)}")
    return doc or None


def _policy(key, value) -> str:
    if key == "eplb_policy_type":
        value = _integral(value)
        if isinstance(value, bool) or not isinstance(value, int) or (
                value not in _ASCEND_POLICY_TYPES):
            raise ValueError(f"eplb_policy_type must be one of {sorted(_ASCEND_POLICY_TYPES)}, "
                             f"got {_show(value)}")
        return _ASCEND_POLICY_TYPES[value]
    if not isinstance(value, str):
        raise ValueError(f"policy must be a string, got {_show(value)}")
    if value == "stair":
        # vllm-ascend's patch makes it the default of vLLM's EPLBConfig on NPUs: a user may
        # never have chosen it, so it is read, not refused
        logger.warning("EPLB config: policy 'stair' (vllm-ascend's STAIR: rebalancing under "
                       "per-rank transfer limits) is read as 'min_move' (few slots changed a "
                       "rebalance; its stair_config limits are not read: max_move_bytes_per_step "
                       "bounds the bytes a step)")
        return "min_move"
    value = _POLICY_ALIASES.get(value, value)
    if value not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES) + list(_POLICY_ALIASES)} or "
                         f"'stair', got {_show(value)}")
    return value


def _refuse_sglang_in_a_peers_shape(doc: dict, where: str):
    """SGLang's keys beside or inside ``eplb_config`` (vLLM's or vllm-ascend's shape): refused,
    as whose defaults apply would be unclear."""
    sglang = sorted(k for k in doc if k in _SGLANG_ONLY)
    if sglang:
        raise ValueError(f"SGLang's EPLB keys {sglang} {where} 'eplb_config' (vLLM's or "
                         f"vllm-ascend's shape): one peer's vocabulary at a time (whose defaults "
                         f"apply would be unclear); pass SGLang's keys in a flat dict")


def _sglang_setting(key: str, value) -> list:
    """One of SGLang's EPLB server arguments -> the (canonical key, value) pairs it sets (none:
    read, not stored); ValueError naming it for a value it cannot have here."""
    if key == "ep_num_redundant_experts":
        return [("num_redundant_experts", value)]
    if key == "eplb_rebalance_num_iterations":
        return [("expert_heat_collection_interval", value)]
    if key == "expert_distribution_recorder_buffer_size":
        if value is None:  # (SGLang's: the rebalance interval, as our window left unset)
            return []
        if isinstance(value, int | float) and not isinstance(value, bool) and value == -1:
            raise ValueError(f"{key} -1 (SGLang's unbounded buffer) cannot be honoured: the "
                             f"window here is a ring of at most {MAX_WINDOW_SIZE} steps "
                             f"([steps, layers, experts] int64 on the device); give a number of "
                             f"steps, or None (the rebalance interval, as in SGLang)")
        return [("window_size", value)]
    if key == "eplb_rebalance_layers_per_chunk":
        # (None: all layers in one forward pass in SGLang; here layers_per_step keeps its 1, as
        # our moves run in the background, layer by layer)
        return [] if value is None else [("layers_per_step", value)]
    if key == "eplb_min_rebalancing_utilization_threshold":
        return [("balancedness_threshold", value)]
    if key == "eplb_algorithm":
        return _sglang_algorithm(value)
    if key == "init_expert_location":
        return [("expert_map_path", _sglang_location(value))]
    choices = _SGLANG_CHOICES[key]
    if not (value is None or isinstance(value, str)) or value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {_show(value)}")
    if key == "expert_balancedness_report_mode" and value in ("server_log", "both"):
        return [("log_balancedness", True)]
    return []  # (off / prometheus: nothing to log here; log_balancedness keeps its value)


def _sglang_algorithm(value) -> list:
    """SGLang's ``eplb_algorithm`` -> policy (and one group for its global ``deepseek``)."""
    if isinstance(value, str) and value in ("elasticity_aware", "elasticity_aware_hierarchical"):
        raise ValueError(f"eplb_algorithm {value!r} (SGLang's elastic EP: placement over the "
                         f"ranks still alive) has no counterpart here: the EP group is fixed "
                         f"at attach; choose one of {list(_SGLANG_ALGORITHMS)}")
    if not isinstance(value, str) or value not in _SGLANG_ALGORITHMS:
        raise ValueError(f"eplb_algorithm must be one of {list(_SGLANG_ALGORITHMS)}, got "
                         f"{_show(value)}")
    policy, groups = _SGLANG_ALGORITHMS[value]
    if value.startswith("deepseek_vec"):
        # (read, not refused, as 'stair' is: the nearest policy, said once at parse)
        logger.warning("EPLB config: eplb_algorithm %r is read as %r (DeepSeek's algorithm on "
                       "the window's summed load; SGLang's vec variant chooses replicas against "
                       "each forward pass's load in the window and places them in snake order)",
                       value, value.replace("_vec", ""))
    return [("policy", policy)] + ([] if groups is None else [("num_groups", groups)])


def _sglang_location(value) -> str | None:
    """SGLang's ``init_expert_location`` -> expert_map_path ("trivial": None, its default spread,
    which is ours)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ValueError(f"init_expert_location must be 'trivial' or the path of an SGLang "
                         f"start file (.json or .pt), got {_show(value)}")
    if value == "trivial":
        return None
    if value.endswith((".json", ".pt")):
        return value
    raise ValueError(f"init_expert_location {_show(value)}: neither 'trivial' nor a .json / .pt "
                     f"path, so SGLang would read it as inline JSON, which cannot be read here "
                     f"(expert_map_path is a file): write it to a .json file")
