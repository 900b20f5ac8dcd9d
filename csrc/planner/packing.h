// Building blocks shared by the policies (internal to csrc/planner). Header-only, no state.
//
// Both are DeepSeek EPLB's greedy steps, written with heaps so that a layer costs
// O(P log P) instead of O(P * E): the answers (tie-breaking included) are those of the plain
// linear-scan versions, which pick the lowest index among equal candidates.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <queue>
#include <utility>
#include <vector>

namespace eplb {
namespace detail {

inline size_t Z(int64_t i) { return static_cast<size_t>(i); }

// sum of w [n], in four running sums: a single one is a chain of n dependent additions (a layer
// total of DeepSeek-V3 took 3% of a `deepseek` plan that way). Every total of a layer's loads that
// must agree with another (the mean rank load, the bound's) is this one.
inline double Sum(const double* w, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += w[i];
    s1 += w[i + 1];
    s2 += w[i + 2];
    s3 += w[i + 3];
  }
  for (; i < n; ++i) s0 += w[i];
  return (s0 + s1) + (s2 + s3);
}

// max of w [n] (n >= 1), in four running maxima (see Sum).
inline double Max(const double* w, int64_t n) {
  double m0 = w[0], m1 = w[0], m2 = w[0], m3 = w[0];
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    m0 = std::max(m0, w[i]);
    m1 = std::max(m1, w[i + 1]);
    m2 = std::max(m2, w[i + 2]);
    m3 = std::max(m3, w[i + 3]);
  }
  for (; i < n; ++i) m0 = std::max(m0, w[i]);
  return std::max(std::max(m0, m1), std::max(m2, m3));
}

// Whether rank r of `slots` (S slots a rank, rank r at r*S .. r*S+S-1) holds expert e.
inline bool RankHolds(const int64_t* slots, int64_t S, int64_t r, int64_t e) {
  return std::find(slots + r * S, slots + (r + 1) * S, e) != slots + (r + 1) * S;
}

// BalancedPacking scans up to this many packs for the lightest (a node's ranks in DeepSeek-V3),
// uses a tournament tree above (faster from 32 packs on, measured).
constexpr int64_t kScanPacks = 8;

// Buckets of weights on a logarithmic scale, in weight order: bucket(i) = (hi - bits_i) >> shift
// where bits_i is the bit pattern of w[i] (monotone in the value for doubles >= 0; + 0.0 turns
// -0.0 into +0.0) and hi the largest; bucket 0 holds the heaviest, a heavier weight never has a
// larger bucket, and there are fewer than limit + 1 buckets (2n unless given). Sorting or
// selecting by bucket first leaves only weights that share a bucket to compare exactly, and
// needs no data-dependent branches (std::sort / std::nth_element mispredict about every other
// comparison).
struct BitBuckets {
  uint64_t hi = 0;
  int shift = 0;
  int64_t count = 0;  // number of buckets

  // bits: [n] out. w: [n], finite and >= 0, n >= 1. limit: 0 for 2n, else >= 1.
  BitBuckets(const double* w, int64_t n, uint64_t* bits, uint64_t limit = 0) {
    // Four running minima and maxima: one pair would be a chain of dependent selects.
    uint64_t lo4[4] = {~uint64_t{0}, ~uint64_t{0}, ~uint64_t{0}, ~uint64_t{0}};
    uint64_t hi4[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int k = 0; k < 4; ++k) {
        const double v = w[i + k] + 0.0;
        std::memcpy(&bits[i + k], &v, sizeof v);
        lo4[k] = std::min(lo4[k], bits[i + k]);
        hi4[k] = std::max(hi4[k], bits[i + k]);
      }
    }
    for (; i < n; ++i) {
      const double v = w[i] + 0.0;
      std::memcpy(&bits[i], &v, sizeof v);
      lo4[0] = std::min(lo4[0], bits[i]);
      hi4[0] = std::max(hi4[0], bits[i]);
    }
    const uint64_t lo = std::min(std::min(lo4[0], lo4[1]), std::min(lo4[2], lo4[3]));
    hi = std::max(std::max(hi4[0], hi4[1]), std::max(hi4[2], hi4[3]));
    // The smallest shift with (hi - lo) >> shift < limit: the one that leaves (hi - lo) as
    // many bits as limit has, or one more (a loop from 0 took about 46 steps on real loads,
    // each waiting for the last).
    const uint64_t span = hi - lo;
    if (limit == 0) limit = static_cast<uint64_t>(2 * n);
    const auto bit_length = [](uint64_t x) { return x == 0 ? 0 : 64 - __builtin_clzll(x); };
    shift = std::max(0, bit_length(span) - bit_length(limit));
    while ((span >> shift) >= limit) ++shift;
    count = static_cast<int64_t>((hi - lo) >> shift) + 1;
  }
  size_t operator()(uint64_t b) const { return static_cast<size_t>((hi - b) >> shift); }
};

// An unsigned 128-bit integer (a GCC / Clang extension; __extension__ keeps -Wpedantic quiet).
__extension__ typedef unsigned __int128 Uint128;

// Replicate's heap key of (load per replica v >= 0, expert e): the bit pattern of v (monotone in
// the value for doubles >= 0, not NaN; + 0.0 turns -0.0 into +0.0) above ~e, so that comparing
// keys as integers orders them as the pairs (v, -e): larger load first, lower index on ties. One
// integer comparison instead of a pair's two, which compiles branch-free.
inline Uint128 ReplicaKey(double v, int64_t e) {
  v += 0.0;
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (static_cast<Uint128>(bits) << 64) | ~static_cast<uint64_t>(e);
}

// Sifts x down a 4-ary max-heap h [size] from node v. h must hold three more entries past size
// set to 0 (below every key), so that a node's four children are always readable. Four children
// per node halve the depth; the larger of each pair is picked branch-free.
inline void SiftDown4(Uint128* h, int64_t size, int64_t v, Uint128 x) {
  for (;;) {
    const int64_t c = 4 * v + 1;
    if (c >= size) break;
    const int64_t a = c + (h[c] < h[c + 1]);
    const int64_t b = c + 2 + (h[c + 2] < h[c + 3]);
    const int64_t m = h[a] < h[b] ? b : a;
    if (!(x < h[m])) break;
    h[v] = h[m];
    v = m;
  }
  h[v] = x;
}

// Replicates n experts into num_phy slots: every expert gets one, and each further slot copies
// the expert with the highest load per replica (lowest index on ties). This minimises the
// largest load per replica over all replica counts with sum num_phy.
// cnt: [n] out (>= 1). added: [num_phy - n] out or nullptr, the expert of each extra slot in
// the order they were added.
// beta != 1 ranks experts by w_e / cnt_e^beta instead (beta > 1: fewer replicas for the
// hottest experts, coarser replicas but more slots for the rest), an alternative start for the
// balanced search; beta = 1 is DeepSeek's rule.
inline void Replicate(const double* w, int64_t n, int64_t num_phy, int64_t* cnt, int64_t* added,
                      double beta = 1.0) {
  std::fill(cnt, cnt + n, 1);
  if (num_phy == n) return;
  // Max-heap of ReplicaKey(load per replica, index): the top is the largest, lowest index first.
  // Keys are unique (one per expert), so the picks do not depend on the heap's shape.
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    std::vector<Uint128> heap;
    std::vector<uint64_t> bits;
    std::vector<uint32_t> hist;
  } tls;
  auto& heap = tls.heap;
  heap.resize(Z(n) + 3);
  Uint128* h = heap.data();
  int64_t size = n;
  // Only the top num_phy - n experts (by load, lower index first) can ever be picked: an expert
  // is picked only once every expert above it has been (an unpicked expert keeps its full load,
  // a picked one's load per replica only drops for beta >= 0). Heaping just those (or a
  // superset: a few lighter ones) is the same greedy on fewer candidates.
  const int64_t picks = num_phy - n;
  if (2 * picks <= n && beta >= 0.0) {  // a selection pass pays off only for few picks
    // The experts of the buckets holding the top `picks`: a superset (the last bucket may hold
    // lighter ones too), and a superset gives the same greedy.
    auto& bits = tls.bits;
    auto& hist = tls.hist;
    bits.resize(Z(n));
    const BitBuckets bucket(w, n, bits.data());
    hist.assign(Z(bucket.count), 0);
    for (int64_t e = 0; e < n; ++e) ++hist[bucket(bits[Z(e)])];
    size_t cut = 0;
    for (int64_t acc = 0;; ++cut) {
      acc += hist[cut];
      if (acc >= picks) break;
    }
    size = 0;
    for (int64_t e = 0; e < n; ++e) {  // branch-free: which experts make the cut is data
      h[size] = (static_cast<Uint128>(bits[Z(e)]) << 64) | ~static_cast<uint64_t>(e);
      size += bucket(bits[Z(e)]) <= cut;
    }
  } else {
    for (int64_t e = 0; e < n; ++e) h[e] = ReplicaKey(w[e], e);
  }
  h[size] = h[size + 1] = h[size + 2] = 0;
  for (int64_t v = (size - 2) / 4; v >= 0; --v) SiftDown4(h, size, v, h[v]);
  for (int64_t i = 0; i < picks; ++i) {
    const auto e = static_cast<int64_t>(~static_cast<uint64_t>(h[0]));
    const int64_t c = ++cnt[e];
    if (added != nullptr) added[i] = e;
    const double per =
        beta == 1.0 ? static_cast<double>(c) : std::pow(static_cast<double>(c), beta);
    // The top's key only drops: sift it down in place (one pass where pop + push take two).
    SiftDown4(h, size, 0, ReplicaKey(w[e] / per, e));
  }
}

// order [n] out: 0 .. n-1 sorted by w descending, lower index first on equal weight (a strict
// total order, so the result is that of any correct sort). w: [n], finite and >= 0.
// A two-pass radix sort on a bucket key, then an insertion pass, O(n) for spread-out weights
// (std::sort on n = 288 took about 4 us of a 20 us DeepSeek layer): the bit pattern of a
// double >= 0 is monotone in its value (+ 0.0 turns -0.0 into +0.0), so its high bits
// (exponent, leading mantissa bits: a logarithmic scale) give each weight a key whose order
// agrees with the weights' (BitBuckets). The key has two digits of `digit` bits, about
// 30 n key values in all (one pass over 2n buckets left about a fifth of the items out of
// order, each a mispredicted branch or two in the insertion pass; two passes over two small
// digit ranges cost less). The passes are stable (least significant digit first), so only
// weights sharing a key are left out of order, which the insertion pass with the exact
// comparison fixes; it falls back to std::sort if that gets long.
inline void SortHeaviestFirst(const double* w, int64_t n, int64_t* order) {
  if (n <= 1) {
    if (n == 1) order[0] = 0;
    return;
  }
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    std::vector<uint64_t> bits;
    std::vector<uint32_t> key, start, by_low;
  } tls;
  // digit: bits per digit, 2^(2 digit) >= 32n key values (at least 4 bits a digit; at most
  // 16, so past n = 2^27 fewer: only slower, as the insertion pass then finds more to move).
  int digit = 4;
  while ((uint64_t{1} << (2 * digit)) < static_cast<uint64_t>(32 * n) && digit < 16) ++digit;
  const uint32_t radix = uint32_t{1} << digit, low_mask = radix - 1;
  auto& bits = tls.bits;
  bits.resize(Z(n));
  const BitBuckets bucket(w, n, bits.data(), uint64_t{1} << (2 * digit));
  auto& key = tls.key;
  key.resize(Z(n));
  auto& start = tls.start;  // [0, radix): low digit, [radix, 2 radix): high digit
  start.assign(2 * Z(radix), 0);
  uint32_t* low_start = start.data();
  uint32_t* high_start = start.data() + radix;
  for (int64_t i = 0; i < n; ++i) {
    const auto k = static_cast<uint32_t>(bucket(bits[Z(i)]));
    key[Z(i)] = k;
    ++low_start[k & low_mask];
    ++high_start[k >> digit];
  }
  // Exclusive prefix sums, the running sums in registers: start[k] += start[k - 1] would wait
  // on each previous store.
  uint32_t low_sum = 0, high_sum = 0;
  for (uint32_t d = 0; d < radix; ++d) {
    const uint32_t l = low_start[d], h = high_start[d];
    low_start[d] = low_sum;
    high_start[d] = high_sum;
    low_sum += l;
    high_sum += h;
  }
  auto& by_low = tls.by_low;
  by_low.resize(Z(n));
  for (int64_t i = 0; i < n; ++i)
    by_low[low_start[key[Z(i)] & low_mask]++] = static_cast<uint32_t>(i);
  for (int64_t t = 0; t < n; ++t) {
    const uint32_t i = by_low[Z(t)];
    order[high_start[key[i] >> digit]++] = i;
  }
  // Within a key the items are in index order (stable passes): only heavier items further on
  // move forward. Strict comparison keeps equal weights in index order.
  int64_t moves = 0;
  const int64_t max_moves = 8 * n + 64;
  const uint64_t* b = bits.data();
  for (int64_t t = 1; t < n && moves <= max_moves; ++t) {
    const int64_t x = order[t];
    const uint64_t bx = b[x];
    if (!(b[order[t - 1]] < bx)) continue;
    int64_t j = t;
    for (; j > 0 && b[order[j - 1]] < bx; --j) order[j] = order[j - 1];
    order[j] = x;
    moves += t - j;
  }
  if (moves > max_moves) {
    std::iota(order, order + n, 0);
    std::sort(order, order + n,
              [b](int64_t x, int64_t y) { return b[x] > b[y] || (b[x] == b[y] && x < y); });
  }
}

// BalancedPacking's greedy on integer keys for one item set, paused before item `next` (in
// heaviest-first order): its packs' tournament tree and the tree's root.
struct KeyedGreedy {
  const double* w;
  const int64_t* order;
  int64_t* pack;
  int64_t* rank_in_pack;
  int64_t* items;
  uint64_t* tree;
  uint64_t base;  // bit pattern of the lightest positive item
  uint64_t root;
  int64_t next;
};

// Packs items into num_packs packs of exactly n / num_packs items: heaviest first (stable:
// lower index first on equal weight), each into the lightest pack that still has room (lowest
// pack index on ties). Does so for `count` independent item sets of n items each: set k's
// weights are weight[k * n, (k + 1) * n), its pack[i] and rank_in_pack[i] (out) at the same
// offsets. Each set's greedy is one long chain of dependent steps (a pick waits for the
// previous pick's pack weight); the sets' chains run interleaved, so the core overlaps them.
inline void BalancedPacking(const double* weight, int64_t count, int64_t n, int64_t num_packs,
                            int64_t* pack, int64_t* rank_in_pack) {
  const int64_t per_pack = n / num_packs;
  std::fill_n(pack, count * n, 0);
  std::fill_n(rank_in_pack, count * n, 0);
  if (per_pack == 1) {
    for (int64_t k = 0; k < count; ++k) std::iota(pack + k * n, pack + (k + 1) * n, 0);
    return;
  }
  int64_t leaves = 1;
  int index_bits = 0;
  while (leaves < num_packs) {
    leaves *= 2;
    ++index_bits;
  }
  thread_local struct {  // one per function: each thread_local costs a TLS lookup
    std::vector<int64_t> order;
    std::vector<double> pack_weight;
    std::vector<int64_t> items;
    std::vector<uint64_t> tree;
    std::vector<double> key;
    std::vector<int64_t> tree_index;
    std::vector<KeyedGreedy> greedy;
  } tls;
  tls.order.resize(Z(count * n));
  tls.pack_weight.resize(Z(num_packs));  // used by one set at a time
  tls.items.resize(Z(count * num_packs));
  tls.tree.resize(Z(count * 2 * leaves));
  auto& greedy = tls.greedy;
  greedy.clear();
  const auto bits_of = [](double v) {
    uint64_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  };
  const auto bits_to_double = [](uint64_t b) {
    double v;
    std::memcpy(&v, &b, sizeof v);
    return v;
  };
  // Integer keys (see below): (rank of the pack weight above the lightest item, pack index).
  const auto make_key = [&](double v, int64_t q, uint64_t base) {
    const uint64_t rank = v > 0.0 ? bits_of(v) - base + 1 : 0;
    return (rank << index_bits) | static_cast<uint64_t>(q);
  };
  constexpr uint64_t kFullKey = ~uint64_t{0};
  for (int64_t set = 0; set < count; ++set) {
    const double* w = weight + set * n;
    int64_t* set_pack = pack + set * n;
    int64_t* set_rank = rank_in_pack + set * n;
    // Heaviest first, lower index first on ties (SortHeaviestFirst).
    int64_t* order = tls.order.data() + set * n;
    SortHeaviestFirst(w, n, order);
    double* pack_weight = tls.pack_weight.data();
    int64_t* items = tls.items.data() + set * num_packs;
    std::fill_n(pack_weight, num_packs, 0.0);
    std::fill_n(items, num_packs, 0);
    // total only bounds the pack weights (the overflow test, the key range; both with wide
    // margins, and either path is exact)
    const double total = Sum(w, n);
    if (!(total < 1e300)) {
      // Pack weights might overflow to +inf and tie with the markers of full packs below: the
      // plain scan for the lightest pack with room (lowest index on ties) is exact for any
      // weight.
      for (int64_t t = 0; t < n; ++t) {
        const int64_t i = order[t];
        int64_t p = -1;
        for (int64_t q = 0; q < num_packs; ++q)
          if (items[q] < per_pack && (p < 0 || pack_weight[q] < pack_weight[p])) p = q;
        set_pack[i] = p;
        set_rank[i] = items[p]++;
        pack_weight[p] += w[i];
      }
      continue;
    }
    // When the first num_packs items (heaviest first) weigh > 0, they go to packs 0, 1, ... in
    // turn: item k finds packs 0..k-1 loaded (> 0) and pack k the first empty one. (Lighter items
    // may weigh 0: Kimi-K2-like lognormal 1.5 loads leave experts without tokens.)
    int64_t first = 0;
    if (w[order[num_packs - 1]] > 0.0) {
      for (int64_t k = 0; k < num_packs; ++k) {
        const int64_t i = order[k];
        set_pack[i] = k;
        items[k] = 1;
        pack_weight[k] = w[i];
      }
      first = num_packs;
      if (per_pack == 2) {
        // Each further item fills the lightest pack (lowest index on ties) for good, so they go
        // to the packs in (weight, index) order: pack weights do not increase with the index,
        // so that is runs of equal weight from the last run to the first, each by index.
        int64_t k = num_packs;
        for (int64_t end = num_packs; end > 0;) {
          int64_t start = end - 1;
          while (start > 0 && pack_weight[start - 1] == pack_weight[end - 1]) --start;
          for (int64_t q = start; q < end; ++q) {
            const int64_t i = order[k++];
            set_pack[i] = q;
            set_rank[i] = 1;
          }
          end = start;
        }
        continue;
      }
    }
    // Integer keys when they fit, (pack weight, pack index) as one uint64: then a tournament
    // node is just the min of its children (one compare, no index to carry, no tie rule) and
    // the winner is the key's low bits. A pack weight is 0 or >= the lightest positive item
    // (sums of weights >= 0 never round below a term) and < 2 * total; the bit pattern of a
    // double >= 0 is monotone in its value, so bits - bits(lightest) + 1 (0 for an empty pack)
    // keeps the order. Used when that range leaves index_bits free (weights spanning fewer
    // than about 2^(10 - index_bits) binades: always for real loads); otherwise the
    // double-keyed code below. The greedy itself runs after this loop, all sets together.
    double lightest = 0.0;
    for (int64_t t = n - 1; t >= 0 && !(lightest > 0.0); --t) lightest = w[order[t]];
    if (lightest > 0.0) {
      const uint64_t base = bits_of(lightest);
      const uint64_t span = bits_of(2.0 * total) - base + 2;
      if (index_bits <= 16 && span < (uint64_t{1} << (63 - index_bits))) {
        uint64_t* tree = tls.tree.data() + set * 2 * leaves;
        std::fill_n(tree, 2 * leaves, kFullKey);
        for (int64_t q = 0; q < num_packs; ++q)
          tree[leaves + q] = make_key(pack_weight[q], q, base);  // none full yet
        for (int64_t v = leaves - 1; v >= 1; --v) tree[v] = std::min(tree[2 * v], tree[2 * v + 1]);
        greedy.push_back({w, order, set_pack, set_rank, items, tree, base, tree[1], first});
        continue;
      }
    }
    // key[q]: pack q's weight, or +inf once full. The lightest pack with room (lowest index on
    // ties) is the first q whose key is the minimum: pack weights stay finite (total is), so a
    // pack with room always beats the +inf of the full ones.
    constexpr double kFull = std::numeric_limits<double>::infinity();
    auto& key = tls.key;
    if (num_packs <= kScanPacks) {
      // Few packs: a branch-free scan (4 independent running minima) beats any tree or heap.
      key.assign(Z(kScanPacks), kFull);
      std::copy(pack_weight, pack_weight + num_packs, key.begin());  // no pack is full yet
      const double* kv = key.data();
      const int64_t len = (num_packs + 3) / 4 * 4;
      for (int64_t t = first; t < n; ++t) {
        const int64_t i = order[t];
        double m0 = kv[0], m1 = kv[1], m2 = kv[2], m3 = kv[3];
        for (int64_t q = 4; q < len; q += 4) {
          m0 = std::min(m0, kv[q]);
          m1 = std::min(m1, kv[q + 1]);
          m2 = std::min(m2, kv[q + 2]);
          m3 = std::min(m3, kv[q + 3]);
        }
        const double m = std::min(std::min(m0, m1), std::min(m2, m3));
        int64_t p = 0;
        while (kv[p] != m) ++p;
        set_pack[i] = p;
        set_rank[i] = items[p]++;
        pack_weight[p] += w[i];
        key[Z(p)] = items[p] == per_pack ? kFull : pack_weight[p];
      }
      continue;
    }
    // More packs: a tournament tree. Each node stores its winner's (key, index); a node keeps
    // its left child's winner on ties, and left leaves have lower indices, so the root is the
    // first pack with the minimum key. An update climbs from the leaf with the winner in
    // registers: each level reads only the sibling, whose address does not depend on the
    // comparisons.
    auto& tree_index = tls.tree_index;
    key.assign(Z(2 * leaves), kFull);
    tree_index.resize(Z(2 * leaves));
    for (int64_t q = 0; q < leaves; ++q) {
      key[Z(leaves + q)] = q < num_packs ? pack_weight[q] : kFull;  // none full yet
      tree_index[Z(leaves + q)] = q;
    }
    for (int64_t v = leaves - 1; v >= 1; --v) {
      const bool right = key[Z(2 * v + 1)] < key[Z(2 * v)];
      key[Z(v)] = key[Z(2 * v + right)];
      tree_index[Z(v)] = tree_index[Z(2 * v + right)];
    }
    double* tk = key.data();
    int64_t* ti = tree_index.data();
    for (int64_t t = first; t < n; ++t) {
      const int64_t i = order[t];
      const int64_t p = ti[1];
      set_pack[i] = p;
      set_rank[i] = items[p]++;
      pack_weight[p] += w[i];
      double ck = items[p] == per_pack ? kFull : pack_weight[p];
      int64_t ci = p;
      int64_t v = leaves + p;
      tk[v] = ck;
      while (v > 1) {
        const double sk = tk[v ^ 1];
        const int64_t si = ti[v ^ 1];
        // v is a right child when odd: the sibling (left) wins ties; else v wins ties.
        const bool take_sibling = (v & 1) ? !(ck < sk) : (sk < ck);
        ck = take_sibling ? sk : ck;
        ci = take_sibling ? si : ci;
        v /= 2;
        tk[v] = ck;
        ti[v] = ci;
      }
    }
  }
  // The integer-keyed greedies. place(g, root, t) places g's item t given its tree's root and
  // returns the new root.
  const uint64_t mask = (uint64_t{1} << index_bits) - 1;
  const auto place = [&](const KeyedGreedy& g, uint64_t root, int64_t t) {
    const int64_t i = g.order[t];
    const auto p = static_cast<int64_t>(root & mask);
    g.pack[i] = p;
    const int64_t filled = g.items[p]++;
    g.rank_in_pack[i] = filled;
    // The pack's weight from its key (make_key inverted): shorter than its reload from memory
    // on the path from one pick to the next. Integer selects, no branches: a pack filling up
    // (once per pack) and an empty pack (bit pattern 0 is +0.0) are data, and a mispredicted
    // branch costs as much as a few picks.
    const uint64_t rank = root >> index_bits;
    const double weight_p = bits_to_double(rank > 0 ? rank + g.base - 1 : 0) + g.w[i];
    // make_key(weight_p, p, base): weight_p is never -0.0 (+0.0 + -0.0 is +0.0), so its bit
    // pattern is 0 exactly when it is 0.
    const uint64_t b = bits_of(weight_p);
    const uint64_t weight_rank = b != 0 ? b - g.base + 1 : 0;
    const uint64_t full = 0 - static_cast<uint64_t>(filled + 1 == per_pack);  // all ones if full
    uint64_t ck = (weight_rank << index_bits) | static_cast<uint64_t>(p) | full;
    int64_t v = leaves + p;
    g.tree[v] = ck;
    while (v > 1) {
      ck = std::min(ck, g.tree[v ^ 1]);
      v /= 2;
      g.tree[v] = ck;
    }
    return ck;
  };
  if (greedy.size() == 1) {
    // Each item waits for the previous one's pick: the root stays in a register (no store and
    // reload on that path).
    const KeyedGreedy g = greedy[0];
    uint64_t root = g.root;
    for (int64_t t = g.next; t < n; ++t) root = place(g, root, t);
    return;
  }
  // Several sets: one item of each in turn. Their steps are independent, so the core works on
  // several sets' chains at once (a root's store and reload costs less than that gains).
  for (int64_t t = 0; t < n; ++t) {
    for (KeyedGreedy& state : greedy) {
      const KeyedGreedy g = state;  // a copy: the stores in place cannot alias it
      if (t >= g.next) state.root = place(g, g.root, t);
    }
  }
}

// BalancedPacking of one item set: n = weight.size(); pack, rank_in_pack [n] out.
inline void BalancedPacking(const std::vector<double>& weight, int64_t num_packs,
                            std::vector<int64_t>* pack, std::vector<int64_t>* rank_in_pack) {
  const auto n = static_cast<int64_t>(weight.size());
  pack->resize(Z(n));
  rank_in_pack->resize(Z(n));
  BalancedPacking(weight.data(), 1, n, num_packs, pack->data(), rank_in_pack->data());
}

}  // namespace detail
}  // namespace eplb
