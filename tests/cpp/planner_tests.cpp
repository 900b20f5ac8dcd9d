// C++ unit tests of the planner core, runnable without Python (ctest, or under sanitizers with
// -DEPLB_NATIVE_SANITIZE=ON). Prints "N passed, N failed".
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "planner/packing.h"
#include "planner/placement.h"
#include "planner/policies.h"
#include "planner/worker.h"

namespace {

int g_passed = 0, g_failed = 0;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK(%s)\n", __FILE__, __LINE__, #cond); \
      throw std::runtime_error("check failed");                              \
    }                                                                        \
  } while (0)

void Run(const char* name, const std::function<void()>& fn) {
  try {
    fn();
    ++g_passed;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED %s: %s\n", name, e.what());
    ++g_failed;
  }
}

// Invariants of any placement.
void CheckPlacement(const eplb::PlanResult& r) {
  const auto& s = r.shape;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    std::vector<int64_t> cnt(static_cast<size_t>(s.num_logical), 0);
    for (int64_t p = 0; p < s.num_physical; ++p) {
      const int64_t e = r.phy2log[static_cast<size_t>(l * s.num_physical + p)];
      CHECK(e >= 0 && e < s.num_logical);
      ++cnt[static_cast<size_t>(e)];
    }
    for (int64_t e = 0; e < s.num_logical; ++e) {
      const auto i = static_cast<size_t>(l * s.num_logical + e);
      CHECK(cnt[static_cast<size_t>(e)] >= 1);
      CHECK(r.logcnt[i] == cnt[static_cast<size_t>(e)]);
      for (int64_t j = 0; j < r.max_replicas; ++j) {
        const int64_t p =
            r.log2phy[i * static_cast<size_t>(r.max_replicas) + static_cast<size_t>(j)];
        if (j < r.logcnt[i]) {
          CHECK(p >= 0 && p < s.num_physical);
          CHECK(r.phy2log[static_cast<size_t>(l * s.num_physical + p)] == e);
        } else {
          CHECK(p == -1);
        }
      }
    }
    CHECK(r.max_load_after[static_cast<size_t>(l)] + 1e-9 >= r.lower_bound[static_cast<size_t>(l)]);
  }
}

// Transfers rebuild the new placement from the old, one per changed slot, batches are matchings.
void CheckTransfers(const eplb::PlanResult& r, const std::vector<int64_t>& old) {
  const auto& s = r.shape;
  const int64_t P = s.num_physical, S = s.slots_per_rank();
  std::vector<int64_t> rebuilt = old;
  std::vector<int64_t> writes(static_cast<size_t>(s.num_layers * P), 0);
  for (size_t i = 0; i < r.transfers.size(); ++i) {
    const auto& t = r.transfers[i];
    const auto base = static_cast<size_t>(t.layer * P);
    CHECK(t.src_slot / S == t.src_rank && t.dst_slot / S == t.dst_rank);
    CHECK((t.kind != eplb::Transfer::kWire) == (t.src_rank == t.dst_rank));
    bool held = false;
    for (int64_t q = t.dst_rank * S; q < (t.dst_rank + 1) * S; ++q)
      held |= old[base + static_cast<size_t>(q)] == t.logical;
    CHECK(held == (t.kind == eplb::Transfer::kLocal));
    if (t.kind == eplb::Transfer::kDup) {
      // copies a wire transfer of the same layer, rank, expert and batch that comes before it
      bool source = false;
      for (size_t j = 0; j < i; ++j) {
        const auto& u = r.transfers[j];
        source |= u.layer == t.layer && u.kind == eplb::Transfer::kWire && u.batch == t.batch &&
                  u.dst_slot == t.src_slot && u.logical == t.logical;
      }
      CHECK(source);
    } else {
      CHECK(old[base + static_cast<size_t>(t.src_slot)] == t.logical);
    }
    if (t.kind == eplb::Transfer::kWire) {  // once per (rank, expert) and layer
      for (size_t j = 0; j < i; ++j) {
        const auto& u = r.transfers[j];
        CHECK(!(u.layer == t.layer && u.kind == eplb::Transfer::kWire && u.dst_rank == t.dst_rank &&
                u.logical == t.logical));
      }
    }
    rebuilt[base + static_cast<size_t>(t.dst_slot)] = t.logical;
    ++writes[base + static_cast<size_t>(t.dst_slot)];
  }
  CHECK(rebuilt == r.phy2log);
  for (size_t i = 0; i < writes.size(); ++i) CHECK(writes[i] == (r.phy2log[i] != old[i] ? 1 : 0));
  // batch matching: (layer, batch, rank) -> the one peer
  for (size_t i = 0; i < r.transfers.size(); ++i)
    for (size_t j = i + 1; j < r.transfers.size(); ++j) {
      const auto& a = r.transfers[i];
      const auto& b = r.transfers[j];
      if (a.kind != eplb::Transfer::kWire || b.kind != eplb::Transfer::kWire ||
          a.layer != b.layer || a.batch != b.batch)
        continue;
      for (int64_t x : {a.src_rank, a.dst_rank})
        for (int64_t y : {b.src_rank, b.dst_rank})
          if (x == y) {
            const int64_t pa = x == a.src_rank ? a.dst_rank : a.src_rank;
            const int64_t pb = y == b.src_rank ? b.dst_rank : b.src_rank;
            CHECK(pa == pb);
          }
    }
}

eplb::Shape RandomShape(std::mt19937_64& rng) {
  eplb::Shape s;
  s.num_layers = 1 + static_cast<int64_t>(rng() % 3);
  s.num_nodes = 1 + static_cast<int64_t>(rng() % 2);
  s.num_ranks = s.num_nodes * (1 + static_cast<int64_t>(rng() % 4));
  s.num_groups = s.num_nodes * (1 + static_cast<int64_t>(rng() % 2));
  s.num_logical = s.num_groups * (1 + static_cast<int64_t>(rng() % 6));
  const int64_t spr =
      (s.num_logical + s.num_ranks - 1) / s.num_ranks + static_cast<int64_t>(rng() % 3);
  s.num_physical = spr * s.num_ranks;
  return s;
}

std::vector<int64_t> RandomPlacement(std::mt19937_64& rng, const eplb::Shape& s) {
  std::vector<int64_t> out;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    std::vector<int64_t> row(static_cast<size_t>(s.num_physical));
    for (int64_t p = 0; p < s.num_physical; ++p)
      row[static_cast<size_t>(p)] =
          p < s.num_logical ? p
                            : static_cast<int64_t>(rng() % static_cast<uint64_t>(s.num_logical));
    std::shuffle(row.begin(), row.end(), rng);
    out.insert(out.end(), row.begin(), row.end());
  }
  return out;
}

// Second (and further) replicas of an expert on one rank, over a layer's placement.
int64_t Duplicates(const int64_t* phy2log, const eplb::Shape& s) {
  const int64_t S = s.slots_per_rank();
  int64_t dups = 0;
  for (int64_t p = 0; p < s.num_physical; ++p)
    dups += std::find(phy2log + p / S * S, phy2log + p, phy2log[p]) != phy2log + p;
  return dups;
}

// Every replica of a group's experts on the group's one node, num_groups / num_nodes groups per
// node (DeepSeek's hierarchical topology).
bool KeepsTopology(const int64_t* phy2log, const eplb::Shape& s) {
  const int64_t group_size = s.num_logical / s.num_groups,
                node_slots = s.num_physical / s.num_nodes;
  std::vector<int64_t> node_of(static_cast<size_t>(s.num_groups), -1);
  std::vector<int64_t> per_node(static_cast<size_t>(s.num_nodes), 0);
  for (int64_t p = 0; p < s.num_physical; ++p) {
    auto& n = node_of[static_cast<size_t>(phy2log[p] / group_size)];
    if (n < 0) {
      n = p / node_slots;
      ++per_node[static_cast<size_t>(n)];
    } else if (n != p / node_slots) {
      return false;
    }
  }
  for (int64_t c : per_node)
    if (c != s.num_groups / s.num_nodes) return false;
  return true;
}

// Plain references of packing.h's building blocks (DeepSeek EPLB's steps as written: linear
// scans, lowest index on ties), which the fast versions must match exactly.
std::vector<int64_t> RefOrder(const std::vector<double>& w) {
  std::vector<int64_t> order(w.size());
  for (size_t i = 0; i < w.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return w[static_cast<size_t>(a)] > w[static_cast<size_t>(b)];
  });
  return order;
}

void RefPacking(const std::vector<double>& w, int64_t num_packs, std::vector<int64_t>* pack,
                std::vector<int64_t>* rank) {
  const auto n = static_cast<int64_t>(w.size());
  const int64_t per_pack = n / num_packs;
  std::vector<double> load(static_cast<size_t>(num_packs), 0.0);
  std::vector<int64_t> items(static_cast<size_t>(num_packs), 0);
  pack->assign(w.size(), -1);
  rank->assign(w.size(), 0);
  if (per_pack == 1) {  // DeepSeek keeps the item order when every pack takes one item
    for (int64_t i = 0; i < n; ++i) (*pack)[static_cast<size_t>(i)] = i;
    return;
  }
  for (const int64_t i : RefOrder(w)) {
    int64_t p = -1;
    for (int64_t q = 0; q < num_packs; ++q) {
      const auto z = static_cast<size_t>(q);
      if (items[z] < per_pack && (p < 0 || load[z] < load[static_cast<size_t>(p)])) p = q;
    }
    (*pack)[static_cast<size_t>(i)] = p;
    (*rank)[static_cast<size_t>(i)] = items[static_cast<size_t>(p)]++;
    load[static_cast<size_t>(p)] += w[static_cast<size_t>(i)];
  }
}

// Each extra slot to the expert with the highest load per replica, lowest index on ties.
std::vector<int64_t> RefReplicate(const std::vector<double>& w, int64_t num_phy,
                                  std::vector<int64_t>* cnt) {
  const auto n = static_cast<int64_t>(w.size());
  cnt->assign(w.size(), 1);
  std::vector<int64_t> added;
  for (int64_t k = n; k < num_phy; ++k) {
    int64_t best = 0;
    for (int64_t e = 1; e < n; ++e) {
      const auto z = static_cast<size_t>(e), b = static_cast<size_t>(best);
      if (w[z] / static_cast<double>((*cnt)[z]) > w[b] / static_cast<double>((*cnt)[b])) best = e;
    }
    ++(*cnt)[static_cast<size_t>(best)];
    added.push_back(best);
  }
  return added;
}

// Weights with many ties and zeros (small integers), or spread over decades, or all equal, or
// so large that pack sums overflow, or spread over hundreds of decades (BalancedPacking's
// double-keyed fallback).
std::vector<double> RandomWeights(std::mt19937_64& rng, int64_t n) {
  std::vector<double> w(static_cast<size_t>(n));
  const auto kind = rng() % 6;
  std::lognormal_distribution<double> d(0.0, 2.0);
  for (auto& x : w) {
    if (kind == 0) x = static_cast<double>(rng() % 4);
    if (kind == 1) x = 1.0 + static_cast<double>(rng() % 3);
    if (kind == 2) x = d(rng);
    if (kind == 3) x = 5.0;
    if (kind == 4) x = 1e307 * static_cast<double>(1 + rng() % 5);
    if (kind == 5) x = std::pow(10.0, static_cast<double>(rng() % 500) - 300.0);
  }
  return w;
}

}  // namespace

int main() {
  Run("min_move hierarchical from a placement that keeps the topology", [] {
    // The old placement is DeepSeek's for other loads, so min_move searches inside nodes, swaps
    // groups between nodes or walks balanced's placement back; all must keep the topology.
    std::mt19937_64 rng(31);
    std::lognormal_distribution<double> d(0.0, 1.0);
    for (int it = 0; it < 300; ++it) {
      eplb::Shape s;
      s.num_layers = 2;
      s.num_nodes = 2 + static_cast<int64_t>(rng() % 3);
      s.num_ranks = s.num_nodes * (1 + static_cast<int64_t>(rng() % 4));
      s.num_groups = s.num_nodes * (1 + static_cast<int64_t>(rng() % 3));
      s.num_logical = s.num_groups * (1 + static_cast<int64_t>(rng() % 5));
      const int64_t per_rank = (s.num_logical + s.num_ranks - 1) / s.num_ranks;
      s.num_physical = (per_rank + static_cast<int64_t>(rng() % 3)) * s.num_ranks;
      std::vector<double> before(static_cast<size_t>(s.num_layers * s.num_logical)), load = before;
      for (auto& x : before) x = std::floor(100.0 * d(rng));
      for (auto& x : load) x = std::floor(100.0 * d(rng));
      eplb::PlanOptions o;
      o.policy = eplb::Policy::kDeepSeek;
      const std::vector<int64_t> old = eplb::Plan(before.data(), nullptr, s, o).phy2log;
      o.policy = eplb::Policy::kBalanced;
      const auto bal = eplb::Plan(load.data(), old.data(), s, o);
      o.policy = eplb::Policy::kMinMove;
      const auto mm = eplb::Plan(load.data(), old.data(), s, o);
      CheckPlacement(mm);
      CheckTransfers(mm, old);
      for (int64_t l = 0; l < s.num_layers; ++l) {
        CHECK(KeepsTopology(mm.phy2log.data() + l * s.num_physical, s));
        const auto i = static_cast<size_t>(l);
        CHECK(mm.max_load_after[i] * 0.99 <= bal.max_load_after[i] * (1 + 1e-12));
      }
    }
  });
  Run("refine: same slots per pack, max not raised, duplicates never added", [] {
    std::mt19937_64 rng(21);
    std::lognormal_distribution<double> d(0.0, 1.0);
    int64_t removed = 0;
    for (int it = 0; it < 2000; ++it) {
      eplb::Shape s = RandomShape(rng);
      s.num_layers = 1;
      std::vector<double> load(static_cast<size_t>(s.num_logical));
      for (auto& x : load) x = std::floor(100.0 * d(rng));
      // a placement that keeps groups on nodes when hierarchical: DeepSeek's, ranks shuffled
      // inside nodes' slots so that duplicates appear
      std::vector<int64_t> phy(static_cast<size_t>(s.num_physical)), phyrank(phy.size());
      eplb::DeepSeekLayer(load.data(), s, phy.data(), phyrank.data());
      const int64_t packs = s.hierarchical() ? s.num_nodes : 1;
      const auto pack_slots = static_cast<size_t>(s.num_physical / packs);
      for (int64_t n = 0; n < packs; ++n)
        std::shuffle(phy.begin() + static_cast<std::ptrdiff_t>(n * pack_slots),
                     phy.begin() + static_cast<std::ptrdiff_t>((n + 1) * pack_slots), rng);
      const std::vector<int64_t> before = phy;
      eplb::RefineLayer(load.data(), s, phy.data());
      CHECK(eplb::MaxRankLoad(load.data(), phy.data(), s) <=
            eplb::MaxRankLoad(load.data(), before.data(), s));
      for (int64_t n = 0; n < packs; ++n) {
        std::vector<int64_t> a(before.begin() + static_cast<std::ptrdiff_t>(n * pack_slots),
                               before.begin() + static_cast<std::ptrdiff_t>((n + 1) * pack_slots));
        std::vector<int64_t> b(phy.begin() + static_cast<std::ptrdiff_t>(n * pack_slots),
                               phy.begin() + static_cast<std::ptrdiff_t>((n + 1) * pack_slots));
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        CHECK(a == b);
      }
      const int64_t dups = Duplicates(phy.data(), s);
      CHECK(dups <= Duplicates(before.data(), s));
      removed += Duplicates(before.data(), s) - dups;
    }
    CHECK(removed > 0);
  });
  Run("refine: a duplicate off the max rank is swapped out", [] {
    eplb::Shape s;
    s.num_layers = 1;
    s.num_logical = 4;
    s.num_physical = 6;
    s.num_ranks = 3;
    // expert 0 (load 4, 2 replicas of 2) twice on rank 0; rank 1 holds {1: 5, 2: 1}.
    const std::vector<double> load = {4.0, 5.0, 1.0, 2.0, 0.0, 0.0};
    std::vector<int64_t> phy = {0, 0, 1, 2, 3, 3};  // rank loads 4, 6, 2
    eplb::RefineLayer(load.data(), s, phy.data());
    CHECK(Duplicates(phy.data(), s) == 0);
    CHECK(eplb::MaxRankLoad(load.data(), phy.data(), s) <= 6.0);
  });
  Run("PreserveSlots: the counter path (ids known in range) equals the search path", [] {
    std::mt19937_64 rng(6);
    for (int it = 0; it < 500; ++it) {
      eplb::Shape s = RandomShape(rng);
      const std::vector<int64_t> old = RandomPlacement(rng, s);
      std::vector<int64_t> fast = RandomPlacement(rng, s);
      std::vector<int64_t> slow = fast;
      eplb::PreserveSlots(fast.data(), old.data(), s);
      s.num_logical = 0;  // unknown id range (the Python entry point): the search per old slot
      eplb::PreserveSlots(slow.data(), old.data(), s);
      CHECK(fast == slow);
    }
  });
  Run("packing building blocks match their plain references", [] {
    std::mt19937_64 rng(5);
    for (int it = 0; it < 3000; ++it) {
      const int64_t packs = 1 + static_cast<int64_t>(rng() % 40);
      const int64_t per_pack = 1 + static_cast<int64_t>(rng() % 10);
      const std::vector<double> w = RandomWeights(rng, packs * per_pack);
      const auto n = static_cast<int64_t>(w.size());
      std::vector<int64_t> order(w.size());
      eplb::detail::SortHeaviestFirst(w.data(), n, order.data());
      CHECK(order == RefOrder(w));
      std::vector<int64_t> pack, rank, ref_pack, ref_rank;
      eplb::detail::BalancedPacking(w, packs, &pack, &rank);
      RefPacking(w, packs, &ref_pack, &ref_rank);
      CHECK(pack == ref_pack && rank == ref_rank);
      const int64_t num_phy = n + static_cast<int64_t>(rng() % static_cast<uint64_t>(2 * n + 1));
      std::vector<int64_t> cnt(w.size()), added(static_cast<size_t>(num_phy - n)), ref_cnt;
      eplb::detail::Replicate(w.data(), n, num_phy, cnt.data(), added.data());
      CHECK(added == RefReplicate(w, num_phy, &ref_cnt) && cnt == ref_cnt);
    }
  });
  Run("SortHeaviestFirst matches its reference on large item counts (wider radix digits)", [] {
    std::mt19937_64 rng(15);
    for (int it = 0; it < 60; ++it) {
      const auto n = static_cast<int64_t>(1 + rng() % 5000);
      const std::vector<double> w = RandomWeights(rng, n);
      std::vector<int64_t> order(w.size());
      eplb::detail::SortHeaviestFirst(w.data(), n, order.data());
      CHECK(order == RefOrder(w));
    }
  });
  Run("DeepSeekLayers on several layers equals DeepSeekLayer on each", [] {
    std::mt19937_64 rng(16);
    for (int it = 0; it < 300; ++it) {
      const eplb::Shape s = RandomShape(rng);
      const int64_t layers = 1 + static_cast<int64_t>(rng() % 5);
      const auto P = static_cast<size_t>(s.num_physical);
      std::vector<double> load;
      for (int64_t l = 0; l < layers; ++l) {
        const std::vector<double> w = RandomWeights(rng, s.num_logical);
        load.insert(load.end(), w.begin(), w.end());
      }
      std::vector<int64_t> phy(P * static_cast<size_t>(layers)), rank(phy.size());
      eplb::DeepSeekLayers(load.data(), s, layers, phy.data(), rank.data());
      std::vector<int64_t> one_phy(P), one_rank(P);
      for (int64_t l = 0; l < layers; ++l) {
        eplb::DeepSeekLayer(load.data() + l * s.num_logical, s, one_phy.data(), one_rank.data());
        CHECK(std::equal(one_phy.begin(), one_phy.end(), phy.begin() + l * s.num_physical));
        CHECK(std::equal(one_rank.begin(), one_rank.end(), rank.begin() + l * s.num_physical));
      }
    }
  });
  Run("distinct ranks: no repeat on a rank, topology kept, every policy, or a named refusal", [] {
    std::mt19937_64 rng(41);
    int64_t planned = 0, refused = 0;
    for (int it = 0; it < 1500; ++it) {
      const eplb::Shape s = RandomShape(rng);
      std::vector<double> load, other;
      for (int64_t l = 0; l < s.num_layers; ++l) {
        const std::vector<double> a = RandomWeights(rng, s.num_logical);
        const std::vector<double> b = RandomWeights(rng, s.num_logical);
        load.insert(load.end(), a.begin(), a.end());
        other.insert(other.end(), b.begin(), b.end());
      }
      for (auto* v : {&load, &other})  // (Plan refuses loads whose sums could overflow)
        for (auto& x : *v) x = std::min(x, 1e300);
      eplb::PlanOptions o;
      o.policy = eplb::Policy::kDeepSeek;
      const std::vector<int64_t> old = eplb::Plan(other.data(), nullptr, s, o).phy2log;
      const int64_t packs = s.hierarchical() ? s.num_nodes : 1;
      const bool feasible = s.num_logical / packs >= s.slots_per_rank();
      o.distinct_ranks = true;
      for (int pol = 0; pol < 3; ++pol) {
        o.policy = static_cast<eplb::Policy>(pol);
        for (const bool with_old : {false, true}) {
          if (pol == 2 && !with_old) continue;
          try {
            const auto r = eplb::Plan(load.data(), with_old ? old.data() : nullptr, s, o);
            CHECK(feasible);
            ++planned;
            CheckPlacement(r);
            if (with_old) CheckTransfers(r, old);
            const int64_t S = s.slots_per_rank();
            for (int64_t l = 0; l < s.num_layers; ++l) {
              const int64_t* row = r.phy2log.data() + l * s.num_physical;
              for (int64_t k = 0; k < s.num_ranks; ++k) {
                std::vector<int64_t> rank(row + k * S, row + (k + 1) * S);
                std::sort(rank.begin(), rank.end());
                CHECK(std::adjacent_find(rank.begin(), rank.end()) == rank.end());
              }
              if (s.hierarchical()) CHECK(KeepsTopology(row, s));
            }
          } catch (const std::invalid_argument& e) {
            CHECK(!feasible && std::string(e.what()).find("distinct_ranks") != std::string::npos);
            ++refused;
          }
        }
      }
    }
    CHECK(planned > 1000 && refused > 10);
  });
  Run("random shapes keep the invariants", [] {
    std::mt19937_64 rng(7);
    for (int it = 0; it < 300; ++it) {
      const eplb::Shape s = RandomShape(rng);
      std::vector<double> load(static_cast<size_t>(s.num_layers * s.num_logical));
      std::lognormal_distribution<double> d(0.0, 1.0);
      for (auto& x : load) x = std::floor(100.0 * d(rng));
      for (int pol = 0; pol < 2; ++pol) {
        eplb::PlanOptions o;
        o.policy = static_cast<eplb::Policy>(pol);
        CheckPlacement(eplb::Plan(load.data(), nullptr, s, o));
      }
    }
  });
  Run("bad shapes throw invalid_argument", [] {
    eplb::Shape s;
    s.num_layers = 1;
    s.num_logical = 8;
    s.num_physical = 9;
    s.num_ranks = 2;
    std::vector<double> load(8, 1.0);
    bool threw = false;
    try {
      eplb::Plan(load.data(), nullptr, s, eplb::PlanOptions{});
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    CHECK(threw);
  });
  Run("old placement: every policy, transfers and moved slots", [] {
    std::mt19937_64 rng(11);
    std::lognormal_distribution<double> d(0.0, 1.0);
    for (int it = 0; it < 200; ++it) {
      const eplb::Shape s = RandomShape(rng);
      std::vector<double> load(static_cast<size_t>(s.num_layers * s.num_logical));
      for (auto& x : load) x = std::floor(100.0 * d(rng));
      const std::vector<int64_t> old = RandomPlacement(rng, s);
      for (int pol = 0; pol < 3; ++pol) {
        eplb::PlanOptions o;
        o.policy = static_cast<eplb::Policy>(pol);
        const auto r = eplb::Plan(load.data(), old.data(), s, o);
        CheckPlacement(r);
        CheckTransfers(r, old);
        int64_t moved = 0;
        for (size_t i = 0; i < old.size(); ++i) moved += old[i] != r.phy2log[i];
        int64_t reported = 0;
        for (int64_t m : r.moved_slots) reported += m;
        CHECK(moved == reported);
      }
    }
  });
  Run("threads give identical plans", [] {
    std::mt19937_64 rng(12);
    eplb::Shape s;
    s.num_layers = 9;
    s.num_logical = 32;
    s.num_physical = 40;
    s.num_ranks = 8;
    s.num_nodes = 2;
    s.num_groups = 4;
    std::vector<double> load(static_cast<size_t>(s.num_layers * s.num_logical));
    std::lognormal_distribution<double> d(0.0, 1.5);
    for (auto& x : load) x = d(rng);
    const std::vector<int64_t> old = RandomPlacement(rng, s);
    for (int pol = 0; pol < 3; ++pol) {
      eplb::PlanOptions o;
      o.policy = static_cast<eplb::Policy>(pol);
      const auto a = eplb::Plan(load.data(), old.data(), s, o);
      o.threads = 4;
      const auto b = eplb::Plan(load.data(), old.data(), s, o);
      CHECK(a.phy2log == b.phy2log && a.log2phy == b.log2phy);
      CHECK(a.lower_bound == b.lower_bound && a.transfers.size() == b.transfers.size());
    }
  });
  Run("balanced never worse than deepseek; min_move reaches its target", [] {
    std::mt19937_64 rng(13);
    std::lognormal_distribution<double> d(0.0, 1.2);
    for (int it = 0; it < 100; ++it) {
      const eplb::Shape s = RandomShape(rng);
      std::vector<double> load(static_cast<size_t>(s.num_layers * s.num_logical));
      for (auto& x : load) x = d(rng);
      eplb::PlanOptions o;
      o.policy = eplb::Policy::kDeepSeek;
      const auto ds = eplb::Plan(load.data(), nullptr, s, o);
      o.policy = eplb::Policy::kBalanced;
      const auto bal = eplb::Plan(load.data(), nullptr, s, o);
      std::vector<int64_t> old = ds.phy2log;
      const auto bal_old = eplb::Plan(load.data(), old.data(), s, o);
      o.policy = eplb::Policy::kMinMove;
      const auto mm = eplb::Plan(load.data(), old.data(), s, o);
      for (size_t l = 0; l < static_cast<size_t>(s.num_layers); ++l) {
        CHECK(bal.max_load_after[l] <= ds.max_load_after[l] * (1 + 1e-12));
        CHECK(mm.max_load_after[l] * 0.99 <= bal_old.max_load_after[l] * (1 + 1e-12));
      }
    }
  });
  Run("bad old placement and options throw invalid_argument", [] {
    eplb::Shape s;
    s.num_layers = 1;
    s.num_logical = 4;
    s.num_physical = 4;
    s.num_ranks = 2;
    std::vector<double> load(4, 1.0);
    std::vector<int64_t> old = {0, 1, 2, 2};  // expert 3 has no slot
    auto throws = [&](const int64_t* o, eplb::PlanOptions opt) {
      try {
        eplb::Plan(load.data(), o, s, opt);
      } catch (const std::invalid_argument&) {
        return true;
      }
      return false;
    };
    CHECK(throws(old.data(), eplb::PlanOptions{}));
    old = {0, 1, 2, 4};  // out of range
    CHECK(throws(old.data(), eplb::PlanOptions{}));
    eplb::PlanOptions mm;
    mm.policy = eplb::Policy::kMinMove;
    CHECK(throws(nullptr, mm));
    eplb::PlanOptions th;
    th.threads = 0;
    CHECK(throws(nullptr, th));
  });
  Run("MatchBlocks equals the greedy over every pair that shares an expert", [] {
    // Reference: list every (fresh, old) pair with its multiset intersection, take them by
    // (overlap desc, fresh, old) while both are free, then the free ones in order. Blocks drawn
    // from a small expert pool, so pairs share two or more copies and hot experts fill many;
    // the blocks taking part are n of `total`, in shuffled order on either side (as a node's
    // ranks are), n = 1 included.
    std::mt19937_64 rng(47);
    auto z = [](int64_t i) { return static_cast<size_t>(i); };
    for (int it = 0; it < 20000; ++it) {
      const auto total = static_cast<int64_t>(1 + rng() % 14);
      const auto n = static_cast<int64_t>(1 + rng() % static_cast<uint64_t>(total));
      const auto block = static_cast<int64_t>(1 + rng() % 6);
      const auto pool = static_cast<int64_t>(1 + rng() % static_cast<uint64_t>(total * block));
      std::vector<int64_t> fresh(z(total * block)), old(fresh.size());
      for (auto& x : fresh) x = static_cast<int64_t>(rng() % static_cast<uint64_t>(pool));
      for (auto& x : old)
        x = rng() % 3 == 0 ? fresh[rng() % fresh.size()]
                           : static_cast<int64_t>(rng() % static_cast<uint64_t>(pool));
      std::vector<int64_t> all(z(total));
      for (int64_t i = 0; i < total; ++i) all[z(i)] = i;
      std::shuffle(all.begin(), all.end(), rng);
      std::vector<int64_t> fresh_ids(all.begin(), all.begin() + n);
      std::shuffle(all.begin(), all.end(), rng);
      std::vector<int64_t> old_ids(all.begin(), all.begin() + n);
      if (rng() % 2) {  // in ascending order, as the global renumbering passes them
        std::sort(fresh_ids.begin(), fresh_ids.end());
        std::sort(old_ids.begin(), old_ids.end());
      }
      std::vector<int64_t> got;
      eplb::detail::MatchBlocks(fresh.data(), old.data(), block, fresh_ids, old_ids, pool, &got);
      struct P {
        int64_t overlap, i, j;
      };
      std::vector<P> pairs;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          const int64_t* fb = fresh.data() + fresh_ids[z(i)] * block;
          const int64_t* ob = old.data() + old_ids[z(j)] * block;
          std::vector<int64_t> a(fb, fb + block), b(ob, ob + block);
          std::sort(a.begin(), a.end());
          std::sort(b.begin(), b.end());
          std::vector<int64_t> common;
          std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
          if (!common.empty()) pairs.push_back({static_cast<int64_t>(common.size()), i, j});
        }
      std::sort(pairs.begin(), pairs.end(), [](const P& x, const P& y) {
        return x.overlap > y.overlap ||
               (x.overlap == y.overlap && (x.i < y.i || (x.i == y.i && x.j < y.j)));
      });
      std::vector<int64_t> want(z(n), -1);
      std::vector<char> taken(z(n), 0);
      for (const P& pr : pairs) {
        if (want[z(pr.i)] >= 0 || taken[z(pr.j)]) continue;
        want[z(pr.i)] = old_ids[z(pr.j)];
        taken[z(pr.j)] = 1;
      }
      int64_t next = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (want[z(i)] >= 0) continue;
        while (taken[z(next)]) ++next;
        want[z(i)] = old_ids[z(next)];
        taken[z(next)] = 1;
      }
      CHECK(got == want);
    }
  });
  Run("worker reports each job's start before its outcome, cancelled jobs without a start", [] {
    eplb::Worker worker;
    eplb::Shape s;
    s.num_layers = 2;
    s.num_logical = 8;
    s.num_physical = 10;
    s.num_ranks = 2;
    eplb::PlanJob job;
    job.shape = s;
    job.load.assign(16, 1.0);
    std::vector<uint64_t> ids;
    for (int k = 0; k < 4; ++k) ids.push_back(worker.Submit(job));
    const bool cancelled = worker.Cancel(ids[3]);  // queued unless the worker got there first
    std::vector<int> started(5, 0), finished(5, 0);
    eplb::PlanDone d;
    for (int got = 0; got < 4;) {
      CHECK(worker.WaitNext(&d));
      const auto k = static_cast<size_t>(d.id - ids[0]);
      CHECK(k < 4);
      if (d.started) {
        CHECK(!finished[k] && !started[k]);
        started[k] = 1;
        continue;
      }
      CHECK(!finished[k]);
      finished[k] = 1;
      ++got;
      CHECK(d.cancelled ? !started[k] : (started[k] && d.ok));
    }
    CHECK(finished[3] && (!cancelled || !started[3]));
    worker.Close();
    CHECK(!worker.WaitNext(&d));
    worker.Join();
  });
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
