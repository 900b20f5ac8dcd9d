// Declarations of the device-op implementations, shared by registration.cpp and the backends.
//
// Contract (the Python docstrings in python/eplb_native/ops.py say the same for users):
//   map_and_record: out[i] = physical slot of logical id topk_ids[i] (flat index i, token
//     t = i / k with k = topk_ids.size(-1), or k = 1 for a 1-D topk_ids).
//     mode "spread":     c = clamp(logcnt[e], 1, M); out[i] = log2phy[e, t % c]   (log2phy [E, M])
//     mode "rank_local": out[i] = log2phy[e]                                       (log2phy [E])
//     ids outside [0, E) give -1. When record != 0, load[out[i]] += 1 for every i whose token
//     t < num_valid_tokens and whose out[i] lies in [0, P), P = load.numel().
//   record_topk: the same counting with out[i] = topk_ids[i] (no remap).
//   record_counts: load[offset + j] += expert_tokens[j] (group_list_type 1), or the difference
//     of consecutive cumulative counts (group_list_type 0).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace eplb_native {

// Numbers in error messages go through std::to_string, never an ostream: the GPU host's gcc 13
// toolchain (/opt/gcc) links parts of libstdc++ into this library statically, and streaming an
// integer from here segfaults there (that copy of num_put's locale id is never initialised).
std::string Num(int64_t v);
std::string Num(const c10::SymInt& v);

// Replica choice of map_and_record.
enum class MapMode { kSpread, kRankLocal };
MapMode ParseMapMode(const std::string& mode);

// Shape / dtype / device checks shared by every backend, Meta included (raise ValueError /
// TypeError through TORCH_CHECK_VALUE / TORCH_CHECK_TYPE, naming the argument). They read
// metadata only and work on symbolic shapes.
MapMode CheckMapAndRecord(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                          const at::Tensor& logcnt, const at::Tensor& load,
                          const at::Tensor& record,
                          const std::optional<at::Tensor>& num_valid_tokens,
                          const std::string& mode);
void CheckRecordTopk(const at::Tensor& load, const at::Tensor& topk_ids, const at::Tensor& record,
                     const std::optional<at::Tensor>& num_valid_tokens);
void CheckRecordCounts(const at::Tensor& load, const at::Tensor& expert_tokens,
                       int64_t group_list_type, int64_t offset);

// Concrete sizes the kernels need (after the checks; not for symbolic shapes).
struct MapShape {
  MapMode mode;
  int64_t k;     // ids per token
  int64_t E;     // logical experts (log2phy.size(0))
  int64_t cols;  // replica columns M of log2phy (1 in rank_local mode)
};
MapShape MapShapeOf(const at::Tensor& topk_ids, const at::Tensor& log2phy, MapMode mode);
int64_t IdsPerToken(const at::Tensor& topk_ids);  // k = topk_ids.size(-1), 1 for 1-D ids

at::Tensor map_and_record_cpu(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                              const at::Tensor& logcnt, at::Tensor& load, const at::Tensor& record,
                              const std::optional<at::Tensor>& num_valid_tokens,
                              const std::string& mode);
void record_counts_cpu(at::Tensor& load, const at::Tensor& expert_tokens, int64_t group_list_type,
                       int64_t offset);
void record_topk_cpu(at::Tensor& load, const at::Tensor& topk_ids, const at::Tensor& record,
                     const std::optional<at::Tensor>& num_valid_tokens);

}  // namespace eplb_native
