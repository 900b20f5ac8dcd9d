// Plan(): validation, per-layer dispatch to the policies, and what every policy shares
// (log2phy, rank loads, slot preservation).
#include "planner/placement.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <thread>

#include "planner/packing.h"
#include "planner/policies.h"

namespace eplb {
namespace {

[[noreturn]] void Fail(const std::string& msg) { throw std::invalid_argument(msg); }

// Messages are built without iostreams: on the GPU host's toolchain (gcc 13) formatting a number
// through std::ostream crashed inside the extension (basic_ostream::_M_insert<long>).
std::string Num(int64_t v) { return std::to_string(v); }
std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

void ValidateShape(const Shape& s) {
  std::string m;
  if (s.num_layers < 1)
    m = "num_layers must be >= 1, got " + Num(s.num_layers);
  else if (s.num_logical < 1)
    m = "num_logical must be >= 1, got " + Num(s.num_logical);
  else if (s.num_ranks < 1)
    m = "num_ranks must be >= 1, got " + Num(s.num_ranks);
  else if (s.num_nodes < 1)
    m = "num_nodes must be >= 1, got " + Num(s.num_nodes);
  else if (s.num_groups < 1)
    m = "num_groups must be >= 1, got " + Num(s.num_groups);
  else if (s.num_physical < s.num_logical)
    m = "num_replicas must be >= the number of logical experts (" + Num(s.num_logical) + "), got " +
        Num(s.num_physical);
  else if (s.num_physical % s.num_ranks != 0)
    m = "num_replicas (" + Num(s.num_physical) + ") must be divisible by num_ranks (" +
        Num(s.num_ranks) + ")";
  else if (s.num_ranks % s.num_nodes != 0)
    m = "num_ranks (" + Num(s.num_ranks) + ") must be divisible by num_nodes (" + Num(s.num_nodes) +
        ")";
  else if (s.hierarchical() && s.num_logical % s.num_groups != 0)
    m = "the number of logical experts (" + Num(s.num_logical) +
        ") must be divisible by num_groups (" + Num(s.num_groups) +
        ") for the hierarchical policy (num_groups % num_nodes == 0)";
  if (!m.empty()) Fail(m);
}

// totals: [L] out, each layer's detail::Sum.
void ValidateLoad(const double* load, const Shape& s, std::vector<double>* totals) {
  const int64_t n = s.num_layers * s.num_logical;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(load[i]) || load[i] < 0) {
      Fail("load must be finite and >= 0, got " + Num(load[i]) + " at [" + Num(i / s.num_logical) +
           ", " + Num(i % s.num_logical) + "]");
    }
  }
  // Rank loads and totals are sums of a layer's loads: a layer whose sum nears the largest
  // double would report inf (balancedness 0 or NaN). A quarter of it leaves room for any
  // summation order (a partial sum of terms >= 0 rounds to at most a few ulps above the total).
  constexpr double kMaxLayerSum = std::numeric_limits<double>::max() / 4;
  totals->resize(static_cast<size_t>(s.num_layers));
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const double sum = detail::Sum(load + l * s.num_logical, s.num_logical);
    (*totals)[static_cast<size_t>(l)] = sum;
    if (!(sum <= kMaxLayerSum))
      Fail("load: layer " + Num(l) + " sums to " + Num(sum) + ", more than " + Num(kMaxLayerSum) +
           " (rank loads would overflow)");
  }
}

// Runs fn(layer) for every layer on up to `threads` threads. Exceptions are rethrown here.
template <typename Fn>
void ForEachLayer(int64_t num_layers, int threads, Fn fn) {
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(threads, num_layers));
  if (n_threads == 1) {
    for (int64_t l = 0; l < num_layers; ++l) fn(l);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n_threads));
  for (int64_t t = 0; t < n_threads; ++t) {
    pool.emplace_back([&, t] {
      try {
        for (int64_t l = t; l < num_layers; l += n_threads) fn(l);
      } catch (...) {
        errors[static_cast<size_t>(t)] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// MaxRankLoad given the replica counts cnt [E] of phy2log [P] and multi [num_multi], the experts
// with cnt >= 2 (each once). per: [E] scratch. Loads per replica once per expert, dividing only
// for the experts with several replicas (load / 1 is load; divisions are slow), then the same sums
// in the same order as dividing per slot.
double MaxRankLoadCounted(const double* load, const int64_t* phy2log, const int64_t* cnt,
                          const int64_t* multi, int64_t num_multi, const Shape& s, double* per) {
  const int64_t S = s.slots_per_rank();
  std::copy(load, load + s.num_logical, per);
  for (int64_t k = 0; k < num_multi; ++k)
    per[multi[k]] = load[multi[k]] / static_cast<double>(cnt[multi[k]]);
  double best = 0.0;
  for (int64_t r = 0; r < s.num_ranks; ++r) {
    double sum = 0.0;
    for (int64_t p = r * S; p < (r + 1) * S; ++p) sum += per[phy2log[p]];
    best = std::max(best, sum);
  }
  return best;
}

}  // namespace

void ValidatePhy2Log(const int64_t* phy2log, const Shape& s, const std::string& name) {
  std::vector<int64_t> seen(static_cast<size_t>(s.num_logical));
  for (int64_t l = 0; l < s.num_layers; ++l) {
    std::fill(seen.begin(), seen.end(), 0);
    const int64_t* row = phy2log + l * s.num_physical;
    for (int64_t p = 0; p < s.num_physical; ++p) {
      if (row[p] < 0 || row[p] >= s.num_logical) {
        Fail(name + " must hold logical expert ids in [0, " + Num(s.num_logical) + "), got " +
             Num(row[p]) + " at [" + Num(l) + ", " + Num(p) + "]");
      }
      ++seen[static_cast<size_t>(row[p])];
    }
    for (int64_t e = 0; e < s.num_logical; ++e) {
      if (seen[static_cast<size_t>(e)] == 0) {
        Fail(name + " must give every logical expert at least one slot; layer " + Num(l) +
             " has none for expert " + Num(e));
      }
    }
  }
}

void BuildLog2Phy(const int64_t* phy2log, const Shape& s, std::vector<int64_t>* log2phy,
                  std::vector<int64_t>* logcnt, int64_t* max_replicas) {
  const int64_t L = s.num_layers, E = s.num_logical, P = s.num_physical;
  logcnt->assign(static_cast<size_t>(L * E), 0);
  for (int64_t l = 0; l < L; ++l) {
    int64_t* cnt = logcnt->data() + l * E;
    for (int64_t p = 0; p < P; ++p) ++cnt[phy2log[l * P + p]];
  }
  int64_t m = 1;
  for (int64_t c : *logcnt) m = std::max(m, c);
  *max_replicas = m;
  log2phy->assign(static_cast<size_t>(L * E * m), -1);
  std::vector<int64_t> fill(static_cast<size_t>(E));
  for (int64_t l = 0; l < L; ++l) {
    std::fill(fill.begin(), fill.end(), 0);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t e = phy2log[l * P + p];
      (*log2phy)[static_cast<size_t>((l * E + e) * m + fill[static_cast<size_t>(e)]++)] = p;
    }
  }
}

double MaxRankLoad(const double* load, const int64_t* phy2log, const Shape& s) {
  const int64_t E = s.num_logical, P = s.num_physical;
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    std::vector<int64_t> cnt;
    std::vector<int64_t> multi;
    std::vector<double> per;
  } tls;
  tls.cnt.assign(static_cast<size_t>(E), 0);
  tls.multi.resize(static_cast<size_t>(E) + 1);  // + 1: the branch-free loop writes one past
  tls.per.resize(static_cast<size_t>(E));
  int64_t* cnt = tls.cnt.data();
  int64_t* multi = tls.multi.data();
  int64_t num_multi = 0;
  for (int64_t p = 0; p < P; ++p) {  // branch-free: which experts repeat is data
    multi[num_multi] = phy2log[p];
    num_multi += ++cnt[phy2log[p]] == 2;
  }
  return MaxRankLoadCounted(load, phy2log, cnt, multi, num_multi, s, tls.per.data());
}

void PreserveSlots(int64_t* phy2log, const int64_t* old_phy2log, const Shape& s) {
  const int64_t S = s.slots_per_rank(), E = s.num_logical;
  // Up to this many slots per rank the O(S^2) direct match beats the counters.
  constexpr int64_t kFewSlots = 4;
  // With ids known to lie in [0, E): per-expert counters instead of a search per old slot
  // (O(S) per rank, not O(S^2)), the same result. need[v]: copies of v on the rank not kept
  // yet. It is all zero between ranks (each rank takes back what it added), so a layer does
  // not clear E entries; need[E] stays 0 and stands for any id outside [0, E), never kept.
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    std::vector<int64_t> pending, rest;
    std::vector<char> fixed;
    std::vector<int32_t> need;
  } tls;
  auto& pending = tls.pending;
  auto& fixed = tls.fixed;
  fixed.resize(static_cast<size_t>(S));
  tls.rest.resize(static_cast<size_t>(S) + 1);
  int64_t* rest = tls.rest.data() + 1;  // (rest[-1]: the backward fill's write past the front)
  if (E > 0 && tls.need.size() < static_cast<size_t>(E) + 1)
    tls.need.resize(static_cast<size_t>(E) + 1, 0);
  int32_t* need = tls.need.data();
  char* keep_slot = fixed.data();
  for (int64_t l = 0; l < s.num_layers; ++l) {
    for (int64_t r = 0; r < s.num_ranks; ++r) {
      int64_t* row = phy2log + l * s.num_physical + r * S;
      const int64_t* old_row = old_phy2log + l * s.num_physical + r * S;
      bool in_range = E > 0;
      for (int64_t j = 0; j < S; ++j)
        in_range &= static_cast<uint64_t>(row[j]) < static_cast<uint64_t>(E);
      if (in_range && S <= kFewSlots) {
        // Few slots: each old slot is matched against the new ones directly (bit i of `left`:
        // new slot i not kept yet; the lowest set bit of a match is the first copy in the new
        // order), with no per-expert counters to set and clear.
        int64_t wanted[kFewSlots + 1];
        for (int64_t j = 0; j < S; ++j) wanted[j] = row[j];  // (std::copy calls memmove)
        uint32_t left = (uint32_t{1} << S) - 1, kept = 0;
        for (int64_t j = 0; j < S; ++j) {
          uint32_t match = 0;
          for (int64_t i = 0; i < S; ++i)
            match |= static_cast<uint32_t>(wanted[i] == old_row[j]) << i;
          match &= left;
          left ^= match & (0u - match);
          kept |= static_cast<uint32_t>(match != 0) << j;
        }
        // Branch-free: the other slots take the new ones not kept, in order (bit S: none left
        // for a kept slot, whose read of wanted[S] is not used).
        for (int64_t j = 0; j < S; ++j) {
          const bool keep = (kept >> j) & 1u;
          const int64_t next = wanted[__builtin_ctz(left | (uint32_t{1} << S))];
          row[j] = keep ? old_row[j] : next;
          left &= left - static_cast<uint32_t>(!keep);
        }
        continue;
      }
      if (in_range) {
        // Branch-free: which slots keep their expert is data. The row is read in full before
        // the last pass writes it.
        for (int64_t j = 0; j < S; ++j) ++need[row[j]];
        int64_t num_kept = 0;
        for (int64_t j = 0; j < S; ++j) {
          const int64_t v = old_row[j];
          const int64_t k = static_cast<uint64_t>(v) < static_cast<uint64_t>(E) ? v : E;
          const bool keep = need[k] > 0;
          need[k] -= keep;
          keep_slot[j] = keep;
          num_kept += keep;
        }
        // The new experts left for the other slots, in the new order. A kept slot takes the
        // first copies of its expert in the new order (as the search does), so the ones left
        // are the last need[v] copies of each v: walking the row backwards takes them, filling
        // rest from its back, and brings need back to zero.
        int64_t free_end = S - num_kept;
        for (int64_t j = S - 1; j >= 0; --j) {
          const int64_t v = row[j];
          const bool left = need[v] > 0;
          need[v] -= left;
          rest[free_end - 1] = v;  // (overwritten by the next one taken when not taken)
          free_end -= left;
        }
        if (num_kept == 0) continue;  // the row as it is
        int64_t next = 0;
        for (int64_t j = 0; j < S; ++j) {
          const bool keep = keep_slot[j];
          row[j] = keep ? old_row[j] : rest[next];
          next += !keep;
        }
        continue;
      }
      // Multiset of the new experts of this rank; each old slot whose expert is still wanted
      // keeps it, the rest are filled with what is left, in the new order.
      pending.assign(row, row + S);
      std::fill(fixed.begin(), fixed.end(), 0);
      for (int64_t j = 0; j < S; ++j) {
        auto it = std::find(pending.begin(), pending.end(), old_row[j]);
        if (it != pending.end()) {
          *it = -1;
          fixed[static_cast<size_t>(j)] = 1;
        }
      }
      size_t next = 0;
      for (int64_t j = 0; j < S; ++j) {
        if (fixed[static_cast<size_t>(j)]) {
          row[j] = old_row[j];
          continue;
        }
        while (pending[next] < 0) ++next;
        row[j] = pending[next++];
      }
    }
  }
}

namespace {

// PlanOptions::distinct_ranks on one layer's placement `dst` [P] as the policy left it (see
// distinct.cpp): repeats removed, then
//   - balanced: never worse than `deepseek` with the option (DeepSeek's placement with its
//     repeats repaired), as `balanced` is never worse than `deepseek` without it;
//   - min_move: min_move_target x the balancedness of `balanced` with the option, as without it
//     (checked only where the layer is above LowerBound / target, `bound`: then against
//     `balanced`'s placement, searched towards it, or, failing that, replaced by it).
// balanced: BalancedLayer's placement of this layer where already planned, else nullptr; old,
// old_max: the old placement and its max rank load (min_move's start; nullptr without one).
void DistinctPlan(const double* w, const Shape& one, const PlanOptions& options, double bound,
                  const int64_t* balanced, const int64_t* old, double old_max, int64_t* dst) {
  RefineLayer(w, one, dst);  // (the repeats it can move without raising the max: free)
  DistinctLayer(w, one,
                options.policy == Policy::kBalanced  ? kDistinctFull
                : options.policy == Policy::kMinMove ? kDistinctToPolicyMax
                                                     : kDistinctRepairOnly,
                dst);
  const auto P = static_cast<size_t>(one.num_physical);
  if (options.policy == Policy::kBalanced) {
    // (on every layer: the constrained search from balanced's own placement can end above
    // DeepSeek's even where DeepSeek's repeats nothing, review)
    thread_local std::vector<int64_t> alt;
    alt.resize(P);
    DeepSeekLayer(w, one, alt.data(), nullptr);
    RefineLayer(w, one, alt.data());
    DistinctLayer(w, one, kDistinctRepairOnly, alt.data());
    if (MaxRankLoad(w, alt.data(), one) < MaxRankLoad(w, dst, one))
      std::copy(alt.begin(), alt.end(), dst);
  }
  if (options.policy == Policy::kMinMove) {
    const double target = options.min_move_target;
    if (!(MaxRankLoad(w, dst, one) * target > bound * (1.0 + 1e-12))) return;
    std::vector<int64_t> bal(P);
    PlanOptions b = options;
    b.policy = Policy::kBalanced;
    if (balanced != nullptr)  // (min_move planned it already)
      std::copy(balanced, balanced + P, bal.begin());
    else
      BalancedLayer(w, one, bal.data());
    DistinctPlan(w, one, b, bound, nullptr, old, old_max, bal.data());
    const double stop = MaxRankLoad(w, bal.data(), one) / target;
    if (!(MaxRankLoad(w, dst, one) > stop * (1.0 + 1e-12))) return;
    DistinctDescend(w, one, stop, dst);
    if (!(MaxRankLoad(w, dst, one) > stop * (1.0 + 1e-12))) return;
    // still above: min_move's own walk from the old placement towards balanced's (with the
    // option), repaired and searched again; balanced's placement itself only if that fails
    // (review: copying it at once changed 245-281 of 288 slots on 12 of 174 layer-plans of
    // the benchmark's DeepSeek-V3 hierarchical Zipf trace; with the walk first, 4 of 174)
    std::vector<int64_t> walk(P);
    MinMoveLayer(w, old, old_max, bal.data(), one, target, walk.data());
    DistinctLayer(w, one, kDistinctRepairOnly, walk.data());
    DistinctDescend(w, one, stop, walk.data());
    if (!(MaxRankLoad(w, walk.data(), one) > stop * (1.0 + 1e-12)))
      std::copy(walk.begin(), walk.end(), dst);
    else
      std::copy(bal.begin(), bal.end(), dst);
  }
}

// `balanced` without PlanOptions::distinct_ranks, on a layer whose placement `dst` [P] holds
// an expert twice on a rank: the placement with the option (DistinctPlan) is taken instead when
// its max rank load is within kDistinctSlack of dst's and not above DeepSeek's placement's
// (what vLLM's policy gives, so `balanced` stays never worse than it on a layer). A hot expert
// twice on one rank swings that rank twice with it in the windows after: on the benchmark's
// traces (3 rebalances each, one-off) the out-of-sample balancedness rose where repeats were
// (Qwen3-235B Zipf 0.5612 -> 0.5777, DeepSeek-V3 hierarchical lognormal 1.5 0.6882 -> 0.6922)
// and fell nowhere, in sample within 0.0001; the layer-plans that repeat fell from 498 of 3,252
// to 8 (194 of the 490 changed ones at a higher max, by at most 0.098%). `one` must admit a
// distinct placement (every pack >= S experts).
constexpr double kDistinctSlack = 1e-3;
void PreferDistinct(const double* w, const Shape& one, const PlanOptions& options, int64_t* dst) {
  const auto P = static_cast<size_t>(one.num_physical);
  thread_local std::vector<int64_t> alt, ds;
  alt.assign(dst, dst + P);
  ds.resize(P);
  PlanOptions d = options;
  d.policy = Policy::kBalanced;  // (min_move's reference comes here too)
  d.distinct_ranks = true;
  DistinctPlan(w, one, d, -1.0, nullptr, nullptr, 0.0, alt.data());
  DeepSeekLayer(w, one, ds.data(), nullptr);
  const double m = MaxRankLoad(w, alt.data(), one);
  if (m <= MaxRankLoad(w, dst, one) * (1.0 + kDistinctSlack) && m <= MaxRankLoad(w, ds.data(), one))
    std::copy(alt.begin(), alt.end(), dst);
}

// `balanced`'s placement of one layer as the policy returns it (before the old placement and
// preserve_slots are considered): also min_move's reference, whose balancedness it must reach.
void BalancedPlan(const double* w, const Shape& one, const PlanOptions& options, bool prefer,
                  int64_t* dst) {
  BalancedLayer(w, one, dst);
  if (one.deepseek_grouped() && !one.hierarchical() && one.num_logical % one.num_groups == 0) {
    // One node with several groups: `deepseek` takes DeepSeek's grouped path there (expert
    // order by group load), `balanced` the global one, which can end above it on a layer
    // (tied loads; found by a sanitizer fuzz). DeepSeek's placement refined instead where it
    // is lower (refining never raises the max).
    thread_local std::vector<int64_t> grouped_tls;
    auto& grouped = grouped_tls;
    grouped.resize(static_cast<size_t>(one.num_physical));
    DeepSeekLayer(w, one, grouped.data(), nullptr);
    if (MaxRankLoad(w, grouped.data(), one) < MaxRankLoad(w, dst, one)) {
      RefineLayer(w, one, grouped.data());
      std::copy(grouped.begin(), grouped.end(), dst);
    }
  }
  if (prefer && HasRepeatOnRank(dst, one)) PreferDistinct(w, one, options, dst);
}

}  // namespace

void ValidatePlan(const double* load, const int64_t* old_phy2log, const Shape& shape,
                  const PlanOptions& options, std::vector<double>* totals) {
  ValidateShape(shape);
  if (load == nullptr) Fail("load must not be null");
  ValidateLoad(load, shape, totals);
  if (old_phy2log != nullptr) ValidatePhy2Log(old_phy2log, shape, "old_phy2log");
  if (options.policy == Policy::kMinMove && old_phy2log == nullptr)
    Fail("policy 'min_move' needs old_phy2log (the current placement)");
  if (options.policy == Policy::kDeepSeek && shape.deepseek_grouped() &&
      shape.num_logical % shape.num_groups != 0)  // (with several nodes ValidateShape said so)
    Fail("the number of logical experts (" + std::to_string(shape.num_logical) +
         ") must be divisible by num_groups (" + std::to_string(shape.num_groups) +
         ") for DeepSeek's grouped policy (num_groups % num_nodes == 0, one node included)");
  if (options.distinct_ranks) {
    const int64_t packs = shape.num_packs();  // (the packs DistinctLayer works in)
    if (shape.num_logical / packs < shape.slots_per_rank())
      Fail("distinct_ranks needs at least as many logical experts" +
           std::string(packs > 1 ? " per node (" : " (") +
           std::to_string(shape.num_logical / packs) + ") as slots per rank (" +
           std::to_string(shape.slots_per_rank()) +
           "): otherwise some rank must hold an expert twice");
  }
  if (options.threads < 1) Fail("threads must be >= 1, got " + std::to_string(options.threads));
  if (!(options.min_move_target > 0.0 && options.min_move_target <= 1.0))
    Fail("min_move_target must be in (0, 1], got " + std::to_string(options.min_move_target));
  // Every expert has a replica, so none has more than P - E + 1: that width always fits.
  if (options.log2phy_width != 0 &&
      (options.log2phy_width < 1 ||
       options.log2phy_width > shape.num_physical - shape.num_logical + 1))
    Fail("log2phy_width must be 0 or in [1, num_replicas - num_experts + 1 = " +
         std::to_string(shape.num_physical - shape.num_logical + 1) + "], got " +
         std::to_string(options.log2phy_width));
}

PlanResult Plan(const double* load, const int64_t* old_phy2log, const Shape& shape,
                const PlanOptions& options) {
  std::vector<double> totals;  // [L]
  ValidatePlan(load, old_phy2log, shape, options, &totals);

  const int64_t L = shape.num_layers, E = shape.num_logical, P = shape.num_physical;
  PlanResult out;
  out.shape = shape;
  out.phy2log.assign(static_cast<size_t>(L * P), -1);
  // DeepSeek orders log2phy columns by replica ordinal, the others by slot; the ordinals are
  // computed only where they are used.
  const bool by_ordinal =
      options.policy == Policy::kDeepSeek && old_phy2log == nullptr && !options.distinct_ranks;
  std::vector<int64_t> phyrank(by_ordinal ? static_cast<size_t>(L * P) : 0);
  out.mean_load.assign(static_cast<size_t>(L), 0.0);
  out.max_load_before.assign(static_cast<size_t>(L), std::numeric_limits<double>::quiet_NaN());
  out.max_load_after.assign(static_cast<size_t>(L), 0.0);
  out.lower_bound.assign(static_cast<size_t>(L), 0.0);
  out.moved_slots.assign(static_cast<size_t>(L), 0);
  // logcnt is counted per layer right after the layer is planned (its phy2log still in cache):
  // the counts also give the rank loads and the global DeepSeek bound. A layer holding an id
  // outside [0, E) is marked and skipped; ValidatePhy2Log reports it below.
  out.logcnt.assign(static_cast<size_t>(L * E), 0);
  std::vector<char> out_of_range(static_cast<size_t>(L), 0);

  Shape one = shape;
  one.num_layers = 1;
  // balanced's preference for no repeats (PreferDistinct), where a distinct placement exists
  // (DistinctLayer's precondition, checked above where the option asks for it)
  const bool prefer = options.prefer_distinct && !options.distinct_ranks &&
                      shape.num_logical / shape.num_packs() >= shape.slots_per_rank();
  const bool admissible_old = shape.num_nodes == 1 || !shape.hierarchical();
  // On one thread, DeepSeek's placements first, a few layers per call: each node's greedy
  // packing is one chain of dependent steps, and DeepSeekLayers interleaves the chains of all
  // nodes of its layers. About four chains at once (global: four layers; measured on
  // DeepSeek-V3, 2 and 3 layers gain less, 8 hierarchical chains no more than 4). On several
  // threads each layer's placement is made in the per-layer pass below (a pass of its own
  // started a second pool of threads and left fewer batches than threads on few layers).
  const bool batched = options.policy == Policy::kDeepSeek && (options.threads <= 1 || L == 1);
  if (batched) {
    const int64_t nodes = shape.deepseek_grouped() ? shape.num_nodes : 1;
    const int64_t batch = std::max<int64_t>(1, 4 / nodes);
    for (int64_t first = 0; first < L; first += batch) {
      DeepSeekLayers(load + first * E, one, std::min(batch, L - first),
                     out.phy2log.data() + first * P,
                     by_ordinal ? phyrank.data() + first * P : nullptr);
    }
  }
  ForEachLayer(L, options.threads, [&](int64_t l) {
    const double* w = load + l * E;
    int64_t* dst = out.phy2log.data() + l * P;
    const int64_t* old = old_phy2log ? old_phy2log + l * P : nullptr;
    thread_local struct {  // one per function: each thread_local costs a TLS lookup
      std::vector<int64_t> multi;
      std::vector<double> per;
      std::vector<int64_t> balanced;
    } tls;
    double bound = -1.0;                // the layer's LowerBound once computed
    const int64_t* balanced = nullptr;  // BalancedLayer's placement where min_move made it
    // the old placement's max rank load: reported, and min_move's first test
    const double before = old != nullptr ? MaxRankLoad(w, old, one) : 0.0;
    switch (options.policy) {
      case Policy::kDeepSeek:  // (batched: planned above)
        if (!batched) DeepSeekLayers(w, one, 1, dst, by_ordinal ? phyrank.data() + l * P : nullptr);
        break;
      case Policy::kBalanced:
        BalancedPlan(w, one, options, prefer, dst);
        break;
      case Policy::kMinMove: {
        bound = LowerBound(w, one, nullptr);
        if (MinMoveFromBound(w, old, before, one, options.min_move_target, bound, dst)) break;
        tls.balanced.resize(static_cast<size_t>(P));
        BalancedPlan(w, one, options, prefer, tls.balanced.data());
        MinMoveLayer(w, old, before, tls.balanced.data(), one, options.min_move_target, dst);
        balanced = tls.balanced.data();
        break;
      }
    }
    if (options.distinct_ranks) DistinctPlan(w, one, options, bound, balanced, old, before, dst);
    // balanced and min_move never hand back a placement that serves this window worse than
    // the current one: moving weights to lose balance is pure cost. (Across several nodes the
    // old placement may break the hierarchy the plan must keep, so there it is not a candidate;
    // nor is one that repeats an expert on a rank when distinct_ranks forbids it.)
    if (old != nullptr && options.policy != Policy::kDeepSeek && admissible_old &&
        MaxRankLoad(w, dst, one) > before &&
        !(options.distinct_ranks && HasRepeatOnRank(old, one))) {
      std::copy(old, old + P, dst);
    }
    if (old != nullptr && options.preserve_slots) PreserveSlots(dst, old, one);
    out.mean_load[static_cast<size_t>(l)] =
        totals[static_cast<size_t>(l)] / static_cast<double>(shape.num_ranks);
    // Replica counts (PreserveSlots only permutes slots inside ranks), and the experts with
    // several replicas, for the loads per replica.
    int64_t* cnt = out.logcnt.data() + l * E;
    tls.multi.resize(static_cast<size_t>(E) + 1);  // + 1: the branch-free loop writes one past
    tls.per.resize(static_cast<size_t>(E));
    int64_t* multi = tls.multi.data();
    int64_t num_multi = 0;
    for (int64_t p = 0; p < P; ++p) {
      if (static_cast<uint64_t>(dst[p]) >= static_cast<uint64_t>(E)) {
        out_of_range[static_cast<size_t>(l)] = 1;
        return;
      }
      multi[num_multi] = dst[p];  // branch-free: which experts repeat is data
      num_multi += ++cnt[dst[p]] == 2;
    }
    out.max_load_after[static_cast<size_t>(l)] =
        MaxRankLoadCounted(w, dst, cnt, multi, num_multi, one, tls.per.data());
    // Global DeepSeek replicated exactly as the bound's greedy does: its counts save the bound
    // a second replication.
    const bool global_deepseek = options.policy == Policy::kDeepSeek && !shape.deepseek_grouped();
    // No higher than this plan's max: the bound's sums round differently from the rank loads'
    // (one ulp above on ~2% of random layers, review), and a floor above a placement that
    // exists is no floor.
    out.lower_bound[static_cast<size_t>(l)] =
        std::min(bound >= 0.0 ? bound : LowerBound(w, one, global_deepseek ? cnt : nullptr),
                 out.max_load_after[static_cast<size_t>(l)]);
    if (old != nullptr) {
      out.max_load_before[static_cast<size_t>(l)] = before;
      int64_t moved = 0;
      for (int64_t p = 0; p < P; ++p) moved += dst[p] != old[p];
      out.moved_slots[static_cast<size_t>(l)] = moved;
    }
  });
  // Check what ValidatePhy2Log checks: a policy bug must never reach a rank as a placement (on
  // failure ValidatePhy2Log throws its message).
  bool valid = std::find(out_of_range.begin(), out_of_range.end(), 1) == out_of_range.end();
  int64_t m = 1;
  for (int64_t c : out.logcnt) {
    valid &= c >= 1;
    m = std::max(m, c);
  }
  if (!valid) ValidatePhy2Log(out.phy2log.data(), shape, "phy2log (planner output)");
  if (options.log2phy_width != 0) {
    if (options.log2phy_width < m)
      Fail("log2phy_width (" + std::to_string(options.log2phy_width) +
           ") is below the plan's largest replica count " + std::to_string(m));
    m = options.log2phy_width;
  }
  out.max_replicas = m;
  // Layer by layer, -1 everywhere then the slots: each layer's block is written once (reserve
  // does not write; resize + fill would write this largest output twice) and is still in cache
  // when its slots are scattered into it (after one fill of the whole output they were not).
  out.log2phy.reserve(static_cast<size_t>(L * E * m));
  std::vector<int64_t> fill(by_ordinal ? 0 : static_cast<size_t>(E));
  for (int64_t l = 0; l < L; ++l) {
    out.log2phy.insert(out.log2phy.end(), static_cast<size_t>(E * m), -1);
    int64_t* dst = out.log2phy.data() + l * E * m;
    const int64_t* row = out.phy2log.data() + l * P;
    if (by_ordinal) {
      const int64_t* rank = phyrank.data() + l * P;
      for (int64_t p = 0; p < P; ++p) dst[row[p] * m + rank[p]] = p;
    } else {
      std::fill(fill.begin(), fill.end(), 0);
      for (int64_t p = 0; p < P; ++p) dst[row[p] * m + fill[static_cast<size_t>(row[p])]++] = p;
    }
  }
  if (old_phy2log != nullptr && options.transfers) {
    // One transfer per changed slot: the list is sized once (growing it layer by layer copied
    // it again and again, and faulted its new pages in each time) and each layer writes its own
    // range (moved_slots counts it), so the layers run on the threads as the plans do.
    std::vector<int64_t> offset(static_cast<size_t>(L) + 1, 0);
    for (int64_t l = 0; l < L; ++l)
      offset[static_cast<size_t>(l) + 1] =
          offset[static_cast<size_t>(l)] + out.moved_slots[static_cast<size_t>(l)];
    out.transfers.resize(static_cast<size_t>(offset.back()));
    ForEachLayer(L, options.threads, [&](int64_t l) {
      PlanTransfers(l, old_phy2log + l * P, out.phy2log.data() + l * P, one,
                    out.transfers.data() + offset[static_cast<size_t>(l)]);
    });
  }
  return out;
}

}  // namespace eplb
