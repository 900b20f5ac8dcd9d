"""The ``eplb-native`` command line: plan, synth, simulate, demo.

- ``plan``: a load file -> a placement, written as vllm-ascend's expert-map JSON.
- ``synth``: a synthetic drifting load trace of a real model shape (``traces.synth``).
- ``simulate``: replays a trace, rebalancing every K windows with several policies side by side,
  and judges each placement on the windows that come after it (out of sample).
- ``demo``: starts ranks, serves an EP MoE model with a drifting skewed gate and the updator
  attached, and shows the balancing happen.

Errors in what the user gave (bad files, shapes, counts) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings

import numpy as np

from . import expert_map, metrics, traces
from ._util import atomic_write, check_int, check_writable_dir, same_file, standard_stream
from .planner import MAX_THREADS, POLICIES, plan

EXIT_USAGE = 2

#: Largest count (--ranks, --nodes, --groups, slots per layer; --threads: the planner's 4096)
#: plan / simulate take:
#: 2048 x Kimi-K2's 512 slots, and small enough that a mistyped count is a one-line error rather
#: than a default placement built for hours or an integer overflow in the planner's binding.
MAX_COUNT = 1 << 20
#: Largest bytes per expert (--expert-bytes, a trace's meta): the planner's bound on counts;
#: a size beyond it is a mistake, and sums of it would overflow the float formatting
_MAX_BYTES = 1 << 62
#: demo on the CPU starts one process per rank.
MAX_DEMO_CPU_RANKS = 64
#: demo --seed bound (per-step generator seeds are derived from it by integer arithmetic)
MAX_SEED = (1 << 32) - 1
#: demo's gate bias is skew x a standard normal, in float32: beyond this the gate is one-hot
#: anyway, and near 1e38 the bias overflows to inf and the outputs turn NaN.
MAX_DEMO_SKEW = 1e6


class UsageError(ValueError):
    """A problem with what the user asked for; reported as one line, exit code 2."""


# --------------------------------------------------------------------------- shared helpers

#: Library parameter -> the flag that sets it, per command: errors raised by traces.synth and
#: planner.plan name their parameters; the user typed flags (``synth --tokens 0`` must say
#: ``--tokens``, not ``tokens_per_window``).
_SYNTH_FLAGS = {"num_windows": "--windows", "num_layers": "--layers",
                "num_experts": "--experts", "tokens_per_window": "--tokens", "top_k": "--top-k",
                "seed": "--seed", "sigma": "--sigma", "zipf_a": "--zipf-a", "drift": "--drift",
                "skew": "--skew"}
_PLAN_FLAGS = {"num_ranks": "--ranks", "num_nodes": "--nodes", "num_groups": "--groups",
               "threads": "--threads", "distinct_ranks": "distinct ranks (see --allow-repeats)",
               "num_replicas": "slots (experts + --redundant)"}
_SIMULATE_FLAGS = {**_PLAN_FLAGS, "distinct_ranks": "--distinct-ranks"}


@contextlib.contextmanager
def _flag_names(flags: dict[str, str], load: str | None = None):
    """Re-raises a ValueError / TypeError of the library call inside as a UsageError whose
    message names the command-line flags instead of the Python parameters in ``flags``; a
    message about the ``load`` parameter (it leads: "load: layer 0 sums to ...") names
    ``load``, the file it came from, instead (the word alone is too common to replace)."""
    try:
        yield
    except (ValueError, TypeError) as e:
        pattern = r"(?<![\w./-])(" + "|".join(map(re.escape, flags)) + r")(?![\w-])"
        text = re.sub(pattern, lambda m: flags[m.group(1)], str(e))
        if load is not None and text.startswith("load: "):
            text = f"{load}: {text[len('load: '):]}"
        raise UsageError(text) from None


def default_placement_layers(num_layers: int, num_experts: int, num_ranks: int,
                             num_redundant: int, layout: str = "vllm") -> np.ndarray:
    """A server's default placement (no expert map given), ``phy2log`` [L, P], the same for
    every layer. ``layout`` "vllm-ascend": logical experts in order in contiguous blocks per
    rank, redundant copies dealt round-robin from the last rank backwards, each holding the
    expert after the rank's last one; "vllm": experts 0 .. E-1 then copies of 0, 1, ... in slot
    order (see ``state.default_placement``). This is what a server runs before EPLB has
    planned."""
    from .state import default_placement

    return default_placement(num_experts, num_ranks, num_redundant, num_layers, layout=layout)


_LAYOUT_LABEL = {"vllm": "vLLM / vllm-ascend >= 0.24 default placement",
                 "vllm-ascend": "vllm-ascend <= 0.23 default placement"}


def _topology_label(num_nodes: int, num_groups: int) -> str:
    # DeepSeek EPLB's rule: hierarchical when groups divide evenly over nodes. One node puts no
    # constraint on where an expert goes: global (policy deepseek still orders the experts by
    # group load there, as DeepSeek's code does: that decides ties and, with one slot per rank,
    # which rank gets which expert).
    return "hierarchical" if num_groups % num_nodes == 0 and num_nodes > 1 else "global"


class Topology:
    """Ranks, nodes, groups and slots of a placement problem, resolved from flags and trace meta.

    Defaults when a flag is absent: the trace's meta (``synth`` records the model's deployment:
    num_groups, and num_nodes / num_redundant when the ranks match the deployment's), else
    nodes = groups = 1 and redundant = the smallest K >= ranks that makes experts + K divisible
    by ranks (about one redundant slot per rank, DeepSeek-V3's convention; 0 on one rank, where
    a copy balances nothing and would repeat an expert on the rank)."""

    def __init__(self, args, num_experts: int, meta: dict, num_slots: int | None = None):
        ranks = args.ranks
        if ranks is None or ranks < 1:
            raise UsageError(f"--ranks must be >= 1, got {ranks}")
        for flag, most in (("--ranks", MAX_COUNT), ("--threads", MAX_THREADS)):
            # (--nodes / --groups: below, with the meta's)
            v = getattr(args, flag[2:], None)
            if v is not None and v > most:
                raise UsageError(f"{flag} must be <= {most}, got {v}")
        same_deployment = meta.get("num_ranks") == ranks
        # Each value with the name an error gives it: the flag, or the trace's meta key it was
        # read from (not a flag nobody typed).
        groups, groups_name = ((args.groups, "--groups") if args.groups is not None
                               else (meta.get("num_groups", 1), "the trace's meta 'num_groups'"))
        nodes, nodes_name = ((args.nodes, "--nodes") if args.nodes is not None
                             else (meta.get("num_nodes", 1) if same_deployment else 1,
                                   "the trace's meta 'num_nodes'"))
        redundant_name = "--redundant"
        if num_slots is not None:
            redundant = num_slots - num_experts
            if args.redundant is not None and args.redundant != redundant:
                raise UsageError(f"--redundant {args.redundant} disagrees with the old placement "
                                 f"({num_slots} slots = {num_experts} experts + {redundant})")
        elif args.redundant is not None:
            redundant = args.redundant
        elif same_deployment and "num_redundant" in meta:
            redundant, redundant_name = meta["num_redundant"], "the trace's meta 'num_redundant'"
        elif ranks == 1:
            redundant = 0  # (a second copy on the one rank balances nothing)
        else:
            redundant = ranks + (-(num_experts + ranks)) % ranks
        try:
            nodes, groups = check_int(nodes, nodes_name, 1), check_int(groups, groups_name, 1)
            redundant = check_int(redundant, redundant_name, 0)
        except ValueError as e:
            raise UsageError(str(e)) from None
        for name, v in ((nodes_name, nodes), (groups_name, groups)):
            if v > MAX_COUNT:
                raise UsageError(f"{name} must be <= {MAX_COUNT}, got {v}")
        if num_experts + redundant > MAX_COUNT:
            raise UsageError(f"experts + redundant ({num_experts} + {redundant}) must be <= "
                             f"{MAX_COUNT} slots per layer; pick --ranks / --redundant "
                             f"accordingly")
        if (num_experts + redundant) % ranks:
            source = ("" if redundant_name == "--redundant" else
                      f" ({redundant} from {redundant_name}, for its deployment of {ranks} ranks)")
            raise UsageError(f"experts + redundant ({num_experts} + {redundant}) must be "
                             f"divisible by --ranks ({ranks}){source}; pick --redundant "
                             f"accordingly")
        self.num_ranks, self.num_nodes, self.num_groups = ranks, nodes, groups
        self.num_experts, self.num_redundant = num_experts, redundant
        self.num_slots = num_experts + redundant

    @property
    def label(self) -> str:
        return _topology_label(self.num_nodes, self.num_groups)

    def describe(self) -> str:
        return (f"{self.num_slots} slots ({self.num_experts} experts + {self.num_redundant} "
                f"redundant) on {self.num_ranks} ranks, {self.num_nodes} node(s), "
                f"{self.num_groups} group(s) -> {self.label}")

    def as_dict(self) -> dict:
        return {"num_ranks": self.num_ranks, "num_nodes": self.num_nodes,
                "num_groups": self.num_groups, "num_redundant": self.num_redundant,
                "num_slots": self.num_slots, "topology": self.label}


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(x.mean()), "min": float(x.min()), "max": float(x.max())}


def _fmt(v, width: int = 7, digits: int = 3) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_output_dir(path: str, flag: str, inputs: tuple = (), json_out: bool = False) -> None:
    """UsageError naming ``flag`` unless ``path`` can be written (checked before any work: a
    run whose output cannot be written is lost), is none of ``inputs`` ((path, flag) pairs:
    writing there would destroy the file the run reads) and, with ``json_out`` (--json), is not
    stdout (two documents in one stream are no JSON)."""
    if not path:
        raise UsageError(f"{flag}: empty path; name the file to write")
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a directory; name the file to write")
    try:
        check_writable_dir(path, flag)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if json_out and standard_stream(path) == 1 and not _is_devnull(path):
        raise UsageError(f"{flag} {path} is stdout, where --json prints the result: write the "
                         f"file elsewhere, or leave --json out")
    for source, source_flag in inputs:
        if source and same_file(path, source):
            raise UsageError(f"{flag} {path} is the {source_flag} file; writing it would "
                             f"destroy what this run reads: choose another path")


def _check_memory(need: int, sizes: str, what: str, advice: str) -> None:
    """UsageError when ``need`` bytes (``what``, for the flags in ``sizes``) exceed half of this
    machine's memory: refused before the allocation, not by numpy or the OOM killer after."""
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise UsageError(f"{sizes} need about {need / 2**30:.1f} GiB{what}, over half of this "
                         f"machine's {have / 2**30:.1f} GiB; {advice}")


def _default_png(args, name: str) -> str | None:
    """--png as given; unset, ``name`` in the working directory, or none with --json (a
    machine's run writes no file it did not name)."""
    if args.png is not None:
        return args.png
    return None if args.json else name


def _is_devnull(path: str) -> bool:
    """Whether ``path`` is the null device (stdout there, or closed and replaced by it: the map
    and --json's result both go nowhere, no clash)."""
    try:
        return os.path.samefile(path, os.devnull)
    except (OSError, ValueError):
        return False


def _short(v, width: int = 40) -> str:
    """repr of a user's value cut to ``width`` characters (a 4,000-digit int stays one line)."""
    try:
        text = repr(v)
    except ValueError:  # (an int past Python's digit limit for str())
        text = f"an int of about {int(v.bit_length() * 0.30103)} digits"
    return text if len(text) <= width else text[:width - 3] + "..."


def _write_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1, allow_nan=False)
    sys.stdout.write("\n")


def _clean(x):
    """NaN -> None so the JSON output is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


# --------------------------------------------------------------------------- plan


def cmd_plan(args) -> int:
    # the output first, before any work (-o may be --old: a map updated in place, read before
    # it is written)
    _check_output_dir(args.output, "-o", ((args.load, "--load"),), args.json)
    suffix = os.path.splitext(args.output)[1].lower()
    if suffix in (".npz", ".npy", ".pt"):
        # (vllm-ascend reads only *.json maps; a trace's name here is a slip)
        raise UsageError(f"-o {args.output}: plan writes an expert map (JSON); name it *.json")
    sglang = args.format == "sglang"
    if sglang and not args.output.endswith(".json") and (not os.path.exists(args.output)
                                                         or os.path.isfile(args.output)):
        # (SGLang reads --init-expert-location as a path only for *.json / *.pt, case and all;
        # any other value it parses as JSON text)
        raise UsageError(f"-o {args.output}: SGLang reads --init-expert-location as a file only "
                         f"when its name ends in .json; name it *.json")
    if sglang and args.default_layout != "vllm":
        raise UsageError(f"--default-layout {args.default_layout} with --format sglang: SGLang "
                         f"starts from its trivial placement, which is --default-layout vllm")
    if args.hidden_layers is not None and not sglang:
        raise UsageError("--hidden-layers is for --format sglang (SGLang's file has a row per "
                         "hidden layer; vllm-ascend's map one per MoE layer)")
    loads, meta = traces.load_trace(args.load)
    num_windows, num_layers, num_experts = loads.shape
    # A trace's windows are summed: EPLB plans from the loads accumulated over its window
    # (vLLM window_size, vllm-ascend heat interval), and the sum weighs every window by its
    # traffic. --window last plans from the most recent window only.
    try:
        load = traces.sum_windows(loads) if args.window == "sum" else loads[-1]
    except ValueError as e:
        raise ValueError(f"--load {args.load}: {e}") from None
    moe_layers, hidden_layers = _sglang_rows(args, meta, num_layers)
    old = None
    if args.old is not None:
        if not args.old:
            raise UsageError("--old: empty path; name the current expert map, or leave --old "
                             "out to start from the default placement")
        # ids, layers, experts and ranks checked by the one loader (an SGLang file, which
        # says no ranks, takes --ranks)
        old, args.ranks = expert_map.load(args.old, num_logical=num_experts,
                                          num_layers=num_layers, num_ranks=args.ranks,
                                          moe_layers=moe_layers, name="--old",
                                          ranks_name="--ranks",
                                          num_hidden_layers=hidden_layers if sglang else None)
    if args.ranks is None:
        raise UsageError("--ranks is required (or give --old)")
    topo = Topology(args, num_experts, meta, None if old is None else old.shape[1])
    default = default_placement_layers(num_layers, num_experts, topo.num_ranks,
                                       topo.num_redundant,
                                       args.default_layout) if old is None else None
    before_placement = old if old is not None else default
    # min_move changes as little as it can of a current placement; without --old that is the
    # default placement a server starts from.
    start = old if old is not None else (default if args.policy == "min_move" else None)
    # vllm-ascend's reader serves one slot per expert and rank; SGLang serves repeats
    distinct = not args.allow_repeats and not sglang
    t0 = time.perf_counter()
    with _flag_names(_PLAN_FLAGS, load=f"--load {args.load}" + (
            " (its windows summed)" if args.window == "sum" and num_windows > 1 else "")):
        p = plan(load, start, num_ranks=topo.num_ranks, num_replicas=topo.num_slots,
                 num_nodes=topo.num_nodes, num_groups=topo.num_groups, policy=args.policy,
                 threads=args.threads, distinct_ranks=distinct or None)
    plan_ms = (time.perf_counter() - t0) * 1e3
    before = metrics.balancedness(load, before_placement, topo.num_ranks)
    after, bound = p.balancedness_after, p.balancedness_bound
    if sglang:
        expert_map.save_sglang(args.output, p.phy2log, num_experts,
                               num_hidden_layers=hidden_layers, moe_layers=moe_layers)
    else:
        expert_map.save(args.output, p.phy2log, topo.num_ranks, warn=False)  # (noted below)

    before_label = "--old placement" if old is not None else _LAYOUT_LABEL[args.default_layout]
    result = {
        "load": os.fspath(args.load), "windows": num_windows, "planned_from": args.window,
        "num_layers": num_layers, "num_experts": num_experts, **topo.as_dict(),
        "policy": args.policy, "distinct_ranks": distinct, "format": args.format,
        "hidden_layers": hidden_layers if sglang else None,
        "before_placement": before_label,
        "default_layout": args.default_layout if old is None else None,
        "balancedness_before": _stats(before), "balancedness_after": _stats(after),
        "balancedness_bound": _stats(bound),
        "moved_slots": int(p.total_moved_slots) if start is not None else None,
        "plan_ms": plan_ms, "output": os.fspath(args.output),
        # ranks holding an expert twice: vllm-ascend's reader serves one slot per expert and rank
        "repeated_on_a_rank": len(expert_map.repeated_on_a_rank(p.phy2log, topo.num_ranks)),
        "per_layer": {"before": before.tolist(), "after": after.tolist(),
                      "bound": bound.tolist(),
                      # without a start placement nothing was compared: no count per layer
                      "moved_slots": p.moved_slots.tolist() if start is not None else None},
    }
    if args.json:
        _write_json(_clean(result))
        return 0
    what = (f"{num_windows} windows summed" if args.window == "sum" and num_windows > 1
            else "last window" if num_windows > 1 else "1 window")
    print(f"load: {args.load} ({what}), {num_layers} layers x {num_experts} experts")
    print(f"placement: {topo.describe()}; policy {args.policy}")
    print(f"balancedness over {num_layers} layers (mean / max rank load; 1.0 is perfect):")
    print(f"  {'':<8}{'mean':>7} {'min':>7} {'max':>7}")
    for name, vals, note in (("before", before, f"({before_label})"), ("after", after, ""),
                             ("bound", bound, "(no placement of these slots does better)")):
        s = _stats(vals)
        print(f"  {name:<8}{_fmt(s['mean'])} {_fmt(s['min'])} {_fmt(s['max'])}  {note}".rstrip())
    if args.per_layer:
        print(f"  {'layer':>5} {'before':>7} {'after':>7} {'bound':>7} {'moved':>6}")
        for layer in range(num_layers):
            moved = int(p.moved_slots[layer]) if start is not None else "-"
            print(f"  {layer:>5} {before[layer]:>7.3f} {after[layer]:>7.3f} {bound[layer]:>7.3f} "
                  f"{moved:>6}")
    if start is not None:
        print(f"moved slots: {p.total_moved_slots} of {num_layers * topo.num_slots}")
    print(f"plan time: {plan_ms:.1f} ms")
    if sglang:
        dense = hidden_layers - num_layers
        print(f"wrote {args.output} (SGLang --init-expert-location: {hidden_layers} hidden "
              f"layers{f', {dense} dense with the trivial placement' if dense else ''}; run "
              f"with --ep-num-redundant-experts {topo.num_redundant} and {topo.num_ranks} EP "
              f"ranks)")
    else:
        print(f"wrote {args.output}")
    if result["repeated_on_a_rank"] and not sglang:
        print(f"note: {result['repeated_on_a_rank']} (layer, rank) pairs hold an expert twice "
              "(--allow-repeats); eplb_native and vLLM serve them, vllm-ascend's expert-map "
              "reader maps one slot per expert and rank (docs/integrations.md)")
    return 0


def _sglang_rows(args, meta: dict, num_layers: int) -> tuple[list[int] | None, int | None]:
    """(the hidden-layer row of each MoE layer or None = the last ones, the hidden-layer
    count) of an SGLang placement file: an SGLang dump's own (its dense layers were dropped
    from the trace), else --hidden-layers, else the model's of a synth trace (None, None
    without --format sglang). SGLang finds a layer's row by its hidden-layer index: a file of
    one row per MoE layer would shift every layer of a model with dense layers, so with none of
    these the count is asked for. Without --format sglang: (the dump's rows or None, None), for
    an SGLang file read as --old.)"""
    dump_layers, kept = meta.get("sglang_num_layers"), meta.get("sglang_layers")
    if dump_layers is not None:  # (an SGLang dump's: checked, as any meta is)
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if kept is None:  # (no layer dropped: one row per layer)
            fits = is_int(dump_layers) and dump_layers == num_layers
        else:  # (the hidden-layer index of each row, increasing, inside the count)
            fits = (is_int(dump_layers) and isinstance(kept, list) and len(kept) == num_layers
                    and all(map(is_int, kept)) and kept == sorted(set(kept))
                    and 0 <= kept[0] and kept[-1] < dump_layers)
        if not fits:
            raise UsageError(f"--load {args.load}: the trace's meta 'sglang_num_layers' / "
                             f"'sglang_layers' ({_short(dump_layers)} / {_short(kept)}) do not "
                             f"describe its {num_layers} layers")
    if args.format != "sglang":  # (an SGLang file given as --old has the dump's rows)
        return (None if dump_layers is None else kept or list(range(dump_layers))), None
    shape = traces.MODEL_SHAPES.get(meta.get("shape")) if isinstance(
        meta.get("shape"), str) else None
    model = (shape.num_hidden_layers if shape is not None and shape.num_layers == num_layers
             and shape.num_hidden_layers else None)
    if args.hidden_layers is not None:
        if args.hidden_layers > expert_map.MAX_HIDDEN_LAYERS:
            raise UsageError(f"--hidden-layers must be <= {expert_map.MAX_HIDDEN_LAYERS}, got "
                             f"{args.hidden_layers}")
        if args.hidden_layers < num_layers:
            raise UsageError(f"--hidden-layers {args.hidden_layers} is fewer than the trace's "
                             f"{num_layers} MoE layers")
        for count, what in ((dump_layers, f"the SGLang dump --load {args.load}, which counts"),
                            (model, f"the trace's model ({meta.get('shape')}), which has")):
            if count is not None and args.hidden_layers != count:
                raise UsageError(f"--hidden-layers {args.hidden_layers} disagrees with {what} "
                                 f"{count} layers")
    if dump_layers is not None:
        return (list(range(dump_layers)) if kept is None else kept), dump_layers
    if args.hidden_layers is not None:
        return None, args.hidden_layers
    if model is not None:
        return None, model
    raise UsageError(f"--format sglang needs --hidden-layers (the model's num_hidden_layers; "
                     f"SGLang's file has a row for each, the dense layers' too): --load "
                     f"{args.load} is neither an SGLang dump nor a synth trace of a known model")


# --------------------------------------------------------------------------- synth


def cmd_synth(args) -> int:
    shape = traces.MODEL_SHAPES.get(args.shape)
    if shape is None and (args.layers is None or args.experts is None):
        raise UsageError("--shape custom needs --layers and --experts")
    layers = args.layers if args.layers is not None else shape.num_layers
    experts = args.experts if args.experts is not None else shape.num_experts
    if args.top_k is not None:
        top_k = args.top_k
    else:  # the model's; else 8, or every expert where there are fewer
        top_k = min(shape.top_k if shape else 8, experts) if experts >= 1 else 8
    if not args.output.lower().endswith(".npz"):
        raise UsageError(f"-o {args.output}: synth writes an .npz trace; name it *.npz")
    for flag, v in (("--windows", args.windows), ("--layers", layers), ("--experts", experts)):
        if v is not None and v > MAX_COUNT:
            raise UsageError(f"{flag} must be <= {MAX_COUNT}, got {v}")
    if args.windows >= 1 and layers >= 1 and experts >= 1:
        # the int64 loads and the float64 draws beside them: 16 bytes a count
        _check_memory(16 * args.windows * layers * experts,
                      f"--windows {args.windows} x --layers {layers} x --experts {experts}", "",
                      "choose smaller sizes")
    _check_output_dir(args.output, "-o")
    with _flag_names(_SYNTH_FLAGS):
        loads = traces.synth(args.windows, layers, experts, skew=args.skew, sigma=args.sigma,
                             zipf_a=args.zipf_a, drift=args.drift,
                             tokens_per_window=args.tokens, top_k=top_k, seed=args.seed)
    meta = {"shape": args.shape, "skew": args.skew, "sigma": args.sigma, "zipf_a": args.zipf_a,
            "drift": args.drift, "tokens_per_window": args.tokens, "top_k": top_k,
            "seed": args.seed, "generator": "eplb_native.traces.synth"}
    if shape is not None and experts == shape.num_experts:
        # the deployment, so plan / simulate default to it (model facts + a typical EP setup)
        meta.update(num_groups=shape.num_groups, num_ranks=shape.num_ranks,
                    num_nodes=shape.num_nodes, num_redundant=shape.num_redundant,
                    expert_bytes=shape.expert_bytes)
    traces.save_trace(args.output, loads, **meta)
    print(f"wrote {args.output}: {args.windows} windows x {layers} layers x {experts} experts "
          f"({args.shape}, {args.skew}, drift {args.drift}, seed {args.seed}, "
          f"{os.path.getsize(args.output)} bytes)")
    return 0


# --------------------------------------------------------------------------- simulate


def simulate(loads: np.ndarray, topo: Topology, policies: list[str], every: int,
             threads: int = 1, distinct_ranks: bool | None = None,
             default_layout: str = "vllm") -> dict:
    """Replays ``loads`` [W, L, E]: every ``every`` windows, each policy plans from the sum of
    the ``every`` windows just served, starting from its own current placement, and the new
    placement serves the next windows. Windows 0 .. every-1 run on vllm-ascend's default
    placement (``default_layout``, the same for every policy) and are not counted.
    ``distinct_ranks`` is passed to every plan.

    Returns per policy: ``out_of_sample`` [W] per-window balancedness (mean over layers) of the
    placement in use, planned before that window (NaN for the first ``every`` windows);
    ``in_sample`` [rebalances] mean balancedness on the windows each plan was made from;
    ``moved_slots`` per rebalance; ``plan_ms`` per rebalance. Key ``"static"``: the default
    placement kept for the whole trace (no EPLB)."""
    num_windows, num_layers, num_experts = loads.shape
    if num_windows <= every:
        raise UsageError(f"the trace has {num_windows} window(s); --every {every} needs more than "
                         f"{every} to judge any plan out of sample")
    default = default_placement_layers(num_layers, num_experts, topo.num_ranks,
                                       topo.num_redundant, default_layout)
    static = np.array([metrics.balancedness(loads[w], default, topo.num_ranks).mean()
                       for w in range(num_windows)])
    out = {"static": {"out_of_sample": static, "in_sample": np.array([]),
                      "moved_slots": np.array([], dtype=np.int64), "plan_ms": np.array([])}}
    for policy in policies:
        placement = default
        per_window = np.full(num_windows, np.nan)
        in_sample, moved, plan_ms = [], [], []
        for w in range(num_windows):
            if w >= every and w % every == 0:
                window = traces.sum_windows(loads[w - every:w])
                t0 = time.perf_counter()
                span = (f"the trace's window {w - 1}" if every == 1 else
                        f"the trace's windows {w - every}-{w - 1} summed")
                with _flag_names(_SIMULATE_FLAGS, load=span):
                    p = plan(window, placement, num_ranks=topo.num_ranks,
                             num_nodes=topo.num_nodes, num_groups=topo.num_groups,
                             policy=policy, threads=threads, distinct_ranks=distinct_ranks)
                plan_ms.append((time.perf_counter() - t0) * 1e3)
                in_sample.append(float(p.balancedness_after.mean()))
                moved.append(p.total_moved_slots)
                placement = p.phy2log
            if w >= every:
                per_window[w] = metrics.balancedness(loads[w], placement, topo.num_ranks).mean()
        out[policy] = {"out_of_sample": per_window, "in_sample": np.array(in_sample),
                       "moved_slots": np.array(moved, dtype=np.int64),
                       "plan_ms": np.array(plan_ms)}
    return out


def _plot_simulation(path: str, runs: dict, every: int, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, run in runs.items():
        series = run["out_of_sample"]
        style = {"color": "0.5", "linestyle": "--"} if name == "static" else {}
        label = "no EPLB (default placement)" if name == "static" else name
        ax.plot(np.arange(series.size), series, marker=".", label=label, **style)
    ax.axvline(every - 0.5, color="0.8", linewidth=1)
    ax.set_xlabel("window")
    ax.set_ylabel("balancedness (mean over layers; out of sample)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:  # a failed write leaves no truncated PNG
        fig.savefig(f, format="png")
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("writing the PNG needs matplotlib: pip install 'eplb_native[cli]' "
                         "(or pass --no-png)") from None
    matplotlib.use("Agg")  # headless: no display on servers / CI
    import matplotlib.pyplot as plt

    return plt


def _window_steps(trace, meta: dict, num_windows: int, every: int) -> list[int] | None:
    """The trace meta's ``window_steps`` (an Updator's save_trace writes them): the steps of
    load in each window, one non-negative int per window, the windows judged (after the first
    ``every``) not all 0; None when the meta has none."""
    steps = meta.get("window_steps")
    if steps is None:
        return None
    if not traces.window_steps_ok(steps, num_windows):
        raise UsageError(f"{trace}: meta 'window_steps' must be a list of {num_windows} ints in "
                         f"[0, 2**62] (one per window), got {_short(steps)}")
    if num_windows > every and not any(steps[every:]):
        raise UsageError(f"{trace}: meta 'window_steps' gives the windows judged (after the "
                         f"first {every}) no steps: {_short(steps)}")
    return steps


def cmd_simulate(args) -> int:
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if not policies or any(p not in POLICIES for p in policies):
        raise UsageError(f"--policy must be a comma-separated list of {sorted(POLICIES)}, got "
                         f"{args.policy!r}")
    if len(set(policies)) != len(policies):
        raise UsageError(f"--policy lists a policy twice: {args.policy!r}")
    if args.every < 1:
        raise UsageError(f"--every must be >= 1, got {args.every}")
    if args.expert_bytes is not None and not 0 <= args.expert_bytes <= _MAX_BYTES:
        raise UsageError(f"--expert-bytes must be in [0, 2**62], got "
                         f"{_short(args.expert_bytes)}")
    loads, meta = traces.load_trace(args.trace)
    num_windows, num_layers, num_experts = loads.shape
    topo = Topology(args, num_experts, meta)
    png = None if args.no_png else _default_png(args, "simulate.png")
    if png:
        _check_output_dir(png, "--png", ((args.trace, "--trace"),), args.json)
        _pyplot()  # fail before the simulation if matplotlib is missing, not after it
    expert_bytes = args.expert_bytes if args.expert_bytes is not None else meta.get(
        "expert_bytes")
    if expert_bytes is not None and (isinstance(expert_bytes, bool) or
                                     not isinstance(expert_bytes, int) or
                                     not 0 <= expert_bytes <= _MAX_BYTES):
        raise UsageError(f"{args.trace}: meta 'expert_bytes' must be an int in [0, 2**62], got "
                         f"{_short(expert_bytes)} (or pass --expert-bytes)")
    steps = _window_steps(args.trace, meta, num_windows, args.every)
    runs = simulate(loads, topo, policies, args.every, threads=args.threads,
                    distinct_ranks=True if args.distinct_ranks else None,
                    default_layout=args.default_layout)

    # a window summing more steps of load weighs more (an Updator's trace: the first window
    # is shorter under first_plan_after, or, sliding, until the window has filled); a window
    # of no steps is not in the mean, nor its min, nor counted as judged
    weights = None if steps is None else np.asarray(steps[args.every:], dtype=np.float64)
    judged = slice(None) if weights is None else weights > 0
    summary = {}
    for name, run in runs.items():
        oos = run["out_of_sample"][args.every:]
        moved = int(run["moved_slots"].sum())
        summary[name] = {
            "out_of_sample": {"mean": float(np.average(oos, weights=weights)),
                              "min": float(oos[judged].min()),
                              "per_window": run["out_of_sample"].tolist()},
            "in_sample": ({"mean": float(run["in_sample"].mean()),
                           "min": float(run["in_sample"].min())}
                          if run["in_sample"].size else None),
            "rebalances": int(run["moved_slots"].size),
            "moved_slots": moved,
            "moved_slots_per_rebalance": run["moved_slots"].tolist(),
            "moved_bytes": None if expert_bytes is None else moved * int(expert_bytes),
            "plan_ms_mean": float(run["plan_ms"].mean()) if run["plan_ms"].size else None,
        }
    if png:
        _plot_simulation(png, runs, args.every,
                         f"{os.path.basename(args.trace)}: {num_layers} x {num_experts}, "
                         f"{topo.num_slots} slots on {topo.num_ranks} ranks, every {args.every}")
    result = {"trace": os.fspath(args.trace), "windows": num_windows, "num_layers": num_layers,
              "num_experts": num_experts, **topo.as_dict(), "every": args.every,
              # (what the plans ran with: None is balanced's preference, plan's default)
              "distinct_ranks": True if args.distinct_ranks else None,
              "default_layout": args.default_layout,
              "expert_bytes": expert_bytes,
              "judged_windows": (num_windows - args.every if steps is None else
                                 sum(1 for n in steps[args.every:] if n)),
              # the trace meta's steps per window, which weigh the out-of-sample mean (None:
              # every window alike)
              "window_steps": steps,
              "policies": summary, "png": png}
    if args.json:
        _write_json(_clean(result))
        return 0
    print(f"trace: {args.trace}, {num_windows} windows x {num_layers} layers x {num_experts} "
          f"experts")
    print(f"placement: {topo.describe()}; rebalance every {args.every} window(s) from the "
          f"windows just served" + ("; no rank holds an expert twice" if args.distinct_ranks
                                    else ""))
    print(f"balancedness = mean over layers of mean / max rank load; out of sample = each of "
          f"the {num_windows - args.every} windows after the first plan, on the placement "
          f"planned before it" + ("" if steps is None else
                                  ", the mean weighted by the steps of load each window "
                                  "sums (trace meta window_steps)"))
    head = (f"{'policy':<10} {'out mean':>8} {'out min':>8} {'in mean':>8} {'moved slots':>12} "
            f"{'moved bytes':>12} {'plan ms':>8}")
    print(head)
    print("-" * len(head))
    for name, s in summary.items():
        label = "no EPLB" if name == "static" else name
        ins = s["in_sample"]["mean"] if s["in_sample"] else None
        print(f"{label:<10} {_fmt(s['out_of_sample']['mean'], 8)} "
              f"{_fmt(s['out_of_sample']['min'], 8)} {_fmt(ins, 8)} {s['moved_slots']:>12} "
              f"{_fmt_bytes(s['moved_bytes']):>12} {_fmt(s['plan_ms_mean'], 8, 1)}")
    if expert_bytes is None:
        print("moved bytes unknown: pass --expert-bytes (bytes of one expert's weights)")
    else:
        print("moved bytes = moved slots x expert bytes, an upper bound on the bytes sent: a "
              "slot refilled from a copy its rank already holds is a local copy")
    if png:
        print(f"wrote {png}")
    return 0


# --------------------------------------------------------------------------- demo


def _demo_backend(device: str) -> str:
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device]


def _check_demo_args(args) -> None:
    for flag, v, lo in (("--ranks", args.ranks, 1), ("--layers", args.layers, 1),
                        ("--experts", args.experts, 1), ("--redundant", args.redundant, 0),
                        ("--top-k", args.top_k, 1), ("--steps", args.steps, 1),
                        ("--interval", args.interval, 1), ("--tokens", args.tokens, 1),
                        ("--hidden", args.hidden, 1), ("--layers-per-step",
                                                       args.layers_per_step, 1),
                        ("--seed", args.seed, 0)):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
        if flag != "--seed" and v > MAX_COUNT:
            raise UsageError(f"{flag} must be <= {MAX_COUNT}, got {v}")
    if args.seed > MAX_SEED:
        raise UsageError(f"--seed must be <= {MAX_SEED}, got {args.seed}")
    if args.device == "cpu" and args.ranks > MAX_DEMO_CPU_RANKS:
        raise UsageError(f"--ranks on --device cpu must be <= {MAX_DEMO_CPU_RANKS} (one process "
                         f"per rank), got {args.ranks}")
    if args.top_k > args.experts:
        raise UsageError(f"--top-k ({args.top_k}) must be <= --experts ({args.experts})")
    # every rank (a process) holds the gate's bias for every step, [steps, L, E] fp32, in host
    # memory whatever the device
    bias = 4 * args.steps * args.layers * args.experts * args.ranks
    _check_memory(bias, f"--steps {args.steps} x --layers {args.layers} x --experts "
                  f"{args.experts} over --ranks {args.ranks}", " of gate biases (fp32 per step, "
                  "layer and expert on every rank)", "choose fewer steps")
    if args.device == "cpu":
        # every rank holds two stacks (EPLB on and off) of its slots' fp32 weights, 3 H x H each
        slots = -(-(args.experts + args.redundant) // args.ranks)
        need = 2 * args.layers * slots * 3 * args.hidden * args.hidden * 4 * args.ranks
        _check_memory(need + bias, f"--hidden {args.hidden}, --experts {args.experts}, "
                      f"--layers {args.layers} over --ranks {args.ranks}",
                      " of expert weights and gate biases", "choose smaller sizes")
    if (args.experts + args.redundant) % args.ranks:
        raise UsageError(f"--experts + --redundant ({args.experts} + {args.redundant}) must be "
                         f"divisible by --ranks ({args.ranks})")
    if not 0.0 <= args.drift <= 1.0:
        raise UsageError(f"--drift must lie in [0, 1], got {args.drift}")
    if not 0.0 <= args.skew <= MAX_DEMO_SKEW:
        raise UsageError(f"--skew must lie in [0, {MAX_DEMO_SKEW:g}], got {args.skew}")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.ranks:
            raise UsageError(f"--device cuda needs {args.ranks} GPUs (one per rank), found "
                             f"{torch.cuda.device_count()}")
    if args.device == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            raise UsageError("--device npu needs torch_npu (Ascend)") from None
        import torch

        if torch.npu.device_count() < args.ranks:
            raise UsageError(f"--device npu needs {args.ranks} NPUs (one per rank), found "
                             f"{torch.npu.device_count()}")


def _gate_biases(args) -> np.ndarray:
    """The skewed gate's drifting bias, [steps, L, E] float32, identical on every rank: per
    layer a latent score z per expert takes an AR(1) step each forward (``traces.synth``'s
    drift, per step), and the bias is ``skew * z``, so a few experts are hot and which ones
    changes gradually."""
    rng = np.random.default_rng(args.seed)
    keep, fresh = math.sqrt(1.0 - args.drift), math.sqrt(args.drift)
    z = rng.standard_normal((args.layers, args.experts))
    out = np.empty((args.steps, args.layers, args.experts), dtype=np.float32)
    for step in range(args.steps):
        if step:
            z = keep * z + fresh * rng.standard_normal(z.shape)
        out[step] = args.skew * z
    return out


def _demo_rank(rank: int, args, init_method: str, result_path: str) -> None:
    """One rank of ``eplb-native demo`` (spawned): two identical EPMoE stacks, one with the
    updator attached (EPLB on), one without (EPLB off), on the same inputs every step."""
    import datetime

    import torch
    import torch.distributed as dist

    import eplb_native
    from eplb_native.nn import EPMoE

    torch.set_num_threads(1)  # ranks share the host's cores
    # torch 2.13 deprecates all_gather_into_tensor (used by the updator) with a FutureWarning per
    # rank; it says nothing about the demo
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated",
                            category=FutureWarning)
    backend = _demo_backend(args.device)
    if args.device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    elif args.device == "npu":
        import torch_npu  # noqa: F401

        torch.npu.set_device(rank)
        device = torch.device("npu", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=init_method, rank=rank,
                            world_size=args.ranks, timeout=datetime.timedelta(seconds=300))
    group = dist.group.WORLD
    cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo")

    def stack():
        return torch.nn.ModuleList([
            EPMoE(args.hidden, args.hidden, args.experts, args.top_k, group=group,
                  num_redundant_experts=args.redundant, seed=1000 + i, device=device)
            for i in range(args.layers)])

    def forward(layers, x):
        # pre-norm residual blocks, so activations stay O(1) over many layers
        for layer in layers:
            x = x + layer(torch.nn.functional.rms_norm(x, (x.shape[-1],)))
        return x

    model, reference = stack(), stack()
    config = {"dynamic_eplb": True, "num_redundant_experts": args.redundant,
              "expert_heat_collection_interval": args.interval,
              "algorithm_execution_interval": 1, "layers_per_step": args.layers_per_step,
              "policy": args.policy, "transfer_timeout_s": 60.0}
    # hooks=False: this loop drives the steps, so it can read each step's load before the
    # updator folds it (for the live, per-step balancedness)
    updator = eplb_native.attach(model, config, group, hooks=False)
    updator.warm_up()
    biases = torch.from_numpy(_gate_biases(args))
    num_slots = args.experts + args.redundant
    per_step = {"on": np.zeros((args.steps, args.layers)), "off": np.zeros((args.steps,
                                                                            args.layers))}
    bitwise, max_diff, close = True, 0.0, True
    show = rank == 0 and not args.json
    tty = sys.stderr.isatty()
    t_start = time.perf_counter()
    for step in range(args.steps):
        for layers in (model, reference):
            for layer, bias in zip(layers, biases[step], strict=True):
                layer.gate_bias.copy_(bias.to(device))
        gen = torch.Generator().manual_seed(args.seed * 100003 + step * 1009 + rank)
        x = torch.randn(args.tokens, args.hidden, generator=gen).to(device)
        updator.forward_before()
        y = forward(model, x)
        y_ref = forward(reference, x)
        # tokens each rank's slots received this step, summed over senders: [L, P] -> [L, R]
        loads = torch.stack([torch.stack([layer.load for layer in layers]).to(torch.int64)
                             for layers in (model, reference)]).cpu()
        for layer in reference:
            layer.load.zero_()  # nobody folds the EPLB-off stack's counts
        dist.all_reduce(loads, group=cpu_group)
        rank_tokens = loads.view(2, args.layers, args.ranks, -1).sum(-1).numpy()
        per_step["on"][step] = metrics.measured_balancedness(rank_tokens[0])
        per_step["off"][step] = metrics.measured_balancedness(rank_tokens[1])
        updator.forward_end()
        if not torch.equal(y, y_ref):
            bitwise = False
            d = float(((y - y_ref).abs() / (1 + y_ref.abs())).max())
            if not math.isnan(max_diff) and not d <= max_diff:  # a NaN stays
                max_diff = d
            close = close and bool(torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5))
        if show and (tty or (step + 1) % args.interval == 0 or step + 1 == args.steps):
            done = (step + 1) / args.steps
            bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
            plans = {p["cycle"]: p for p in updator.stats.plans}
            moved = sum(int(plans[m["cycle"]]["moved_slots"][m["layer"]])
                        for m in updator.stats.moves if m["ok"] and m["cycle"] in plans)
            line = (f"[{bar}] step {step + 1}/{args.steps}  balancedness "
                    f"{per_step['on'][step].mean():.3f} (EPLB off "
                    f"{per_step['off'][step].mean():.3f})  rebalances "
                    f"{len(updator.stats.plans)}  slots moved {moved}")
            sys.stderr.write(("\r" + line + "\033[K") if tty else line + "\n")
            sys.stderr.flush()
    if show and tty:
        sys.stderr.write("\n")
    elapsed = time.perf_counter() - t_start

    # per rebalance: bytes received summed over ranks, move time the slowest rank's
    cycles = sorted({p["cycle"] for p in updator.stats.plans})
    moved_bytes = torch.zeros(len(cycles) + 1, dtype=torch.float64)
    move_s = torch.zeros(len(cycles) + 1, dtype=torch.float64)
    failed = torch.zeros(1, dtype=torch.int64)
    for m in updator.stats.moves:
        i = cycles.index(m["cycle"]) if m["cycle"] in cycles else len(cycles)
        if m["ok"]:  # (a failed move's bytes were discarded with it: not "moved")
            moved_bytes[i] += m["bytes"]
            move_s[i] += m["move_s"]
        failed += 0 if m["ok"] else 1
    flags = torch.tensor([0 if bitwise else 1, 0 if close else 1], dtype=torch.int64)
    diff = torch.tensor([max_diff], dtype=torch.float64)
    dist.all_reduce(moved_bytes, group=cpu_group)
    dist.all_reduce(move_s, op=dist.ReduceOp.MAX, group=cpu_group)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=cpu_group)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=cpu_group)
    dist.all_reduce(failed, group=cpu_group)
    if rank == 0:
        recorded = np.zeros((0, args.layers, args.experts))
        trace_written = False
        if updator.stats.windows:
            # the gathered windows through the updator's public save_trace (what simulate reads)
            trace_path = args.save_trace or os.path.join(os.path.dirname(result_path),
                                                         "trace.npz")
            updator.save_trace(trace_path, generator="eplb-native demo", num_groups=1,
                               num_nodes=1, num_redundant=args.redundant,
                               expert_bytes=3 * args.hidden * args.hidden * 4)
            recorded, _ = traces.load_trace(trace_path)
            trace_written = True
        windows = {w["step"]: i for i, w in enumerate(updator.stats.windows)}
        # what each rebalance switched (every rank commits the same layers: agreed), against
        # what it planned: layers still queued when the run ends are dropped at shutdown
        done_layers: dict[int, set[int]] = {c: set() for c in cycles}
        failed_layers: dict[int, set[int]] = {c: set() for c in cycles}
        last_switch: dict[int, int] = {}  # cycle -> step of its last layer's switch
        for m in updator.stats.moves:
            if m["cycle"] not in done_layers:
                continue  # (a move no plan of this run queued)
            (done_layers if m["ok"] else failed_layers)[m["cycle"]].add(m["layer"])
            if m["ok"]:
                last_switch[m["cycle"]] = max(last_switch.get(m["cycle"], m["step"]), m["step"])
        rebalances = []
        for i, p in enumerate(updator.stats.plans):
            # the plan taken at step s was submitted one step earlier (execution interval 1)
            # from the window gathered then; the bound is a property of that load alone
            src = windows.get(p["step"] - 1)
            bound = None
            if src is not None and src < len(recorded):
                bound = float(eplb_native.plan(
                    recorded[src], num_ranks=args.ranks, num_replicas=num_slots,
                    policy="balanced").balancedness_bound.mean())
            rebalances.append({
                "cycle": p["cycle"], "step": p["step"],
                "balancedness_before": float(np.mean(p["balancedness_before"])),
                "balancedness_after": float(np.mean(p["balancedness_after"])),
                "balancedness_bound": bound,
                "planned_layers": len(p["layers_to_move"]),
                "switched_layers": len(done_layers[p["cycle"]]),
                # failed: the old placement kept (failed_layer_moves counts them too); the rest
                # of the planned layers were still queued when the run ended
                "failed_layers": len(failed_layers[p["cycle"]]),
                # the layers the updator moves (a changed layer that would not balance better
                # is not moved)
                "planned_slots": int(sum(p["moved_slots"][layer]
                                         for layer in p["layers_to_move"])),
                "moved_slots": int(sum(p["moved_slots"][layer]
                                       for layer in done_layers[p["cycle"]])),
                "moved_bytes": int(moved_bytes[i]), "plan_ms": p["planner_s"] * 1e3,
                # steps from the plan's take to its last layer's switch (forwards ran on)
                "move_steps": (last_switch[p["cycle"]] - p["step"]
                               if p["cycle"] in last_switch else None),
                # the same in wall time, summed over layers (each layer's from its transfers'
                # issue to its switch, the forwards of those steps included)
                "move_span_ms": float(move_s[i]) * 1e3})
        result = {
            "ranks": args.ranks, "device": args.device, "backend": backend,
            "layers": args.layers, "experts": args.experts, "redundant": args.redundant,
            "top_k": args.top_k, "steps": args.steps, "tokens_per_rank": args.tokens,
            "policy": args.policy, "interval": args.interval, "elapsed_s": elapsed,
            "expert_bytes": 3 * args.hidden * args.hidden * 4,
            "balancedness_per_step": per_step["on"].tolist(),
            "balancedness_per_step_eplb_off": per_step["off"].tolist(),
            "rebalances": rebalances, "failed_layer_moves": int(failed),
            "outputs_bitwise_identical": not bool(flags[0]),
            "outputs_close": not bool(flags[1]), "max_rel_diff": float(diff),
            "trace_written": trace_written,
        }
        with open(result_path, "w") as f:
            json.dump(result, f)
    updator.shutdown()
    dist.barrier(group=cpu_group)
    dist.destroy_process_group()


def _plot_demo(path: str, result: dict) -> None:
    plt = _pyplot()
    on = np.asarray(result["balancedness_per_step"])
    off = np.asarray(result["balancedness_per_step_eplb_off"])
    steps = np.arange(1, on.shape[0] + 1)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    cmap = plt.get_cmap("viridis")
    for layer in range(on.shape[1]):
        ax.plot(steps, on[:, layer], color=cmap(layer / max(1, on.shape[1] - 1)), linewidth=0.8,
                alpha=0.7, label=f"layer {layer}" if on.shape[1] <= 8 else None)
    ax.plot(steps, on.mean(axis=1), color="black", linewidth=2.2, label="EPLB on, mean")
    ax.plot(steps, off.mean(axis=1), color="0.45", linestyle="--", linewidth=1.8,
            label="EPLB off, mean")
    for r in result["rebalances"]:
        ax.axvline(r["step"], color="tab:red", alpha=0.25, linewidth=1)
    ax.set_xlabel("step (red: a plan was taken, its layers move over the next steps)")
    ax.set_ylabel("balancedness (mean / max rank tokens)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"eplb-native demo: {result['ranks']} ranks, {result['layers']} layers x "
                 f"{result['experts']} experts + {result['redundant']} redundant, top-"
                 f"{result['top_k']}, policy {result['policy']}", fontsize=10)
    ax.legend(loc="lower right", fontsize=7, ncol=2, framealpha=0.8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:  # a failed write leaves no truncated PNG
        fig.savefig(f, format="png")
    plt.close(fig)


def cmd_demo(args) -> int:
    import importlib
    import tempfile

    _check_demo_args(args)
    args.png = _default_png(args, "demo.png")
    if args.png:
        _check_output_dir(args.png, "--png", json_out=args.json)
        _pyplot()  # fail before starting the ranks if matplotlib is missing
    if args.save_trace:
        if not args.save_trace.lower().endswith(".npz"):
            # save_trace writes an .npz archive at exactly this path: any other name would not
            # read back as a trace (a ".npy" name is parsed as a single array)
            raise UsageError(f"--save-trace {args.save_trace}: demo writes an .npz trace; name "
                             f"it *.npz")
        _check_output_dir(args.save_trace, "--save-trace", json_out=args.json)
        if args.png and same_file(args.png, args.save_trace):
            raise UsageError(f"--png {args.png} is the --save-trace file: the plot would "
                             f"replace the trace; choose another path")
    import torch.multiprocessing as mp

    # the worker by its importable name (this file may be running as __main__)
    worker = importlib.import_module("eplb_native.cli")._demo_rank
    with tempfile.TemporaryDirectory(prefix="eplb-demo-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        t0 = time.perf_counter()
        try:
            # a rendezvous file fresh to this run: no port to pick, nothing to race for
            init_method = f"file://{os.path.join(tmp, 'rdzv')}"
            ctx = mp.spawn(worker, args=(args, init_method, result_path), nprocs=args.ranks,
                           join=False)
            try:
                # (in short waits: a Ctrl-C that lands just before a wait starts is acted on
                # within a second, not when every rank has ended)
                while not ctx.join(timeout=1.0):
                    pass
            except KeyboardInterrupt:
                # (the ranks may not have had the signal: a kill -INT of this process alone)
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.terminate()
                for proc in ctx.processes:
                    proc.join(10)
                raise
        except Exception as e:  # noqa: BLE001 - a rank failed; its traceback is in e
            # not a usage error but a bug or a broken environment: show the rank's traceback
            print(f"eplb-native demo: a rank failed:\n{e}", file=sys.stderr)
            return 1
        wall = time.perf_counter() - t0
        with open(result_path) as f:
            result = json.load(f)
    result["wall_s"] = wall
    if args.png:
        _plot_demo(args.png, result)
    result["png"] = args.png or None
    # (written this run: a file of that name from before proves nothing)
    written = result.pop("trace_written", False)
    result["trace"] = args.save_trace if args.save_trace and written else None
    identical = result["outputs_bitwise_identical"]
    if args.json:
        _write_json(_clean(result))
        return 0 if result["outputs_close"] else 1
    on = np.asarray(result["balancedness_per_step"]).mean(axis=1)
    off = np.asarray(result["balancedness_per_step_eplb_off"]).mean(axis=1)
    tail = max(1, min(args.interval, args.steps))
    print(f"eplb-native demo: {args.ranks} ranks ({result['backend']}, {args.device}), "
          f"{args.layers} layers x {args.experts} experts + {args.redundant} redundant, top-"
          f"{args.top_k}, {args.steps} steps of {args.tokens} tokens per rank, policy "
          f"{args.policy}, plan every {args.interval} steps")
    head = (f"{'#':>3} {'step':>5} {'bal before':>10} {'bal after':>9} {'bound':>6} "
            f"{'layers':>7} {'slots moved':>11} {'bytes moved':>11} {'plan ms':>8} "
            f"{'move steps':>10}")
    print(head)
    print("-" * len(head))
    unfinished = []
    for r in result["rebalances"]:
        layers = f"{r['switched_layers']}/{r['planned_layers']}"
        print(f"{r['cycle']:>3} {r['step']:>5} {_fmt(r['balancedness_before'], 10)} "
              f"{_fmt(r['balancedness_after'], 9)} {_fmt(r['balancedness_bound'], 6)} "
              f"{layers:>7} {r['moved_slots']:>11} {_fmt_bytes(r['moved_bytes']):>11} "
              f"{_fmt(r['plan_ms'], 8, 2)} {_fmt(r['move_steps'], 10, 0)}")
        if r["switched_layers"] + r["failed_layers"] < r["planned_layers"]:
            unfinished.append(r)
    if not result["rebalances"]:
        print("(no rebalance: run more --steps than --interval)")
    print("bal before / after: in sample (the window each plan was made from), mean over "
          "layers\nlayers: switched / planned; move steps: from the plan to its last layer's "
          "switch (the forwards ran on meanwhile)")
    for r in unfinished:
        left = r["planned_layers"] - r["switched_layers"] - r["failed_layers"]
        print(f"rebalance {r['cycle']}: {left} of its {r['planned_layers']} layers had not "
              f"moved when the run ended (dropped at shutdown; their slots are not counted)")
    print(f"measured balancedness, mean over layers and the last {tail} steps: EPLB on "
          f"{on[-tail:].mean():.3f}, EPLB off {off[-tail:].mean():.3f} (first step "
          f"{on[0]:.3f})")
    if result["failed_layer_moves"]:
        print(f"layer moves that failed and kept the old placement: "
              f"{result['failed_layer_moves']}")
    verdict = ("yes (bitwise)" if identical else
               f"yes within float rounding (max |diff| / (1 + |y|) = {result['max_rel_diff']:.1e})"
               if result["outputs_close"] else
               f"NO (max |diff| / (1 + |y|) = {result['max_rel_diff']:.1e})")
    print(f"outputs identical to EPLB-off: {verdict}")
    print(f"time: {result['elapsed_s']:.1f} s of steps, {wall:.1f} s with start-up")
    if args.png:
        print(f"wrote {args.png}")
    if result["trace"]:
        print(f"wrote {args.save_trace} (eplb-native simulate --trace {args.save_trace} "
              f"--ranks {args.ranks})")
    elif args.save_trace:
        print(f"no load window was gathered in {args.steps} steps: {args.save_trace} not written")
    return 0 if result["outputs_close"] else 1


# --------------------------------------------------------------------------- parser


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _add_topology(p: argparse.ArgumentParser, ranks_required: bool = True) -> None:
    p.add_argument("--ranks", type=_int_arg, required=ranks_required,
                   help="EP ranks (GPUs/NPUs) the slots are spread over")
    p.add_argument("--default-layout", choices=tuple(_LAYOUT_LABEL), default="vllm",
                   help="the placement a server starts from without an expert map: vLLM's "
                   "(experts in slot order, then copies of experts 0, 1, ...; also SGLang's "
                   "'trivial' one and vllm-ascend's from 0.24 on, without shared experts mixed "
                   "in; default) or vllm-ascend's up "
                   "to 0.23 (contiguous blocks, redundant copies from the last rank back)")
    p.add_argument("--nodes", type=_int_arg, default=None,
                   help="nodes (default: the trace's deployment if its ranks match, else 1)")
    p.add_argument("--groups", type=_int_arg, default=None,
                   help="expert groups, e.g. DeepSeek-V3's 8 (default: from the trace, else 1); "
                        "hierarchical placement when groups %% nodes == 0")
    p.add_argument("--redundant", type=_int_arg, default=None,
                   help="redundant slots per layer (default: the trace's deployment if its ranks "
                        "match, else the smallest K >= ranks with experts + K divisible by ranks; "
                        "0 on one rank)")
    p.add_argument("--threads", type=_int_arg, default=1, help="planner threads (layers in "
                   "parallel)")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as the commands' own (no usage block before it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="eplb-native",
        description="Native dynamic expert-parallel load balancing for MoE inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="plan a placement for a load file -> vllm-ascend expert map "
                       "or SGLang placement file",
                       description="Plans expert placement for a load file (.npz/.npy/.pt/"
                       ".json, [windows, layers, experts] or [layers, experts], or SGLang's stat "
                       "dump) and writes it as vllm-ascend's expert-map JSON or SGLang's "
                       "--init-expert-location JSON (--format). A multi-window trace is planned "
                       "from the sum of its windows (--window last: the last one).")
    p.add_argument("--load", required=True, help="load file")
    _add_topology(p, ranks_required=False)
    p.add_argument("--policy", choices=sorted(POLICIES), default="balanced",
                   help="placement policy (default balanced)")
    p.add_argument("--old", help="current expert map (JSON; an SGLang placement file, .json "
                   "or .pt, with --ranks): 'before' is judged on it and min_move starts from it (default: the "
                   "server's default placement, --default-layout)")
    p.add_argument("--window", choices=("sum", "last"), default="sum",
                   help="plan from the sum of the trace's windows (default) or the last one")
    p.add_argument("--allow-repeats", action="store_true",
                   help="let a rank hold one expert in two slots (DeepSeek's algorithm does; "
                   "eplb_native and vLLM serve it, vllm-ascend's expert-map reader does not, so "
                   "by default no rank repeats an expert: plan(distinct_ranks=True))")
    p.add_argument("-o", "--output", required=True, help="JSON to write (see --format)")
    p.add_argument("--format", choices=("vllm-ascend", "sglang"), default="vllm-ascend",
                   help="vllm-ascend: its expert map (expert_map_path; default); sglang: "
                   "SGLang's placement file (--init-expert-location), which allows repeats")
    p.add_argument("--hidden-layers", type=_int_arg, default=None,
                   help="sglang: the model's hidden layers (num_hidden_layers), the MoE layers "
                   "being the last ones (DeepSeek's dense layers come first); default: an "
                   "SGLang dump's own, or the model's of a synth trace; needed otherwise")
    p.add_argument("--per-layer", action="store_true", help="print every layer")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("synth", help="write a synthetic drifting load trace of a model shape",
                       description="Writes a synthetic load trace (.npz) whose hot experts drift "
                       "over windows; shapes: " + "; ".join(
                           f"{k}: {v.num_layers} layers x {v.num_experts} experts, top-{v.top_k}"
                           for k, v in traces.MODEL_SHAPES.items()))
    p.add_argument("--shape", required=True, choices=[*traces.MODEL_SHAPES, "custom"])
    p.add_argument("--layers", type=_int_arg, help="MoE layers (override the shape's)")
    p.add_argument("--experts", type=_int_arg, help="logical experts per layer (override)")
    p.add_argument("--windows", type=_int_arg, default=16, help="load windows (default 16)")
    p.add_argument("--skew", choices=traces.SKEWS, default="zipf",
                   help="expert popularity: Zipf over a drifting ranking, or lognormal "
                   "(default zipf)")
    p.add_argument("--sigma", type=_float_arg, default=1.0, help="lognormal sigma (default 1.0)")
    p.add_argument("--zipf-a", type=_float_arg, default=1.1, help="Zipf exponent (default 1.1)")
    p.add_argument("--drift", type=_float_arg, default=0.05,
                   help="fraction of the expert popularity renewed per window (0..1)")
    p.add_argument("--tokens", type=_int_arg, default=4096, help="tokens per window (default 4096)")
    p.add_argument("--top-k", type=_int_arg, default=None,
                   help="experts per token (default: the model's; custom: min(8, --experts))")
    p.add_argument("--seed", type=_int_arg, default=0, help="random seed (default 0)")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.npz)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("simulate", help="replay a trace with several policies side by side",
                       description="Replays a load trace, rebalancing every K windows with each "
                       "policy from the windows just served, and judges every placement on the "
                       "windows after it (out of sample). The first placement is the server's "
                       "default (--default-layout: vLLM's, or vllm-ascend's up to 0.23).")
    p.add_argument("--trace", required=True, help="trace file (.npz/.npy/.pt/.json)")
    _add_topology(p)
    p.add_argument("--policy", default="deepseek,balanced,min_move",
                   help="comma-separated policies (default: all three)")
    p.add_argument("--every", type=_int_arg, default=1, help="rebalance every K windows")
    p.add_argument("--distinct-ranks", action="store_true",
                   help="no rank holds an expert twice in any plan (vllm-ascend's constraint; "
                   "plan(distinct_ranks=True))")
    p.add_argument("--expert-bytes", type=_int_arg, default=None,
                   help="bytes of one expert's weights (default: from the trace's model shape)")
    p.add_argument("--png", default=None, help="balancedness plot (default simulate.png; with "
                   "--json none unless named)")
    p.add_argument("--no-png", action="store_true", help="do not write the plot")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="serve a drifting skewed MoE on several ranks with EPLB",
                       description="Starts --ranks processes (gloo on CPU, NCCL on CUDA, HCCL on "
                       "NPU), runs a stack of EPMoE layers whose gate is skewed towards a few "
                       "experts that drift over time, with the updator attached, next to the same "
                       "stack with EPLB off; shows balancedness live, then a table per rebalance, "
                       "and whether the outputs equal EPLB-off's.")
    p.add_argument("--ranks", type=_int_arg, default=4,
                   help="processes, one EP rank each (default 4)")
    p.add_argument("--layers", type=_int_arg, default=8, help="MoE layers (default 8)")
    p.add_argument("--experts", type=_int_arg, default=64,
                   help="logical experts per layer (default 64)")
    p.add_argument("--redundant", type=_int_arg, default=16,
                   help="redundant slots per layer (default 16)")
    p.add_argument("--top-k", type=_int_arg, default=4, help="experts per token (default 4)")
    p.add_argument("--steps", type=_int_arg, default=60, help="forward steps (default 60)")
    p.add_argument("--interval", type=_int_arg, default=10,
                   help="steps per load window / between plans (default 10)")
    p.add_argument("--layers-per-step", type=_int_arg, default=1,
                   help="layers moved per step (default 1)")
    p.add_argument("--tokens", type=_int_arg, default=64,
                   help="tokens per rank per step (default 64)")
    p.add_argument("--hidden", type=_int_arg, default=64, help="hidden = expert width (default 64)")
    p.add_argument("--skew", type=_float_arg, default=2.0,
                   help="gate bias scale: larger = hotter hot experts (default 2)")
    p.add_argument("--drift", type=_float_arg, default=0.02,
                   help="fraction of the gate bias renewed per step (default 0.02)")
    p.add_argument("--seed", type=_int_arg, default=0, help="random seed (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda", "npu"), default="cpu")
    p.add_argument("--policy", choices=sorted(POLICIES), default="deepseek",
                   help="placement policy (default deepseek: DeepSeek EPLB's, what vLLM runs "
                        "by default; the library's own default, and what vllm-ascend's default "
                        "type 2 maps to, is balanced)")
    p.add_argument("--png", default=None, help="balancedness plot (default demo.png; with "
                   "--json none unless named; '' for none)")
    p.add_argument("--save-trace", default=None,
                   help="write the recorded load windows here (.npz, for simulate / plan)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = None
    if sys.stdout is None:  # started with stdout closed: what it prints goes nowhere
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # (here, so that a reader gone away is caught below)
        return rc
    except BrokenPipeError:
        # stdout closed by the reader (| head): nothing more to print. The command's own
        # status when it had one, else the shell's for a write to a closed pipe (128 + SIGPIPE).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return rc if rc is not None else 141
    except KeyboardInterrupt:
        print(f"eplb-native {args.command}: interrupted", file=sys.stderr)
        return 130  # (the shell's status for SIGINT; no traceback)
    except (ValueError, TypeError, OSError, MemoryError) as e:
        # what the user gave is wrong (file, shape, count, a size too big to allocate): one
        # line, no traceback
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"eplb-native {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
