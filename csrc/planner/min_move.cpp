// The `min_move` policy: keep the current placement and change as few slots as it takes to come
// within `target` of the balance `balanced` reaches on the same load.
//
//   0. First, without `balanced` (MinMoveFromBound): step 2's search toward the stricter stop
//      LowerBound / target, changing at most half the slots (hierarchical: every node from its
//      old groups, each within half its slots, or, when a node's mean rank load is above the
//      stop, the old partition with one pair of groups traded as in step 4 (the two nodes by
//      SubstituteNode, without that budget; of the trades tried that get there, the one that
//      changes fewest slots), and the stop no lower than BalancedFloor / target,
//      the largest node mean rank load of balanced's best candidate group->node partition,
//      which balanced's max cannot go below). A placement <= that stop is within `target` of
//      balanced's balance, so when the search gets there `balanced` is not computed at all. On
//      planner_micro.cpp's DeepSeek-V3 loads (348 layer-plans a shape; one-off counts, instrumented
//      build) it got there on 339-346 global and 138-153 hierarchical ones (most others: a node's
//      old groups are above the stop on average); on the benchmark's trace min_move took 25-40%
//      less time on the global shapes and 19-35% on DeepSeek-V3 hierarchical, and changed -1% to
//      +9% slots (the stop is 0-0.3% lower than balanced's / target on the global shapes).
//      Otherwise, or when the old placement is within 1% of that stop (whether it needs any change
//      at all is then balanced's to say), the steps below with balanced's placement. The group
//      trade in step 0 (seventh session) took 35-45% off min_move's time on the benchmark's
//      DeepSeek-V3 hierarchical lognormal traces and 23% on Zipf (20 rebalances, `--no-peers`), for
//      0.6-3.6% more changed slots and out-of-sample balancedness within -0.14 / +0.26 points.
//   1. Done already if the old placement's max rank load is <= balanced's / target (the stop).
//   2. A local search from the old placement (MoveSearch below): each step takes the swap or
//      replica conversion aimed at the heaviest rank with the largest reduction of the excess
//      (sum over ranks of the load above the stop) per newly changed slot, until no rank is
//      above the stop. Global: first within balanced's own changed slots; when it gets there,
//      walked back (step 3), done. Skipped with two slots per rank, where it almost never gets
//      there. Hierarchical: the steps stay inside a node (each node is searched on its own),
//      which keeps groups on their nodes (a node whose mean rank load is above the stop cannot
//      get there and is not searched; one whose search gets stuck, no step lowering the excess,
//      is planned alone by `balanced` and walked back instead, RebalanceNode, before any group
//      changes node); an old placement that does not follow that topology is not used; the
//      budget is the renumbered placement's changes (step 3).
//   3. The fallback: `balanced`'s placement with its ranks (and, hierarchical, its nodes)
//      renumbered to overlap the old placement most, each rank's kept experts in their old
//      slots, then walked back toward the old placement (WalkBack: swap or convert changed slots
//      back to their old expert while every rank stays <= the stop). Global: a second search
//      that first converts slots so that the replica counts are balanced's (heaviest missing
//      replica first) is kept instead when it changes fewer slots.
//   4. Hierarchical, when a node cannot reach the stop with its old groups: the fallback node
//      by node (a node with the same groups as before keeps its searched content when that
//      reached the stop; any other takes the fewer changes of balanced's node walked back and
//      SubstituteNode), or, when it changes fewer slots, the old partition with one pair of
//      groups trading nodes: the two nodes by SubstituteNode or RebalanceNode, whichever
//      changes fewer slots (NewNode), the others as searched (the first few swaps by the load
//      of the heaviest node they leave). SubstituteNode keeps the node's
//      old content, puts the arriving experts in the slots of the departed ones and searches
//      from there (changes counted against the old content), then walks back. Measured on the
//      benchmark's DeepSeek-V3 trace (5 windows, 4 skews), the node partition changes on 44% of
//      the layers and those carry 83% of the changed slots.
// Every search (steps 0, 2, 4) of a pack with a rank above the stop first gives each expert
// whose load per replica is above the pack's ReplicaCap (the smallest possible heaviest replica /
// target) the replicas that bring it under (MoveSearch::ImposeCap), and no walk-back converts a
// slot back above it: balance on the load planned from is not enough, the placement serves the
// load after it (see ReplicaCap).
// Where the changed slots go (instrumented build, the benchmark's Qwen3-235B trace, 3 rebalances,
// the layers step 0 planned; per layer, lognormal 1.0 / 1.5 / Zipf): 5.9 / 6.5 / 7.9 take the
// replicas ImposeCap adds, 1.1-1.2 the search's conversions and 23.6 / 27.5 / 30.6 its swaps,
// which fix the 15.3 / 15.3 / 14.5 ranks still above the stop after the cap (14.1 / 14.2 / 12.3
// before it: a donor's other replicas grow), 1.6-2.2 changed slots per such rank. ImposeCap
// seats each replica where it lowers the excess most and a swap that leaves h above the stop
// counts one slot more (MoveSearch); with both, min_move's share of balanced's changed slots on
// that trace went from 0.207 / 0.250 / 0.293 to 0.201 / 0.237 / 0.275. Not levers there
// (one-off): a cap 2% instead of 1% above the smallest heaviest replica (changed slots within
// 0.5%), the lightest rank above the stop first instead of the heaviest (+5%), ties between
// swaps to the smallest load moved or the tightest fit (within 1%), a pass converting each
// changed slot back and searching again within fewer changes (-0.3%, +60% time).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "planner/packing.h"
#include "planner/policies.h"
#include "planner/slot_lists.h"

namespace eplb {
namespace detail {

// (fresh idx, old idx, overlap) of MatchBlocks
namespace {
struct BlockPair {
  int64_t i, j, overlap;
};
}  // namespace

// Greedy matching of the blocks (consecutive runs of `block` slots) of `fresh` to those of
// `old` by the number of logical experts they share (the multiset intersection), largest first,
// then by fresh block, then by old block; target[b] = the old block that fresh block b is placed
// at. Only the blocks listed in `fresh_ids` / `old_ids` take part.
// Two phases give that greedy's result without listing every pair that shares an expert (a hot
// expert with c replicas makes c^2 of them: 2/3 of min_move's matching time on Kimi-K2-like
// Zipf loads, 256 blocks of two slots; a block holding two hot experts still walks the second
// one's holders):
//   1. pairs sharing two or more copies, listed and taken in the greedy's order. Such a pair
//      shares a copy of an expert other than the block's most-held one, or two copies of that
//      one, so walking the old holders of the other experts (and the blocks holding two or more
//      copies of the most-held one) finds them all;
//   2. then each fresh block still free, in order, takes the first free old block that shares an
//      expert with it: once phase 1 is over, a free pair shares at most one copy (a pair sharing
//      more was taken in phase 1 unless one side went first), so this is the greedy's order
//      over the pairs sharing one. Per expert a cursor over its holders skips the taken ones
//      (blocks are only ever taken), so the phase costs O(holders) in all.
// Nothing is O(experts): the scratch is the thread's, and its per-expert arrays are cleared
// entry by entry (5 calls per hierarchical layer, most with 8 blocks of a few slots).
void MatchBlocks(const int64_t* fresh, const int64_t* old, int64_t block,
                 const std::vector<int64_t>& fresh_ids, const std::vector<int64_t>& old_ids,
                 int64_t num_logical, std::vector<int64_t>* target) {
  const auto n = static_cast<int64_t>(fresh_ids.size());
  target->assign(Z(n), -1);
  if (n == 1) {  // (one block each, global: nothing to match)
    (*target)[0] = old_ids[0];
    return;
  }
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    // held, count, use: [experts], all zero between calls
    std::vector<int64_t> held, count, use, start, fill, holder, held_experts, cands, first, multi,
        multi_held, multi_start, cursor, distinct;
    std::vector<BlockPair> pairs, sorted;
    std::vector<char> taken, seen;
  } tls;
  auto& held = tls.held;
  auto& count = tls.count;
  auto& use = tls.use;
  auto& start = tls.start;
  auto& fill = tls.fill;
  auto& holder = tls.holder;
  auto& held_experts = tls.held_experts;
  auto& multi_held = tls.multi_held;
  if (held.size() < Z(num_logical)) {
    held.resize(Z(num_logical), 0);
    count.resize(Z(num_logical), 0);
    use.resize(Z(num_logical), 0);
    multi_held.resize(Z(num_logical), 0);
    start.resize(Z(num_logical));
    fill.resize(Z(num_logical));
    tls.multi_start.resize(Z(num_logical));
    tls.cursor.resize(Z(num_logical));
  }
  auto old_block = [&](int64_t j) { return old + old_ids[Z(j)] * block; };
  // holders: old block indices (into old_ids) holding each expert, one bucket per expert of the
  // old blocks (held: its copies), each in block order; multi: per expert the blocks holding
  // two or more copies of it, in block order (multi_held: how many)
  held_experts.clear();
  for (int64_t j = 0; j < n; ++j)
    for (int64_t k = 0; k < block; ++k) {
      const int64_t e = old_block(j)[k];
      if (held[Z(e)]++ == 0) held_experts.push_back(e);
    }
  int64_t total = 0;
  for (const int64_t e : held_experts) {
    start[Z(e)] = fill[Z(e)] = total;
    total += held[Z(e)];
  }
  holder.resize(Z(total));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t k = 0; k < block; ++k) holder[Z(fill[Z(old_block(j)[k])]++)] = j;
  auto& multi = tls.multi;
  multi.clear();
  for (const int64_t e : held_experts) {
    tls.multi_start[Z(e)] = static_cast<int64_t>(multi.size());
    for (int64_t h = start[Z(e)], end = h + held[Z(e)]; h < end;) {
      const int64_t j = holder[Z(h)];
      int64_t run = 0;
      for (; h < end && holder[Z(h)] == j; ++h) ++run;
      if (run >= 2) multi.push_back(j);
    }
    multi_held[Z(e)] = static_cast<int64_t>(multi.size()) - tls.multi_start[Z(e)];
  }
  // 1. the pairs sharing two or more copies, in (fresh, old) order
  auto& pairs = tls.pairs;
  auto& cands = tls.cands;
  auto& distinct = tls.distinct;
  auto& seen = tls.seen;
  seen.assign(Z(n), 0);
  pairs.clear();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* fb = fresh + fresh_ids[Z(i)] * block;
    distinct.clear();
    for (int64_t k = 0; k < block; ++k)
      if (count[Z(fb[k])]++ == 0) distinct.push_back(fb[k]);
    // the most-held expert (first on ties) is walked only where a block holds two copies
    int64_t top = distinct[0];
    for (const int64_t e : distinct)
      if (held[Z(e)] > held[Z(top)]) top = e;
    cands.clear();
    auto add = [&](int64_t j) {
      if (!seen[Z(j)]) {
        seen[Z(j)] = 1;
        cands.push_back(j);
      }
    };
    for (const int64_t e : distinct) {
      if (held[Z(e)] == 0) continue;
      if (e != top) {
        for (int64_t h = start[Z(e)], end = h + held[Z(e)]; h < end; ++h) add(holder[Z(h)]);
      } else if (count[Z(e)] >= 2) {
        const int64_t m = tls.multi_start[Z(e)];
        for (int64_t h = m; h < m + multi_held[Z(e)]; ++h) add(multi[Z(h)]);
      }
    }
    std::sort(cands.begin(), cands.end());
    for (const int64_t j : cands) {
      seen[Z(j)] = 0;
      const int64_t* ob = old_block(j);
      int64_t overlap = 0;
      for (int64_t k = 0; k < block; ++k)
        if (use[Z(ob[k])] < count[Z(ob[k])]) {
          ++use[Z(ob[k])];
          ++overlap;
        }
      for (int64_t k = 0; k < block; ++k) use[Z(ob[k])] = 0;
      if (overlap >= 2) pairs.push_back({i, j, overlap});
    }
    for (const int64_t e : distinct) count[Z(e)] = 0;
  }
  // overlap is 2..block: a stable counting sort by overlap, largest first, orders them as a
  // sort of (-overlap, fresh, old) would, without comparing tuples
  auto& first = tls.first;  // first[block - overlap + 1]: bucket starts
  first.assign(Z(block + 2), 0);
  for (const BlockPair& pr : pairs) ++first[Z(block - pr.overlap + 1)];
  for (int64_t b = 0; b <= block; ++b) first[Z(b + 1)] += first[Z(b)];
  auto& sorted = tls.sorted;
  sorted.resize(pairs.size());
  for (const BlockPair& pr : pairs) sorted[Z(first[Z(block - pr.overlap)]++)] = pr;
  auto& taken = tls.taken;
  taken.assign(Z(n), 0);
  for (const BlockPair& pr : sorted) {
    if ((*target)[Z(pr.i)] >= 0 || taken[Z(pr.j)]) continue;
    (*target)[Z(pr.i)] = old_ids[Z(pr.j)];
    taken[Z(pr.j)] = 1;
  }
  // 2. the pairs sharing one copy: each free fresh block, in order, takes the first free old
  // block holding one of its experts
  auto& cursor = tls.cursor;
  for (const int64_t e : held_experts) cursor[Z(e)] = start[Z(e)];
  for (int64_t i = 0; i < n; ++i) {
    if ((*target)[Z(i)] >= 0) continue;
    const int64_t* fb = fresh + fresh_ids[Z(i)] * block;
    int64_t best = n;
    for (int64_t k = 0; k < block; ++k) {
      const int64_t e = fb[k];
      if (held[Z(e)] == 0) continue;
      int64_t& c = cursor[Z(e)];
      const int64_t end = start[Z(e)] + held[Z(e)];
      while (c < end && taken[Z(holder[Z(c)])]) ++c;
      if (c < end) best = std::min(best, holder[Z(c)]);
    }
    if (best < n) {
      (*target)[Z(i)] = old_ids[Z(best)];
      taken[Z(best)] = 1;
    }
  }
  for (const int64_t e : held_experts) held[Z(e)] = multi_held[Z(e)] = 0;
  int64_t next = 0;
  for (int64_t i = 0; i < n; ++i) {
    if ((*target)[Z(i)] >= 0) continue;
    while (taken[Z(next)]) ++next;
    (*target)[Z(i)] = old_ids[Z(next)];
    taken[Z(next)] = 1;
  }
}

}  // namespace detail

namespace {

using detail::MatchBlocks;
using detail::Z;

// `fresh` [P] renumbered (nodes, then ranks inside nodes) to overlap `old` [P] most -> out [P].
void Renumber(const int64_t* fresh, const int64_t* old, const Shape& s, int64_t* out) {
  const int64_t N = s.num_packs();
  const int64_t S = s.slots_per_rank(), rpn = s.num_ranks / N, node_slots = rpn * S;
  thread_local struct {
    std::vector<int64_t> ids, node_at, moved, ranks, rank_at;
  } tls;
  auto& ids = tls.ids;
  ids.resize(Z(N));
  std::iota(ids.begin(), ids.end(), 0);
  MatchBlocks(fresh, old, node_slots, ids, ids, s.num_logical, &tls.node_at);
  auto& moved = tls.moved;
  moved.resize(Z(s.num_physical));
  for (int64_t n = 0; n < N; ++n)
    std::copy(fresh + n * node_slots, fresh + (n + 1) * node_slots,
              moved.begin() + tls.node_at[Z(n)] * node_slots);
  auto& ranks = tls.ranks;
  ranks.resize(Z(rpn));
  for (int64_t n = 0; n < N; ++n) {
    std::iota(ranks.begin(), ranks.end(), n * rpn);
    MatchBlocks(moved.data(), old, S, ranks, ranks, s.num_logical, &tls.rank_at);
    for (int64_t i = 0; i < rpn; ++i)
      std::copy(moved.begin() + ranks[Z(i)] * S, moved.begin() + (ranks[Z(i)] + 1) * S,
                out + tls.rank_at[Z(i)] * S);
  }
}

// Slots of [first, last) that change between a and b once every rank keeps what it can
// (PreserveSlots): per rank, S minus the size of the multiset intersection.
int64_t RankMoves(const int64_t* a, const int64_t* b, int64_t first, int64_t last, int64_t S,
                  std::vector<int64_t>* count) {
  int64_t moves = 0;
  for (int64_t r = first; r < last; r += S) {
    for (int64_t k = r; k < r + S; ++k) ++(*count)[Z(a[k])];
    for (int64_t k = r; k < r + S; ++k) {
      if ((*count)[Z(b[k])] > 0) {
        --(*count)[Z(b[k])];
      } else {
        ++moves;
      }
    }
    for (int64_t k = r; k < r + S; ++k) (*count)[Z(a[k])] = 0;
  }
  return moves;
}

// A pack's replica cap: the smallest possible heaviest replica of its experts in `slots` slots
// (DeepSeek's replication greedy reaches it) / target. Each min_move search of a pack with a rank
// above the stop first brings every expert above the cap under it (MoveSearch::ImposeCap; the
// search may then take a replica back where that lowers the excess most), and no walk-back
// converts a slot back above it (or above the heaviest replica already there).
// Why: a placement serves the load after it, and a rank that holds a heavy replica swings with
// that expert's load. Kept to its old replica counts, min_move's heaviest replica averaged 1.6x
// the smallest possible on Qwen3-235B (lognormal 1.0, 10 rebalances of the benchmark's trace,
// one-off), and over 20 rebalances it served the next window 1.0-1.4 points worse than every
// full rebalancer (balancedness out of sample), though better balanced than the peers' policies
// on the window it planned from; with the cap 0.3-0.7 points worse, for 4% more changed slots
// (docs/BENCHMARKS.md, "Replica cap").
double ReplicaCap(const double* w, int64_t n, int64_t slots, double target) {
  thread_local std::vector<int64_t> cnt_tls;
  auto& cnt = cnt_tls;
  cnt.resize(Z(n));
  detail::Replicate(w, n, slots, cnt.data(), nullptr);
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, w[i] / static_cast<double>(cnt[Z(i)]));
  return m / target;
}

// ReplicaCap of the experts `experts` of the layer's load [E].
double ReplicaCap(const double* load, const std::vector<int64_t>& experts, int64_t slots,
                  double target) {
  thread_local std::vector<double> w_tls;
  auto& w = w_tls;
  w.resize(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) w[i] = load[experts[i]];
  return ReplicaCap(w.data(), static_cast<int64_t>(w.size()), slots, target);
}

// Local search from the old placement of one pack (all ranks, or one node's), toward every rank
// <= stop with few changed slots. Objective: the excess, sum over ranks of max(0, load - stop);
// each step takes the swap or conversion (search.h's steps, aimed at the heaviest rank h) with
// the largest excess reduction per newly changed slot (a step that changes nothing net counts
// half a slot); on ties, the one that flattens the touched ranks most (sum of squared loads;
// swaps with different partner ranks: the lighter partner).
// Counting every rank's excess, not just h's, favours a replica for an expert that overloads
// several ranks at once.
class MoveSearch {
 public:
  // A search of one pack: w: [n] loads of the pack's experts (borrowed, must outlive the
  // search); start, orig: [R*S] pack-local ids of the start and of the old placement (changed
  // slots are counted against orig; -1: an expert not in this pack). As newly constructed, but
  // the vectors keep their capacity: one object per thread is reused across packs and layers
  // (hierarchical: about 7 searches of a few steps per layer, each about 40 allocations
  // otherwise).
  void Reset(const double* w, int64_t n, int64_t R, int64_t S, const int64_t* start,
             const int64_t* orig, double stop) {
    w_ = w;
    n_ = n;
    R_ = R;
    S_ = S;
    P_ = R * S;
    stop_ = stop;
    changed_ = 0;
    counts_changed_ = true;
    m0_ = m1_ = -1;
    light_.clear();
    moved_list_.clear();
    dirty_list_.clear();
    slot_.assign(start, start + P_);
    orig_.assign(orig, orig + P_);
    rank_.resize(Z(P_));
    for (int64_t r = 0; r < R_; ++r)
      std::fill(rank_.begin() + r * S_, rank_.begin() + (r + 1) * S_, r);
    cnt_.assign(Z(n_), 0);
    for (const int64_t e : slot_) ++cnt_[Z(e)];
    per_.resize(Z(n_));
    for (int64_t e = 0; e < n_; ++e) per_[Z(e)] = w_[e] / static_cast<double>(cnt_[Z(e)]);
    wslot_.resize(Z(P_));
    for (int64_t s = 0; s < P_; ++s) wslot_[Z(s)] = per_[Z(slot_[Z(s)])];
    load_.assign(Z(R_), 0.0);
    lightest_.assign(Z(R_), 0.0);
    moved_.assign(Z(R_), 0);
    for (int64_t r = 0; r < R_; ++r) UpdateRank(r);
    delta_.assign(Z(R_), 0.0);
    changed_on_.assign(Z(R_), 0);
    for (int64_t s = 0; s < P_; ++s)
      if (slot_[Z(s)] != orig_[Z(s)]) {
        ++changed_;
        ++changed_on_[Z(rank_[Z(s)])];
      }
    prepared_ = false;
  }

  // The rest of the state, from the first step on: about half the searches of a hierarchical
  // layer start at or below the stop and take no step.
  void Prepare() {
    prepared_ = true;
    more_.resize(Z(n_));
    up_.resize(Z(n_));
    for (int64_t e = 0; e < n_; ++e) SetCount(e, cnt_[Z(e)]);
    lists_.Reset(n_, P_);
    for (int64_t s = 0; s < P_; ++s) lists_.Append(slot_[Z(s)], s);
    gain_.resize(Z(n_));
    base_.resize(Z(P_));
    pen_.resize(Z(P_));
    pex_.resize(Z(P_));
    rise_.resize(Z(P_));
    ex_.resize(Z(P_));
    dirty_.assign(Z(n_), 0);
    is_hot_.assign(Z((n_ + 63) / 64), 0);
    pex_floor_[0] = pex_floor_[1] = HUGE_VAL;
    hot_ready_ = false;
    hottest_bound_ = 0.0;
    for (int64_t e = 0; e < n_; ++e) Mark(e);
    shared_.assign(Z((P_ + 63) / 64), 0);
    for (int64_t q = 0; q < P_; ++q) MarkShared(q);
    was_start_.assign(Z(n_ + 1), 0);
    for (const int64_t e : orig_)
      if (e >= 0) ++was_start_[Z(e + 1)];
    for (int64_t e = 0; e < n_; ++e) was_start_[Z(e + 1)] += was_start_[Z(e)];
    was_.resize(Z(was_start_[Z(n_)]));
    std::vector<int64_t>& fill = touched_;  // (scratch)
    fill.assign(was_start_.begin(), was_start_.end() - 1);
    for (int64_t q = 0; q < P_; ++q)
      if (orig_[Z(q)] >= 0) was_[Z(fill[Z(orig_[Z(q)])]++)] = q;
    special_.assign(Z(P_), kNoSpecial);
    special_rank_.assign(Z(R_), kNoSpecial);
    h_slot_.resize(Z(S_));
  }

  // Steps until every rank is <= stop (true) or none helps or `budget` slots have changed.
  bool Run(int64_t budget) {
    const int64_t max_steps = 4 * P_ + 64;
    for (int64_t step = 0; step < max_steps; ++step) {
      // h: the heaviest rank, the first on ties (the first of the heaviest run of light_)
      SortLight();
      int64_t top = R_ - 1;
      while (top > 0 && load_[Z(light_[Z(top - 1)])] == load_[Z(light_[Z(R_ - 1)])]) --top;
      const int64_t h = light_[Z(top)];
      if (load_[Z(h)] <= stop_) return Changed() < budget;
      if (Changed() >= budget) return false;
      if (!prepared_) Prepare();
      Step best;
      BestStep(h, &best);
      if (best.kind == 0) return false;
      Apply(best);
    }
    return false;
  }

  // Converts slots until the replica counts are `target` [n] (sum R*S): each missing replica,
  // heaviest first, takes the slot of an expert above its target on the rank that ends lightest.
  void ImposeCounts(const int64_t* target) {
    if (!prepared_) Prepare();
    std::vector<int64_t> need;
    for (int64_t e = 0; e < n_; ++e)
      for (int64_t k = cnt_[Z(e)]; k < target[e]; ++k) need.push_back(e);
    std::stable_sort(need.begin(), need.end(), [&](int64_t a, int64_t b) {
      return w_[a] / static_cast<double>(target[a]) > w_[b] / static_cast<double>(target[b]);
    });
    for (const int64_t b : need) {
      const double wb_new = w_[b] / static_cast<double>(cnt_[Z(b)] + 1);
      int64_t best = -1;
      double best_load = HUGE_VAL;
      for (int64_t s = 0; s < P_; ++s) {
        const int64_t a = slot_[Z(s)];
        if (a == b || cnt_[Z(a)] <= target[a]) continue;
        const double v = load_[Z(rank_[Z(s)])] - per_[Z(a)] + wb_new;
        if (v < best_load) {
          best_load = v;
          best = s;
        }
      }
      if (best < 0) return;
      Apply({2, best, b, 0.0, 0.0});
    }
  }

  // When a rank is above the stop: converts slots until no expert's load per replica is above
  // the pack's ReplicaCap at `target` (returned; 0 when no rank is above the stop: a pack within
  // it is kept as it is, as a layer is). The heaviest expert above it takes a slot whose expert
  // stays <= the cap with one fewer replica: one that restores its old expert or had changed
  // already first, then the one that lowers the excess most (EvalConvert: the donor's rank, and
  // the ranks of both experts' other replicas), then the flattest.
  // (The search after it may still take replicas back.)
  // Was: a rank that stays <= the stop first, then the cost, then the rank that ends lightest,
  // which ignored the excess the donor expert's other replicas gain. On the benchmark's
  // Qwen3-235B trace (3 rebalances, --no-peers) min_move then changed 2947 / 3497 / 4002 slots a
  // rebalance on lognormal 1.0 / 1.5 / Zipf, now 2921 / 3433 / 3893.
  double ImposeCap(double target) {
    if (*std::max_element(load_.begin(), load_.end()) <= stop_) return 0.0;
    const double cap = ReplicaCap(w_, n_, P_, target);
    over_.clear();
    for (int64_t e = 0; e < n_; ++e)
      if (per_[Z(e)] > cap) over_.push_back(e);
    if (over_.empty()) return cap;
    if (!prepared_) Prepare();
    while (!over_.empty()) {
      size_t top = 0;  // the heaviest (a handful)
      for (size_t k = 1; k < over_.size(); ++k)
        if (per_[Z(over_[k])] > per_[Z(over_[top])]) top = k;
      const int64_t b = over_[top];
      // donors: the slots of experts with two or more replicas (shared_)
      int64_t best = -1;
      double best_key[3] = {0.0, 0.0, 0.0};
      for (size_t word = 0; word < shared_.size(); ++word)
        for (uint64_t bits = shared_[word]; bits != 0; bits &= bits - 1) {
          const auto s =
              static_cast<int64_t>(word * 64 + static_cast<size_t>(__builtin_ctzll(bits)));
          const int64_t a = slot_[Z(s)];
          if (a == b || up_[Z(a)] + per_[Z(a)] > cap) continue;
          double flat = 0.0;
          const double reduction = EvalConvert(s, b, &flat);
          const double key[3] = {static_cast<double>(Cost(s, b)), -reduction, flat};
          if (best < 0 || std::lexicographical_compare(key, key + 3, best_key, best_key + 3)) {
            best = s;
            std::copy(key, key + 3, best_key);
          }
        }
      if (best < 0) return cap;
      Apply({2, best, b, 0.0, 0.0});
      if (!(per_[Z(b)] > cap)) {
        over_[top] = over_.back();
        over_.pop_back();
      }
    }
    return cap;
  }

  const std::vector<int64_t>& slots() const { return slot_; }
  int64_t Changed() const { return changed_; }

 private:
  struct Step {
    int kind = 0;  // 0 none, 1 swap slots (i, j), 2 convert slot i to expert j
    int64_t i = -1, j = -1;
    double score = 0.0, flat = 0.0;  // excess reduction per slot; change of sum of squares
  };

  double Ex(double v) const { return v > stop_ ? v - stop_ : 0.0; }
  // Every change of cnt_ comes here: per_, more_ and up_ follow it (divisions are slow; the
  // scans read them for every expert).
  void SetCount(int64_t e, int64_t c) {
    cnt_[Z(e)] = c;
    per_[Z(e)] = w_[e] / static_cast<double>(c);
    more_[Z(e)] = w_[e] / static_cast<double>(c + 1);
    up_[Z(e)] = c >= 2 ? w_[e] / static_cast<double>(c - 1) - per_[Z(e)] : HUGE_VAL;
    // m0_, m1_ (the two smallest (more_, id)) follow when e is neither: it may enter them;
    // else they are scanned again
    if (counts_changed_) return;
    if (e == m0_ || e == m1_ || m1_ < 0) {
      counts_changed_ = true;
    } else if (Lighter(e, m0_)) {
      m1_ = m0_;
      m0_ = e;
    } else if (Lighter(e, m1_)) {
      m1_ = e;
    }
  }
  // Expert a before b in (more_, id) order.
  bool Lighter(int64_t a, int64_t b) const {
    return more_[Z(a)] < more_[Z(b)] || (more_[Z(a)] == more_[Z(b)] && a < b);
  }
  // hot_: the experts set in is_hot_, ascending; hottest_bound_: exactly their largest -gain_
  // (0 with none).
  void ReadHot() {
    hot_ready_ = true;
    hot_.clear();
    hottest_bound_ = 0.0;
    for (size_t word = 0; word < is_hot_.size(); ++word)
      for (uint64_t bits = is_hot_[word]; bits != 0; bits &= bits - 1) {
        const auto b = static_cast<int64_t>(word * 64 + static_cast<size_t>(__builtin_ctzll(bits)));
        hot_.push_back(b);
        hottest_bound_ = std::max(hottest_bound_, -gain_[Z(b)]);
      }
  }
  // light_: every rank by (load, rank), a total order, lightest first. Kept between steps: the
  // ranks that did not move keep their order, the moved ones are sorted (a handful, by
  // insertion) and merged in.
  void SortLight() {
    if (moved_list_.empty()) return;
    auto lighter = [&](int64_t a, int64_t b) {
      return load_[Z(a)] < load_[Z(b)] || (load_[Z(a)] == load_[Z(b)] && a < b);
    };
    size_t stayed = 0;
    for (const int64_t r : light_)
      if (!moved_[Z(r)]) light_[stayed++] = r;
    light_.resize(stayed);
    for (size_t k = 1; k < moved_list_.size(); ++k) {
      const int64_t r = moved_list_[k];
      size_t at = k;
      for (; at > 0 && lighter(r, moved_list_[at - 1]); --at) moved_list_[at] = moved_list_[at - 1];
      moved_list_[at] = r;
    }
    merged_.resize(Z(R_));
    std::merge(light_.begin(), light_.end(), moved_list_.begin(), moved_list_.end(),
               merged_.begin(), lighter);
    light_.swap(merged_);
    for (const int64_t r : moved_list_) moved_[Z(r)] = 0;
    moved_list_.clear();
  }
  // Rank r's slots or their wslot_ changed: its load_ and lightest_ follow, and its place in
  // light_ is fixed at the next SortLight.
  void UpdateRank(int64_t r) {
    double sum = 0.0, lightest = HUGE_VAL;
    for (int64_t j = r * S_; j < (r + 1) * S_; ++j) {
      sum += wslot_[Z(j)];
      lightest = std::min(lightest, wslot_[Z(j)]);
    }
    load_[Z(r)] = sum;
    lightest_[Z(r)] = lightest;
    if (!moved_[Z(r)]) {
      moved_[Z(r)] = 1;
      moved_list_.push_back(r);
    }
  }
  // Slots newly changed minus slots restored when slot s takes expert e.
  int Cost(int64_t s, int64_t e) const {
    return static_cast<int>(e != orig_[Z(s)]) - static_cast<int>(slot_[Z(s)] != orig_[Z(s)]);
  }
  // 1 / max(cost, 0.5): the weight of an excess reduction by that step.
  double Per(int64_t s, int64_t e) const { return Cost(s, e) >= 1 ? 1.0 : 2.0; }
  // 1 / max(cost, 0.5) of a swap by its cost + 2 (cost -2 .. 2).
  static constexpr double kSwapPer[5] = {2.0, 2.0, 2.0, 1.0, 0.5};
  // A swap's: 1 / max(cost of both slots, 0.5).
  double Per(int64_t i, int64_t x, int64_t j, int64_t y) const {
    const int c = Cost(i, y) + Cost(j, x);
    return c >= 2 ? 0.5 : c == 1 ? 1.0 : 2.0;
  }
  static bool Better(double score, double flat, const Step& b) {
    return score > b.score || (score == b.score && b.kind != 0 && flat < b.flat);
  }
  void Consider(int kind, int64_t i, int64_t j, double reduction, double flat, Step* best) const {
    if (!(reduction > 1e-12 * stop_)) return;
    const double score = reduction * (kind == 1 ? Per(i, slot_[Z(i)], j, slot_[Z(j)]) : Per(i, j));
    if (Better(score, flat, *best)) *best = {kind, i, j, score, flat};
  }

  void BestStep(int64_t h, Step* best) {
    const double M = load_[Z(h)];
    // gain_, base_, pen_, pex_ of the experts whose ranks changed since the last step
    // and is_hot_: the experts on a rank above the stop (gain_ < 0), a bitset over the experts
    // (only a refreshed expert can enter or leave it, or change its gain_: hottest_bound_
    // follows them up, hot_ is out of date).
    for (const int64_t e : dirty_list_) {
      Refresh(e);
      dirty_[Z(e)] = 0;
      const uint64_t bit = uint64_t{1} << (e & 63);
      if (gain_[Z(e)] < 0.0) {
        is_hot_[Z(e >> 6)] |= bit;
        hottest_bound_ = std::max(hottest_bound_, -gain_[Z(e)]);
      } else {
        is_hot_[Z(e >> 6)] &= ~bit;
      }
    }
    if (!dirty_list_.empty()) hot_ready_ = false;
    dirty_list_.clear();
    // m0_, m1_: the two smallest more_, scanned again when SetCount could not follow them.
    if (counts_changed_) {
      counts_changed_ = false;
      m0_ = m1_ = -1;
      for (int64_t e = 0; e < n_; ++e) {
        if (m0_ < 0 || more_[Z(e)] < more_[Z(m0_)]) {
          m1_ = m0_;
          m0_ = e;
        } else if (m1_ < 0 || more_[Z(e)] < more_[Z(m1_)]) {
          m1_ = e;
        }
      }
    }
    Top top;
    // An expert x on h gains a replica in a donor slot: lowers the excess by at most -gain_x
    // plus the excess of the donor's rank (at most `other`), per slot when the donor slot is
    // unchanged, per half a slot when it changed already (reused_). Experts with the most to
    // gain first, so that the bound skips the others once top is full.
    // (`other` from the heaviest rank but h: the last of light_, sorted by Run, that is not h)
    const int64_t heaviest_other = R_ < 2 ? -1 : light_[Z(R_ - 1)] != h ? R_ - 1 : R_ - 2;
    const double other = heaviest_other < 0 ? 0.0 : Ex(load_[Z(light_[Z(heaviest_other)])]);
    // (sorted by insertion, each expert once: a handful)
    on_h_.clear();
    for (int64_t i = h * S_; i < (h + 1) * S_; ++i) {
      const int64_t x = slot_[Z(i)];
      if (std::find(on_h_.begin(), on_h_.end(), x) != on_h_.end()) continue;
      on_h_.push_back(x);
      size_t k = on_h_.size() - 1;
      for (; k > 0 && (gain_[Z(x)] < gain_[Z(on_h_[k - 1])] ||
                       (gain_[Z(x)] == gain_[Z(on_h_[k - 1])] && x < on_h_[k - 1]));
           --k)
        on_h_[k] = on_h_[k - 1];
      on_h_[k] = x;
    }
    // Donors: slots off h whose expert can give up a replica (pen_ finite), in two lists of
    // (slot, load of the rank without it minus the stop, pex_): the changed ones (cost <= 0:
    // per half a slot), the unchanged ones (cost 1).
    // min_pex: a list's smallest pex_, so a score is at most (gx - min_pex) * per.
    double min_pex[2] = {HUGE_VAL, HUGE_VAL};
    // (pen_ is finite exactly for the slots of experts with two or more replicas: shared_, read
    // in slot order; the slots of h go into pex_floor_, which is then exact)
    auto build = [&] {
      double on_h[2] = {HUGE_VAL, HUGE_VAL};
      for (auto& d : donors_) d.clear();
      for (size_t word = 0; word < shared_.size(); ++word)
        for (uint64_t bits = shared_[word]; bits != 0; bits &= bits - 1) {
          const auto q =
              static_cast<int64_t>(word * 64 + static_cast<size_t>(__builtin_ctzll(bits)));
          if (pen_[Z(q)] == HUGE_VAL) continue;
          const int list = slot_[Z(q)] != orig_[Z(q)] ? 1 : 0;
          if (rank_[Z(q)] == h) {
            on_h[list] = std::min(on_h[list], pex_[Z(q)]);
            continue;
          }
          donors_[list].push_back({q, base_[Z(q)] - stop_, pex_[Z(q)]});
          min_pex[list] = std::min(min_pex[list], pex_[Z(q)]);
        }
      for (const int list : {0, 1}) pex_floor_[list] = std::min(min_pex[list], on_h[list]);
    };
    bool built = false;
    for (const int list : {1, 0}) {
      const double per = list == 1 ? 2.0 : 1.0;
      // Most steps stop this list's loop at its first expert already: checked first with
      // pex_floor_ (<= min_pex), and when it stops there, the lists are not built.
      if (!built && !on_h_.empty()) {
        const int64_t x = on_h_[0];
        if ((top.size == Top::kMax && per * (other - gain_[Z(x)]) < top.score[Top::kMax - 1]) ||
            per * (-gain_[Z(x)] - pex_floor_[list]) < top.Floor())
          continue;
      }
      if (!built) {
        build();
        built = true;
      }
      for (const int64_t x : on_h_) {
        if (top.size == Top::kMax && per * (other - gain_[Z(x)]) < top.score[Top::kMax - 1]) break;
        const double nx = more_[Z(x)], gx = -gain_[Z(x)];
        // no score of this list gets in (gx falls along on_h_, the floor only rises)
        if (per * (gx - min_pex[list]) < top.Floor()) break;
        for (const Donor& d : donors_[list]) {
          const double score = (gx - std::max(0.0, d.base + nx) - d.pex) * per;
          if (score < top.Floor() || slot_[Z(d.slot)] == x) continue;
          const double lo = load_[Z(rank_[Z(d.slot)])], after = d.base + stop_ + nx;
          top.Add(score, after * after - lo * lo, d.slot, x);
        }
      }
    }
    // A slot on h gives up its expert x for b: b among the hot experts (their other replicas
    // shrink), the two lightest with one more replica (the rest of the experts only differ in
    // that) and the slot's old expert (cheaper).
    // (The hot ones lower the excess by at most -gain_b each: skipped as a whole when even the
    // most of them cannot beat the best four at half a slot: first by hottest_bound_, then,
    // when that lets them in, by the exact largest -gain_b, read with hot_ from is_hot_.)
    for (int64_t i = h * S_; i < (h + 1) * S_; ++i) {
      const int64_t x = slot_[Z(i)];
      if (cnt_[Z(x)] < 2) continue;
      auto add = [&](int64_t b) {
        if (b < 0 || b == x) return;
        const double after = base_[Z(i)] + more_[Z(b)];
        const double est = Ex(M) - Ex(after) - pen_[Z(i)] - gain_[Z(b)];
        top.Add(est * Per(i, b), after * after - M * M, i, b);
      };
      if (2.0 * (Ex(M) - pen_[Z(i)] + hottest_bound_) >= top.Floor()) {
        if (!hot_ready_) ReadHot();
        if (2.0 * (Ex(M) - pen_[Z(i)] + hottest_bound_) >= top.Floor())
          for (const int64_t b : hot_) add(b);
      }
      add(m0_);
      add(m1_);
      add(orig_[Z(i)]);
    }
    for (int k = 0; k < top.size; ++k) {
      double flat = 0.0;
      const double reduction = EvalConvert(top.slot[k], top.expert[k], &flat);
      Consider(2, top.slot[k], top.expert[k], reduction, flat, best);
    }
    // Swaps of a replica on h with a lighter one on a rank o below the stop (a rank at or above
    // it gains as much excess as h loses). A swap lowers the excess by at most
    // min(d, M - stop, stop - load_o) (d: the load it moves), per two slots when neither rank
    // has a changed slot, else per at least half a slot (per slot of h: its cheapest swap with
    // o, counted in integers). Ranks lightest first (light_); a rank or slot whose bound is not
    // above the best so far is skipped, so on a tie the lighter rank wins, and the scan stops
    // once the bound at two per slot is not above it (the bound falls along the order).
    // Measured: 10-20% less time than a full scan with ties to the flattest, the same changed
    // slots within noise.
    // A swap that moves less than h's excess (h stays above the stop, so it needs another
    // change) counts one slot more than it changes (that only lowers a score: the bounds below
    // stay bounds without it). On the benchmark's Qwen3-235B trace (3 rebalances, --no-peers,
    // with ImposeCap's donors by excess) min_move changed 2921 / 3433 / 3893 slots a rebalance
    // on lognormal 1.0 / 1.5 / Zipf without it, 2866 / 3307 / 3757 with it. Not better: a
    // fractional count (one minus the share of the excess moved) 2919 / 3367 / 3881; two slots
    // 2874 / 3320 / 3814; also one more for a swap that takes o above the stop 2907 / - / 3899;
    // also one more for a conversion that leaves h above it 2865 / - / 3824.
    // h's slots, read once: expert, old expert, load per replica, unchanged
    double h_heaviest = 0.0;
    bool h_kept = true;
    for (int64_t k = 0; k < S_; ++k) {
      const int64_t i = h * S_ + k;
      h_slot_[Z(k)] = {slot_[Z(i)], orig_[Z(i)], wslot_[Z(i)], slot_[Z(i)] == orig_[Z(i)]};
      h_heaviest = std::max(h_heaviest, wslot_[Z(i)]);
      h_kept &= h_slot_[Z(k)].kept;
    }
    bool special_ready = false;
    for (const int64_t o : light_) {
      const double lo = load_[Z(o)];
      if (lo >= stop_ || 2.0 * std::min(M - stop_, stop_ - lo) <= best->score) break;
      if (o == h) continue;
      const double per = changed_on_[Z(h)] + changed_on_[Z(o)] == 0 ? 0.5 : 2.0;
      if (per * std::min(M - stop_, stop_ - lo) <= best->score) continue;
      // moving d from h to o lowers the excess by min(d, M - stop) - max(0, d - (stop - lo))
      const double excess = M - stop_, room = stop_ - lo;
      const double lightest = lightest_[Z(o)];
      if (!special_ready) {
        FillSpecial(h);
        special_ready = true;
      }
      // The cheapest swap of a slot i of h with o, in integers: 2 when neither has changed,
      // else a slot of o that holds neither x nor xi and was not x's costs 1 + kept_i, less one
      // when it changed; the others are in special_. The whole rank first, by its cheapest
      // (looser: with every slot of h's special costs) and h's heaviest replica.
      const int changed_o = changed_on_[Z(o)] > 0 ? 1 : 0;
      const int rank_cheapest =
          std::min(1 + static_cast<int>(h_kept) - changed_o, static_cast<int>(special_rank_[Z(o)]));
      if (kSwapPer[rank_cheapest + 2] * std::min({h_heaviest - lightest, excess, room}) <=
          best->score)
        continue;
      for (int64_t k = 0; k < S_; ++k) {
        const HSlot& hs = h_slot_[Z(k)];
        const int64_t i = h * S_ + k, x = hs.x, xi = hs.xi;
        const double wx = hs.w;
        const int kept_i = hs.kept ? 1 : 0;
        // at two per slot (the most a swap gets) and at its cheapest at once (below zero
        // neither passes: the best so far is never negative)
        const double most = std::min({wx - lightest, excess, room});
        const int cheapest =
            kept_i == 1 && changed_o == 0
                ? 2
                : std::min(1 + kept_i - changed_o, static_cast<int>(special_[Z(o * S_ + k)]));
        if (kSwapPer[cheapest + 2] * most <= best->score) continue;
        for (int64_t j = o * S_; j < (o + 1) * S_; ++j) {
          const int64_t y = slot_[Z(j)], yj = orig_[Z(j)];
          const double d = wx - wslot_[Z(j)];
          if (d <= 0.0) continue;
          const double reduction = std::min(d, excess) - std::max(0.0, d - room);
          if (!(reduction > 1e-12 * stop_)) continue;
          // (a swap that leaves h above the stop counts one slot more: h needs another change)
          const int cost = (y != xi) - 1 + kept_i + (x != yj) - (y != yj) + (d < excess ? 1 : 0);
          const double score = reduction * (cost >= 3   ? 1.0 / 3.0
                                            : cost == 2 ? 0.5
                                            : cost == 1 ? 1.0
                                                        : 2.0);
          if (score < best->score) continue;
          const double flat = (M - d) * (M - d) - M * M + (lo + d) * (lo + d) - lo * lo;
          if (Better(score, flat, *best)) *best = {1, i, j, score, flat};
        }
      }
    }
    for (const int64_t k : special_set_) special_[Z(k)] = kNoSpecial;
    special_set_.clear();
    for (const int64_t r : special_ranks_) special_rank_[Z(r)] = kNoSpecial;
    special_ranks_.clear();
  }

  // special_[o * S + k]: the cheapest swap cost of h's k-th slot i (expert x, old expert xi) with
  // the slots of rank o that hold x or xi or were x's (the others' cost follows from
  // changed_on_), kNoSpecial where there are none; special_rank_[o]: the cheapest over k.
  void FillSpecial(int64_t h) {
    for (int64_t k = 0; k < S_; ++k) {
      const int64_t i = h * S_ + k, x = slot_[Z(i)], xi = orig_[Z(i)];
      const int kept_i = x == xi;
      auto add = [&](int64_t j) {
        const int64_t y = slot_[Z(j)], yj = orig_[Z(j)], o = rank_[Z(j)];
        if (o == h) return;  // (no swap within h)
        const auto cost = static_cast<int8_t>((y != xi) - 1 + kept_i + (x != yj) - (y != yj));
        const int64_t at = o * S_ + k;
        if (special_[Z(at)] == kNoSpecial) special_set_.push_back(at);
        special_[Z(at)] = std::min(special_[Z(at)], cost);
        if (special_rank_[Z(o)] == kNoSpecial) special_ranks_.push_back(o);
        special_rank_[Z(o)] = std::min(special_rank_[Z(o)], cost);
      };
      for (int64_t j = lists_.head[Z(x)]; j >= 0; j = lists_.next[Z(j)]) add(j);
      if (xi >= 0 && !kept_i)
        for (int64_t j = lists_.head[Z(xi)]; j >= 0; j = lists_.next[Z(j)]) add(j);
      for (int64_t q = was_start_[Z(x)]; q < was_start_[Z(x + 1)]; ++q) add(was_[Z(q)]);
    }
  }

  // The kTop best conversion estimates.
  struct Top {
    // No estimate below this gets in.
    double Floor() const { return size < kMax ? 0.0 : score[kMax - 1]; }
    static constexpr int kMax = 4;
    double score[kMax], flat[kMax];
    int64_t slot[kMax], expert[kMax];
    int size = 0;
    void Add(double sc, double fl, int64_t s, int64_t e) {
      if (!(sc > 0.0)) return;
      int k = size < kMax ? size++ : kMax;
      if (k == kMax) {
        if (!(sc > score[kMax - 1] || (sc == score[kMax - 1] && fl < flat[kMax - 1]))) return;
        k = kMax - 1;
      }
      while (k > 0 && (score[k - 1] < sc || (score[k - 1] == sc && flat[k - 1] > fl))) {
        score[k] = score[k - 1];
        flat[k] = flat[k - 1];
        slot[k] = slot[k - 1];
        expert[k] = expert[k - 1];
        --k;
      }
      score[k] = sc;
      flat[k] = fl;
      slot[k] = s;
      expert[k] = e;
    }
  };

  // Excess reduction of turning slot s (expert a, >= 2 replicas) into expert b; flat: the change
  // of the sum of squared loads of the touched ranks.
  double EvalConvert(int64_t s, int64_t b, double* flat) {
    const int64_t a = slot_[Z(s)];
    const double wa = per_[Z(a)], wa_new = w_[a] / static_cast<double>(cnt_[Z(a)] - 1);
    const double wb = per_[Z(b)], wb_new = w_[b] / static_cast<double>(cnt_[Z(b)] + 1);
    touched_.clear();
    auto add = [&](int64_t r, double d) {
      if (std::find(touched_.begin(), touched_.end(), r) == touched_.end()) touched_.push_back(r);
      delta_[Z(r)] += d;
    };
    for (int64_t q = lists_.head[Z(a)]; q >= 0; q = lists_.next[Z(q)])
      add(rank_[Z(q)], q == s ? wb_new - wa : wa_new - wa);
    for (int64_t q = lists_.head[Z(b)]; q >= 0; q = lists_.next[Z(q)])
      add(rank_[Z(q)], wb_new - wb);
    double reduction = 0.0;
    *flat = 0.0;
    for (const int64_t r : touched_) {
      const double v = load_[Z(r)], nv = v + delta_[Z(r)];
      reduction += Ex(v) - Ex(nv);
      *flat += nv * nv - v * v;
      delta_[Z(r)] = 0.0;
    }
    return reduction;
  }

  void Apply(const Step& st) {
    if (st.kind == 1) {
      const int64_t x = slot_[Z(st.i)], y = slot_[Z(st.j)];
      changed_ += Cost(st.i, y) + Cost(st.j, x);
      const bool was_i = x != orig_[Z(st.i)], was_j = y != orig_[Z(st.j)];
      std::swap(slot_[Z(st.i)], slot_[Z(st.j)]);
      std::swap(wslot_[Z(st.i)], wslot_[Z(st.j)]);
      CountChange(st.i, was_i);
      CountChange(st.j, was_j);
      const int64_t pi = lists_.prev[Z(st.i)], ni = lists_.next[Z(st.i)];
      const int64_t pj = lists_.prev[Z(st.j)], nj = lists_.next[Z(st.j)];
      lists_.Relink(x, st.j, pi, ni);
      lists_.Relink(y, st.i, pj, nj);
      UpdateRank(rank_[Z(st.i)]);
      UpdateRank(rank_[Z(st.j)]);
      MarkRank(rank_[Z(st.i)]);
      MarkRank(rank_[Z(st.j)]);
      MarkShared(st.i);
      MarkShared(st.j);
      return;
    }
    const int64_t a = slot_[Z(st.i)], b = st.j;
    changed_ += Cost(st.i, b);
    SetCount(a, cnt_[Z(a)] - 1);
    SetCount(b, cnt_[Z(b)] + 1);
    const int64_t r0 = rank_[Z(st.i)];
    const bool was = a != orig_[Z(st.i)];
    slot_[Z(st.i)] = b;
    CountChange(st.i, was);
    lists_.Unlink(a, st.i);
    lists_.Append(b, st.i);
    // the ranks holding a or b, each once (a hot expert has several replicas on some ranks)
    touched_.assign(1, r0);
    for (const int64_t e : {a, b})
      for (int64_t q = lists_.head[Z(e)]; q >= 0; q = lists_.next[Z(q)]) {
        wslot_[Z(q)] = per_[Z(e)];
        MarkShared(q);
        if (std::find(touched_.begin(), touched_.end(), rank_[Z(q)]) == touched_.end())
          touched_.push_back(rank_[Z(q)]);
      }
    for (const int64_t r : touched_) {
      UpdateRank(r);
      MarkRank(r);
    }
  }

  // shared_ bit of slot s: its expert has two or more replicas.
  void MarkShared(int64_t s) {
    const uint64_t bit = uint64_t{1} << (s & 63);
    if (cnt_[Z(slot_[Z(s)])] >= 2) {
      shared_[Z(s >> 6)] |= bit;
    } else {
      shared_[Z(s >> 6)] &= ~bit;
    }
  }

  // Slot s's expert changed (it differed from the old one before: was): changed_on_.
  void CountChange(int64_t s, bool was) {
    changed_on_[Z(rank_[Z(s)])] +=
        static_cast<int>(slot_[Z(s)] != orig_[Z(s)]) - static_cast<int>(was);
  }

  // Expert e's terms are out of date: its ranks' loads or its count changed.
  void Mark(int64_t e) {
    if (dirty_[Z(e)]) return;
    dirty_[Z(e)] = 1;
    dirty_list_.push_back(e);
  }
  void MarkRank(int64_t r) {
    for (int64_t q = r * S_; q < (r + 1) * S_; ++q) Mark(slot_[Z(q)]);
  }

  // Expert e's excess change on its ranks when it gains a replica (gain_), each rank counted
  // alone; per slot q of e (rank o): o's load without it (base_), the excess e's other ranks gain
  // when it gives q up (pen_, +inf: it cannot), that minus o's excess (pex_).
  void Refresh(int64_t e) {
    const double down = more_[Z(e)] - per_[Z(e)];
    double g = 0.0;
    if (cnt_[Z(e)] < 2) {  // cannot give up a replica: pen_, pex_ infinite
      for (int64_t q = lists_.head[Z(e)]; q >= 0; q = lists_.next[Z(q)]) {
        const double v = load_[Z(rank_[Z(q)])];
        g += Ex(v + down) - Ex(v);
        base_[Z(q)] = v - per_[Z(e)];
        pen_[Z(q)] = HUGE_VAL;
        pex_[Z(q)] = HUGE_VAL;
      }
      gain_[Z(e)] = g;
      return;
    }
    // rise_[k], ex_[k]: the excess its k-th rank gains when e gives up a replica; its excess.
    // l: their sum.
    const double up = up_[Z(e)];
    double l = 0.0;
    int64_t k = 0;
    for (int64_t q = lists_.head[Z(e)]; q >= 0; q = lists_.next[Z(q)], ++k) {
      const double v = load_[Z(rank_[Z(q)])], ex = Ex(v);
      ex_[Z(k)] = ex;
      rise_[Z(k)] = Ex(v + up) - ex;
      g += Ex(v + down) - ex;
      l += rise_[Z(k)];
    }
    gain_[Z(e)] = g;
    k = 0;
    for (int64_t q = lists_.head[Z(e)]; q >= 0; q = lists_.next[Z(q)], ++k) {
      base_[Z(q)] = load_[Z(rank_[Z(q)])] - per_[Z(e)];
      pen_[Z(q)] = l - rise_[Z(k)];
      pex_[Z(q)] = pen_[Z(q)] - ex_[Z(k)];
      double& floor = pex_floor_[slot_[Z(q)] != orig_[Z(q)] ? 1 : 0];
      floor = std::min(floor, pex_[Z(q)]);
    }
  }

  const double* w_ = nullptr;
  int64_t n_ = 0, R_ = 0, S_ = 0, P_ = 0;
  double stop_ = 0.0;
  int64_t changed_ = 0;
  bool prepared_ = false;      // Prepare ran since Reset
  std::vector<int64_t> on_h_;  // BestStep scratch
  std::vector<int64_t> over_;  // ImposeCap scratch
  std::vector<int64_t> hot_;   // see ReadHot: up to date when hot_ready_
  bool hot_ready_ = false;
  double hottest_bound_ = 0.0;  // >= -gain_ of every expert in is_hot_
  // [R] ranks lightest first; moved_ / moved_list_: ranks whose load changed since it was sorted
  std::vector<int64_t> light_, merged_, moved_list_;
  std::vector<char> moved_;
  std::vector<double> wslot_;  // [P] per_ of each slot's expert
  // was_start_ [n + 1], was_: the slots whose old expert is e (CSR)
  std::vector<int64_t> was_start_, was_;
  static constexpr int8_t kNoSpecial = 2;
  std::vector<int8_t> special_;         // [R * S] see FillSpecial
  std::vector<int64_t> special_set_;    // its entries not kNoSpecial
  std::vector<int8_t> special_rank_;    // [R] see FillSpecial
  std::vector<int64_t> special_ranks_;  // its entries not kNoSpecial
  struct HSlot {
    int64_t x, xi;  // expert, old expert
    double w;       // load per replica
    bool kept;      // x == xi
  };
  std::vector<HSlot> h_slot_;     // [S] BestStep scratch: the slots of h
  std::vector<double> lightest_;  // [R] smallest wslot_ of each rank
  bool counts_changed_ = true;    // m0_, m1_ are out of date
  int64_t m0_ = -1, m1_ = -1;
  std::vector<int64_t> changed_on_;  // [R] changed slots per rank
  struct Donor {
    int64_t slot;
    double base, pex;
  };
  std::vector<Donor> donors_[2];  // BestStep scratch
  // [2] <= pex_ of every slot of each donor list, h's included (Refresh lowers them; building
  // the lists makes them exact)
  double pex_floor_[2] = {HUGE_VAL, HUGE_VAL};
  std::vector<char> dirty_;  // [n] experts whose gain_ .. pex_ need a Refresh
  std::vector<int64_t> dirty_list_;
  std::vector<uint64_t> is_hot_;  // [n / 64] bit per expert: in hot_
  std::vector<int64_t> slot_, orig_, rank_, cnt_, touched_;
  detail::SlotLists lists_;  // each expert's slots
  std::vector<double> per_, load_, delta_;
  std::vector<double> more_, up_;  // [n] load per replica with one more; growth with one fewer
  std::vector<double> gain_, base_, pen_, pex_;  // kept up to date by Refresh
  std::vector<double> rise_, ex_;                // Refresh scratch
  std::vector<uint64_t> shared_;  // [P / 64] bit per slot: its expert has >= 2 replicas
};

// Searches one pack (all slots, or one node's) from the old placement, first taking the replica
// counts target_cnt [E] when given (ImposeCounts); writes the global ids into phy2log and returns
// whether the pack reached `stop` with fewer than `budget` changed slots.
bool SearchPack(const double* load, const int64_t* old, const std::vector<int64_t>& experts,
                int64_t first_slot, int64_t num_ranks, int64_t S, double stop, double target,
                int64_t budget, int64_t E, const int64_t* target_cnt, int64_t* phy2log,
                double* cap = nullptr) {
  const auto n = static_cast<int64_t>(experts.size());
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    MoveSearch search;
    std::vector<int64_t> local, slots, counts;
    std::vector<double> w;
  } tls;
  auto& local = tls.local;  // [E] -1 between calls
  auto& w = tls.w;
  auto& slots = tls.slots;
  if (local.size() < Z(E)) local.resize(Z(E), -1);
  w.resize(Z(n));
  for (int64_t i = 0; i < n; ++i) {
    local[Z(experts[Z(i)])] = i;
    w[Z(i)] = load[experts[Z(i)]];
  }
  slots.resize(Z(num_ranks * S));
  for (int64_t j = 0; j < num_ranks * S; ++j) slots[Z(j)] = local[Z(old[first_slot + j])];
  for (const int64_t e : experts) local[Z(e)] = -1;
  // (moved out of the thread's and back: a local object, whose members no store through a
  // pointer can change, runs about 10% faster than the thread_local one)
  MoveSearch search = std::move(tls.search);
  search.Reset(w.data(), n, num_ranks, S, slots.data(), slots.data(), stop);
  if (target_cnt != nullptr) {
    auto& counts = tls.counts;
    counts.resize(Z(n));
    for (int64_t i = 0; i < n; ++i) counts[Z(i)] = target_cnt[experts[Z(i)]];
    search.ImposeCounts(counts.data());
  }
  const double imposed = search.ImposeCap(target);
  if (cap != nullptr) *cap = imposed;
  const bool ok = search.Run(budget);
  for (int64_t j = 0; j < num_ranks * S; ++j)
    phy2log[first_slot + j] = experts[Z(search.slots()[Z(j)])];
  tls.search = std::move(search);
  return ok;
}

// Walks `cur` [P] (max rank load <= stop) back toward `old` [P] over the ranks [first_rank,
// first_rank + num_ranks), restoring old slot contents while every rank stays <= stop:
//   - swap back: a changed slot p whose old expert x sits in another changed slot t trades
//     places with t (replica counts unchanged; restores p, and t too when t's old expert is
//     p's current one);
//   - convert back: a changed slot p holding y (>= 2 replicas) takes its old expert x again,
//     which changes the load per replica of x and y on every rank holding them.
// Each pass ranks the possible steps (two slots restored first, then by the highest rank load
// they leave) and applies them in that order, each re-checked; passes until none applies.
// allowed [E] or null: experts that may be converted back into these ranks (hierarchical: the
// experts of the node's groups). `cur` keeps each rank's old experts in their old slots
// (PreserveSlots), so "changed" is per slot what the plan reports.
// The state is reused: one object per thread (RunWalkBack), its vectors keep their capacity
// across calls (up to about 9 walks per hierarchical layer).
class WalkBack {
 public:
  void Run(const double* load, const int64_t* old, const Shape& s, int64_t first_rank,
           int64_t num_ranks, double stop, double cap, const char* allowed, int64_t* cur) {
    load_ = load;
    old_ = old;
    cur_ = cur;
    allowed_ = allowed;
    const int64_t S = s.slots_per_rank();
    lo_ = first_rank * S;
    hi_ = (first_rank + num_ranks) * S;
    limit_ = stop * (1.0 - 1e-12);
    // replica counts from these ranks alone: every replica of their experts is among them
    // (global: all ranks; hierarchical: the node of the experts' groups)
    cnt_.assign(Z(s.num_logical), 0);
    for (int64_t p = lo_; p < hi_; ++p) ++cnt_[Z(cur[p])];
    // (only the experts in these ranks: another's is stale, and where read goes unused, as x's in
    // Best and ConvertWorst when x has no slot here)
    share_.resize(Z(s.num_logical));
    for (int64_t p = lo_; p < hi_; ++p) SetShare(cur[p]);
    // (no expert converted back above the cap or the heaviest replica there is already)
    cap_ = cap;
    for (int64_t p = lo_; p < hi_; ++p) cap_ = std::max(cap_, share_[Z(cur[p])]);
    // (each slot's rank from a table: a 64-bit division costs more than the step it serves)
    rank_of_.resize(Z(s.num_physical));
    for (int64_t r = first_rank; r < first_rank + num_ranks; ++r)
      std::fill(rank_of_.begin() + r * S, rank_of_.begin() + (r + 1) * S, r);
    rank_load_.assign(Z(s.num_ranks), 0.0);
    delta_.assign(Z(s.num_ranks), 0.0);
    seen_.assign(Z(s.num_ranks), 0);
    for (int64_t p = lo_; p < hi_; ++p) rank_load_[Z(rank_of_[Z(p)])] += share_[Z(cur[p])];
    lists_.Reset(s.num_logical, s.num_physical);
    for (int64_t p = lo_; p < hi_; ++p) lists_.Append(cur[p], p);
    Walk();
  }

 private:
  void Walk() {
    auto& steps = steps_;
    for (int pass = 0; pass < 8; ++pass) {
      steps.clear();
      for (int64_t p = lo_; p < hi_; ++p) {
        if (cur_[p] == old_[p]) continue;
        const Option o = Best(p);
        if (o.restored > 0) steps.emplace_back(-o.restored, o.worst, p);
      }
      if (steps.empty()) return;
      std::sort(steps.begin(), steps.end());
      bool applied = false;
      for (const auto& st : steps) {
        const int64_t p = std::get<2>(st);
        if (cur_[p] == old_[p]) continue;  // restored by an earlier swap
        const Option o = Best(p);
        if (o.restored == 0) continue;
        Apply(p, o);
        applied = true;
      }
      if (!applied) return;
    }
  }

  struct Option {
    int restored = 0;  // slots restored: 0 none possible
    double worst = 0.0;
    int64_t t = -1;  // swap partner, or -1 for a conversion
  };

  // share_[e]: load per replica, follows cnt_ (the passes read it for every changed slot).
  void SetShare(int64_t e) { share_[Z(e)] = load_[e] / static_cast<double>(cnt_[Z(e)]); }

  Option Best(int64_t p) {
    const int64_t y = cur_[p], x = old_[p], r = rank_of_[Z(p)];
    Option best;
    // a swap: r gains d, the partner loses d (x has no slot here when its share_ is stale)
    const double d = lists_.head[Z(x)] >= 0 ? share_[Z(x)] - share_[Z(y)] : 0.0;
    for (int64_t t = lists_.head[Z(x)]; t >= 0; t = lists_.next[Z(t)]) {
      const int64_t o = rank_of_[Z(t)];
      if (o == r || cur_[t] == old_[t]) continue;
      const int restored = old_[t] == y ? 2 : 1;
      const double worst = std::max(rank_load_[Z(r)] + d, rank_load_[Z(o)] - d);
      if (worst > limit_) continue;
      if (restored > best.restored || (restored == best.restored && worst < best.worst))
        best = {restored, worst, t};
    }
    if (best.restored > 0 || cnt_[Z(y)] < 2 || (allowed_ != nullptr && !allowed_[x]) ||
        load_[y] / static_cast<double>(cnt_[Z(y)] - 1) > cap_)
      return best;
    const double worst = ConvertWorst(p, y, x, false);
    if (worst <= limit_) best = {1, worst, -1};
    return best;
  }

  // Max load over the ranks touched by converting slot p from y to x; applies it when `apply`.
  double ConvertWorst(int64_t p, int64_t y, int64_t x, bool apply) {
    const double y_old = share_[Z(y)], x_old = share_[Z(x)];
    const double y_new = load_[y] / static_cast<double>(cnt_[Z(y)] - 1);
    const double x_new = load_[x] / static_cast<double>(cnt_[Z(x)] + 1);
    touched_.clear();
    auto add = [&](int64_t rank, double d) {
      if (!seen_[Z(rank)]) {  // (a hot expert's replicas touch many ranks: no search of touched_)
        seen_[Z(rank)] = 1;
        touched_.push_back(rank);
      }
      delta_[Z(rank)] += d;
    };
    for (int64_t q = lists_.head[Z(y)]; q >= 0; q = lists_.next[Z(q)])
      add(rank_of_[Z(q)], q == p ? -y_old : y_new - y_old);
    for (int64_t q = lists_.head[Z(x)]; q >= 0; q = lists_.next[Z(q)])
      add(rank_of_[Z(q)], x_new - x_old);
    add(rank_of_[Z(p)], x_new);
    double worst = 0.0;
    for (const int64_t rank : touched_) {
      worst = std::max(worst, rank_load_[Z(rank)] + delta_[Z(rank)]);
      if (apply) rank_load_[Z(rank)] += delta_[Z(rank)];
      delta_[Z(rank)] = 0.0;
      seen_[Z(rank)] = 0;
    }
    return worst;
  }

  void Apply(int64_t p, const Option& o) {
    const int64_t y = cur_[p], x = old_[p];
    if (o.t >= 0) {
      const double d = share_[Z(x)] - share_[Z(y)];
      rank_load_[Z(rank_of_[Z(p)])] += d;
      rank_load_[Z(rank_of_[Z(o.t)])] -= d;
      std::swap(cur_[p], cur_[o.t]);
      // p takes t's place in x's list and t p's in y's
      const int64_t pp = lists_.prev[Z(p)], np = lists_.next[Z(p)], pt = lists_.prev[Z(o.t)],
                    nt = lists_.next[Z(o.t)];
      lists_.Relink(x, p, pt, nt);
      lists_.Relink(y, o.t, pp, np);
      return;
    }
    ConvertWorst(p, y, x, true);
    --cnt_[Z(y)];
    ++cnt_[Z(x)];
    SetShare(y);
    SetShare(x);
    cur_[p] = x;
    lists_.Unlink(y, p);
    lists_.Append(x, p);
  }

  const double* load_ = nullptr;
  const int64_t* old_ = nullptr;
  int64_t* cur_ = nullptr;
  const char* allowed_ = nullptr;
  int64_t lo_ = 0, hi_ = 0;
  double limit_ = 0.0, cap_ = HUGE_VAL;
  std::vector<int64_t> cnt_, touched_, rank_of_;
  std::vector<double> share_;                            // [experts] see SetShare
  std::vector<std::tuple<int, double, int64_t>> steps_;  // Walk scratch: (-restored, worst, slot)
  std::vector<char> seen_;                               // [ranks] in touched_
  std::vector<double> rank_load_, delta_;
  // the slots of each expert in these ranks, in order
  detail::SlotLists lists_;
};

// WalkBack::Run with the thread's object.
void RunWalkBack(const double* load, const int64_t* old, const Shape& s, int64_t first_rank,
                 int64_t num_ranks, double stop, double cap, const char* allowed, int64_t* cur) {
  thread_local WalkBack walk_tls;  // moved out and back as in SearchPack
  WalkBack walk = std::move(walk_tls);
  walk.Run(load, old, s, first_rank, num_ranks, stop, cap, allowed, cur);
  walk_tls = std::move(walk);
}

// Node n keeps its old groups (`experts`) but the search from its old content got stuck: the
// node planned alone by `balanced` (its ranks, its slots, its experts), renumbered onto its old
// content, kept experts in their old slots, and walked back toward it. Returns whether its max
// rank load gets <= stop, and only then writes the node's slots of out [P]. On the benchmark's
// DeepSeek-V3 hierarchical Zipf trace the search got stuck on nodes whose old groups fit the
// stop on about half the layers, and the group trade the fallback then made changed 107 slots
// a layer against 14 where no trade was made.
bool RebalanceNode(const double* load, const int64_t* old, const Shape& s, int64_t n,
                   const std::vector<int64_t>& experts, double stop, double target, int64_t* out) {
  const int64_t rpn = s.num_ranks / s.num_nodes, node_slots = rpn * s.slots_per_rank();
  const auto m = static_cast<int64_t>(experts.size());
  thread_local struct {
    std::vector<double> w;
    std::vector<int64_t> local, fresh, full;
    std::vector<char> allowed;  // [E] all zero between calls
  } tls;
  tls.w.resize(Z(m));
  for (int64_t i = 0; i < m; ++i) tls.w[Z(i)] = load[experts[Z(i)]];
  Shape node = s;
  node.num_layers = 1;
  node.num_logical = m;
  node.num_physical = node_slots;
  node.num_ranks = rpn;
  node.num_nodes = node.num_groups = 1;
  tls.local.resize(Z(node_slots));
  BalancedLayer(tls.w.data(), node, tls.local.data());
  tls.fresh.resize(Z(node_slots));
  for (int64_t j = 0; j < node_slots; ++j) tls.fresh[Z(j)] = experts[Z(tls.local[Z(j)])];
  const int64_t first = n * node_slots;
  node.num_logical = s.num_logical;  // (global ids from here)
  tls.full.assign(old, old + s.num_physical);
  Renumber(tls.fresh.data(), old + first, node, tls.full.data() + first);
  PreserveSlots(tls.full.data() + first, old + first, node);
  // (every replica of the node's experts is in the node: its slots alone give their counts)
  if (MaxRankLoad(load, tls.full.data() + first, node) > stop) return false;
  auto& allowed = tls.allowed;
  if (allowed.size() < Z(s.num_logical)) allowed.resize(Z(s.num_logical), 0);
  for (const int64_t e : experts) allowed[Z(e)] = 1;
  RunWalkBack(load, old, s, n * rpn, rpn, stop, ReplicaCap(load, experts, node_slots, target),
              allowed.data(), tls.full.data());
  for (const int64_t e : experts) allowed[Z(e)] = 0;
  std::copy(tls.full.begin() + first, tls.full.begin() + first + node_slots, out + first);
  return true;
}

// Single group swaps tried by the hierarchical fallback (lightest heaviest node first).
constexpr size_t kGroupSwapsTried = 2;

// Node n of a new group->node partition holding `experts`, from its old content: the slots of
// the experts that left take the experts that came (each once, then extra replicas by the
// largest load per replica; heaviest replica first, each on the rank that is lightest so far),
// then searched (MoveSearch, changes counted against the old content) and walked back. Returns
// whether its max rank load gets <= stop, and only then writes the node's slots of out [P] (it
// reads none of them before).
bool SubstituteNode(const double* load, const int64_t* old, const Shape& s, int64_t n,
                    const std::vector<int64_t>& experts, double stop, double target, int64_t* out) {
  const int64_t S = s.slots_per_rank(), rpn = s.num_ranks / s.num_nodes, node_slots = rpn * S;
  const int64_t first = n * node_slots;
  const auto m = static_cast<int64_t>(experts.size());
  // (the thread's scratch, reused: up to 8 calls per hierarchical layer)
  thread_local struct {
    std::vector<int64_t> local, orig, start, cnt, free_slots, incoming, free_count, next_free;
    std::vector<double> w, share, rank_load;
    std::vector<char> allowed;  // [experts] all zero between calls
  } tls;
  auto& local = tls.local;
  auto& orig = tls.orig;
  auto& start = tls.start;
  auto& w = tls.w;
  if (local.size() < Z(s.num_logical)) {
    local.resize(Z(s.num_logical), -1);
    tls.allowed.resize(Z(s.num_logical), 0);
  }
  orig.resize(Z(node_slots));
  start.resize(Z(node_slots));
  w.resize(Z(m));
  for (int64_t i = 0; i < m; ++i) {
    local[Z(experts[Z(i)])] = i;
    w[Z(i)] = load[experts[Z(i)]];
  }
  auto& cnt = tls.cnt;
  auto& free_slots = tls.free_slots;
  cnt.assign(Z(m), 0);
  free_slots.clear();
  for (int64_t j = 0; j < node_slots; ++j) {
    orig[Z(j)] = local[Z(old[first + j])];
    start[Z(j)] = orig[Z(j)];
    if (orig[Z(j)] >= 0) {
      ++cnt[Z(orig[Z(j)])];
    } else {
      free_slots.push_back(j);
    }
  }
  for (const int64_t e : experts) local[Z(e)] = -1;  // (local is -1 between calls)
  auto& incoming = tls.incoming;                     // one entry per replica
  incoming.clear();
  for (int64_t i = 0; i < m; ++i)
    if (cnt[Z(i)] == 0) {
      cnt[Z(i)] = 1;
      incoming.push_back(i);
    }
  const auto arrivals = static_cast<int64_t>(incoming.size());
  if (arrivals > static_cast<int64_t>(free_slots.size())) return false;
  while (incoming.size() < free_slots.size()) {
    int64_t best = incoming[0];
    for (int64_t k = 1; k < arrivals; ++k) {
      const int64_t e = incoming[Z(k)];
      if (w[Z(e)] * static_cast<double>(cnt[Z(best)]) > w[Z(best)] * static_cast<double>(cnt[Z(e)]))
        best = e;
    }
    ++cnt[Z(best)];
    incoming.push_back(best);
  }
  // load per replica (counts final from here), divided once rather than in every comparison
  auto& share = tls.share;
  share.resize(Z(m));
  for (int64_t e = 0; e < m; ++e) share[Z(e)] = w[Z(e)] / static_cast<double>(cnt[Z(e)]);
  auto per = [&](int64_t e) { return share[Z(e)]; };
  // heaviest first, stable (by insertion: a few dozen entries, and no temporary buffer as
  // std::stable_sort takes)
  for (size_t k = 1; k < incoming.size(); ++k) {
    const int64_t e = incoming[k];
    size_t at = k;
    for (; at > 0 && per(e) > per(incoming[at - 1]); --at) incoming[at] = incoming[at - 1];
    incoming[at] = e;
  }
  auto& rank_load = tls.rank_load;
  rank_load.assign(Z(rpn), 0.0);
  for (int64_t j = 0; j < node_slots; ++j)
    if (start[Z(j)] >= 0) rank_load[Z(j / S)] += per(start[Z(j)]);
  // free slots per rank, in slot order (next_free: the first unused one of each rank)
  auto& free_count = tls.free_count;
  auto& next_free = tls.next_free;
  free_count.assign(Z(rpn), 0);
  next_free.assign(Z(rpn), 0);
  for (const int64_t j : free_slots) ++free_count[Z(j / S)];
  for (size_t k = free_slots.size(); k-- > 0;) next_free[Z(free_slots[k] / S)] = free_slots[k];
  // (a rank without a free slot reads as infinitely loaded: the lightest, first on ties, is then
  // a plain minimum, and there is always a rank with a free slot left)
  for (int64_t q = 0; q < rpn; ++q)
    if (free_count[Z(q)] == 0) rank_load[Z(q)] = HUGE_VAL;
  for (const int64_t e : incoming) {
    int64_t r = 0;
    for (int64_t q = 1; q < rpn; ++q)
      if (rank_load[Z(q)] < rank_load[Z(r)]) r = q;
    int64_t j = next_free[Z(r)];
    start[Z(j)] = e;
    rank_load[Z(r)] += per(e);
    if (--free_count[Z(r)] > 0) {
      do ++j;
      while (start[Z(j)] >= 0);  // free slots still hold -1
      next_free[Z(r)] = j;
    } else {
      rank_load[Z(r)] = HUGE_VAL;
    }
  }
  thread_local MoveSearch search_tls;  // moved out and back as in SearchPack
  MoveSearch search = std::move(search_tls);
  search.Reset(w.data(), m, rpn, S, start.data(), orig.data(), stop);
  const double cap = search.ImposeCap(target);
  const bool reached = search.Run(node_slots + 1);
  if (reached)
    for (int64_t j = 0; j < node_slots; ++j) out[first + j] = experts[Z(search.slots()[Z(j)])];
  search_tls = std::move(search);
  if (!reached) return false;
  Shape rank_shape = s;  // PreserveSlots over this node's ranks only
  rank_shape.num_layers = 1;
  rank_shape.num_ranks = rpn;
  rank_shape.num_physical = node_slots;
  PreserveSlots(out + first, old + first, rank_shape);
  std::vector<char>& allowed = tls.allowed;
  for (const int64_t e : experts) allowed[Z(e)] = 1;
  RunWalkBack(load, old, s, n * rpn, rpn, stop, cap, allowed.data(), out);
  for (const int64_t e : experts) allowed[Z(e)] = 0;
  return true;
}

// Nodes of the old placement's groups when it follows the hierarchical topology (every group on
// one node, num_groups / num_nodes groups per node); empty otherwise.
// Node n of a new group->node partition holding `experts`: SubstituteNode or RebalanceNode,
// whichever changes fewer of its slots (RebalanceNode only where it is strictly fewer or
// SubstituteNode does not get <= stop); same contract as those two. Used by MinMoveLayer's
// group swaps: on the benchmark's DeepSeek-V3 hierarchical trace (3 rebalances, --runs 3, this
// VM) it took min_move's changed slots from 0.206 to 0.178 of `balanced`'s on Zipf and 0.224 to
// 0.220 on lognormal 1.5, at 7.3 -> 8.4 ms a plan on Zipf. (Also for the fallback's nodes and
// MinMoveFromBound's swaps: 0.175 on Zipf at 9.8 ms, and +10-20% time on lognormal; not kept.)
bool NewNode(const double* load, const int64_t* old, const Shape& s, int64_t n,
             const std::vector<int64_t>& experts, double stop, double target, int64_t* out) {
  const int64_t node_slots = s.num_physical / s.num_nodes, first = n * node_slots;
  thread_local struct {
    std::vector<int64_t> alt, count;
  } tls;
  tls.alt.resize(Z(s.num_physical));
  if (tls.count.size() < Z(s.num_logical)) tls.count.resize(Z(s.num_logical), 0);
  const bool substituted = SubstituteNode(load, old, s, n, experts, stop, target, out);
  if (!RebalanceNode(load, old, s, n, experts, stop, target, tls.alt.data())) return substituted;
  const int64_t S = s.slots_per_rank(), last = first + node_slots;
  if (!substituted || RankMoves(old, tls.alt.data(), first, last, S, &tls.count) <
                          RankMoves(old, out, first, last, S, &tls.count))
    std::copy(tls.alt.begin() + first, tls.alt.begin() + last, out + first);
  return true;
}

std::vector<int64_t> OldGroupNodes(const int64_t* old, const Shape& s) {
  const int64_t G = s.num_groups, N = s.num_nodes, group_size = s.num_logical / G;
  const int64_t node_slots = s.num_physical / N;
  // Each expert's group from a table (no integer division per slot: one costs more than the
  // rest of the loop body)
  thread_local std::vector<int64_t> group_of_tls;
  std::vector<int64_t>& group_of = group_of_tls;
  group_of.resize(Z(s.num_logical));
  for (int64_t g = 0; g < G; ++g)
    std::fill(group_of.begin() + g * group_size, group_of.begin() + (g + 1) * group_size, g);
  std::vector<int64_t> node_of(Z(G), -1), per_node(Z(N), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = n * node_slots; p < (n + 1) * node_slots; ++p) {
      const int64_t g = group_of[Z(old[p])];
      if (node_of[Z(g)] < 0) {
        node_of[Z(g)] = n;
        ++per_node[Z(n)];
      } else if (node_of[Z(g)] != n) {
        return {};
      }
    }
  for (int64_t n = 0; n < N; ++n)
    if (per_node[Z(n)] != G / N) return {};
  return node_of;
}

// The experts of node n under the group->node partition group_node [G], ascending (group by
// group: no division per expert).
std::vector<int64_t> NodeExperts(const std::vector<int64_t>& group_node, int64_t n,
                                 int64_t group_size) {
  std::vector<int64_t> experts;
  for (size_t g = 0; g < group_node.size(); ++g)
    if (group_node[g] == n)
      for (int64_t e = static_cast<int64_t>(g) * group_size;
           e < static_cast<int64_t>(g + 1) * group_size; ++e)
        experts.push_back(e);
  return experts;
}

// The trades of two groups on different nodes, as (max node load after it, group x, group y),
// the one that leaves the heaviest node lightest first. group_load [G]; node_of [G]: each
// group's node; node_load [N]: each node's load under node_of.
std::vector<std::tuple<double, int64_t, int64_t>> GroupSwaps(const std::vector<double>& group_load,
                                                             const std::vector<int64_t>& node_of,
                                                             const std::vector<double>& node_load) {
  const auto G = static_cast<int64_t>(group_load.size());
  const auto N = static_cast<int64_t>(node_load.size());
  std::vector<std::tuple<double, int64_t, int64_t>> swaps;
  for (int64_t x = 0; x < G; ++x)
    for (int64_t y = x + 1; y < G; ++y) {
      const int64_t nx = node_of[Z(x)], ny = node_of[Z(y)];
      if (nx == ny) continue;
      const double d = group_load[Z(x)] - group_load[Z(y)];
      double worst = std::max(node_load[Z(nx)] - d, node_load[Z(ny)] + d);
      for (int64_t n = 0; n < N; ++n)
        if (n != nx && n != ny) worst = std::max(worst, node_load[Z(n)]);
      swaps.emplace_back(worst, x, y);
    }
  std::sort(swaps.begin(), swaps.end());
  return swaps;
}

// Global: the search over every slot from the old placement (SearchPack, `experts` all of them);
// when it reaches the stop, each rank's kept experts back in their old slots and walked back
// toward the old placement (phy2log written). Returns whether it reached the stop.
bool SearchAll(const double* load, const int64_t* old, const Shape& shape,
               const std::vector<int64_t>& experts, double stop, double target, int64_t budget,
               const int64_t* target_cnt, int64_t* phy2log) {
  double cap = 0.0;
  if (!SearchPack(load, old, experts, 0, shape.num_ranks, shape.slots_per_rank(), stop, target,
                  budget, shape.num_logical, target_cnt, phy2log, &cap))
    return false;
  Shape one = shape;
  one.num_layers = 1;
  PreserveSlots(phy2log, old, one);
  RunWalkBack(load, old, shape, 0, shape.num_ranks, stop, cap, nullptr, phy2log);
  return true;
}

}  // namespace

void MinMoveLayer(const double* load, const int64_t* old_phy2log, double old_max,
                  const int64_t* balanced_phy2log, const Shape& shape, double target,
                  int64_t* phy2log) {
  const int64_t P = shape.num_physical, E = shape.num_logical, S = shape.slots_per_rank();
  const double stop = MaxRankLoad(load, balanced_phy2log, shape) / target;
  const bool hier = shape.hierarchical();
  const std::vector<int64_t> node_of =
      hier ? OldGroupNodes(old_phy2log, shape) : std::vector<int64_t>{};
  const bool old_usable = !hier || !node_of.empty();
  std::copy(old_phy2log, old_phy2log + P, phy2log);
  if (old_usable && old_max <= stop) return;

  // The layer's scratch, the thread's (reused across layers): count [E] is zero between calls
  // (RankMoves clears what it sets).
  thread_local struct {
    std::vector<int64_t> renumbered, count, searched, substituted, trial;
    std::vector<std::vector<int64_t>> substituted_experts;
    std::vector<char> allowed;  // [E] all zero between calls
  } tls;
  // balanced's placement renumbered onto the old: the fallback's start (and, hierarchical, the
  // node searches' budget).
  std::vector<int64_t>& renumbered = tls.renumbered;
  renumbered.resize(Z(P));
  std::vector<int64_t>& count = tls.count;
  if (count.size() < Z(E)) count.resize(Z(E), 0);
  Shape one = shape;
  one.num_layers = 1;
  if (!hier) {
    // The search first, within balanced's own changed slots; when it reaches the stop, walked
    // back, done. (Two slots per rank: no search. balanced's pairing is exact, search.h
    // RefinePairCounts, and a local search from the old placement almost never comes within 1%
    // of it: 1 of 183 layers of Kimi-K2 on the benchmark's trace.)
    std::vector<int64_t> experts(Z(E));
    std::iota(experts.begin(), experts.end(), 0);
    if (S > 2) {
      const int64_t own = RankMoves(old_phy2log, balanced_phy2log, 0, P, S, &count);
      if (SearchAll(load, old_phy2log, shape, experts, stop, target, own, nullptr, phy2log)) return;
    }
    // The fallback: balanced's placement renumbered onto the old one and walked back toward it;
    // or, when it reaches the stop with fewer changed slots, a second search that first takes
    // balanced's replica counts.
    Renumber(balanced_phy2log, old_phy2log, shape, renumbered.data());
    PreserveSlots(renumbered.data(), old_phy2log, one);
    RunWalkBack(load, old_phy2log, shape, 0, shape.num_ranks, stop, ReplicaCap(load, E, P, target),
                nullptr, renumbered.data());
    if (S > 2) {
      int64_t budget = 0;
      for (int64_t p = 0; p < P; ++p) budget += renumbered[Z(p)] != old_phy2log[p];
      std::vector<int64_t> balanced_cnt(Z(E), 0);
      for (int64_t p = 0; p < P; ++p) ++balanced_cnt[Z(balanced_phy2log[p])];
      if (SearchAll(load, old_phy2log, shape, experts, stop, target, budget, balanced_cnt.data(),
                    phy2log))
        return;
    }
    std::copy(renumbered.begin(), renumbered.end(), phy2log);
    return;
  }
  Renumber(balanced_phy2log, old_phy2log, shape, renumbered.data());
  if (!old_usable) {
    std::copy(renumbered.begin(), renumbered.end(), phy2log);
    PreserveSlots(phy2log, old_phy2log, one);
    return;
  }
  const int64_t N = shape.num_nodes, G = shape.num_groups, group_size = E / G;
  const int64_t rpn = shape.num_ranks / N, node_slots = rpn * S;
  // Every node searched from its old content, kept for the partitions tried below.
  std::vector<int64_t>& searched = tls.searched;
  searched.resize(Z(P));
  std::vector<char> node_ok(Z(N), 0);
  bool reached = true;
  for (int64_t n = 0; n < N; ++n) {
    const std::vector<int64_t> experts = NodeExperts(node_of, n, group_size);
    // A node whose mean rank load is above the stop cannot get there: no search (most failing
    // nodes on the benchmark's DeepSeek-V3 trace).
    double node_total = 0.0;
    for (const int64_t e : experts) node_total += load[e];
    if (node_total > stop * static_cast<double>(rpn)) {
      reached = false;
      continue;
    }
    const int64_t budget =
        RankMoves(old_phy2log, renumbered.data(), n * node_slots, (n + 1) * node_slots, S, &count);
    // No second try with imposed counts here: it reached the stop on 1-9 of 68-112 failing
    // nodes of the benchmark's DeepSeek-V3 trace; the group swaps below do better.
    node_ok[Z(n)] =
        SearchPack(load, old_phy2log, experts, n * node_slots, rpn, S, stop, target, budget, E,
                   nullptr, searched.data()) ||
        RebalanceNode(load, old_phy2log, shape, n, experts, stop, target, searched.data());
    reached &= node_ok[Z(n)] != 0;
  }
  if (reached) {
    std::copy(searched.begin(), searched.end(), phy2log);
    return;
  }

  // SubstituteNode's output for each node of the fallback that took it, with its experts (empty:
  // none) and whether it reached the stop: a group swap below that gives a node the same experts
  // takes it from there (balanced's partition is often the old one with one pair of groups
  // traded, the first swap tried).
  std::vector<int64_t>& substituted = tls.substituted;
  substituted.resize(Z(P));
  auto& substituted_experts = tls.substituted_experts;
  substituted_experts.resize(Z(N));
  for (auto& experts : substituted_experts) experts.clear();
  std::vector<char> substituted_ok(Z(N), 0);
  std::vector<char>& allowed = tls.allowed;
  if (allowed.size() < Z(E)) allowed.resize(Z(E), 0);
  // Fallback: balanced's group->node partition (renumbered onto the old nodes); a node whose
  // groups are the same as in the old placement keeps its searched content when that reached
  // the stop, every other node is balanced's walked back toward the old content.
  std::copy(renumbered.begin(), renumbered.end(), phy2log);
  PreserveSlots(phy2log, old_phy2log, one);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<char> in_new(Z(G), 0);
    for (int64_t p = n * node_slots; p < (n + 1) * node_slots; ++p)
      in_new[Z(renumbered[Z(p)] / group_size)] = 1;
    bool same = true;
    for (int64_t g = 0; g < G; ++g) same &= (in_new[Z(g)] != 0) == (node_of[Z(g)] == n);
    if (same && node_ok[Z(n)]) {
      std::copy(searched.begin() + n * node_slots, searched.begin() + (n + 1) * node_slots,
                phy2log + n * node_slots);
      continue;
    }
    std::vector<int64_t>& experts = substituted_experts[Z(n)];
    for (int64_t g = 0; g < G; ++g)
      if (in_new[Z(g)])
        for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {
          allowed[Z(e)] = 1;
          experts.push_back(e);
        }
    const double cap = ReplicaCap(load, experts, node_slots, target);
    RunWalkBack(load, old_phy2log, shape, n * rpn, rpn, stop, cap, allowed.data(), phy2log);
    for (const int64_t e : experts) allowed[Z(e)] = 0;
    const int64_t first = n * node_slots, last = first + node_slots;
    substituted_ok[Z(n)] =
        SubstituteNode(load, old_phy2log, shape, n, experts, stop, target, substituted.data());
    if (substituted_ok[Z(n)] && RankMoves(old_phy2log, substituted.data(), first, last, S, &count) <
                                    RankMoves(old_phy2log, phy2log, first, last, S, &count))
      std::copy(substituted.begin() + first, substituted.begin() + last, phy2log + first);
  }
  int64_t fallback_moves = 0;
  for (int64_t p = 0; p < P; ++p) fallback_moves += phy2log[p] != old_phy2log[p];

  // Usually one group trading nodes is enough (balanced's partition differs from the old one by
  // 2-4 groups): try the swaps of two groups on different nodes that leave the heaviest node
  // lightest, the two nodes by SubstituteNode, the others as searched; keep the one that reaches
  // the stop with the fewest changed slots, if fewer than the fallback's.
  const std::vector<double> group_load = detail::GroupLoads(load, shape);
  std::vector<double> node_load(Z(N), 0.0);
  for (int64_t g = 0; g < G; ++g) node_load[Z(node_of[Z(g)])] += group_load[Z(g)];
  const auto swaps = GroupSwaps(group_load, node_of, node_load);
  std::vector<int64_t>& trial = tls.trial;
  trial.resize(Z(P));
  for (size_t k = 0; k < std::min<size_t>(swaps.size(), kGroupSwapsTried); ++k) {
    const auto [worst, x, y] = swaps[k];
    if (worst / static_cast<double>(rpn) > stop) break;  // sorted: no later swap fits either
    std::vector<int64_t> group_node = node_of;
    std::swap(group_node[Z(x)], group_node[Z(y)]);
    bool ok = true;
    for (int64_t n = 0; n < N && ok; ++n) {
      const int64_t first = n * node_slots;
      if (n != node_of[Z(x)] && n != node_of[Z(y)]) {
        ok = node_ok[Z(n)] != 0;
        std::copy(searched.begin() + first, searched.begin() + first + node_slots,
                  trial.begin() + first);
        continue;
      }
      const std::vector<int64_t> experts = NodeExperts(group_node, n, group_size);
      if (experts == substituted_experts[Z(n)]) {
        ok = substituted_ok[Z(n)] != 0;
        std::copy(substituted.begin() + first, substituted.begin() + first + node_slots,
                  trial.begin() + first);
        continue;
      }
      ok = NewNode(load, old_phy2log, shape, n, experts, stop, target, trial.data());
    }
    if (!ok) continue;
    int64_t moves = 0;
    for (int64_t p = 0; p < P; ++p) moves += trial[Z(p)] != old_phy2log[p];
    if (moves < fallback_moves) {
      fallback_moves = moves;
      std::copy(trial.begin(), trial.end(), phy2log);
    }
  }
}

bool MinMoveFromBound(const double* load, const int64_t* old_phy2log, double old_max,
                      const Shape& shape, double target, double bound, int64_t* phy2log) {
  const int64_t P = shape.num_physical, E = shape.num_logical, S = shape.slots_per_rank();
  // Two slots per rank: no search (MinMoveLayer), balanced's placement is the start. Target 1:
  // the stop would be the bound itself, which few layers reach (measured on DeepSeek-V3: the
  // search failed on most layers and the policy took 1.4x the time).
  if (S <= 2 || target >= 1.0) return false;
  // (hierarchical: no lower than balanced's own floor, which knows its group->node partitions)
  const double stop =
      (shape.hierarchical() ? std::max(bound, BalancedFloor(load, shape)) : bound) / target;
  // The old placement within 1% of this stop: balanced's own max decides whether it needs any
  // change at all (it is kept, no slot changed, when it is <= balanced's max / target).
  if (old_max <= stop * 1.01) return false;
  if (!shape.hierarchical()) {
    std::vector<int64_t> experts(Z(E));
    std::iota(experts.begin(), experts.end(), 0);
    return SearchAll(load, old_phy2log, shape, experts, stop, target, P / 2, nullptr, phy2log);
  }
  const std::vector<int64_t> node_of = OldGroupNodes(old_phy2log, shape);
  if (node_of.empty()) return false;
  const int64_t N = shape.num_nodes, G = shape.num_groups, group_size = E / G;
  const int64_t rpn = shape.num_ranks / N, node_slots = rpn * S;
  // A node whose mean rank load is above the stop cannot get there: checked for every node
  // before any search.
  std::vector<double> node_total(Z(N), 0.0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e)
      node_total[Z(node_of[Z(g)])] += load[e];
  const double node_stop = stop * static_cast<double>(rpn);
  bool fits = true;
  for (int64_t n = 0; n < N; ++n) fits &= !(node_total[Z(n)] > node_stop);
  if (fits) {
    for (int64_t n = 0; n < N; ++n)
      if (!SearchPack(load, old_phy2log, NodeExperts(node_of, n, group_size), n * node_slots, rpn,
                      S, stop, target, node_slots / 2, E, nullptr, phy2log))
        return false;
    return true;
  }
  // A node above it: the old partition with one pair of groups trading nodes, when that brings
  // every node under it (the swaps that leave the heaviest node lightest first, as
  // MinMoveLayer's): the two nodes by SubstituteNode, the others searched as above. Of the swaps
  // tried that get there, the one that changes fewest slots (was: the first; on the benchmark's
  // DeepSeek-V3 hierarchical trace, 3 rebalances, --no-peers, changed slots a rebalance 1980 ->
  // 1954 / 2442 -> 2382 / 3325 -> 3270 / 2712 -> 2696 on lognormal 0.5 / 1.0 / 1.5 / Zipf, for
  // 15-20% more time, min_move / balanced at most 1.45 there).
  const auto swaps = GroupSwaps(detail::GroupLoads(load, shape), node_of, node_total);
  std::vector<char> searched(Z(N), 0);  // 0: not yet, 1: reached the stop, 2: did not
  std::vector<int64_t> out(Z(P)), trial(Z(P));
  int64_t fewest = -1;  // changed slots of the best swap so far (in phy2log), -1: none yet
  for (size_t k = 0; k < std::min<size_t>(swaps.size(), kGroupSwapsTried); ++k) {
    const auto [worst, x, y] = swaps[k];
    if (worst > node_stop) break;  // sorted: no later swap brings every node under it either
    std::vector<int64_t> group_node = node_of;
    std::swap(group_node[Z(x)], group_node[Z(y)]);
    const int64_t nx = node_of[Z(x)], ny = node_of[Z(y)];
    bool ok = true;
    for (int64_t n = 0; n < N && ok; ++n) {
      if (n == nx || n == ny) continue;
      if (searched[Z(n)] == 0)
        searched[Z(n)] =
            SearchPack(load, old_phy2log, NodeExperts(node_of, n, group_size), n * node_slots, rpn,
                       S, stop, target, node_slots / 2, E, nullptr, out.data())
                ? 1
                : 2;
      ok = searched[Z(n)] == 1;
    }
    for (const int64_t n : {nx, ny}) {
      if (!ok) break;
      ok = SubstituteNode(load, old_phy2log, shape, n, NodeExperts(group_node, n, group_size), stop,
                          target, trial.data());
    }
    if (!ok) continue;
    for (int64_t n = 0; n < N; ++n)
      if (n != nx && n != ny)
        std::copy(out.begin() + n * node_slots, out.begin() + (n + 1) * node_slots,
                  trial.begin() + n * node_slots);
    int64_t moves = 0;
    for (int64_t p = 0; p < P; ++p) moves += trial[Z(p)] != old_phy2log[p];
    if (fewest < 0 || moves < fewest) {
      fewest = moves;
      std::copy(trial.begin(), trial.end(), phy2log);
    }
  }
  return fewest >= 0;
}

}  // namespace eplb
