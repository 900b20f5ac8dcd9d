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

#include "planner/policies.h"

namespace eplb {
namespace {

// Balanced packing of n items into num_packs packs of n / num_packs items each.
// pack[i], rank_in_pack[i] out.
void BalancedPacking(const std::vector<double>& weight, int64_t num_packs,
                     std::vector<int64_t>* pack, std::vector<int64_t>* rank_in_pack) {
  const auto n = static_cast<int64_t>(weight.size());
  const int64_t per_pack = n / num_packs;
  pack->assign(static_cast<size_t>(n), 0);
  rank_in_pack->assign(static_cast<size_t>(n), 0);
  if (per_pack == 1) {
    std::iota(pack->begin(), pack->end(), 0);
    return;
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return weight[static_cast<size_t>(a)] > weight[static_cast<size_t>(b)];
  });
  std::vector<double> pack_weight(static_cast<size_t>(num_packs), 0.0);
  std::vector<int64_t> pack_items(static_cast<size_t>(num_packs), 0);
  for (int64_t i : order) {
    int64_t best = -1;
    for (int64_t p = 0; p < num_packs; ++p) {
      if (pack_items[static_cast<size_t>(p)] == per_pack) continue;
      if (best < 0 || pack_weight[static_cast<size_t>(p)] < pack_weight[static_cast<size_t>(best)])
        best = p;
    }
    (*pack)[static_cast<size_t>(i)] = best;
    (*rank_in_pack)[static_cast<size_t>(i)] = pack_items[static_cast<size_t>(best)]++;
    pack_weight[static_cast<size_t>(best)] += weight[static_cast<size_t>(i)];
  }
}

// Replicates num_log experts into num_phy slots: the first num_log slots hold each expert once,
// each further slot copies the expert with the highest load per replica.
void ReplicateExperts(const double* weight, int64_t num_log, int64_t num_phy,
                      std::vector<int64_t>* phy2log, std::vector<int64_t>* phyrank,
                      std::vector<int64_t>* logcnt) {
  phy2log->resize(static_cast<size_t>(num_phy));
  phyrank->assign(static_cast<size_t>(num_phy), 0);
  logcnt->assign(static_cast<size_t>(num_log), 1);
  std::iota(phy2log->begin(), phy2log->begin() + num_log, 0);
  for (int64_t i = num_log; i < num_phy; ++i) {
    int64_t best = 0;
    double best_w = weight[0] / static_cast<double>((*logcnt)[0]);
    for (int64_t e = 1; e < num_log; ++e) {
      const double w = weight[e] / static_cast<double>((*logcnt)[static_cast<size_t>(e)]);
      if (w > best_w) {
        best = e;
        best_w = w;
      }
    }
    (*phy2log)[static_cast<size_t>(i)] = best;
    (*phyrank)[static_cast<size_t>(i)] = (*logcnt)[static_cast<size_t>(best)]++;
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
  std::vector<double> group_load(static_cast<size_t>(G), 0.0);
  for (int64_t e = 0; e < E; ++e) group_load[static_cast<size_t>(e / group_size)] += load[e];
  std::vector<int64_t> group_pack, group_rank;
  BalancedPacking(group_load, N, &group_pack, &group_rank);
  std::vector<int64_t> mlog2log(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    const auto g = static_cast<size_t>(e / group_size);
    const int64_t mlog =
        (group_pack[g] * groups_per_node + group_rank[g]) * group_size + e % group_size;
    mlog2log[static_cast<size_t>(mlog)] = e;
  }

  std::vector<double> node_load(static_cast<size_t>(log_per_node));
  std::vector<int64_t> phy2mlog, node_phyrank, mlogcnt;
  std::vector<double> phy_load(static_cast<size_t>(phy_per_node));
  std::vector<int64_t> pack, rank_in_pack;
  for (int64_t n = 0; n < N; ++n) {
    // 2. replicate inside the node.
    for (int64_t i = 0; i < log_per_node; ++i)
      node_load[static_cast<size_t>(i)] = load[mlog2log[static_cast<size_t>(n * log_per_node + i)]];
    ReplicateExperts(node_load.data(), log_per_node, phy_per_node, &phy2mlog, &node_phyrank,
                     &mlogcnt);
    // 3. physical experts -> ranks of the node.
    for (int64_t j = 0; j < phy_per_node; ++j) {
      const auto m = static_cast<size_t>(phy2mlog[static_cast<size_t>(j)]);
      phy_load[static_cast<size_t>(j)] = node_load[m] / static_cast<double>(mlogcnt[m]);
    }
    BalancedPacking(phy_load, ranks_per_node, &pack, &rank_in_pack);
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
