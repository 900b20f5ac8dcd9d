// PLACEHOLDER until the balanced policy lands: same as DeepSeek.
#include <vector>

#include "planner/policies.h"

namespace eplb {

void BalancedLayer(const double* load, const Shape& shape, int64_t* phy2log) {
  std::vector<int64_t> phyrank(static_cast<size_t>(shape.num_physical));
  DeepSeekLayer(load, shape, phy2log, phyrank.data());
}

}  // namespace eplb
