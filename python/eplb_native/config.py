"""``EplbConfig``: the updator's settings, in the vocabularies users already have.

Accepted keys (``EplbConfig.parse`` takes a dict, a ``{"eplb_config": {...}}`` wrapper, a JSON
string, an object with these attributes such as vLLM's ``EPLBConfig``, or an EplbConfig):

=================================  ==================================  =========================
key (aliases)                      meaning                             default
=================================  ==================================  =========================
``dynamic_eplb`` (``enabled``,     rebalance while serving; off: only  True
``enable_eplb``)                   record and log balancedness
``num_redundant_experts``          extra slots per layer (P = E + it)  0 (or what the layer has)
``expert_heat_collection_interval``  steps between two plans (vLLM      100
(``step_interval``)                ``step_interval``)
``window_size``                    recent steps of load a plan sees    = heat interval
``algorithm_execution_interval``   steps from submitting a plan to     1
                                   moving its first layer
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
                                   deepseek; vllm-ascend types 0, 1 =
                                   deepseek, 2, 3 = balanced)
``transfer_timeout_s``             a layer whose transfers take longer 30.0
                                   (in one step) keeps its old
                                   placement
``expert_map_path``                initial placement (vllm-ascend      None (default spread)
                                   expert-map JSON)
``expert_map_record_path``         final placement written here        None
``log_balancedness``               log balancedness with ``logging``   False
``log_balancedness_interval``      every this many steps               1
``use_async``                      plan on the background thread       True
                                   (False: wait for the plan at once)
``num_nodes``, ``num_groups``      topology for hierarchical policies  1, 1
``communicator``,                  accepted for vLLM compatibility;    None, False
``enable_migration_batching``      moves always use torch.distributed
                                   P2P, one grouped batch per layer
=================================  ==================================  =========================

Unknown keys, wrong types and impossible values raise ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass

POLICIES = ("deepseek", "balanced", "min_move")
_POLICY_ALIASES = {"default": "deepseek"}
_ASCEND_POLICY_TYPES = {0: "deepseek", 1: "deepseek", 2: "balanced", 3: "balanced"}
_COMMUNICATORS = (None, "torch_nccl", "torch_gloo", "torch_xccl", "pynccl", "nixl", "torch")

#: alias -> canonical key
_ALIASES = {
    "enabled": "dynamic_eplb",
    "enable_eplb": "dynamic_eplb",
    "step_interval": "expert_heat_collection_interval",
    "eplb_policy_type": "policy",
}


#: Longest transfer_timeout_s (a week).
MAX_TRANSFER_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class EplbConfig:
    """The updator's settings (canonical names; see the module docstring for aliases)."""

    dynamic_eplb: bool = True
    num_redundant_experts: int | None = None
    expert_heat_collection_interval: int = 100
    window_size: int | None = None
    algorithm_execution_interval: int = 1
    layers_per_step: int = 1
    max_move_bytes_per_step: int | None = None
    policy: str = "balanced"
    transfer_timeout_s: float = 30.0
    expert_map_path: str | None = None
    expert_map_record_path: str | None = None
    log_balancedness: bool = False
    log_balancedness_interval: int = 1
    use_async: bool = True
    num_nodes: int = 1
    num_groups: int = 1
    communicator: str | None = None
    enable_migration_batching: bool = False

    def __post_init__(self):
        # numpy scalars (np.int64(16), np.bool_(True), np.float32(5.0)) as the Python values
        # they stand for, as plan() takes them
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
                if v.dtype.kind in "biuf":
                    object.__setattr__(self, f.name, v.item())
        for key in ("dynamic_eplb", "log_balancedness", "use_async", "enable_migration_batching"):
            _check_bool(key, getattr(self, key))
        for key, lo in (("expert_heat_collection_interval", 1), ("algorithm_execution_interval", 0),
                        ("layers_per_step", 1), ("log_balancedness_interval", 1),
                        ("num_nodes", 1), ("num_groups", 1)):
            _check_int(key, getattr(self, key), lo)
        if self.num_redundant_experts is not None:
            _check_int("num_redundant_experts", self.num_redundant_experts, 0)
        if self.window_size is not None:
            _check_int("window_size", self.window_size, 1)
        if self.max_move_bytes_per_step is not None:
            _check_int("max_move_bytes_per_step", self.max_move_bytes_per_step, 1)
        t = self.transfer_timeout_s
        # (bounded: a wait on a longer timeout overflows the platform's time_t in threading)
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or (
                not 0 < t <= MAX_TRANSFER_TIMEOUT_S):
            raise ValueError(f"transfer_timeout_s must be a number in (0, "
                             f"{MAX_TRANSFER_TIMEOUT_S}] seconds, got {t!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        for key in ("expert_map_path", "expert_map_record_path"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str | os.PathLike):
                raise ValueError(f"{key} must be a path (str) or None, got {type(v).__name__}")
            if isinstance(v, str) and not v:
                raise ValueError(f"{key} must be a non-empty path or None")
        # expert_map_path is not opened here: a file missing on one host must fail attach on
        # every rank together (the updator agrees on the load), not this rank alone before the
        # collective part of attach, where the others would wait for it.
        if self.communicator not in _COMMUNICATORS:
            raise ValueError(f"communicator must be one of {list(_COMMUNICATORS)}, got "
                             f"{self.communicator!r}")

    @property
    def window_steps(self) -> int:
        """Steps of load each plan sees (``window_size``, else the heat interval)."""
        return self.window_size or self.expert_heat_collection_interval

    @classmethod
    def from_dict(cls, doc: dict) -> EplbConfig:
        """Builds from a dict in any accepted vocabulary (or the ``eplb_config`` wrapper)."""
        if not isinstance(doc, dict):
            raise ValueError(f"config must be a dict, got {type(doc).__name__}")
        if "eplb_config" in doc:
            # vllm-ascend's wrapper, alone or inside a whole additional_config (whose other keys
            # are vllm-ascend's own), but not beside keys of ours: which would win is unclear
            ours = sorted(k for k in doc if k != "eplb_config" and (
                _ALIASES.get(k, k) in {f.name for f in dataclasses.fields(cls)}))
            if ours:
                raise ValueError(f"EPLB config keys {ours} beside 'eplb_config': put them "
                                 f"inside it")
            doc = doc["eplb_config"]
            if not isinstance(doc, dict):
                raise ValueError("eplb_config must be a dict")
        fields = {f.name for f in dataclasses.fields(cls)}
        out: dict = {}
        source: dict = {}
        for key, value in doc.items():
            if not isinstance(key, str):
                raise ValueError(f"config keys must be strings, got {key!r}")
            canon = _ALIASES.get(key, key)
            if canon not in fields:
                raise ValueError(f"unknown EPLB config key {key!r}; known: "
                                 f"{sorted(fields | set(_ALIASES))}")
            if canon == "policy":
                value = _policy(key, value)
            if canon in out and out[canon] != value:
                raise ValueError(f"{key!r} ({value!r}) contradicts {source[canon]!r} "
                                 f"({out[canon]!r})")
            out[canon] = value
            source[canon] = key
        try:
            return cls(**out)
        except ValueError as e:
            # name the key as the user spelled it (an alias) as well as ours
            msg = str(e)
            for canon, key in source.items():
                if key != canon and msg.startswith(canon):
                    raise ValueError(f"{key} (= {msg})") from None
            raise

    @classmethod
    def parse(cls, config) -> EplbConfig:
        """None, an EplbConfig, a dict, a JSON string or an attribute object -> EplbConfig."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except json.JSONDecodeError as e:
                raise ValueError(f"config string is not valid JSON ({e})") from None
        if isinstance(config, dict):
            return cls.from_dict(config)
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            return cls.from_dict({f.name: getattr(config, f.name)
                                  for f in dataclasses.fields(config)})
        # an attribute object (e.g. an engine's config instance); a function, class or module
        # has a __dict__ too, but its attributes are no settings
        if hasattr(config, "__dict__") and not (callable(config) or inspect.ismodule(config)):
            return cls.from_dict({k: v for k, v in vars(config).items() if not k.startswith("_")})
        raise ValueError(f"config must be None, an EplbConfig, a dict or a JSON string, got "
                         f"{type(config).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_bool(key, v):
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be a bool, got {v!r}")


def _check_int(key, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{key} must be an int >= {lo}, got {v!r}")


def _policy(key, value) -> str:
    if key == "eplb_policy_type":
        if isinstance(value, bool) or not isinstance(value, int) or (
                value not in _ASCEND_POLICY_TYPES):
            raise ValueError(f"eplb_policy_type must be one of {sorted(_ASCEND_POLICY_TYPES)}, "
                             f"got {value!r}")
        return _ASCEND_POLICY_TYPES[value]
    if not isinstance(value, str):
        raise ValueError(f"policy must be a string, got {value!r}")
    value = _POLICY_ALIASES.get(value, value)
    if value not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES) + list(_POLICY_ALIASES)}, got "
                         f"{value!r}")
    return value
