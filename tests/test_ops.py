"""Hot-path ops: native kernels (CPU, and CUDA on a GPU host) and the composite fallback against
the NumPy reference in tests/reference/ops.py, plus argument checks, opcheck and CUDA graphs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ops as ref

from eplb_native import ops

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CPU-only host)")
INDEX = [torch.int32, torch.int64]
POISON = 0x5A5A5A5A


# ------------------------------------------------------------------ helpers


# (map_and_record, record_topk, record_counts) of each path: the op as dispatched (the device's
# native kernel) and the composite fallback called directly (forced, on any device).
_FNS = {
    "native": (ops.map_and_record, ops.record_topk, ops.record_counts),
    "composite": (ops.composite_map_and_record, ops.composite_record_topk,
                  ops.composite_record_counts),
}
PATHS = list(_FNS)


def _fns(path):
    return _FNS[path]


def _poison_allocator(numel, dtype, device):
    """Fills and frees a block the size of the next output, so an element the op forgets to
    write holds POISON (the caching allocator / malloc hands the block back)."""
    t = torch.full((max(numel, 1),), POISON, dtype=dtype, device=device)
    del t


def _placement(E, P, max_rep, dtype, device, gen):
    """A random valid placement: every logical expert gets 1..max_rep slots of P, the rest
    spread by draw; log2phy [E, M] -1 padded, logcnt [E]."""
    extra = P - E
    counts = np.ones(E, dtype=np.int64)
    for _ in range(extra):
        e = gen.integers(E)
        while counts[e] >= max_rep:
            e = gen.integers(E)
        counts[e] += 1
    phy2log = np.repeat(np.arange(E), counts)
    gen.shuffle(phy2log)
    M = int(counts.max())
    log2phy = np.full((E, M), -1, dtype=np.int64)
    fill = np.zeros(E, dtype=np.int64)
    for slot, e in enumerate(phy2log):
        log2phy[e, fill[e]] = slot
        fill[e] += 1
    return (torch.tensor(log2phy, dtype=dtype, device=device),
            torch.tensor(counts, dtype=dtype, device=device))


def _ids(T, k, E, dtype, device, gen, bad=True):
    """Random logical ids, skewed towards a few hot experts, with some out-of-range ids."""
    hot = gen.zipf(1.3, size=(T, k)) - 1
    ids = np.where(gen.random((T, k)) < 0.5, hot % max(E, 1), gen.integers(0, max(E, 1), (T, k)))
    if bad and ids.size:
        n_bad = max(1, ids.size // 50)
        pos = gen.integers(0, ids.size, n_bad)
        ids.reshape(-1)[pos] = gen.choice([-1, -7, E, E + 3], n_bad)
    return torch.tensor(ids, dtype=dtype, device=device)


def _load(P, dtype, device, gen):
    return torch.tensor(gen.integers(1, 1000, P), dtype=dtype, device=device)


def _flag(value, device, dtype=torch.bool):
    return torch.tensor(value, dtype=dtype, device=device)


def _check_map(fn, ids, log2phy, logcnt, load, record, valid, mode):
    ref_load = load.cpu().numpy().copy()
    _poison_allocator(ids.numel(), ids.dtype, ids.device)
    out = fn(ids, log2phy, logcnt, load, record, valid, mode)
    exp_out, exp_load = ref.map_and_record(
        ids.cpu().numpy(), log2phy.cpu().numpy(),
        None if logcnt is None else logcnt.cpu().numpy(), ref_load, bool(record.item()),
        None if valid is None else int(valid.item()), mode)
    assert out.dtype == ids.dtype and out.shape == ids.shape and out.device == ids.device
    np.testing.assert_array_equal(out.cpu().numpy(), exp_out)
    np.testing.assert_array_equal(load.cpu().numpy(), exp_load)
    return out


# ------------------------------------------------------------------ map_and_record


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("id_dtype,load_dtype,table_dtype",
                         list(itertools.product(INDEX, INDEX, INDEX)))
def test_map_and_record_dtypes(device, path, id_dtype, load_dtype, table_dtype):
    gen = np.random.default_rng([INDEX.index(d) for d in (id_dtype, load_dtype, table_dtype)])
    map_fn = _fns(path)[0]
    log2phy, logcnt = _placement(256, 288, 16, table_dtype, device, gen)
    load = _load(288, load_dtype, device, gen)
    for T, k in [(0, 8), (1, 8), (1, 1), (3, 1), (37, 8), (513, 8)]:
        ids = _ids(T, k, 256, id_dtype, device, gen)
        _check_map(map_fn, ids, log2phy, logcnt, load, _flag(True, device), None, "spread")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("id_dtype", INDEX)
def test_map_and_record_large(device, path, id_dtype):
    """T*k = 1M ids, E = 512 with up to 16 replicas, padding and out-of-range ids."""
    gen = np.random.default_rng(7)
    map_fn = _fns(path)[0]
    log2phy, logcnt = _placement(512, 1024, 16, torch.int64, device, gen)
    load = _load(1024, torch.int64, device, gen)
    ids = _ids(131072, 8, 512, id_dtype, device, gen)
    valid = torch.tensor(100000, device=device)
    _check_map(map_fn, ids, log2phy, logcnt, load, _flag(True, device), valid, "spread")
    _check_map(map_fn, ids, log2phy, logcnt, load, _flag(False, device), valid, "spread")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_parallel_rows_at_any_thread_count(threads):
    """The CPU kernel's parallel path (each thread counts into its own histogram row from
    2 * 32768 = 65536 ids on) at 1, 2 and 3 threads, whatever cores the host has (CI may have
    one)."""
    gen = np.random.default_rng(8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        log2phy, logcnt = _placement(512, 1024, 16, torch.int64, "cpu", gen)
        for ids in (_ids(40000, 8, 512, torch.int32, "cpu", gen),
                         _ids(17, 8, 512, torch.int64, "cpu", gen)):
            load = _load(1024, torch.int64, "cpu", gen)
            _check_map(torch.ops.eplb_native.map_and_record, ids, log2phy, logcnt, load,
                       _flag(True, "cpu"), torch.tensor(35000), "spread")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_map_and_record_record_flag_and_valid(device, path):
    gen = np.random.default_rng(11)
    map_fn = _fns(path)[0]
    log2phy, logcnt = _placement(64, 80, 4, torch.int32, device, gen)
    load = _load(80, torch.int32, device, gen)
    ids = _ids(300, 6, 64, torch.int32, device, gen)
    for rec_dtype, rec in itertools.product([torch.bool, torch.uint8, torch.int32, torch.int64],
                                            [0, 1]):
        for valid in [None, 0, 1, 150, 299, 300, 10_000, -4]:
            v = None if valid is None else torch.tensor(valid, device=device,
                                                        dtype=torch.int32 if valid % 2 else
                                                        torch.int64)
            before = load.clone()
            _check_map(map_fn, ids, log2phy, logcnt, load, _flag(rec, device, rec_dtype), v,
                       "spread")
            if not rec:
                assert torch.equal(load, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("id_dtype,table_dtype", list(itertools.product(INDEX, INDEX)))
def test_map_and_record_rank_local(device, path, id_dtype, table_dtype):
    gen = np.random.default_rng(13)
    map_fn = _fns(path)[0]
    P = 384
    table = torch.tensor(gen.integers(0, P, 256), dtype=table_dtype, device=device)
    table[5] = -1  # a logical expert with no reachable replica maps to -1, not counted
    load = _load(P, torch.int64, device, gen)
    for T, k in [(0, 8), (1, 8), (777, 8)]:
        ids = _ids(T, k, 256, id_dtype, device, gen)
        _check_map(map_fn, ids, table, None, load, _flag(True, device),
                   torch.tensor(max(T - 3, 0), device=device), "rank_local")
    if path == "native":
        # the op as engines call it, no wrapper: logcnt None is unused in this mode (it was a
        # dispatcher error, "tensor does not have a device", review 18)
        ids = _ids(777, 8, 256, id_dtype, device, gen)
        a, b, flag = load.clone(), load.clone(), _flag(True, device)
        out = torch.ops.eplb_native.map_and_record(ids, table, None, a, flag, None, "rank_local")
        want = ops.map_and_record(ids, table, None, b, flag, None, mode="rank_local")
        assert torch.equal(out, want) and torch.equal(a, b) and not torch.equal(a, load)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_map_and_record_odd_layouts(device, path):
    """Non-contiguous and misaligned ids, logcnt beyond M or < 1, table slots beyond P."""
    gen = np.random.default_rng(17)
    map_fn = _fns(path)[0]
    log2phy, logcnt = _placement(32, 48, 3, torch.int64, device, gen)
    logcnt[0] = 99  # clamped to M
    logcnt[1] = 0  # clamped to 1
    log2phy[2, 0] = 48  # slot outside load: returned, not counted
    load = _load(48, torch.int64, device, gen)
    base = _ids(1001, 8, 32, torch.int32, device, gen)
    for ids in [base.t(), base.reshape(-1)[1:], base.reshape(-1)[3:4003].reshape(500, 8),
                base[:, 2:7]]:
        _check_map(map_fn, ids, log2phy, logcnt, load, _flag(True, device), None, "spread")


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 70), k=st.integers(1, 9), E=st.integers(1, 40),
       extra=st.integers(0, 40), max_rep=st.integers(1, 5), seed=st.integers(0, 2**31),
       valid=st.one_of(st.none(), st.integers(-2, 80)))
def test_map_and_record_fuzz_shapes(T, k, E, extra, max_rep, seed, valid):
    gen = np.random.default_rng(seed)
    extra = min(extra, E * (max_rep - 1))
    log2phy, logcnt = _placement(E, E + extra, max_rep, torch.int64, "cpu", gen)
    ids = _ids(T, k, E, torch.int32, "cpu", gen)
    v = None if valid is None else torch.tensor(valid)
    for path in PATHS:
        load = _load(E + extra, torch.int64, "cpu", gen)
        _check_map(_fns(path)[0], ids, log2phy, logcnt, load, _flag(True, "cpu"), v, "spread")


# ------------------------------------------------------------------ record_topk / record_counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("id_dtype,load_dtype", list(itertools.product(INDEX, INDEX)))
def test_record_topk(device, path, id_dtype, load_dtype):
    gen = np.random.default_rng(19)
    topk_fn = _fns(path)[1]
    P = 300
    for T, k, rec, valid in [(0, 8, 1, None), (1, 8, 1, None), (517, 8, 1, 400), (517, 8, 0, None),
                             (131072, 8, 1, 120000)]:
        ids = _ids(T, k, P, id_dtype, device, gen)
        load = _load(P, load_dtype, device, gen)
        exp = ref.record_topk(load.cpu().numpy(), ids.cpu().numpy(), rec, valid)
        topk_fn(load, ids, _flag(rec, device),
                None if valid is None else torch.tensor(valid, device=device))
        np.testing.assert_array_equal(load.cpu().numpy(), exp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group_list_type", [0, 1])
@pytest.mark.parametrize("tok_dtype,load_dtype", list(itertools.product(INDEX, INDEX)))
def test_record_counts(device, path, group_list_type, tok_dtype, load_dtype):
    gen = np.random.default_rng(23)
    counts_fn = _fns(path)[2]
    for n, offset in [(0, 0), (1, 287), (9, 0), (9, 279), (288, 0)]:
        counts = gen.integers(1, 500, n)
        tokens = np.cumsum(counts) if group_list_type == 0 else counts
        load = _load(288, load_dtype, device, gen)
        exp = ref.record_counts(load.cpu().numpy(), tokens, group_list_type, offset)
        counts_fn(load, torch.tensor(tokens, dtype=tok_dtype, device=device), group_list_type,
                  offset)
        np.testing.assert_array_equal(load.cpu().numpy(), exp)


@pytest.mark.parametrize("path", PATHS + ["torch.ops"])
def test_record_counts_bad_arguments(path):
    # torch.ops: the raw op's own checks (what compiled graphs call; the wrapper checks first)
    counts_fn = (torch.ops.eplb_native.record_counts if path == "torch.ops" else
                 _fns(path)[2])
    load = torch.ones(16, dtype=torch.int64)
    tokens = torch.ones(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="expert_tokens must be on cpu"):
        counts_fn(load, tokens.to("meta"), 1, 0)
    for offset in [13, 16, -1]:
        with pytest.raises(ValueError, match="offset"):
            counts_fn(load, tokens, 1, offset)
    with pytest.raises(ValueError, match="group_list_type"):
        counts_fn(load, tokens, 2, 0)
    with pytest.raises(TypeError, match="expert_tokens"):
        counts_fn(load, tokens.float(), 1, 0)
    with pytest.raises(ValueError, match="expert_tokens"):
        counts_fn(load, tokens.reshape(2, 2), 1, 0)
    assert torch.equal(load, torch.ones(16, dtype=torch.int64))  # nothing half-applied


# ------------------------------------------------------------------ argument checks


def _good_args(device="cpu"):
    log2phy = torch.tensor([[0, 3], [1, -1], [2, -1]], device=device)
    return dict(topk_ids=torch.tensor([[0, 1], [2, 1]], device=device), log2phy=log2phy,
                logcnt=torch.tensor([2, 1, 1], device=device),
                load=torch.zeros(4, dtype=torch.int64, device=device),
                record=torch.tensor(True, device=device))


BAD = [
    ("topk_ids", lambda a: a["topk_ids"].float(), TypeError),
    ("log2phy", lambda a: a["log2phy"].to(torch.int16), TypeError),
    ("log2phy", lambda a: a["log2phy"].reshape(-1), ValueError),
    ("logcnt", lambda a: a["logcnt"][:2], ValueError),
    ("logcnt", lambda a: a["logcnt"].double(), TypeError),
    ("load", lambda a: a["load"].reshape(2, 2), ValueError),
    ("load", lambda a: torch.zeros(8, dtype=torch.int64)[::2], ValueError),
    ("load", lambda a: a["load"].float(), TypeError),
    ("record", lambda a: torch.tensor([True, False]), ValueError),
    ("record", lambda a: torch.tensor(1.0), TypeError),
    ("load", lambda a: a["load"].to("meta"), ValueError),
    ("record", lambda a: a["record"].to("meta"), ValueError),
]


@pytest.mark.parametrize("name,make,exc", BAD)
@pytest.mark.parametrize("entry", ["wrapper", "torch.ops", "composite"])
def test_map_and_record_bad_arguments(name, make, exc, entry):
    args = _good_args()
    args[name] = make(args)
    fn = {"wrapper": ops.map_and_record, "torch.ops": torch.ops.eplb_native.map_and_record,
          "composite": ops.composite_map_and_record}[entry]
    with pytest.raises(exc, match=name):
        fn(*args.values())
    if name != "load":
        assert not args["load"].any()  # nothing counted before the error


@pytest.mark.parametrize("entry", ["wrapper", "torch.ops"])
def test_bad_mode_and_num_valid(entry):
    fn = {"wrapper": ops.map_and_record, "torch.ops": torch.ops.eplb_native.map_and_record}[entry]
    args = list(_good_args().values())
    with pytest.raises(ValueError, match="mode"):
        fn(*args, None, "hash")
    with pytest.raises(TypeError, match="num_valid_tokens"):
        fn(*args, torch.tensor(1.5), "spread")
    with pytest.raises(ValueError, match="num_valid_tokens"):
        fn(*args, torch.tensor([1, 2]), "spread")
    with pytest.raises(ValueError, match="log2phy"):
        fn(*args, None, "rank_local")  # rank_local wants a 1-D table
    assert not args[3].any()  # load: nothing counted before any of the errors


def test_wrapper_names_arguments_the_schema_rejects():
    """The wrappers check nothing before the op (it checks itself); what its schema rejects
    before any kernel runs (not a tensor, a mode that is not a string) still comes back as a
    TypeError / ValueError naming the argument, with nothing counted."""
    args = _good_args()
    with pytest.raises(TypeError, match="topk_ids"):
        ops.map_and_record([[0, 1]], *list(args.values())[1:])
    with pytest.raises(TypeError, match="record"):
        ops.map_and_record(*list(args.values())[:4], True)
    with pytest.raises(ValueError, match="mode"):
        ops.map_and_record(*args.values(), None, 123)
    with pytest.raises(TypeError, match="topk_ids"):
        ops.record_topk(args["load"], [0, 1], args["record"])
    assert not args["load"].any()


def test_record_topk_bad_arguments():
    load = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="topk_ids"):
        ops.record_topk(load, torch.zeros(3), torch.tensor(True))
    with pytest.raises(ValueError, match="record"):
        ops.record_topk(load, torch.zeros(3, dtype=torch.int32), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="load"):
        torch.ops.eplb_native.record_topk(load.reshape(2, 2), torch.zeros(3, dtype=torch.int32),
                                          torch.tensor(True))
    ids = torch.tensor([[0, 3], [1, 1]], dtype=torch.int32)
    for fn in (ops.record_topk, torch.ops.eplb_native.record_topk):  # the raw op's own checks
        with pytest.raises(ValueError, match="load must be on meta"):
            fn(load, ids.to("meta"), torch.tensor(True, device="meta"), None)
        with pytest.raises(ValueError, match="record must be on cpu"):
            fn(load, ids, torch.tensor(True, device="meta"), None)
        with pytest.raises(TypeError, match="num_valid_tokens"):
            fn(load, ids, torch.tensor(True), torch.tensor(1.5))
        with pytest.raises(ValueError, match="num_valid_tokens"):
            fn(load, ids, torch.tensor(True), torch.tensor([1, 2]))
    assert not load.any()  # nothing counted before any of the errors


# ------------------------------------------------------------------ registration, tracing


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = np.random.default_rng(29)
    log2phy, logcnt = _placement(16, 24, 4, torch.int64, device, gen)
    ids = _ids(40, 4, 16, torch.int32, device, gen)
    load = _load(24, torch.int64, device, gen)
    rec = _flag(True, device)
    valid = torch.tensor(30, device=device)
    table = torch.tensor(gen.integers(0, 24, 16), device=device)
    lib = torch.ops.eplb_native
    torch.library.opcheck(lib.map_and_record, (ids, log2phy, logcnt, load, rec, valid, "spread"))
    torch.library.opcheck(lib.map_and_record, (ids, table, table, load, rec, None, "rank_local"))
    torch.library.opcheck(lib.record_topk, (load, ids, rec, valid))
    torch.library.opcheck(lib.record_counts, (load, torch.tensor([3, 1, 4], device=device), 1, 2))


def test_compiles_without_graph_break():
    gen = np.random.default_rng(31)
    log2phy, logcnt = _placement(8, 12, 3, torch.int64, "cpu", gen)
    load = _load(12, torch.int64, "cpu", gen)  # counts add to what is there
    start = load.clone()

    def step(ids, rec):
        return ops.map_and_record(ids, log2phy, logcnt, load, rec) + 0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    ids = _ids(20, 4, 8, torch.int64, "cpu", gen, bad=False)
    got = compiled(ids, torch.tensor(True))
    exp_out, exp_load = ref.map_and_record(ids.numpy(), log2phy.numpy(), logcnt.numpy(),
                                           start.numpy(), True)
    np.testing.assert_array_equal(got.numpy(), exp_out)
    np.testing.assert_array_equal(load.numpy(), exp_load)


def test_backend_info():
    import eplb_native

    assert eplb_native.backend_info is ops.backend_info
    assert "cpu" in ops.built_backends()
    info = ops.backend_info(["cpu", "cuda", "npu"])
    assert info["cpu"] == {op: "cpu" for op in ("map_and_record", "record_counts", "record_topk")}
    expect_cuda = "cuda" if "cuda" in ops.built_backends() else "composite"
    assert set(info["cuda"].values()) == {expect_cuda}
    assert set(info["npu"].values()) <= {"ascendc", "composite"}
    with pytest.raises(ValueError, match="devices"):
        ops.backend_info(["tpu"])


# ------------------------------------------------------------------ CUDA only


@needs_cuda
def test_cuda_path_is_native():
    assert "cuda" in ops.built_backends(), "this GPU host's build has no CUDA kernels"
    assert set(ops.backend_info(["cuda"])["cuda"].values()) == {"cuda"}


@needs_cuda
@pytest.mark.parametrize("id_dtype", INDEX)
def test_cuda_large_load_uses_global_atomics(id_dtype):
    """P beyond the shared-memory histogram limit (12288 slots)."""
    gen = np.random.default_rng(37)
    P = 20000
    table = torch.tensor(gen.integers(0, P, 4096), device="cuda")
    load = _load(P, torch.int64, "cuda", gen)
    ids = _ids(4096, 8, 4096, id_dtype, "cuda", gen)
    _check_map(ops.map_and_record, ids, table, None, load, _flag(True, "cuda"), None,
               "rank_local")


@needs_cuda
@pytest.mark.parametrize("id_dtype", INDEX)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8])
def test_cuda_spread_many_blocks(id_dtype, k):
    """Inputs large enough that every SM's block loops over several batches of vectors; k both
    a multiple of the vector width (one token per vector) and not (the token stepped per id);
    an odd offset so the ids are not 16-byte aligned (scalar path)."""
    gen = np.random.default_rng(100 + k)
    log2phy, logcnt = _placement(384, 512, 5, torch.int64, "cuda", gen)
    load = _load(512, torch.int64, "cuda", gen)
    ids = _ids(300_000 // k, k, 384, id_dtype, "cuda", gen)
    _check_map(ops.map_and_record, ids, log2phy, logcnt, load, _flag(True, "cuda"),
               _flag(250_000 // k, "cuda", torch.int64), "spread")
    unaligned = _ids(100_001, 1, 384, id_dtype, "cuda", gen).reshape(-1)[1:]
    _check_map(ops.map_and_record, unaligned, log2phy, logcnt, load, _flag(True, "cuda"), None,
               "spread")


@needs_cuda
def test_cuda_spread_table_not_staged():
    """log2phy too big for shared memory: lookups from global memory."""
    gen = np.random.default_rng(41)
    log2phy, logcnt = _placement(4096, 4096 + 2048, 16, torch.int64, "cuda", gen)
    load = _load(4096 + 2048, torch.int64, "cuda", gen)
    ids = _ids(20_000, 8, 4096, torch.int32, "cuda", gen)
    _check_map(ops.map_and_record, ids, log2phy, logcnt, load, _flag(True, "cuda"), None,
               "spread")


@needs_cuda
def test_cuda_spread_division_fallback():
    """Around tokens * replica columns = 2^32: below, the table is staged and t % c taken by
    multiply-high (exact only there); above, it is read from global memory with a division.
    Both equal the reference."""
    gen = np.random.default_rng(43)
    E, cols = 2, 2500
    P = E * cols
    log2phy = torch.arange(P, device="cuda").reshape(E, cols)
    logcnt = torch.tensor([cols, cols - 7], device="cuda")
    load = _load(P, torch.int64, "cuda", gen)
    for tokens in [(1 << 32) // cols - 2, (1 << 32) // cols + 50_000]:
        ids = torch.tensor(gen.integers(0, E, tokens), dtype=torch.int32, device="cuda")
        _check_map(ops.map_and_record, ids, log2phy, logcnt, load, _flag(True, "cuda"), None,
                   "spread")


def _widen(log2phy, width):
    """log2phy padded with -1 to `width` columns, as attach() and vLLM allocate it ([E, P-E+1])."""
    wide = torch.full((log2phy.shape[0], width), -1, dtype=log2phy.dtype, device=log2phy.device)
    wide[:, :log2phy.shape[1]] = log2phy
    return wide


@needs_cuda
@pytest.mark.parametrize("E,P,max_rep", [(256, 288, 8), (384, 512, 16), (1500, 1600, 5),
                                         (2048, 2100, 4), (2049, 2100, 4)])
@pytest.mark.parametrize("id_dtype,table_dtype", [(torch.int32, torch.int64),
                                                  (torch.int64, torch.int32)])
def test_cuda_spread_wide_tables(E, P, max_rep, id_dtype, table_dtype):
    """[E, P-E+1] tables: only the used entries of each row are staged (packed by a block scan
    of the counts); E = 2048 is the largest E staged, 2049 reads global memory."""
    gen = np.random.default_rng(E + P)
    log2phy, logcnt = _placement(E, P, max_rep, table_dtype, "cuda", gen)
    wide = _widen(log2phy, P - E + 1)
    for T in [1, 333, 40_000]:
        load = _load(P, torch.int64, "cuda", gen)
        ids = _ids(T, 8, E, id_dtype, "cuda", gen)
        _check_map(ops.map_and_record, ids, wide, logcnt, load, _flag(True, "cuda"),
                   _flag(max(T - 5, 0), "cuda", torch.int64), "spread")


@needs_cuda
@pytest.mark.parametrize("E,P,max_rep,id_dtype", [(1000, 3424, 8, torch.int64),
                                                  (1000, 3425, 8, torch.int64),
                                                  (2048, 4088, 4, torch.int32),
                                                  (2048, 4089, 4, torch.int32)])
def test_cuda_spread_shared_memory_full(E, P, max_rep, id_dtype):
    """Histogram + row info + packed table filling the kernel's dynamic shared memory exactly
    (4 P + 8 E + P * id bytes = 48 KiB less the kernel's static scan scratch, 64 bytes), and
    one slot more (not staged: read from global memory)."""
    gen = np.random.default_rng(P)
    log2phy, logcnt = _placement(E, P, max_rep, torch.int64, "cuda", gen)
    wide = _widen(log2phy, P - E + 1)
    for T in [1, 5000]:
        load = _load(P, torch.int64, "cuda", gen)
        ids = _ids(T, 8, E, id_dtype, "cuda", gen)
        _check_map(ops.map_and_record, ids, wide, logcnt, load, _flag(True, "cuda"), None,
                   "spread")


@needs_cuda
@pytest.mark.parametrize("E,P", [(64, 72), (256, 288), (384, 512)])
@pytest.mark.parametrize("excess", [-8, -1, 0, 1, 5000])
def test_cuda_spread_logcnt_not_matching_slots(E, P, excess):
    """A logcnt whose clamped sum is not P (by `excess`, or as far as the columns allow): below
    P the packed table is staged as usual; above what it holds every block reads global memory.
    (64, 72) is small enough to be staged whole. Either way the reference holds (the table
    here holds a valid slot in every column, so every column the counts reach is counted)."""
    gen = np.random.default_rng(E + 7 * excess)
    cols = P - E + 1
    log2phy = torch.tensor(gen.integers(0, P, (E, cols)), device="cuda")
    counts = np.ones(E, dtype=np.int64) + np.bincount(gen.integers(0, E, P - E), minlength=E)
    counts = np.minimum(counts, cols)
    step = 1 if excess > 0 else -1
    excess = min(excess, E * cols - int(counts.sum()))
    e = 0
    for _ in range(abs(excess)):  # move the clamped sum by `excess`, keeping 1 <= c <= cols
        while not (1 <= counts[e % E] + step <= cols):
            e += 1
        counts[e % E] += step
        e += 1
    if excess > 1000:  # out-of-range counts clamp to [1, cols]: both ends are read too
        counts[0], counts[1] = cols + 100, -3
    logcnt = torch.tensor(counts, device="cuda")
    load = _load(P, torch.int64, "cuda", gen)
    ids = _ids(20_000, 8, E, torch.int32, "cuda", gen)
    _check_map(ops.map_and_record, ids, log2phy, logcnt, load, _flag(True, "cuda"), None,
               "spread")


@needs_cuda
@pytest.mark.parametrize("id_dtype", INDEX)
def test_cuda_graph_replay_record_on_off(id_dtype):
    gen = np.random.default_rng(41)
    log2phy, logcnt = _placement(256, 288, 8, torch.int64, "cuda", gen)
    load = torch.zeros(288, dtype=torch.int64, device="cuda")
    ids = _ids(4096, 8, 256, id_dtype, "cuda", gen)
    record = torch.tensor(True, device="cuda")
    valid = torch.tensor(4096, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        ops.map_and_record(ids, log2phy, logcnt, load, record, valid)
    torch.cuda.current_stream().wait_stream(stream)
    load.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.map_and_record(ids, log2phy, logcnt, load, record, valid)
    torch.cuda.synchronize()
    assert int(load.sum()) == 0  # capture itself ran nothing

    expected = np.zeros(288, dtype=np.int64)
    for rec, n_valid in [(True, 4096), (False, 4096), (True, 1000), (False, 0), (True, 4096)]:
        new_ids = _ids(4096, 8, 256, id_dtype, "cuda", gen)
        ids.copy_(new_ids)
        record.fill_(rec)
        valid.fill_(n_valid)
        graph.replay()
        exp_out, expected = ref.map_and_record(new_ids.cpu().numpy(), log2phy.cpu().numpy(),
                                               logcnt.cpu().numpy(), expected, rec, n_valid)
        np.testing.assert_array_equal(out.cpu().numpy(), exp_out)
        np.testing.assert_array_equal(load.cpu().numpy(), expected)
