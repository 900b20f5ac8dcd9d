// Local search over the placement of one pack of ranks (the whole EP group, or one node of the
// hierarchical topology) for `balanced`. Internal to csrc/planner.
//
// State: slot_exp [R*S] (pack-local expert id of each slot; rank r owns r*S .. r*S+S-1),
// cnt [n] replica counts, load [R] rank loads (sum of w_e / cnt_e over the rank's slots).
// Steps, all aimed at the heaviest rank h (load M):
//   - swap: a replica on h trades places with a lighter replica on another rank o; taken only
//     if both new loads are below M;
//   - convert: a slot holding expert a (a has >= 2 replicas) becomes a replica of expert b,
//     where the slot is on h or b is on h. This re-decides replica counts: every rank holding a
//     or b sees its load per replica change. Taken only if h is touched and every touched rank
//     ends below M.
// Each step lowers M or the number of ranks at M: the sorted rank loads decrease
// lexicographically, so the search ends (a step cap guards against float noise).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "planner/packing.h"
#include "planner/slot_lists.h"

namespace eplb {
namespace detail {

class PackSearch {
 public:
  // w: [n] loads of the pack's experts (borrowed, must outlive this); num_ranks ranks of S slots.
  PackSearch(const double* w, int64_t n, int64_t num_ranks, int64_t S)
      : w_(w), n_(n), R_(num_ranks), S_(S) {}

  // The same object for another pack (call Init* next): as newly constructed, but the vectors
  // keep their capacity, so a search reused per thread allocates nothing once warm.
  void Reset(const double* w, int64_t n, int64_t num_ranks, int64_t S) {
    w_ = w;
    n_ = n;
    R_ = num_ranks;
    S_ = S;
    trivial_bound_ = mean_load_ = 0.0;
    lists_ready_ = false;
    greedy_counts_ = false;
    distinct_ = false;
    stop_ = 0.0;
  }

  // Distinct ranks (PlanOptions::distinct_ranks): every step keeps each expert's replicas on
  // different ranks and its count <= R, so a start without a repeated expert on a rank keeps
  // none. Set after Reset, before the Init*.
  void SetDistinct(bool on) { distinct_ = on; }
  // Search stops once the max rank load is at or below `stop` (default 0: at the trivial bound
  // or when no step helps). Set after Reset.
  void SetStop(double stop) { stop_ = stop; }

  // Start from a given placement: slot_exp [R*S] (pack-local ids, every expert >= 1 replica).
  void InitFrom(const int64_t* slot_exp) {
    const int64_t P = R_ * S_;
    slot_exp_.assign(slot_exp, slot_exp + P);
    cnt_.assign(Z(n_), 0);
    for (int64_t s = 0; s < P; ++s) ++cnt_[Z(slot_exp_[Z(s)])];
    RecomputePer();
    greedy_counts_ = false;
    Finish();
  }

  // DeepSeek's greedy: replica counts by largest load per replica, then LPT onto the ranks.
  // beta: replica-count rule (packing.h Replicate); 1 is DeepSeek's.
  void InitGreedy(double beta = 1.0) {
    const int64_t P = R_ * S_;
    cnt_.assign(Z(n_), 1);
    std::vector<int64_t>& phy = init_phy_;  // (scratch members: no allocation once warm)
    phy.resize(Z(P));
    std::iota(phy.begin(), phy.begin() + n_, 0);
    Replicate(w_, n_, P, cnt_.data(), phy.data() + n_, beta);
    RecomputePer();
    greedy_counts_ = beta == 1.0;
    PackReplicas();
  }

  // Another start: experts heavier than alpha x the mean rank load get just the replicas that
  // bring them under it, each extra slot left goes by DeepSeek's rule among the others, then
  // LPT. Where one expert carries most of the load, DeepSeek's counts give it a replica on
  // nearly every rank and the rest packs badly around them; replicas of about alpha x the mean,
  // one to a rank with small ones beside them, pack well. False when no expert is that heavy or
  // their replicas alone would take more than the slots; the state is then unspecified (Reset
  // before another start).
  bool InitCapped(double alpha) {
    const int64_t P = R_ * S_;
    double total = 0.0;
    for (int64_t e = 0; e < n_; ++e) total += w_[e];
    const double cap = alpha * total / static_cast<double>(R_);
    if (!(cap > 0.0)) return false;
    cnt_.assign(Z(n_), 1);
    std::vector<int64_t>& rest = init_rank_;  // (scratch) the experts below the cap
    std::vector<double>& rest_w = init_wt_;
    rest.clear();
    rest_w.clear();
    int64_t used = 0;
    for (int64_t e = 0; e < n_; ++e) {
      if (w_[e] > cap) {
        cnt_[Z(e)] = static_cast<int64_t>(std::ceil(w_[e] / cap));
      } else {
        rest.push_back(e);
        rest_w.push_back(w_[e]);
      }
      used += cnt_[Z(e)];
    }
    const auto num_rest = static_cast<int64_t>(rest.size());
    if (num_rest == n_ || used > P || num_rest == 0) return false;
    std::vector<int64_t>& rest_cnt = init_pack_;  // (scratch)
    rest_cnt.resize(Z(num_rest));
    Replicate(rest_w.data(), num_rest, num_rest + (P - used), rest_cnt.data(), nullptr);
    for (int64_t k = 0; k < num_rest; ++k) cnt_[Z(rest[Z(k)])] = rest_cnt[Z(k)];
    std::vector<int64_t>& phy = init_phy_;
    phy.resize(Z(P));
    std::iota(phy.begin(), phy.begin() + n_, 0);
    int64_t at = n_;
    for (int64_t e = 0; e < n_; ++e)
      for (int64_t k = 1; k < cnt_[Z(e)]; ++k) phy[Z(at++)] = e;
    RecomputePer();
    greedy_counts_ = false;
    PackReplicas();
    return true;
  }

  // `balanced`: steps until none lowers the max (or the trivial bound is reached); with two slots
  // per rank, then RefinePairCounts (for given counts its sorted pairing is the best packing,
  // and it re-decides the counts). No steps after it any more: they lowered no max on the
  // benchmark's Kimi-K2-like traces (4 skews, seeds 0 and 1, 20 rebalances) nor on 1,600 random
  // two-slot layers (one-off), and took up to 10% of the time. The steps before it stay: without
  // them 5 of those 1,600 layers ended up to 1.7% higher (a conversion step reaches counts the
  // pairing descent does not).
  void Improve() {
    Search();
    // (distinct ranks: the sorted pairing may pair an expert with itself; the steps alone)
    if (S_ == 2 && R_ >= 2 && !distinct_ && RefinePairCounts()) lists_ready_ = false;
  }

  const std::vector<int64_t>& slot_exp() const { return slot_exp_; }
  // max(mean rank load, smallest possible largest replica): no placement does better.
  double TrivialBound() const { return trivial_bound_; }
  double MeanLoad() const { return mean_load_; }  // sum of the loads / ranks
  double MaxLoad() const { return *std::max_element(load_.begin(), load_.end()); }

 private:
  // Load per replica of e: w_e / cnt_e, kept in per_ (divisions are slow; the hot loops read it
  // for every slot they look at). Every change of cnt_ goes through SetCount or RecomputePer.
  double Wt(int64_t e) const { return per_[Z(e)]; }
  void SetCount(int64_t e, int64_t c) {
    cnt_[Z(e)] = c;
    per_[Z(e)] = w_[e] / static_cast<double>(c);
  }
  void RecomputePer() {
    per_.resize(Z(n_));
    for (int64_t e = 0; e < n_; ++e) per_[Z(e)] = w_[e] / static_cast<double>(cnt_[Z(e)]);
    rank_.resize(Z(R_ * S_));
    for (int64_t r = 0; r < R_; ++r)
      for (int64_t j = r * S_; j < (r + 1) * S_; ++j) rank_[Z(j)] = r;
  }

  // The replicas listed in init_phy_ [R*S] (cnt_ and per_ already theirs) packed by LPT into
  // slot_exp_, then Finish.
  void PackReplicas() {
    const int64_t P = R_ * S_;
    const std::vector<int64_t>& phy = init_phy_;
    std::vector<double>& wt = init_wt_;
    wt.resize(Z(P));
    for (int64_t i = 0; i < P; ++i) wt[Z(i)] = Wt(phy[Z(i)]);
    std::vector<int64_t>& pack = init_pack_;
    std::vector<int64_t>& rank_in_pack = init_rank_;
    BalancedPacking(wt, R_, &pack, &rank_in_pack);
    slot_exp_.assign(Z(P), 0);
    for (int64_t i = 0; i < P; ++i) slot_exp_[Z(pack[Z(i)] * S_ + rank_in_pack[Z(i)])] = phy[Z(i)];
    Finish();
  }

  void Finish() {
    // No placement beats the mean rank load nor the largest replica of the greedy counts.
    double total = 0.0;
    for (int64_t e = 0; e < n_; ++e) total += w_[e];
    // (cnt_ holds them already right after InitGreedy with DeepSeek's rule.)
    std::vector<int64_t>& best = init_pack_;  // scratch
    if (greedy_counts_) {
      best = cnt_;
    } else {
      best.resize(Z(n_));
      Replicate(w_, n_, R_ * S_, best.data(), nullptr);
    }
    double largest = 0.0;
    for (int64_t e = 0; e < n_; ++e)
      largest = std::max(largest, w_[e] / static_cast<double>(best[Z(e)]));
    mean_load_ = total / static_cast<double>(R_);
    trivial_bound_ = std::max(mean_load_, largest);
    load_.assign(Z(R_), 0.0);
    for (int64_t r = 0; r < R_; ++r) load_[Z(r)] = RankLoad(r);
  }

  // The experts of one rank, O(1) to test (distinct ranks): a stamp per expert, bumped per
  // marking, so nothing is cleared.
  struct Marks {
    std::vector<uint64_t> at;
    uint64_t stamp = 0;
    bool Has(int64_t e) const { return at[Z(e)] == stamp; }
  };
  void Mark(int64_t r, Marks* m) const {
    if (m->at.size() < Z(n_)) m->at.assign(Z(n_), 0);
    ++m->stamp;
    for (int64_t j = r * S_; j < (r + 1) * S_; ++j) m->at[Z(slot_exp_[Z(j)])] = m->stamp;
  }

  bool Holds(int64_t r, int64_t e) const { return RankHolds(slot_exp_.data(), S_, r, e); }

  double RankLoad(int64_t r) const {
    double sum = 0.0;
    for (int64_t j = r * S_; j < (r + 1) * S_; ++j) sum += Wt(slot_exp_[Z(j)]);
    return sum;
  }

  void Search() {
    if (S_ == 0 || R_ < 1) return;
    const int64_t max_steps = 16 * R_ * S_ + 64;
    for (int64_t step = 0; step < max_steps; ++step) {
      const int64_t h = std::max_element(load_.begin(), load_.end()) - load_.begin();
      const double M = load_[Z(h)];
      if (!(M > 0.0) || M <= std::max(trivial_bound_, stop_) * (1.0 + 1e-12)) return;
      const double tol = 1e-12 * M;
      if (!lists_ready_) BuildLists();
      Step best;
      BestSwap(h, M, tol, &best);
      // counts are re-decided only once swaps are exhausted (they are cheaper to find)
      if (best.kind == 0) BestConvert(h, M, tol, &best);
      if (best.kind == 0) return;
      Apply(best);
    }
  }

  struct Step {
    int kind = 0;  // 0 none, 1 swap (i, j), 2 convert slot i to expert j
    int64_t i = -1, j = -1;
    double score = 0.0;
  };

  // Best swap between h and the lightest few ranks (where the room is); only when none helps,
  // every rank: the search stops at the same kind of local optimum, much sooner.
  void BestSwap(int64_t h, double M, double tol, Step* best) {
    // Ranks lightest first, (load, index): the widest gap usually holds the best swap, and the
    // gap bound in SwapWith then skips most of the others. Ties in score go to the lowest (rank,
    // slot on h, slot on o), so the result is that of a scan by index. order_ persists between
    // steps (a step changes few loads): one insertion pass re-sorts it.
    if (static_cast<int64_t>(order_.size()) != R_) {
      order_.resize(Z(R_));
      std::iota(order_.begin(), order_.end(), 0);
    }
    if (distinct_) Mark(h, &on_h_);
    int64_t* ord = order_.data();
    for (int64_t k = 1; k < R_; ++k) {
      const int64_t r = ord[k];
      const double v = load_[Z(r)];
      int64_t j = k;
      for (; j > 0 && (v < load_[Z(ord[j - 1])] || (v == load_[Z(ord[j - 1])] && r < ord[j - 1]));
           --j)
        ord[j] = ord[j - 1];
      ord[j] = r;
    }
    // The kLight lightest first; only when none of them helps, every rank: the search stops at
    // the same kind of local optimum, much sooner. (With few ranks, a node: all at once.)
    constexpr int64_t kLight = 4;
    if (R_ > 2 * kLight) {
      for (int64_t k = 0; k < kLight; ++k) SwapWith(h, ord[k], M, tol, best);
      if (best->kind != 0) return;
      // (the kLight searched above found nothing with the same empty best: not again)
      for (int64_t k = kLight; k < R_; ++k) SwapWith(h, ord[k], M, tol, best);
      return;
    }
    for (int64_t k = 0; k < R_; ++k) SwapWith(h, ord[k], M, tol, best);
  }

  // Swap (i, j) comes before swap `b` in the order (rank of j, i, j): the order of a scan of the
  // ranks by index, whose first best step wins.
  bool SwapFirst(int64_t i, int64_t j, const Step& b) const {
    const int64_t o = rank_[Z(j)], bo = rank_[Z(b.j)];
    return o < bo || (o == bo && (i < b.i || (i == b.i && j < b.j)));
  }

  void SwapWith(int64_t h, int64_t o, double M, double tol, Step* best) {
    {
      const double gap = M - load_[Z(o)];
      if (o == h || gap <= 2 * tol) return;
      // A swap with o leaves max(M - d, load_o + d) >= M - gap / 2, so for `balanced` it scores
      // at most gap / 2 (plus rounding, far below the margin): nothing to find once the best so
      // far is above that.
      if (0.5 * gap + tol <= best->score) return;
      // o's replica loads once per call, not once per (i, j): the same divisions, S times fewer.
      wt_o_.resize(Z(S_));
      double lightest = HUGE_VAL, heaviest = -HUGE_VAL;
      for (int64_t j = 0; j < S_; ++j) {
        wt_o_[Z(j)] = Wt(slot_exp_[Z(o * S_ + j)]);
        lightest = std::min(lightest, wt_o_[Z(j)]);
        heaviest = std::max(heaviest, wt_o_[Z(j)]);
      }
      bool o_marked = false;  // (distinct: on_o_ holds o's experts once marked)
      for (int64_t i = h * S_; i < (h + 1) * S_; ++i) {
        const int64_t x = slot_exp_[Z(i)];
        const double wx = Wt(x);
        if (wx - lightest <= tol) continue;  // every d <= tol: no swap with this x
        // every d >= wx - heaviest (rounding is monotone): all at or above gap - tol, none fits
        if (wx - heaviest >= gap - tol) continue;
        // A swap scores M - max(M - d, load_o + d) <= d <= wx - lightest.
        if (wx - lightest + tol <= best->score) continue;
        if (distinct_) {
          if (!o_marked) Mark(o, &on_o_);
          o_marked = true;
          if (on_o_.Has(x)) continue;
        }
        for (int64_t j = o * S_; j < (o + 1) * S_; ++j) {
          const double d = wx - wt_o_[Z(j - o * S_)];
          if (d <= tol || d >= gap - tol) continue;
          if (distinct_ && on_h_.Has(slot_exp_[Z(j)])) continue;
          const double worst = std::max(M - d, load_[Z(o)] + d);
          const double score = M - worst;
          if (score > best->score ||
              (score == best->score && best->kind == 1 && SwapFirst(i, j, *best)))
            *best = {1, i, j, score};
        }
      }
    }
  }

  // The slots of each expert as linked lists (SlotLists), in the order a vector per expert
  // would have: built by ascending slot, a swapped slot takes the place of the one it replaces, a
  // converted slot is unlinked and appended. No allocation per search.
  void BuildLists() {
    const int64_t P = R_ * S_;
    lists_.Reset(n_, P);
    for (int64_t s = 0; s < P; ++s) lists_.Append(slot_exp_[Z(s)], s);
    delta_.assign(Z(R_), 0.0);
    lists_ready_ = true;
  }
  // Slot `to` takes the place in e's list of the slot whose links were (p, q).

  // Max new load over the ranks touched by turning slot s (expert a, cnt >= 2) into expert b,
  // or +inf when h is not touched or a touched rank would not end below M - tol.
  double EvalConvert(int64_t s, int64_t b, int64_t h, double M, double tol) {
    const int64_t a = slot_exp_[Z(s)];
    if (distinct_ && (cnt_[Z(b)] >= R_ || Holds(rank_[Z(s)], b))) return HUGE_VAL;
    const double wa = Wt(a), wa_new = w_[a] / static_cast<double>(cnt_[Z(a)] - 1);
    const double wb = Wt(b), wb_new = w_[b] / static_cast<double>(cnt_[Z(b)] + 1);
    touched_.clear();
    auto add = [&](int64_t r, double d) {
      if (std::find(touched_.begin(), touched_.end(), r) == touched_.end()) touched_.push_back(r);
      delta_[Z(r)] += d;
    };
    for (int64_t q = lists_.head[Z(a)]; q >= 0; q = lists_.next[Z(q)])
      add(rank_[Z(q)], q == s ? wb_new - wa : wa_new - wa);
    for (int64_t q = lists_.head[Z(b)]; q >= 0; q = lists_.next[Z(q)])
      add(rank_[Z(q)], wb_new - wb);
    double worst = 0.0;
    bool has_h = false;
    for (int64_t r : touched_) {
      worst = std::max(worst, load_[Z(r)] + delta_[Z(r)]);
      delta_[Z(r)] = 0.0;
      has_h |= r == h;
    }
    if (!has_h || worst >= M - tol) return HUGE_VAL;
    return worst;
  }

  // Conversions worth an exact look (EvalConvert), found with O(1) estimates per slot:
  //   - a slot on h whose expert x can spare a replica becomes the expert with the smallest
  //     load per replica after gaining one (best for h);
  //   - an expert x on h gains a replica in a slot s whose expert a can spare one: estimated by
  //     s's rank and the heaviest rank holding a (exact unless they overlap x's ranks); the
  //     few best estimates per x are evaluated exactly.
  void BestConvert(int64_t h, double M, double tol, Step* best) {
    auto consider = [&](int64_t s, int64_t b) {
      const double worst = EvalConvert(s, b, h, M, tol);
      if (worst == HUGE_VAL) return;
      const double score = M - worst;
      if (score > best->score) *best = {2, s, b, score};
    };
    max_on_.assign(Z(n_), 0.0);
    for (int64_t s = 0; s < R_ * S_; ++s) {
      const int64_t e = slot_exp_[Z(s)];
      max_on_[Z(e)] = std::max(max_on_[Z(e)], load_[Z(rank_[Z(s)])]);
    }
    // The two experts with the smallest load per replica after gaining one.
    int64_t b0 = -1, b1 = -1;
    double g0 = 0.0, g1 = 0.0;
    for (int64_t e = 0; e < n_; ++e) {
      // (distinct ranks: only experts h may take, none of them on h, so b0 is never an x)
      if (distinct_ && (cnt_[Z(e)] >= R_ || Holds(h, e))) continue;
      const double g = w_[e] / static_cast<double>(cnt_[Z(e)] + 1);
      if (b0 < 0 || g < g0) {
        b1 = b0;
        g1 = g0;
        b0 = e;
        g0 = g;
      } else if (b1 < 0 || g < g1) {
        b1 = e;
        g1 = g;
      }
    }
    // Per slot s (expert a), the same for every x below: its rank's load without it, and the
    // max load over a's ranks once a gives up a replica (+inf when a has only one: it cannot).
    // Computed once here instead of once per (x, s), with the same expressions.
    const int64_t P = R_ * S_;
    conv_base_.resize(Z(P));
    conv_after_.resize(Z(P));
    for (int64_t q = 0; q < P; ++q) {
      const int64_t a = slot_exp_[Z(q)];
      const double wa = Wt(a);
      conv_base_[Z(q)] = load_[Z(rank_[Z(q)])] - wa;
      conv_after_[Z(q)] = cnt_[Z(a)] < 2
                              ? HUGE_VAL
                              : max_on_[Z(a)] + (w_[a] / static_cast<double>(cnt_[Z(a)] - 1) - wa);
    }
    constexpr int kTop = 3;
    for (int64_t i = h * S_; i < (h + 1) * S_; ++i) {
      const int64_t x = slot_exp_[Z(i)];
      if (cnt_[Z(x)] >= 2) {
        const int64_t b = b0 != x ? b0 : b1;
        if (b >= 0) consider(i, b);
      }
      if (i > h * S_ &&
          std::find(slot_exp_.begin() + h * S_, slot_exp_.begin() + i, x) != slot_exp_.begin() + i)
        continue;  // x already handled
      const double wx = Wt(x), wx_new = w_[x] / static_cast<double>(cnt_[Z(x)] + 1);
      double top_score[kTop];
      int64_t top_slot[kTop];
      for (int k = 0; k < kTop; ++k) {
        top_score[k] = 0.0;
        top_slot[k] = -1;
      }
      if (distinct_ && cnt_[Z(x)] >= R_) continue;  // (x may gain no replica)
      const double h_new = M - wx + wx_new;
      for (int64_t s = 0; s < P; ++s) {
        if (slot_exp_[Z(s)] == x) continue;
        if (distinct_ && Holds(rank_[Z(s)], x)) continue;
        const double worst = std::max({h_new, conv_base_[Z(s)] + wx_new, conv_after_[Z(s)]});
        if (worst >= M - tol) continue;  // (also every a with one replica: +inf)
        const double score = M - worst;
        if (score <= top_score[kTop - 1]) continue;
        int k = kTop - 1;
        while (k > 0 && top_score[k - 1] < score) {
          top_score[k] = top_score[k - 1];
          top_slot[k] = top_slot[k - 1];
          --k;
        }
        top_score[k] = score;
        top_slot[k] = s;
      }
      for (int k = 0; k < kTop; ++k)
        if (top_slot[k] >= 0) consider(top_slot[k], x);
    }
  }

  void Apply(const Step& st) {
    if (st.kind == 1) {
      const int64_t x = slot_exp_[Z(st.i)], y = slot_exp_[Z(st.j)];
      std::swap(slot_exp_[Z(st.i)], slot_exp_[Z(st.j)]);
      if (x != y) {  // (swaps always trade different experts: equal ones gain nothing)
        const int64_t pi = lists_.prev[Z(st.i)], ni = lists_.next[Z(st.i)];
        const int64_t pj = lists_.prev[Z(st.j)], nj = lists_.next[Z(st.j)];
        lists_.Relink(x, st.j, pi, ni);
        lists_.Relink(y, st.i, pj, nj);
      }
      load_[Z(rank_[Z(st.i)])] = RankLoad(rank_[Z(st.i)]);
      load_[Z(rank_[Z(st.j)])] = RankLoad(rank_[Z(st.j)]);
      return;
    }
    const int64_t a = slot_exp_[Z(st.i)], b = st.j;
    SetCount(a, cnt_[Z(a)] - 1);
    SetCount(b, cnt_[Z(b)] + 1);
    slot_exp_[Z(st.i)] = b;
    lists_.Unlink(a, st.i);
    lists_.Append(b, st.i);
    for (int64_t q = lists_.head[Z(a)]; q >= 0; q = lists_.next[Z(q)])
      load_[Z(rank_[Z(q)])] = RankLoad(rank_[Z(q)]);
    for (int64_t q = lists_.head[Z(b)]; q >= 0; q = lists_.next[Z(q)])
      load_[Z(rank_[Z(q)])] = RankLoad(rank_[Z(q)]);
  }

  // Two slots per rank (e.g. Kimi-K2 on 256 ranks): for given replica counts the best packing
  // is known (sorted replicas, the i-th lightest with the i-th heaviest), so replica counts can
  // be searched with the packing re-done exactly: move one replica from one expert to another.
  //   1. best move first, while one lowers the paired max: the binding pair's two experts gain
  //      a replica from the kCand experts that lose least by giving one up, or give one to the
  //      kCand experts with the heaviest replicas;
  //   2. then through ties, by (paired max, pairs at the max): the first move that lowers either,
  //      trying the experts of the pairs at the max (up to kAtMax, heaviest replica first), each
  //      from the kGivers experts that lose least, least first; at most kTieSteps moves.
  // Token counts tie often (a max shared by several pairs), and step 1 alone stops on the first
  // such plateau: measured on the benchmark's Kimi-K2-like lognormal(0.5) trace, it then lost
  // to vllm-ascend's FlashLB by 0.45% on the summed max and by 2.9% on one layer; step 2 ends
  // 1.7% lower on the summed max, never higher on a layer. Returns true (and rewrites slot_exp_
  // as the pairing) if the max went down.
  struct Run {
    double w;   // load per replica
    int64_t c;  // replicas
    int64_t e;  // expert
    bool operator<(const Run& o) const { return w < o.w || (w == o.w && e < o.e); }
  };

  // A sorted run sequence as a few spans: the runs after a trial move without copying them
  // (the unchanged runs stay where they are, the two changed ones are held here). Not copyable:
  // spans may point into it.
  struct RunSeq {
    struct Span {
      const Run* p;
      int64_t len;
    };
    Span span[7] = {};
    int count = 0;
    int64_t size = 0;
    Run ra{}, rb{};
    RunSeq() = default;
    RunSeq(const RunSeq&) = delete;
    RunSeq& operator=(const RunSeq&) = delete;
    void Add(const Run* p, int64_t len) {
      if (len <= 0) return;
      span[count++] = {p, len};
      size += len;
    }
    void CopyTo(std::vector<Run>* out) const {
      out->resize(Z(size));
      Run* o = out->data();
      for (int k = 0; k < count; ++k) o = std::copy(span[k].p, span[k].p + span[k].len, o);
    }
  };

  // The sorted pairing of a run sequence sorted ascending, outside in: f(sum, lighter expert,
  // heavier expert, pairs) once per block of identical pairs (`pairs` replica pairs of the same
  // two runs); stops as soon as f returns false.
  template <class F>
  static void ScanPairs(const RunSeq& q, F&& f) {
    // Cursors: run i from the front (span fi, offset fo), run j from the back (bi, bo).
    int fi = 0, bi = q.count - 1;
    int64_t fo = 0, bo = q.span[bi].len - 1;
    auto front = [&]() -> const Run& { return q.span[fi].p[fo]; };
    auto back = [&]() -> const Run& { return q.span[bi].p[bo]; };
    auto next = [&] {
      if (++fo == q.span[fi].len) {
        ++fi;
        fo = 0;
      }
    };
    auto prev = [&] {
      if (bo-- == 0) {
        --bi;
        bo = bi >= 0 ? q.span[bi].len - 1 : 0;
      }
    };
    int64_t i = 0, j = q.size - 1;
    int64_t ci = front().c, cj = back().c;
    while (i <= j) {
      if (i == j) {  // one run left: its replicas pair among themselves
        if (ci >= 2) f(2.0 * front().w, front().e, front().e, ci / 2);
        break;
      }
      const int64_t k = std::min(ci, cj);
      if (!f(front().w + back().w, front().e, back().e, k)) break;
      ci -= k;
      cj -= k;
      if (ci == 0 && cj == 0) {
        ++i;
        next();
        --j;
        prev();
        if (i > j) break;
        ci = front().c;
        cj = i == j ? ci : back().c;
      } else if (ci == 0) {
        ++i;
        next();
        ci = i == j ? cj : front().c;
      } else {
        --j;
        prev();
        cj = j == i ? ci : back().c;
      }
    }
  }

  // Paired max over a run sequence sorted ascending; binding experts out (lo, hi). Stops as
  // soon as the max reaches `limit` (then returns a value >= limit, all a caller asking "below
  // limit?" needs, and *stop, when given, is the index of the pair that reached it).
  static double PairMax(const RunSeq& q, int64_t* lo, int64_t* hi, double limit = HUGE_VAL,
                        int64_t* stop = nullptr) {
    double m = -1.0;
    int64_t at = 0;  // index of the block's first pair (pairs numbered outside in)
    ScanPairs(q, [&](double v, int64_t a, int64_t b, int64_t k) {
      if (v > m) {
        m = v;
        *lo = a;
        *hi = b;
      }
      if (m >= limit && stop != nullptr) *stop = at;
      at += k;
      return m < limit;
    });
    return m;
  }

  // The witness test of RefinePairCounts' trials. A trial is rejected as soon as one of its
  // pairs is too heavy, and the pair that rejected the last trial usually rejects the next:
  // its value in a trial sequence is found in O(spans + log runs) instead of scanning the
  // pairs outside in to it. PairBase: the base sequence the trials modify (cum_[k] = replicas
  // in runs[0, k)); PairAt: x_i + x_{N-1-i} of q, the value ScanPairs gives pair i.
  void PairBase(const std::vector<Run>& runs) {
    pair_base_ = runs.data();
    cum_.resize(runs.size() + 1);
    cum_[0] = 0;
    for (size_t k = 0; k < runs.size(); ++k) cum_[k + 1] = cum_[k] + runs[k].c;
  }
  double ReplicaWeight(const RunSeq& q, int64_t r) const {
    for (int k = 0; k < q.count; ++k) {
      const RunSeq::Span& s = q.span[k];
      if (s.p == &q.ra || s.p == &q.rb) {  // a changed run, held by q
        if (r < s.p->c) return s.p->w;
        r -= s.p->c;
        continue;
      }
      const auto k0 = s.p - pair_base_;
      const int64_t first = cum_[Z(k0)], reps = cum_[Z(k0 + s.len)] - first;
      if (r < reps) {  // the run of replica first + r: the last k with cum_[k] <= first + r
        const auto it = std::upper_bound(cum_.begin() + k0, cum_.begin() + k0 + s.len, first + r);
        return pair_base_[(it - cum_.begin()) - 1].w;
      }
      r -= reps;
    }
    return HUGE_VAL;  // r out of range: not reached
  }
  double PairAt(const RunSeq& q, int64_t i) const {
    // same operands in the same order as ScanPairs (2w for a run paired with itself = w + w)
    return ReplicaWeight(q, i) + ReplicaWeight(q, cum_.back() - 1 - i);
  }

  // The paired max of q (out: *m) and the replica pairs within a relative 1e-12 of it; the
  // experts of those pairs (both sides, outermost pairs first) are appended to `experts`.
  static int64_t PairsAtMax(const RunSeq& q, double* m, std::vector<int64_t>* experts) {
    double mx = -1.0;
    int64_t pairs = 0;
    ScanPairs(q, [&](double v, int64_t a, int64_t b, int64_t k) {
      if (v > mx * (1.0 + 1e-12)) {
        mx = v;
        pairs = 0;
        experts->clear();
      }
      if (v >= mx * (1.0 - 1e-12)) {
        pairs += k;
        experts->push_back(a);
        experts->push_back(b);
      }
      return true;
    });
    *m = mx;
    return pairs;
  }

  // Whether the pairing of q is better than (max m0, t0 pairs at it): a lower max, or the
  // same max (within a relative 1e-12) with fewer pairs at it; then *m, *t are its own. Stops
  // as soon as the answer is no (most trials: the pairs at the max lie near the outside); when
  // that was a pair above m0 (beyond the 1e-12), *stop, if given, is its index.
  static bool PairsBelow(const RunSeq& q, double m0, int64_t t0, double* m, int64_t* t,
                         int64_t* stop = nullptr) {
    const double hi = m0 * (1.0 + 1e-12), lo = m0 * (1.0 - 1e-12);
    double mx = -1.0;
    int64_t at = 0, index = 0;
    bool worse = false;
    ScanPairs(q, [&](double v, int64_t, int64_t, int64_t k) {
      if (v > hi && stop != nullptr) *stop = index;
      index += k;
      if (v > mx * (1.0 + 1e-12)) {
        mx = v;
        at = k;
      } else if (v >= mx * (1.0 - 1e-12)) {
        at += k;
      }
      worse = mx > hi || (mx >= lo && at >= t0);
      return !worse;
    });
    if (worse) return false;
    *m = mx;
    *t = at;
    return true;
  }

  // runs with expert a losing one replica and b gaining one, still sorted -> out. pos [n]: the
  // index of each expert's run in `runs`.
  void Moved(const std::vector<Run>& runs, const std::vector<int64_t>& pos, int64_t a, int64_t b,
             RunSeq* out) const {
    out->ra = {w_[a] / static_cast<double>(cnt_[Z(a)] - 1), cnt_[Z(a)] - 1, a};
    out->rb = {w_[b] / static_cast<double>(cnt_[Z(b)] + 1), cnt_[Z(b)] + 1, b};
    const Run& ra = out->ra;
    const Run& rb = out->rb;
    // Events on the old sequence: drop the old runs of a and b, insert the new ones before the
    // first old run above them (at one index: inserts before the drop, the lighter run first).
    struct Event {
      int64_t at;
      int order;  // 0, 1: inserts (lighter first); 2: drop
      const Run* run;
    };
    const bool a_first = ra < rb;
    Event ev[4] = {
        {std::lower_bound(runs.begin(), runs.end(), ra) - runs.begin(), a_first ? 0 : 1, &ra},
        {std::lower_bound(runs.begin(), runs.end(), rb) - runs.begin(), a_first ? 1 : 0, &rb},
        {pos[Z(a)], 2, nullptr},
        {pos[Z(b)], 2, nullptr}};
    std::sort(ev, ev + 4, [](const Event& x, const Event& y) {
      return x.at < y.at || (x.at == y.at && x.order < y.order);
    });
    out->count = 0;
    out->size = 0;
    int64_t from = 0;
    for (const Event& e : ev) {
      out->Add(runs.data() + from, e.at - from);
      from = e.at;
      if (e.run != nullptr) {
        out->Add(e.run, 1);
      } else {
        from = e.at + 1;
      }
    }
    out->Add(runs.data() + from, static_cast<int64_t>(runs.size()) - from);
  }

  static double PairMax(const std::vector<Run>& runs, int64_t* lo, int64_t* hi) {
    RunSeq q;
    q.Add(runs.data(), static_cast<int64_t>(runs.size()));
    return PairMax(q, lo, hi);
  }

  // Candidates per step (see above) and the steps of the walk through ties per pack (measured
  // on Kimi-K2-like lognormal(0.5) loads: 256 steps gained 0.003% over 64).
  static constexpr int64_t kCand = 16, kGivers = 32, kAtMax = 16;
  static constexpr int kTieSteps = 64;

  bool RefinePairCounts() {
    std::vector<Run> runs, best_runs;
    RunSeq trial;
    for (int64_t e = 0; e < n_; ++e) runs.push_back({Wt(e), cnt_[Z(e)], e});
    std::sort(runs.begin(), runs.end());
    std::vector<int64_t> pos(Z(n_));
    auto index_runs = [&] {
      for (size_t k = 0; k < runs.size(); ++k) pos[Z(runs[k].e)] = static_cast<int64_t>(k);
      PairBase(runs);
    };
    index_runs();
    int64_t lo = 0, hi = 0;
    double cur = PairMax(runs, &lo, &hi);
    // What each expert's replicas weigh with one replica fewer, kept current by apply (the
    // orders below compare it often: a division per comparison cost ~6% of the step).
    std::vector<double> lose(Z(n_));
    auto set_lose = [&](int64_t e) {  // (never compared for an expert with one replica)
      lose[Z(e)] = cnt_[Z(e)] >= 2 ? w_[e] / static_cast<double>(cnt_[Z(e)] - 1) : HUGE_VAL;
    };
    for (int64_t e = 0; e < n_; ++e) set_lose(e);
    auto by_lose = [&](int64_t x, int64_t y) {
      return lose[Z(x)] < lose[Z(y)] || (lose[Z(x)] == lose[Z(y)] && x < y);
    };
    double best = 0.0;
    int64_t best_ties = 0, ba = -1, bb = -1;
    bool strict = true;
    // The pair index that rejected the last trial (see PairAt); -1: none yet. Rejecting by it
    // first decides every trial as the scans alone would.
    int64_t witness = -1;
    auto try_move = [&](int64_t a, int64_t b) {
      if (a == b || cnt_[Z(a)] < 2) return;
      Moved(runs, pos, a, b, &trial);
      if (strict) {
        if (witness >= 0 && PairAt(trial, witness) >= best) return;
        int64_t l2 = 0, h2 = 0;
        const double v = PairMax(trial, &l2, &h2, best, &witness);
        if (v < best) {
          best = v;
          ba = a;
          bb = b;
        }
        return;
      }
      // (3e-12, not 1e-12: PairsBelow chains its tolerance, so its max may sit up to 1e-12
      // below a pair's value; above 3e-12 that max is above best's 1e-12 band whatever the
      // rounding, so the scan would reject the trial too. In between, the scan decides.)
      if (witness >= 0 && PairAt(trial, witness) > best * (1.0 + 3e-12)) return;
      double v = 0.0;
      int64_t t = 0;
      if (PairsBelow(trial, best, best_ties, &v, &t, &witness)) {
        best = v;
        best_ties = t;
        ba = a;
        bb = b;
      }
    };
    auto apply = [&] {                   // the move ba -> bb
      Moved(runs, pos, ba, bb, &trial);  // counts still the old ones, as in the trials
      trial.CopyTo(&best_runs);
      SetCount(ba, cnt_[Z(ba)] - 1);
      SetCount(bb, cnt_[Z(bb)] + 1);
      set_lose(ba);
      set_lose(bb);
      runs.swap(best_runs);
      index_runs();
    };
    bool improved = false;
    // 1. the best move that lowers the max: the binding pair's experts gain a replica from the
    // kCand experts that lose least by giving one up, or give one to the kCand experts with the
    // heaviest replicas
    std::vector<int64_t> givers, heavy;
    for (int iter = 0; iter < 256; ++iter) {
      givers.clear();
      for (int64_t e = 0; e < n_; ++e)
        if (cnt_[Z(e)] >= 2) givers.push_back(e);
      if (static_cast<int64_t>(givers.size()) > kCand) {
        std::nth_element(givers.begin(), givers.begin() + kCand, givers.end(), by_lose);
        givers.resize(Z(kCand));
      }
      heavy.clear();
      for (auto it = runs.rbegin(); it != runs.rend() && static_cast<int64_t>(heavy.size()) < kCand;
           ++it)
        heavy.push_back(it->e);
      best = cur * (1.0 - 1e-12);
      ba = bb = -1;
      for (int64_t b : {lo, hi}) {
        for (int64_t a : givers) try_move(a, b);
        for (int64_t a : heavy) try_move(b, a);
      }
      if (ba < 0) break;
      apply();
      cur = PairMax(runs, &lo, &hi);
      improved = true;
    }
    // 2. through the ties: the first move that lowers (max, pairs at the max), trying the
    // experts of the pairs at the max heaviest replica first, each from the kGivers experts
    // that lose least by giving up a replica, least first
    strict = false;
    std::vector<int64_t>& order = givers;  // every expert with >= 2 replicas, by what it loses
    order.clear();
    for (int64_t e = 0; e < n_; ++e)
      if (cnt_[Z(e)] >= 2) order.push_back(e);
    std::sort(order.begin(), order.end(), by_lose);
    auto reorder = [&](int64_t e) {  // after e's count changed (the others' keys did not)
      const auto it = std::find(order.begin(), order.end(), e);
      if (it != order.end()) order.erase(it);
      if (cnt_[Z(e)] >= 2)
        order.insert(std::lower_bound(order.begin(), order.end(), e, by_lose), e);
    };
    std::vector<int64_t>& takers = heavy;
    int64_t ties = 0;
    auto at_max = [&] {  // cur, ties and the takers of the current runs
      RunSeq all;
      all.Add(runs.data(), static_cast<int64_t>(runs.size()));
      takers.clear();
      ties = PairsAtMax(all, &cur, &takers);
      std::sort(takers.begin(), takers.end(),
                [&](int64_t x, int64_t y) { return Wt(x) > Wt(y) || (Wt(x) == Wt(y) && x < y); });
      takers.erase(std::unique(takers.begin(), takers.end()), takers.end());
      if (static_cast<int64_t>(takers.size()) > kAtMax) takers.resize(Z(kAtMax));
    };
    at_max();
    for (int iter = 0; iter < kTieSteps; ++iter) {
      best = cur;
      best_ties = ties;
      ba = bb = -1;
      const auto n_givers = std::min<int64_t>(kGivers, static_cast<int64_t>(order.size()));
      for (int64_t b : takers) {
        for (int64_t k = 0; k < n_givers && ba < 0; ++k) try_move(order[Z(k)], b);
        if (ba >= 0) break;
      }
      if (ba < 0) break;
      apply();
      reorder(ba);
      reorder(bb);
      at_max();
      improved = true;
    }
    if (!improved || !(cur < MaxLoad())) {
      if (improved) {  // counts changed but the pairing is no better than what we had: undo
        cnt_.assign(Z(n_), 0);
        for (int64_t e : slot_exp_) ++cnt_[Z(e)];
        RecomputePer();
      }
      return false;
    }
    // The pairing: the i-th lightest replica with the i-th heaviest, rank i.
    std::vector<int64_t> items;
    for (const Run& r : runs)
      for (int64_t k = 0; k < r.c; ++k) items.push_back(r.e);
    for (int64_t r = 0; r < R_; ++r) {
      slot_exp_[Z(2 * r)] = items[Z(r)];
      slot_exp_[Z(2 * r + 1)] = items[Z(2 * R_ - 1 - r)];
    }
    for (int64_t r = 0; r < R_; ++r) load_[Z(r)] = RankLoad(r);
    return true;
  }

  const double* w_;
  int64_t n_, R_, S_;
  std::vector<int64_t> cnt_, slot_exp_;
  std::vector<double> load_;
  double trivial_bound_ = 0.0, mean_load_ = 0.0;
  bool lists_ready_ = false;
  bool greedy_counts_ = false;  // cnt_ is Replicate(w_, n_, R_ * S_) (Finish reuses it)
  bool distinct_ = false;       // SetDistinct
  double stop_ = 0.0;           // SetStop
  Marks on_h_, on_o_;           // distinct: the heaviest rank's experts, the other rank's
  SlotLists lists_;             // slot lists per expert (BuildLists)
  std::vector<double> delta_, max_on_;
  std::vector<double> conv_base_, conv_after_;             // BestConvert scratch, per slot
  std::vector<int64_t> init_phy_, init_pack_, init_rank_;  // InitGreedy / Finish scratch
  std::vector<double> init_wt_;
  std::vector<int64_t> touched_;
  std::vector<double> per_;         // [n] w_e / cnt_e
  std::vector<int64_t> rank_;       // [R*S] rank of each slot (no integer division in hot loops)
  std::vector<int64_t> order_;      // BestSwap: ranks by (load, index), kept between steps
  std::vector<double> wt_o_;        // SwapWith scratch: the other rank's replica loads
  const Run* pair_base_ = nullptr;  // RefinePairCounts: the runs trials modify (PairBase)
  std::vector<int64_t> cum_;        // [runs + 1] replicas before each run of pair_base_
};

}  // namespace detail
}  // namespace eplb
