"""Every op on an Ascend NPU (torch_npu, dispatch key PrivateUse1) against the same op on the CPU
(csrc/ops/cpu/map_record.cpp, itself checked against tests/reference/ops.py in tests/test_ops.py):
random data, int32/int64 ids and loads, both map modes, tails, sizes that split over many AI
cores, histograms larger than one UB window, record off, num_valid_tokens.

Without torch_npu or an NPU every test here skips and says which is missing. On an NPU the ops run
the Ascend C kernels when the build has them (``"ascendc" in built_backends()``), else the
composite fallback; ``test_backend_reported`` says which.

EPLB_NPU_TEST_DEVICE=cpu runs the same bodies with the CPU as the "device" (CPU against CPU):
a self-check of this file on hosts without an NPU, not a test of any NPU code.
"""

from __future__ import annotations

import importlib.util
import os
import zlib

import numpy as np
import pytest
import torch

from eplb_native import ops


def _device() -> tuple[str | None, str]:
    forced = os.environ.get("EPLB_NPU_TEST_DEVICE")
    if forced:
        return forced, ""
    if importlib.util.find_spec("torch_npu") is None:
        return None, "torch_npu is not installed (no Ascend NPU stack on this host)"
    import torch_npu  # noqa: F401  (registers the npu device)

    if not torch.npu.is_available() or torch.npu.device_count() == 0:
        return None, "torch_npu is installed but no NPU device is visible"
    return "npu", ""


DEVICE, SKIP_REASON = _device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)
INDEX = [torch.int32, torch.int64]

# (tokens, k): one id, tails that are not a multiple of 8 ids, and sizes above the kernels'
# 1024 ids per core so they split over many AI cores.
SHAPES = [(1, 1), (3, 2), (37, 8), (129, 7), (1000, 8), (4096, 8), (20000, 3)]


def _gen(*parts):
    """A generator seeded from the test's parameters (stable across runs and processes)."""
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def _on(t):
    return t.to(DEVICE)


def _sync():
    if DEVICE == "npu":
        torch.npu.synchronize()


def _ids(gen, tokens, k, E, dtype):
    """Random logical ids, some outside [0, E) on both sides."""
    return torch.from_numpy(gen.integers(-2, E + 2, size=(tokens, k))).to(dtype)


def _spread_table(gen, E, M, P):
    """log2phy [E, M] with -1 pads and out-of-range slots; logcnt [E] partly outside [1, M]
    (every backend clamps it)."""
    log2phy = torch.from_numpy(gen.integers(-1, P + 2, size=(E, M)))
    logcnt = torch.from_numpy(gen.integers(0, M + 2, size=E))
    return log2phy, logcnt


def _load(gen, P, dtype):
    return torch.from_numpy(gen.integers(0, 1000, size=P)).to(dtype)


def _flags(record, num_valid):
    rec = torch.tensor(record)
    nv = None if num_valid is None else torch.tensor(num_valid, dtype=torch.int64)
    return rec, nv


@pytest.mark.parametrize("id_dtype", INDEX)
@pytest.mark.parametrize("load_dtype", INDEX)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["spread", "rank_local"])
def test_map_and_record_matches_cpu(id_dtype, load_dtype, shape, mode):
    tokens, k = shape
    gen = _gen(id_dtype, load_dtype, shape, mode)
    E, M, P = 64, 4, 80
    ids = _ids(gen, tokens, k, E, id_dtype)
    if mode == "spread":
        log2phy, logcnt = _spread_table(gen, E, M, P)
    else:
        log2phy = torch.from_numpy(gen.integers(-1, P + 2, size=E))
        logcnt = torch.ones(E, dtype=torch.int64)
    for record, num_valid in [(True, None), (True, tokens // 2), (False, None), (True, 0)]:
        load_cpu = _load(gen, P, load_dtype)
        load_dev = _on(load_cpu.clone())
        rec, nv = _flags(record, num_valid)
        out_cpu = ops.map_and_record(ids, log2phy, logcnt, load_cpu, rec, nv, mode)
        out_dev = ops.map_and_record(_on(ids), _on(log2phy), _on(logcnt), load_dev, _on(rec),
                                     None if nv is None else _on(nv), mode)
        _sync()
        assert out_dev.dtype == ids.dtype and out_dev.shape == ids.shape
        torch.testing.assert_close(out_dev.cpu(), out_cpu, rtol=0, atol=0)
        torch.testing.assert_close(load_dev.cpu(), load_cpu, rtol=0, atol=0)


def test_int64_flag_and_counts_beyond_int32_match_cpu():
    """An int64 record flag of 2**32 is "on" and int64 replica counts of 2**32 / -2**32 + 3 clamp
    to M / 1, as on the CPU (the launcher used to cast them to int32 first, keeping the low 32
    bits: "off", 0 and 3)."""
    gen = _gen("int64-flags")
    E, M, P = 8, 4, 12
    ids = _ids(gen, 50, 4, E, torch.int64)
    log2phy = torch.from_numpy(gen.integers(0, P, size=(E, M)))
    logcnt = torch.tensor([2**32, -2**32 + 3, 2**33 + 1, 1, 2, 3, 4, 2**40])
    rec = torch.tensor(2**32, dtype=torch.int64)
    load_cpu = _load(gen, P, torch.int64)
    start = load_cpu.clone()
    load_dev = _on(load_cpu.clone())
    out_cpu = ops.map_and_record(ids, log2phy, logcnt, load_cpu, rec)
    out_dev = ops.map_and_record(_on(ids), _on(log2phy), _on(logcnt), load_dev, _on(rec))
    ops.record_topk(load_cpu, ids, rec)
    ops.record_topk(load_dev, _on(ids), _on(rec))
    _sync()
    torch.testing.assert_close(out_dev.cpu(), out_cpu, rtol=0, atol=0)
    torch.testing.assert_close(load_dev.cpu(), load_cpu, rtol=0, atol=0)
    # both calls recorded: the mapped ids in [0, P), then the raw ids in [0, P)
    counted = int(((out_cpu >= 0) & (out_cpu < P)).sum()) + int(((ids >= 0) & (ids < P)).sum())
    assert int((load_cpu - start).sum()) == counted > 0


@pytest.mark.parametrize("id_dtype", INDEX)
@pytest.mark.parametrize("load_dtype", INDEX)
@pytest.mark.parametrize("shape", SHAPES)
def test_record_topk_matches_cpu(id_dtype, load_dtype, shape):
    tokens, k = shape
    gen = _gen(id_dtype, load_dtype, shape, "topk")
    P = 97
    ids = _ids(gen, tokens, k, P, id_dtype)
    for record, num_valid in [(True, None), (True, tokens - 1), (False, None)]:
        load_cpu = _load(gen, P, load_dtype)
        load_dev = _on(load_cpu.clone())
        rec, nv = _flags(record, num_valid)
        ops.record_topk(load_cpu, ids, rec, nv)
        ops.record_topk(load_dev, _on(ids), _on(rec), None if nv is None else _on(nv))
        _sync()
        torch.testing.assert_close(load_dev.cpu(), load_cpu, rtol=0, atol=0)


@pytest.mark.parametrize("load_dtype", INDEX)
def test_large_histogram_spans_several_windows(load_dtype):
    """P above the kernels' 16384-bin UB histogram: counted in several windows per core."""
    gen = _gen("windows", load_dtype)
    P, tokens, k = 40000, 3000, 8
    ids = _ids(gen, tokens, k, P, torch.int32)
    load_cpu = _load(gen, P, load_dtype)
    load_dev = _on(load_cpu.clone())
    rec, _ = _flags(True, None)
    ops.record_topk(load_cpu, ids, rec)
    ops.record_topk(load_dev, _on(ids), _on(rec))
    log2phy = torch.from_numpy(gen.integers(-1, P, size=(P, 2)))
    logcnt = torch.from_numpy(gen.integers(1, 3, size=P))
    out_cpu = ops.map_and_record(ids, log2phy, logcnt, load_cpu, rec)
    out_dev = ops.map_and_record(_on(ids), _on(log2phy), _on(logcnt), load_dev, _on(rec))
    _sync()
    torch.testing.assert_close(out_dev.cpu(), out_cpu, rtol=0, atol=0)
    torch.testing.assert_close(load_dev.cpu(), load_cpu, rtol=0, atol=0)


@pytest.mark.parametrize("load_dtype", INDEX)
@pytest.mark.parametrize("tokens_dtype", INDEX)
@pytest.mark.parametrize("group_list_type", [0, 1])
@pytest.mark.parametrize("n", [1, 7, 8, 33, 256, 3000])
def test_record_counts_matches_cpu(load_dtype, tokens_dtype, group_list_type, n):
    gen = _gen(load_dtype, tokens_dtype, group_list_type, n)
    per_expert = gen.integers(0, 500, size=n)
    counts = np.cumsum(per_expert) if group_list_type == 0 else per_expert
    expert_tokens = torch.from_numpy(counts).to(tokens_dtype)
    # offsets that leave load + offset off a 32-byte boundary, and spare bins on both sides
    for offset, spare in [(0, 0), (3, 5), (1, 0)]:
        load_cpu = _load(gen, n + offset + spare, load_dtype)
        load_dev = _on(load_cpu.clone())
        ops.record_counts(load_cpu, expert_tokens, group_list_type, offset)
        ops.record_counts(load_dev, _on(expert_tokens), group_list_type, offset)
        _sync()
        torch.testing.assert_close(load_dev.cpu(), load_cpu, rtol=0, atol=0)


def test_empty_inputs_leave_load_alone():
    load_cpu = torch.arange(16, dtype=torch.int32)
    load_dev = _on(load_cpu.clone())
    rec, _ = _flags(True, None)
    ids = torch.empty((0, 8), dtype=torch.int64)
    out = ops.map_and_record(_on(ids), _on(torch.zeros((4, 2), dtype=torch.int64)),
                             _on(torch.ones(4, dtype=torch.int64)), load_dev, _on(rec))
    ops.record_topk(load_dev, _on(ids), _on(rec))
    ops.record_counts(load_dev, _on(torch.empty(0, dtype=torch.int64)), 1, 16)
    _sync()
    assert out.shape == (0, 8)
    torch.testing.assert_close(load_dev.cpu(), load_cpu, rtol=0, atol=0)


def test_bad_arguments_raise_like_cpu():
    load = _on(torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="group_list_type"):
        ops.record_counts(load, _on(torch.ones(4, dtype=torch.int64)), 2, 0)
    with pytest.raises(ValueError, match="offset"):
        ops.record_counts(load, _on(torch.ones(4, dtype=torch.int64)), 1, 6)
    with pytest.raises(TypeError, match="topk_ids"):
        ops.record_topk(load, _on(torch.zeros(4, dtype=torch.float32)), _on(torch.tensor(True)))
    with pytest.raises(ValueError, match="mode"):
        ops.map_and_record(_on(torch.zeros((2, 2), dtype=torch.int64)),
                           _on(torch.zeros(4, dtype=torch.int64)),
                           _on(torch.ones(4, dtype=torch.int64)), load,
                           _on(torch.tensor(True)), None, "nearest")


def test_backend_reported():
    """backend_info() names the path NPU tensors take: the Ascend C kernels exactly when this
    build has them."""
    if DEVICE != "npu":
        pytest.skip("reports the NPU path; needs a real NPU")
    info = ops.backend_info(["npu"])["npu"]
    expected = "ascendc" if "ascendc" in ops.built_backends() else "composite"
    assert info == {"map_and_record": expected, "record_counts": expected,
                    "record_topk": expected}
