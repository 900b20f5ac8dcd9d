"""eplb_native.traces: model shapes, the synthetic drifting generator, trace files."""

import io
import json
import os
import warnings
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb_native.traces import MODEL_SHAPES, ModelShape, load_trace, save_trace, synth

# tmp_path is reused across examples on purpose: each example overwrites its one file
FIXTURE = HealthCheck.function_scoped_fixture


def test_model_shapes_are_public_facts():
    ds = MODEL_SHAPES["deepseek-v3"]
    assert (ds.num_layers, ds.num_experts, ds.top_k, ds.num_groups) == (58, 256, 8, 8)
    assert (ds.num_redundant, ds.num_ranks, ds.num_nodes, ds.num_slots) == (32, 32, 4, 288)
    qw = MODEL_SHAPES["qwen3-235b"]
    assert (qw.num_layers, qw.num_experts, qw.top_k, qw.num_groups) == (94, 128, 8, 1)
    kimi = MODEL_SHAPES["kimi-k2"]
    assert (kimi.num_layers, kimi.num_experts, kimi.top_k, kimi.num_slots) == (60, 384, 8, 512)
    for shape in MODEL_SHAPES.values():
        assert isinstance(shape, ModelShape) and shape.source
        assert shape.num_slots % shape.num_ranks == 0
        # 3 projections of hidden x moe_intermediate, FP8 or BF16
        assert shape.expert_bytes == int(3 * shape.hidden_size * shape.moe_intermediate_size
                                         * shape.bytes_per_param)
    assert ds.expert_bytes == 3 * 7168 * 2048
    with pytest.raises(AttributeError):
        ds.num_layers = 3  # frozen


def test_synth_shape_counts_and_determinism():
    a = synth(6, 3, 32, tokens_per_window=100, top_k=4, seed=7)
    assert a.shape == (6, 3, 32) and a.dtype == np.int64
    assert (a.sum(axis=2) == 400).all()  # every window and layer: tokens * top_k draws
    assert (a >= 0).all()
    assert np.array_equal(a, synth(6, 3, 32, tokens_per_window=100, top_k=4, seed=7))
    assert not np.array_equal(a, synth(6, 3, 32, tokens_per_window=100, top_k=4, seed=8))


@pytest.mark.parametrize("skew", ["zipf", "lognormal"])
def test_synth_is_skewed_permuted_per_layer_and_drifts(skew):
    a = synth(40, 4, 64, skew=skew, drift=0.05, tokens_per_window=20000, seed=1)
    first = a[0].astype(np.float64)
    # skewed: the hottest expert gets far more than the mean
    assert (first.max(axis=1) > 4 * first.mean(axis=1)).all()
    # a different hot expert per layer (random permutation per layer)
    assert len(set(first.argmax(axis=1).tolist())) > 1
    # gradual drift: consecutive windows are close, distant windows less so
    near = np.mean([np.corrcoef(a[t, 0], a[t + 1, 0])[0, 1] for t in range(39)])
    far = np.corrcoef(a[0, 0], a[39, 0])[0, 1]
    assert near > 0.8 and far < near


def test_synth_drift_zero_is_stationary_and_one_is_fresh():
    static = synth(2, 2, 64, drift=0.0, tokens_per_window=50000, seed=3)
    assert (static[0].argmax(axis=1) == static[1].argmax(axis=1)).all()
    assert np.corrcoef(static[0, 0], static[1, 0])[0, 1] > 0.95
    fresh = synth(30, 1, 64, drift=1.0, tokens_per_window=50000, seed=3)
    corr = np.mean([np.corrcoef(fresh[t, 0], fresh[t + 1, 0])[0, 1] for t in range(29)])
    assert corr < 0.5


@pytest.mark.parametrize("kwargs, name", [
    ({"num_windows": 0}, "num_windows"), ({"num_layers": -1}, "num_layers"),
    ({"num_experts": 2.5}, "num_experts"), ({"skew": "pareto"}, "skew"),
    ({"drift": 1.5}, "drift"), ({"sigma": float("nan")}, "sigma"), ({"zipf_a": 0}, "zipf_a"),
    ({"top_k": 9, "num_experts": 8}, "top_k"), ({"seed": True}, "seed"),
    ({"tokens_per_window": 2**62, "top_k": 2}, "tokens_per_window \\* top_k"),
])
def test_synth_bad_arguments(kwargs, name):
    args = {"num_windows": 2, "num_layers": 2, "num_experts": 16, **kwargs}
    n, layers, experts = args.pop("num_windows"), args.pop("num_layers"), args.pop("num_experts")
    with pytest.raises(ValueError, match=name):
        synth(n, layers, experts, **args)


def test_save_load_roundtrip_npz(tmp_path):
    a = synth(3, 2, 16, seed=0)
    path = tmp_path / "trace.npz"
    save_trace(path, a, shape="deepseek-v3", seed=0)
    loads, meta = load_trace(path)
    assert np.array_equal(loads, a) and loads.dtype == np.int64
    assert meta == {"shape": "deepseek-v3", "seed": 0}
    # exactly the given path, no extension appended, no temp file left over
    other = tmp_path / "other.NPZ"
    save_trace(other, torch.tensor(a[0], dtype=torch.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.NPZ", "trace.npz"]
    # another name would not read back (load_trace goes by the extension): refused
    with pytest.raises(ValueError, match="must end in .npz"):
        save_trace(tmp_path / "trace.bin", a)
    with zipfile.ZipFile(other) as z:
        assert set(z.namelist()) == {"loads.npy", "meta.npy"}


def test_load_other_formats(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, size=(2, 3, 8))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "one.npy", a[0].astype(np.float32))
    torch.save(torch.from_numpy(a), tmp_path / "t.pt")
    torch.save({"loads": torch.from_numpy(a).to(torch.bfloat16), "meta": {"k": 1}},
               tmp_path / "d.pt")
    (tmp_path / "l.json").write_text(json.dumps(a.tolist()))
    (tmp_path / "o.json").write_text(json.dumps({"loads": a[0].tolist(), "meta": {"x": "y"}}))
    for name, want, meta in [("a.npy", a, {}), ("one.npy", a[:1], {}), ("t.pt", a, {}),
                             ("d.pt", a, {"k": 1}), ("l.json", a, {}), ("o.json", a[:1],
                                                                        {"x": "y"})]:
        loads, got_meta = load_trace(tmp_path / name)
        assert loads.shape == want.shape, name
        assert np.allclose(loads, want), name  # bf16 holds integers < 256 exactly
        assert got_meta == meta
    # float8 has no numpy dtype: read through float32 (small integers are exact)
    torch.save(torch.from_numpy(a % 8).to(torch.float8_e4m3fn), tmp_path / "f8.pt")
    assert np.array_equal(load_trace(tmp_path / "f8.pt")[0], a % 8)
    assert load_trace(tmp_path / "one.npy")[0].dtype == np.float64
    assert load_trace(tmp_path / "a.npy")[0].dtype == np.int64


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros(4)), "ndim 1"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((1, 2, 3, 4))), "ndim 4"),
    (lambda p: np.save(p.with_suffix(".npy"), -np.ones((2, 3))), "negative"),
    (lambda p: np.save(p.with_suffix(".npy"), np.full((2, 3), np.nan)), "NaN"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((0, 3))), "empty"),
    (lambda p: np.save(p.with_suffix(".npy"), np.array([["a", "b"]])), "numeric"),
    (lambda p: np.savez(p.with_suffix(".npz"), other=np.ones((2, 3))), "missing key 'loads'"),
    (lambda p: np.savez(p.with_suffix(".npz"), loads=np.ones((2, 3)), meta=np.array("[1]")),
     "'meta' must be a JSON object"),
    (lambda p: p.with_suffix(".npz").write_bytes(b"not a zip"),
     r"not an .npz archive \(it starts with bytes b'not '\)"),
    (lambda p: p.with_suffix(".npz").write_bytes(b"PK\x03\x04 torn"), "not a valid .npz"),
    (lambda p: p.with_suffix(".npy").write_bytes(b"\x93NUMPY garbage"), "not a valid .npy"),
    # a file of another kind under a binary format's name: what it is, not numpy's / torch's
    # advice to load it unsafely (allow_pickle, weights_only=False)
    (lambda p: p.with_suffix(".npz").write_bytes(b"\x89PNG\r\n\x1a\n...."),
     r"not an .npz archive \(the file is a PNG image\)"),
    (lambda p: p.with_suffix(".npz").write_text('{"loads": [[1]]}'),
     r"not an .npz archive \(the file is JSON text\)"),
    (lambda p: p.with_suffix(".npy").write_text(" [[1, 2]]"),
     r"not a .npy array file \(the file is JSON text\)"),
    (lambda p: p.with_suffix(".pt").write_bytes(_npy_bytes(np.ones((2, 3)))),
     r"not a torch file \(the file is a .npy array\)"),
    (lambda p: p.with_suffix(".npy").write_bytes(b""), r"\(the file is empty\)"),
    (lambda p: p.with_suffix(".json").write_text("{"), "not valid JSON"),
    (lambda p: p.with_suffix(".json").write_text('{"meta": {}}'), "missing key 'loads'"),
    (lambda p: p.with_suffix(".json").write_text('[[1, 2], [3]]'), "rectangular"),
    (lambda p: p.with_suffix(".json").write_text('[[1, "2"]]'), "only numbers"),
    (lambda p: p.with_suffix(".json").write_text('"hello"'), "nested list"),
    (lambda p: p.with_suffix(".pt").write_bytes(b"garbage"), "not a torch file"),
    (lambda p: p.with_suffix(".pt").write_bytes(b"\x80garbage"), "not a loadable torch file"),
    (lambda p: torch.save({"x": torch.ones(2, 2)}, p.with_suffix(".pt")), "missing key 'loads'"),
    (lambda p: torch.save([1, 2], p.with_suffix(".pt")), "expected a tensor"),
    (lambda p: torch.save(torch.ones(2, 3, device="meta"), p.with_suffix(".pt")), "plain dense"),
    (lambda p: torch.save(torch.ones(2, 3).to_sparse(), p.with_suffix(".pt")), "plain dense"),
    (lambda p: torch.save(torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(1, 3)]),
                          p.with_suffix(".pt")), "plain dense"),
    (lambda p: torch.save(torch.quantize_per_tensor(torch.ones(2, 3), 0.1, 0, torch.quint8),
                          p.with_suffix(".pt")), "plain dense"),
    (lambda p: p.with_suffix(".csv").write_text("1,2"), "unsupported trace file extension"),
])
def test_load_trace_errors_name_file_and_problem(tmp_path, make, message):
    base = tmp_path / "bad"
    make(base)
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=message) as err:
        load_trace(path)
    assert str(path) in str(err.value)


def test_load_trace_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_trace(tmp_path / "nope.npz")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: no permission to deny")
def test_load_trace_unreadable_file_is_no_corrupt_archive(tmp_path):
    """Permission denied reads as such (it was "not a valid .npz archive ([Errno 13] ...)"), and
    a file in a folder that cannot be entered is not "no such file"."""
    path = tmp_path / "t.npz"
    save_trace(path, np.ones((1, 2, 4), dtype=np.int64))
    path.chmod(0)
    with pytest.raises(PermissionError, match="t.npz: Permission denied"):
        load_trace(path)
    path.chmod(0o644)
    tmp_path.chmod(0o600)
    try:
        with pytest.raises(PermissionError, match="t.npz: Permission denied"):
            load_trace(path)
    finally:
        tmp_path.chmod(0o755)


def test_save_trace_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="negative"):
        save_trace(tmp_path / "x.npz", -np.ones((1, 2, 3)))
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_trace(tmp_path / "x.npz", np.ones((1, 2, 3)), when=object())
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@settings(max_examples=150, deadline=None, suppress_health_check=[FIXTURE])
@given(blob=st.binary(max_size=600), ext=st.sampled_from([".npz", ".npy", ".pt", ".json"]))
def test_fuzz_loader_random_bytes(tmp_path, blob, ext):
    path = tmp_path / f"fuzz{ext}"
    path.write_bytes(blob)
    try:
        loads, meta = load_trace(path)
    except ValueError as e:
        assert str(path) in str(e)
    else:  # the rare valid file must satisfy every promise
        assert loads.ndim == 3 and (loads >= 0).all() and isinstance(meta, dict)


def _json_values():
    scalars = (st.integers(-5, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
               | st.booleans() | st.none() | st.text(max_size=3))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.sampled_from(["loads", "meta", "x",
                                                           "logical_count"]), c, max_size=3),
                        max_leaves=30)


@settings(max_examples=200, deadline=None, suppress_health_check=[FIXTURE])
@given(doc=_json_values())
def test_fuzz_loader_json_structures(tmp_path, doc):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(doc))
    try:
        loads, meta = load_trace(path)
    except ValueError as e:
        assert str(path) in str(e)
    else:
        assert loads.ndim == 3 and 0 not in loads.shape
        assert np.isfinite(loads).all() and (loads >= 0).all()
        assert loads.dtype in (np.int64, np.float64) and isinstance(meta, dict)


@settings(max_examples=100, deadline=None, suppress_health_check=[FIXTURE])
@given(shape=st.lists(st.integers(0, 3), min_size=0, max_size=5),
       dtype=st.sampled_from(["int8", "uint16", "int64", "uint64", "float16", "float64", "bool",
                              "complex64"]),
       fill=st.sampled_from([0, 1, -1, np.nan, np.inf, 2**63]))
def test_fuzz_loader_npz_arrays(tmp_path, shape, dtype, fill):
    path = tmp_path / "fuzz.npz"
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # casting inf / huge values warns; the cast is the test
        try:
            a = np.full(shape, fill).astype(dtype)
        except (OverflowError, ValueError):
            a = np.zeros(shape, dtype=dtype)
    np.savez(path, loads=a)
    try:
        loads, _ = load_trace(path)
    except ValueError as e:
        assert str(path) in str(e)
        assert a.ndim not in (2, 3) or 0 in a.shape or dtype in ("bool", "complex64") or (
            dtype.startswith("float") and not np.isfinite(a).all()) or (a < 0).any() or (
            dtype == "uint64" and (a > np.iinfo(np.int64).max).any())
    else:
        assert a.ndim in (2, 3) and loads.shape[-2:] == a.shape[-2:]
        assert np.array_equal(loads.reshape(a.shape), a.astype(loads.dtype))



def test_failed_save_trace_leaves_no_temporary_file(tmp_path, monkeypatch):
    import eplb_native.traces as traces_mod

    path = tmp_path / "t.npz"
    save_trace(path, np.ones((1, 2, 3), dtype=np.int64))
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(traces_mod.np, "savez_compressed", fail)
    with pytest.raises(OSError, match="disk full"):
        save_trace(path, np.zeros((1, 2, 3), dtype=np.int64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]
    assert path.read_bytes() == before


def test_sum_windows_is_exact_in_int64_and_never_wraps():
    from eplb_native.traces import sum_windows

    rng = np.random.default_rng(7)
    small = rng.integers(0, 1000, (5, 3, 4))
    got = sum_windows(small)
    assert got.dtype == np.int64 and np.array_equal(got, small.sum(axis=0))
    huge = rng.integers(2**61, 2**62, (4, 3, 4), dtype=np.int64)
    got = sum_windows(huge)
    want = huge.astype(np.float64).sum(axis=0)
    assert got.dtype == np.float64 and (got > 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-15)
    floats = rng.random((3, 2, 2)).astype(np.float32)
    assert sum_windows(floats).dtype == np.float64


def test_deeply_nested_json_trace_names_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=f"{path}: JSON nested too deeply"):
        load_trace(path)


def test_json_integer_past_the_digit_limit_names_the_file(tmp_path):
    path = tmp_path / "digits.json"
    path.write_text("[[1" + "0" * 5000 + "]]")  # (Python's int parser refuses > 4300 digits)
    with pytest.raises(ValueError, match=f"{path}: not a readable trace"):
        load_trace(path)


def test_sum_over_windows_overflowing_float64_is_refused():
    from eplb_native.traces import sum_windows

    with pytest.raises(ValueError, match=r"summed over the 2 windows overflow float64 at "
                                         r"\[layer, expert\] \[0, 0\]"):
        sum_windows(np.full((2, 1, 3), 1e308))


def test_save_trace_takes_half_precision_tensors_and_numpy_ints(tmp_path):
    rng = np.random.default_rng(5)
    want = rng.integers(0, 100, (2, 3, 4)).astype(np.float32)  # exact in bf16 and fp16
    for dtype in (torch.bfloat16, torch.float16):
        path = tmp_path / f"{dtype}.npz".replace("torch.", "")
        save_trace(path, torch.from_numpy(want).to(dtype))
        loads, _ = load_trace(path)
        assert loads.dtype == np.float64 and np.array_equal(loads, want)
    got = synth(np.int64(2), np.int32(3), np.int64(4), top_k=np.int64(2),
                tokens_per_window=np.int64(16), seed=np.int64(1))
    assert np.array_equal(got, synth(2, 3, 4, top_k=2, tokens_per_window=16, seed=1))
    with pytest.raises(ValueError, match="num_windows must be an int >= 1, got True"):
        synth(True, 3, 4)


def test_sglang_counts_numpy_cannot_read_are_named(tmp_path):
    """(review 18's fuzz: a count past float64's range was an OverflowError, a meta or nested
    logical_count a RuntimeError from inside torch; the CLI printed tracebacks)"""
    (tmp_path / "huge.json").write_text('{"logical_count": [[1, 1%s]]}' % ("0" * 400))
    with pytest.raises(ValueError, match="holds a number past float64's range"):
        load_trace(tmp_path / "huge.json")
    for kind, counts in (("meta", torch.zeros(2, 3, 4, device="meta")),
                         ("nested", torch.nested.nested_tensor([torch.ones(3, 4)] * 2))):
        path = tmp_path / f"expert_distribution_recorder_{kind}.pt"
        torch.save({"rank": 0, "logical_count": counts}, path)
        with pytest.raises(ValueError, match=f"dense numeric tensor holding its data, .*{kind}"):
            load_trace(path)


def test_sglang_expert_distribution_dump(tmp_path, caplog):
    """SGLang's stat-mode dump (rank, logical_count [steps, hidden layers, E], utilization):
    one window a step; the steps of its ring never written (all zero) and the dense layers'
    all-zero rows are dropped with a warning, the MoE layers' hidden-layer indices kept in the
    meta. Its per-pass dumps are refused by name."""
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(4, 6, 8, dtype=torch.int32)
    counts[:, [1, 3, 4, 5]] = torch.randint(1, 50, (4, 4, 8), generator=g, dtype=torch.int32)
    path = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"rank": 0, "logical_count": counts,
                "average_utilization_rate_over_window": None}, path)
    with caplog.at_level("WARNING", logger="eplb_native"):
        loads, meta = load_trace(path)
    np.testing.assert_array_equal(loads, counts[:, [1, 3, 4, 5]].numpy())
    assert meta["sglang_layers"] == [1, 3, 4, 5]
    assert meta["sglang_num_layers"] == 6 and meta["sglang_dropped_steps"] == 0
    assert "2 of SGLang's 6 layers counted no token in any step (dense layers: 0, 2)" in (
        caplog.text) and "MoE layers 1, 3-5" in caplog.text
    # the ring's steps SGLang never wrote are zero: dropped (they scored as balanced windows)
    caplog.clear()
    ring = torch.zeros(10, 6, 8, dtype=torch.int32)
    ring[[0, 1, 2, 3]] = counts
    torch.save({"rank": 0, "logical_count": ring}, path)
    with caplog.at_level("WARNING", logger="eplb_native"):
        loads, meta = load_trace(path)
    np.testing.assert_array_equal(loads, counts[:, [1, 3, 4, 5]].numpy())
    assert "6 of the dump's 10 steps counted nothing" in caplog.text
    assert meta["sglang_dropped_steps"] == 6 and meta["sglang_num_layers"] == 6
    # every layer counted: nothing dropped, nothing said
    caplog.clear()
    torch.save({"rank": 0, "logical_count": counts[:, [1, 3]]}, path)
    with caplog.at_level("WARNING", logger="eplb_native"):
        loads, meta = load_trace(path)
    assert loads.shape == (4, 2, 8) and "sglang_layers" not in meta and not caplog.text
    for obj, message in [({"rank": 0, "logical_count": torch.ones(3, 8)}, r"\[steps, layers"),
                         ({"rank": 0, "logical_count": torch.ones(2, 3, 8) < 2}, "numeric"),
                         ({"records": [], "last_physical_to_logical_map": torch.zeros(2, 3)},
                          "per-pass / per-token recorder dump")]:
        torch.save(obj, path)
        with pytest.raises(ValueError, match=message):
            load_trace(path)


def test_a_trace_read_from_a_pipe(tmp_path):
    """A named pipe is read once, by the reader: the format check looks ahead only in regular
    files (it took the pipe's first bytes, and the reader then waited for ever)."""
    import threading

    src = tmp_path / "t.npz"
    save_trace(src, np.arange(24, dtype=np.int64).reshape(2, 3, 4))
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(src.read_bytes()), daemon=True)
    writer.start()
    got = []
    reader = threading.Thread(target=lambda: got.append(load_trace(fifo)[0]), daemon=True)
    reader.start()
    reader.join(20)
    assert got and np.array_equal(got[0], np.arange(24).reshape(2, 3, 4))
