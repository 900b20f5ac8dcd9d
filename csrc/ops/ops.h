// Declarations of the device-op implementations, shared by registration.cpp and the backends.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace eplb_native {

// Replica choice of map_and_record (see python/eplb_native/ops.py for the contract).
enum class MapMode { kSpread, kRankLocal };
MapMode ParseMapMode(const std::string& mode);

at::Tensor map_and_record_cpu(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                              const at::Tensor& logcnt, at::Tensor& load,
                              const at::Tensor& record,
                              const std::optional<at::Tensor>& num_valid_tokens,
                              const std::string& mode);
void record_counts_cpu(at::Tensor& load, const at::Tensor& expert_tokens,
                       int64_t group_list_type, int64_t offset);
void record_topk_cpu(at::Tensor& load, const at::Tensor& topk_ids, const at::Tensor& record,
                     const std::optional<at::Tensor>& num_valid_tokens);

}  // namespace eplb_native
