// DeepSeek EPLB (github.com/deepseek-ai/EPLB), re-implemented from its description:
//   1. pack expert groups onto nodes, balancing group load (hierarchical only);
//   2. inside each node, replicate the expert with the highest load per replica until the
//      node's slots are used;
//   3. pack the node's physical experts onto its ranks, heaviest first, each to the lightest
//      rank that still has a free slot.
// The global policy is the same with one group and one node (num_groups % num_nodes != 0, or
// one group); one node with several groups is the grouped path, as in DeepSeek's code. Ties break
// towards the lower index (stable sorts), which is what DeepSeek's and vLLM's implementations do in
// practice.
#include <algorithm>
#include <numeric>
#include <vector>

#include "planner/packing.h"
#include "planner/policies.h"

namespace eplb {
namespace {

using detail::Z;

// ReplicateExperts as DeepSeek states it: phy2log [num_phy] lists each expert once, then the
// extra replicas in the order they were added; phyrank [num_phy] is each slot's replica ordinal
// (nullptr: not wanted); logcnt [num_log]. All out.
void ReplicateExperts(const double* weight, int64_t num_log, int64_t num_phy, int64_t* phy2log,
                      int64_t* phyrank, int64_t* logcnt) {
  std::iota(phy2log, phy2log + num_log, 0);
  detail::Replicate(weight, num_log, num_phy, logcnt, phy2log + num_log);
  if (phyrank == nullptr) return;
  std::fill_n(phyrank, num_log, 0);
  // Replica ordinals: the k-th added copy of an expert is its replica k.
  thread_local std::vector<int64_t> seen_tls;
  auto& seen = seen_tls;  // bound once: each use of a thread_local costs a TLS lookup
  seen.assign(Z(num_log), 0);
  for (int64_t i = num_log; i < num_phy; ++i) phyrank[i] = ++seen[Z(phy2log[i])];
}

}  // namespace

void DeepSeekLayer(const double* load, const Shape& shape, int64_t* phy2log, int64_t* phyrank) {
  DeepSeekLayers(load, shape, 1, phy2log, phyrank);
}

void DeepSeekLayers(const double* load, const Shape& shape, int64_t num_layers, int64_t* phy2log,
                    int64_t* phyrank) {
  // (groups that do not divide the experts: Plan refuses that shape for `deepseek`; the other
  // policies, which start from this placement, take the global one there)
  const bool hier = shape.deepseek_grouped() && shape.num_logical % shape.num_groups == 0;
  const int64_t E = shape.num_logical, P = shape.num_physical;
  const int64_t N = hier ? shape.num_nodes : 1;
  const int64_t G = hier ? shape.num_groups : 1;
  const int64_t R = shape.num_ranks;
  const int64_t group_size = E / G, groups_per_node = G / N, slots_per_rank = P / R;
  const int64_t log_per_node = E / N, phy_per_node = P / N, ranks_per_node = R / N;
  const int64_t layers = num_layers;

  // 1. groups -> nodes. mlog ("meta-logical") numbers experts node by node.
  // Scratch is per thread and kept between layers: no heap allocation per layer once warm.
  // Each array holds the layers side by side.
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    std::vector<double> group_load;
    std::vector<double> node_load;
    std::vector<double> phy_load;
    std::vector<int64_t> group_pack;
    std::vector<int64_t> group_rank;
    std::vector<int64_t> mlog2log;
    std::vector<int64_t> phy2mlog;
    std::vector<int64_t> node_phyrank;
    std::vector<int64_t> mlogcnt;
    std::vector<int64_t> pack;
    std::vector<int64_t> rank_in_pack;
  } tls;
  auto& group_load = tls.group_load;
  auto& node_load = tls.node_load;
  auto& phy_load = tls.phy_load;
  auto& group_pack = tls.group_pack;
  auto& group_rank = tls.group_rank;
  auto& mlog2log = tls.mlog2log;
  auto& phy2mlog = tls.phy2mlog;
  auto& node_phyrank = tls.node_phyrank;
  auto& mlogcnt = tls.mlogcnt;
  auto& pack = tls.pack;
  auto& rank_in_pack = tls.rank_in_pack;
  // Group sums, the groups side by side: each group's chain of dependent additions (in expert
  // order, as before) overlaps the others' instead of waiting for them. Nested loops: no integer
  // division per expert (one costs as much as the rest of the loop body many times over). With
  // one group per node (global: one group, one node) the packing is 0, 1, ... whatever the
  // loads: no sums (the global one would be a chain of E dependent additions).
  group_load.assign(Z(layers * G), 0.0);
  if (G > N) {
    for (int64_t l = 0; l < layers; ++l) {
      const double* w = load + l * E;
      double* gl = group_load.data() + l * G;
      for (int64_t k = 0; k < group_size; ++k)
        for (int64_t g = 0; g < G; ++g) gl[g] += w[g * group_size + k];
    }
  }
  group_pack.resize(Z(layers * G));
  group_rank.resize(Z(layers * G));
  detail::BalancedPacking(group_load.data(), layers, G, N, group_pack.data(), group_rank.data());
  mlog2log.resize(Z(layers * E));
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t* gp = group_pack.data() + l * G;
    const int64_t* gr = group_rank.data() + l * G;
    int64_t* m2l = mlog2log.data() + l * E;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t base = (gp[g] * groups_per_node + gr[g]) * group_size;
      for (int64_t k = 0; k < group_size; ++k) m2l[base + k] = g * group_size + k;
    }
  }

  // 2. replicate inside each node; node n's physical experts at [n * phy_per_node, ...).
  node_load.resize(Z(layers * E));
  phy_load.resize(Z(layers * P));
  phy2mlog.resize(Z(layers * P));
  node_phyrank.resize(Z(layers * P));
  mlogcnt.resize(Z(layers * E));
  for (int64_t l = 0; l < layers; ++l) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t* m2l = mlog2log.data() + l * E + n * log_per_node;
      const double* layer_load = load + l * E;
      double* w = node_load.data() + l * E + n * log_per_node;
      for (int64_t i = 0; i < log_per_node; ++i) w[i] = layer_load[m2l[i]];
      int64_t* phy = phy2mlog.data() + l * P + n * phy_per_node;
      int64_t* cnt = mlogcnt.data() + l * E + n * log_per_node;
      ReplicateExperts(
          w, log_per_node, phy_per_node, phy,
          phyrank != nullptr ? node_phyrank.data() + l * P + n * phy_per_node : nullptr, cnt);
      // Loads per replica. Only the replicated experts need a division (divisions are slow;
      // x / 1 is x): each such expert is among the added slots, which fix up its first slot
      // as well.
      double* per = phy_load.data() + l * P + n * phy_per_node;
      std::copy(w, w + log_per_node, per);
      for (int64_t j = log_per_node; j < phy_per_node; ++j) {
        const int64_t m = phy[j];
        per[j] = per[m] = w[m] / static_cast<double>(cnt[m]);
      }
    }
  }
  // 3. physical experts -> ranks of their node, all nodes of all layers at once
  // (BalancedPacking interleaves their greedy steps).
  pack.resize(Z(layers * P));
  rank_in_pack.resize(Z(layers * P));
  detail::BalancedPacking(phy_load.data(), layers * N, phy_per_node, ranks_per_node, pack.data(),
                          rank_in_pack.data());
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t* m2l = mlog2log.data() + l * E;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = n * phy_per_node; j < (n + 1) * phy_per_node; ++j) {
        const auto z = Z(l * P + j);
        const int64_t slot = n * phy_per_node + pack[z] * slots_per_rank + rank_in_pack[z];
        phy2log[l * P + slot] = m2l[phy2mlog[z] + n * log_per_node];
        if (phyrank != nullptr) phyrank[l * P + slot] = node_phyrank[z];  // (the same each time)
      }
    }
  }
}

}  // namespace eplb
