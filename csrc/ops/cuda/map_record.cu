// CUDA kernels of map_and_record / record_topk / record_counts (contract in ops/ops.h).
//
// One launch per call on the current stream, no host sync: the record flag and
// num_valid_tokens are read by the kernel, so a captured CUDA graph replays with recording on
// or off. Each block owns a contiguous range of ids, loads them 16 bytes at a time (int4 /
// longlong2; scalar loop for the unaligned head-less case and the tail), writes the mapped ids
// with the same width, and counts into a block-private shared-memory histogram. At the end each
// block adds every bin it touched to `load` with one global atomic: a hot expert costs one
// global atomic per block instead of one per token (vLLM's Triton kernel).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "ops/ops.h"

namespace eplb_native {
namespace {

constexpr int kThreads = 512;
// Shared-memory histograms up to this many slots (48 KiB of int32); larger loads count with
// global atomics directly.
constexpr int64_t kMaxSharedBins = 12288;
// At most this many vectors per thread; more blocks beyond that.
constexpr int64_t kMaxVectorsPerThread = 8;

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
  int64_t n;          // ids in this launch
  int64_t k;          // ids per token
  int64_t E, cols;    // logical experts, replica columns
  int64_t P;          // load slots
  int64_t per_block;  // ids per block (multiple of the vector width)
  Table table, cnt;
  Scalar record;
  Scalar num_valid;  // ptr == nullptr: every token counts
  bool vectorized;
  bool shared_hist;
};

__device__ __forceinline__ void AddGlobal(int32_t* p, int32_t v) { atomicAdd(p, v); }
__device__ __forceinline__ void AddGlobal(int64_t* p, int32_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

template <Kind kKind>
__device__ __forceinline__ int64_t MapId(int64_t e, int64_t i, const Params& p) {
  if constexpr (kKind == Kind::kCountOnly) {
    return e;
  } else {
    if (e < 0 || e >= p.E) return -1;
    if constexpr (kKind == Kind::kRankLocal) {
      return p.table[e];
    } else {
      int64_t c = p.cnt[e];
      c = c < 1 ? 1 : (c > p.cols ? p.cols : c);
      // 32-bit division whenever it fits: 64-bit division is a long software sequence.
      const int64_t t = (i | p.k) >> 31 ? i / p.k : static_cast<uint32_t>(i) /
                                                         static_cast<uint32_t>(p.k);
      const int64_t r = (t | c) >> 31 ? t % c : static_cast<uint32_t>(t) % static_cast<uint32_t>(c);
      return p.table[e * p.cols + r];
    }
  }
}

template <Kind kKind, typename Id, typename Load>
__global__ void __launch_bounds__(kThreads)
    MapRecordKernel(const Id* __restrict__ ids, Id* __restrict__ out, Load* __restrict__ load,
                    Params p) {
  extern __shared__ int32_t hist[];
  const bool record = p.record.Read() != 0;
  if (kKind == Kind::kCountOnly && !record) return;
  // Ids with flat index < counted belong to tokens below num_valid_tokens.
  int64_t counted = p.n;
  if (p.num_valid.ptr != nullptr) {
    const int64_t valid = p.num_valid.Read();
    counted = valid <= 0 ? 0 : (valid >= (p.n + p.k - 1) / p.k ? p.n : valid * p.k);
  }
  const bool use_shared = record && p.shared_hist;
  if (use_shared) {
    for (int64_t b = threadIdx.x; b < p.P; b += blockDim.x) hist[b] = 0;
    __syncthreads();
  }
  auto count = [&](int64_t slot, int64_t i) {
    if (record && i < counted && slot >= 0 && slot < p.P) {
      if (use_shared) {
        atomicAdd(&hist[slot], 1);
      } else {
        AddGlobal(load + slot, 1);
      }
    }
  };

  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.per_block;
  const int64_t end = min(begin + p.per_block, p.n);
  int64_t scalar_from = begin;
  if (p.vectorized) {
    using V = Vec<Id>;
    constexpr int W = V::kWidth;
    const int64_t vbegin = begin / W, vend = end / W;  // begin is a multiple of W
    const auto* vin = reinterpret_cast<const typename V::Type*>(ids);
    auto* vout = reinterpret_cast<typename V::Type*>(out);
    // kUnroll independent 16-byte loads in flight per thread before any is used.
    constexpr int kUnroll = 4;
    for (int64_t v0 = vbegin + threadIdx.x; v0 < vend; v0 += kUnroll * blockDim.x) {
      typename V::Type x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + u * static_cast<int64_t>(blockDim.x);
        if (v < vend) x[u] = vin[v];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + u * static_cast<int64_t>(blockDim.x);
        if (v >= vend) break;
        Id in[W];
        Id res[W];
        memcpy(in, &x[u], sizeof(x[u]));
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const int64_t i = v * W + j;
          const int64_t slot = MapId<kKind>(static_cast<int64_t>(in[j]), i, p);
          res[j] = static_cast<Id>(slot);
          count(slot, i);
        }
        if constexpr (kKind != Kind::kCountOnly) {
          typename V::Type y;
          memcpy(&y, res, sizeof(y));
          vout[v] = y;
        }
      }
    }
    scalar_from = vend * W;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t slot = MapId<kKind>(static_cast<int64_t>(ids[i]), i, p);
    if constexpr (kKind != Kind::kCountOnly) out[i] = static_cast<Id>(slot);
    count(slot, i);
  }

  if (use_shared) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < p.P; b += blockDim.x) {
      const int32_t c = hist[b];
      if (c != 0) AddGlobal(load + b, c);
    }
  }
}

int64_t MultiprocessorCount(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

Scalar ScalarOf(const at::Tensor& t) {
  return Scalar{t.data_ptr(), static_cast<int>(t.element_size())};
}

template <Kind kKind>
void Launch(const at::Tensor& ids, const at::Tensor* out, at::Tensor& load, Params p) {
  if (p.n == 0) return;
  const int width = ids.scalar_type() == at::kLong ? 2 : 4;
  p.vectorized = reinterpret_cast<uintptr_t>(ids.data_ptr()) % 16 == 0 &&
                 (out == nullptr || reinterpret_cast<uintptr_t>(out->data_ptr()) % 16 == 0);
  p.shared_hist = p.P <= kMaxSharedBins;
  // Enough blocks to cover every SM once, each thread then taking up to
  // kMaxVectorsPerThread vectors; beyond that, more blocks. Fewer, fuller blocks mean fewer
  // global atomics when the block histograms are flushed.
  const int64_t sms = MultiprocessorCount(ids.get_device());
  const int64_t vectors = (p.n + width - 1) / width;
  int64_t per_thread = (vectors + sms * kThreads - 1) / (sms * kThreads);
  per_thread = std::clamp<int64_t>(per_thread, 1, kMaxVectorsPerThread);
  p.per_block = per_thread * kThreads * width;
  const int64_t blocks = (p.n + p.per_block - 1) / p.per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "too many ids: ", p.n);
  const size_t smem = p.shared_hist ? static_cast<size_t>(p.P) * sizeof(int32_t) : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "eplb_map_record_ids", [&] {
    using Id = index_t;
    const Id* in = ids.data_ptr<Id>();
    Id* o = out != nullptr ? out->data_ptr<Id>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "eplb_map_record_load", [&] {
      MapRecordKernel<kKind, Id, index_t><<<static_cast<unsigned>(blocks), kThreads, smem,
                                            stream>>>(in, o, load.data_ptr<index_t>(), p);
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
                               const at::Tensor& logcnt, at::Tensor& load,
                               const at::Tensor& record,
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

void record_counts_cuda(at::Tensor& load, const at::Tensor& expert_tokens,
                        int64_t group_list_type, int64_t offset) {
  CheckRecordCounts(load, expert_tokens, group_list_type, offset);
  const int64_t n = expert_tokens.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(load.device());
  const auto counts = expert_tokens.contiguous();
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 1024));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "eplb_record_counts", [&] {
    RecordCountsKernel<index_t><<<blocks, 256, 0, stream>>>(
        load.data_ptr<index_t>() + offset, counts.data_ptr(), counts.scalar_type() == at::kLong,
        n, group_list_type == 0);
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
