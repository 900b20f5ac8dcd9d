// C++ microbenchmark of the planner core: CPU time of eplb::Plan per call (all layers), no
// Python, no peers. For profiling the C++ alone (perf record works on it); the comparison with
// the peers is benchmarks/bench_planner.py.
//
//   bash scripts/dev_build.sh
//   g++ -O3 -std=c++17 -Icsrc -o build/planner_micro benchmarks/planner_micro.cpp
//       build/dev/libeplb_planner.a -lpthread        (one command line)
//   taskset -c 1 build/planner_micro [reps [policy|all [shape|all [transfers]]]]
//
// Loads: per layer, expert e gets tokens * p_e with p a random permutation of Zipf(1.1)
// weights (zipf) or of exp(N(0, 1)) (lognormal), rounded to integer counts, 16384 tokens x top-8
// per window; windows drift as in eplb_native.traces.synth (latent scores, AR(1) step 0.05).
// Every call plans window t from the DeepSeek placement of window t - 1 (preserve_slots on, no
// transfer plan unless the fourth argument is `transfers`; bench_planner.py instead plans from each
// policy's own previous placement, so min_move's starting points differ); median and min over reps
// x 3 windows.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "planner/placement.h"

namespace {

double CpuSeconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// loads [W, L, E]: integer token counts (as doubles).
std::vector<double> Synth(int64_t windows, int64_t layers, int64_t experts, bool zipf,
                          uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const double draws = 16384.0 * 8.0, keep = std::sqrt(0.95), fresh = std::sqrt(0.05);
  std::vector<double> z(static_cast<size_t>(layers * experts));
  for (auto& x : z) x = normal(rng);
  std::vector<double> out;
  std::vector<int64_t> order(static_cast<size_t>(experts));
  std::vector<double> weight(static_cast<size_t>(experts));
  for (int64_t w = 0; w < windows; ++w) {
    if (w > 0)
      for (auto& x : z) x = keep * x + fresh * normal(rng);
    for (int64_t l = 0; l < layers; ++l) {
      const double* zl = z.data() + l * experts;
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return zl[a] > zl[b]; });
      double total = 0.0;
      for (int64_t r = 0; r < experts; ++r) {
        const int64_t e = order[static_cast<size_t>(r)];
        weight[static_cast<size_t>(e)] =
            zipf ? std::pow(static_cast<double>(r + 1), -1.1) : std::exp(zl[e]);
        total += weight[static_cast<size_t>(e)];
      }
      for (int64_t e = 0; e < experts; ++e)
        out.push_back(std::round(draws * weight[static_cast<size_t>(e)] / total));
    }
  }
  return out;
}

struct Case {
  const char* name;
  eplb::Shape shape;
};

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
  const Case cases[] = {
      {"DeepSeek-V3 hier", {58, 256, 288, 32, 4, 8}},
      {"DeepSeek-V3 global", {58, 256, 288, 32, 1, 1}},
      {"Qwen3-235B", {94, 128, 160, 32, 4, 1}},
      {"Kimi-K2-like", {61, 384, 512, 256, 32, 1}},
  };
  const char* policies[] = {"deepseek", "balanced", "min_move"};
  // Optional: one policy only, one shape only (by name; e.g. for perf record).
  const char* only = argc > 2 && std::string(argv[2]) != "all" ? argv[2] : nullptr;
  const bool transfers = argc > 4 && std::string(argv[4]) == "transfers";
  std::printf(
      "| shape | skew | policy | median ms | min ms | us per layer |\n|---|---|---|---|---|---|\n");
  for (const Case& c : cases) {
    if (argc > 3 && std::string(argv[3]) != "all" && std::string(argv[3]) != c.name) continue;
    for (const bool zipf : {true, false}) {
      const eplb::Shape& s = c.shape;
      const int64_t LE = s.num_layers * s.num_logical;
      const std::vector<double> loads = Synth(5, s.num_layers, s.num_logical, zipf, 0);
      // Current placements: DeepSeek's on windows 0..3.
      eplb::PlanOptions ds;
      ds.policy = eplb::Policy::kDeepSeek;
      ds.preserve_slots = false;
      std::vector<std::vector<int64_t>> start;
      for (int64_t t = 0; t < 4; ++t)
        start.push_back(eplb::Plan(loads.data() + t * LE, nullptr, s, ds).phy2log);
      for (int p = 0; p < 3; ++p) {
        if (only != nullptr && std::string(only) != policies[p]) continue;
        eplb::PlanOptions o;
        o.policy = static_cast<eplb::Policy>(p);
        o.transfers = transfers;
        std::vector<double> times;
        for (int r = 0; r < reps; ++r) {
          for (int64_t t = 1; t <= 3; ++t) {
            const double t0 = CpuSeconds();
            const eplb::PlanResult res =
                eplb::Plan(loads.data() + t * LE, start[static_cast<size_t>(t - 1)].data(), s, o);
            times.push_back(CpuSeconds() - t0);
          }
        }
        std::sort(times.begin(), times.end());
        const double med = times[times.size() / 2] * 1e3;
        std::printf("| %s | %s | %s | %.3f | %.3f | %.1f |\n", c.name, zipf ? "zipf" : "lognormal",
                    policies[p], med, times[0] * 1e3,
                    med * 1e3 / static_cast<double>(s.num_layers));
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
