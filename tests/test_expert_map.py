"""vllm-ascend expert-map JSON: round trip, the format itself, and malformed files."""

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_native import expert_map


def test_round_trip_keeps_every_slot(tmp_path):
    rng = np.random.default_rng(3)
    phy2log = np.stack([rng.permutation(np.r_[np.arange(12), rng.integers(0, 12, 4)])
                        for _ in range(3)])
    path = tmp_path / "map.json"
    expert_map.save(path, phy2log, num_ranks=4)
    got, ranks = expert_map.load(path)
    assert ranks == 4
    np.testing.assert_array_equal(got, phy2log)


def test_format_is_vllm_ascend():
    doc = expert_map.to_json_dict(np.array([[3, 1, 0, 2]]), num_ranks=2)
    assert doc == {
        "moe_layer_count": 1,
        "layer_list": [{"layer_id": 0, "device_count": 2, "device_list": [
            {"device_id": 0, "device_expert": [3, 1]},
            {"device_id": 1, "device_expert": [0, 2]}]}],
    }
    # json-serialisable as is (plain ints)
    json.dumps(doc)


def test_layers_and_devices_in_an_order_other_than_their_ids_are_refused():
    """vllm-ascend's reader takes layers and devices by list position and ignores the ids: a
    file whose order differs from its ids means another placement there, so it is refused
    (it used to be read sorted by id)."""
    for flip in ("layers", "devices"):
        doc = expert_map.to_json_dict(np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), num_ranks=2)
        if flip == "layers":
            doc["layer_list"].reverse()
            match = r"layer_list\[0\]: layer_id must run 0..1, got 1 \(in list order: this is position 0\)"
        else:
            doc["layer_list"][0]["device_list"].reverse()
            match = r"layer_list\[0\]: device_id must run 0..1, got 1 \(in list order: this is position 0\)"
        with pytest.raises(ValueError, match=match):
            expert_map.from_json_dict(doc)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("layer_list"), "missing key 'layer_list'"),
    (lambda d: d.update(moe_layer_count=3), "moe_layer_count"),
    (lambda d: d["layer_list"][0].pop("device_list"), "device_list"),
    (lambda d: d["layer_list"][0]["device_list"][1].update(device_expert=[0]), "same number"),
    (lambda d: d["layer_list"][0]["device_list"][1].update(device_expert=[0, -1]), ">= 0"),
    (lambda d: d["layer_list"][0]["device_list"][1].update(device_expert=[0, "x"]), "expert ids"),
    (lambda d: d["layer_list"][0].update(device_count=5), "device_count"),
    (lambda d: d["layer_list"][1].update(layer_id=7), "layer_id"),
])
def test_malformed_maps_name_the_problem(mutate, message):
    doc = expert_map.to_json_dict(np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), num_ranks=2)
    mutate(doc)
    with pytest.raises(ValueError, match=message):
        expert_map.from_json_dict(doc)


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        expert_map.load(path)


def test_bad_num_ranks():
    with pytest.raises(ValueError, match="num_ranks"):
        expert_map.to_json_dict(np.zeros((1, 6), dtype=np.int64), num_ranks=4)


@pytest.mark.parametrize("phy2log, exc, message", [
    (np.array([[0.5, 1.7]]), TypeError, "integer expert ids"),  # was truncated to [0, 1]
    (np.array([[True, False]]), TypeError, "integer expert ids"),
    (np.array([[-1, 3]]), ValueError, ">= 0"),
    (np.array([[2**62, 0]], dtype=np.int64), ValueError, "2\\*\\*62"),
    (np.zeros((1, 0), dtype=np.int64), ValueError, "shape"),
])
def test_save_refuses_what_load_refuses(tmp_path, phy2log, exc, message):
    with pytest.raises(exc, match=message):
        expert_map.save(tmp_path / "m.json", phy2log, num_ranks=1)
    assert list(tmp_path.iterdir()) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 20) | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["moe_layer_count", "layer_list", "layer_id", "device_count",
                         "device_list", "device_id", "device_expert"]), inner, max_size=4),
    max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_parser_raises_only_value_error(doc):
    try:
        phy2log = expert_map.from_json_dict(doc)
    except ValueError:
        return
    assert phy2log.ndim == 2 and phy2log.dtype == np.int64 and (phy2log >= 0).all()


def _doc():
    return expert_map.to_json_dict(np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), num_ranks=2)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["layer_list"][0]["device_list"][0].update(device_expert=[0, 2**62]), "2\\*\\*62"),
    (lambda d: d["layer_list"][0]["device_list"][0].update(device_expert=[0, 10**30]),
     "2\\*\\*62"),
    (lambda d: d["layer_list"][0]["device_list"][0].update(device_expert=[0, 1.0]), "expert ids"),
    (lambda d: d["layer_list"][1].update(layer_id="1"), "layer_id must run 0..1, got '1'"),
    (lambda d: d["layer_list"][0]["device_list"][1].update(device_id="1"),
     "device_id must run 0..1, got '1'"),
    (lambda d: d["layer_list"][1].update(
        device_count=4, device_list=[{"device_id": r, "device_expert": [r]} for r in range(4)]),
     "same devices; layer 0 has 2, layer 1 has 4"),
    (lambda d: d["layer_list"][0].update(device_count="2"), "device_count"),
])
def test_malformed_ids_and_device_counts_name_the_problem(mutate, message):
    doc = _doc()
    mutate(doc)
    with pytest.raises(ValueError, match=message):
        expert_map.from_json_dict(doc, source="m.json")
    with pytest.raises(ValueError, match="^m.json"):
        expert_map.from_json_dict(doc, source="m.json")


def test_bad_files_name_the_file(tmp_path):
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"moe_layer_count": 1, "x": "\xe9"}')
    with pytest.raises(ValueError, match=f"{latin}: not UTF-8"):
        expert_map.load(latin)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=f"{deep}: JSON nested too deeply"):
        expert_map.load(deep)
    huge = tmp_path / "huge.json"
    doc = _doc()
    doc["layer_list"][0]["device_list"][0]["device_expert"] = [0, 10**30]
    huge.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"{huge}: layer_list"):
        expert_map.load(huge)
    digits = tmp_path / "digits.json"
    digits.write_text("[[1" + "0" * 5000 + "]]")  # (Python's int parser refuses > 4300 digits)
    with pytest.raises(ValueError, match=f"{digits}: not a readable expert map"):
        expert_map.load(digits)


def test_array_ids_past_2_62_are_refused_as_save_does():
    a = np.array([[0, 1, 2, 2**62 + 5]])
    with pytest.raises(ValueError, match="expert ids must be < 2"):
        expert_map.load(a, num_ranks=2)
    with pytest.raises(ValueError):
        expert_map.save("unused.json", a, 2)


@pytest.mark.parametrize("phy2log,match", [
    (np.array([[0, 1, 2]]), r"slots divisible by num_ranks \(2\), got \[1, 3\]"),
    (np.array([[0.0, 1]]), "integer expert ids, got dtype float64"),
    (np.zeros((1, 2, 2), dtype=np.int64), r"shape \[layers, slots\]"),
])
def test_repeated_on_a_rank_names_bad_input(phy2log, match):
    with pytest.raises(ValueError, match=match):
        expert_map.repeated_on_a_rank(phy2log, 2)


def test_numpy_int_num_ranks_accepted():
    doc = expert_map.to_json_dict(np.array([[3, 1, 0, 2]]), num_ranks=np.int64(2))
    assert doc["layer_list"][0]["device_count"] == 2
    json.dumps(doc)


def test_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "map.json"
    expert_map.save(path, np.array([[0, 1]]), 1)
    before = path.read_text()

    real = expert_map.atomic_write

    @contextlib.contextmanager
    def fail_after_a_partial_write(*args, **kwargs):
        with real(*args, **kwargs) as f:
            f.write('{"moe_layer_count": 1,')
            raise OSError("disk full")
        yield  # (never reached)

    monkeypatch.setattr(expert_map, "atomic_write", fail_after_a_partial_write)
    with pytest.raises(OSError, match="disk full"):
        expert_map.save(path, np.array([[1, 0]]), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.json"]
    assert path.read_text() == before


def test_load_takes_a_path_a_dict_or_an_array_and_checks_them(tmp_path):
    phy2log = np.array([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 2, 2]])
    path = tmp_path / "m.json"
    expert_map.save(path, phy2log, num_ranks=2)
    doc = expert_map.to_json_dict(phy2log, num_ranks=2)
    for source in (path, str(path), doc, phy2log):
        got, ranks = expert_map.load(source, num_ranks=2, num_logical=4, num_layers=2,
                                     num_slots=6, name="expert_map")
        assert ranks == 2 and got.dtype == np.int64
        np.testing.assert_array_equal(got, phy2log)
    for source in (path, doc):
        with pytest.raises(ValueError, match="expert_map.* is for 2 ranks, expected 3"):
            expert_map.load(source, num_ranks=3, name="expert_map")
    with pytest.raises(ValueError, match=r"expert_map: slots \(6\) must be divisible by the 4"):
        expert_map.load(phy2log, num_ranks=4, name="expert_map")
    for source in (path, doc, phy2log):
        with pytest.raises(ValueError, match="expert_map.* has 2 layers, expected 3"):
            expert_map.load(source, num_ranks=2, num_layers=3, name="expert_map")
        with pytest.raises(ValueError, match=r"expert_map.*: expert ids must lie in \[0, 3\)"):
            expert_map.load(source, num_ranks=2, num_logical=3, name="expert_map")
        with pytest.raises(ValueError, match=r"expert_map.*: layer 0 holds no copy of logical "
                                             r"experts \[4\]"):
            expert_map.load(source, num_ranks=2, num_logical=5, name="expert_map")
        with pytest.raises(ValueError, match="expert_map.* has 6 slots per layer, expected 8"):
            expert_map.load(source, num_ranks=2, num_slots=8, name="expert_map")
    with pytest.raises(ValueError, match=f"expert_map {path}: .*layer_id"):
        doc["layer_list"][1]["layer_id"] = 5
        path.write_text(json.dumps(doc))
        expert_map.load(path, name="expert_map")
    with pytest.raises(ValueError, match="needs num_ranks"):
        expert_map.load(phy2log)
    with pytest.raises(ValueError, match="integer expert ids"):
        expert_map.load(phy2log.astype(float), num_ranks=2)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda d: json.dumps(d).encode()))
def test_fuzz_load_file_raises_only_value_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "m.json"
    path.write_bytes(blob)
    try:
        phy2log, ranks = expert_map.load(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert phy2log.ndim == 2 and phy2log.shape[1] % ranks == 0 and (phy2log >= 0).all()


def test_repeated_experts_on_a_rank_are_listed_and_saved_with_a_warning(tmp_path, caplog):
    """vllm-ascend's reader maps one slot per expert and rank: a map where a rank holds an
    expert twice is written as it is (our loader serves it) and the save says so."""
    import logging

    phy2log = np.array([[0, 0, 1, 2, 3, 1], [0, 1, 2, 3, 0, 1]])  # layer 0: rank 0 holds 0 twice
    assert expert_map.repeated_on_a_rank(phy2log, 2) == [(0, 0, 0)]
    assert expert_map.repeated_on_a_rank(phy2log, 3) == [(0, 0, 0)]
    assert expert_map.repeated_on_a_rank(phy2log[1], 2) == []
    with caplog.at_level(logging.WARNING, logger="eplb_native"):
        expert_map.save(tmp_path / "m.json", phy2log, 2)
    assert "1 (layer, rank) pairs hold an expert twice (first: layer 0, rank 0, expert 0)" in (
        caplog.text)
    assert "distinct_ranks=True" in caplog.text  # the way out is named
    got, ranks = expert_map.load(tmp_path / "m.json")
    assert ranks == 2 and np.array_equal(got, phy2log)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eplb_native"):
        expert_map.save(tmp_path / "n.json", phy2log[1:], 2)
    assert not caplog.records


def test_layers_past_the_models_are_checked_then_dropped_with_a_warning(tmp_path, caplog):
    """vllm-ascend (from v0.23.0rc1) records a draft model's MTP layer after the model's layers,
    and places that layer from its row: such a file loads here too (the layers we balance are
    the model's), its extra rows checked on their own (they may have other slot or device
    counts) and dropped, with a warning."""
    phy2log = np.array([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 2, 2]])
    doc = expert_map.to_json_dict(np.r_[phy2log, [[1, 0, 3, 2, 1, 1]]], num_ranks=2)
    # the MTP row with other slots, as vllm-ascend wrote before v0.19.1rc1
    doc["layer_list"][2]["device_list"] = [{"device_id": r, "device_expert": [r, r + 2]}
                                           for r in range(2)]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(doc))
    for source in (path, doc):
        caplog.clear()
        with caplog.at_level("WARNING", logger="eplb_native"):
            got, ranks = expert_map.load(source, num_ranks=2, num_logical=4, num_layers=2,
                                         num_slots=6, name="expert_map")
        np.testing.assert_array_equal(got, phy2log)
        assert ranks == 2
        assert "1 layers past the model's 2 ignored (layer_list[2:]" in caplog.text
        # no limit: the extra row is a layer like the others, and its slots differ
        with pytest.raises(ValueError, match="same number of slots"):
            expert_map.load(source)
    # an extra row on other devices (its own checks still hold)
    other = json.loads(json.dumps(doc))
    other["layer_list"][2].update(device_count=1, device_list=[
        {"device_id": 0, "device_expert": [3, 2, 1]}])
    np.testing.assert_array_equal(expert_map.load(other, num_layers=2)[0], phy2log)
    # extra rows are still checked: a bad id, device or layer id there is refused
    for mutate, message in [
            (lambda d: d["layer_list"][2]["device_list"][0].update(device_expert=[0, -1]), ">= 0"),
            (lambda d: d["layer_list"][2].update(layer_id=5), "layer_id must run 0..2"),
            (lambda d: d["layer_list"][2]["device_list"][1].update(device_expert=[0]),
             "same number of experts")]:
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        with pytest.raises(ValueError, match=message):
            expert_map.load(bad, num_layers=2)
    # more extra layers than the model's own: a map of another model, refused (it was cut down
    # to its first layers and served, review15_cli)
    with pytest.raises(ValueError, match="has 3 layers, the model 1: 2 layers past"):
        expert_map.load(doc, num_layers=1)
    # an array with more layers than the model's: refused (fewer: test_load_takes_...)
    with pytest.raises(ValueError, match="has 2 layers, expected 1"):
        expert_map.load(phy2log, num_ranks=2, num_layers=1)


def _containers(x, out):
    """Every (container, key) pair inside a JSON value, depth first."""
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        out.append((x, k))
        _containers(v, out)
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_layers_past_the_limit_raise_only_value_error(data):
    """A valid map of model + extra layers with one value anywhere replaced (in the model's rows
    or the extra ones): load(..., num_layers=) returns the model's rows or a ValueError."""
    num_layers = data.draw(st.integers(1, 3))
    extra = data.draw(st.integers(0, 2))
    rows = data.draw(st.lists(st.permutations(range(4)), min_size=num_layers + extra,
                              max_size=num_layers + extra))
    doc = expert_map.to_json_dict(np.array(rows), num_ranks=2)
    places = _containers(doc, [])
    where, key = places[data.draw(st.integers(0, len(places) - 1))]
    where[key] = data.draw(json_values)
    try:
        phy2log, ranks = expert_map.load(doc, num_layers=num_layers)
    except ValueError:
        return
    assert phy2log.shape[0] == num_layers and (phy2log >= 0).all() and ranks >= 1


# --------------------------------------------------------------------------- SGLang's file


def test_sglang_placement_file_round_trip(tmp_path):
    """SGLang's --init-expert-location file: one row per hidden layer, the MoE layers' rows
    the placement, the dense layers' SGLang's trivial placement (slot s holds s mod E), one
    key only (SGLang passes its keys as arguments); read back at the same rows with the ranks
    given (the file has no rank count)."""
    rng = np.random.default_rng(4)
    phy2log = np.stack([rng.permutation(np.r_[np.arange(8), rng.integers(0, 8, 4)])
                        for _ in range(3)])
    path = tmp_path / "init.json"
    expert_map.save_sglang(path, phy2log, 8, num_hidden_layers=5)
    doc = json.loads(path.read_text())
    assert set(doc) == {"physical_to_logical_map"}
    rows = np.asarray(doc["physical_to_logical_map"])
    assert rows.shape == (5, 12)
    np.testing.assert_array_equal(rows[:2], np.tile(np.arange(12) % 8, (2, 1)))
    np.testing.assert_array_equal(rows[2:], phy2log)
    got, ranks = expert_map.load(path, num_ranks=4, num_layers=3, num_logical=8)
    np.testing.assert_array_equal(got, phy2log)
    assert ranks == 4
    # rows named explicitly (an SGLang dump's MoE layers, dense layers between them)
    expert_map.save_sglang(path, phy2log, 8, moe_layers=[1, 3, 4])
    rows = np.asarray(json.loads(path.read_text())["physical_to_logical_map"])
    np.testing.assert_array_equal(rows[[1, 3, 4]], phy2log)
    np.testing.assert_array_equal(rows[[0, 2]], np.tile(np.arange(12) % 8, (2, 1)))
    got, _ = expert_map.load(path, num_ranks=2, num_layers=3, moe_layers=[1, 3, 4])
    np.testing.assert_array_equal(got, phy2log)
    # moe_layers alone names the rows (it was refused: "names 3 layers, the placement has 5")
    got, _ = expert_map.load(path, num_ranks=2, moe_layers=[1, 3, 4])
    np.testing.assert_array_equal(got, phy2log)
    # without num_layers every row is a layer
    got, _ = expert_map.load(path, num_ranks=3)
    assert got.shape == (5, 12)
    # without moe_layers the MoE layers are the last rows, and the rows before them must be
    # the trivial placement: dense layers between MoE layers would be read shifted
    with pytest.raises(ValueError, match=r"rows \[1\] before its last 3 .* not SGLang's "
                                         r"trivial placement .* moe_layers=\["):
        expert_map.load(path, num_ranks=2, num_layers=3, num_logical=8)
    with pytest.raises(ValueError, match="has 5 rows \\(hidden layers\\), the model 6"):
        expert_map.load(path, num_ranks=2, num_layers=3, moe_layers=[1, 3, 4],
                        num_hidden_layers=6)


@pytest.mark.parametrize("doc, kwargs, message", [
    ({"physical_to_logical_map": [[0, 1]]}, {}, "says no rank count; give the ranks"),
    ({"physical_to_logical_map": [[0, 1]], "meta": 1}, {"num_ranks": 1}, "alone"),
    ({"physical_to_logical_map": []}, {"num_ranks": 1}, "non-empty list"),
    ({"physical_to_logical_map": [[0, 1], [0]]}, {"num_ranks": 1}, "row 0 has 2"),
    ({"physical_to_logical_map": [[0, -1]]}, {"num_ranks": 1}, "expert ids >= 0"),
    ({"physical_to_logical_map": [[0, 1.0]]}, {"num_ranks": 1}, "expert ids >= 0"),
    ({"physical_to_logical_map": [[0, 1]]}, {"num_ranks": 1, "num_layers": 2},
     "1 hidden layers, fewer than the 2 MoE layers"),
    ({"physical_to_logical_map": [[0, 1], [1, 0]]},
     {"num_ranks": 1, "num_layers": 2, "moe_layers": [1, 0]}, "must increase"),
    ({"physical_to_logical_map": [[0, 1], [1, 0]]},
     {"num_ranks": 1, "num_layers": 1, "moe_layers": [2]}, "past the 2 hidden layers"),
    ({"physical_to_logical_map": [[0, 1], [1, 0]]},
     {"num_ranks": 1, "num_layers": 2, "moe_layers": [1]}, "names 1 layers"),
    ({"physical_to_logical_map": [[0, 1], [1, 0]]}, {"num_ranks": 1, "moe_layers": []},
     "moe_layers names no layer"),
    ({"physical_to_logical_map": [[0, 1, 2]]}, {"num_ranks": 2}, "divisible"),
    ({"physical_to_logical_map": [[0, 0]]}, {"num_ranks": 1, "num_logical": 2},
     "no copy of logical experts \\[1\\]"),
    ({"logical_count": [[1, 2]]}, {"num_ranks": 1}, "SGLang's 'logical_count', a load"),
])
def test_sglang_placement_file_bad_input_names_it(doc, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        expert_map.load(doc, name="--old", **kwargs)
    assert str(info.value).startswith("--old")


def test_save_sglang_refuses_bad_placements(tmp_path):
    path = tmp_path / "init.json"
    with pytest.raises(ValueError, match="no copy of logical experts"):
        expert_map.save_sglang(path, np.zeros((2, 4), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="3 hidden layers, fewer than the 4 MoE layers"):
        expert_map.save_sglang(path, np.tile(np.arange(4), (4, 1)), 4, num_hidden_layers=3)
    with pytest.raises(TypeError, match="integer expert ids"):
        expert_map.save_sglang(path, np.ones((2, 4)), 1)
    assert not path.exists()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(-2, 9) | st.integers(2**62 - 1, 2**63) | st.floats()
                         | st.booleans() | st.none(), max_size=6), max_size=4),
       st.integers(1, 3), st.none() | st.integers(1, 4), st.none() | st.integers(1, 8))
def test_fuzz_sglang_file_raises_only_value_error(rows, ranks, layers, logical):
    doc = {"physical_to_logical_map": rows}
    try:
        phy2log, got = expert_map.load(doc, num_ranks=ranks, num_layers=layers,
                                       num_logical=logical)
    except ValueError:
        return
    assert got == ranks and phy2log.dtype == np.int64 and phy2log.shape[1] % ranks == 0
    assert phy2log.shape[0] == (layers or len(rows)) and (phy2log >= 0).all()
    np.testing.assert_array_equal(phy2log, np.asarray(rows[len(rows) - phy2log.shape[0]:]))


def test_sglang_pt_files(tmp_path):
    """SGLang reads a start file ending in .pt with torch.load (weights only): the dict of its
    JSON file with tensors; so does load, for both kinds (a placement; a load, planned by
    plan_load)."""
    import torch

    rng = np.random.default_rng(7)
    phy2log = np.stack([rng.permutation(np.r_[np.arange(8), rng.integers(0, 8, 4)])
                        for _ in range(3)])
    rows = np.concatenate([np.tile(np.arange(12) % 8, (2, 1)), phy2log])
    torch.save({"physical_to_logical_map": torch.from_numpy(rows)}, tmp_path / "init.pt")
    got, ranks = expert_map.load(tmp_path / "init.pt", num_ranks=4, num_layers=3, num_logical=8)
    np.testing.assert_array_equal(got, phy2log)
    assert ranks == 4
    # a load: [steps, hidden layers, E], the dense layers' rows zero; plan_load gets the MoE
    # layers' rows summed over the steps
    counts = rng.integers(1, 50, (4, 5, 8)).astype(np.int32)
    counts[:, :2] = 0
    torch.save({"logical_count": torch.from_numpy(counts), "rank": 0}, tmp_path / "dump.pt")
    seen = []

    def plan_load(load):
        seen.append(load)
        return phy2log

    got, _ = expert_map.load(tmp_path / "dump.pt", num_ranks=4, num_layers=3, num_logical=8,
                             plan_load=plan_load)
    np.testing.assert_array_equal(got, phy2log)
    assert seen[0].dtype == np.float64
    np.testing.assert_array_equal(seen[0], counts.sum(axis=0)[2:])
    # the same load as JSON, [hidden layers, E]
    (tmp_path / "c.json").write_text(json.dumps({"logical_count": counts.sum(0).tolist()}))
    expert_map.load(tmp_path / "c.json", num_ranks=4, num_layers=3, plan_load=plan_load)
    np.testing.assert_array_equal(seen[1], seen[0])
    # refused without plan_load (a load is not a placement)
    with pytest.raises(ValueError, match="'logical_count', a load"):
        expert_map.load(tmp_path / "dump.pt", num_ranks=4)
    # plan_load's result is checked as an array placement is (review 18's fuzz: 3 slots on 2
    # ranks, a 1-D array and floats were taken)
    for bad, match in ((np.zeros((3, 6), int), "slots \\(6\\) must be divisible by the 4"),
                       (np.zeros(12, int), "shape \\[layers, slots\\]"),
                       (phy2log + 0.5, "integer expert ids"),
                       (phy2log[:2], "has 2 layers, for 3 MoE layers")):
        with pytest.raises(ValueError, match="the placement plan_load made .*" + match):
            expert_map.load(tmp_path / "dump.pt", num_ranks=4, num_layers=3,
                            plan_load=lambda _, b=bad: b)


def test_sglang_hidden_layers_are_bounded(tmp_path):
    """(review 18's fuzz: 10**12 hidden layers was a MemoryError, 2 * 10**7 a 420 MB file)"""
    with pytest.raises(ValueError, match="num_hidden_layers must be <= 65536"):
        expert_map.save_sglang(tmp_path / "h.json", np.array([[0, 1]]), 2,
                               num_hidden_layers=10**12)
    with pytest.raises(ValueError, match="past the 65536 hidden layers"):
        expert_map.save_sglang(tmp_path / "h.json", np.array([[0, 1]]), 2, moe_layers=[10**9])
    assert not (tmp_path / "h.json").exists()


@pytest.mark.parametrize("obj, kwargs, message", [
    ("tensor", {}, "a .pt expert map holds a dict"),
    ({"physical_to_logical_map": "float"}, {},
     "dense tensor of integer expert ids, got torch.float"),
    ({"logical_count": "complex"}, {}, "dense tensor of real numbers"),
    ({"logical_count": "bool"}, {}, "dense tensor of real numbers"),
    ({"logical_count": "counts"}, {"num_logical": 5},
     "counts 4 experts per layer, the model has 5"),
    ({"logical_count": "counts"}, {"num_layers": 1}, r"rows \[0\] before its last 1 .* count "
                                                     r"tokens"),
    ({"logical_count": "negative"}, {}, "finite and >= 0"),
    ({"logical_count": "1d"}, {}, r"\[layers, experts\] or \[steps, layers, experts\]"),
    ({"logical_count": "counts"}, {"fail": True}, "planning the start placement from its "
                                                  "'logical_count': load: bad"),
    ({"physical_to_logical_map": "sparse"}, {}, r"dense tensor of integer expert ids, got "
                                                r"torch.int64 \(torch.sparse_coo"),
    ({"logical_count": "meta"}, {}, "dense tensor of real numbers, got torch.float32 .*meta"),
    ({"logical_count": "counts", "physical_to_logical_map": "ids"}, {},
     "holds both SGLang's 'physical_to_logical_map' .* and 'logical_count'"),
    ({"logical_count": "counts"}, {"num_hidden_layers": 3}, r"has 2 rows \(hidden layers\), "
                                                            r"the model 3"),
])
def test_sglang_pt_bad_input_names_it(tmp_path, obj, kwargs, message):
    import torch

    values = {"tensor": torch.ones(2, 4), "float": torch.ones(1, 4),
              "complex": torch.ones(2, 4, dtype=torch.complex64),
              "bool": torch.ones(2, 4, dtype=torch.bool),
              "counts": torch.ones(3, 2, 4), "negative": -torch.ones(2, 4),
              "1d": torch.ones(4), "ids": torch.zeros(2, 4, dtype=torch.int64),
              "sparse": torch.eye(4, dtype=torch.int64).to_sparse(),
              "meta": torch.ones(2, 4, device="meta")}
    obj = values[obj] if isinstance(obj, str) else {k: values[v] for k, v in obj.items()}
    torch.save(obj, tmp_path / "x.pt")
    fail = kwargs.pop("fail", False)

    def plan_load(load):
        if fail:
            raise ValueError("load: bad")
        return np.tile(np.arange(4), (load.shape[0], 1))

    with pytest.raises(ValueError, match=message) as info:
        expert_map.load(tmp_path / "x.pt", num_ranks=2, name="expert_map_path",
                        plan_load=plan_load, **kwargs)
    assert str(info.value).startswith("expert_map_path")


def test_sglang_load_file_edge_values(tmp_path):
    """A tensor saved with requires_grad reads; numbers numpy cannot hold as float64, or arrays
    of other kinds given as a dict, are a ValueError naming the file / map."""
    import torch

    def plan_load(load):
        return np.tile(np.arange(4), (load.shape[0], 1))

    counts = torch.ones(2, 4, requires_grad=True)
    torch.save({"logical_count": counts}, tmp_path / "g.pt")
    got, _ = expert_map.load(tmp_path / "g.pt", num_ranks=2, plan_load=plan_load)
    assert got.shape == (2, 4)
    for bad in ([[10**400, 1, 1, 1]], np.array([[1, 2]], dtype=object),
                np.array([[1j, 2]]), np.array([[True, False]])):
        with pytest.raises(ValueError, match=r"^m: SGLang's 'logical_count' (holds a number past|"
                                             r"must be a nested list)"):
            expert_map.load({"logical_count": bad}, num_ranks=1, name="m", plan_load=plan_load)
    # the .pt's own errors name the file once
    torch.save({"logical_count": torch.ones(2, 4, dtype=torch.bool)}, tmp_path / "b.pt")
    with pytest.raises(ValueError) as info:
        expert_map.load(tmp_path / "b.pt", num_ranks=2, name="m", plan_load=plan_load)
    assert str(info.value).count("b.pt") == 1


def test_sglang_pt_not_a_torch_file(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"^expert_map_path .*x\.pt: not a loadable torch file"):
        expert_map.load(tmp_path / "x.pt", num_ranks=2, name="expert_map_path")
    with pytest.raises(FileNotFoundError, match="no such file"):
        expert_map.load(tmp_path / "missing.pt", num_ranks=2, name="expert_map_path")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(-2, 9) | st.floats() | st.booleans() | st.none(),
                         max_size=5), max_size=4),
       st.integers(1, 3), st.none() | st.integers(1, 4))
def test_fuzz_sglang_load_file_raises_only_value_error(rows, ranks, layers):
    import eplb_native

    def plan_load(load):
        return eplb_native.plan(load, num_ranks=ranks, num_replicas=ranks * load.shape[1]
                                ).phy2log

    try:
        phy2log, got = expert_map.load({"logical_count": rows}, num_ranks=ranks,
                                       num_layers=layers, plan_load=plan_load)
    except ValueError:
        return
    assert got == ranks and phy2log.shape[0] == (layers or len(rows))
