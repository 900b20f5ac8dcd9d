"""Load traces: per-window expert loads, real model shapes, and a synthetic drifting generator.

A *trace* is a sequence of load windows, ``loads`` [W, L, E]: tokens routed to each logical
expert of each MoE layer during each window (DESIGN.md: "load", "window"). One file format is
written (``save_trace``: an ``.npz`` holding ``loads`` and a ``meta`` JSON string) and several
are read (``load_trace``: ``.npz``, ``.npy``, ``.pt``, ``.json``, with a [W, L, E] array or a
single [L, E] window). ``eplb-native plan`` / ``simulate`` and the updator's ``save_trace`` all
go through this module, so a trace recorded while serving replays offline unchanged.

Nothing here needs torch except reading ``.pt`` files (imported lazily).
"""

from __future__ import annotations

import io
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass

import numpy as np

from ._util import all_numbers, atomic_write, check_int, check_writable_dir, load_torch, to_numpy

logger = logging.getLogger("eplb_native")

__all__ = ["MODEL_SHAPES", "ModelShape", "load_trace", "save_trace", "sum_windows", "synth"]

SKEWS = ("zipf", "lognormal")


@dataclass(frozen=True)
class ModelShape:
    """The expert-parallel shape of a public MoE model and a typical deployment of it.

    ``num_layers`` .. ``num_groups`` are what the planner needs (slots = experts + redundant);
    ``hidden_size`` / ``moe_intermediate_size`` / ``bytes_per_param`` size one expert's weights,
    so moved slots can be priced in bytes. ``source`` names the public config fields used.
    """

    num_layers: int  #: MoE layers (dense layers excluded)
    num_experts: int  #: routed (logical) experts per MoE layer; shared experts excluded
    top_k: int  #: routed experts per token (num_experts_per_tok)
    num_redundant: int  #: redundant slots per layer in the default deployment
    num_ranks: int  #: EP ranks in the default deployment
    num_nodes: int  #: nodes in the default deployment (8 ranks per node)
    num_groups: int  #: expert groups of group-limited routing (n_group); 1 = none
    hidden_size: int = 0  #: model width (hidden_size)
    moe_intermediate_size: int = 0  #: expert FFN width (moe_intermediate_size)
    bytes_per_param: float = 2.0  #: storage of the released weights (FP8 = 1, BF16 = 2)
    source: str = ""
    #: decoder layers (num_hidden_layers), the dense ones first (first_k_dense_replace):
    #: SGLang's placement file has a row for each; 0: as many as MoE layers
    num_hidden_layers: int = 0

    @property
    def num_slots(self) -> int:
        """Physical slots per layer (logical + redundant)."""
        return self.num_experts + self.num_redundant

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights: gate, up and down projections (3 * hidden * inter),
        block-quantization scales ignored (< 0.1% for 128x128 FP8 blocks)."""
        return int(3 * self.hidden_size * self.moe_intermediate_size * self.bytes_per_param)


#: Public model shapes. The deployments (ranks, nodes, redundant slots) are the ones the planner
#: issue benchmarks: 8 ranks per node; DeepSeek-V3 and Qwen3 288 / 160 slots on 32 ranks,
#: Kimi-K2 384 + 128 = 512 slots on 256 ranks (2 per rank).
MODEL_SHAPES: dict[str, ModelShape] = {
    # deepseek-ai/DeepSeek-V3 config.json: num_hidden_layers 61, first_k_dense_replace 3
    # (-> 58 MoE layers), n_routed_experts 256, num_experts_per_tok 8, n_group 8,
    # hidden_size 7168, moe_intermediate_size 2048; weights released in FP8 (1 byte).
    # 32 redundant experts on 32 ranks / 4 nodes: the DeepSeek-V3 report's prefill deployment.
    "deepseek-v3": ModelShape(
        num_layers=58, num_experts=256, top_k=8, num_redundant=32, num_ranks=32, num_nodes=4,
        num_groups=8, hidden_size=7168, moe_intermediate_size=2048, bytes_per_param=1.0,
        source="deepseek-ai/DeepSeek-V3 config.json: num_hidden_layers=61 - "
               "first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8, n_group=8, "
               "hidden_size=7168, moe_intermediate_size=2048, FP8",
        num_hidden_layers=61),
    # Qwen/Qwen3-235B-A22B config.json: num_hidden_layers 94, decoder_sparse_step 1,
    # mlp_only_layers [] (-> 94 MoE layers), num_experts 128, num_experts_per_tok 8, no expert
    # groups, hidden_size 4096, moe_intermediate_size 1536; weights released in BF16.
    "qwen3-235b": ModelShape(
        num_layers=94, num_experts=128, top_k=8, num_redundant=32, num_ranks=32, num_nodes=4,
        num_groups=1, hidden_size=4096, moe_intermediate_size=1536, bytes_per_param=2.0,
        source="Qwen/Qwen3-235B-A22B config.json: num_hidden_layers=94, decoder_sparse_step=1, "
               "num_experts=128, num_experts_per_tok=8, hidden_size=4096, "
               "moe_intermediate_size=1536, BF16",
        num_hidden_layers=94),
    # moonshotai/Kimi-K2-Instruct config.json: num_hidden_layers 61, first_k_dense_replace 1
    # (-> 60 MoE layers), n_routed_experts 384, num_experts_per_tok 8, n_group 1,
    # hidden_size 7168, moe_intermediate_size 2048; weights released in FP8 (block-quantized).
    # We keep the model's 60 MoE layers; the planner issue's "Kimi-K2-like" 61 x 384 counts every
    # decoder layer. Per-layer numbers (balancedness, time per layer) do not depend on it; pass
    # --layers 61 to `eplb-native synth --shape kimi-k2` to reproduce that shape exactly.
    "kimi-k2": ModelShape(
        num_layers=60, num_experts=384, top_k=8, num_redundant=128, num_ranks=256,
        num_nodes=32, num_groups=1, hidden_size=7168, moe_intermediate_size=2048,
        bytes_per_param=1.0,
        source="moonshotai/Kimi-K2-Instruct config.json: num_hidden_layers=61 - "
               "first_k_dense_replace=1, n_routed_experts=384, num_experts_per_tok=8, n_group=1, "
               "hidden_size=7168, moe_intermediate_size=2048, FP8",
        num_hidden_layers=61),
}


def _check_float(name: str, value, low: float, high: float = math.inf, *,
                 low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or v > high or (low_open and v == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a finite number in {bracket}{low}, {high}], "
                         f"got {value!r}")
    return v


def synth(num_windows: int, num_layers: int, num_experts: int, *, skew: str = "zipf",
          sigma: float = 1.0, zipf_a: float = 1.1, drift: float = 0.05,
          tokens_per_window: int = 4096, top_k: int = 8, seed: int = 0) -> np.ndarray:
    """A synthetic drifting load trace -> ``loads`` [W, L, E] int64 (a new array, caller owns).

    Each layer has a latent score per expert, ``z`` ~ N(0, 1) i.i.d. at window 0 (so the hot
    experts are a random permutation, different per layer). Each window the scores take an
    AR(1) step, ``z <- sqrt(1 - drift) * z + sqrt(drift) * noise``: the marginal stays N(0, 1),
    so the skew is stationary, while the identity of the hot experts changes gradually
    (correlation sqrt(1 - drift) between consecutive windows; drift=0: static, 1: fresh every
    window). Popularity from the scores:

    - ``zipf``: the expert with the r-th highest score (r = 1, 2, ...) gets weight r**-zipf_a;
    - ``lognormal``: weight exp(sigma * z).

    Counts: ``tokens_per_window * top_k`` multinomial draws per layer and window over the
    normalized weights (routing choices treated as independent draws; each row sums exactly to
    tokens_per_window * top_k). Deterministic for a given seed and arguments.
    """
    num_windows = check_int(num_windows, "num_windows", 1)
    num_layers = check_int(num_layers, "num_layers", 1)
    num_experts = check_int(num_experts, "num_experts", 1)
    tokens_per_window = check_int(tokens_per_window, "tokens_per_window", 1)
    top_k = check_int(top_k, "top_k", 1)
    seed = check_int(seed, "seed", 0)
    if skew not in SKEWS:
        raise ValueError(f"skew must be one of {SKEWS}, got {skew!r}")
    sigma = _check_float("sigma", sigma, 0.0, 20.0)
    zipf_a = _check_float("zipf_a", zipf_a, 0.0, 20.0, low_open=True)
    drift = _check_float("drift", drift, 0.0, 1.0)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
    if tokens_per_window * top_k > np.iinfo(np.int64).max:
        # the multinomial draws per window and layer, and every row's sum, are int64
        raise ValueError(f"tokens_per_window * top_k must be < 2**63, got {tokens_per_window} "
                         f"* {top_k}")

    rng = np.random.default_rng(seed)
    keep, fresh = math.sqrt(1.0 - drift), math.sqrt(drift)
    zipf_weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -zipf_a
    draws = tokens_per_window * top_k
    out = np.empty((num_windows, num_layers, num_experts), dtype=np.int64)
    z = rng.standard_normal((num_layers, num_experts))
    for w in range(num_windows):
        if w:
            z = keep * z + fresh * rng.standard_normal(z.shape)
        if skew == "zipf":
            # rank of each expert's score, 0 = hottest
            order = np.argsort(-z, axis=1, kind="stable")
            ranks = np.empty_like(order)
            np.put_along_axis(ranks, order, np.arange(num_experts)[None, :], axis=1)
            weights = zipf_weights[ranks]
        else:
            # subtract the row max before exp: same distribution, no overflow for large sigma
            weights = np.exp(sigma * (z - z.max(axis=1, keepdims=True)))
        probs = weights / weights.sum(axis=1, keepdims=True)
        out[w] = rng.multinomial(draws, probs)
    return out


def sum_windows(loads: np.ndarray) -> np.ndarray:
    """``loads`` [W, L, E] -> their sum over windows [L, E] (a new array).

    int64 when the sum is exact in int64; float64 when it would overflow int64 (counts near
    2**63 / W), so a sum never wraps negative; float loads are summed in float64.
    """
    a = np.asarray(loads)
    if a.ndim != 3:
        raise ValueError(f"loads must be [windows, layers, experts], got shape {a.shape}")
    if a.dtype.kind == "f":
        with np.errstate(over="ignore"):
            total = a.sum(axis=0, dtype=np.float64)
        if not np.isfinite(total).all():  # (each load finite, the sum past float64's range)
            at = [int(i) for i in np.argwhere(~np.isfinite(total))[0]]
            raise ValueError(f"loads summed over the {a.shape[0]} windows overflow float64 at "
                             f"[layer, expert] {at}; scale them down")
        return total
    total = a.sum(axis=0, dtype=np.float64)
    # below 2**62 the float64 sum is far from the int64 limit despite its rounding
    if total.size == 0 or total.max() < 2.0**62:
        return a.sum(axis=0, dtype=np.int64)
    return total


# --------------------------------------------------------------------------- files


def _validate(a: np.ndarray, what: str) -> np.ndarray:
    """[W, L, E] or [L, E] numeric, finite, >= 0 -> [W, L, E] int64 or float64 (a copy)."""
    if a.dtype == object or a.dtype.kind not in "iuf":
        raise ValueError(f"{what}: loads must be a numeric (int or float) array, got dtype "
                         f"{a.dtype}")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{what}: loads must have shape [windows, layers, experts] or "
                         f"[layers, experts], got ndim {a.ndim} (shape {tuple(a.shape)})")
    if 0 in a.shape:
        raise ValueError(f"{what}: loads must not be empty, got shape {tuple(a.shape)}")
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{what}: loads contain NaN or inf")
    else:
        if a.dtype == np.uint64 and (a > np.iinfo(np.int64).max).any():
            raise ValueError(f"{what}: loads exceed the int64 range")
        a = a.astype(np.int64)
    if (a < 0).any():
        raise ValueError(f"{what}: loads contain negative values (min {a.min()})")
    return a


def _meta_from_json(text, what: str) -> dict:
    try:
        meta = json.loads(str(text))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: 'meta' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: 'meta' must be a JSON object, got {type(meta).__name__}")
    return meta


def window_steps_ok(steps, num_windows: int) -> bool:
    """Whether a trace meta's ``window_steps`` (the steps of load each window sums, as
    ``Updator.save_trace`` writes) is one int in [0, 2**62] per window: what ``eplb-native
    simulate`` reads and what ``Updator.save_trace`` takes from its caller alike."""
    return (isinstance(steps, list | tuple) and len(steps) == num_windows
            and not any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 2**62
                        for n in steps))


def save_trace(path: str | os.PathLike, loads, **meta) -> None:
    """Writes a trace as ``.npz``: ``loads`` [W, L, E] (a [L, E] window is stored as W = 1;
    numpy or torch; int kept as int64, float as float64) and ``meta``, the keyword arguments as
    a JSON object string (e.g. shape="deepseek-v3", seed=0). The file is written atomically at
    exactly ``path`` (no ``.npz`` appended), which must end in ``.npz`` (a trace is read by its
    extension: an archive named otherwise would not read back). ValueError on bad loads, a path
    of another name or in a folder that is not there, or non-JSON meta."""
    target = os.fspath(path)
    if not str(target).lower().endswith(".npz"):
        raise ValueError(f"save_trace: path {target!r} must end in .npz (the trace is an .npz "
                         f"archive, and load_trace reads a file by its extension)")
    check_writable_dir(target, "save_trace: path")
    a = _validate(to_numpy(loads, "save_trace: loads"), "save_trace")
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_trace: meta must be JSON-serializable ({e})") from None
    with atomic_write(target, "wb") as f:
        np.savez_compressed(f, loads=a, meta=np.array(meta_json))


def load_trace(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Reads a trace -> (``loads`` [W, L, E] int64 or float64, ``meta`` dict); caller owns both.

    Accepted files (by extension):

    - ``.npz``: key ``loads`` (required) and optionally ``meta`` (a JSON object string), as
      written by :func:`save_trace`;
    - ``.npy``: one array;
    - ``.pt``: a tensor, or a dict with ``loads`` (tensor) and optionally ``meta`` (dict),
      read with ``torch.load(weights_only=True)``; or SGLang's expert-distribution dump
      (``logical_count`` [steps, layers, E], its ``stat`` recorder mode: one window a step, the
      dense layers' all-zero rows dropped);
    - ``.json``: a nested list, or an object with ``loads`` and optionally ``meta``.

    The array is [W, L, E], or [L, E] (read as one window). Loads must be non-negative and
    finite. Anything else raises ValueError naming the file and what is wrong;
    a missing file raises FileNotFoundError.
    """
    src = os.fspath(path)
    try:
        os.stat(src)
    except FileNotFoundError:
        raise FileNotFoundError(f"{src}: no such file") from None
    except OSError as e:  # (a folder on the way that cannot be entered, ...): as it is
        raise OSError(e.errno, f"{src}: {e.strerror}") from None
    if os.path.isdir(src):
        raise ValueError(f"{src}: is a directory, not a trace file")
    ext = os.path.splitext(src)[1].lower()
    _check_kind(src, ext)
    meta: dict = {}
    if ext == ".npz":
        raw, meta = _read_npz(src)
    elif ext == ".npy":
        stream = _seekable(src)
        try:
            raw = np.load(stream, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any parse failure of the header or data
            raise ValueError(f"{src}: not a valid .npy array file ({_short(e)})") from None
        if not isinstance(raw, np.ndarray):
            raise ValueError(f"{src}: not a valid .npy array file")
    elif ext == ".pt":
        raw, meta = _read_pt(src)
    elif ext == ".json":
        raw, meta = _read_json(src)
    else:
        raise ValueError(f"{src}: unsupported trace file extension {ext!r}; expected .npz, "
                         f".npy, .pt or .json")
    try:
        loads = to_numpy(raw, f"{src}: loads")
    except Exception as e:  # noqa: BLE001 - any conversion failure names the file
        if isinstance(e, ValueError) and str(e).startswith(src):
            raise
        raise ValueError(f"{src}: loads cannot be read as an array ({_short(e)})") from None
    return _validate(loads, src), meta


#: what each binary format starts with (torch's: a zip archive, or a pickle before torch 1.6)
_MAGIC = {".npz": (b"PK\x03\x04", b"PK\x05\x06"), ".npy": (b"\x93NUMPY",),
          ".pt": (b"PK\x03\x04", b"\x80")}


def _check_kind(src: str, ext: str) -> None:
    """ValueError naming what the file is when its first bytes are not its extension's format
    (a PNG or JSON named .npz): numpy's and torch's own errors there advise loading it
    unsafely (allow_pickle, weights_only=False), which is wrong advice for a file of another
    kind. Unreadable files raise OSError naming the file (not "not a valid archive")."""
    if ext not in _MAGIC or not os.path.isfile(src):
        return  # (a pipe is read once, by its reader: a look ahead would take its bytes)
    try:
        with open(src, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise OSError(e.errno, f"{src}: {e.strerror}") from None
    if head.startswith(_MAGIC[ext]):
        return
    names = {".npz": "an .npz archive", ".npy": "a .npy array file", ".pt": "a torch file"}
    other = ("a PNG image" if head.startswith(b"\x89PNG") else
             "JSON text" if head.lstrip()[:1] in (b"{", b"[") else
             "a .npy array" if head.startswith(b"\x93NUMPY") else
             "a zip archive" if head.startswith(b"PK") else None)
    if other is not None:
        raise ValueError(f"{src}: not {names[ext]} (the file is {other}); name it for its format")
    raise ValueError(f"{src}: not {names[ext]} (" + (
        "the file is empty)" if not head else f"it starts with bytes {head[:4]!r})"))


def _seekable(src: str):
    """``src`` itself for a regular file; a pipe or device (a FIFO, /dev/stdin, a process
    substitution) read whole into memory, as numpy's and torch's readers seek (the .npz reader
    reads whole files anyway)."""
    if os.path.isfile(src):
        return src
    try:
        with open(src, "rb") as f:
            return io.BytesIO(f.read())
    except OSError as e:
        raise OSError(e.errno, f"{src}: {e.strerror}") from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _read_npz(src: str):
    try:
        with open(src, "rb") as f:
            blob = f.read()
        archive = np.load(io.BytesIO(blob), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure of the archive
        raise ValueError(f"{src}: not a valid .npz archive ({_short(e)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{src}: not a .npz archive (it holds a single array; name it .npy)")
    with archive:
        if "loads" not in archive.files:
            raise ValueError(f"{src}: missing key 'loads' (keys: {sorted(archive.files)})")
        try:
            raw = archive["loads"]
            meta = _meta_from_json(archive["meta"][()], src) if "meta" in archive.files else {}
        except ValueError as e:
            if str(e).startswith(src):
                raise
            raise ValueError(f"{src}: corrupt .npz member ({_short(e)})") from None
        except Exception as e:  # noqa: BLE001 - zlib / zip / header errors of a member
            raise ValueError(f"{src}: corrupt .npz member ({_short(e)})") from None
    return raw, meta


def _read_pt(src: str):
    import torch

    obj = load_torch(_seekable(src), src)
    meta: dict = {}
    if isinstance(obj, dict) and "loads" not in obj and "logical_count" in obj:
        return _read_sglang_dump(obj, src)
    if isinstance(obj, dict) and "loads" not in obj and "records" in obj:
        raise ValueError(f"{src}: an SGLang per-pass / per-token recorder dump ('records'); "
                         f"its counts per window come from the 'stat' mode "
                         f"(--expert-distribution-recorder-mode stat), whose 'logical_count' "
                         f"this reads")
    if isinstance(obj, dict):
        if "loads" not in obj:
            raise ValueError(f"{src}: missing key 'loads' (keys: {sorted(map(str, obj))})")
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{src}: 'meta' must be a dict, got {type(meta).__name__}")
        obj = obj["loads"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{src}: expected a tensor or a dict with 'loads', got "
                         f"{type(obj).__name__}")
    if obj.is_complex() or obj.dtype == torch.bool:
        raise ValueError(f"{src}: loads must be a numeric (int or float) tensor, got {obj.dtype}")
    if obj.is_nested or obj.is_quantized or obj.layout != torch.strided or obj.is_meta:
        raise ValueError(f"{src}: loads must be a plain dense tensor with data (not nested, "
                         f"quantized, sparse or on the meta device)")
    if obj.dtype.is_floating_point and obj.element_size() == 1:  # float8: no numpy dtype
        obj = obj.float()
    return obj, meta


def _read_sglang_dump(obj: dict, src: str):
    """SGLang's expert-distribution dump (``/dump_expert_distribution_record`` in its ``stat``
    mode: ``expert_distribution_recorder_<time>.pt``): ``logical_count`` [steps, layers, E], one
    window per forward step. SGLang dumps its whole ring of steps: the steps it never wrote are
    all zero and dropped (so they do not count as balanced windows); its rows are in ring
    order, time order only while the ring has not wrapped since its write position was 0
    (SGLang keeps the position across recording sessions;
    ``--expert-distribution-recorder-buffer-size -1`` keeps every step in order). SGLang counts
    every hidden layer, the dense ones too (all zero); those rows are dropped as well, so that
    the layers are the MoE layers, as ours and vllm-ascend's are counted
    (``meta['sglang_layers']``: the hidden-layer index of each kept row;
    ``meta['sglang_num_layers']``: the dump's layer count, ``meta['sglang_dropped_steps']``:
    the steps dropped). Both are said in a warning."""
    import torch

    counts = obj["logical_count"]
    if not isinstance(counts, torch.Tensor) or counts.dim() != 3:
        raise ValueError(f"{src}: SGLang dump's 'logical_count' must be a [steps, layers, "
                         f"experts] tensor, got {getattr(counts, 'shape', type(counts).__name__)}")
    if (counts.is_complex() or counts.dtype == torch.bool or counts.layout != torch.strided
            or counts.is_meta or counts.is_nested or counts.is_quantized):
        kind = ("meta" if counts.is_meta else "nested" if counts.is_nested
                else "quantized" if counts.is_quantized else str(counts.layout))
        raise ValueError(f"{src}: SGLang dump's 'logical_count' must be a dense numeric tensor "
                         f"holding its data, got {counts.dtype} ({kind})")
    meta = {"source": "SGLang expert distribution recorder (stat)",
            "sglang_num_layers": int(counts.shape[1]), "sglang_dropped_steps": 0}
    nonzero = counts != 0
    steps = nonzero.any(dim=2).any(dim=1)
    if 0 < int(steps.sum()) < counts.shape[0]:
        meta["sglang_dropped_steps"] = counts.shape[0] - int(steps.sum())
        logger.warning("%s: %d of the dump's %d steps counted nothing (SGLang's ring of steps, "
                       "not yet filled) and are dropped", src,
                       counts.shape[0] - int(steps.sum()), counts.shape[0])
        counts, nonzero = counts[steps], nonzero[steps]
    used = nonzero.any(dim=2).any(dim=0)
    kept = used.nonzero().view(-1).tolist()
    if 0 < len(kept) < counts.shape[1]:
        dropped = (~used).nonzero().view(-1).tolist()
        logger.warning("%s: %d of SGLang's %d layers counted no token in any step (dense "
                       "layers: %s) and are dropped; the trace's layers are its MoE layers "
                       "%s", src, len(dropped), counts.shape[1], _ranges(dropped), _ranges(kept))
        counts = counts[:, used]
        meta["sglang_layers"] = kept
    return counts, meta


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def _read_json(src: str):
    try:
        with open(src, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{src}: not valid JSON ({_short(e)})") from None
    except RecursionError:
        raise ValueError(f"{src}: JSON nested too deeply for a trace (loads are [W, L, E] or "
                         f"[L, E])") from None
    except ValueError as e:  # (an integer past Python's digit limit, say)
        raise ValueError(f"{src}: not a readable trace ({_short(e)})") from None
    meta: dict = {}
    if isinstance(doc, dict) and "loads" not in doc and "logical_count" in doc:
        return _read_sglang_counts(doc["logical_count"], src)
    if isinstance(doc, dict):
        if "loads" not in doc:
            raise ValueError(f"{src}: missing key 'loads' (keys: {sorted(doc)})")
        meta = doc.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{src}: 'meta' must be an object, got {type(meta).__name__}")
        doc = doc["loads"]
    if not isinstance(doc, list):
        raise ValueError(f"{src}: expected a nested list of loads or an object with 'loads', got "
                         f"{type(doc).__name__}")
    if not all_numbers(doc):
        raise ValueError(f"{src}: loads must contain only numbers (no strings, booleans, null)")
    return doc, meta


def _read_sglang_counts(counts, src: str):
    """SGLang's --init-expert-location file holding a load (``{"logical_count": ...}``,
    [hidden layers, E] or [steps, hidden layers, E], from which SGLang plans its start
    placement): read as its dumps are (one window a step, the dense layers' zero rows
    dropped; see _read_sglang_dump)."""
    import torch

    if not isinstance(counts, list) or not all_numbers(counts):
        raise ValueError(f"{src}: SGLang's 'logical_count' must be a nested list of numbers")
    try:
        a = np.asarray(counts, dtype=np.float64)
    except ValueError:
        raise ValueError(f"{src}: SGLang's 'logical_count' is ragged (rows of different "
                         f"lengths)") from None
    except OverflowError:  # (an int past float64's range)
        raise ValueError(f"{src}: SGLang's 'logical_count' holds a number past float64's "
                         f"range") from None
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or 0 in a.shape:
        raise ValueError(f"{src}: SGLang's 'logical_count' must be [layers, experts] or [steps, "
                         f"layers, experts], got shape {list(a.shape)}")
    loads, meta = _read_sglang_dump({"logical_count": torch.from_numpy(a)}, src)
    meta["source"] = "SGLang init_expert_location (logical_count)"
    return loads, meta
