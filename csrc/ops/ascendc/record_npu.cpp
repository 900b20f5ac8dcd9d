// NPU (torch_npu, dispatch key PrivateUse1) implementations of the recording ops: argument
// checks, tiling (record_tiling.h) and launches of the Ascend C kernels (record_kernels.cpp) on
// the current NPU stream. Same schemas and results as the CPU ops (csrc/ops/cpu/map_record.cpp),
// except log2phy entries outside int32 (no slot id is: P < 2^31), which the int32 table truncates.
// Built only when cmake/EplbAscend.cmake finds CANN and torch_npu (EPLB_WITH_ASCEND).
//
// Nothing here reads a device value on the host: `record` and `num_valid_tokens` stay on the NPU
// and are read by the kernels, so the ops never synchronise the stream.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "aclrtlaunch_eplb_map_record_i32.h"
#include "aclrtlaunch_eplb_map_record_i64.h"
#include "aclrtlaunch_eplb_record_counts_i32.h"
#include "aclrtlaunch_eplb_record_counts_i64.h"
#include "ops/ascendc/record_tiling.h"
#include "ops/ops.h"
#include "tiling/platform/platform_ascendc.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"

namespace eplb_native {
namespace {

int64_t AivCoreNum() {
  // Vector cores of the current device (Ascend910B1: 48); the kernels are AIV-only.
  const int64_t n = platform_ascendc::PlatformAscendCManager::GetInstance()->GetCoreNumAiv();
  TORCH_CHECK(n > 0, "eplb_native: the Ascend platform reported no AI vector cores");
  return n;
}

aclrtStream CurrentStream() {
  // true: drain torch_npu's task queue first, so the raw launch is ordered after the ops that
  // were queued before it on this stream.
  return c10_npu::getCurrentNPUStream().stream(true);
}

void CheckLaunch(uint32_t status, const char* kernel) {
  TORCH_CHECK(status == 0, "eplb_native: launching the Ascend C kernel ", kernel,
              " failed with status ", status);
}

// Where the kernels add their int32 counts: `load` itself when it is int32, otherwise a zeroed
// int32 buffer that is added into `load` afterwards (the AI core's DMA atomic add has no int64
// form). load is 1-D and contiguous (CheckLoad in registration.cpp).
struct CountTarget {
  at::Tensor bins;
  bool scratch = false;
};

CountTarget MakeCountTarget(at::Tensor& load) {
  if (load.scalar_type() == at::kInt) return {load, false};
  return {at::zeros({load.numel()}, load.options().dtype(at::kInt)), true};
}

void FinishCountTarget(at::Tensor& load, const CountTarget& target) {
  if (target.scratch) load.add_(target.bins);
}

// Launches map_record over flat ids. `out` undefined: count only (record_topk).
void LaunchMapRecord(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& logcnt,
                     const at::Tensor& out, at::Tensor& load, const at::Tensor& record,
                     const std::optional<at::Tensor>& num_valid_tokens, int mode, int64_t k,
                     int64_t num_experts, int64_t cols) {
  const int64_t n = ids.numel();
  if (n == 0) return;
  const int64_t num_bins = load.numel();
  CountTarget target = MakeCountTarget(load);
  // Device scalars in the kernels' dtypes; .to() on the NPU, never .item().
  // (compared with 0 first: an int64 flag of 2^32 is "on", its low 32 bits are not)
  at::Tensor record_i32 = record.ne(0).to(at::kInt).reshape({1}).contiguous();
  at::Tensor num_valid_i64;
  if (num_valid_tokens.has_value()) {
    num_valid_i64 = num_valid_tokens->to(at::kLong).reshape({1}).contiguous();
  }
  const eplb_ascend::MapRecordTiling t = eplb_ascend::TileMapRecord(
      n, ids.element_size(), out.defined(), mode, num_experts, cols, num_bins, AivCoreNum());
  void* out_ptr = out.defined() ? out.data_ptr() : nullptr;
  void* nv_ptr = num_valid_i64.defined() ? num_valid_i64.data_ptr() : nullptr;
  void* table_ptr = table.defined() ? table.data_ptr() : nullptr;
  void* logcnt_ptr = logcnt.defined() ? logcnt.data_ptr() : nullptr;
  aclrtStream stream = CurrentStream();
  const uint32_t block_dim = static_cast<uint32_t>(t.blockDim);
  if (ids.scalar_type() == at::kInt) {
    CheckLaunch(ACLRT_LAUNCH_KERNEL(eplb_map_record_i32)(
                    block_dim, stream, ids.data_ptr(), table_ptr, logcnt_ptr, out_ptr,
                    target.bins.data_ptr(), record_i32.data_ptr(), nv_ptr, n, k, num_experts, cols,
                    num_bins, static_cast<int64_t>(mode), t.idsPerCore, t.tileLen, t.binWindow,
                    t.tableInUb),
                "eplb_map_record_i32");
  } else {
    CheckLaunch(ACLRT_LAUNCH_KERNEL(eplb_map_record_i64)(
                    block_dim, stream, ids.data_ptr(), table_ptr, logcnt_ptr, out_ptr,
                    target.bins.data_ptr(), record_i32.data_ptr(), nv_ptr, n, k, num_experts, cols,
                    num_bins, static_cast<int64_t>(mode), t.idsPerCore, t.tileLen, t.binWindow,
                    t.tableInUb),
                "eplb_map_record_i64");
  }
  FinishCountTarget(load, target);
}

at::Tensor map_and_record_npu(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                              const at::Tensor& logcnt, at::Tensor& load, const at::Tensor& record,
                              const std::optional<at::Tensor>& num_valid_tokens,
                              const std::string& mode_str) {
  const MapMode mode =
      CheckMapAndRecord(topk_ids, log2phy, logcnt, load, record, num_valid_tokens, mode_str);
  const MapShape shape = MapShapeOf(topk_ids, log2phy, mode);
  c10::OptionalDeviceGuard guard(load.device());
  at::Tensor ids = topk_ids.contiguous();
  // Slot ids fit in int32 (P < 2^31); int32 halves the table's UB footprint.
  at::Tensor table = log2phy.to(at::kInt).contiguous();
  // clamped to [1, M] before the cast, as every backend clamps (an int64 count of 2^32 is M,
  // not its low 32 bits)
  at::Tensor cnt = mode == MapMode::kSpread
                       ? logcnt.clamp(int64_t{1}, shape.cols).to(at::kInt).contiguous()
                       : at::Tensor();
  at::Tensor out = at::empty_like(ids);
  const int kernel_mode =
      mode == MapMode::kSpread ? eplb_ascend::kModeSpread : eplb_ascend::kModeRankLocal;
  LaunchMapRecord(ids, table, cnt, out, load, record, num_valid_tokens, kernel_mode, shape.k,
                  shape.E, shape.cols);
  return out;
}

void record_topk_npu(at::Tensor& load, const at::Tensor& topk_ids, const at::Tensor& record,
                     const std::optional<at::Tensor>& num_valid_tokens) {
  CheckRecordTopk(load, topk_ids, record, num_valid_tokens);
  c10::OptionalDeviceGuard guard(load.device());
  at::Tensor ids = topk_ids.contiguous();
  LaunchMapRecord(ids, at::Tensor(), at::Tensor(), at::Tensor(), load, record, num_valid_tokens,
                  eplb_ascend::kModeIdentity, IdsPerToken(ids), 0, 1);
}

void record_counts_npu(at::Tensor& load, const at::Tensor& expert_tokens, int64_t group_list_type,
                       int64_t offset) {
  CheckRecordCounts(load, expert_tokens, group_list_type, offset);
  const int64_t n = expert_tokens.numel();
  if (n == 0) return;
  c10::OptionalDeviceGuard guard(load.device());
  at::Tensor counts = expert_tokens.to(at::kLong).contiguous();
  uint8_t* load_at = static_cast<uint8_t*>(load.data_ptr()) + offset * load.element_size();
  const eplb_ascend::RecordCountsTiling t = eplb_ascend::TileRecordCounts(
      n, load.element_size(), reinterpret_cast<uint64_t>(load_at), AivCoreNum());
  aclrtStream stream = CurrentStream();
  const uint32_t block_dim = static_cast<uint32_t>(t.blockDim);
  const int64_t cumulative = group_list_type == 0 ? 1 : 0;
  if (load.scalar_type() == at::kInt) {
    CheckLaunch(ACLRT_LAUNCH_KERNEL(eplb_record_counts_i32)(block_dim, stream, load_at,
                                                            counts.data_ptr(), n, cumulative,
                                                            t.head, t.binsPerCore, t.tileLen),
                "eplb_record_counts_i32");
  } else {
    CheckLaunch(ACLRT_LAUNCH_KERNEL(eplb_record_counts_i64)(block_dim, stream, load_at,
                                                            counts.data_ptr(), n, cumulative,
                                                            t.head, t.binsPerCore, t.tileLen),
                "eplb_record_counts_i64");
  }
}

}  // namespace
}  // namespace eplb_native

TORCH_LIBRARY_IMPL(eplb_native, PrivateUse1, m) {
  m.impl("map_and_record", &eplb_native::map_and_record_npu);
  m.impl("record_counts", &eplb_native::record_counts_npu);
  m.impl("record_topk", &eplb_native::record_topk_npu);
}
