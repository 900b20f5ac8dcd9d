"""Moving one layer's expert weights from an old placement to a new one.

``layer_schedule(old, new, num_ranks)`` is a pure function, identical on every rank: for each
slot whose logical expert changes it says where the new expert's weights come from. It is the
C++ planner's transfer plan of the layer (``Plan.transfers``, csrc/planner/transfer.cpp):

- a rank that already holds the expert (in the old placement) copies it locally;
- otherwise exactly one P2P transfer brings it to the rank (never twice to one rank: a second
  slot of the same expert on that rank copies from the first after it arrived);
- the sender is the old holder with the fewest sends so far (same node first), which spreads
  the sends over the holders.

``MoveLayout`` (also pure, also identical on every rank) turns the schedule into messages: the
rows rank ``s`` sends rank ``d`` travel together, one message per weight tensor, received into
one contiguous region of ``d``'s staging buffer (regions laid out by source rank). The sender
sends straight from its weights when the rows are consecutive slots, else it first gathers them
into free rows of its own staging buffer (rows no receive of this layer uses); only when those
are too few does it fall back to one message per run of consecutive slots. A per-step row
budget (``StepBudget``) may split a layer's messages over several steps; it bounds the rows a
rank writes into its staging per step, so local copies count too (they take what the step's
receives leave: the link is never held back for a copy).

``LayerMove`` executes one layer's move on one rank, step by step: receives land in a staging
buffer (allocated once by the caller), the layer's live weights are only read until
:meth:`LayerMove.commit` copies the staged rows in, so a move that fails leaves the layer
untouched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import _planner
from ._util import check_int


@dataclass(frozen=True)
class SlotFill:
    """How global slot ``dst_rank * S + dst_slot`` gets logical expert ``logical``.

    kind: ``"local"`` (copy from this rank's old ``src_slot``), ``"p2p"`` (receive from
    ``src_rank``'s old local slot ``src_slot``), ``"dup"`` (copy from the staged ``src_slot`` of
    the same rank, filled by a p2p of this layer).
    """

    logical: int
    kind: str
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


def layer_schedule(old_phy2log, new_phy2log, num_ranks: int, num_nodes: int = 1
                   ) -> list[SlotFill]:
    """The fills that turn ``old_phy2log`` [P] into ``new_phy2log`` [P]: the C++ planner's
    transfer plan of the layer (the rows of ``Plan.transfers``, csrc/planner/transfer.cpp) in
    the updator's terms. A rank that held the expert copies it locally; else its first slot of
    the expert receives it from the old holder with the fewest sends so far (same node first
    when ``num_nodes`` > 1), and its further slots of the expert copy that one ("dup").
    Deterministic order (by destination rank, then slot), the same on every rank."""
    num_ranks = check_int(num_ranks, "num_ranks", 1)
    num_nodes = check_int(num_nodes, "num_nodes", 1)
    old, new = np.asarray(old_phy2log), np.asarray(new_phy2log)
    for name, a in (("old_phy2log", old), ("new_phy2log", new)):
        if a.size and not np.issubdtype(a.dtype, np.integer):  # a float id would be truncated
            raise TypeError(f"{name} must hold integer expert ids, got dtype {a.dtype}")
    old = np.ascontiguousarray(old, dtype=np.int64)
    new = np.ascontiguousarray(new, dtype=np.int64)
    if old.shape != new.shape or old.ndim != 1 or old.size % num_ranks:
        raise ValueError(f"old/new phy2log must be [P] of equal size divisible by num_ranks, got "
                         f"{old.shape} / {new.shape}")
    if num_nodes < 1 or num_ranks % num_nodes:
        raise ValueError(f"num_nodes must divide num_ranks ({num_ranks}), got {num_nodes}")
    if old.size == 0:
        return []
    if min(int(old.min()), int(new.min())) < 0:
        raise ValueError("old/new phy2log must hold logical expert ids >= 0")
    missing = np.setdiff1d(new, old)
    if missing.size:
        raise ValueError(f"logical expert {int(missing[0])} has no copy in the old placement")
    # The planner sizes its tables by the number of ids: numbered densely (in order, so its
    # choices are those it makes on the ids themselves), a sparse id costs nothing.
    ids, dense = np.unique(np.concatenate([old, new]), return_inverse=True)
    rows = _planner.layer_transfers(dense[:old.size], dense[old.size:], ids.size, num_ranks,
                                    num_nodes)
    rows = rows[np.argsort(rows[:, 6], kind="stable")]  # by destination slot
    s = old.size // num_ranks
    return [SlotFill(int(ids[e]), _FILL_KIND[k], sr, ss % s, dr, ds % s)
            for _, _, e, sr, ss, dr, ds, k in rows.tolist()]


#: Plan.transfers' kind column (0 wire, 1 local, 2 dup) -> SlotFill.kind
_FILL_KIND = ("p2p", "local", "dup")


class StepBudget:
    """Rows (one slot's weights over all tensors each) every rank may still receive and send in
    the current step; shared by the moves issued in that step. ``rows`` None: no limit."""

    def __init__(self, num_ranks: int, rows: int | None):
        if rows is not None and rows < 1:
            raise ValueError(f"rows must be >= 1 or None, got {rows}")
        self.unlimited = rows is None
        self.recv = [rows or 0] * num_ranks
        self.send = [rows or 0] * num_ranks

    def room(self, src: int, dst: int) -> int | None:
        """Rows ``src`` may still send ``dst`` in this step (None: any number)."""
        return None if self.unlimited else min(self.recv[dst], self.send[src])

    def take(self, src: int, dst: int, rows: int) -> None:
        if not self.unlimited:
            self.recv[dst] -= rows
            self.send[src] -= rows

    def take_local(self, rank: int, rows: int) -> int:
        """Charges up to ``rows`` local copies (rows ``rank`` writes into its own staging, like
        a receive, without the link) to ``rank``'s receive budget; returns how many fit."""
        if self.unlimited:
            return rows
        n = max(0, min(rows, self.recv[rank]))
        self.recv[rank] -= n
        return n

    @property
    def exhausted(self) -> bool:
        """No rank can receive, or no rank can send, another row in this step."""
        return not self.unlimited and (max(self.recv) <= 0 or max(self.send) <= 0)


def peer_batches(pieces: list[Piece]) -> list[int]:
    """The batch of each piece (vLLM's migration batching): in order, the first batch in which
    neither of its two ranks talks yet, so every rank talks to at most one peer in a batch.
    Every rank computes the same from the same pieces (:meth:`MoveLayout.take`)."""
    busy: list[set[int]] = []
    out = []
    for p in pieces:
        b = next((i for i, ranks in enumerate(busy)
                  if p.src_rank not in ranks and p.dst_rank not in ranks), len(busy))
        if b == len(busy):
            busy.append(set())
        busy[b].update((p.src_rank, p.dst_rank))
        out.append(b)
    return out


@dataclass(frozen=True)
class Piece:
    """One step's share of what ``src_rank`` sends ``dst_rank``: entries ``start`` ..
    ``stop - 1`` of ``MoveLayout.pairs[(src_rank, dst_rank)]``, as ``len(runs)`` messages per
    weight tensor; run ``(a, b)`` covers entries a .. b - 1. ``gather_row``: the sender first
    copies the entries into its staging rows ``gather_row`` .. (one run then); -1: it sends
    straight from its weights (each run is consecutive slots there)."""

    src_rank: int
    dst_rank: int
    start: int
    stop: int
    runs: tuple[tuple[int, int], ...]
    gather_row: int


def _runs(pairs) -> list[tuple[int, int, int]]:
    """(a0, b0, n) for each maximal run of (a, b) pairs where both go up by one."""
    out: list[list[int]] = []
    for a, b in pairs:
        if out and a == out[-1][0] + out[-1][2] and b == out[-1][1] + out[-1][2]:
            out[-1][2] += 1
        else:
            out.append([a, b, 1])
    return [(a, b, n) for a, b, n in out]


def _entry_runs(rows, start: int, stop: int) -> list[tuple[int, int]]:
    """Entry ranges [a, b) of ``rows[start:stop]`` whose first members (slots) are consecutive."""
    runs: list[list[int]] = []
    for i in range(start, stop):
        if runs and rows[i][0] == rows[i - 1][0] + 1:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


class MoveLayout:
    """Where each row of one layer's move travels; a pure function of the schedule, so every
    rank computes the same layout and the same pieces.

    Attributes:
        pairs: ``(s, d)`` -> [(old local slot on s, new local slot on d)] for every row s sends
            d, sorted by the slot on s (so consecutive slots there form one message); sorted by
            (s, d).
        recv_row: ``(s, d)`` -> d's staging row of the first of those rows (the others follow).
        changed: [R] staging rows in use on each rank = slots whose expert changes there. Rows
            ``changed[r]`` .. S - 1 of r's staging are free and hold the rows r gathers to send.
        local: [R] lists of (old slot, staging row): local copies.
        commit_runs: [R] lists of (staging row, new slot, n): staged rows copied into the live
            weights at commit (duplicates of a received expert copy its staging row again).
    """

    def __init__(self, fills: list[SlotFill], num_ranks: int, slots_per_rank: int):
        r_, s_ = num_ranks, slots_per_rank
        pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for f in fills:
            if f.kind == "p2p":
                pairs.setdefault((f.src_rank, f.dst_rank), []).append((f.src_slot, f.dst_slot))
        self.num_ranks, self.slots_per_rank = r_, s_
        self.pairs = {k: sorted(v) for k, v in sorted(pairs.items())}
        self.recv_row: dict[tuple[int, int], int] = {}
        self.changed = [0] * r_
        staged: list[dict[int, int]] = [{} for _ in range(r_)]  # new slot -> staging row
        for (s, d), rows in self.pairs.items():  # sources ascending for each destination
            self.recv_row[(s, d)] = self.changed[d]
            for _, slot in rows:
                staged[d][slot] = self.changed[d]
                self.changed[d] += 1
        self.local: list[list[tuple[int, int]]] = [[] for _ in range(r_)]
        for f in fills:
            if f.kind == "local":
                staged[f.dst_rank][f.dst_slot] = self.changed[f.dst_rank]
                self.local[f.dst_rank].append((f.src_slot, self.changed[f.dst_rank]))
                self.changed[f.dst_rank] += 1
        self.commit_runs: list[list[tuple[int, int, int]]] = []
        for r in range(r_):
            rows = sorted((row, slot) for slot, row in staged[r].items())
            dups = [(staged[r][f.src_slot], f.dst_slot) for f in fills
                    if f.kind == "dup" and f.dst_rank == r]
            self.commit_runs.append(_runs(rows) + _runs(dups))
        if max(self.changed, default=0) > s_:
            raise ValueError(f"more changed slots than slots per rank ({s_})")

    def rows_total(self) -> int:
        """Rows the whole move sends over all pairs."""
        return sum(len(v) for v in self.pairs.values())

    def take(self, cursor: dict[tuple[int, int], int],
             budget: StepBudget | None = None) -> list[Piece]:
        """The next step's pieces (every pair's next rows, as many as ``budget`` lets through;
        all of them without one); advances ``cursor`` (pair -> entries already sent) and charges
        ``budget``. Every rank calls it with the same arguments and gets the same pieces."""
        s_ = self.slots_per_rank
        free = [s_ - c for c in self.changed]  # gather rows each sender has left this step
        pieces = []
        for (s, d), rows in self.pairs.items():
            start = cursor[(s, d)]
            n = len(rows) - start
            room = budget.room(s, d) if budget is not None else None
            if room is not None:
                n = min(n, room)
            if n <= 0:
                continue
            if budget is not None:
                budget.take(s, d, n)
            stop = start + n
            runs = _entry_runs(rows, start, stop)
            gather_row = -1
            if len(runs) > 1 and n <= free[s]:
                gather_row = s_ - free[s]
                free[s] -= n
                runs = [(start, stop)]
            pieces.append(Piece(s, d, start, stop, tuple(runs), gather_row))
            cursor[(s, d)] = stop
        return pieces

    def take_local(self, local_cursor: list[int],
                   budget: StepBudget | None = None) -> list[tuple[int, int]]:
        """Each rank's local copies for the step: entries ``(start, stop)`` of ``local[r]``,
        as many as ``budget`` still lets rank r write after this step's :meth:`take` (all of
        them without one); advances ``local_cursor`` ([R] entries already copied). Pure, like
        :meth:`take`: every rank gets the same answer for every rank."""
        out = []
        for r, rows in enumerate(self.local):
            start = local_cursor[r]
            n = len(rows) - start
            if n > 0 and budget is not None:
                n = budget.take_local(r, n)
            local_cursor[r] = start + max(n, 0)
            out.append((start, local_cursor[r]))
        return out


def prepare_layout(old_phy2log, new_phy2log, num_ranks: int, num_nodes: int = 1) -> MoveLayout:
    """``MoveLayout`` of the move from ``old_phy2log`` [P] to ``new_phy2log`` [P]: the
    per-plan host work of a layer's move (schedule and message layout), done once so a
    :class:`LayerMove` built from it posts without planning. Raises ValueError like
    :func:`layer_schedule`."""
    fills = layer_schedule(old_phy2log, new_phy2log, num_ranks, num_nodes)
    return MoveLayout(fills, num_ranks, len(old_phy2log) // num_ranks)


class LayerMove:
    """One layer's move on one rank, issued one step at a time (all of it in one step unless a
    :class:`StepBudget` limits it).

    Args:
        weights: the layer's live expert weight tensors, each [S, ...] contiguous (read only
            here, written only by :meth:`commit`).
        staging: this move's staging tensors, each [S, ...] contiguous of the matching weight's
            dtype (owned by the caller, reused once this move is committed or drained).
        fills: ``layer_schedule(...)`` for the layer (None when ``layout`` is given).
        rank: this rank in ``group``; group: the process group for P2P (None: one process).
        stream: a device stream to issue on (None: the current one; always None on CPU).
        tag: P2P tag of this move's messages. Moves in flight together must use different
            tags (the layer index does): on gloo each move posts from its own thread, and
            messages of one tag between two ranks match in posting order, whatever the move.
        layout: ``MoveLayout(fills, num_ranks, S)`` built ahead (e.g. while the previous step's
            forward runs, see :func:`prepare_layout`), so constructing the move costs no
            planning on the step's host path.
        batched: vLLM's ``enable_migration_batching``: a step's messages go in batches in which
            every rank talks to at most one peer (:func:`peer_batches`), each batch posted once
            this rank's part of the one before has completed (a device: as a group of its own
            behind it on ``stream``; CPU: after waiting for it), instead of all at once. This
            holds within the move; moves of several layers in flight (``layers_per_step`` >
            1) follow one another on a device (the next posts behind this one's last batch),
            on the CPU each from its own thread, so there a rank may talk to one peer per move.

    Attributes: bytes_received / bytes_copied (local copies) / ops_posted / steps (this rank,
    so far), error (the first exception, None if none), t_first (perf_counter of the first
    issue), t_issue / t_posted (perf_counter when the latest :meth:`issue` began / its ops were
    posted: host time of the issue path).
    """

    def __init__(self, weights, staging, fills, rank: int, group, stream=None, tag: int = 0,
                 *, layout: MoveLayout | None = None, batched: bool = False):
        if len(staging) != len(weights) or any(
                t.shape != w.shape or t.dtype != w.dtype or not t.is_contiguous()
                or not w.is_contiguous() for w, t in zip(weights, staging, strict=False)):
            raise ValueError("staging must match weights tensor by tensor (shape, dtype), all "
                             "contiguous")
        self.weights, self.staging, self.fills = weights, staging, fills
        self.rank, self.group, self.stream, self.tag = rank, group, stream, tag
        self.batched = bool(batched)
        num_ranks = 1 if group is None else dist.get_world_size(group)
        if layout is None:
            if fills is None:
                raise ValueError("LayerMove needs fills or a layout")
            layout = MoveLayout(fills, num_ranks, weights[0].shape[0])
        elif (layout.num_ranks, layout.slots_per_rank) != (num_ranks, weights[0].shape[0]):
            raise ValueError(f"layout is for {layout.num_ranks} ranks x "
                             f"{layout.slots_per_rank} slots, the move for {num_ranks} x "
                             f"{weights[0].shape[0]}")
        self.layout = layout
        # global ranks of the group's members, looked up once rather than per message
        self._peer = (list(range(num_ranks)) if group is None else
                      [dist.get_global_rank(group, r) for r in range(num_ranks)])
        self.cursor = {pair: 0 for pair in self.layout.pairs}
        self.local_cursor = [0] * num_ranks
        self.row_bytes = sum(w[0].numel() * w.element_size() for w in weights)
        self.device = weights[0].device
        # gloo's P2P works only learn they completed inside wait(), so on CPU a thread waits
        # for them and the caller waits on the thread with a deadline; device works answer
        # is_completed() without blocking.
        self.on_cpu = self.device.type == "cpu"
        self.error: BaseException | None = None
        self.bytes_received = 0
        self.bytes_copied = 0
        self.ops_posted = 0
        self.steps = 0
        self.t_first = 0.0
        self.t_issue = 0.0
        self.t_posted = 0.0
        self._works: list = []
        self._thread: threading.Thread | None = None
        self._done = threading.Event()  # CPU: this step posted and waited; device: posted
        self._done.set()
        #: set once this step's ops were posted (or failed to be): a device move posting later
        #: on a thread holds back the moves issued after it, whose messages must follow its own
        self.posted = threading.Event()
        self.posted.set()

    @property
    def all_issued(self) -> bool:
        """Every row of the layer has been issued (by some step so far)."""
        return (all(self.cursor[p] == len(rows) for p, rows in self.layout.pairs.items())
                and all(c == len(rows) for c, rows in zip(self.local_cursor, self.layout.local,
                                                           strict=True)))

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e

    def _ops(self, pieces: list[Piece]) -> tuple[list[list], list[tuple[int, int, int]]]:
        """This rank's P2P ops for ``pieces`` (views of weights / staging), in the batches to
        post one after the other (one batch unless :attr:`batched`; none empty), and the
        gathers (src slot, staging row, n) they need first."""
        gathers = []
        batch_of = peer_batches(pieces) if self.batched else [0] * len(pieces)
        batches: list[list] = [[] for _ in range(max(batch_of, default=-1) + 1)]
        lay = self.layout
        for p, k in zip(pieces, batch_of, strict=True):
            ops = batches[k]
            rows = lay.pairs[(p.src_rank, p.dst_rank)]
            if p.src_rank == self.rank:
                peer = self._peer[p.dst_rank]
                if p.gather_row >= 0:
                    gathers += [(slot, p.gather_row + i, n)
                                for slot, i, n in _runs((rows[j][0], j - p.start)
                                                        for j in range(p.start, p.stop))]
                for w, t in zip(self.weights, self.staging, strict=True):
                    for a, b in p.runs:
                        if p.gather_row >= 0:
                            view = t[p.gather_row:p.gather_row + p.stop - p.start]
                        else:
                            view = w[rows[a][0]:rows[a][0] + b - a]
                        ops.append(dist.P2POp(dist.isend, view, peer, self.group, self.tag))
            elif p.dst_rank == self.rank:
                peer = self._peer[p.src_rank]
                base = lay.recv_row[(p.src_rank, p.dst_rank)]
                for t in self.staging:
                    for a, b in p.runs:
                        ops.append(dist.P2POp(dist.irecv, t[base + a:base + b], peer,
                                              self.group, self.tag))
                self.bytes_received += (p.stop - p.start) * self.row_bytes
        return [ops for ops in batches if ops], gathers

    def issue(self, budget: StepBudget | None = None,
              before_post: Callable[[], float | None] | None = None,
              after: threading.Event | None = None) -> None:
        """Issues this move's next step: its share of ``budget`` (all that is left without
        one). Gathers are queued on ``stream``, the P2P ops posted, now (device) or on a thread
        (CPU, or when delayed), then the step's local copies (all in the first step without a
        budget) queued on ``stream``: they overlap the transfers instead of delaying them.

        ``before_post()`` runs after the gathers, just before posting (fault injection): it may
        return a delay in seconds (posting then moves to a thread) or raise. Any exception here
        is this move's failure (:meth:`wait` raises it); the ops are posted all the same, so no
        peer waits for a message that never comes. ``after``: an Event to wait for before
        posting on a device (the previous move's :attr:`posted`, so messages keep their order).
        Never raises.
        """
        self.t_issue = time.perf_counter()
        if not self.steps:
            self.t_first = self.t_issue
        self.steps += 1
        self._works, self._thread = [], None
        self._done.clear()
        self.posted.clear()
        batches: list[list] = []
        try:
            pieces = self.layout.take(self.cursor, budget)
            local = self.layout.take_local(self.local_cursor, budget)[self.rank]
            batches, gathers = self._ops(pieces)
        except BaseException as e:  # noqa: BLE001  (a bug: reported through the agreement)
            self._fail(e)
            self.t_posted = time.perf_counter()
            self.posted.set()
            self._done.set()
            return
        delay = 0.0
        try:
            self._copy(gathers)
            if before_post is not None:
                delay = float(before_post() or 0.0)
        except BaseException as e:  # noqa: BLE001  (reported through the agreement)
            self._fail(e)
        self.ops_posted += sum(map(len, batches))
        if self.on_cpu and not batches and not delay:
            self.t_posted = time.perf_counter()
            self.posted.set()
            self._done.set()
        elif self.on_cpu or delay > 0 or (after is not None and not after.is_set()):
            self._thread = threading.Thread(target=self._post,
                                            args=(batches, delay, after, True),
                                            daemon=True, name="eplb-move")
            self._thread.start()
        else:
            self._post(batches, 0.0, None, False)
        if local[1] > local[0]:
            try:  # staging rows no receive writes, from weights no one writes before commit
                self._copy(_runs(self.layout.local[self.rank][local[0]:local[1]]))
                self.bytes_copied += (local[1] - local[0]) * self.row_bytes
            except BaseException as e:  # noqa: BLE001  (reported through the agreement)
                self._fail(e)

    @torch.no_grad()
    def _copy(self, runs) -> None:
        """staging[row:row+n] = weights[slot:slot+n] for each (slot, row, n), on ``stream``."""
        if not runs:
            return
        with _stream_ctx(self.stream):
            for slot, row, n in runs:
                for w, t in zip(self.weights, self.staging, strict=True):
                    t[row:row + n].copy_(w[slot:slot + n], non_blocking=True)

    def _post(self, batches: list[list], delay_s: float, after, on_thread: bool) -> None:
        done = 0  # works waited for (CPU)
        try:
            if after is not None and not self.on_cpu:
                after.wait()
            if delay_s > 0:
                time.sleep(delay_s)
            if batches and on_thread and not self.on_cpu:  # a new thread starts on device 0
                getattr(torch, self.device.type).set_device(self.device)
            with _stream_ctx(self.stream):
                for i, ops in enumerate(batches):
                    # (a device: each batch a group of its own, behind the one before on the
                    # stream; CPU: posted once the one before completed here. Every batch is
                    # posted, after a failure too: no peer waits for a message never sent.)
                    if i and self.on_cpu:
                        done = self._wait_cpu(done)
                    try:
                        self._works += dist.batch_isend_irecv(ops)
                    except BaseException as e:  # noqa: BLE001  (reported through the agreement)
                        self._fail(e)
        except BaseException as e:  # noqa: BLE001  (reported through the agreement)
            self._fail(e)
        finally:
            self.t_posted = time.perf_counter()
            self.posted.set()
        try:
            if self.on_cpu:
                self._wait_cpu(done)
        finally:
            self._done.set()

    def _wait_cpu(self, start: int) -> int:
        """Waits for works[start:] (gloo), the first error kept: a gloo op counts as completed
        only once waited for, and finished() reads them all. Returns len(works)."""
        for w in self._works[start:]:
            try:
                w.wait()
            except BaseException as e:  # noqa: BLE001
                if self.error is None:
                    self._fail(e)
        return len(self._works)

    def wait(self, deadline: float) -> bool:
        """Waits for this step's P2P ops until ``deadline`` (time.perf_counter()); True when all
        completed, False on timeout (the ops stay pending: :meth:`drain` before reusing the
        staging buffers). Raises the move's error, if any."""
        remaining = max(0.0, deadline - time.perf_counter())
        if not self._done.wait(remaining):
            return False
        if self.error is not None:
            raise self.error
        if not self.on_cpu:
            # Spin (yielding the GIL) for the first moments: a sleep's granularity would add
            # up to its length to every step that waits for a transfer about to finish.
            spin_until = time.perf_counter() + 0.002
            while not all(w.is_completed() for w in self._works):
                now = time.perf_counter()
                if now >= deadline:
                    return False
                time.sleep(0 if now < spin_until else 0.0001)
            for w in self._works:
                w.wait()  # raises if the op failed; orders the caller's stream after it
        self._works = []  # finished: nothing left to drain
        return True

    def finished(self) -> bool:
        """Whether every op this move issued has finished, or failed (never blocks, never
        raises): its staging buffers may then be reused without :meth:`drain`."""
        if self._thread is not None and self._thread.is_alive():
            return False
        if self.on_cpu:
            return True  # (the thread, now ended, waited for every op)
        try:
            return all(w.is_completed() for w in self._works)
        except Exception:  # noqa: BLE001  (an op that failed has ended)
            return True

    def drain(self, deadline: float | None = None) -> bool:
        """Blocks until every op this move issued finished (after a timeout or failure), or
        until ``deadline`` (time.perf_counter()): True when they all finished. A peer that never
        posts its side leaves them pending until the process group's own timeout."""
        if deadline is not None:
            if self._thread is not None:
                self._thread.join(max(0.0, deadline - time.perf_counter()))
            while not self.finished():
                if time.perf_counter() >= deadline:
                    return False
                time.sleep(0.001)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self.on_cpu:
                self._works = []  # the thread waited for the ops itself
        for w in self._works:
            try:
                w.wait()
            except Exception:  # noqa: BLE001  (already reported; only the buffers matter now)
                pass
        self._works = []
        return True

    @torch.no_grad()
    def commit(self) -> None:
        """Copies the staged rows into the layer's live weights (call only once every step
        completed on every rank, agreed, on the stream the forwards run on)."""
        for row, slot, n in self.layout.commit_runs[self.rank]:
            for w, t in zip(self.weights, self.staging, strict=True):
                w[slot:slot + n].copy_(t[row:row + n], non_blocking=True)


def _stream_ctx(stream):
    if stream is None:
        return _Null()
    mod = getattr(torch, stream.device.type)
    return mod.stream(stream)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
