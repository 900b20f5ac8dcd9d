// PLACEHOLDER until the min_move policy lands: takes the balanced placement.
#include <algorithm>

#include "planner/policies.h"

namespace eplb {

void MinMoveLayer(const double* /*load*/, const int64_t* /*old_phy2log*/,
                  const int64_t* balanced_phy2log, const Shape& shape, double /*target*/,
                  int64_t* phy2log) {
  std::copy(balanced_phy2log, balanced_phy2log + shape.num_physical, phy2log);
}

}  // namespace eplb
