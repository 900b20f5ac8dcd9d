"""Hot-path ops benchmark: eplb_native map_and_record / record_counts against their peers.

GPU run (H100/H200, results in docs/BENCHMARKS.md, "Hot-path ops"):

    EPLB_ANCHOR_CACHE=<cache> PYTHONPATH=python python benchmarks/bench_ops.py \
        --anchors ../shared/tools --out bench_ops.md

measures, in one process, for T*k in {8K, 64K, 256K, 1M} ids (k = 8, int32 ids, int64 tables
and load, uniformly random logical ids, recording on) and (E, P) in {(256, 288), (384, 512)},
with log2phy [E, P - E + 1] as attach() and vLLM allocate it (``--table narrow``: [E, largest
replica count]):

* ``eplb``: torch.ops.eplb_native.map_and_record, mode "spread";
* ``eplb_off``: the same with recording switched off (the record flag tensor holds False);
* ``eplb_rl``: the same op in mode "rank_local" (1-D table), int32 load like SGLang's;
* ``vllm``: vLLM's fused Triton map+record kernel (anchors.vllm_map_and_record());
* ``sglang``: SGLang's fused Triton kernel, rank-local table (anchors.sglang_map_and_record());
* ``torch``: plain torch: gather through log2phy + bincount (eager; bincount reads its
  maximum on the host, so inside a graph it is gather + index_add_ instead);
* ``copy``: ``dst.copy_(ids)`` of the same ids, the floor (a memcpy: in a graph, a memcpy node);
* ``neg``: ``torch.neg(ids, out=dst)``, the simplest kernel moving the same bytes, and ``fill1``:
  a one-element ``fill_`` (a kernel that moves nothing): what any kernel node costs in a graph,
  next to the memcpy node of ``copy``;
* ``rc`` / ``index_add``: record_counts of P per-slot counts vs ``load.index_add_`` of ones
  over the ids (the scatter that record_counts replaces).

Medians of triton.testing.do_bench, eager (one launch per call) and inside a replayed CUDA
graph of 20 calls (per-call time = replay / 20); each cell is the median over ``--runs`` (3)
runs over all cells, the ratios those medians' with their range over the runs. Every
implementation is run on the same tensors; results are cross-checked (eplb vs its composite fallback, eplb_rl vs sglang) before
timing. vLLM's kernel picks replicas by its own hash, so its slots differ from ours: its output
is checked structurally (every slot it returns holds the id's expert, and its load grows by
exactly the histogram of those slots, n in all). ``--ids uniform`` (default): uniformly random
ids, each expert at most 2 replicas, the best case for contention; ``--ids zipf``: ids drawn
from a Zipf law over the experts (exponent ``--zipf-s``, expert 0 hottest), placed by
``eplb_native.plan`` for that load (the hottest experts get many replicas, as a planner puts
them): the atomics on the hot experts' slots contend.

``--smoke`` runs a CPU-sized check (no GPU, no Triton, no peers): eplb vs plain torch on the
CPU, a few sizes, median of time.perf_counter over repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

import eplb_native
from eplb_native import ops

SIZES = [8 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024]
SHAPES = [(256, 288), (384, 512)]
RANKS = {288: 32, 512: 256}  # (DeepSeek-V3's and Kimi-K2's EP sizes, for --ids zipf's placement)
K = 8
GRAPH_CALLS = 20


def draw_ids(E: int, n: int, gen: torch.Generator, dist: str, s: float) -> torch.Tensor:
    """[n // K, K] int32 logical ids: uniform, or Zipf(s) over the experts (expert 0 hottest)."""
    if dist == "uniform":
        return torch.randint(0, E, (n // K, K), generator=gen, dtype=torch.int32)
    weights = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    ids = torch.multinomial(weights, n, replacement=True, generator=gen)
    return ids.to(torch.int32).view(n // K, K)


def zipf_s(args) -> float | None:
    """The Zipf exponent with --ids zipf, else None."""
    return args.zipf_s if args.ids == "zipf" else None


def check_physical(out, ids, phy2log, load_before, load_after, name):
    """A fused map+record kernel's output, checked without knowing how it picks replicas: every
    slot holds the id's expert and the load grew by exactly the histogram of the slots."""
    out = out.reshape(-1).long()
    assert int(out.min()) >= 0 and int(out.max()) < phy2log.numel(), f"{name}: slot out of range"
    assert torch.equal(phy2log[out], ids.reshape(-1).long()), f"{name}: a slot holds another expert"
    grew = (load_after - load_before).long()
    assert torch.equal(grew, torch.bincount(out, minlength=phy2log.numel())), \
        f"{name}: load != histogram of its slots"
    assert int(grew.sum()) == ids.numel(), f"{name}: load grew by {int(grew.sum())}"


def placement(E: int, P: int, device, gen: torch.Generator, table: str = "attach",
              zipf_s: float | None = None):
    """log2phy [E, M] (-1 padded), logcnt [E], a rank-local 1-D table (first replica) and
    phy2log [P]. Uniform ids (``zipf_s`` None): round-robin redundant slots over the first
    P - E experts, shuffled slot order. Zipf ids: the placement ``eplb_native.plan`` makes for
    their expected load (the hottest experts get many replicas, ranks of RANKS[P] slots), as a
    running system would have. M = P - E + 1 for ``table="attach"`` (the width attach() and
    vLLM allocate, so that the tensor never changes shape), the largest replica count for
    ``"narrow"``."""
    if zipf_s is None:
        phy2log = torch.cat([torch.arange(E), torch.arange(P - E) % E])
        phy2log = phy2log[torch.randperm(P, generator=gen)]
    else:
        weights = 1.0 / np.arange(1, E + 1, dtype=np.float64) ** zipf_s
        phy2log = torch.from_numpy(eplb_native.plan(weights, num_ranks=RANKS[P],
                                                    num_replicas=P).phy2log[0])
    logcnt = torch.bincount(phy2log, minlength=E)
    M = P - E + 1 if table == "attach" else int(logcnt.max())
    log2phy = torch.full((E, M), -1, dtype=torch.int64)
    fill = [0] * E
    for slot, e in enumerate(phy2log.tolist()):
        log2phy[e, fill[e]] = slot
        fill[e] += 1
    return (log2phy.to(device), logcnt.to(device), log2phy[:, 0].contiguous().to(device),
            phy2log.to(device))


def torch_map_record(ids, log2phy, logcnt, load, graph_safe=False):
    """Plain torch: what a framework writes without a fused kernel."""
    flat = ids.reshape(-1).long()
    token = torch.arange(flat.numel(), device=ids.device) // ids.shape[-1]
    slots = log2phy[flat, token % logcnt[flat]]
    if graph_safe:
        load.index_add_(0, slots, torch.ones_like(slots))
    else:
        load.add_(torch.bincount(slots, minlength=load.numel()))
    return slots.view(ids.shape).to(ids.dtype)


def bench_gpu(args) -> list[str]:
    import triton.testing

    sys.path.insert(0, args.anchors)
    import anchors

    vllm_fn = anchors.vllm_map_and_record()
    sglang_fn = anchors.sglang_map_and_record()
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    lib = torch.ops.eplb_native

    def timed(fn):
        eager = triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        in_graph = triton.testing.do_bench(graph.replay, warmup=25, rep=args.rep_ms,
                                           return_mode="median") / GRAPH_CALLS
        return eager * 1e3, in_graph * 1e3  # microseconds

    def case(E, P, n, log2phy, logcnt, table, phy2log):
        ids = draw_ids(E, n, gen, args.ids, args.zipf_s).to(dev)
        dst = torch.empty_like(ids)
        one = torch.zeros(1, dtype=torch.int32, device=dev)
        load = torch.zeros(P, dtype=torch.int64, device=dev)
        record = torch.tensor(True, device=dev)
        record_off = torch.tensor(False, device=dev)
        counts = torch.randint(1, 1000, (P,), generator=gen).to(dev)
        ones = torch.ones(n, dtype=torch.int64, device=dev)
        flat = ids.reshape(-1)

        # cross-checks before timing
        ref_load = torch.zeros_like(load)
        a = lib.map_and_record(ids, log2phy, logcnt, load, record, None, "spread")
        b = ops.composite_map_and_record(ids, log2phy, logcnt, ref_load, record)
        assert torch.equal(a, b) and torch.equal(load, ref_load), "eplb != composite"
        check_physical(a, ids, phy2log, torch.zeros_like(load), load, "eplb")
        before = load.clone()
        try:
            out = vllm_fn(ids, log2phy, logcnt, load, record, None)
            torch.cuda.synchronize()
            check_physical(out, ids, phy2log, before, load, "vllm")
        except AssertionError:
            raise
        except Exception as exc:  # a peer that cannot run here is reported (timed as nan)
            print(f"vllm failed at E={E} P={P} n={n}: {exc!r}", flush=True)
        # SGLang's histogram adds int32 counts: give it (and eplb_rl beside it) an int32 load
        load32 = torch.zeros(P, dtype=torch.int32, device=dev)
        ref32 = torch.zeros_like(load32)
        a = lib.map_and_record(ids, table, table, load32, record, None, "rank_local")
        b = sglang_fn(ids, table, ref32)
        assert torch.equal(a, b) and torch.equal(load32, ref32), "eplb_rl != sglang"
        assert int(load32.sum()) == n

        fns = {
            "copy": lambda: dst.copy_(ids),
            "neg": lambda: torch.neg(ids, out=dst),
            "fill1": lambda: one.fill_(1),
            "eplb": lambda: lib.map_and_record(ids, log2phy, logcnt, load, record, None, "spread"),
            "eplb_off": lambda: lib.map_and_record(ids, log2phy, logcnt, load, record_off, None,
                                                   "spread"),
            "eplb_rl": lambda: lib.map_and_record(ids, table, table, load32, record, None,
                                                  "rank_local"),
            "vllm": lambda: vllm_fn(ids, log2phy, logcnt, load, record, None),
            "sglang": lambda: sglang_fn(ids, table, load32),
            "rc": lambda: lib.record_counts(load, counts, 1, 0),
            "index_add": lambda: load.index_add_(0, flat, ones),
        }
        res = {}
        for name, fn in fns.items():
            try:
                res[name] = timed(fn)
            except Exception as exc:  # a peer that fails here is reported, not fatal
                print(f"{name} failed at E={E} P={P} n={n}: {exc!r}", flush=True)
                res[name] = (float("nan"), float("nan"))
        torch_eager = triton.testing.do_bench(
            lambda: torch_map_record(ids, log2phy, logcnt, load), warmup=25, rep=args.rep_ms,
            return_mode="median") * 1e3
        torch_graph = timed(lambda: torch_map_record(ids, log2phy, logcnt, load, True))[1]
        res["torch"] = (torch_eager, torch_graph)
        return res

    def host_us(fn, calls=2000):
        """Host time per call of a launch loop (what bounds eager time at small sizes)."""
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / calls * 1e6

    log2phy, logcnt, table, _ = placement(*SHAPES[0], dev, gen, args.table)
    ids = torch.randint(0, SHAPES[0][0], (1024, K), generator=gen, dtype=torch.int32).to(dev)
    dst = torch.empty_like(ids)
    load = torch.zeros(SHAPES[0][1], dtype=torch.int64, device=dev)
    record = torch.tensor(True, device=dev)
    host = {
        "copy_": host_us(lambda: dst.copy_(ids)),
        "torch.ops map_and_record": host_us(
            lambda: lib.map_and_record(ids, log2phy, logcnt, load, record, None, "spread")),
        "eplb_native.ops.map_and_record (Python wrapper)": host_us(
            lambda: ops.map_and_record(ids, log2phy, logcnt, load, record)),
        "vLLM launcher": host_us(lambda: vllm_fn(ids, log2phy, logcnt, load, record, None)),
    }
    for name, us in host.items():
        print(f"host time per call, 8K ids: {name}: {us:.2f} us", flush=True)

    names = ["copy", "eplb", "eplb_off", "eplb_rl", "vllm", "sglang", "torch", "rc", "index_add",
             "neg", "fill1"]
    # One placement per shape for every run; each run draws new ids and times every cell again
    # (runs one after another over all cells, so a slow spell of the GPU spreads over cells
    # instead of sitting in one).
    placements = {(E, P): placement(E, P, dev, gen, args.table, zipf_s(args)) for E, P in SHAPES}
    results: dict = {}
    for run in range(args.runs):
        for E, P in SHAPES:
            log2phy, logcnt, table, phy2log = placements[(E, P)]
            for n in SIZES:
                res = case(E, P, n, log2phy, logcnt, table, phy2log)
                results.setdefault((E, P, n), []).append(res)
                for mode, col in (("eager", 0), ("graph", 1)):
                    print(f"run {run + 1} E={E} P={P} n={n:>8} {mode:5} " +
                          " ".join(f"{name}={res[name][col]:7.2f}" for name in names),
                          flush=True)

    def finite(values):
        return [v for v in values if v == v]  # (a run where the implementation failed: nan)

    def med(runs_, col, name):
        vals = finite([r[name][col] for r in runs_])
        return statistics.median(vals) if vals else float("nan")

    def ratio(runs_, col, num, den):
        """Over the runs where both ran: the ratio of their medians, each run's ratio, and how
        many of the runs those were."""
        both = [r for r in runs_ if r[num][col] == r[num][col] and r[den][col] == r[den][col]]
        each = [r[num][col] / r[den][col] for r in both]
        value = med(both, col, num) / med(both, col, den) if both else float("nan")
        return value, each, len(both)

    def cell(value, each, ran, digits):
        text = f"{value:.{digits}f}x"
        if args.runs > 1 and each:
            text += f" ({min(each):.{digits}f}-{max(each):.{digits}f})"
        return text if ran == args.runs else f"{text} ({ran} of {args.runs} runs)"

    def us(runs_, col, name, digits=2):
        """A time cell; one that failed in some runs says in how many it ran."""
        n = len(finite([r[name][col] for r in runs_]))
        text = f"{med(runs_, col, name):.{digits}f}"
        return text if n == len(runs_) else f"{text} ({n} of {len(runs_)} runs)"

    head = ("| E, P | T·k | mode | copy_ µs | eplb µs | eplb/copy | eplb, record off µs | "
            "eplb rank_local µs | "
            "vLLM µs | vLLM/eplb | SGLang µs | SGLang/eplb_rl | torch µs | record_counts µs | "
            "index_add_ µs | neg µs | fill1 µs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines[:0] = [f"Host time per call (8K ids, launch loop): {name} {t:.2f} µs"
                 for name, t in host.items()] + [
        f"Cells: medians over {args.runs} run(s) of do_bench's median; ratios: of those "
        f"medians" + (", with their range over the runs" if args.runs > 1 else ""), ""]
    for (E, P, n), runs_ in results.items():
        for mode, col in (("eager", 0), ("graph", 1)):
            def u(name, digits=2, runs_=runs_, col=col):
                return us(runs_, col, name, digits)

            copy_r = cell(*ratio(runs_, col, "eplb", "copy"), 2)
            vllm_r = cell(*ratio(runs_, col, "vllm", "eplb"), 1)
            sgl_r = cell(*ratio(runs_, col, "sglang", "eplb_rl"), 1)
            lines.append(
                f"| {E}, {P} | {n // 1024}K | {mode} | {u('copy')} | {u('eplb')} | "
                f"{copy_r} | {u('eplb_off')} | {u('eplb_rl')} | {u('vllm')} | "
                f"{vllm_r} | {u('sglang')} | {sgl_r} | "
                f"{u('torch', 1)} | {u('rc')} | {u('index_add')} | {u('neg')} | "
                f"{u('fill1')} |")
    return lines


def bench_smoke(args) -> list[str]:
    def med(fn):
        times = []
        for _ in range(args.smoke_reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    # one thread: on a small shared VM a parallel region waits for a descheduled thread, and
    # the times swung 100x between runs (review15_bench); a check, not a recorded number
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    lines = ["(a CPU check, one thread; its times are not recorded anywhere)",
             "| E, P | T·k | eplb µs | torch µs | torch/eplb |", "|---|---|---|---|---|"]
    for E, P in SHAPES[:1]:
        log2phy, logcnt, _, phy2log = placement(E, P, "cpu", gen, zipf_s=zipf_s(args))
        for n in (8 * 1024, 64 * 1024):
            ids = draw_ids(E, n, gen, args.ids, args.zipf_s)
            load = torch.zeros(P, dtype=torch.int64)
            ref_load = torch.zeros_like(load)
            record = torch.tensor(True)
            out = ops.map_and_record(ids, log2phy, logcnt, load, record)
            assert torch.equal(out, ops.composite_map_and_record(ids, log2phy, logcnt, ref_load,
                                                                 record))
            assert torch.equal(load, ref_load)
            check_physical(out, ids, phy2log, torch.zeros_like(load), load, "eplb")
            # the plain-torch baseline computes the same (ids in range here, logcnt >= 1)
            torch_load = torch.zeros_like(load)
            assert torch.equal(torch_map_record(ids, log2phy, logcnt, torch_load), out)
            assert torch.equal(torch_load, load)

            args_ = (ids, log2phy, logcnt, load)
            ours = med(lambda a=args_, r=record: ops.map_and_record(*a, r))
            theirs = med(lambda a=args_: torch_map_record(*a))
            lines.append(f"| {E}, {P} | {n // 1024}K | {ours:.1f} | {theirs:.1f} | "
                         f"{theirs / ours:.1f}x |")
    return lines


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized run, no GPU or peers")
    p.add_argument("--anchors", default=os.path.join(here, "..", "..", "shared", "tools"),
                   help="folder holding anchors.py (peers' kernels, benchmarks only)")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time (ms)")
    p.add_argument("--smoke-reps", type=int, default=20)
    p.add_argument("--runs", type=int, default=3,
                   help="GPU: times every cell this many times (cells: the medians)")
    p.add_argument("--table", choices=["attach", "narrow"], default="attach",
                   help="log2phy width: P - E + 1 (attach's and vLLM's) or the largest count")
    p.add_argument("--ids", choices=["uniform", "zipf"], default="uniform",
                   help="logical id distribution (zipf: expert 0 hottest, placed by "
                        "eplb_native.plan for that load)")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent for --ids zipf")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args()
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")
    if args.smoke:
        lines = bench_smoke(args)
        machine = f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_ops.py: no CUDA GPU; use --smoke for the CPU check")
        lines = bench_gpu(args)
        machine = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                   f"built backends {ops.built_backends()}, log2phy table {args.table}, ids {args.ids}"
                   + (f" s={args.zipf_s}" if args.ids == "zipf" else ""))
    text = "\n".join([f"Machine: {machine}", ""] + lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
