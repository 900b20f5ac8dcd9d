"""Expert-map JSON in vllm-ascend's format (``expert_map_path`` / ``expert_map_record_path``).

    {"moe_layer_count": L,
     "layer_list": [{"layer_id": l, "device_count": R,
                     "device_list": [{"device_id": r, "device_expert": [logical ids]}, ...]}, ...]}

``device_expert`` lists the logical expert held by each of the rank's slots, in slot order, so
a map is exactly a ``phy2log`` [L, P] with P = R * S.

SGLang's placement file (``--init-expert-location FILE.json``) is read and written here too:

    {"physical_to_logical_map": [[logical id of each physical slot], one row per hidden layer]}

It has a row for every hidden layer of the model, the dense ones too (SGLang's
``ModelConfigForExpertLocation.num_layers`` is ``num_hidden_layers``), and no rank count
(SGLang's ``ep_size`` splits each row into equal runs of slots). See :func:`save_sglang`.
SGLang's ``*.pt`` start files (the same dict, ``torch.save``d with tensors) are read as SGLang
reads them, and its other start file, a load (``{"logical_count": ...}``), is planned from where
the caller says how (``load(..., plan_load=)``: attach).
"""

from __future__ import annotations

import json
import logging
import numbers
import os

import numpy as np

from ._util import all_numbers, atomic_write, check_int, load_torch, to_numpy, validate_phy2log

logger = logging.getLogger("eplb_native")

#: Largest expert id a map may hold (exclusive): far above any real model, and small enough
#: that ids, counts and offsets computed from them never overflow int64.
MAX_EXPERT_ID = 2**62
#: Most hidden layers an SGLang placement file may have rows for (models have under 200): far
#: above any model, low enough that a mistyped count is refused, not a file of gigabytes.
MAX_HIDDEN_LAYERS = 2**16


def _is_id(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


def _checked(phy2log, num_ranks: int) -> tuple[np.ndarray, int]:
    """What to_json_dict / save take: (``phy2log`` as numpy [L, P], num_ranks), or raises."""
    a = to_numpy(phy2log, "phy2log")
    if a.dtype == object or a.dtype.kind not in "iu":
        # a float would be truncated by int(); what load() refuses is never written
        raise TypeError(f"phy2log must hold integer expert ids, got dtype {a.dtype}")
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"phy2log must have shape [layers, slots], got {a.shape}")
    if (a < 0).any() or (a >= MAX_EXPERT_ID).any():
        raise ValueError(f"phy2log: expert ids must be >= 0 and < 2**62, got [{a.min()}, "
                         f"{a.max()}]")
    num_ranks = check_int(num_ranks, "num_ranks", 1)
    if a.shape[1] % num_ranks:
        raise ValueError(f"num_ranks must be a positive divisor of the slot count {a.shape[1]}, "
                         f"got {num_ranks!r}")
    return a, num_ranks


def to_json_dict(phy2log, num_ranks: int) -> dict:
    """``phy2log`` [L, P] (numpy or torch) -> the JSON-ready dict for ``num_ranks`` ranks."""
    a, num_ranks = _checked(phy2log, num_ranks)
    per_rank = a.reshape(a.shape[0], num_ranks, -1)
    return {
        "moe_layer_count": int(a.shape[0]),
        "layer_list": [
            {"layer_id": layer, "device_count": num_ranks,
             "device_list": [{"device_id": r, "device_expert": [int(e) for e in per_rank[layer, r]]}
                             for r in range(num_ranks)]}
            for layer in range(a.shape[0])
        ],
    }


def _json_text(phy2log, num_ranks: int) -> str:
    """The JSON of to_json_dict, one line per rank, several times faster than json.dump with
    an indent (json's indenting encoder is pure Python: 85 ms at 61 layers x 512 slots here;
    the updator writes a map after every rebalance)."""
    a, num_ranks = _checked(phy2log, num_ranks)
    layers = []
    for layer, ranks in enumerate(a.reshape(a.shape[0], num_ranks, -1).tolist()):
        devices = ",\n".join(f'   {{"device_id": {r}, "device_expert": [{", ".join(map(str, row))}]}}'
                             for r, row in enumerate(ranks))
        layers.append(f'  {{"layer_id": {layer}, "device_count": {num_ranks}, "device_list": [\n'
                      f"{devices}\n  ]}}")
    return (f'{{\n "moe_layer_count": {a.shape[0]},\n "layer_list": [\n' + ",\n".join(layers)
            + "\n ]\n}\n")


def from_json_dict(doc: dict, source: str = "expert map") -> np.ndarray:
    """Parses a vllm-ascend expert map into ``phy2log`` [L, P] int64. Every layer must have the
    same ranks and every rank the same number of slots; expert ids are ints in
    [0, MAX_EXPERT_ID). ValueError names ``source`` and what is wrong."""
    return _parse(doc, source)[0]


def _parse(doc, source: str, num_layers: int | None = None) -> tuple[np.ndarray, int]:
    """from_json_dict -> (``phy2log`` [L, P] int64, num_ranks).

    With ``num_layers``, layers past the first ``num_layers`` are checked on their own (ids,
    devices, slots) and dropped with a warning: vllm-ascend (from v0.23.0rc1) records the
    layers of a speculative-decoding draft model (DeepSeek's MTP layer) after the model's and
    places that layer from its row; the layers eplb_native balances are the model's, so a map
    it writes back has none (vllm-ascend then gives its MTP layer the default placement).
    More such layers than the model's own are refused (a map of another model). Fewer layers
    than ``num_layers`` is the caller's error to raise."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    for key in ("moe_layer_count", "layer_list"):
        if key not in doc:
            raise ValueError(f"{source}: missing key {key!r}")
    layers = doc["layer_list"]
    count = doc["moe_layer_count"]
    if not isinstance(layers, list) or not _is_id(count):
        raise ValueError(f"{source}: 'moe_layer_count' must be an int and 'layer_list' a list")
    if count != len(layers) or count < 1:
        raise ValueError(f"{source}: moe_layer_count ({count}) must equal len(layer_list) "
                         f"({len(layers)}) and be >= 1")
    if num_layers is not None and count - num_layers > num_layers:
        # (a draft model has a layer or a few; more of them than the model's own is a map of
        # another model, which would be cut down to its first layers and served)
        raise ValueError(f"{source}: has {count} layers, the model {num_layers}: "
                         f"{count - num_layers} layers past the model's are more than a draft "
                         f"model's MTP layers (vllm-ascend records those after the model's); "
                         f"is it a map of another model?")
    rows = []
    num_devices = None
    # In list order, each id equal to its position: vllm-ascend's reader takes layers and
    # devices by position and ignores the ids, so a file whose order differs from its ids would
    # mean one placement to it and another to a reader sorting by id (review).
    for i, layer in enumerate(layers):
        where = f"{source}: layer_list[{i}]"
        if not isinstance(layer, dict) or "device_list" not in layer:
            raise ValueError(f"{where}: missing key 'device_list'")
        layer_id = layer.get("layer_id")
        if not _is_id(layer_id) or layer_id != i:
            raise ValueError(f"{where}: layer_id must run 0..{count - 1}, got {layer_id!r} "
                             f"(in list order: this is position {i})")
        devices = layer["device_list"]
        if not isinstance(devices, list) or not devices:
            raise ValueError(f"{where}: 'device_list' must be a non-empty list")
        device_count = layer.get("device_count", len(devices))
        if not _is_id(device_count) or device_count != len(devices):
            raise ValueError(f"{where}: device_count ({device_count!r}) must equal "
                             f"len(device_list) ({len(devices)})")
        beyond = num_layers is not None and i >= num_layers  # (checked alone, then dropped)
        if num_devices is None:
            num_devices = len(devices)
        elif len(devices) != num_devices and not beyond:
            raise ValueError(f"{where}: every layer must have the same devices; layer 0 has "
                             f"{num_devices}, layer {i} has {len(devices)}")
        row = []
        for j, dev in enumerate(devices):
            device_id = dev.get("device_id") if isinstance(dev, dict) else None
            if not _is_id(device_id) or device_id != j:
                raise ValueError(f"{where}: device_id must run 0..{len(devices) - 1}, got "
                                 f"{device_id!r} (in list order: this is position {j})")
            experts = dev.get("device_expert")
            if not isinstance(experts, list) or not experts or not all(
                    _is_id(e) and 0 <= e < MAX_EXPERT_ID for e in experts):
                raise ValueError(f"{where}.device_list[{j}]: 'device_expert' must be a non-empty "
                                 f"list of expert ids >= 0 and < 2**62")
            if row and len(experts) != len(row[0]):
                raise ValueError(f"{where}: every device must hold the same number of experts "
                                 f"({len(row[0])}), device {j} holds {len(experts)}")
            row.append([int(e) for e in experts])
        if not beyond:
            rows.append(np.asarray(row, dtype=np.int64).reshape(-1))
    if len({r.size for r in rows}) != 1:
        raise ValueError(f"{source}: every layer must have the same number of slots")
    extra = len(layers) - len(rows)  # trailing layers past num_layers
    if extra:
        logger.warning("%s: %d layers past the model's %d ignored (layer_list[%d:]: vllm-ascend "
                       "records a draft model's MTP layers there; eplb_native balances the "
                       "model's layers)", source, extra, num_layers, num_layers)
    return np.stack(rows), num_devices


def repeated_on_a_rank(phy2log, num_ranks: int) -> list[tuple[int, int, int]]:
    """(layer, rank, expert) for every rank of ``phy2log`` [L, P] that holds an expert in more
    than one of its slots. eplb_native serves such placements (each slot is routed to), and
    DeepSeek's own algorithm makes them; vllm-ascend's expert-map reader maps one slot per
    expert and rank, so there the second copy gets no tokens and the rank's later slots are
    misnumbered. ``plan(..., distinct_ranks=True)`` makes none."""
    a = to_numpy(phy2log, "phy2log")
    num_ranks = check_int(num_ranks, "num_ranks", 1)
    if a.dtype == object or a.dtype.kind not in "iu":
        raise ValueError(f"phy2log must hold integer expert ids, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] % num_ranks:
        raise ValueError(f"phy2log must have shape [layers, slots] with slots divisible by "
                         f"num_ranks ({num_ranks}), got {list(a.shape)}")
    per_rank = np.sort(a.reshape(a.shape[0], num_ranks, -1), axis=2)
    layer, rank, j = np.nonzero(per_rank[:, :, 1:] == per_rank[:, :, :-1])
    found = {(int(l_), int(r), int(per_rank[l_, r, k])) for l_, r, k in zip(layer, rank, j,
                                                                          strict=True)}
    return sorted(found)


def save(path: str | os.PathLike, phy2log, num_ranks: int, *, warn: bool = True) -> None:
    """Writes ``phy2log`` [L, P] as a vllm-ascend expert-map JSON file (atomically: ``path`` is
    either the old file or the complete new one, and no temporary file is left behind).

    A rank holding one expert in two of its slots is written as it is, with a warning (unless
    ``warn`` is False: the caller reports it): our :func:`load` and attach serve it,
    vllm-ascend's reader does not (see :func:`repeated_on_a_rank`)."""
    text = _json_text(phy2log, num_ranks)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    repeated = repeated_on_a_rank(phy2log, num_ranks) if warn else []
    if repeated:
        logger.warning("expert map %s: %d (layer, rank) pairs hold an expert twice (first: layer "
                       "%d, rank %d, expert %d); vllm-ascend's reader maps one slot per expert "
                       "and rank, so it would not serve this file as written (plan with "
                       "distinct_ranks=True for vllm-ascend)", os.fspath(path),
                       len(repeated), *repeated[0])


def _moe_rows(num_layers: int | None, num_hidden_layers: int | None, moe_layers, label: str
              ) -> tuple[list[int], int]:
    """(the hidden-layer index of each of ``num_layers`` MoE layers, the hidden-layer count):
    ``moe_layers`` as given (increasing, in range), else the last ``num_layers`` of
    ``num_hidden_layers`` (DeepSeek's dense layers come first: ``first_k_dense_replace``).
    ``num_layers`` None: as many as ``moe_layers`` names, or without it every hidden layer."""
    if num_hidden_layers is not None:
        num_hidden_layers = check_int(num_hidden_layers, "num_hidden_layers", 1)
        if num_hidden_layers > MAX_HIDDEN_LAYERS:
            raise ValueError(f"{label}: num_hidden_layers must be <= {MAX_HIDDEN_LAYERS}, got "
                             f"{num_hidden_layers}")
    if moe_layers is None:
        if num_layers is None:
            num_layers = num_hidden_layers
        hidden = num_layers if num_hidden_layers is None else num_hidden_layers
        if hidden < num_layers:
            raise ValueError(f"{label}: {hidden} hidden layers, fewer than the {num_layers} "
                             f"MoE layers")
        return list(range(hidden - num_layers, hidden)), hidden
    ids = [check_int(i, "moe_layers[]", 0) for i in moe_layers]
    if not ids:
        raise ValueError(f"{label}: moe_layers names no layer")
    if num_layers is not None and len(ids) != num_layers:
        raise ValueError(f"{label}: moe_layers names {len(ids)} layers, the placement has "
                         f"{num_layers}")
    if any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
        raise ValueError(f"{label}: moe_layers must increase, got {ids}")
    hidden = ids[-1] + 1 if num_hidden_layers is None else num_hidden_layers
    if ids[-1] >= hidden:
        raise ValueError(f"{label}: moe_layers {ids[-1]} is past the {hidden} hidden layers")
    if hidden > MAX_HIDDEN_LAYERS:
        raise ValueError(f"{label}: moe_layers {ids[-1]} is past the {MAX_HIDDEN_LAYERS} hidden "
                         f"layers a file may have")
    return ids, hidden


def _trivial_row(num_slots: int, num_logical: int) -> list[int]:
    """SGLang's trivial placement of one layer (its dense layers' rows): slot s holds expert
    s mod E (our vLLM default layout)."""
    return [s % num_logical for s in range(num_slots)]


def _sglang_text(rows: list[list[int]]) -> str:
    return ('{"physical_to_logical_map": [\n'
            + ",\n".join(f" [{', '.join(map(str, r))}]" for r in rows) + "\n]}\n")


def save_sglang(path: str | os.PathLike, phy2log, num_logical: int, *,
                num_hidden_layers: int | None = None, moe_layers=None) -> None:
    """Writes ``phy2log`` [L, P] as SGLang's placement file, read at start by
    ``--init-expert-location PATH`` (name it ``*.json``: SGLang parses any other name but
    ``*.pt`` as JSON text, not as a path), atomically as :func:`save`.

    SGLang wants a row per hidden layer: row ``moe_layers[i]`` is ``phy2log[i]``
    (``moe_layers`` default: the last L of ``num_hidden_layers``, which defaults to L), every
    other row (a dense layer) SGLang's trivial placement, slot s holding expert s mod
    ``num_logical``. The file holds that one key: SGLang passes its keys as arguments. Run
    SGLang with ``--ep-num-redundant-experts`` P - E and ``ep_size`` the ranks it was planned
    for. SGLang serves a rank holding one expert twice (DeepSeek's algorithm makes them)."""
    num_logical = check_int(num_logical, "num_logical", 1)
    a = validate_phy2log(phy2log, num_logical, 1, "phy2log")
    if a.ndim != 2:
        raise ValueError(f"phy2log must have shape [layers, slots], got {list(a.shape)}")
    ids, hidden = _moe_rows(a.shape[0], num_hidden_layers, moe_layers, "save_sglang")
    rows = [_trivial_row(a.shape[1], num_logical)] * hidden
    for i, layer in enumerate(ids):
        rows[layer] = a[i].tolist()
    text = _sglang_text(rows)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _parse_sglang(doc: dict, source: str, num_layers: int | None, num_ranks: int | None,
                  moe_layers, num_logical: int | None, num_hidden_layers: int | None
                  ) -> tuple[np.ndarray, int]:
    """SGLang's placement file -> (``phy2log`` of its MoE layers, num_ranks). Without
    ``moe_layers`` the MoE layers are the last rows, and the rows before them must hold
    SGLang's trivial placement (its dense layers', as :func:`save_sglang` writes them): a
    file whose dense layers sit between its MoE layers would otherwise be read shifted."""
    if num_ranks is None:
        raise ValueError(f"{source}: an SGLang placement file says no rank count; give the "
                         f"ranks (--ranks)")
    rows = doc["physical_to_logical_map"]
    if set(doc) != {"physical_to_logical_map"}:
        raise ValueError(f"{source}: an SGLang placement file holds 'physical_to_logical_map' "
                         f"alone (SGLang passes every key as an argument), got keys "
                         f"{sorted(map(str, doc))}")
    if (not isinstance(rows, list) or not rows
            or not all(isinstance(r, list) and r for r in rows)):
        raise ValueError(f"{source}: 'physical_to_logical_map' must be a non-empty list of "
                         f"non-empty lists (a row of logical ids per hidden layer)")
    width = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise ValueError(f"{source}: physical_to_logical_map[{i}] has {len(r)} slots, row 0 "
                             f"has {width}")
        if not all(_is_id(e) and 0 <= e < MAX_EXPERT_ID for e in r):
            raise ValueError(f"{source}: physical_to_logical_map[{i}] must hold expert ids "
                             f">= 0 and < 2**62")
    if width % num_ranks:
        raise ValueError(f"{source}: slots ({width}) must be divisible by the {num_ranks} ranks")
    if num_hidden_layers is not None and len(rows) != num_hidden_layers:
        raise ValueError(f"{source}: has {len(rows)} rows (hidden layers), the model "
                         f"{num_hidden_layers}")
    ids, _ = _moe_rows(num_layers, len(rows), moe_layers, source)
    if moe_layers is None and ids[0] > 0:
        trivial = _trivial_row(width, num_logical or 1 + max(max(r) for r in rows))
        odd = [i for i in range(ids[0]) if rows[i] != trivial]
        if odd:
            raise ValueError(f"{source}: rows {odd[:8]} before its last {len(ids)} (the MoE "
                             f"layers, taken as the last rows) are not SGLang's trivial "
                             f"placement of a dense layer: are dense layers between its MoE "
                             f"layers? Read it with expert_map.load(..., moe_layers=[the MoE "
                             f"layers' rows]) (attach's expert_map_path reads them from its "
                             f"layers' names, model.layers.N, where they hold one)")
    return np.asarray([rows[i] for i in ids], dtype=np.int64), num_ranks


def _plan_sglang_load(doc: dict, source: str, num_layers: int | None, num_ranks: int | None,
                      moe_layers, num_logical: int | None, num_hidden_layers: int | None,
                      plan_load) -> tuple[np.ndarray, int]:
    """SGLang's start file holding a load (``{"logical_count": [hidden layers, E] or [steps,
    hidden layers, E]}``, from which SGLang plans its start placement with its EPLB algorithm)
    -> (``plan_load``'s placement of the MoE layers' rows, summed over the steps; num_ranks).
    Without ``moe_layers`` the MoE layers are the last rows, and the rows before them must
    count nothing (SGLang counts no token in a dense layer)."""
    counts = doc["logical_count"]
    what = f"{source}: SGLang's 'logical_count'"
    if num_ranks is None:
        raise ValueError(f"{source}: SGLang's start file says no rank count; give the ranks")
    if isinstance(counts, np.ndarray) and counts.dtype.kind in "iuf":  # (a .pt's, _read_pt)
        a = counts.astype(np.float64)
    elif isinstance(counts, list) and all_numbers(counts):
        try:
            a = np.asarray(counts, dtype=np.float64)
        except ValueError:
            raise ValueError(f"{what} is ragged (rows of different lengths)") from None
        except OverflowError:  # (an int past float64's range)
            raise ValueError(f"{what} holds a number past float64's range") from None
    else:
        raise ValueError(f"{what} must be a nested list (a .pt file: a tensor) of real numbers")
    if a.ndim == 3:
        a = a.sum(axis=0)  # (SGLang plans from the sum over the steps)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{what} must be [layers, experts] or [steps, layers, experts], got "
                         f"shape {list(np.shape(counts))}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"{what} must be finite and >= 0")
    if num_logical is not None and a.shape[1] != num_logical:
        raise ValueError(f"{what} counts {a.shape[1]} experts per layer, the model has "
                         f"{num_logical}")
    if num_hidden_layers is not None and a.shape[0] != num_hidden_layers:
        raise ValueError(f"{source}: has {a.shape[0]} rows (hidden layers), the model "
                         f"{num_hidden_layers}")
    ids, _ = _moe_rows(num_layers, a.shape[0], moe_layers, source)
    if moe_layers is None and ids[0] > 0 and a[:ids[0]].any():
        odd = np.flatnonzero(a[:ids[0]].any(axis=1)).tolist()
        raise ValueError(f"{what}: rows {odd[:8]} before its last {len(ids)} (the MoE layers, "
                         f"taken as the last rows) count tokens, which a dense layer does not: "
                         f"are dense layers between its MoE layers? Read it with "
                         f"expert_map.load(..., moe_layers=[the MoE layers' rows])")
    try:
        phy2log = plan_load(np.ascontiguousarray(a[ids]))
    except ValueError as e:
        raise ValueError(f"{source}: planning the start placement from its 'logical_count': "
                         f"{e}") from None
    label = f"{source}: the placement plan_load made from its 'logical_count'"
    phy2log = _array_map(to_numpy(phy2log, label), label, num_ranks)
    if phy2log.shape[0] != len(ids):
        raise ValueError(f"{label} has {phy2log.shape[0]} layers, for {len(ids)} MoE layers")
    return phy2log, num_ranks


def _array_map(a: np.ndarray, label: str, num_ranks: int) -> np.ndarray:
    """A phy2log array as given (load's array input, plan_load's result) -> int64 [L, P],
    checked: integer ids below 2**62, 2-D, P divisible by ``num_ranks``."""
    if a.dtype == object or a.dtype.kind not in "iu":
        raise ValueError(f"{label} must hold integer expert ids, got dtype {a.dtype}")
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{label} must have shape [layers, slots], got {list(a.shape)}")
    if a.shape[1] % num_ranks:
        raise ValueError(f"{label}: slots ({a.shape[1]}) must be divisible by the "
                         f"{num_ranks} ranks")
    if a.size and a.max() >= MAX_EXPERT_ID:  # (what save() takes: the round trip holds)
        raise ValueError(f"{label}: expert ids must be < 2**62, got {a.max()}")
    return a.astype(np.int64)


def _read_pt(src: str, label: str) -> dict:
    """An SGLang ``.pt`` start file (``torch.save`` of the dict its JSON file holds, tensors for
    lists); torch is imported only here."""
    import torch

    with open(src, "rb") as f:
        obj = load_torch(f, label)
    if not isinstance(obj, dict):
        raise ValueError(f"{label}: a .pt expert map holds a dict (SGLang's "
                         f"{{'physical_to_logical_map': tensor}}), got {type(obj).__name__}")
    def dense(key: str, integer: bool):
        t = obj[key]
        if (t.layout != torch.strided or t.is_meta or t.is_quantized or t.is_nested
                or t.is_complex() or t.dtype == torch.bool
                or (integer and t.is_floating_point())):
            raise ValueError(f"{label}: '{key}' must be a dense tensor of "
                             f"{'integer expert ids' if integer else 'real numbers'}, got "
                             f"{t.dtype} ({t.layout}{', meta' if t.is_meta else ''})")
        return t.detach()

    if isinstance(obj.get("physical_to_logical_map"), torch.Tensor):
        obj = {**obj, "physical_to_logical_map": dense("physical_to_logical_map", True).tolist()}
    if isinstance(obj.get("logical_count"), torch.Tensor):
        obj = {**obj, "logical_count": dense("logical_count", False).double().numpy()}
    return obj


def _read(path, label: str) -> dict:
    """The JSON in ``path`` (an SGLang ``*.pt`` file: its dict); errors name ``label`` (the
    argument and the path)."""
    src = os.fspath(path)
    if os.path.isdir(src):
        raise ValueError(f"{label}: is a directory, not an expert map file")
    if src.endswith(".pt"):  # (SGLang's rule for a torch file: the name, case and all)
        try:
            return _read_pt(src, label)
        except FileNotFoundError:
            raise FileNotFoundError(f"{label}: no such file") from None
        except PermissionError:
            raise PermissionError(f"{label}: permission denied") from None
    try:
        with open(src, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: no such file") from None
    except PermissionError:
        raise PermissionError(f"{label}: permission denied") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start}); an expert "
                         "map is a JSON file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{label}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{label}: JSON nested too deeply for an expert map") from None
    except ValueError as e:  # (an integer past Python's digit limit, say)
        raise ValueError(f"{label}: not a readable expert map ({e})") from None


def load(path_or_map, *, num_ranks: int | None = None, num_logical: int | None = None,
         num_layers: int | None = None, num_slots: int | None = None,
         name: str | None = None, moe_layers=None, ranks_name: str | None = None,
         num_hidden_layers: int | None = None, plan_load=None) -> tuple[np.ndarray, int]:
    """The one expert-map loader -> (``phy2log`` [L, P] int64, a new array; num_ranks).

    Args:
        path_or_map: an expert-map JSON file (str / PathLike), the dict parsed from one, or a
            ``phy2log`` [L, P] array (numpy / torch / nested list; needs ``num_ranks``). An
            SGLang placement file (``physical_to_logical_map``, see :func:`save_sglang`) is
            read too; it needs ``num_ranks``, and its rows are taken at ``moe_layers``
            (default: the last ``num_layers`` rows, DeepSeek's dense layers coming first).
        num_ranks: when given, the map must be for exactly this many ranks.
        num_logical: when given, every id must lie in [0, num_logical) and every logical
            expert must have a slot in every layer.
        num_layers: when given, the map must have this many layers; a file / dict may have
            more (vllm-ascend records a draft model's MTP layers after the model's): those are
            checked, then dropped with a warning. An array must have exactly this many.
        num_slots: when given, every layer must have exactly this many slots (P).
        name: what to call the map in errors (e.g. ``"--old"``, ``"expert_map"``); a path is
            always named too.
        moe_layers: an SGLang file's row (hidden-layer index) of each MoE layer.
        ranks_name: what ``num_ranks`` came from (e.g. ``"--ranks"``), named by the error of
            a map for other ranks.
        num_hidden_layers: when given, an SGLang file must have this many rows.
        plan_load: reads SGLang's other start file, a load (``{"logical_count": ...}``):
            called with the MoE layers' rows of it [L, E] float64 (summed over its steps; the
            rows taken as for a placement file, those before the MoE layers counting nothing)
            it returns the start placement ``phy2log`` [L, P] (attach plans it with the
            configured policy, as SGLang does with its EPLB algorithm). Without it such a file
            is refused.

    A path ending in ``.pt`` is read as SGLang reads one (``torch.load``, weights only): the
    dict of its JSON file, with tensors for lists.

    Raises ValueError naming the map and the problem (FileNotFoundError for a missing file).
    """
    if num_ranks is not None:
        num_ranks = check_int(num_ranks, "num_ranks", 1)
    if num_logical is not None:
        num_logical = check_int(num_logical, "num_logical", 1)
    if num_layers is not None:
        num_layers = check_int(num_layers, "num_layers", 1)
    if num_slots is not None:
        num_slots = check_int(num_slots, "num_slots", 1)
    if isinstance(path_or_map, str | os.PathLike):
        src = os.fspath(path_or_map)
        label = f"{name} {src}" if name else src
        doc = _read(src, label)
    elif isinstance(path_or_map, dict):
        label = name or "expert map"
        doc = path_or_map
    if isinstance(path_or_map, str | os.PathLike | dict):
        if (isinstance(doc, dict) and "logical_count" in doc
                and "physical_to_logical_map" in doc):
            raise ValueError(f"{label}: holds both SGLang's 'physical_to_logical_map' (a "
                             f"placement) and 'logical_count' (a load); SGLang reads one of them "
                             f"only: keep the one meant")
        if (isinstance(doc, dict) and "logical_count" in doc and "layer_list" not in doc
                and plan_load is not None):
            phy2log, ranks = _plan_sglang_load(doc, label, num_layers, num_ranks, moe_layers,
                                               num_logical, num_hidden_layers, plan_load)
        elif isinstance(doc, dict) and "logical_count" in doc and "layer_list" not in doc:
            raise ValueError(f"{label}: holds SGLang's 'logical_count', a load (SGLang plans its "
                             f"start placement from it), not a placement; plan one from it "
                             f"(eplb-native plan --load FILE --format sglang writes SGLang's "
                             f"placement file, which this reads)")
        elif isinstance(doc, dict) and "physical_to_logical_map" in doc:
            phy2log, ranks = _parse_sglang(doc, label, num_layers, num_ranks, moe_layers,
                                           num_logical, num_hidden_layers)
        else:
            phy2log, ranks = _parse(doc, label, num_layers)
    else:
        label = name or "phy2log"
        if num_ranks is None:
            raise ValueError(f"{label}: a phy2log array needs num_ranks")
        phy2log, ranks = _array_map(to_numpy(path_or_map, label), label, num_ranks), num_ranks
    if num_ranks is not None and ranks != num_ranks:
        raise ValueError(f"{label} is for {ranks} ranks, but {ranks_name} is {num_ranks}"
                         if ranks_name else f"{label} is for {ranks} ranks, expected {num_ranks}")
    if num_layers is not None and phy2log.shape[0] != num_layers:
        raise ValueError(f"{label} has {phy2log.shape[0]} layers, expected {num_layers} "
                         f"(one row per MoE layer)")
    if num_slots is not None and phy2log.shape[1] != num_slots:
        raise ValueError(f"{label} has {phy2log.shape[1]} slots per layer, expected {num_slots}")
    if num_logical is not None:
        validate_phy2log(phy2log, num_logical, ranks, label)
    elif (phy2log < 0).any():
        raise ValueError(f"{label}: expert ids must be >= 0, got {phy2log.min()}")
    return phy2log, ranks

