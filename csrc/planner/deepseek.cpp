// DeepSeek EPLB (github.com/deepseek-ai/EPLB), re-implemented from its description:
//   1. pack expert groups onto nodes, balancing group load (hierarchical only);
//   2. inside each node, replicate the expert with the highest load per replica until the
//      node's slots are used;
//   3. pack the node's physical experts onto its ranks, heaviest first, each to the lightest
//      rank that still has a free slot.
// The global policy is the same with one group and one node. Ties break towards the lower
// index (stable sorts), which is what DeepSeek's and vLLM's implementations do in practice.
#include <algorithm>
#include <numeric>
#include <vector>

#include "planner/packing.h"
#include "planner/policies.h"

namespace eplb {
namespace {

using detail::Z;

// ReplicateExperts as DeepSeek states it: phy2log [num_phy] lists each expert once, then the
// extra replicas in the order they were added; phyrank [num_phy] is each slot's replica ordinal.
void ReplicateExperts(const double* weight, int64_t num_log, int64_t num_phy,
                      std::vector<int64_t>* phy2log, std::vector<int64_t>* phyrank,
                      std::vector<int64_t>* logcnt) {
  phy2log->resize(Z(num_phy));
  phyrank->assign(Z(num_phy), 0);
  logcnt->assign(Z(num_log), 1);
  std::iota(phy2log->begin(), phy2log->begin() + num_log, 0);
  detail::Replicate(weight, num_log, num_phy, logcnt->data(), phy2log->data() + num_log);
  // Replica ordinals: the k-th added copy of an expert is its replica k.
  thread_local std::vector<int64_t> seen_tls;
  auto& seen = seen_tls;  // bound once: each use of a thread_local costs a TLS lookup
  seen.assign(Z(num_log), 0);
  for (int64_t i = num_log; i < num_phy; ++i) {
    const int64_t e = (*phy2log)[Z(i)];
    (*phyrank)[Z(i)] = ++seen[Z(e)];
  }
}

}  // namespace

void DeepSeekLayer(const double* load, const Shape& shape, int64_t* phy2log, int64_t* phyrank) {
  const bool hier = shape.hierarchical();
  const int64_t E = shape.num_logical, P = shape.num_physical;
  const int64_t N = hier ? shape.num_nodes : 1;
  const int64_t G = hier ? shape.num_groups : 1;
  const int64_t R = shape.num_ranks;
  const int64_t group_size = E / G, groups_per_node = G / N, slots_per_rank = P / R;
  const int64_t log_per_node = E / N, phy_per_node = P / N, ranks_per_node = R / N;

  // 1. groups -> nodes. mlog ("meta-logical") numbers experts node by node.
  // Scratch is per thread and kept between layers: no heap allocation per layer once warm.
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
  // Nested loops over (group, expert): no integer division per expert (one costs as much as the
  // rest of the loop body many times over).
  group_load.assign(static_cast<size_t>(G), 0.0);
  for (int64_t g = 0; g < G; ++g) {
    double sum = 0.0;
    for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) sum += load[e];
    group_load[static_cast<size_t>(g)] = sum;
  }
  detail::BalancedPacking(group_load, N, &group_pack, &group_rank);
  mlog2log.resize(static_cast<size_t>(E));
  for (int64_t g = 0; g < G; ++g) {
    const int64_t base = (group_pack[static_cast<size_t>(g)] * groups_per_node +
                          group_rank[static_cast<size_t>(g)]) *
                         group_size;
    for (int64_t k = 0; k < group_size; ++k)
      mlog2log[static_cast<size_t>(base + k)] = g * group_size + k;
  }

  node_load.resize(static_cast<size_t>(log_per_node));
  phy_load.resize(static_cast<size_t>(phy_per_node));
  for (int64_t n = 0; n < N; ++n) {
    // 2. replicate inside the node.
    for (int64_t i = 0; i < log_per_node; ++i)
      node_load[static_cast<size_t>(i)] = load[mlog2log[static_cast<size_t>(n * log_per_node + i)]];
    ReplicateExperts(node_load.data(), log_per_node, phy_per_node, &phy2mlog, &node_phyrank,
                     &mlogcnt);
    // 3. physical experts -> ranks of the node.
    for (int64_t j = 0; j < phy_per_node; ++j) {
      // x / 1 is x: divide only for replicated experts (divisions are slow).
      const auto m = static_cast<size_t>(phy2mlog[static_cast<size_t>(j)]);
      const int64_t c = mlogcnt[m];
      phy_load[static_cast<size_t>(j)] =
          c == 1 ? node_load[m] : node_load[m] / static_cast<double>(c);
    }
    detail::BalancedPacking(phy_load, ranks_per_node, &pack, &rank_in_pack);
    for (int64_t j = 0; j < phy_per_node; ++j) {
      const int64_t slot = n * phy_per_node + pack[static_cast<size_t>(j)] * slots_per_rank +
                           rank_in_pack[static_cast<size_t>(j)];
      const int64_t mlog = phy2mlog[static_cast<size_t>(j)] + n * log_per_node;
      phy2log[slot] = mlog2log[static_cast<size_t>(mlog)];
      phyrank[slot] = node_phyrank[static_cast<size_t>(j)];
    }
  }
}

}  // namespace eplb
