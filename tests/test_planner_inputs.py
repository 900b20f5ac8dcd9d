"""eplb_native.plan's Python-side argument checks that tests/test_planner.py does not cover."""

import numpy as np
import pytest
import torch

import eplb_native


@pytest.mark.parametrize("load", [np.full((1, 4), 1 + 1j), torch.ones(1, 4, dtype=torch.complex64)])
def test_complex_load_is_refused(load):
    # the cast to float64 used to drop the imaginary part, with only a ComplexWarning
    with pytest.raises(TypeError, match="load must hold real numbers"):
        eplb_native.plan(load, num_ranks=2, num_replicas=4)


@pytest.mark.parametrize("load,error,match", [
    (np.array(3.0), ValueError, r"load must be an array, got a 0-d one \(3.0\)"),
    (np.array([[1, 2, 3, 4]], "m8[s]"), TypeError, "load must hold real numbers, got dtype "
                                                   r"timedelta64\[s\]"),
    (torch.ones(1, 4).to_sparse(), TypeError, "load must be a dense tensor, got layout "
                                              "torch.sparse_coo"),
])
def test_scalar_timedelta_and_sparse_loads_are_refused(load, error, match):
    # a 0-d load planned one layer of one expert; timedelta64 counts as an integer in numpy; a
    # sparse tensor was said to have "no numpy equivalent" of its float32 dtype
    with pytest.raises(error, match=match):
        eplb_native.plan(load, num_ranks=2, num_replicas=4)
    with pytest.raises(error, match=match.replace("load", "weight")):
        eplb_native.rebalance_experts(load, 4, 1, 1, 2)


def test_rebalance_experts_names_weight():
    for w, match in ((np.array([[1.0, np.nan, 2, 3]]), r"weight must be finite and >= 0, got "
                                                       r"nan at \[0, 1\]"),
                     (np.array([[1.0, -2, 3, 4]]), "weight must be finite and >= 0, got -2.0"),
                     (np.ones((1, 0)), r"weight must have shape \[layers, experts\]")):
        with pytest.raises(ValueError, match=match):
            eplb_native.rebalance_experts(w, 4, 1, 1, 2)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"threads": 2**31}, ValueError, "threads must be <= 4096"),
    ({"threads": True}, TypeError, "threads must be an int"),
    ({"min_move_target": "a"}, TypeError, "min_move_target must be a real number"),
    ({"min_move_target": True}, TypeError, "min_move_target must be a real number"),
    ({"min_move_target": float("nan")}, ValueError, r"min_move_target must be in \(0, 1\]"),
    ({"min_move_target": 1.5}, ValueError, r"min_move_target must be in \(0, 1\]"),
    ({"min_move_target": 10**400}, ValueError, r"min_move_target must be in \(0, 1\]"),
    ({"policy": ["balanced"]}, TypeError, "policy must be a str"),
    ({"num_ranks": 2**70}, ValueError, "num_ranks must be <="),
    # (it was a std::bad_alloc: MemoryError from plan, "RuntimeError: internal" from submit)
    ({"num_replicas": 2**40}, ValueError, "num_replicas must be <= 65536"),
    ({"num_replicas": 2**16 + 1}, ValueError, "num_replicas must be <= 65536"),
    ({"preserve_slots": "false"}, TypeError, "preserve_slots must be a bool"),
    ({"transfers": None}, TypeError, "transfers must be a bool"),
])
def test_plan_and_planner_name_the_argument(kwargs, error, match):
    load = np.random.default_rng(0).random((2, 8)) + 0.5
    args = {"num_ranks": 2, "num_replicas": 8, **kwargs}
    with pytest.raises(error, match=match):
        eplb_native.plan(load, **args)
    threads = args.pop("threads", 1)
    with eplb_native.Planner() as planner:
        if "threads" in kwargs:
            with pytest.raises(error, match=match):
                eplb_native.Planner(threads=threads)
        else:
            with pytest.raises(error, match=match):
                planner.submit(load, **args)
        # nothing was queued by the refused call: the next job is the only one
        assert planner.submit(load, num_ranks=2, num_replicas=8).result(timeout=60) is not None


def test_unsigned_ids_past_int64_are_named_as_given():
    old = np.array([[0, 1, 2, 2**64 - 1]], dtype=np.uint64)
    with pytest.raises(ValueError, match="^old_phy2log holds 18446744073709551615, beyond int64"):
        eplb_native.plan(np.ones((1, 4)), old, num_ranks=2)
    with pytest.raises(ValueError, match="^phy2log holds 18446744073709551615"):
        eplb_native.preserve_slots(old, np.zeros((1, 4), np.int64), 2)


def test_torch_tensors_numpy_cannot_hold_are_named():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="^load is a meta-device tensor"):
        eplb_native.plan(torch.empty(2, 8, device="meta"), num_ranks=2, num_replicas=8)
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match="^load has dtype torch.float8_e4m3fn"):
            eplb_native.plan(torch.ones(2, 8).to(torch.float8_e4m3fn), num_ranks=2,
                             num_replicas=8)


def test_load_whose_layer_sum_overflows_is_refused():
    # every entry finite, but the layer sums to inf: rank loads and balancedness would be
    # inf / 0 / NaN
    load = np.full((2, 8), 1e308)
    load[0] = 1.0
    with pytest.raises(ValueError, match="load: layer 1 sums to"):
        eplb_native.plan(load, num_ranks=2, num_replicas=8)
    ok = np.full((1, 8), 1e306)  # 8e306: below the limit, planned exactly
    p = eplb_native.plan(ok, num_ranks=2, num_replicas=8)
    assert np.isfinite(p.max_load_after).all() and p.max_load_after[0] == 4e306


def test_record_counts_and_map_and_record_wrapper_arguments():
    from eplb_native import ops

    load = torch.zeros(8, dtype=torch.int64)
    tokens = torch.tensor([1, 2, 3])
    for glt in (1.0, True, "1"):
        with pytest.raises(ValueError, match="group_list_type must be the int 0"):
            ops.record_counts(load, tokens, glt, 0)
    for offset in (True, 1.0):
        with pytest.raises(ValueError, match="offset must be an int"):
            ops.record_counts(load, tokens, 1, offset)
    assert torch.equal(load, torch.zeros(8, dtype=torch.int64))
    ids = torch.tensor([[0, 1]], dtype=torch.int32)
    l2p = torch.tensor([[0], [1]])
    with pytest.raises(TypeError, match="logcnt is required in mode 'spread'"):
        ops.map_and_record(ids, l2p, None, load, torch.tensor(True))
    # the op itself (no wrapper) names it too
    with pytest.raises(TypeError, match="logcnt is required"):
        torch.ops.eplb_native.map_and_record(ids, l2p, None, load, torch.tensor(True), None,
                                             "spread")
    assert torch.equal(load, torch.zeros(8, dtype=torch.int64))


def test_layer_schedule_checks_num_ranks_and_num_nodes():
    from eplb_native.transfer import layer_schedule

    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_ranks must be an int"):
            layer_schedule(np.arange(4), np.arange(4), bad)
    with pytest.raises(ValueError, match="num_nodes must be an int"):
        layer_schedule(np.arange(4), np.arange(4), 2, 0)


def test_layer_schedule_refuses_float_ids_and_takes_sparse_ones():
    from eplb_native.transfer import layer_schedule

    with pytest.raises(TypeError, match="old_phy2log must hold integer expert ids"):
        layer_schedule(np.array([0.7, 1.2]), np.array([1, 0]), 1)
    with pytest.raises(TypeError, match="new_phy2log must hold integer expert ids"):
        layer_schedule(np.array([0, 1]), np.array([1.0, 0.0]), 1)
    # ids far apart (as a caller's global ids may be): the same fills as on dense ids
    old, new = np.array([0, 5, 9, 5]), np.array([9, 0, 5, 9])
    big = 2**40
    dense = layer_schedule(old, new, 2)
    sparse = layer_schedule(np.where(old == 9, big, old), np.where(new == 9, big, new), 2)
    import dataclasses

    assert [dataclasses.replace(f, logical=9) if f.logical == big else f for f in sparse] == dense
    assert any(f.logical == big for f in sparse)


def test_planner_bindings_check_what_they_index():
    """The private bindings re-check shapes and ids (they used to divide by zero or read past
    an array when called directly)."""
    from eplb_native import _planner

    p2l = np.zeros((2, 8), np.int64)
    with pytest.raises(ValueError, match="num_ranks must be >= 1"):
        _planner.preserve_slots(p2l, p2l, 0)
    with pytest.raises(ValueError, match="shape of phy2log"):
        _planner.preserve_slots(p2l, np.zeros((1, 2), np.int64), 2)
    for args, match in [((np.arange(4), np.arange(3), 4, 2, 1), "equal size"),
                        ((np.arange(4), np.arange(4), 4, 0, 1), "num_ranks must divide"),
                        ((np.arange(4), np.array([0, 1, 2, 9]), 4, 2, 1), "new id"),
                        ((np.array([0, 0, 1, 1]), np.array([0, 1, 2, 2]), 3, 2, 1), "new id"),
                        ((np.array([0, 5, 1, 1]), np.arange(4), 4, 2, 1), "old id")]:
        with pytest.raises(ValueError, match=match):
            _planner.layer_transfers(*args)


def test_tensors_numpy_cannot_read_are_named():
    """(review 18's fuzz: a nested tensor read as strided and failed inside torch; torch.Size /
    a dtype were taken for tensors, an AttributeError)"""
    nested = torch.nested.nested_tensor([torch.ones(3), torch.ones(3)])
    with pytest.raises(TypeError, match="load must be a dense tensor, got a nested one"):
        eplb_native.plan(nested, num_ranks=1, num_replicas=3)
    with pytest.raises(TypeError, match="weight must be a dense tensor, got a nested one"):
        eplb_native.rebalance_experts(nested, 3, 1, 1, 1)
    with pytest.raises(TypeError, match="load must be a numpy array or torch tensor, got dtype"):
        eplb_native.plan(torch.float32, num_ranks=1, num_replicas=3)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_replicas": 9}, "divisible"),
    ({"num_replicas": 4, "num_ranks": 2}, "num_replicas"),
    ({"policy": "min_move"}, "min_move' needs old_phy2log"),
    ({"nan": True}, "finite"),
    ({"old": True}, "old_phy2log"),
])
def test_planner_submit_refuses_what_plan_would_at_once(kwargs, match):
    """(review 18: these were queued, their ValueError only through the future, after the plans
    ahead of them)"""
    load = np.random.default_rng(1).random((2, 8)) + 0.5
    args = {"num_ranks": 2, "num_replicas": 10}
    if kwargs.pop("nan", False):
        load[1, 3] = np.nan
    if kwargs.pop("old", False):
        args["old_phy2log"] = np.tile(np.r_[np.arange(8), 8, 0], (2, 1))  # id 8 of 8 experts
        args.pop("num_replicas")
    args.update(kwargs)
    with eplb_native.Planner() as planner:
        with pytest.raises(ValueError, match=match):
            planner.submit(load, **args)
        assert not planner._futures  # nothing queued
