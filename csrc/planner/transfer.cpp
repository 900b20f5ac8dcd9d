// PLACEHOLDER until the transfer planner lands: one batch, first holder sends.
#include "planner/placement.h"

namespace eplb {

void PlanTransfers(int64_t layer, const int64_t* old_phy2log, const int64_t* new_phy2log,
                   const Shape& shape, std::vector<Transfer>* out) {
  const int64_t S = shape.slots_per_rank();
  for (int64_t p = 0; p < shape.num_physical; ++p) {
    if (old_phy2log[p] == new_phy2log[p]) continue;
    const int64_t dst_rank = p / S;
    int64_t src = -1;
    for (int64_t q = dst_rank * S; q < (dst_rank + 1) * S && src < 0; ++q)
      if (old_phy2log[q] == new_phy2log[p]) src = q;
    for (int64_t q = 0; q < shape.num_physical && src < 0; ++q)
      if (old_phy2log[q] == new_phy2log[p]) src = q;
    Transfer t;
    t.layer = layer;
    t.logical = new_phy2log[p];
    t.src_slot = src;
    t.src_rank = src / S;
    t.dst_rank = dst_rank;
    t.dst_slot = p;
    t.local = t.src_rank == dst_rank;
    out->push_back(t);
  }
}

}  // namespace eplb
