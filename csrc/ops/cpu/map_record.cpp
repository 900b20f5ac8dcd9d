// CPU kernels of map_and_record / record_topk / record_counts. Correct first: one pass over the
// ids. (Per-thread histograms for large inputs are the ops issue's work.)
#include <ATen/ATen.h>

#include "ops/ops.h"

namespace eplb_native {
namespace {

template <typename Id, typename Load>
void MapRecord(const Id* ids, int64_t n, int64_t k, const int64_t* table, int64_t table_cols,
               const int64_t* cnt, MapMode mode, int64_t E, Id* out, Load* load, int64_t P,
               bool record, int64_t valid) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    int64_t phy = -1;
    if (e >= 0 && e < E) {
      if (mode == MapMode::kRankLocal) {
        phy = table[e];
      } else {
        const int64_t c = cnt[e];
        phy = table[e * table_cols + ((i / k) % c)];
      }
    }
    if (out) out[i] = static_cast<Id>(phy);
    if (record && phy >= 0 && phy < P && i / k < valid) load[phy] += 1;
  }
}

}  // namespace

at::Tensor map_and_record_cpu(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                              const at::Tensor& logcnt, at::Tensor& load,
                              const at::Tensor& record,
                              const std::optional<at::Tensor>& num_valid_tokens,
                              const std::string& mode_str) {
  const MapMode mode = ParseMapMode(mode_str);
  auto ids = topk_ids.contiguous();
  auto table = log2phy.to(at::kLong).contiguous();
  auto cnt = logcnt.to(at::kLong).contiguous();
  auto out = at::empty_like(ids);
  const int64_t k = ids.dim() >= 2 ? ids.size(-1) : 1;
  const int64_t E = table.size(0);
  const int64_t cols = table.dim() == 2 ? table.size(1) : 1;
  const bool rec = record.item<bool>();
  const int64_t valid =
      num_valid_tokens.has_value() ? num_valid_tokens->item<int64_t>() : INT64_MAX;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "map_and_record_ids", [&] {
    using Id = index_t;
    AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "map_and_record_load", [&] {
      MapRecord<Id, index_t>(ids.data_ptr<Id>(), ids.numel(), k, table.data_ptr<int64_t>(), cols,
                             cnt.data_ptr<int64_t>(), mode, E, out.data_ptr<Id>(),
                             load.data_ptr<index_t>(), load.numel(), rec, valid);
    });
  });
  return out;
}

void record_topk_cpu(at::Tensor& load, const at::Tensor& topk_ids, const at::Tensor& record,
                     const std::optional<at::Tensor>& num_valid_tokens) {
  auto ids = topk_ids.contiguous();
  const int64_t k = ids.dim() >= 2 ? ids.size(-1) : 1;
  const bool rec = record.item<bool>();
  if (!rec) return;
  const int64_t valid =
      num_valid_tokens.has_value() ? num_valid_tokens->item<int64_t>() : INT64_MAX;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "record_topk_ids", [&] {
    using Id = index_t;
    const Id* p = ids.data_ptr<Id>();
    AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "record_topk_load", [&] {
      index_t* l = load.data_ptr<index_t>();
      const int64_t P = load.numel();
      for (int64_t i = 0; i < ids.numel(); ++i) {
        const auto e = static_cast<int64_t>(p[i]);
        if (e >= 0 && e < P && i / k < valid) l[e] += 1;
      }
    });
  });
}

void record_counts_cpu(at::Tensor& load, const at::Tensor& expert_tokens, int64_t group_list_type,
                       int64_t offset) {
  TORCH_CHECK_VALUE(group_list_type == 0 || group_list_type == 1,
                    "group_list_type must be 0 (cumulative) or 1 (counts), got ", group_list_type);
  auto counts = expert_tokens.to(at::kLong).contiguous();
  const int64_t n = counts.numel();
  TORCH_CHECK_VALUE(offset >= 0 && offset + n <= load.numel(), "offset + len(expert_tokens) (",
                    offset + n, ") must be <= len(load) (", load.numel(), ")");
  const int64_t* c = counts.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(load.scalar_type(), "record_counts", [&] {
    index_t* l = load.data_ptr<index_t>() + offset;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = group_list_type == 1 ? c[i] : c[i] - (i ? c[i - 1] : 0);
      l[i] += static_cast<index_t>(v);
    }
  });
}

}  // namespace eplb_native
