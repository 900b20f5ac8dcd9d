// Lower bound on the max rank load of ANY placement of one layer with the given slots and
// topology, so a plan can say how far from optimal it is.
//
// The argument, for a pack of R ranks with S slots each (P = R * S slots) holding n experts with
// loads w_e (the whole EP group; or one node, see below). A placement chooses replica counts
// c_e >= 1 with sum c_e = P; each replica of e carries w_e / c_e; a rank's load is the sum over
// its S slots. Let OPT be the smallest max rank load over all placements.
//   (a) OPT >= sum(w) / R: the rank loads add up to sum(w).
//   (b) OPT >= m* = min over counts of max_e w_e / c_e: the rank holding the largest replica
//       carries at least that replica (loads are >= 0). Giving each extra slot to the expert
//       with the largest load per replica reaches m* (the classic greedy for min-max
//       apportionment), so m* is computed exactly.
//   (c) OPT > T when T is proven infeasible: a placement with max rank load <= T needs
//       c_e >= a_e = max(1, ceil(w_e / T)) (no replica above T), and at most one replica above
//       T/2 per rank (two would already exceed T), i.e. at most R such "big" replicas. An expert
//       whose a_e replicas are big either stays big (counts a_e towards R) or is split into
//       b_e = ceil(2 w_e / T) replicas (costs b_e - a_e more slots). Fewest slots needed >=
//       sum a_e + the fractional-knapsack (LP) minimum of the extra slots that bring the big
//       count down to R; if that exceeds P, no placement reaches T. A bisection between (a,b)
//       and 2x that finds the largest T it can prove infeasible; every T it keeps is proven,
//       so the result is a valid bound whatever the bisection does.
// Hierarchical topology (DeepSeek's: each node holds whole groups, num_groups / num_nodes of
// them, and every replica of an expert stays on its group's node, with P / N slots on R / N
// ranks): such a placement is also a placement, so the global bound holds, and besides
//   (d) the node holding the heaviest group also holds G/N - 1 other groups, so its load is at
//       least that group + the G/N - 1 lightest others, spread over at most R/N ranks;
//   (e) an expert has at most P/N - E/N + 1 replicas (its node's other experts need one slot
//       each), so OPT >= max_e w_e / (P/N - E/N + 1).
#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

#include "planner/packing.h"
#include "planner/placement.h"
#include "planner/policies.h"

namespace eplb {
namespace {

using detail::Z;

// Floating-point safety margin: ceil() of a ratio that should be an exact integer must not round
// up, or the bound could claim more than it proved.
constexpr double kEps = 1e-9;

// (c): true if no placement of w [n] into P slots on R ranks has max rank load <= T.
// w lists only the experts that may need more than one replica or be big at T; `small` more
// experts have a_e = 1 and are not big (the caller checks w_e <= T/2 for them). Slot counts are
// integers far below 2^53, so summing them in any order gives the same doubles.
bool ProvenInfeasible(const double* w, int64_t n, int64_t small, int64_t P, int64_t R, double T,
                      std::vector<std::pair<double, double>>* scratch) {
  double need = static_cast<double>(small), big = 0.0;
  scratch->clear();
  const double half = 0.5 * T * (1.0 + kEps);
  for (int64_t e = 0; e < n; ++e) {
    // One division where the formulas have up to three, with the same results: w / 1 is w, and
    // (2 w) / T is exactly 2 (w / T) unless 2 w overflows.
    const double q = w[e] / T;
    const double a = std::max(1.0, std::ceil(q - kEps));
    need += a;
    if (need > static_cast<double>(P)) return true;  // (need only grows)
    if ((a == 1.0 ? w[e] : w[e] / a) > half) {
      big += a;
      const double b = std::ceil((w[e] < 1e300 ? 2.0 * q : 2.0 * w[e] / T) - kEps);
      scratch->push_back({(b - a) / a, a});
    }
  }
  if (need > static_cast<double>(P)) return true;
  double excess = big - static_cast<double>(R);
  if (excess <= 0.0) return false;
  // Cheapest extra slots first: ascending (ratio, a), popped from a min-heap instead of
  // sorting all of them (the same sequence: pairs are totally ordered), stopping as soon as the
  // answer is known: the excess is covered, or `extra` (a sum of terms >= 0, so it only grows)
  // already proves infeasibility.
  const double limit = static_cast<double>(P) * (1.0 + kEps);
  auto first = scratch->begin(), last = scratch->end();
  std::make_heap(first, last, std::greater<>());
  double extra = 0.0;
  while (first != last) {
    std::pop_heap(first, last, std::greater<>());
    --last;
    const double ratio = last->first, a = last->second;
    const double take = std::min(a, excess);
    extra += ratio * take;
    excess -= take;
    if (excess <= 0.0 || need + extra > limit) break;
  }
  return need + extra > limit;
}

// The experts ProvenInfeasible must visit at every T >= T0: an expert with w_e <= T0/2 (with
// its test's margin) has a_e = 1 and is never big. heavy: their loads (out); returns how many.
int64_t HeavyAt(const double* w, int64_t n, double T0, std::vector<double>* heavy) {
  const double small_max = 0.5 * T0 * (1.0 + kEps);
  heavy->resize(Z(n));
  double* h = heavy->data();
  int64_t nh = 0;
  for (int64_t e = 0; e < n; ++e) {  // branch-free: which experts are heavy is data
    h[nh] = w[e];
    nh += w[e] > small_max;
  }
  return nh;
}

// (a), (b), (c) for n experts in P slots on R ranks; total: the sum of w (detail::Sum).
// greedy_cnt: [n] the replica counts of Replicate(w, n, P) when the caller has them, or nullptr.
// proven: a T that (c) proved infeasible already (0: none).
double PackBound(const double* w, int64_t n, int64_t P, int64_t R, double total,
                 const int64_t* greedy_cnt, double proven) {
  if (!(total > 0.0)) return 0.0;
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    std::vector<int64_t> own_cnt, replicated;
    std::vector<double> heavy;
    std::vector<std::pair<double, double>> scratch;
  } tls;
  auto& own_cnt = tls.own_cnt;
  const int64_t* cnt = greedy_cnt;
  if (cnt == nullptr) {
    own_cnt.resize(Z(n));
    detail::Replicate(w, n, P, own_cnt.data(), nullptr);
    cnt = own_cnt.data();
  }
  // m* = max_e w_e / c_e, branch-free (which experts are replicated is data): the experts with
  // one replica as they are, then the listed replicated ones divided (x / 1 is x: divide only
  // for those). The maximum is the same double in any order (values >= 0; a zero never
  // replaces the running 0.0, in either order).
  auto& replicated = tls.replicated;
  replicated.resize(Z(n));
  int64_t num_replicated = 0;
  double m_star = 0.0;
  for (int64_t e = 0; e < n; ++e) {
    m_star = std::max(m_star, cnt[e] == 1 ? w[e] : 0.0);
    replicated[Z(num_replicated)] = e;
    num_replicated += cnt[e] != 1;
  }
  for (int64_t k = 0; k < num_replicated; ++k) {
    const int64_t e = replicated[Z(k)];
    m_star = std::max(m_star, w[e] / static_cast<double>(cnt[e]));
  }
  double lo = std::max(total / static_cast<double>(R), m_star);
  double hi = 2.0 * lo;
  // (every T tried below is >= lo)
  const int64_t nh = HeavyAt(w, n, lo, &tls.heavy);
  const double* hw = tls.heavy.data();
  auto& scratch = tls.scratch;
  // (what (c) proves at a T it proves at every lower T: a T below `proven` needs no test)
  if (!(lo * (1.0 + 1e-6) <= proven) &&
      !ProvenInfeasible(hw, nh, n - nh, P, R, lo * (1.0 + 1e-6), &scratch))
    return lo;
  for (int it = 0; it < 30 && hi - lo > 1e-7 * lo; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (ProvenInfeasible(hw, nh, n - nh, P, R, mid, &scratch)) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace

double LowerBound(const double* load, const Shape& s) { return LowerBound(load, s, nullptr); }

double LowerBound(const double* load, const Shape& s, const int64_t* greedy_cnt) {
  const int64_t E = s.num_logical, P = s.num_physical, R = s.num_ranks;
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    std::vector<double> group, heavy;
    std::vector<std::pair<double, double>> scratch;
  } tls;
  // The hierarchical terms first, (d) and (e): cheap, and with (a) they often settle the bound
  // without PackBound's replication and bisection (below).
  double floor = 0.0;
  if (s.hierarchical()) {
    const int64_t G = s.num_groups, N = s.num_nodes, group_size = E / G;
    // (d)
    auto& group = tls.group;
    group.assign(Z(G), 0.0);
    for (int64_t g = 0; g < G; ++g)  // no integer division per expert
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) group[Z(g)] += load[e];
    std::sort(group.begin(), group.end(), std::greater<double>());
    double node = group[0];
    for (int64_t k = 0; k < G / N - 1; ++k) node += group[Z(G - 1 - k)];
    // (e)
    // max_e (w_e / most) is (max_e w_e) / most: a rounded division by a positive number is
    // monotone, so one division instead of E gives the same double.
    const double most = static_cast<double>(P / N - E / N + 1);
    floor = std::max(node / static_cast<double>(R / N), detail::Max(load, E) / most);
  }
  // F = max((a), floor), a bound already. When (c) cannot prove F infeasible, F is the answer:
  // (b) m* <= F then (m* > F needs more than P slots for replicas <= F, which (c) counts and
  // proves), and (c) proves no T above F either (a T it proves is proven at every lower T, the
  // slots needed only growing as T falls), so max(PackBound, floor) is F (up to (c)'s kEps
  // margin, which can only make a bound lower, never invalid). That is the usual case (a
  // replica rarely weighs half a rank's mean load) and skips the replication (m*, an O(P log E)
  // heap; hierarchical shapes had no counts to reuse) and the bisection.
  const double total = detail::Sum(load, E);
  const double F = std::max(total / static_cast<double>(R), floor);
  // The caller's counts (global shapes only: they are the whole layer's) show where (c) would
  // prove F infeasible on slot count alone (a replica above F: m* > F), the test then skipped
  // (multiplications, no division; rounding can only misjudge the skip, never the bound).
  const int64_t* cnt = s.hierarchical() ? nullptr : greedy_cnt;
  bool replica_above = false;
  if (cnt != nullptr)
    for (int64_t e = 0; e < E; ++e) replica_above |= load[e] > F * static_cast<double>(cnt[e]);
  double proven = 0.0;
  if (F > 0.0 && !replica_above) {
    const int64_t nh = HeavyAt(load, E, F, &tls.heavy);
    if (!ProvenInfeasible(tls.heavy.data(), nh, E - nh, P, R, F, &tls.scratch)) return F;
    proven = F;
  }
  return std::max(PackBound(load, E, P, R, total, cnt, proven), floor);
}

}  // namespace eplb
