// Each expert's slots as a doubly linked list over slot ids, for the local searches (internal to
// csrc/planner). Header-only.
#pragma once

#include <cstdint>
#include <vector>

namespace eplb {
namespace detail {

// head / tail [experts] and next / prev [slots], -1 ends a list: four allocations for all the
// lists instead of a vector per expert. The order of a list is what a vector per expert would
// hold: Append at the end, Unlink anywhere, Relink puts a slot in another's place.
struct SlotLists {
  std::vector<int64_t> head, tail, next, prev;

  void Reset(int64_t experts, int64_t slots) {
    head.assign(static_cast<size_t>(experts), -1);
    tail.assign(static_cast<size_t>(experts), -1);
    next.assign(static_cast<size_t>(slots), -1);
    prev.assign(static_cast<size_t>(slots), -1);
  }
  void Append(int64_t e, int64_t s) {
    const auto es = static_cast<size_t>(e), ss = static_cast<size_t>(s);
    prev[ss] = tail[es];
    next[ss] = -1;
    if (tail[es] >= 0) {
      next[static_cast<size_t>(tail[es])] = s;
    } else {
      head[es] = s;
    }
    tail[es] = s;
  }
  void Unlink(int64_t e, int64_t s) {
    const auto es = static_cast<size_t>(e);
    const int64_t p = prev[static_cast<size_t>(s)], q = next[static_cast<size_t>(s)];
    if (p >= 0) {
      next[static_cast<size_t>(p)] = q;
    } else {
      head[es] = q;
    }
    if (q >= 0) {
      prev[static_cast<size_t>(q)] = p;
    } else {
      tail[es] = p;
    }
  }
  // Slot `to` takes the place in e's list of the slot whose links were (p, q).
  void Relink(int64_t e, int64_t to, int64_t p, int64_t q) {
    const auto es = static_cast<size_t>(e);
    prev[static_cast<size_t>(to)] = p;
    next[static_cast<size_t>(to)] = q;
    if (p >= 0) {
      next[static_cast<size_t>(p)] = to;
    } else {
      head[es] = to;
    }
    if (q >= 0) {
      prev[static_cast<size_t>(q)] = to;
    } else {
      tail[es] = to;
    }
  }
};

}  // namespace detail
}  // namespace eplb
