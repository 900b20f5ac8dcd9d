// The `balanced` policy: DeepSeek's greedy placement, then a local search that lowers the max
// rank load until no step does.
//
// Per pack of ranks (the whole EP group for the global policy, one node for the hierarchical):
//   1. replica counts: each extra slot copies the expert with the highest load per replica;
//   2. LPT: replicas heaviest first, each to the lightest rank with a free slot;
//      (1 + 2 are DeepSeek EPLB's steps with the same tie-breaking, so the search starts from
//      DeepSeek's placement and can only improve on it);
//   3. local search on the heaviest rank h (load M), best step first:
//      - swap a replica of h with a lighter replica of another rank o, when the two new loads
//        are both below M;
//      - when no swap helps, re-decide one replica count: turn a slot holding expert a
//        (a has >= 2 replicas) into a replica of expert b, where either the slot is on h or b
//        is on h. That changes the load per replica of a and b on every rank holding them; the
//        step is taken only if every rank it touches ends below M and h is among them.
//      Each step lowers M or the number of ranks at M, so the sorted rank loads decrease
//      lexicographically and the search ends; it also stops early at the trivial bound
//      max(mean rank load, smallest possible largest replica).
// Hierarchical (DeepSeek's rule: num_groups % num_nodes == 0, num_nodes > 1): whole expert
// groups go to nodes, num_groups / num_nodes per node, and every replica of an expert stays on
// its group's node (as DeepSeek does). Two group->node partitions are tried: DeepSeek's greedy
// one and the same refined by group swaps between the heaviest node and the others; each node is
// then packed as above, and the partition with the lower max rank load wins (DeepSeek's on ties).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "planner/packing.h"
#include "planner/policies.h"

namespace eplb {
namespace {

using detail::Z;

class PackSearch {
 public:
  // w: [n] loads of the pack's experts; the pack has num_ranks ranks of S slots.
  PackSearch(const double* w, int64_t n, int64_t num_ranks, int64_t S)
      : w_(w), n_(n), R_(num_ranks), S_(S) {}

  // Runs steps 1-3; slot_exp() then holds the local expert id of each of the R*S slots.
  void Run() {
    Initial();
    Search();
  }
  const std::vector<int64_t>& slot_exp() const { return slot_exp_; }
  double MaxLoad() const { return *std::max_element(load_.begin(), load_.end()); }

 private:
  double Wt(int64_t e) const { return w_[e] / static_cast<double>(cnt_[Z(e)]); }

  void Initial() {
    const int64_t P = R_ * S_;
    cnt_.assign(Z(n_), 1);
    std::vector<int64_t> phy(Z(P));
    std::iota(phy.begin(), phy.begin() + n_, 0);
    detail::Replicate(w_, n_, P, cnt_.data(), phy.data() + n_);
    std::vector<double> wt(Z(P));
    for (int64_t i = 0; i < P; ++i) wt[Z(i)] = Wt(phy[Z(i)]);
    std::vector<int64_t> pack, rank_in_pack;
    detail::BalancedPacking(wt, R_, &pack, &rank_in_pack);
    slot_exp_.assign(Z(P), 0);
    for (int64_t i = 0; i < P; ++i) slot_exp_[Z(pack[Z(i)] * S_ + rank_in_pack[Z(i)])] = phy[Z(i)];
    // Stop criterion: no placement beats the mean rank load nor the largest replica of the
    // greedy counts (they minimise the largest replica).
    double total = 0.0, largest = 0.0;
    for (int64_t e = 0; e < n_; ++e) {
      total += w_[e];
      largest = std::max(largest, Wt(e));
    }
    trivial_bound_ = std::max(total / static_cast<double>(R_), largest);
    load_.assign(Z(R_), 0.0);
    for (int64_t r = 0; r < R_; ++r) load_[Z(r)] = RankLoad(r);
  }

  double RankLoad(int64_t r) const {
    double sum = 0.0;
    for (int64_t j = r * S_; j < (r + 1) * S_; ++j) sum += Wt(slot_exp_[Z(j)]);
    return sum;
  }

  void Search() {
    if (S_ == 0) return;
    const int64_t max_steps = 16 * R_ * S_ + 64;
    for (int64_t step = 0; step < max_steps; ++step) {
      const int64_t h = std::max_element(load_.begin(), load_.end()) - load_.begin();
      const double M = load_[Z(h)];
      if (!(M > 0.0) || M <= trivial_bound_ * (1.0 + 1e-12)) return;
      const double tol = 1e-12 * M;
      if (TrySwap(h, M, tol)) continue;
      if (!lists_ready_) BuildLists();
      if (TryConvert(h, M, tol)) continue;
      return;
    }
  }

  // Best swap of a replica of h with a lighter one of another rank; true if one was applied.
  bool TrySwap(int64_t h, double M, double tol) {
    double best = M - tol;
    int64_t bi = -1, bj = -1;
    for (int64_t o = 0; o < R_; ++o) {
      const double gap = M - load_[Z(o)];
      if (o == h || gap <= 2 * tol) continue;
      for (int64_t i = h * S_; i < (h + 1) * S_; ++i) {
        const double wx = Wt(slot_exp_[Z(i)]);
        for (int64_t j = o * S_; j < (o + 1) * S_; ++j) {
          const double d = wx - Wt(slot_exp_[Z(j)]);
          if (d <= tol || d >= gap - tol) continue;
          const double cand = std::max(M - d, load_[Z(o)] + d);
          if (cand < best) {
            best = cand;
            bi = i;
            bj = j;
          }
        }
      }
    }
    if (bi < 0) return false;
    std::swap(slot_exp_[Z(bi)], slot_exp_[Z(bj)]);
    if (lists_ready_) {
      ReplaceInList(slot_exp_[Z(bi)], bj, bi);
      ReplaceInList(slot_exp_[Z(bj)], bi, bj);
    }
    load_[Z(h)] = RankLoad(h);
    load_[Z(bj / S_)] = RankLoad(bj / S_);
    return true;
  }

  void BuildLists() {
    slots_of_.assign(Z(n_), {});
    for (int64_t s = 0; s < R_ * S_; ++s) slots_of_[Z(slot_exp_[Z(s)])].push_back(s);
    delta_.assign(Z(R_), 0.0);
    lists_ready_ = true;
  }

  void ReplaceInList(int64_t e, int64_t from, int64_t to) {
    for (auto& s : slots_of_[Z(e)])
      if (s == from) {
        s = to;
        return;
      }
  }

  // Max new load over the ranks touched by turning slot s (expert a, cnt >= 2) into expert b,
  // or +inf when h is not touched or a touched rank would not end below M - tol.
  double EvalConvert(int64_t s, int64_t b, int64_t h, double M, double tol) {
    const int64_t a = slot_exp_[Z(s)];
    const double wa = Wt(a), wa_new = w_[a] / static_cast<double>(cnt_[Z(a)] - 1);
    const double wb = Wt(b), wb_new = w_[b] / static_cast<double>(cnt_[Z(b)] + 1);
    touched_.clear();
    auto add = [&](int64_t r, double d) {
      if (delta_[Z(r)] == 0.0 && std::find(touched_.begin(), touched_.end(), r) == touched_.end())
        touched_.push_back(r);
      delta_[Z(r)] += d;
    };
    for (int64_t q : slots_of_[Z(a)]) add(q / S_, q == s ? wb_new - wa : wa_new - wa);
    for (int64_t q : slots_of_[Z(b)]) add(q / S_, wb_new - wb);
    double worst = 0.0;
    bool has_h = false;
    for (int64_t r : touched_) {
      const double v = load_[Z(r)] + delta_[Z(r)];
      delta_[Z(r)] = 0.0;
      worst = std::max(worst, v);
      has_h |= r == h;
    }
    if (!has_h || worst >= M - tol) return HUGE_VAL;
    return worst;
  }

  bool TryConvert(int64_t h, double M, double tol) {
    double best = HUGE_VAL;
    int64_t bs = -1, bb = -1;
    auto consider = [&](int64_t s, int64_t b) {
      const double v = EvalConvert(s, b, h, M, tol);
      if (v < best) {
        best = v;
        bs = s;
        bb = b;
      }
    };
    for (int64_t i = h * S_; i < (h + 1) * S_; ++i) {
      const int64_t x = slot_exp_[Z(i)];
      // b on h gets one more replica, in any slot whose expert can spare one.
      for (int64_t s = 0; s < R_ * S_; ++s) {
        const int64_t a = slot_exp_[Z(s)];
        if (a != x && cnt_[Z(a)] >= 2) consider(s, x);
      }
      // the slot on h gives its replica to any other expert.
      if (cnt_[Z(x)] >= 2)
        for (int64_t b = 0; b < n_; ++b)
          if (b != x) consider(i, b);
    }
    if (bs < 0) return false;
    const int64_t a = slot_exp_[Z(bs)];
    --cnt_[Z(a)];
    ++cnt_[Z(bb)];
    slot_exp_[Z(bs)] = bb;
    auto& la = slots_of_[Z(a)];
    la.erase(std::find(la.begin(), la.end(), bs));
    slots_of_[Z(bb)].push_back(bs);
    for (int64_t q : la) load_[Z(q / S_)] = RankLoad(q / S_);
    for (int64_t q : slots_of_[Z(bb)]) load_[Z(q / S_)] = RankLoad(q / S_);
    return true;
  }

  const double* w_;
  int64_t n_, R_, S_;
  std::vector<int64_t> cnt_, slot_exp_;
  std::vector<double> load_;
  double trivial_bound_ = 0.0;
  bool lists_ready_ = false;
  std::vector<std::vector<int64_t>> slots_of_;
  std::vector<double> delta_;
  std::vector<int64_t> touched_;
};

// Packs every node of a group->node partition and writes phy2log; returns the max rank load.
// group_node[g], group_rank[g]: node of group g and its position there (DeepSeek's order).
double PackNodes(const double* load, const Shape& s, const std::vector<int64_t>& group_node,
                 const std::vector<int64_t>& group_rank, int64_t* phy2log) {
  const int64_t E = s.num_logical, G = s.num_groups, N = s.num_nodes;
  const int64_t group_size = E / G, per_node = G / N;
  const int64_t log_per_node = E / N, phy_per_node = s.num_physical / N;
  const int64_t ranks_per_node = s.num_ranks / N, S = s.slots_per_rank();
  // Node-local expert order as DeepSeek's: groups by their position, experts by id.
  std::vector<int64_t> local2log(Z(E));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = 0; k < group_size; ++k)
      local2log[Z((group_node[Z(g)] * per_node + group_rank[Z(g)]) * group_size + k)] =
          g * group_size + k;
  std::vector<double> node_load(Z(log_per_node));
  double worst = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < log_per_node; ++i)
      node_load[Z(i)] = load[local2log[Z(n * log_per_node + i)]];
    PackSearch pack(node_load.data(), log_per_node, ranks_per_node, S);
    pack.Run();
    worst = std::max(worst, pack.MaxLoad());
    for (int64_t j = 0; j < phy_per_node; ++j)
      phy2log[n * phy_per_node + j] = local2log[Z(n * log_per_node + pack.slot_exp()[Z(j)])];
  }
  return worst;
}

// Swaps groups between the heaviest node and the others while that lowers the max node load.
// Returns true if the partition changed.
bool RefineGroups(const std::vector<double>& group_load, int64_t N,
                  std::vector<int64_t>* group_node) {
  const auto G = static_cast<int64_t>(group_load.size());
  std::vector<double> node(Z(N), 0.0);
  for (int64_t g = 0; g < G; ++g) node[Z((*group_node)[Z(g)])] += group_load[Z(g)];
  bool changed = false;
  for (int64_t step = 0; step < 4 * G * G; ++step) {
    const int64_t h = std::max_element(node.begin(), node.end()) - node.begin();
    const double M = node[Z(h)], tol = 1e-12 * M;
    double best = M - tol;
    int64_t bx = -1, by = -1;
    for (int64_t x = 0; x < G; ++x) {
      if ((*group_node)[Z(x)] != h) continue;
      for (int64_t y = 0; y < G; ++y) {
        const int64_t o = (*group_node)[Z(y)];
        if (o == h) continue;
        const double d = group_load[Z(x)] - group_load[Z(y)];
        if (d <= tol || node[Z(o)] + d >= M - tol) continue;
        const double cand = std::max(M - d, node[Z(o)] + d);
        if (cand < best) {
          best = cand;
          bx = x;
          by = y;
        }
      }
    }
    if (bx < 0) break;
    const int64_t o = (*group_node)[Z(by)];
    const double d = group_load[Z(bx)] - group_load[Z(by)];
    node[Z(h)] -= d;
    node[Z(o)] += d;
    (*group_node)[Z(bx)] = o;
    (*group_node)[Z(by)] = h;
    changed = true;
  }
  return changed;
}

}  // namespace

void BalancedLayer(const double* load, const Shape& shape, int64_t* phy2log) {
  if (!shape.hierarchical()) {
    PackSearch pack(load, shape.num_logical, shape.num_ranks, shape.slots_per_rank());
    pack.Run();
    std::copy(pack.slot_exp().begin(), pack.slot_exp().end(), phy2log);
    return;
  }
  const int64_t G = shape.num_groups, N = shape.num_nodes;
  const int64_t group_size = shape.num_logical / G;
  std::vector<double> group_load(Z(G), 0.0);
  for (int64_t e = 0; e < shape.num_logical; ++e) group_load[Z(e / group_size)] += load[e];
  std::vector<int64_t> group_node, group_rank;
  detail::BalancedPacking(group_load, N, &group_node, &group_rank);
  const double first = PackNodes(load, shape, group_node, group_rank, phy2log);

  std::vector<int64_t> refined = group_node;
  if (!RefineGroups(group_load, N, &refined)) return;
  // Positions inside a node: by group id (any order is a valid node-local order).
  std::vector<int64_t> refined_rank(Z(G));
  std::vector<int64_t> fill(Z(N), 0);
  for (int64_t g = 0; g < G; ++g) refined_rank[Z(g)] = fill[Z(refined[Z(g)])]++;
  std::vector<int64_t> other(Z(shape.num_physical));
  const double second = PackNodes(load, shape, refined, refined_rank, other.data());
  if (second < first) std::copy(other.begin(), other.end(), phy2log);
}

}  // namespace eplb
