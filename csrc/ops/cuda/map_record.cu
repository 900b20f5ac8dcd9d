// CUDA kernels of map_and_record / record_topk / record_counts (contract in ops/ops.h).
//
// One launch per call on the current stream, no host sync: the record flag and
// num_valid_tokens are read by the kernel, so a captured CUDA graph replays with recording on
// or off. At most one block per SM; each block owns a contiguous range of ids, loads them 16
// bytes at a time (int4 / longlong2; a scalar loop for unaligned ids and the tail), writes the
// mapped ids with the same width, and counts into a block-private shared-memory histogram.
// Each block stages the lookup tables in shared memory once when they fit. In spread mode only
// the c = clamp(logcnt[e], 1, M) used entries of each log2phy row are staged, packed back to
// back (a block scan of the counts gives each row's offset), with c and its multiply-high
// reciprocal: attach's and vLLM's tables are [E, P - E + 1] wide, mostly -1 padding, and
// staging them whole either filled shared memory or did not fit. A table of at most 1024
// entries (a narrow [E, max count] one) is staged whole instead, which needs no scan. The loads
// that setup needs first (the first ids, the counts, each row's first entries) are issued before
// any is used. The per-id work is then two shared-memory reads and a multiply-high (no division).
// At the end each block adds every bin it touched to `load` with one global atomic: a hot expert
// costs one global atomic per block instead of one per id (vLLM's Triton kernel). The flush of
// those atomics is what bounds the block count (see Launch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ops/ops.h"

namespace eplb_native {
namespace {

constexpr int kThreads = 512;

enum class Kind { kSpread, kRankLocal, kCountOnly };

template <typename Id>
struct Vec;
template <>
struct Vec<int32_t> {
  using Type = int4;
  static constexpr int kWidth = 4;
};
template <>
struct Vec<int64_t> {
  using Type = longlong2;
  static constexpr int kWidth = 2;
};

struct Table {
  const void* ptr;
  bool is64;
  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return is64 ? __ldg(static_cast<const long long*>(ptr) + i)
                : static_cast<int64_t>(__ldg(static_cast<const int*>(ptr) + i));
  }
};

// A 0-dim device scalar of 1, 2, 4 or 8 bytes (bool or integer).
struct Scalar {
  const void* ptr;
  int bytes;
  __device__ __forceinline__ int64_t Read() const {
    switch (bytes) {
      case 1:
        return *static_cast<const int8_t*>(ptr);
      case 2:
        return *static_cast<const int16_t*>(ptr);
      case 4:
        return *static_cast<const int32_t*>(ptr);
      default:
        return *static_cast<const int64_t*>(ptr);
    }
  }
};

struct Params {
  int64_t n;          // ids in this launch (< 2^31: index math is 32-bit)
  int64_t k;          // ids per token
  int64_t E, cols;    // logical experts, replica columns
  int64_t P;          // load slots
  int64_t per_block;  // ids per block (multiple of the vector width)
  Table table, cnt;
  Scalar record;
  Scalar num_valid;  // ptr == nullptr: every token counts
  bool vectorized;   // ids and out are 16-byte aligned
  bool shared_hist;  // block histogram in shared memory (else global atomics per id)
  bool staged;       // lookup tables staged in shared memory (see the kernel)
  bool dense;        // spread + staged: log2phy has <= kStageRegs * kThreads entries, staged whole
  int64_t capacity;  // spread + staged: packed log2phy entries the shared table holds
};

__device__ __forceinline__ void AddGlobal(int32_t* p, int32_t v) { atomicAdd(p, v); }
__device__ __forceinline__ void AddGlobal(int64_t* p, int32_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

// kUnroll independent 16-byte loads in flight per thread before any is used.
constexpr int kUnroll = 4;
// Table entries each thread loads into registers before storing any to shared memory, so the
// block's staging costs one memory round trip (further entries, for big tables, loop).
constexpr int kStageRegs = 2;

// Replica count c = clamp(logcnt[e], 1, cols).
__device__ __forceinline__ uint32_t ReplicaCount(int64_t count, int64_t cols) {
  return static_cast<uint32_t>(count < 1 ? 1 : (count > cols ? cols : count));
}

// Row e of the packed spread table: m = ceil(2^32 / c) (0 for c = 1), and the row's offset
// and c in one word (offset << kCountBits | c). For t < 2^32 / c, floor(t / c) =
// umulhi(t, m) (m = 2^32 / c + d, 0 <= d < 1, so the error term t * d / 2^32 < 1 / c never
// carries past the next multiple of c).
constexpr int kCountBits = 14;  // c <= the packed table's capacity < 2^14 (48 KiB / 4 bytes)
struct Row {
  uint32_t magic, packed;
};

__device__ __forceinline__ Row MakeRow(uint32_t c, uint32_t offset) {
  return Row{c == 1 ? 0u : static_cast<uint32_t>(0xFFFFFFFFull / c + 1),
             (offset << kCountBits) | c};
}

// Packed index of column t % c of a row, for t < 2^32 / c (Launch stages the table only where
// every token qualifies); branch-free.
__device__ __forceinline__ uint32_t PackedIndex(uint32_t t, Row row) {
  const uint32_t c = row.packed & ((1u << kCountBits) - 1);
  const uint32_t r = t - __umulhi(t, row.magic) * c;
  return (row.packed >> kCountBits) + (row.magic == 0 ? 0 : r);
}

constexpr int kScanWarps = kThreads / 32;
// Experts per thread in the spread staging scan (E <= kThreads * kMaxChunk to stage).
constexpr int kMaxChunk = 4;
// Entries of each thread's first row loaded with the first ids (most rows have 1 or 2).
constexpr int kFirstEntries = 2;

// kStaged: the lookup tables are read from shared memory (p.staged). In spread mode a block
// whose packed table would overflow p.capacity (only when logcnt disagrees with the slots,
// since a consistent placement has sum(c) = P) reads them from global memory instead.
template <Kind kKind, bool kStaged, typename Id, typename Load>
__global__ void __launch_bounds__(kThreads, 2)
    MapRecordKernel(const Id* __restrict__ ids, Id* __restrict__ out, Load* __restrict__ load,
                    Params p) {
  using V = Vec<Id>;
  constexpr int W = V::kWidth;
  using VT = typename V::Type;
  constexpr bool kSpread = kKind == Kind::kSpread;
  constexpr bool kStagedSpread = kStaged && kSpread;
  const uint32_t E = static_cast<uint32_t>(p.E);
  const uint32_t cols = static_cast<uint32_t>(p.cols);
  // Shared memory: [Row per expert, spread only] [log2phy as Id: packed rows in spread mode
  // (or the whole table, p.dense), the 1-D table in rank_local mode] [histogram].
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ uint32_t s_warp_sums[kScanWarps];
  Row* s_rows = reinterpret_cast<Row*>(smem);
  Id* s_table = reinterpret_cast<Id*>(s_rows + (kStagedSpread ? E : 0));
  const uint32_t table_len = kStaged ? static_cast<uint32_t>(kSpread ? p.capacity : p.E) : 0;
  int32_t* hist = reinterpret_cast<int32_t*>(s_table + table_len);

  const uint32_t begin = blockIdx.x * static_cast<uint32_t>(p.per_block);
  const uint32_t end = static_cast<uint32_t>(min(begin + p.per_block, p.n));
  const uint32_t vbegin = begin / W;  // begin is a multiple of W
  const uint32_t vend = p.vectorized ? end / W : vbegin;
  const auto* vin = reinterpret_cast<const VT*>(ids);
  auto* vout = reinterpret_cast<VT*>(out);

  // Every load the block's setup needs first is issued before any is used: the first batch of
  // ids, the table entries or counts, the flags. Their latencies overlap into one round trip.
  VT x[kUnroll];
  const uint32_t v_first = vbegin + threadIdx.x;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const uint32_t v = v_first + u * kThreads;
    if (v < vend) x[u] = vin[v];
  }
  // rank_local: entries threadIdx.x + r * kThreads of the 1-D table. spread, dense: the same of
  // log2phy (stage[r]) and logcnt (stage[kStageRegs + r]). spread, packed: this thread's chunk
  // of experts [e_lo, e_hi) (contiguous, for the scan), their counts, and the first entries of
  // the chunk's first row.
  static_assert(kMaxChunk >= 2 * kStageRegs, "stage[] holds the dense spread entries");
  [[maybe_unused]] int64_t stage[kMaxChunk];
  [[maybe_unused]] int64_t first_entries[kFirstEntries];
  [[maybe_unused]] uint32_t e_lo = 0, e_hi = 0;
  if (kStagedSpread && p.dense) {
#pragma unroll
    for (int r = 0; r < kStageRegs; ++r) {
      const uint32_t j = threadIdx.x + r * kThreads;
      if (j < p.capacity) stage[r] = p.table[j];
      if (j < E) stage[kStageRegs + r] = p.cnt[j];
    }
  } else if constexpr (kStagedSpread) {
    const uint32_t chunk = (E + kThreads - 1) / kThreads;  // <= kMaxChunk (Launch)
    e_lo = min(threadIdx.x * chunk, E);
    e_hi = min(e_lo + chunk, E);
#pragma unroll
    for (int r = 0; r < kMaxChunk; ++r) {
      if (e_lo + r < e_hi) stage[r] = p.cnt[e_lo + r];
    }
#pragma unroll
    for (int j = 0; j < kFirstEntries; ++j) {
      if (e_lo < e_hi && static_cast<uint32_t>(j) < cols)
        first_entries[j] = p.table[int64_t{e_lo} * cols + j];
    }
  } else if constexpr (kStaged) {
#pragma unroll
    for (int r = 0; r < kStageRegs; ++r) {
      const uint32_t j = threadIdx.x + r * kThreads;
      if (j < E) stage[r] = p.table[j];
    }
  }
  const bool record = p.record.Read() != 0;
  if (kKind == Kind::kCountOnly && !record) return;
  // Ids with flat index < counted belong to tokens below num_valid_tokens.
  uint32_t counted = static_cast<uint32_t>(p.n);
  if (p.num_valid.ptr != nullptr) {
    const int64_t valid = p.num_valid.Read();
    counted =
        valid <= 0 ? 0 : static_cast<uint32_t>(valid >= (p.n + p.k - 1) / p.k ? p.n : valid * p.k);
  }
  if (p.shared_hist) {
    for (uint32_t b = threadIdx.x; b < p.P; b += kThreads) hist[b] = 0;
  }
  // Spread: the block-wide exclusive scan of the clamped counts gives each row's offset in the
  // packed table; every block computes the same total, so all take the same path.
  bool packed_fits = kStaged;
  if (kStagedSpread && p.dense) {
#pragma unroll
    for (int r = 0; r < kStageRegs; ++r) {
      const uint32_t j = threadIdx.x + r * kThreads;
      if (j < p.capacity) s_table[j] = static_cast<Id>(stage[r]);
      if (j < E) s_rows[j] = MakeRow(ReplicaCount(stage[kStageRegs + r], p.cols), j * cols);
    }
  } else if constexpr (kStagedSpread) {
    uint32_t mine = 0;
#pragma unroll
    for (int r = 0; r < kMaxChunk; ++r) {
      if (e_lo + r < e_hi) {
        stage[r] = ReplicaCount(stage[r], p.cols);
        mine += static_cast<uint32_t>(stage[r]);
      }
    }
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t inclusive = mine;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const uint32_t v = __shfl_up_sync(0xFFFFFFFFu, inclusive, d);
      if (lane >= d) inclusive += v;
    }
    if (lane == 31) s_warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      uint32_t w = lane < kScanWarps ? s_warp_sums[lane] : 0;
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const uint32_t v = __shfl_up_sync(0xFFFFFFFFu, w, d);
        if (lane >= d) w += v;
      }
      if (lane < kScanWarps) s_warp_sums[lane] = w;
    }
    __syncthreads();
    const uint32_t total = s_warp_sums[kScanWarps - 1];
    packed_fits = total <= static_cast<uint32_t>(p.capacity);
    if (packed_fits) {
      uint32_t offset = inclusive - mine + (warp > 0 ? s_warp_sums[warp - 1] : 0);
#pragma unroll
      for (int r = 0; r < kMaxChunk; ++r) {
        const uint32_t e = e_lo + r;
        if (e >= e_hi) break;
        const uint32_t c = static_cast<uint32_t>(stage[r]);
        s_rows[e] = MakeRow(c, offset);
        uint32_t j0 = 0;
        if (r == 0) {
#pragma unroll
          for (int j = 0; j < kFirstEntries; ++j) {
            if (static_cast<uint32_t>(j) < c)
              s_table[offset + j] = static_cast<Id>(first_entries[j]);
          }
          j0 = kFirstEntries;
        }
        for (uint32_t j = j0; j < c; ++j) {
          s_table[offset + j] = static_cast<Id>(p.table[int64_t{e} * cols + j]);
        }
        offset += c;
      }
    }
  } else if constexpr (kStaged) {
#pragma unroll
    for (int r = 0; r < kStageRegs; ++r) {
      const uint32_t j = threadIdx.x + r * kThreads;
      if (j < E) s_table[j] = static_cast<Id>(stage[r]);
    }
    for (uint32_t j = threadIdx.x + kStageRegs * kThreads; j < E; j += kThreads) {
      s_table[j] = static_cast<Id>(p.table[j]);
    }
  }
  if (kStaged || p.shared_hist) __syncthreads();
  const bool use_shared = record && p.shared_hist;

  auto count = [&](Id slot, uint32_t i) {
    using U = std::make_unsigned_t<Id>;
    if (record && i < counted && static_cast<U>(slot) < static_cast<U>(p.P)) {
      if (use_shared) {
        atomicAdd(&hist[static_cast<uint32_t>(slot)], 1);
      } else {
        AddGlobal(load + slot, 1);
      }
    }
  };

  // The id loop, with the tables read from shared memory (kFromShared) or global memory.
  auto run = [&](auto from_shared) {
    [[maybe_unused]] constexpr bool kFromShared = decltype(from_shared)::value;
    // Logical id of token t -> physical slot (contract in ops/ops.h), already cast to Id. The
    // range check is one unsigned compare.
    auto map_id = [&](Id id, uint32_t t) -> Id {
      if constexpr (kKind == Kind::kCountOnly) {
        return id;
      } else {
        using U = std::make_unsigned_t<Id>;
        if (static_cast<U>(id) >= static_cast<U>(p.E)) return static_cast<Id>(-1);
        const uint32_t e = static_cast<uint32_t>(id);
        if constexpr (kKind == Kind::kRankLocal) {
          return kFromShared ? s_table[e] : static_cast<Id>(p.table[e]);
        } else if constexpr (kFromShared) {
          return s_table[PackedIndex(t, s_rows[e])];
        } else {
          const uint32_t c = ReplicaCount(p.cnt[e], p.cols);
          return static_cast<Id>(p.table[static_cast<int64_t>(e) * p.cols + t % c]);
        }
      }
    };

    const uint32_t k = static_cast<uint32_t>(p.k);
    // With k a multiple of the vector width, all ids of one vector belong to one token.
    [[maybe_unused]] const bool token_per_vector = k % W == 0;
    [[maybe_unused]] const uint32_t vectors_per_token = k / W;
    for (uint32_t v0 = v_first; v0 < vend; v0 += kUnroll * kThreads) {
      if (v0 != v_first) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint32_t v = v0 + u * kThreads;
          if (v < vend) x[u] = vin[v];
        }
      }
      // Map the whole batch first, then count it: the table lookups of all kUnroll * W ids are
      // independent and overlap, where interleaving them with the histogram atomics (which may
      // alias shared memory, as far as the compiler knows) would serialise every id.
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t v = v0 + u * kThreads;
        if (v >= vend) break;
        if constexpr (kKind != Kind::kCountOnly) {
          Id id[W];
          memcpy(id, &x[u], sizeof(VT));
          if (token_per_vector) {
            const uint32_t t = v / vectors_per_token;
#pragma unroll
            for (int j = 0; j < W; ++j) id[j] = map_id(id[j], t);
          } else {
            // Token of each id stepped from the vector's first: one division per vector.
            const uint32_t i = v * W;
            uint32_t t = i / k;
            uint32_t pos = i - t * k;
#pragma unroll
            for (int j = 0; j < W; ++j) {
              id[j] = map_id(id[j], t);
              if (++pos == k) {
                pos = 0;
                ++t;
              }
            }
          }
          memcpy(&x[u], id, sizeof(VT));
          vout[v] = x[u];
        }
      }
      if (record) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint32_t v = v0 + u * kThreads;
          if (v >= vend) break;
          Id slot[W];
          memcpy(slot, &x[u], sizeof(VT));
#pragma unroll
          for (int j = 0; j < W; ++j) count(slot[j], v * W + j);
        }
      }
    }
    // Unaligned ids, and the tail of the last block's range.
    for (uint32_t i = vend * W + threadIdx.x; i < end; i += kThreads) {
      const Id slot = map_id(ids[i], i / k);
      if constexpr (kKind != Kind::kCountOnly) out[i] = slot;
      count(slot, i);
    }
  };
  if (!kStagedSpread || packed_fits) {
    run(std::integral_constant<bool, kStaged>{});
  } else {
    run(std::false_type{});
  }

  if (use_shared) {
    __syncthreads();
    for (uint32_t b = threadIdx.x; b < p.P; b += kThreads) {
      const int32_t c = hist[b];
      if (c != 0) AddGlobal(load + b, c);
    }
  }
}

// Cached per device: the launch path runs on every forward.
int64_t MultiprocessorCount(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  TORCH_CHECK(device >= 0 && device < static_cast<int>(cache.size()), "device index ", Num(device));
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

Scalar ScalarOf(const at::Tensor& t) {
  return Scalar{t.data_ptr(), static_cast<int>(t.element_size())};
}

template <Kind kKind>
void Launch(const at::Tensor& ids, const at::Tensor* out, at::Tensor& load, Params p) {
  if (p.n == 0) return;
  constexpr int64_t kMaxIds = (int64_t{1} << 31) - kThreads * kUnroll * 4;  // 32-bit indices
  TORCH_CHECK_VALUE(p.n < kMaxIds, "topk_ids must hold fewer than ", Num(kMaxIds),
                    " ids on CUDA (2^31 less one grid step), got ", Num(p.n));
  const int width = ids.scalar_type() == at::kLong ? 2 : 4;
  p.vectorized = reinterpret_cast<uintptr_t>(ids.data_ptr()) % 16 == 0 &&
                 (out == nullptr || reinterpret_cast<uintptr_t>(out->data_ptr()) % 16 == 0);
  // Shared memory: the block histogram first, then the staged tables if they still fit.
  // (48 KiB without an opt-in, less the kernel's static scan scratch, s_warp_sums)
  constexpr int64_t kSharedBytes = 48 * 1024 - kScanWarps * 4;
  p.shared_hist = p.P * 4 <= kSharedBytes;
  int64_t smem = p.shared_hist ? p.P * 4 : 0;
  if constexpr (kKind != Kind::kCountOnly) {
    const int64_t id_bytes = ids.element_size();
    // The staged spread path takes t % c by multiply-high, exact for t < 2^32 / c: beyond
    // that (over 2^32 / cols tokens in one call) the table is read from global memory.
    if constexpr (kKind == Kind::kSpread) {
      const int64_t tokens = (p.n + p.k - 1) / p.k;
      // The packed table holds every row whole when that fits, else the max(P, E) entries a
      // consistent placement needs (sum of c = P); a logcnt that asks for more makes the
      // kernel read global memory (each block finds that out from its scan).
      const int64_t rows_bytes = p.E * static_cast<int64_t>(sizeof(Row));
      const int64_t room = (kSharedBytes - smem - rows_bytes) / id_bytes;
      const int64_t whole = p.E * p.cols;
      p.capacity = whole <= room ? whole : std::max(p.P, p.E);
      // A table this small is staged whole, rows at stride cols, without the scan (narrow
      // tables; measured 0.3-0.5 us faster than packing them, H200, 2026-12-05).
      p.dense = whole <= int64_t{kStageRegs} * kThreads;
      const bool fast_mod = tokens <= (int64_t{1} << 32) / std::max<int64_t>(p.cols, 1) - 1;
      // (E * cols < 2^32 keeps the scan's 32-bit total from wrapping.)
      p.staged = fast_mod && p.E <= int64_t{kThreads} * kMaxChunk && p.capacity <= room &&
                 whole < (int64_t{1} << 32);
      if (p.staged) smem += rows_bytes + p.capacity * id_bytes;
    } else {
      p.staged = smem + p.E * id_bytes <= kSharedBytes;
      if (p.staged) smem += p.E * id_bytes;
    }
  }
  // At most one block per SM (at two blocks per SM the flush of twice as many block
  // histograms, a global atomic per touched bin per block, cost more than the occupancy
  // gained, measured on an H100 at 1M ids), each thread looping over as many vectors as that
  // takes; small inputs get fewer blocks of one vector per thread.
  const int64_t slots = MultiprocessorCount(ids.get_device()) * kThreads;
  const int64_t vectors = (p.n + width - 1) / width;
  const int64_t per_thread = std::max<int64_t>((vectors + slots - 1) / slots, 1);
  p.per_block = per_thread * kThreads * width;
  const int64_t blocks = (p.n + p.per_block - 1) / p.per_block;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "eplb_map_record_ids", [&] {
    using Id = index_t;
    const Id* in = ids.data_ptr<Id>();
    Id* o = out != nullptr ? out->data_ptr<Id>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "eplb_map_record_load", [&] {
      const auto grid = static_cast<unsigned>(blocks);
      const auto bytes = static_cast<size_t>(smem);
      if (kKind != Kind::kCountOnly && p.staged) {
        constexpr Kind kStagedKind = kKind == Kind::kCountOnly ? Kind::kSpread : kKind;
        MapRecordKernel<kStagedKind, true, Id, index_t>
            <<<grid, kThreads, bytes, stream>>>(in, o, load.data_ptr<index_t>(), p);
      } else {
        MapRecordKernel<kKind, false, Id, index_t>
            <<<grid, kThreads, bytes, stream>>>(in, o, load.data_ptr<index_t>(), p);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Params BaseParams(const at::Tensor& ids, int64_t k, const at::Tensor& load,
                  const at::Tensor& record, const std::optional<at::Tensor>& num_valid_tokens) {
  Params p{};
  p.n = ids.numel();
  p.k = k;
  p.P = load.numel();
  p.record = ScalarOf(record);
  p.num_valid = num_valid_tokens.has_value() ? ScalarOf(*num_valid_tokens) : Scalar{nullptr, 8};
  return p;
}

at::Tensor map_and_record_cuda(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                               const at::Tensor& logcnt, at::Tensor& load, const at::Tensor& record,
                               const std::optional<at::Tensor>& num_valid_tokens,
                               const std::string& mode_str) {
  const MapMode mode =
      CheckMapAndRecord(topk_ids, log2phy, logcnt, load, record, num_valid_tokens, mode_str);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const MapShape s = MapShapeOf(topk_ids, log2phy, mode);
  const auto ids = topk_ids.contiguous();
  const auto table = log2phy.contiguous();
  const auto cnt = mode == MapMode::kSpread ? logcnt.contiguous() : table;
  auto out = at::empty_like(ids, at::MemoryFormat::Contiguous);
  Params p = BaseParams(ids, s.k, load, record, num_valid_tokens);
  p.E = s.E;
  p.cols = s.cols;
  p.table = Table{table.data_ptr(), table.scalar_type() == at::kLong};
  p.cnt = Table{cnt.data_ptr(), cnt.scalar_type() == at::kLong};
  if (mode == MapMode::kSpread) {
    Launch<Kind::kSpread>(ids, &out, load, p);
  } else {
    Launch<Kind::kRankLocal>(ids, &out, load, p);
  }
  return out;
}

void record_topk_cuda(at::Tensor& load, const at::Tensor& topk_ids, const at::Tensor& record,
                      const std::optional<at::Tensor>& num_valid_tokens) {
  CheckRecordTopk(load, topk_ids, record, num_valid_tokens);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const auto ids = topk_ids.contiguous();
  Params p = BaseParams(ids, IdsPerToken(ids), load, record, num_valid_tokens);
  p.E = p.P;
  p.cols = 1;
  Launch<Kind::kCountOnly>(ids, nullptr, load, p);
}

template <typename Load>
__global__ void RecordCountsKernel(Load* __restrict__ load, const void* counts, bool is64,
                                   int64_t n, bool cumulative) {
  const Table c{counts, is64};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = cumulative ? c[i] - (i > 0 ? c[i - 1] : 0) : c[i];
    load[i] += static_cast<Load>(v);  // each slot has one writer
  }
}

void record_counts_cuda(at::Tensor& load, const at::Tensor& expert_tokens, int64_t group_list_type,
                        int64_t offset) {
  CheckRecordCounts(load, expert_tokens, group_list_type, offset);
  const int64_t n = expert_tokens.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(load.device());
  const auto counts = expert_tokens.contiguous();
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 1024));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "eplb_record_counts", [&] {
    RecordCountsKernel<index_t>
        <<<blocks, 256, 0, stream>>>(load.data_ptr<index_t>() + offset, counts.data_ptr(),
                                     counts.scalar_type() == at::kLong, n, group_list_type == 0);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace eplb_native

TORCH_LIBRARY_IMPL(eplb_native, CUDA, m) {
  m.impl("map_and_record", &eplb_native::map_and_record_cuda);
  m.impl("record_counts", &eplb_native::record_counts_cuda);
  m.impl("record_topk", &eplb_native::record_topk_cuda);
}
