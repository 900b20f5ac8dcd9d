// CPU kernels of map_and_record / record_topk / record_counts (contract in ops/ops.h).
//
// One pass over the ids. Large inputs run in parallel over contiguous ranges of ids
// (at::parallel_for); each worker thread counts into its own histogram row and the rows are
// summed into `load` after the parallel region, so no two threads ever write the same counter.
// The sums into `load` are atomic (relaxed; only the counters a call touches), as the CUDA
// kernels' are: calls from several threads counting into one load lose nothing (review 18: 26K
// of 19.2M counts lost on 2 cores), and an int32 counter wraps, as an atomic add is defined to,
// where `+=` past INT32_MAX was undefined behaviour.
// record / num_valid_tokens are CPU tensors here, so reading them is no device sync.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "ops/ops.h"

namespace eplb_native {
namespace {

// Below this many ids one thread is faster than waking the pool.
constexpr int64_t kParallelGrain = 1 << 15;

// Reads a table entry of either index dtype as int64 (tables are tiny; one branch is cheaper
// than four template instantiations per kernel).
struct Table {
  const void* ptr = nullptr;
  bool is64 = false;
  int64_t operator[](int64_t i) const {
    return is64 ? static_cast<const int64_t*>(ptr)[i] : static_cast<const int32_t*>(ptr)[i];
  }
};

Table TableOf(const at::Tensor& t) { return Table{t.data_ptr(), t.scalar_type() == at::kLong}; }

// *counter += v, atomically (GCC / Clang builtin: C++17 has no atomic_ref).
template <typename Load>
void AtomicAdd(Load* counter, int64_t v) {
  __atomic_fetch_add(counter, static_cast<Load>(v), __ATOMIC_RELAXED);
}

// Logical -> physical id of an id of token t. Matches the CUDA kernel and the composite
// fallback exactly.
struct Mapper {
  MapMode mode;
  int64_t E, cols;
  Table table, cnt;
  int64_t operator()(int64_t e, int64_t t) const {
    if (e < 0 || e >= E) return -1;
    if (mode == MapMode::kRankLocal) return table[e];
    const int64_t c = std::clamp<int64_t>(cnt[e], 1, cols);
    return table[e * cols + t % c];
  }
};

// Number of flat ids whose token is below num_valid_tokens (all n when absent).
int64_t CountedPrefix(const std::optional<at::Tensor>& num_valid_tokens, int64_t n, int64_t k) {
  if (!num_valid_tokens.has_value()) return n;
  const int64_t valid = num_valid_tokens->item<int64_t>();
  if (valid <= 0) return 0;
  if (valid >= (n + k - 1) / k) return n;
  return valid * k;
}

bool RecordOn(const at::Tensor& record) { return record.reshape({}).item<bool>(); }

// Runs body(begin, end, hist) over [0, n); hist points to a private zeroed row of P counters
// (or nullptr when not counting). Adds the rows into load afterwards.
template <typename Load, typename Body>
void ForEachRange(int64_t n, int64_t P, bool count, Load* load, const Body& body) {
  if (n == 0) return;
  const int64_t rows = n >= 2 * kParallelGrain ? at::get_num_threads() : 1;
  std::vector<int64_t> hist(count ? rows * P : 0, 0);
  auto run = [&](int64_t begin, int64_t end) {
    const int64_t row = rows > 1 ? at::get_thread_num() : 0;
    body(begin, end, count ? hist.data() + row * P : nullptr);
  };
  if (rows > 1) {
    at::parallel_for(0, n, kParallelGrain, run);
  } else {
    run(0, n);
  }
  if (!count) return;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* h = hist.data() + r * P;
    for (int64_t p = 0; p < P; ++p)
      if (h[p] != 0) AtomicAdd(load + p, h[p]);
  }
}

}  // namespace

at::Tensor map_and_record_cpu(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                              const at::Tensor& logcnt, at::Tensor& load, const at::Tensor& record,
                              const std::optional<at::Tensor>& num_valid_tokens,
                              const std::string& mode_str) {
  const MapMode mode =
      CheckMapAndRecord(topk_ids, log2phy, logcnt, load, record, num_valid_tokens, mode_str);
  const MapShape s = MapShapeOf(topk_ids, log2phy, mode);
  const auto ids = topk_ids.contiguous();
  const auto table = log2phy.contiguous();
  const auto cnt = mode == MapMode::kSpread ? logcnt.contiguous() : table;
  auto out = at::empty_like(ids, at::MemoryFormat::Contiguous);
  const int64_t n = ids.numel();
  const int64_t P = load.numel();
  const bool count = RecordOn(record);
  const int64_t counted = CountedPrefix(num_valid_tokens, n, s.k);
  const Mapper map{mode, s.E, s.cols, TableOf(table), TableOf(cnt)};
  const int64_t k = s.k;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "map_and_record_ids", [&] {
    using Id = index_t;
    const Id* in = ids.data_ptr<Id>();
    Id* o = out.data_ptr<Id>();
    AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "map_and_record_load", [&] {
      ForEachRange(n, P, count, load.data_ptr<index_t>(), [&](int64_t b, int64_t e, int64_t* h) {
        // Token t of id i = i / k, stepped instead of divided.
        int64_t t = b / k, j = b % k;
        for (int64_t i = b; i < e; ++i) {
          const Id phy = static_cast<Id>(map(static_cast<int64_t>(in[i]), t));
          o[i] = phy;
          if (h != nullptr && i < counted && phy >= 0 && phy < P) ++h[phy];
          if (++j == k) {
            j = 0;
            ++t;
          }
        }
      });
    });
  });
  return out;
}

void record_topk_cpu(at::Tensor& load, const at::Tensor& topk_ids, const at::Tensor& record,
                     const std::optional<at::Tensor>& num_valid_tokens) {
  CheckRecordTopk(load, topk_ids, record, num_valid_tokens);
  if (!RecordOn(record)) return;
  const auto ids = topk_ids.contiguous();
  const int64_t n = ids.numel();
  const int64_t P = load.numel();
  const int64_t counted = CountedPrefix(num_valid_tokens, n, IdsPerToken(ids));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "record_topk_ids", [&] {
    using Id = index_t;
    const Id* in = ids.data_ptr<Id>();
    AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "record_topk_load", [&] {
      ForEachRange(counted, P, true, load.data_ptr<index_t>(),
                   [&](int64_t b, int64_t e, int64_t* h) {
                     for (int64_t i = b; i < e; ++i) {
                       const auto phy = static_cast<int64_t>(in[i]);
                       if (phy >= 0 && phy < P) ++h[phy];
                     }
                   });
    });
  });
}

void record_counts_cpu(at::Tensor& load, const at::Tensor& expert_tokens, int64_t group_list_type,
                       int64_t offset) {
  CheckRecordCounts(load, expert_tokens, group_list_type, offset);
  const auto tokens = expert_tokens.contiguous();
  const Table c = TableOf(tokens);
  const int64_t n = tokens.numel();
  AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "record_counts", [&] {
    index_t* l = load.data_ptr<index_t>() + offset;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = group_list_type == 1 ? c[i] : c[i] - (i > 0 ? c[i - 1] : 0);
      if (v != 0) AtomicAdd(l + i, v);
    }
  });
}

}  // namespace eplb_native
