// Building blocks shared by the policies (internal to csrc/planner). Header-only, no state.
//
// Both are DeepSeek EPLB's greedy steps, written with heaps so that a layer costs
// O(P log P) instead of O(P * E): the answers (tie-breaking included) are those of the plain
// linear-scan versions, which pick the lowest index among equal candidates.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <queue>
#include <utility>
#include <vector>

namespace eplb {
namespace detail {

inline size_t Z(int64_t i) { return static_cast<size_t>(i); }

// Replicates n experts into num_phy slots: every expert gets one, and each further slot copies
// the expert with the highest load per replica (lowest index on ties). This minimises the
// largest load per replica over all replica counts with sum num_phy.
// cnt: [n] out (>= 1). added: [num_phy - n] out or nullptr, the expert of each extra slot in
// the order they were added.
// beta != 1 ranks experts by w_e / cnt_e^beta instead (beta > 1: fewer replicas for the
// hottest experts, coarser replicas but more slots for the rest), an alternative start for the
// balanced search; beta = 1 is DeepSeek's rule.
inline void Replicate(const double* w, int64_t n, int64_t num_phy, int64_t* cnt, int64_t* added,
                      double beta = 1.0) {
  std::fill(cnt, cnt + n, 1);
  if (num_phy == n) return;
  // Heap of (load per replica, -index): the top is the largest, lowest index first.
  using Key = std::pair<double, int64_t>;
  std::vector<Key> heap(Z(n));
  for (int64_t e = 0; e < n; ++e) heap[Z(e)] = {w[e], -e};
  std::make_heap(heap.begin(), heap.end());
  for (int64_t i = 0; i < num_phy - n; ++i) {
    std::pop_heap(heap.begin(), heap.end());
    const int64_t e = -heap.back().second;
    const int64_t c = ++cnt[e];
    if (added != nullptr) added[i] = e;
    const double per =
        beta == 1.0 ? static_cast<double>(c) : std::pow(static_cast<double>(c), beta);
    heap.back() = {w[e] / per, -e};
    std::push_heap(heap.begin(), heap.end());
  }
}

// Packs items (weight[i]) into num_packs packs of exactly weight.size() / num_packs items:
// heaviest first (stable: lower index first on equal weight), each into the lightest pack that
// still has room (lowest pack index on ties). pack[i], rank_in_pack[i] out.
inline void BalancedPacking(const std::vector<double>& weight, int64_t num_packs,
                            std::vector<int64_t>* pack, std::vector<int64_t>* rank_in_pack) {
  const auto n = static_cast<int64_t>(weight.size());
  const int64_t per_pack = n / num_packs;
  pack->assign(Z(n), 0);
  rank_in_pack->assign(Z(n), 0);
  if (per_pack == 1) {
    std::iota(pack->begin(), pack->end(), 0);
    return;
  }
  // Heaviest first, lower index first on ties: sorting (-weight, index) keys is that order.
  std::vector<std::pair<double, int64_t>> keyed(Z(n));
  for (int64_t i = 0; i < n; ++i) keyed[Z(i)] = {-weight[Z(i)], i};
  std::sort(keyed.begin(), keyed.end());
  using Key = std::pair<double, int64_t>;  // (pack weight, pack index), min-heap
  std::vector<Key> heap(Z(num_packs));
  for (int64_t p = 0; p < num_packs; ++p) heap[Z(p)] = {0.0, p};
  // Already a valid min-heap: equal weights, increasing index.
  std::vector<int64_t> items(Z(num_packs), 0);
  const std::greater<Key> cmp;
  for (const auto& [neg_weight, i] : keyed) {
    std::pop_heap(heap.begin(), heap.end(), cmp);
    Key& top = heap.back();
    const int64_t p = top.second;
    (*pack)[Z(i)] = p;
    (*rank_in_pack)[Z(i)] = items[Z(p)]++;
    top.first += weight[Z(i)];
    if (items[Z(p)] == per_pack) {
      heap.pop_back();
    } else {
      std::push_heap(heap.begin(), heap.end(), cmp);
    }
  }
}

}  // namespace detail
}  // namespace eplb
