"""Expert-map JSON in vllm-ascend's format (``expert_map_path`` / ``expert_map_record_path``).

    {"moe_layer_count": L,
     "layer_list": [{"layer_id": l, "device_count": R,
                     "device_list": [{"device_id": r, "device_expert": [logical ids]}, ...]}, ...]}

``device_expert`` lists the logical expert held by each of the rank's slots, in slot order, so
a map is exactly a ``phy2log`` [L, P] with P = R * S.
"""

from __future__ import annotations

import json
import os

import numpy as np


def to_json_dict(phy2log, num_ranks: int) -> dict:
    """``phy2log`` [L, P] (numpy or torch) -> the JSON-ready dict for ``num_ranks`` ranks."""
    if type(phy2log).__module__.startswith("torch"):
        phy2log = phy2log.detach().cpu().numpy()
    a = np.asarray(phy2log)
    if a.ndim != 2:
        raise ValueError(f"phy2log must have shape [layers, slots], got {a.shape}")
    if not isinstance(num_ranks, int) or num_ranks < 1 or a.shape[1] % num_ranks:
        raise ValueError(f"num_ranks must be a positive divisor of the slot count {a.shape[1]}, "
                         f"got {num_ranks!r}")
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


def from_json_dict(doc: dict, source: str = "expert map") -> np.ndarray:
    """Parses a vllm-ascend expert map into ``phy2log`` [L, P] int64. Every rank must hold the
    same number of slots and every layer the same ranks; ValueError names what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    for key in ("moe_layer_count", "layer_list"):
        if key not in doc:
            raise ValueError(f"{source}: missing key {key!r}")
    layers = doc["layer_list"]
    count = doc["moe_layer_count"]
    if not isinstance(layers, list) or not isinstance(count, int) or isinstance(count, bool):
        raise ValueError(f"{source}: 'moe_layer_count' must be an int and 'layer_list' a list")
    if count != len(layers) or count < 1:
        raise ValueError(f"{source}: moe_layer_count ({count}) must equal len(layer_list) "
                         f"({len(layers)}) and be >= 1")
    rows = []
    for i, layer in enumerate(sorted(layers, key=lambda x: x.get("layer_id", -1)
                                     if isinstance(x, dict) else -1)):
        where = f"{source}: layer_list[{i}]"
        if not isinstance(layer, dict) or "device_list" not in layer:
            raise ValueError(f"{where}: missing key 'device_list'")
        if layer.get("layer_id") != i:
            raise ValueError(f"{where}: layer_id must run 0..{count - 1}, got "
                             f"{layer.get('layer_id')!r}")
        devices = layer["device_list"]
        if not isinstance(devices, list) or not devices:
            raise ValueError(f"{where}: 'device_list' must be a non-empty list")
        if layer.get("device_count", len(devices)) != len(devices):
            raise ValueError(f"{where}: device_count ({layer.get('device_count')}) must equal "
                             f"len(device_list) ({len(devices)})")
        row = []
        for j, dev in enumerate(sorted(devices, key=lambda d: d.get("device_id", -1)
                                       if isinstance(d, dict) else -1)):
            if not isinstance(dev, dict) or dev.get("device_id") != j:
                raise ValueError(f"{where}: device_id must run 0..{len(devices) - 1}")
            experts = dev.get("device_expert")
            if not isinstance(experts, list) or not experts or not all(
                    isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in experts):
                raise ValueError(f"{where}.device_list[{j}]: 'device_expert' must be a non-empty "
                                 f"list of expert ids >= 0")
            if row and len(experts) != len(row[0]):
                raise ValueError(f"{where}: every device must hold the same number of experts "
                                 f"({len(row[0])}), device {j} holds {len(experts)}")
            row.append(experts)
        rows.append(np.asarray(row, dtype=np.int64).reshape(-1))
    if len({r.size for r in rows}) != 1:
        raise ValueError(f"{source}: every layer must have the same number of slots")
    return np.stack(rows)


def save(path: str | os.PathLike, phy2log, num_ranks: int) -> None:
    """Writes ``phy2log`` [L, P] as a vllm-ascend expert-map JSON file (atomically)."""
    doc = to_json_dict(phy2log, num_ranks)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Reads an expert-map JSON file -> (``phy2log`` [L, P] int64, num_ranks)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    phy2log = from_json_dict(doc, source=os.fspath(path))
    return phy2log, len(doc["layer_list"][0]["device_list"])
