// C++ unit tests of the planner core, runnable without Python (ctest, or under sanitizers with
// -DEPLB_NATIVE_SANITIZE=ON). Prints "N passed, N failed".
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "planner/placement.h"

namespace {

int g_passed = 0, g_failed = 0;

#define CHECK(cond)                                                  \
  do {                                                               \
    if (!(cond)) {                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s)\n", __FILE__, __LINE__, #cond); \
      throw std::runtime_error("check failed");                      \
    }                                                                \
  } while (0)

void Run(const char* name, const std::function<void()>& fn) {
  try {
    fn();
    ++g_passed;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED %s: %s\n", name, e.what());
    ++g_failed;
  }
}

// Invariants of any placement.
void CheckPlacement(const eplb::PlanResult& r) {
  const auto& s = r.shape;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    std::vector<int64_t> cnt(static_cast<size_t>(s.num_logical), 0);
    for (int64_t p = 0; p < s.num_physical; ++p) {
      const int64_t e = r.phy2log[static_cast<size_t>(l * s.num_physical + p)];
      CHECK(e >= 0 && e < s.num_logical);
      ++cnt[static_cast<size_t>(e)];
    }
    for (int64_t e = 0; e < s.num_logical; ++e) {
      const auto i = static_cast<size_t>(l * s.num_logical + e);
      CHECK(cnt[static_cast<size_t>(e)] >= 1);
      CHECK(r.logcnt[i] == cnt[static_cast<size_t>(e)]);
      for (int64_t j = 0; j < r.max_replicas; ++j) {
        const int64_t p = r.log2phy[i * static_cast<size_t>(r.max_replicas) + static_cast<size_t>(j)];
        if (j < r.logcnt[i]) {
          CHECK(p >= 0 && p < s.num_physical);
          CHECK(r.phy2log[static_cast<size_t>(l * s.num_physical + p)] == e);
        } else {
          CHECK(p == -1);
        }
      }
    }
    CHECK(r.max_load_after[static_cast<size_t>(l)] + 1e-9 >= r.lower_bound[static_cast<size_t>(l)]);
  }
}

}  // namespace

int main() {
  Run("random shapes keep the invariants", [] {
    std::mt19937_64 rng(7);
    for (int it = 0; it < 300; ++it) {
      eplb::Shape s;
      s.num_layers = 1 + static_cast<int64_t>(rng() % 3);
      s.num_nodes = 1 + static_cast<int64_t>(rng() % 2);
      s.num_ranks = s.num_nodes * (1 + static_cast<int64_t>(rng() % 4));
      s.num_groups = s.num_nodes * (1 + static_cast<int64_t>(rng() % 2));
      s.num_logical = s.num_groups * (1 + static_cast<int64_t>(rng() % 6));
      const int64_t spr = (s.num_logical + s.num_ranks - 1) / s.num_ranks + static_cast<int64_t>(rng() % 3);
      s.num_physical = spr * s.num_ranks;
      std::vector<double> load(static_cast<size_t>(s.num_layers * s.num_logical));
      std::lognormal_distribution<double> d(0.0, 1.0);
      for (auto& x : load) x = std::floor(100.0 * d(rng));
      for (int pol = 0; pol < 2; ++pol) {
        eplb::PlanOptions o;
        o.policy = static_cast<eplb::Policy>(pol);
        CheckPlacement(eplb::Plan(load.data(), nullptr, s, o));
      }
    }
  });
  Run("bad shapes throw invalid_argument", [] {
    eplb::Shape s;
    s.num_layers = 1;
    s.num_logical = 8;
    s.num_physical = 9;
    s.num_ranks = 2;
    std::vector<double> load(8, 1.0);
    bool threw = false;
    try {
      eplb::Plan(load.data(), nullptr, s, eplb::PlanOptions{});
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    CHECK(threw);
  });
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
