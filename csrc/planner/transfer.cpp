// Transfer plan old -> new placement of one layer (contract in placement.h).
//
// Every slot whose logical expert changes gets exactly one transfer:
//   - local when its rank held that expert anywhere in the old placement (a copy inside the
//     rank, no wire);
//   - a duplicate when an earlier slot of the rank receives that expert over the wire in this
//     layer (a copy of what arrives there: an expert crosses the wire once per rank);
//   - otherwise from one old holder of the expert: the only one, or (chosen once every
//     single-holder transfer is counted, by destination slot) the one with the fewest sends so
//     far (ties: a holder on the destination's node, then the lowest rank), which spreads the
//     sends.
// Remote transfers are then batched: the transfers between one pair of ranks form an edge of a
// multigraph, and edges are coloured greedily (pairs in order of their first transfer, each into
// the lowest batch where neither rank is busy), so within a batch every rank talks to at most one
// peer. Local copies go in batch 0 (they involve no peer), duplicates in their source's batch.
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "planner/packing.h"
#include "planner/placement.h"

namespace eplb {

using detail::Z;

int64_t PlanTransfers(int64_t layer, const int64_t* old_phy2log, const int64_t* new_phy2log,
                      const Shape& shape, Transfer* out) {
  const int64_t P = shape.num_physical, R = shape.num_ranks, S = shape.slots_per_rank();
  const int64_t E = shape.num_logical;
  const int64_t rpn = R / std::max<int64_t>(1, shape.num_nodes);
  // Scratch per thread, kept between layers (one set of allocations per plan, not per layer).
  // Loops run rank by rank over each rank's slots: no division per slot (a 64-bit division
  // costs more than the rest of a slot's work).
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    std::vector<int64_t> start, fill, sends, first;
    std::vector<std::pair<int64_t, int64_t>> holder;
    std::vector<Transfer> layer_out;
    std::vector<int64_t> local, arriving;  // [E]
    std::vector<int32_t> pair_batch;       // [R, R], -1 between calls
    std::vector<uint64_t> busy;            // [batch words, R]
  } tls;
  // holders of e in the old placement, CSR: (rank, first slot of that rank holding e), by rank.
  auto& start = tls.start;
  auto& fill = tls.fill;
  auto& holder = tls.holder;
  start.assign(Z(E + 1), 0);
  fill.assign(Z(E), 0);
  holder.resize(Z(P));
  for (int64_t p = 0; p < P; ++p) ++start[Z(old_phy2log[p] + 1)];
  for (int64_t e = 0; e < E; ++e) start[Z(e + 1)] += start[Z(e)];
  for (int64_t r = 0, p = 0; r < R; ++r) {
    for (const int64_t end = p + S; p < end; ++p) {
      const int64_t e = old_phy2log[p];
      const int64_t at = start[Z(e)] + fill[Z(e)];
      if (fill[Z(e)] > 0 && holder[Z(at - 1)].first == r) continue;  // same rank again
      holder[Z(at)] = {r, p};
      ++fill[Z(e)];
    }
  }
  auto& sends = tls.sends;
  sends.assign(Z(R), 0);
  auto& layer_out = tls.layer_out;
  layer_out.clear();
  // Per destination rank, by expert: the first slot of the rank holding it in the old placement
  // (local) and the index in layer_out of its wire transfer into the rank (arriving); -1
  // otherwise, and again after each rank (its entries are reset, not the arrays).
  auto& local = tls.local;
  auto& arriving = tls.arriving;
  local.assign(Z(E), -1);
  arriving.assign(Z(E), -1);
  for (int64_t r = 0, first_slot = 0; r < R; ++r, first_slot += S) {
    const int64_t end = first_slot + S;
    for (int64_t p = end - 1; p >= first_slot; --p) local[Z(old_phy2log[p])] = p;  // first wins
    for (int64_t p = first_slot; p < end; ++p) {
      const int64_t e = new_phy2log[p];
      if (e == old_phy2log[p]) continue;
      Transfer t;
      t.layer = layer;
      t.logical = e;
      t.dst_rank = r;
      t.dst_slot = p;
      if (local[Z(e)] >= 0) {
        t.src_rank = r;
        t.src_slot = local[Z(e)];
        t.kind = Transfer::kLocal;
      } else if (arriving[Z(e)] >= 0) {
        t.src_rank = r;
        t.src_slot = layer_out[Z(arriving[Z(e)])].dst_slot;
        t.batch = arriving[Z(e)];  // the source's index until batches are set
        t.kind = Transfer::kDup;
      } else {
        arriving[Z(e)] = static_cast<int64_t>(layer_out.size());
        // every logical expert has an old holder (old_phy2log was validated); with one holder
        // rank there is no choice, so those count first and the others choose below
        const auto* h = holder.data() + start[Z(e)];
        if (fill[Z(e)] == 1) {
          t.src_rank = h->first;
          t.src_slot = h->second;
          ++sends[Z(t.src_rank)];
        } else {
          t.src_rank = -1;
        }
      }
      layer_out.push_back(t);
    }
    for (int64_t p = first_slot; p < end; ++p) {
      local[Z(old_phy2log[p])] = -1;
      arriving[Z(new_phy2log[p])] = -1;
    }
  }
  for (auto& t : layer_out) {
    if (t.kind != Transfer::kWire || t.src_rank >= 0) continue;
    const auto* h_begin = holder.data() + start[Z(t.logical)];
    const auto* h_end = h_begin + fill[Z(t.logical)];
    const int64_t dst_node = t.dst_rank / rpn;
    auto key = [&](const std::pair<int64_t, int64_t>& x) {
      return std::make_tuple(sends[Z(x.first)], x.first / rpn != dst_node, x.first);
    };
    const auto* best = std::min_element(
        h_begin, h_end, [&](const auto& x, const auto& y) { return key(x) < key(y); });
    t.src_rank = best->first;
    t.src_slot = best->second;
    ++sends[Z(t.src_rank)];
  }
  // Batches: colour the rank-pair multigraph greedily, pairs in order of their first transfer
  // (at most 2 * max degree - 1 batches). pair_batch is a dense [R, R] table kept across calls
  // and reset entry by entry, so a layer costs O(transfers * batches / 64), no sorting: busy
  // holds one bit per (rank, batch), 64 batches to a word, word w of every rank at [w * R, ...),
  // so the lowest batch free for both ranks is the lowest bit clear in both words.
  auto& pair_batch = tls.pair_batch;
  auto& busy = tls.busy;
  if (pair_batch.size() < Z(R * R)) pair_batch.assign(Z(R * R), -1);
  busy.clear();
  int64_t num_batches = 1;
  for (auto& t : layer_out) {
    if (t.kind != Transfer::kWire) continue;
    const int64_t key = std::min(t.src_rank, t.dst_rank) * R + std::max(t.src_rank, t.dst_rank);
    int32_t& pb = pair_batch[Z(key)];
    if (pb < 0) {
      int64_t w = 0;
      uint64_t free = 0;
      for (;; ++w) {
        if (Z((w + 1) * R) > busy.size()) busy.resize(Z((w + 1) * R), 0);
        free = ~(busy[Z(w * R + t.src_rank)] | busy[Z(w * R + t.dst_rank)]);
        if (free != 0) break;
      }
      const uint64_t bit = free & (~free + 1);  // the lowest set bit
      busy[Z(w * R + t.src_rank)] |= bit;
      busy[Z(w * R + t.dst_rank)] |= bit;
      const int64_t b = 64 * w + __builtin_ctzll(free);
      pb = static_cast<int32_t>(b);
      num_batches = std::max(num_batches, b + 1);
    }
    t.batch = pb;
  }
  for (const auto& t : layer_out)
    if (t.kind == Transfer::kWire)
      pair_batch[Z(std::min(t.src_rank, t.dst_rank) * R + std::max(t.src_rank, t.dst_rank))] = -1;
  // a duplicate in its source's batch (the source comes first: its slot is lower)
  for (auto& t : layer_out)
    if (t.kind == Transfer::kDup) t.batch = layer_out[Z(t.batch)].batch;
  // Order by (batch, dst_slot): a counting sort, since layer_out is in dst_slot order.
  auto& first = tls.first;
  first.assign(Z(num_batches + 1), 0);
  for (const auto& t : layer_out) ++first[Z(t.batch + 1)];
  for (int64_t b = 0; b < num_batches; ++b) first[Z(b + 1)] += first[Z(b)];
  for (const auto& t : layer_out) out[first[Z(t.batch)]++] = t;
  return static_cast<int64_t>(layer_out.size());
}

void PlanTransfers(int64_t layer, const int64_t* old_phy2log, const int64_t* new_phy2log,
                   const Shape& shape, std::vector<Transfer>* out) {
  int64_t changed = 0;
  for (int64_t p = 0; p < shape.num_physical; ++p) changed += new_phy2log[p] != old_phy2log[p];
  const size_t base = out->size();
  out->resize(base + Z(changed));
  PlanTransfers(layer, old_phy2log, new_phy2log, shape, out->data() + base);
}

}  // namespace eplb
