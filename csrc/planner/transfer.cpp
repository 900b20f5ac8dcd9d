// Transfer plan old -> new placement of one layer (contract in placement.h).
//
// Every slot whose logical expert changes gets exactly one transfer:
//   - local when its rank held that expert anywhere in the old placement (a copy inside the
//     rank, no wire);
//   - otherwise from one old holder of the expert, the one with the fewest sends so far (ties:
//     a holder on the destination's node, then the lowest rank), which spreads the sends.
// Remote transfers are then batched: the transfers between one pair of ranks form an edge of a
// multigraph, and edges are coloured greedily (most transfers first, each into the lowest batch
// where neither rank is busy), so within a batch every rank talks to at most one peer.
// Local copies go in batch 0; they involve no peer.
#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "planner/packing.h"
#include "planner/placement.h"

namespace eplb {

using detail::Z;

void PlanTransfers(int64_t layer, const int64_t* old_phy2log, const int64_t* new_phy2log,
                   const Shape& shape, std::vector<Transfer>* out) {
  const int64_t P = shape.num_physical, R = shape.num_ranks, S = shape.slots_per_rank();
  const int64_t E = shape.num_logical;
  const int64_t rpn = R / std::max<int64_t>(1, shape.num_nodes);
  // holders of e in the old placement, CSR: (rank, first slot of that rank holding e), by rank.
  std::vector<int64_t> start(Z(E + 1), 0), fill(Z(E), 0);
  std::vector<std::pair<int64_t, int64_t>> holder(Z(P));
  for (int64_t p = 0; p < P; ++p) ++start[Z(old_phy2log[p] + 1)];
  for (int64_t e = 0; e < E; ++e) start[Z(e + 1)] += start[Z(e)];
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = old_phy2log[p];
    const int64_t at = start[Z(e)] + fill[Z(e)];
    if (fill[Z(e)] > 0 && holder[Z(at - 1)].first == p / S) continue;  // same rank again
    holder[Z(at)] = {p / S, p};
    ++fill[Z(e)];
  }
  std::vector<int64_t> sends(Z(R), 0);
  std::vector<Transfer> layer_out;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = new_phy2log[p];
    if (e == old_phy2log[p]) continue;
    Transfer t;
    t.layer = layer;
    t.logical = e;
    t.dst_rank = p / S;
    t.dst_slot = p;
    const auto* h_begin = holder.data() + start[Z(e)];
    const auto* h_end = h_begin + fill[Z(e)];
    const auto* local =
        std::find_if(h_begin, h_end, [&](const auto& x) { return x.first == t.dst_rank; });
    if (local != h_end) {
      t.src_rank = t.dst_rank;
      t.src_slot = local->second;
      t.local = true;
    } else {
      // every logical expert has an old holder: old_phy2log was validated
      auto key = [&](const std::pair<int64_t, int64_t>& x) {
        return std::make_tuple(sends[Z(x.first)], x.first / rpn != t.dst_rank / rpn, x.first);
      };
      const auto* best = std::min_element(
          h_begin, h_end, [&](const auto& x, const auto& y) { return key(x) < key(y); });
      t.src_rank = best->first;
      t.src_slot = best->second;
      ++sends[Z(t.src_rank)];
    }
    layer_out.push_back(t);
  }
  // Batches: colour the rank-pair multigraph, pairs with the most transfers first.
  std::vector<std::pair<int64_t, int64_t>> keys;  // (min rank, max rank) of each remote transfer
  for (const auto& t : layer_out)
    if (!t.local) keys.emplace_back(std::minmax(t.src_rank, t.dst_rank));
  std::sort(keys.begin(), keys.end());
  std::vector<std::tuple<int64_t, int64_t, int64_t>> pairs;  // (-count, lo, hi)
  for (size_t i = 0; i < keys.size();) {
    size_t j = i;
    while (j < keys.size() && keys[j] == keys[i]) ++j;
    pairs.emplace_back(-static_cast<int64_t>(j - i), keys[i].first, keys[i].second);
    i = j;
  }
  std::sort(pairs.begin(), pairs.end());
  std::vector<std::vector<char>> busy;  // busy[batch][rank]
  std::vector<std::pair<std::pair<int64_t, int64_t>, int64_t>> pair_batch;
  for (const auto& [neg, lo, hi] : pairs) {
    int64_t b = 0;
    for (;; ++b) {
      if (b == static_cast<int64_t>(busy.size())) busy.emplace_back(Z(R), 0);
      if (!busy[Z(b)][Z(lo)] && !busy[Z(b)][Z(hi)]) break;
    }
    busy[Z(b)][Z(lo)] = busy[Z(b)][Z(hi)] = 1;
    pair_batch.push_back({{lo, hi}, b});
  }
  std::sort(pair_batch.begin(), pair_batch.end());
  for (auto& t : layer_out) {
    if (t.local) continue;
    const std::pair<int64_t, int64_t> k = std::minmax(t.src_rank, t.dst_rank);
    t.batch = std::lower_bound(pair_batch.begin(), pair_batch.end(),
                               std::make_pair(k, int64_t{-1}))
                  ->second;
  }
  std::stable_sort(layer_out.begin(), layer_out.end(), [](const Transfer& a, const Transfer& b) {
    return std::make_pair(a.batch, a.dst_slot) < std::make_pair(b.batch, b.dst_slot);
  });
  out->insert(out->end(), layer_out.begin(), layer_out.end());
}

}  // namespace eplb
