// The `balanced` policy's last step: once the search (balanced.cpp) has the max rank load down,
// spread the replicas of each expert over different ranks without raising any rank above it.
//
// A rank holding two replicas of one expert wastes a slot (the same weights twice, which a
// distinct expert could use) and doubles that rank's exposure to the expert's drift in the
// windows the plan serves. Per pack of ranks (the whole EP group for the global policy, one node
// for the hierarchical, so every replica stays on its group's node), each such second replica
// trades places with a replica of another expert on a rank that holds neither, both ranks ending
// strictly below M, the layer's max rank load (the swap whose heavier rank ends lightest).
// Where no single replica fits (typically the rank is at M: only lighter replicas may come in,
// and those sit on ranks without room), the second replica and one more slot of the rank trade
// places with two slots of another rank, lightest ranks first. Replica counts never change, so
// no other rank's load does; where neither trade exists the pair stays.
// Cost per layer: O(P S) to find duplicates, O(P S) per duplicate for the single swap, and for
// the pair trade O(S^3) per rank scanned (stopping at the first rank too heavy to beat the best
// trade found). Measured (one core, balanced's 58 layers): 0.04-0.17 ms on lognormal loads,
// 0.2-0.74 ms on Zipf (DeepSeek-V3 global, where most duplicates sit on a rank at M).
//
// Measured (docs/BENCHMARKS.md protocol, 8 layers of DeepSeek-V3, window 1): duplicates of
// `balanced` 0 global / 0 hierarchical on lognormal 0.5 (1 / 18 without this step; DeepSeek's
// placement has 1 / 12), 5 / 4 on Zipf (11 / 24). Not applied to `deepseek`, which stays
// DeepSeek's algorithm.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "planner/packing.h"
#include "planner/policies.h"

namespace eplb {
namespace {

using detail::Z;

class PackRefiner {
 public:
  // phy2log: the pack's R*S slots (global expert ids < num_logical), rewritten in place; wt:
  // [R*S] load of each slot's replica (load / replica count), permuted along with phy2log.
  // max_load: the layer's max rank load, which no swap may exceed.
  PackRefiner(int64_t* phy2log, double* wt, int64_t R, int64_t S, int64_t num_logical,
              double max_load)
      : slot_(phy2log), wt_(wt), R_(R), S_(S), max_(max_load) {
    load_.assign(Z(R), 0.0);
    for (int64_t r = 0; r < R_; ++r)
      for (int64_t j = r * S_; j < (r + 1) * S_; ++j) load_[Z(r)] += wt_[j];
    if (static_cast<int64_t>(on_rank_.size()) < num_logical) on_rank_.resize(Z(num_logical), 0);
  }

  void Spread() {
    for (int64_t r = 0; r < R_; ++r) {
      MarkRank(r);
      for (int64_t i = r * S_ + 1; i < (r + 1) * S_; ++i) {
        if (std::find(slot_ + r * S_, slot_ + i, slot_[i]) == slot_ + i) continue;
        if (MoveDuplicate(i)) MarkRank(r);
      }
    }
  }

 private:
  // on_rank_[e] == r: rank r holds expert e (valid for the rank last marked).
  void MarkRank(int64_t r) {
    ++stamp_;
    for (int64_t j = r * S_; j < (r + 1) * S_; ++j) on_rank_[Z(slot_[j])] = stamp_;
  }
  bool OnMarked(int64_t e) const { return on_rank_[Z(e)] == stamp_; }

  bool Holds(int64_t r, int64_t e) const { return detail::RankHolds(slot_, S_, r, e); }

  void Swap(int64_t i, int64_t j) {
    const double d = wt_[i] - wt_[j];
    load_[Z(i / S_)] -= d;
    load_[Z(j / S_)] += d;
    std::swap(slot_[i], slot_[j]);
    std::swap(wt_[i], wt_[j]);
  }

  // Slot i is a second replica of its expert on its rank r (marked): swaps it out (see the file
  // comment). Returns whether it did.
  bool MoveDuplicate(int64_t i) {
    const int64_t r = i / S_, e = slot_[i];
    const double a = wt_[i], lr = load_[Z(r)];
    int64_t best = -1;
    double best_worst = max_;  // strictly below: rounding never lifts the max
    for (int64_t o = 0; o < R_; ++o) {
      if (o == r || Holds(o, e)) continue;
      for (int64_t j = o * S_; j < (o + 1) * S_; ++j) {
        const double worst = std::max(lr - a + wt_[j], load_[Z(o)] + a - wt_[j]);
        if (worst < best_worst && !OnMarked(slot_[j])) {  // also skips slot_[j] == e
          best_worst = worst;
          best = j;
        }
      }
    }
    if (best >= 0) {
      Swap(i, best);
      return true;
    }
    // No single replica fits: trade i and another slot k of r (giving a + wt_k) for two slots
    // j < m of a rank o (taking wt_j + wt_m); d = give - take must lie in (lr - M, M - load_o).
    int64_t bk = -1, bj = -1, bm = -1;
    light_.clear();
    for (int64_t o = 0; o < R_; ++o)
      if (o != r && best_worst - load_[Z(o)] > std::max(0.0, lr - best_worst) && !Holds(o, e))
        light_.push_back(o);
    // lightest first: a trade with o leaves max(lr - d, load_o + d) >= (lr + load_o) / 2, so
    // the scan stops at the first rank that cannot beat the best trade found
    auto lighter = [&](int64_t x, int64_t y) {
      return load_[Z(x)] < load_[Z(y)] || (load_[Z(x)] == load_[Z(y)] && x < y);
    };
    std::sort(light_.begin(), light_.end(), lighter);
    for (const int64_t o : light_) {
      const double lo = load_[Z(o)];
      if (0.5 * (lr + lo) >= best_worst) break;
      const int64_t* so = slot_ + o * S_;
      const double* wo = wt_ + o * S_;
      // the two lightest and two heaviest replicas of o bound what o can give back
      double min_take = HUGE_VAL, max_take = -HUGE_VAL;
      for (int64_t j = 0; j < S_; ++j)
        for (int64_t m = j + 1; m < S_; ++m) {
          min_take = std::min(min_take, wo[j] + wo[m]);
          max_take = std::max(max_take, wo[j] + wo[m]);
        }
      for (int64_t k = r * S_; k < (r + 1) * S_; ++k) {
        if (k == i || slot_[k] == e || Holds(o, slot_[k])) continue;
        const double give = a + wt_[k];
        // d = give - take must leave both ranks below best_worst
        if (give - max_take >= best_worst - lo || give - min_take <= lr - best_worst) continue;
        for (int64_t j = 0; j < S_; ++j) {
          if (OnMarked(so[j])) continue;
          for (int64_t m = j + 1; m < S_; ++m) {
            const double d = give - wo[j] - wo[m];
            const double worst = std::max(lr - d, lo + d);
            if (worst < best_worst && !OnMarked(so[m]) && so[m] != so[j]) {
              best_worst = worst;
              bk = k;
              bj = o * S_ + j;
              bm = o * S_ + m;
            }
          }
        }
      }
    }
    if (bk < 0) return false;
    Swap(i, bj);
    Swap(bk, bm);
    return true;
  }

  int64_t* slot_;
  double* wt_;
  int64_t R_, S_;
  double max_;
  // scratch, kept per thread: layers are planned on several threads
  static thread_local std::vector<double> load_;
  static thread_local std::vector<int64_t> on_rank_, light_;
  static thread_local int64_t stamp_;  // grows forever: on_rank_ is never cleared
};

thread_local std::vector<double> PackRefiner::load_;
thread_local std::vector<int64_t> PackRefiner::on_rank_;
thread_local std::vector<int64_t> PackRefiner::light_;
thread_local int64_t PackRefiner::stamp_ = 0;

}  // namespace

void RefineLayer(const double* load, const Shape& shape, int64_t* phy2log) {
  const int64_t P = shape.num_physical, S = shape.slots_per_rank();
  // (most layers have no duplicate: find out before computing loads)
  if (S < 2 || !HasRepeatOnRank(phy2log, shape)) return;
  thread_local std::vector<int64_t> cnt;
  thread_local std::vector<double> wt;
  cnt.assign(Z(shape.num_logical), 0);
  for (int64_t p = 0; p < P; ++p) ++cnt[Z(phy2log[p])];
  wt.resize(Z(P));
  for (int64_t p = 0; p < P; ++p)
    wt[Z(p)] = load[phy2log[p]] / static_cast<double>(cnt[Z(phy2log[p])]);
  double max_load = 0.0;
  for (int64_t r = 0; r < shape.num_ranks; ++r)
    max_load =
        std::max(max_load, std::accumulate(wt.begin() + r * S, wt.begin() + (r + 1) * S, 0.0));
  const int64_t packs = shape.num_packs();
  const int64_t R = shape.num_ranks / packs, pack_slots = R * S;
  for (int64_t n = 0; n < packs; ++n) {
    PackRefiner pack(phy2log + n * pack_slots, wt.data() + n * pack_slots, R, S, shape.num_logical,
                     max_load);
    pack.Spread();
  }
}

void BalancedLayer(const double* load, const Shape& shape, int64_t* phy2log) {
  BalancedSearchLayer(load, shape, phy2log);
  RefineLayer(load, shape, phy2log);
}

}  // namespace eplb
