"""Moving one layer's expert weights from an old placement to a new one.

``layer_schedule(old, new, num_ranks)`` is a pure function, identical on every rank: for each
slot whose logical expert changes it says where the new expert's weights come from. Rules:

- a rank that already holds the expert (in the old placement) copies it locally;
- otherwise exactly one P2P transfer brings it to the rank (never twice to one rank: a second
  slot of the same expert on that rank copies from the first after it arrived);
- the sender is one of the old holders, spread over them by destination rank.

``LayerMove`` executes one layer's schedule on one rank: receives land in a staging buffer
(allocated once by the caller), the layer's live weights are only read until :meth:`commit`
copies the staged rows in, so a move that fails leaves the layer untouched.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


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


def layer_schedule(old_phy2log, new_phy2log, num_ranks: int) -> list[SlotFill]:
    """The fills that turn ``old_phy2log`` [P] into ``new_phy2log`` [P]; deterministic order
    (by destination rank, then slot), the same on every rank."""
    old = np.asarray(old_phy2log, dtype=np.int64)
    new = np.asarray(new_phy2log, dtype=np.int64)
    if old.shape != new.shape or old.ndim != 1 or old.size % num_ranks:
        raise ValueError(f"old/new phy2log must be [P] of equal size divisible by num_ranks, got "
                         f"{old.shape} / {new.shape}")
    s = old.size // num_ranks
    holders: dict[int, list[tuple[int, int]]] = {}
    for slot, e in enumerate(old):
        holders.setdefault(int(e), []).append((slot // s, slot % s))
    fills = []
    for d in range(num_ranks):
        mine = {int(e): i for i, e in reversed(list(enumerate(old[d * s:(d + 1) * s])))}
        received: dict[int, int] = {}
        for i in range(s):
            e = int(new[d * s + i])
            if e == old[d * s + i]:
                continue
            if e in mine:
                fills.append(SlotFill(e, "local", d, mine[e], d, i))
            elif e in received:
                fills.append(SlotFill(e, "dup", d, received[e], d, i))
            else:
                src = holders.get(e)
                if not src:
                    raise ValueError(f"logical expert {e} has no copy in the old placement")
                r, j = src[d % len(src)]
                fills.append(SlotFill(e, "p2p", r, j, d, i))
                received[e] = i
    return fills


class LayerMove:
    """One layer's move on one rank.

    Args:
        weights: the layer's live expert weight tensors, each [S, ...] (read only here).
        staging: this move's staging tensors, same shapes as ``weights`` (owned by the caller,
            reused across moves once this one is finished or drained).
        fills: ``layer_schedule(...)`` for the layer.
        rank: this rank in ``group``; group: the process group for P2P (None: one process).
        stream: a device stream to issue on (None: the current one; always None on CPU).
        tag: P2P tag of this move's messages. Moves in flight together must use different
            tags (the layer index does): on gloo each move posts from its own thread, and
            messages of one tag between two ranks match in posting order, whatever the move.
    """

    def __init__(self, weights, staging, fills, rank: int, group, stream=None, tag: int = 0):
        self.weights, self.staging, self.fills = weights, staging, fills
        self.rank, self.group, self.stream, self.tag = rank, group, stream, tag
        self.device = weights[0].device
        # gloo's P2P works only learn they completed inside wait(), so on CPU a thread waits
        # for them and the caller waits on the thread with a deadline; device works answer
        # is_completed() without blocking.
        self.on_cpu = self.device.type == "cpu"
        self.works: list = []
        self.error: BaseException | None = None
        self.bytes_received = 0
        self._timer: threading.Thread | None = None
        self._done = threading.Event()  # CPU: ops issued and waited; device: ops issued
        self.t_issue = 0.0

    def _ops(self):
        ops = []
        for f in self.fills:
            if f.kind != "p2p":
                continue
            if f.src_rank == self.rank:
                peer = dist.get_global_rank(self.group, f.dst_rank)
                ops += [dist.P2POp(dist.isend, w[f.src_slot], peer, self.group, self.tag)
                        for w in self.weights]
            elif f.dst_rank == self.rank:
                peer = dist.get_global_rank(self.group, f.src_rank)
                ops += [dist.P2POp(dist.irecv, t[f.dst_slot], peer, self.group, self.tag)
                        for t in self.staging]
                self.bytes_received += sum(t[0].numel() * t.element_size()
                                           for t in self.staging)
        return ops

    def _issue_now(self, ops):
        try:
            if ops:
                if self.stream is not None:
                    with _stream_ctx(self.stream):
                        self.works = dist.batch_isend_irecv(ops)
                else:
                    self.works = dist.batch_isend_irecv(ops)
            if self.on_cpu:
                for w in self.works:
                    w.wait()
        except BaseException as e:  # noqa: BLE001  (reported through the agreement)
            self.error = e
        finally:
            self._done.set()

    def issue(self, delay_s: float = 0.0) -> None:
        """Local copies now; P2P ops now (device) or on a thread (CPU), ``delay_s`` later
        (fault injection)."""
        self.t_issue = time.perf_counter()
        ctx = _stream_ctx(self.stream)
        with ctx:
            for f in self.fills:
                if f.kind == "local" and f.dst_rank == self.rank:
                    for w, t in zip(self.weights, self.staging, strict=True):
                        t[f.dst_slot].copy_(w[f.src_slot], non_blocking=True)
        ops = self._ops()
        if delay_s > 0 or (self.on_cpu and ops):
            def run():
                time.sleep(delay_s)
                if not self.on_cpu:  # a new thread starts on device 0
                    getattr(torch, self.device.type).set_device(self.device)
                self._issue_now(ops)

            self._timer = threading.Thread(target=run, daemon=True, name="eplb-move")
            self._timer.start()
        else:
            self._issue_now(ops)

    def wait(self, deadline: float) -> bool:
        """Waits for this rank's P2P ops until ``deadline`` (time.perf_counter()); True when all
        completed, False on timeout (the ops stay pending: :meth:`drain` before reusing the
        staging buffers)."""
        remaining = max(0.0, deadline - time.perf_counter())
        if not self._done.wait(remaining):
            return False
        if self.error is not None:
            raise self.error
        if not self.on_cpu:
            while not all(w.is_completed() for w in self.works):
                if time.perf_counter() >= deadline:
                    return False
                time.sleep(0.0002)
            for w in self.works:
                w.wait()  # raises if the op failed; orders the device stream after it
        self.works = []  # finished: nothing left to drain
        # On the caller's stream: w.wait() ordered that stream (not the side stream) after the
        # receives.
        for f in self.fills:
            if f.kind == "dup" and f.dst_rank == self.rank:
                for t in self.staging:
                    t[f.dst_slot].copy_(t[f.src_slot], non_blocking=True)
        return True

    def drain(self) -> None:
        """Blocks until every op this move issued finished (after a timeout or failure)."""
        if self._timer is not None:
            self._timer.join()
            if self.on_cpu:
                self.works = []  # the thread waited for the ops itself
        for w in self.works:
            try:
                w.wait()
            except Exception:  # noqa: BLE001  (already reported; only the buffers matter now)
                pass
        self.works = []

    @torch.no_grad()
    def commit(self) -> None:
        """Copies the staged rows into the layer's live weights (call only once every rank
        agreed, on the stream the forwards run on)."""
        for f in self.fills:
            if f.dst_rank == self.rank:
                for w, t in zip(self.weights, self.staging, strict=True):
                    w[f.dst_slot].copy_(t[f.dst_slot], non_blocking=True)


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
