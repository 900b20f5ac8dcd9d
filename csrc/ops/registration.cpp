// Every eplb_native op schema, declared once, and the argument checks every backend shares.
// CPU and Meta implementations are registered here; CUDA (csrc/ops/cuda) and Ascend
// (csrc/ops/ascendc) register theirs beside their kernels. The composite fallback for devices
// without a native kernel is registered from python/eplb_native/ops.py.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/ops.h"

namespace eplb_native {

std::string Num(int64_t v) { return std::to_string(v); }
std::string Num(const c10::SymInt& v) {
  const auto concrete = v.maybe_as_int();
  return concrete.has_value() ? std::to_string(*concrete) : std::string("a symbolic size");
}

MapMode ParseMapMode(const std::string& mode) {
  if (mode == "spread") return MapMode::kSpread;
  if (mode == "rank_local") return MapMode::kRankLocal;
  TORCH_CHECK_VALUE(false, "mode must be 'spread' or 'rank_local', got '", mode, "'");
}

namespace {

bool IsIndexType(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

void CheckIndexType(const at::Tensor& t, const char* name) {
  // (an undefined tensor is a None passed where the op needs a tensor)
  TORCH_CHECK_TYPE(t.defined(), name, " is required (an int32 or int64 tensor), got None");
  TORCH_CHECK_TYPE(IsIndexType(t), name, " must be int32 or int64, got ", t.scalar_type());
}

void CheckSameDevice(const at::Tensor& t, const at::Tensor& ref, const char* name,
                     const char* ref_name = "topk_ids") {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref.device().str(),
                    " (the device of ", ref_name, "), got ", t.device().str());
}

void CheckLoad(const at::Tensor& load) {
  CheckIndexType(load, "load");
  TORCH_CHECK_VALUE(load.dim() == 1, "load must be 1-D [P], got ", Num(load.dim()), " dims");
  TORCH_CHECK_VALUE(load.is_contiguous(), "load must be contiguous (it is updated in place)");
}

// record: one bool or integer element, read on the device (no host sync).
void CheckRecordFlag(const at::Tensor& record, const at::Tensor& ids) {
  TORCH_CHECK_TYPE(record.defined(),
                   "record is required (a 0-dim bool or integer tensor), got None");
  TORCH_CHECK_TYPE(record.scalar_type() == at::kBool || at::isIntegralType(record.scalar_type(),
                                                                           /*includeBool=*/true),
                   "record must be a bool or integer tensor, got ", record.scalar_type());
  TORCH_CHECK_VALUE(record.sym_numel() == 1, "record must hold one element (a 0-dim tensor), got ",
                    Num(record.sym_numel()));
  CheckSameDevice(record, ids, "record");
}

void CheckNumValid(const std::optional<at::Tensor>& num_valid_tokens, const at::Tensor& ids) {
  if (!num_valid_tokens.has_value()) return;
  CheckIndexType(*num_valid_tokens, "num_valid_tokens");
  TORCH_CHECK_VALUE(num_valid_tokens->sym_numel() == 1,
                    "num_valid_tokens must hold one element (a 0-dim tensor), got ",
                    Num(num_valid_tokens->sym_numel()));
  CheckSameDevice(*num_valid_tokens, ids, "num_valid_tokens");
}

}  // namespace

MapMode CheckMapAndRecord(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                          const at::Tensor& logcnt, const at::Tensor& load,
                          const at::Tensor& record,
                          const std::optional<at::Tensor>& num_valid_tokens,
                          const std::string& mode_str) {
  const MapMode mode = ParseMapMode(mode_str);
  CheckIndexType(topk_ids, "topk_ids");
  CheckIndexType(log2phy, "log2phy");
  CheckLoad(load);
  CheckSameDevice(log2phy, topk_ids, "log2phy");
  CheckSameDevice(load, topk_ids, "load");
  CheckRecordFlag(record, topk_ids);
  CheckNumValid(num_valid_tokens, topk_ids);
  if (mode == MapMode::kSpread) {
    TORCH_CHECK_VALUE(log2phy.dim() == 2, "log2phy must be 2-D [E, M] in mode 'spread', got ",
                      Num(log2phy.dim()), " dims");
    TORCH_CHECK_VALUE(log2phy.sym_size(1) >= 1, "log2phy must have >= 1 replica column");
    CheckIndexType(logcnt, "logcnt");
    CheckSameDevice(logcnt, topk_ids, "logcnt");
    TORCH_CHECK_VALUE(
        logcnt.dim() == 1 && logcnt.sym_size(0) == log2phy.sym_size(0),
        "logcnt must be 1-D [E] with E = log2phy.size(0) = ", Num(log2phy.sym_size(0)), ", got ",
        Num(logcnt.dim()), " dims of ", Num(logcnt.sym_numel()), " elements");
  } else {
    TORCH_CHECK_VALUE(log2phy.dim() == 1, "log2phy must be 1-D [E] in mode 'rank_local', got ",
                      Num(log2phy.dim()), " dims");
    // unused here (None, an undefined tensor, is fine), but a tensor takes part in picking the
    // kernel: one on another device (meta above all) would run that device's kernel on these
    if (logcnt.defined()) CheckSameDevice(logcnt, topk_ids, "logcnt");
  }
  return mode;
}

MapShape MapShapeOf(const at::Tensor& topk_ids, const at::Tensor& log2phy, MapMode mode) {
  return MapShape{mode, IdsPerToken(topk_ids), log2phy.size(0),
                  mode == MapMode::kSpread ? log2phy.size(1) : 1};
}

int64_t IdsPerToken(const at::Tensor& topk_ids) {
  // [T, 0] ids hold no element; k = 1 keeps the token index well defined.
  return topk_ids.dim() >= 2 ? std::max<int64_t>(topk_ids.size(-1), 1) : 1;
}

void CheckRecordTopk(const at::Tensor& load, const at::Tensor& topk_ids, const at::Tensor& record,
                     const std::optional<at::Tensor>& num_valid_tokens) {
  CheckIndexType(topk_ids, "topk_ids");
  CheckLoad(load);
  CheckSameDevice(load, topk_ids, "load");
  CheckRecordFlag(record, topk_ids);
  CheckNumValid(num_valid_tokens, topk_ids);
}

void CheckRecordCounts(const at::Tensor& load, const at::Tensor& expert_tokens,
                       int64_t group_list_type, int64_t offset) {
  CheckLoad(load);
  CheckIndexType(expert_tokens, "expert_tokens");
  CheckSameDevice(expert_tokens, load, "expert_tokens", "load");
  TORCH_CHECK_VALUE(expert_tokens.dim() == 1, "expert_tokens must be 1-D [n], got ",
                    Num(expert_tokens.dim()), " dims");
  TORCH_CHECK_VALUE(group_list_type == 0 || group_list_type == 1,
                    "group_list_type must be 0 (cumulative) or 1 (counts), got ",
                    Num(group_list_type));
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", Num(offset));
  // Counts read from the counters being added to would read some already updated (review 18:
  // load[:4] added into load[1:] summed runs). Where the layouts are too hard to tell, memory
  // of one storage at all counts as shared. (Not with symbolic sizes, torch.compile's meta
  // pass, which cannot tell: the kernel that runs checks.)
  if (!load.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
      !expert_tokens.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    const auto overlap = at::get_overlap_status(load, expert_tokens);
    TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full &&
                          overlap != at::MemOverlapStatus::Partial &&
                          !(overlap == at::MemOverlapStatus::TooHard &&
                            load.storage().is_alias_of(expert_tokens.storage())),
                      "expert_tokens must not share memory with load (pass a copy)");
  }
  // (offset <= len(load) - n: offset + n would wrap for an offset near 2^63)
  TORCH_CHECK_VALUE(load.sym_numel() - expert_tokens.sym_numel() >= offset, "offset (", Num(offset),
                    ") + len(expert_tokens) (", Num(expert_tokens.sym_numel()),
                    ") must be <= len(load) (", Num(load.sym_numel()), ")");
}

namespace {

// Meta kernels: the same checks, then the output's shape; they run under torch.compile.
at::Tensor map_and_record_meta(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                               const at::Tensor& logcnt, at::Tensor& load, const at::Tensor& record,
                               const std::optional<at::Tensor>& num_valid_tokens,
                               const std::string& mode) {
  CheckMapAndRecord(topk_ids, log2phy, logcnt, load, record, num_valid_tokens, mode);
  return at::empty_like(topk_ids, at::MemoryFormat::Contiguous);
}
void record_counts_meta(at::Tensor& load, const at::Tensor& expert_tokens, int64_t group_list_type,
                        int64_t offset) {
  CheckRecordCounts(load, expert_tokens, group_list_type, offset);
}
void record_topk_meta(at::Tensor& load, const at::Tensor& topk_ids, const at::Tensor& record,
                      const std::optional<at::Tensor>& num_valid_tokens) {
  CheckRecordTopk(load, topk_ids, record, num_valid_tokens);
}

}  // namespace
}  // namespace eplb_native

TORCH_LIBRARY(eplb_native, m) {
  // The last argument is `map_mode`, not `mode`: torch.compile's auto_functionalize passes a
  // keyword named `mode` of its own, which collides (TypeError: multiple values for 'mode').
  // The Python wrapper eplb_native.ops.map_and_record still calls it `mode`.
  m.def(
      "map_and_record(Tensor topk_ids, Tensor log2phy, Tensor logcnt, Tensor(a!) load, "
      "Tensor record, Tensor? num_valid_tokens=None, str map_mode=\"spread\") -> Tensor");
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

// The ops take integer tensors only, so autograd has nothing to do: a fallthrough skips the
// autograd-not-implemented fallback on every call (about a microsecond of host time).
TORCH_LIBRARY_IMPL(eplb_native, Autograd, m) {
  m.impl("map_and_record", torch::CppFunction::makeFallthrough());
  m.impl("record_counts", torch::CppFunction::makeFallthrough());
  m.impl("record_topk", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(eplb_native, Meta, m) {
  m.impl("map_and_record", &eplb_native::map_and_record_meta);
  m.impl("record_counts", &eplb_native::record_counts_meta);
  m.impl("record_topk", &eplb_native::record_topk_meta);
}
