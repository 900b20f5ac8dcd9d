"""Edge cases of the ops found in review: the raw op's offset check cannot wrap, and the
composite fallback agrees with the native CPU kernel when the layer has no expert."""

import pytest
import torch

from eplb_native import ops


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_record_counts_offset_near_2_63_is_refused_not_wrapped(device):
    # offset + len(expert_tokens) used to wrap negative and pass, writing far outside load
    load = torch.zeros(4, dtype=torch.int32, device=device)
    tokens = torch.tensor([1], device=device)
    for offset in (2**63 - 1, 2**63 - 4, 4):
        with pytest.raises(ValueError, match=r"offset \(\d+\) \+ len\(expert_tokens\) \(1\)"):
            torch.ops.eplb_native.record_counts(load, tokens, 1, offset)
    if device == "cpu":
        assert torch.equal(load, torch.zeros(4, dtype=torch.int32))
        torch.ops.eplb_native.record_counts(load, tokens, 1, 3)  # the last slot still fits
        assert load.tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("mode", ["spread", "rank_local"])
def test_no_expert_maps_every_id_to_minus_one_in_both_paths(mode):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(-3, 5, (6, 2), generator=gen, dtype=torch.int32)
    table = torch.zeros((0, 3) if mode == "spread" else (0,), dtype=torch.int64)
    cnt = torch.zeros(0, dtype=torch.int64)
    outs, loads = [], []
    for fn in (torch.ops.eplb_native.map_and_record, ops.composite_map_and_record):
        load = torch.arange(4, dtype=torch.int64)
        outs.append(fn(ids, table, cnt, load, torch.tensor(True), None, mode))
        loads.append(load)
    assert torch.equal(outs[0], torch.full_like(ids, -1)) and torch.equal(outs[0], outs[1])
    assert outs[1].dtype == ids.dtype and outs[1].shape == ids.shape
    assert all(torch.equal(x, torch.arange(4)) for x in loads)


def test_rank_local_logcnt_on_another_device_is_refused():
    """rank_local does not read logcnt, but it takes part in picking the kernel: a meta logcnt
    ran the Meta kernel on real tensors (uninitialised ids back, load untouched, no error)."""
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 8, (5, 2), generator=gen, dtype=torch.int64)
    table = torch.randperm(8, generator=gen)
    stray = torch.zeros(8, dtype=torch.int64, device="meta")
    for fn in (torch.ops.eplb_native.map_and_record, ops.composite_map_and_record):
        load = torch.zeros(8, dtype=torch.int64)
        with pytest.raises(ValueError, match="logcnt must be on cpu"):
            fn(ids, table, stray, load, torch.tensor(True), None, "rank_local")
        assert not load.any()
    load = torch.zeros(8, dtype=torch.int64)  # the same tensors with logcnt on the CPU: fine
    out = ops.map_and_record(ids, table, table, load, torch.tensor(True), mode="rank_local")
    assert torch.equal(out, table[ids]) and torch.equal(load, torch.bincount(out.view(-1),
                                                                           minlength=8))


def test_record_counts_takes_numpy_integers_as_the_op_does():
    np = pytest.importorskip("numpy")
    load = torch.zeros(6, dtype=torch.int64)
    counts = torch.tensor([3, 1, 4])
    ops.record_counts(load, counts, np.int64(1), np.int32(2))
    assert load.tolist() == [0, 0, 3, 1, 4, 0]
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        ops.record_counts(load, counts, 1, np.int64(-1))


def test_raw_ops_name_what_is_missing_or_on_the_wrong_device():
    """The raw ops (what torch.compile graphs call, no Python wrapper) name the argument: a None
    record said `got UNKNOWN_SCALAR`; record_counts named topk_ids, which it does not take."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 4, (3, 2), generator=gen)
    table = torch.arange(4).view(4, 1)
    cnt = torch.ones(4, dtype=torch.int64)
    load = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"record is required .* got None"):
        torch.ops.eplb_native.map_and_record(ids, table, cnt, load, None, None, "spread")
    with pytest.raises(TypeError, match=r"record is required .* got None"):
        torch.ops.eplb_native.record_topk(load, ids, None, None)
    with pytest.raises(ValueError, match=r"expert_tokens must be on cpu \(the device of load\)"):
        torch.ops.eplb_native.record_counts(load, torch.tensor([1], device="meta"), 1, 0)
    assert not load.any()


def test_rank_local_logcnt_of_another_type_is_a_type_error():
    ids = torch.tensor([[0, 1]])
    load = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="logcnt must be a torch.Tensor or None, got int"):
        ops.map_and_record(ids, torch.arange(2), 5, load, torch.tensor(True), mode="rank_local")
    assert not load.any()


@pytest.mark.parametrize("fn", [torch.ops.eplb_native.record_counts, ops.record_counts,
                                ops.composite_record_counts])
def test_record_counts_refuses_counts_in_load_itself(fn):
    # (review 18: load[:4] added into load[1:] read counters already added to: 1,3,6,10,15)
    load = torch.arange(1, 7, dtype=torch.int64)
    for tokens, group_list_type in ((load[:4], 1), (load[:4], 0), (load[2:], 1), (load, 1),
                                    (load[::2], 1)):
        with pytest.raises(ValueError, match="expert_tokens must not share memory with load"):
            fn(load, tokens, group_list_type, 1 if tokens.numel() < 6 else 0)
    assert load.tolist() == [1, 2, 3, 4, 5, 6]
    fn(load, load[:4].clone(), 1, 1)  # a copy is fine
    assert load.tolist() == [1, 3, 5, 7, 9, 6]
    other = torch.zeros(8, dtype=torch.int64)
    fn(other[4:], other[:4].clone() + 1, 1, 0)  # views of one buffer that do not overlap
    assert other.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_cpu_counts_from_several_threads_add_up():
    # (review 18: the merge into load was a plain +=, 26K of 19.2M counts lost on 2 cores)
    import threading

    ids = torch.randint(0, 64, (1 << 17,), generator=torch.Generator().manual_seed(3))
    load = torch.zeros(64, dtype=torch.int64)
    flag = torch.tensor(True)

    def work():
        for _ in range(20):
            torch.ops.eplb_native.record_topk(load, ids, flag)
            torch.ops.eplb_native.record_counts(load, torch.ones(64, dtype=torch.int64), 1, 0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(load, 80 * (torch.bincount(ids, minlength=64) + 1))


def test_int32_load_wraps_as_documented():
    load = torch.tensor([2**31 - 2], dtype=torch.int32)
    for fn in (torch.ops.eplb_native.record_topk, ops.composite_record_topk):
        x = load.clone()
        fn(x, torch.zeros(5, dtype=torch.int64), torch.tensor(True))
        assert x.item() == 2**31 - 2 + 5 - 2**32


def test_sparse_arguments_are_type_errors_naming_them():
    ids = torch.tensor([[0, 1]]).to_sparse()
    table = torch.tensor([0, 1])
    for fn in (torch.ops.eplb_native.map_and_record, ops.composite_map_and_record):
        with pytest.raises(TypeError, match="topk_ids must be a dense tensor"):
            fn(ids, table, None, torch.zeros(2, dtype=torch.int64), torch.tensor(True), None,
               "rank_local")
