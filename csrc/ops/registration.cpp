// Every eplb_native op schema, declared once. CPU and Meta implementations are registered
// here; CUDA (csrc/ops/cuda) and Ascend (csrc/ops/ascendc) register theirs beside their kernels.
#include <torch/library.h>

#include "ops/ops.h"

namespace eplb_native {

MapMode ParseMapMode(const std::string& mode) {
  if (mode == "spread") return MapMode::kSpread;
  if (mode == "rank_local") return MapMode::kRankLocal;
  TORCH_CHECK_VALUE(false, "mode must be 'spread' or 'rank_local', got '", mode, "'");
}

namespace {

at::Tensor map_and_record_meta(const at::Tensor& topk_ids, const at::Tensor&, const at::Tensor&,
                               at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                               const std::string&) {
  return at::empty_like(topk_ids);
}
void record_counts_meta(at::Tensor&, const at::Tensor&, int64_t, int64_t) {}
void record_topk_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const std::optional<at::Tensor>&) {}

}  // namespace
}  // namespace eplb_native

TORCH_LIBRARY(eplb_native, m) {
  m.def(
      "map_and_record(Tensor topk_ids, Tensor log2phy, Tensor logcnt, Tensor(a!) load, "
      "Tensor record, Tensor? num_valid_tokens=None, str mode=\"spread\") -> Tensor");
  m.def(
      "record_counts(Tensor(a!) load, Tensor expert_tokens, int group_list_type=1, "
      "int offset=0) -> ()");
  m.def(
      "record_topk(Tensor(a!) load, Tensor topk_ids, Tensor record, "
      "Tensor? num_valid_tokens=None) -> ()");
}

TORCH_LIBRARY_IMPL(eplb_native, CPU, m) {
  m.impl("map_and_record", &eplb_native::map_and_record_cpu);
  m.impl("record_counts", &eplb_native::record_counts_cpu);
  m.impl("record_topk", &eplb_native::record_topk_cpu);
}

TORCH_LIBRARY_IMPL(eplb_native, Meta, m) {
  m.impl("map_and_record", &eplb_native::map_and_record_meta);
  m.impl("record_counts", &eplb_native::record_counts_meta);
  m.impl("record_topk", &eplb_native::record_topk_meta);
}
