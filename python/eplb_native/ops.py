"""Hot-path device ops: ``torch.ops.eplb_native.*`` (schemas in csrc/ops/registration.cpp).

Importing this module loads the native library, which registers the ops for every backend it
was built with (``built_backends()``), and registers the composite fallback below for every
other device (e.g. an NPU without the Ascend C kernels). ``backend_info()`` says which path
each op takes on each device.

Vocabulary: E logical experts, P physical slots (E + redundant), M = log2phy.size(1) replica
columns, T tokens, k routed experts per token (topk_ids is [T, k]; a 1-D topk_ids means k = 1).

Replica choice of ``map_and_record`` (identical on every backend):

* ``mode="spread"``: token t = i // k of flat id i goes to column ``t % c`` of its logical
  expert e's row, with ``c = clamp(logcnt[e], 1, M)``: consecutive tokens rotate over the
  replicas, deterministically (vLLM hashes the token index instead; either spreads, this one
  needs no hash). t restarts at 0 on every call, so a call of fewer tokens than c, or of a
  count not a multiple of c, favours the first columns. Where each rank maps its own tokens
  (all-to-all dispatch), rotating each rank's rows (``state.placement_tensors(...,
  rotate=True)``: row start at replica ``rank % c``) makes the ranks favour different replicas
  (decode: a few tokens per rank per step); where ranks map the same tokens (all-reduce EP, TP
  groups) the tables must be equal.
* ``mode="rank_local"``: ``log2phy`` is one 1-D [E] table chosen per rank (vllm-ascend style:
  each rank routes a logical expert to one replica, preferring its own); ``logcnt`` is unused.

Ids outside [0, E) map to -1 and are not counted; a table entry outside [0, P) is
returned as is and not counted, as long as it fits the ids' dtype (the output is
topk_ids' dtype: with int32 ids an int64 table's entries are cast, so one past 2^31 wraps;
slots of a real placement always fit). On CUDA one call takes fewer than
2^31 - 8192 ids (32-bit index math; more is a ValueError). Nothing here reads a device value on the host:
``record`` and ``num_valid_tokens`` are 0-dim device tensors read by the kernels, so the ops can
be captured in CUDA graphs / aclgraphs and replayed with recording switched on or off.
"""

from __future__ import annotations

import torch

from . import _ops
from ._util import plain_scalar

_INDEX_DTYPES = (torch.int32, torch.int64)
_OPS = ("map_and_record", "record_counts", "record_topk")


def built_backends() -> list[str]:
    """Native kernel families compiled into this build: ``"cpu"``, plus ``"cuda"`` /
    ``"ascendc"`` when the build had them."""
    return list(_ops.built_backends())


# ------------------------------------------------------------------ argument checks
# Metadata only (dtype, dim, shape, device): never a device read, so they add no host sync.


def _check_index(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    _check_dense(t, name)


def _check_dense(t: torch.Tensor, name: str) -> None:
    # (a sparse tensor passes the dispatcher to this fallback and failed inside torch, review 18)
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout}"
                        f"{' (nested)' if t.is_nested else ''}")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a's and b's elements overlap in memory (by extent: a strided view's gaps count)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
        spans = []
        for t in (a, b):
            start = t.data_ptr()
            last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
            spans.append((start, start + (last + 1) * t.element_size()))
    except RuntimeError:  # (no data to point at: a tensor being traced)
        return False
    return spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


def _check_device(t: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} (the device of topk_ids), got {t.device}")


def _check_load(load) -> None:
    _check_index(load, "load")
    if load.dim() != 1:
        raise ValueError(f"load must be 1-D [P], got shape {tuple(load.shape)}")
    if not load.is_contiguous():
        raise ValueError("load must be contiguous (it is updated in place)")


def _check_flags(record, num_valid_tokens, ids: torch.Tensor) -> None:
    if not isinstance(record, torch.Tensor):
        raise TypeError(f"record must be a 0-dim bool or integer tensor, got {type(record).__name__}")
    _check_dense(record, "record")
    if record.dtype.is_floating_point or record.dtype.is_complex:
        raise TypeError(f"record must be a bool or integer tensor, got {record.dtype}")
    if record.numel() != 1:
        raise ValueError(f"record must hold one element (a 0-dim tensor), got shape {tuple(record.shape)}")
    _check_device(record, ids, "record")
    if num_valid_tokens is not None:
        _check_index(num_valid_tokens, "num_valid_tokens")
        if num_valid_tokens.numel() != 1:
            raise ValueError(
                "num_valid_tokens must hold one element (a 0-dim tensor), got shape "
                f"{tuple(num_valid_tokens.shape)}"
            )
        _check_device(num_valid_tokens, ids, "num_valid_tokens")


def _check_map_and_record(topk_ids, log2phy, logcnt, load, record, num_valid_tokens, mode):
    if mode not in ("spread", "rank_local"):
        raise ValueError(f"mode must be 'spread' or 'rank_local', got {mode!r}")
    _check_index(topk_ids, "topk_ids")
    _check_index(log2phy, "log2phy")
    _check_load(load)
    _check_device(log2phy, topk_ids, "log2phy")
    _check_device(load, topk_ids, "load")
    _check_flags(record, num_valid_tokens, topk_ids)
    if mode == "spread":
        if log2phy.dim() != 2 or log2phy.shape[1] < 1:
            raise ValueError(
                f"log2phy must be 2-D [E, M] with M >= 1 in mode 'spread', got shape {tuple(log2phy.shape)}"
            )
        _check_index(logcnt, "logcnt")
        _check_device(logcnt, topk_ids, "logcnt")
        if logcnt.dim() != 1 or logcnt.shape[0] != log2phy.shape[0]:
            raise ValueError(
                f"logcnt must be 1-D [E] with E = log2phy.shape[0] = {log2phy.shape[0]}, got "
                f"shape {tuple(logcnt.shape)}"
            )
    else:
        if log2phy.dim() != 1:
            raise ValueError(
                f"log2phy must be 1-D [E] in mode 'rank_local', got shape {tuple(log2phy.shape)}"
            )
        # unused here, but a tensor argument all the same: one on another device (meta above
        # all) would pick another kernel
        if isinstance(logcnt, torch.Tensor):
            _check_device(logcnt, topk_ids, "logcnt")
        elif logcnt is not None:
            raise TypeError(f"logcnt must be a torch.Tensor or None, got {type(logcnt).__name__}")


def _check_record_counts(load, expert_tokens, group_list_type, offset):
    _check_load(load)
    _check_index(expert_tokens, "expert_tokens")
    if expert_tokens.device != load.device:
        raise ValueError(f"expert_tokens must be on {load.device} (the device of load), got {expert_tokens.device}")
    if expert_tokens.dim() != 1:
        raise ValueError(f"expert_tokens must be 1-D [n], got shape {tuple(expert_tokens.shape)}")
    if _shares_memory(load, expert_tokens):  # (some counts would be read already added to)
        raise ValueError("expert_tokens must not share memory with load (pass a copy)")
    group_list_type, offset = plain_scalar(group_list_type), plain_scalar(offset)
    if isinstance(group_list_type, bool) or not isinstance(group_list_type, int) or (
            group_list_type not in (0, 1)):
        raise ValueError(f"group_list_type must be the int 0 (cumulative) or 1 (counts), got {group_list_type!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if offset + expert_tokens.numel() > load.numel():
        raise ValueError(
            f"offset + len(expert_tokens) ({offset + expert_tokens.numel()}) must be <= "
            f"len(load) ({load.numel()})"
        )


# ------------------------------------------------------------------ public wrappers


def map_and_record(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor | None,
    load: torch.Tensor,
    record: torch.Tensor,
    num_valid_tokens: torch.Tensor | None = None,
    mode: str = "spread",
) -> torch.Tensor:
    """Maps logical expert ids to physical slots and, when ``record`` is set, counts them.

    Args:
        topk_ids: [T, k] (or [N], k = 1) int32/int64 logical expert ids, any layout.
        log2phy: int32/int64 physical slots of each logical expert: [E, M] (-1 padded) in mode
            "spread", [E] in mode "rank_local".
        logcnt: [E] int32/int64 replica counts (values clamped to [1, M]); unused (may be None)
            in mode "rank_local".
        load: [P] int32/int64 contiguous per-slot token counter, owned by the caller and updated
            in place (``load[slot] += 1`` per counted id).
        record: 0-dim bool/integer device tensor; nonzero = count. Read on the device.
        num_valid_tokens: optional 0-dim int32/int64 device tensor; ids of tokens
            ``t >= num_valid_tokens`` (padding) are mapped but not counted.
        mode: "spread" or "rank_local" (module docstring).

    Returns:
        A new contiguous tensor, shape and dtype of ``topk_ids``, owned by the caller: the
        physical slot of each id, -1 for ids outside [0, E). Ids whose slot lies outside [0, P)
        (e.g. a -1 table entry) are returned as is and not counted.

    All tensors must be on the device of ``topk_ids``. Raises TypeError / ValueError naming the
    argument on a wrong dtype, shape or device; the checks read metadata only (no host sync).
    Every implementation behind the op (native kernels, Meta, the composite fallback) runs the
    same checks, so this wrapper checks nothing on the hot path; an argument the op's schema
    rejects (not a tensor, a mode that is not a string) is re-checked here for a TypeError /
    ValueError naming it.
    """
    if logcnt is None:
        if mode == "spread":
            raise TypeError("logcnt is required in mode 'spread' ([E] int32/int64), got None")
        logcnt = log2phy  # unused placeholder: the schema takes a Tensor
    try:
        return torch.ops.eplb_native.map_and_record(
            topk_ids, log2phy, logcnt, load, record, num_valid_tokens, mode
        )
    except RuntimeError:
        _check_map_and_record(topk_ids, log2phy, logcnt, load, record, num_valid_tokens, mode)
        raise


def record_topk(
    load: torch.Tensor,
    topk_ids: torch.Tensor,
    record: torch.Tensor,
    num_valid_tokens: torch.Tensor | None = None,
) -> None:
    """Counts ids without remapping: ``load[topk_ids[i]] += 1`` when ``record`` is set.

    Args:
        load: [P] int32/int64 contiguous counter, updated in place (caller's memory).
        topk_ids: [T, k] (or [N]) int32/int64 ids in load's index space; ids outside [0, P)
            are skipped.
        record: 0-dim bool/integer device tensor; nonzero = count.
        num_valid_tokens: optional 0-dim int32/int64 device tensor; tokens past it are skipped.
    """
    try:
        torch.ops.eplb_native.record_topk(load, topk_ids, record, num_valid_tokens)
    except RuntimeError:  # the schema rejected an argument: name it (see map_and_record)
        _check_index(topk_ids, "topk_ids")
        _check_load(load)
        _check_device(load, topk_ids, "load")
        _check_flags(record, num_valid_tokens, topk_ids)
        raise


def record_counts(
    load: torch.Tensor,
    expert_tokens: torch.Tensor,
    group_list_type: int = 1,
    offset: int = 0,
) -> None:
    """Adds a dispatch's per-local-expert token counts into ``load[offset : offset + n]``.

    Args:
        load: [P] int32/int64 contiguous counter, updated in place (caller's memory).
        expert_tokens: [n] int32/int64 on load's device: per-expert counts
            (``group_list_type=1``) or their running sum (``group_list_type=0``), the two forms
            vllm-ascend's dispatch returns. Values are not checked (that would sync).
        group_list_type: 1 = counts, 0 = cumulative.
        offset: first slot of this rank's experts in ``load``; ``offset + n <= P``.
    """
    _check_record_counts(load, expert_tokens, group_list_type, offset)
    torch.ops.eplb_native.record_counts(load, expert_tokens, group_list_type, offset)


# ------------------------------------------------------------------ composite fallback
# Plain torch ops, used on every device that has no native kernel (registered below under
# CompositeExplicitAutograd, which any backend-specific kernel overrides). Same results as the
# native kernels; no host sync: the record flag and num_valid_tokens enter as tensors, the
# histogram is a fixed-size index_add_ (bincount would read its maximum on the host).


def _counted_mask(n: int, k: int, device, record, num_valid_tokens) -> torch.Tensor:
    mask = record.reshape(()).to(torch.bool).expand(n)
    if num_valid_tokens is not None:
        token = torch.arange(n, device=device) // k
        mask = mask & (token < num_valid_tokens.reshape(()))
    return mask


def _add_counts(load: torch.Tensor, slots: torch.Tensor, counted: torch.Tensor) -> None:
    P = load.numel()
    counted = counted & (slots >= 0) & (slots < P)
    bins = torch.where(counted, slots, torch.full_like(slots, P))  # bin P = not counted
    hist = torch.zeros(P + 1, dtype=load.dtype, device=load.device)
    hist.index_add_(0, bins, torch.ones_like(bins, dtype=load.dtype))
    load.add_(hist[:P])


def composite_map_and_record(topk_ids, log2phy, logcnt, load, record, num_valid_tokens=None,
                             mode="spread"):
    """``map_and_record`` from plain torch ops (the fallback; tests call it directly)."""
    _check_map_and_record(topk_ids, log2phy, logcnt, load, record, num_valid_tokens, mode)
    k = max(topk_ids.shape[-1], 1) if topk_ids.dim() >= 2 else 1
    ids = topk_ids.reshape(-1).to(torch.int64)
    n = ids.numel()
    E = log2phy.shape[0]
    if E == 0:  # no expert: every id is out of range (-1, not counted); no row to gather from
        return torch.full_like(topk_ids, -1, memory_format=torch.contiguous_format)
    in_range = (ids >= 0) & (ids < E)
    e = torch.where(in_range, ids, torch.zeros_like(ids))
    table = log2phy.to(torch.int64)
    if mode == "spread":
        M = table.shape[1]
        c = logcnt.to(torch.int64).clamp(1, M).index_select(0, e)
        token = torch.arange(n, device=ids.device) // k
        slots = table.reshape(-1).index_select(0, e * M + token % c)
    else:
        slots = table.index_select(0, e)
    # the returned ids (in topk_ids' dtype) are what is counted, as in the native kernels
    out = torch.where(in_range, slots, torch.full_like(slots, -1)).to(topk_ids.dtype)
    _add_counts(load, out.to(torch.int64), _counted_mask(n, k, ids.device, record,
                                                         num_valid_tokens))
    return out.reshape(topk_ids.shape)


def composite_record_topk(load, topk_ids, record, num_valid_tokens=None):
    """``record_topk`` from plain torch ops (the fallback)."""
    _check_index(topk_ids, "topk_ids")
    _check_load(load)
    _check_device(load, topk_ids, "load")
    _check_flags(record, num_valid_tokens, topk_ids)
    k = max(topk_ids.shape[-1], 1) if topk_ids.dim() >= 2 else 1
    slots = topk_ids.reshape(-1).to(torch.int64)
    _add_counts(load, slots, _counted_mask(slots.numel(), k, slots.device, record, num_valid_tokens))


def composite_record_counts(load, expert_tokens, group_list_type=1, offset=0):
    """``record_counts`` from plain torch ops (the fallback)."""
    _check_record_counts(load, expert_tokens, group_list_type, offset)
    counts = expert_tokens.to(torch.int64)
    if group_list_type == 0:
        counts = torch.diff(counts, prepend=counts.new_zeros(1))
    load.narrow(0, offset, counts.numel()).add_(counts.to(load.dtype))


_fallback = torch.library.Library("eplb_native", "IMPL")
_fallback.impl("map_and_record", composite_map_and_record, "CompositeExplicitAutograd")
_fallback.impl("record_topk", composite_record_topk, "CompositeExplicitAutograd")
_fallback.impl("record_counts", composite_record_counts, "CompositeExplicitAutograd")

# Dispatch keys of the native kernels, by device type.
_NATIVE_KEYS = {"cpu": ("CPU", "cpu"), "cuda": ("CUDA", "cuda"), "npu": ("PrivateUse1", "ascendc")}


def backend_info(devices: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Which implementation each op runs on each device type.

    Args:
        devices: device types to report ("cpu", "cuda", "npu"); default: "cpu" plus every
            accelerator torch sees now.

    Returns:
        ``{device: {op: path}}`` with path one of "cpu", "cuda", "ascendc" (a native kernel
        registered for that device's dispatch key) or "composite" (the plain-torch fallback).
        Which native kernels exist follows ``built_backends()`` and what registered at import.
    """
    if devices is None:
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices.append("cuda")
        npu = getattr(torch, "npu", None)
        if npu is not None and callable(getattr(npu, "is_available", None)) and npu.is_available():
            devices.append("npu")
    info = {}
    for device in devices:
        if device not in _NATIVE_KEYS:
            raise ValueError(f"devices must name 'cpu', 'cuda' or 'npu', got {device!r}")
        key, name = _NATIVE_KEYS[device]
        info[device] = {
            op: name
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"eplb_native::{op}", key)
            else "composite"
            for op in _OPS
        }
    return info


__all__ = [
    "backend_info",
    "built_backends",
    "composite_map_and_record",
    "composite_record_counts",
    "composite_record_topk",
    "map_and_record",
    "record_counts",
    "record_topk",
]
