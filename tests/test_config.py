"""EplbConfig: both vocabularies, the wrapper, and errors naming the key (fuzzed)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_native import EplbConfig


def test_vllm_ascend_vocabulary_and_wrapper(tmp_path):
    path = tmp_path / "map.json"
    path.write_text("{}")
    doc = {"eplb_config": {"dynamic_eplb": True, "expert_heat_collection_interval": 400,
                           "algorithm_execution_interval": 30, "num_redundant_experts": 16,
                           "expert_map_path": str(path),
                           "expert_map_record_path": str(tmp_path / "out.json"),
                           "eplb_policy_type": 0}}
    c = EplbConfig.parse(doc)
    assert (c.expert_heat_collection_interval, c.algorithm_execution_interval) == (400, 30)
    assert c.num_redundant_experts == 16 and c.policy == "deepseek"
    assert c.window_steps == 400
    assert EplbConfig.parse(json.dumps(doc)) == c


def test_wrapper_inside_a_whole_additional_config_and_numpy_scalars():
    """vllm-ascend's additional_config holds eplb_config beside its own keys: those are not
    ours and are left alone; a key of ours beside the wrapper is ambiguous and refused. numpy
    scalars count as the Python numbers they hold (as plan() takes them)."""
    import numpy as np

    doc = {"eplb_config": {"num_redundant_experts": 16}, "torchair_graph_config": {},
           "ascend_scheduler_config": {"enabled": True}}
    assert EplbConfig.parse(doc).num_redundant_experts == 16
    with pytest.raises(ValueError, match="num_redundant_experts.*beside 'eplb_config'"):
        EplbConfig.parse({"eplb_config": {}, "num_redundant_experts": 16})
    c = EplbConfig.parse({"num_redundant_experts": np.int64(16), "dynamic_eplb": np.bool_(True),
                          "expert_heat_collection_interval": np.int32(100),
                          "transfer_timeout_s": np.float32(5.0)})
    assert c == EplbConfig.parse({"num_redundant_experts": 16, "dynamic_eplb": True,
                                  "expert_heat_collection_interval": 100,
                                  "transfer_timeout_s": 5.0})
    assert type(c.num_redundant_experts) is int and type(c.dynamic_eplb) is bool
    with pytest.raises(ValueError, match="num_redundant_experts"):
        EplbConfig.parse({"num_redundant_experts": np.float64(16)})


def test_vllm_vocabulary():
    @dataclasses.dataclass
    class VllmEPLBConfig:  # the fields of vLLM's EPLBConfig
        window_size: int = 1000
        step_interval: int = 3000
        num_redundant_experts: int = 0
        log_balancedness: bool = False
        log_balancedness_interval: int = 1
        use_async: bool = False
        policy: str = "default"
        communicator: str | None = None
        enable_migration_batching: bool = False

    c = EplbConfig.parse(VllmEPLBConfig())
    assert c.window_steps == 1000 and c.expert_heat_collection_interval == 3000
    assert c.policy == "deepseek" and c.use_async is False


def test_ours_and_defaults():
    assert EplbConfig.parse(None) == EplbConfig()
    c = EplbConfig.parse({"policy": "min_move", "layers_per_step": 2, "transfer_timeout_s": 5})
    assert (c.policy, c.layers_per_step, c.transfer_timeout_s) == ("min_move", 2, 5)
    assert c.max_move_bytes_per_step is None
    assert EplbConfig.parse({"max_move_bytes_per_step": 1 << 30}).max_move_bytes_per_step == 1 << 30
    assert EplbConfig.parse(c) is c


@pytest.mark.parametrize("config", [len, EplbConfig, pytest, lambda: None, 3, [1, 2], "[1, 2]"])
def test_not_a_config_is_refused(config):
    # a function, class or module has a __dict__ but holds no settings: refused, not defaults
    with pytest.raises(ValueError, match="config must be"):
        EplbConfig.parse(config)


@pytest.mark.parametrize("doc,key", [
    ({"expert_heat_colection_interval": 3}, "expert_heat_colection_interval"),
    ({"step_interval": 0}, "expert_heat_collection_interval"),
    ({"window_size": -1}, "window_size"),
    ({"num_redundant_experts": 1.5}, "num_redundant_experts"),
    ({"policy": "best"}, "policy"),
    ({"eplb_policy_type": 9}, "eplb_policy_type"),
    ({"eplb_policy_type": 2.0}, "eplb_policy_type"),
    ({"eplb_policy_type": "2"}, "eplb_policy_type"),
    ({"transfer_timeout_s": float("nan")}, "transfer_timeout_s"),
    ({"transfer_timeout_s": 1e300}, r"transfer_timeout_s must be a number in \(0, 604800\]"),
    ({"max_move_bytes_per_step": 0}, "max_move_bytes_per_step"),
    ({"max_move_bytes_per_step": 2.5e9}, "max_move_bytes_per_step"),
    ({"max_move_bytes_per_step": True}, "max_move_bytes_per_step"),
    ({"dynamic_eplb": "yes"}, "dynamic_eplb"),
    ({"expert_map_path": ""}, "expert_map_path"),
    ({"expert_map_path": 3}, "expert_map_path"),
    ({"step_interval": 3, "expert_heat_collection_interval": 4}, "step_interval"),
    ({"eplb_config": 3}, "eplb_config"),
])
def test_errors_name_the_key(doc, key):
    with pytest.raises(ValueError, match=key):
        EplbConfig.parse(doc)


_KEYS = [f.name for f in dataclasses.fields(EplbConfig)] + [
    "step_interval", "enabled", "eplb_policy_type", "bogus"]
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["deepseek", "balanced", "min_move"]))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=5))
def test_fuzz_valid_or_valueerror_naming_a_key(doc):
    try:
        c = EplbConfig.parse(doc)
    except ValueError as e:
        assert any(k in str(e) for k in doc) or "expert_heat_collection_interval" in str(e), e
        return
    # accepted: every given value landed, unchanged, in the field it names
    ascend_types = {0: "deepseek", 1: "deepseek", 2: "balanced", 3: "balanced"}
    for k, v in doc.items():
        assert k != "bogus"
        if k == "eplb_policy_type":
            assert c.policy == ascend_types[v]
        elif k == "policy":
            assert c.policy == {"default": "deepseek"}.get(v, v)
        else:
            canon = {"step_interval": "expert_heat_collection_interval",
                     "enabled": "dynamic_eplb"}.get(k, k)
            got = getattr(c, canon)
            assert got == v and type(got) is type(v), (k, v, got)
    assert c.max_move_bytes_per_step is None or c.max_move_bytes_per_step >= 1
