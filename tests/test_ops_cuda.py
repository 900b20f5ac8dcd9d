"""CUDA paths of the ops that tests/test_ops.py does not reach (written from a review of
csrc/ops/cuda/map_record.cu, ninth session): record_topk's global-atomic histogram, record_counts'
grid-stride loop, int64 ids past 2^32, rank_local with a table past the registers plus the
shared histogram, the multiply-high modulo up to its limit, the 2^31 id refusal, a second GPU,
and rank_local's unused logcnt on another device. Each compares against a NumPy reference of
the contract (csrc/ops/ops.h) on random data. Every test skips without a GPU. They ran first on
an H100 on 2026-12-07 (thirteenth session, main 2fc66db): all passed but the two needing a
second GPU, which skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ops as ref  # (tests/ is on sys.path, see conftest)

import eplb_native.ops as ops

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
lib = torch.ops.eplb_native if CUDA else None


# ---------------------------------------------------------------- rank_local's logcnt


def test_rank_local_logcnt_on_meta_is_refused():
    """rank_local does not read logcnt, but logcnt takes part in picking the kernel (Meta
    outranks CUDA): one on another device is refused, naming it, and nothing is counted."""
    ids = torch.tensor([[0, 1], [2, 1]], device="cuda")
    table = torch.tensor([3, 0, 2], device="cuda")
    load = torch.zeros(4, dtype=torch.int64, device="cuda")
    stray = torch.zeros(3, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="logcnt"):
        lib.map_and_record(ids, table, stray, load, torch.tensor(True, device="cuda"), None,
                           "rank_local")
    assert load.tolist() == [0, 0, 0, 0]


def test_rank_local_logcnt_on_cuda_with_cpu_ids_is_refused():
    """ids etc. on the CPU, the unused logcnt on the GPU: the CUDA kernel is chosen (logcnt's
    device), and its argument checks, run before its device guard, raise a ValueError naming
    logcnt (the guard used to come first and throw an internal RuntimeError)."""
    ids = torch.tensor([[0, 1], [2, 1]])
    table = torch.tensor([3, 0, 2])
    load = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="logcnt"):
        lib.map_and_record(ids, table, table.cuda(), load, torch.tensor(True), None,
                           "rank_local")
    assert load.tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------- untested CUDA paths (guards)


@pytest.mark.parametrize("load_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_record_topk_global_atomics_unaligned(id_dtype, load_dtype):
    """record_topk (kCountOnly) with P beyond the shared histogram (P * 4 > 48 KiB - 64), on
    misaligned ids (scalar path) and aligned ids (vector path), with num_valid_tokens; int32
    and int64 loads (their global atomics differ)."""
    gen = np.random.default_rng(1)
    P = 20_000
    base = torch.tensor(gen.integers(-3, P + 3, 200_001), dtype=id_dtype, device="cuda")
    for ids in (base[1:].reshape(-1, 8), base[:200_000].reshape(-1, 8), base[3:]):
        load = torch.tensor(gen.integers(0, 9, P), dtype=load_dtype, device="cuda")
        valid = torch.tensor(ids.shape[0] - 77, device="cuda")
        exp = ref.record_topk(load.cpu().numpy(), ids.cpu().numpy(), True, int(valid))
        lib.record_topk(load, ids, torch.tensor(True, device="cuda"), valid)
        np.testing.assert_array_equal(load.cpu().numpy(), exp)


@pytest.mark.parametrize("load_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("group_list_type", [0, 1])
def test_record_counts_grid_stride(load_dtype, group_list_type):
    """n > 1024 blocks * 256 threads: the grid-stride loop of RecordCountsKernel runs."""
    gen = np.random.default_rng(2)
    n = 1024 * 256 * 3 + 17
    counts = gen.integers(0, 5, n)
    tokens = np.cumsum(counts) if group_list_type == 0 else counts
    load = torch.tensor(gen.integers(0, 9, n + 40), dtype=load_dtype, device="cuda")
    exp = load.cpu().numpy().astype(np.int64)
    exp[33:33 + n] += counts
    lib.record_counts(load, torch.tensor(tokens, device="cuda"), group_list_type, 33)
    np.testing.assert_array_equal(load.cpu().numpy(), exp)


@pytest.mark.parametrize("staged", [True, False])
def test_int64_ids_beyond_2_32_map_to_minus_one(staged):
    """int64 ids such as 2^32 + 1 are out of range (-1, not counted), not expert 1; record and
    num_valid_tokens are read at full width (2^32 has a zero low word, 2^32 + 2 a low word 2)."""
    E = 16 if staged else 4096  # 4096 rows: the spread table is read from global memory
    P = E + 4
    log2phy = torch.full((E, 2), -1, dtype=torch.int64, device="cuda")
    log2phy[:, 0] = torch.arange(E)
    log2phy[:4, 1] = torch.arange(E, P)
    logcnt = torch.ones(E, dtype=torch.int64, device="cuda")
    logcnt[:4] = 2
    ids = torch.tensor([[1, 2**32 + 1], [2**33 + 3, -2**32 + 2], [0, 3], [3, 2**40]] * 100,
                       device="cuda")
    load = torch.zeros(P, dtype=torch.int64, device="cuda")
    rec = torch.tensor(2**32, device="cuda")  # nonzero: count
    valid = torch.tensor(2**32 + 2, device="cuda")  # every token counts
    out = lib.map_and_record(ids, log2phy, logcnt, load, rec, valid, "spread")
    exp_out, exp_load = ref.map_and_record(ids.cpu().numpy(), log2phy.cpu().numpy(),
                                           logcnt.cpu().numpy(), np.zeros(P), True, 2**32 + 2)
    np.testing.assert_array_equal(out.cpu().numpy(), exp_out)
    np.testing.assert_array_equal(load.cpu().numpy(), exp_load)


def test_rank_local_big_table_with_shared_histogram():
    """rank_local, E > kStageRegs * kThreads (the staging loop past the registers) together
    with the shared-memory histogram (only one of the two is reached in tests/test_ops.py)."""
    gen = np.random.default_rng(3)
    E, P = 2000, 3000
    table = torch.tensor(gen.integers(-1, P + 1, E), device="cuda")
    ids = torch.tensor(gen.integers(-2, E + 2, (50_000, 6)), dtype=torch.int32, device="cuda")
    load = torch.tensor(gen.integers(0, 9, P), device="cuda")
    exp_out, exp_load = ref.map_and_record(ids.cpu().numpy(), table.cpu().numpy(), None,
                                           load.cpu().numpy(), True, 40_000, "rank_local")
    out = ops.map_and_record(ids, table, None, load, torch.tensor(True, device="cuda"),
                             torch.tensor(40_000, device="cuda"), "rank_local")
    np.testing.assert_array_equal(out.cpu().numpy(), exp_out)
    np.testing.assert_array_equal(load.cpu().numpy(), exp_load)


@pytest.mark.parametrize("c", [3, 7, 641, 1000, 1500, 5000])
def test_multiply_high_modulo_up_to_its_limit(c):
    """The staged spread path takes t % c by multiply-high, exact for t < 2^32 / c; Launch
    stages up to tokens <= 2^32 / cols - 1. One expert with c replicas 0..c-1, one id per
    token, as many tokens as the staged path allows: out[t] must be t % c and every replica
    must get its exact share. c <= 1024 takes the dense table, above it the packed one.
    (c = 3: 1.43e9 int32 ids, about 12 GB on the GPU.)"""
    tokens = (1 << 32) // c - 1
    ids = torch.zeros(tokens, dtype=torch.int32, device="cuda")
    log2phy = torch.arange(c, dtype=torch.int32, device="cuda").reshape(1, c)
    logcnt = torch.tensor([c], device="cuda")
    load = torch.zeros(c, dtype=torch.int64, device="cuda")
    out = lib.map_and_record(ids, log2phy, logcnt, load, torch.tensor(True, device="cuda"),
                             None, "spread")
    del ids
    step = 1 << 26
    for s in range(0, tokens, step):
        t = torch.arange(s, min(s + step, tokens), dtype=torch.int64, device="cuda")
        assert torch.equal(out[s:s + t.numel()].to(torch.int64), t % c), f"first token {s}"
    exp = torch.full((c,), tokens // c, dtype=torch.int64)
    exp[: tokens % c] += 1
    assert torch.equal(load.cpu(), exp)


def test_2_31_ids_refused_with_nothing_written():
    """The CUDA kernels index with 32 bits: n >= 2^31 - 8192 must raise ValueError naming
    topk_ids and leave load untouched (8.6 GB of int32 ids)."""
    n = (1 << 31) - 8192
    ids = torch.zeros(n, dtype=torch.int32, device="cuda")
    table = torch.zeros(1, dtype=torch.int64, device="cuda")
    load = torch.zeros(2, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="topk_ids"):
        lib.map_and_record(ids, table, table, load, torch.tensor(True, device="cuda"), None,
                           "rank_local")
    with pytest.raises(ValueError, match="topk_ids"):
        lib.record_topk(load, ids, torch.tensor(True, device="cuda"))
    assert load.tolist() == [0, 0]
    # one id less is accepted and counted exactly
    out = lib.map_and_record(ids[1:], table, table, load, torch.tensor(True, device="cuda"),
                             None, "rank_local")
    assert int(load[0]) == n - 1 and int(out.sum()) == 0


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_device_while_current_is_first():
    """All tensors on cuda:1, current device cuda:0: the guard must launch on cuda:1's
    current stream with cuda:1's SM count (no illegal access, exact result)."""
    gen = np.random.default_rng(4)
    dev = torch.device("cuda:1")
    torch.cuda.set_device(0)
    E, P = 256, 288
    log2phy = torch.full((E, 2), -1, dtype=torch.int64)
    log2phy[:, 0] = torch.arange(E)
    log2phy[:32, 1] = torch.arange(E, P)
    logcnt = torch.ones(E, dtype=torch.int64)
    logcnt[:32] = 2
    ids = torch.tensor(gen.integers(-1, E + 1, (40_000, 8)), dtype=torch.int32)
    load = torch.zeros(P, dtype=torch.int64)
    exp_out, exp_load = ref.map_and_record(ids.numpy(), log2phy.numpy(), logcnt.numpy(),
                                           load.numpy(), True, 39_000)
    load_d = load.to(dev)
    out = ops.map_and_record(ids.to(dev), log2phy.to(dev), logcnt.to(dev), load_d,
                             torch.tensor(True, device=dev), torch.tensor(39_000, device=dev))
    ops.record_counts(load_d, torch.tensor([1, 2, 3], device=dev), 1, 5)
    exp_load[5:8] += [1, 2, 3]
    torch.cuda.synchronize(dev)
    np.testing.assert_array_equal(out.cpu().numpy(), exp_out)
    np.testing.assert_array_equal(load_d.cpu().numpy(), exp_load)


# ---------------------------------------------------------------- paths no other test reaches
# (listed by a review of map_record.cu, twelfth session; like the rest of this file, not run
# on a GPU when added)


def test_rank_local_unstaged_table_with_int32_global_atomics():
    """rank_local with a table too big to stage in shared memory (E * 4 + 4 * P > 48 KiB:
    MapRecordKernel<kRankLocal, false>) and P past the shared histogram (every id its own
    global atomic) on an int32 load."""
    gen = np.random.default_rng(8)
    E, P = 13_000, 20_000
    table = torch.tensor(gen.integers(-1, P + 1, E), device="cuda")
    ids = torch.tensor(gen.integers(-2, E + 2, (30_000, 8)), dtype=torch.int32, device="cuda")
    load = torch.tensor(gen.integers(0, 9, P), dtype=torch.int32, device="cuda")
    exp_out, exp_load = ref.map_and_record(ids.cpu().numpy(), table.cpu().numpy(), None,
                                           load.cpu().numpy(), True, 25_000, "rank_local")
    out = ops.map_and_record(ids, table, None, load, torch.tensor(True, device="cuda"),
                             torch.tensor(25_000, device="cuda"), "rank_local")
    np.testing.assert_array_equal(out.cpu().numpy(), exp_out)
    np.testing.assert_array_equal(load.cpu().numpy(), exp_load)


@pytest.mark.parametrize("mode", ["spread", "rank_local"])
def test_no_expert_and_no_slot(mode):
    """E = 0: every id maps to -1 and nothing is counted; P = 0 (an empty load): ids map
    through the table and nothing is counted (tests/test_ops_edges.py runs these on the CPU)."""
    gen = np.random.default_rng(9)
    ids = torch.tensor(gen.integers(-3, 7, (6, 2)), dtype=torch.int32, device="cuda")
    rec = torch.tensor(True, device="cuda")
    for E, P in ((0, 4), (5, 0)):
        if mode == "spread":
            table = torch.arange(E, device="cuda").view(E, 1)
        else:
            table = torch.arange(E, device="cuda")
        cnt = torch.ones(E, dtype=torch.int64, device="cuda")
        load = torch.arange(P, device="cuda")
        exp_out, exp_load = ref.map_and_record(ids.cpu().numpy(), table.cpu().numpy(),
                                               cnt.cpu().numpy(), load.cpu().numpy(), True,
                                               None, mode)
        out = lib.map_and_record(ids, table, cnt, load, rec, None, mode)
        np.testing.assert_array_equal(out.cpu().numpy(), exp_out)
        np.testing.assert_array_equal(load.cpu().numpy(), exp_load)


def test_cuda_graph_replay_record_topk_and_record_counts():
    """record_topk and record_counts captured in one CUDA graph: each replay reads the ids,
    the record flag, num_valid_tokens and the counts as they are then."""
    gen = np.random.default_rng(10)
    P = 300
    ids = torch.tensor(gen.integers(-1, P + 1, (4096, 8)), dtype=torch.int32, device="cuda")
    tokens = torch.tensor(gen.integers(0, 9, 16), device="cuda")
    load = torch.zeros(P, dtype=torch.int64, device="cuda")
    record = torch.tensor(True, device="cuda")
    valid = torch.tensor(4096, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        lib.record_topk(load, ids, record, valid)
        lib.record_counts(load, tokens, 1, 7)
    torch.cuda.current_stream().wait_stream(stream)
    load.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lib.record_topk(load, ids, record, valid)
        lib.record_counts(load, tokens, 1, 7)
    torch.cuda.synchronize()
    assert int(load.sum()) == 0  # capture itself ran nothing
    expected = np.zeros(P, dtype=np.int64)
    for rec, n_valid in [(True, 4096), (False, 4096), (True, 1000), (True, 0)]:
        new_ids = gen.integers(-1, P + 1, (4096, 8))
        new_tokens = gen.integers(0, 9, 16)
        ids.copy_(torch.tensor(new_ids, dtype=torch.int32))
        tokens.copy_(torch.tensor(new_tokens))
        record.fill_(rec)
        valid.fill_(n_valid)
        graph.replay()
        expected = ref.record_topk(expected, new_ids, rec, n_valid)
        expected = ref.record_counts(expected, new_tokens, 1, 7)
        np.testing.assert_array_equal(load.cpu().numpy(), expected)


def test_strided_maps_counts_and_an_offset_load():
    """Non-contiguous log2phy / logcnt / expert_tokens and a load that is a view at an offset
    into a larger tensor: the ops read the views' values and write only the view."""
    gen = np.random.default_rng(11)
    E, P, M = 64, 80, 3
    phy2log = np.concatenate([np.arange(E), gen.integers(0, E, P - E)])[gen.permutation(P)]
    table = np.full((E, M), -1)
    cnt = np.zeros(E, dtype=np.int64)
    for slot, e in enumerate(phy2log):
        if cnt[e] < M:
            table[e, cnt[e]] = slot
        cnt[e] += 1
    cnt = np.minimum(cnt, M)
    wide = torch.full((E, 2 * M), 99, device="cuda")
    wide[:, ::2] = torch.tensor(table, device="cuda")
    log2phy = wide[:, ::2]
    counts = torch.full((2 * E,), 7, device="cuda")
    counts[::2] = torch.tensor(cnt, device="cuda")
    logcnt = counts[::2]
    assert not log2phy.is_contiguous() and not logcnt.is_contiguous()
    base = torch.tensor(gen.integers(0, 9, P + 10), device="cuda")
    load = base[5:5 + P]
    ids = torch.tensor(gen.integers(-1, E + 1, (2000, 8)), dtype=torch.int32, device="cuda")
    before = base.cpu().numpy()
    exp_out, exp_load = ref.map_and_record(ids.cpu().numpy(), table, cnt, before[5:5 + P], True)
    out = lib.map_and_record(ids, log2phy, logcnt, load, torch.tensor(True, device="cuda"), None,
                             "spread")
    tokens_wide = torch.tensor(gen.integers(0, 9, 40), device="cuda")
    tokens = tokens_wide[::2]
    lib.record_counts(load, tokens, 1, 3)
    exp_load = ref.record_counts(exp_load, tokens_wide.cpu().numpy()[::2], 1, 3)
    np.testing.assert_array_equal(out.cpu().numpy(), exp_out)
    after = base.cpu().numpy()
    np.testing.assert_array_equal(after[5:5 + P], exp_load)
    np.testing.assert_array_equal(after[:5], before[:5])  # outside the view: untouched
    np.testing.assert_array_equal(after[5 + P:], before[5 + P:])
