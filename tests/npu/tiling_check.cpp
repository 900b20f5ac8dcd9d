// Invariants of the Ascend C kernels' host tiling (csrc/ops/ascendc/record_tiling.h), checked on
// the CPU over many sizes: every id / bin is owned by exactly one core (with the ranges the
// kernels in record_kernels.cpp derive from the tiling), inner core boundaries sit on 32-byte
// blocks of GM, tiles are whole 32-byte blocks, and the unified-buffer plan fits.
// Built and run by tests/npu/test_tiling.py; prints "<n> checks, <m> failed".
#include <cstdint>
#include <cstdio>

#include "ops/ascendc/record_tiling.h"

namespace {

int64_t g_checks = 0;
int64_t g_failed = 0;

void Check(bool ok, const char* what, int64_t a, int64_t b, int64_t c) {
  ++g_checks;
  if (!ok && g_failed++ < 20)
    std::printf("FAILED %s (%lld, %lld, %lld)\n", what, static_cast<long long>(a),
                static_cast<long long>(b), static_cast<long long>(c));
}

using eplb_ascend::TilingLimits;

void CheckMapRecord(int64_t n, int64_t idBytes, bool hasOut, int mode, int64_t E, int64_t M,
                    int64_t P, int64_t cores, const TilingLimits& lim) {
  const auto t = eplb_ascend::TileMapRecord(n, idBytes, hasOut, mode, E, M, P, cores, lim);
  Check(t.blockDim >= 1 && t.blockDim <= cores, "map: 1 <= blockDim <= cores", n, cores,
        t.blockDim);
  Check(t.idsPerCore % 8 == 0 && t.tileLen % 8 == 0, "map: 8-id slices and tiles", n, t.idsPerCore,
        t.tileLen);
  Check(t.binWindow % 8 == 0 && t.binWindow <= lim.maxBinWindow, "map: histogram window", P,
        t.binWindow, lim.maxBinWindow);
  // A shrunken UB only moves the table to GM; the fixed buffers fit the real plan.
  if (lim.ubBytes == eplb_ascend::kUbPlanBytes) {
    Check(t.ubUsed <= lim.ubBytes, "map: UB plan fits", n, t.ubUsed, lim.ubBytes);
  }
  // The ranges MapRecordKernel::Init derives; together they must be [0, n) exactly once.
  int64_t covered = 0;
  for (int64_t idx = 0; idx < t.blockDim; ++idx) {
    const int64_t begin = std::min(n, idx * t.idsPerCore);
    const int64_t end = idx == t.blockDim - 1 ? n : std::min(n, begin + t.idsPerCore);
    Check(begin == covered, "map: core ranges are contiguous", n, idx, begin);
    covered = std::max(covered, end);
  }
  Check(covered == n, "map: cores cover every id", n, covered, t.blockDim);
}

void CheckRecordCounts(int64_t n, int64_t elemBytes, uint64_t addr, int64_t cores,
                       const TilingLimits& lim) {
  const auto t = eplb_ascend::TileRecordCounts(n, elemBytes, addr, cores, lim);
  Check(t.blockDim >= 1 && t.blockDim <= cores, "counts: 1 <= blockDim <= cores", n, cores,
        t.blockDim);
  Check(t.tileLen * elemBytes % eplb_ascend::kUbBlockBytes == 0, "counts: whole-block tiles", n,
        t.tileLen, elemBytes);
  Check(eplb_ascend::UbBytes(t.tileLen + 1, 8) + eplb_ascend::UbBytes(t.tileLen, elemBytes) <=
            lim.ubBytes,
        "counts: UB plan fits", n, t.tileLen, lim.ubBytes);
  Check(t.head < eplb_ascend::kUbBlockBytes / elemBytes, "counts: head < one block", n, t.head,
        elemBytes);
  // The ranges RecordCountsKernel::Init derives.
  int64_t covered = 0;
  for (int64_t idx = 0; idx < t.blockDim; ++idx) {
    const int64_t begin = idx == 0 ? 0 : std::min(n, t.head + idx * t.binsPerCore);
    const int64_t end = idx == t.blockDim - 1 ? n : std::min(n, t.head + (idx + 1) * t.binsPerCore);
    Check(begin == covered, "counts: core ranges are contiguous", n, idx, begin);
    if (idx > 0 && begin < n) {
      Check((addr + begin * elemBytes) % eplb_ascend::kUbBlockBytes == 0,
            "counts: inner boundary on a 32-byte block", n, idx, static_cast<int64_t>(addr % 32));
    }
    covered = std::max(covered, end);
  }
  Check(covered == n, "counts: cores cover every bin", n, covered, t.blockDim);
}

}  // namespace

int main() {
  const int64_t sizes[] = {1, 2, 7, 8, 9, 31, 33, 100, 1023, 1024, 1025, 4096, 32768, 100003};
  const int64_t coreNums[] = {1, 2, 7, 24, 40, 48};
  const TilingLimits limits[] = {TilingLimits{}, TilingLimits{8, 8, 8, eplb_ascend::kUbPlanBytes},
                                 TilingLimits{16, 24, 64, 512}};
  for (const auto& lim : limits) {
    for (int64_t n : sizes) {
      for (int64_t cores : coreNums) {
        for (int64_t idBytes : {4, 8}) {
          for (int mode : {eplb_ascend::kModeIdentity, eplb_ascend::kModeSpread,
                           eplb_ascend::kModeRankLocal}) {
            for (int64_t P : {1, 17, 288, 20000}) {
              CheckMapRecord(n, idBytes, mode != eplb_ascend::kModeIdentity, mode, 256, 9, P, cores,
                             lim);
            }
          }
        }
        for (int64_t elemBytes : {4, 8}) {
          for (uint64_t misalign = 0; misalign < 32; misalign += elemBytes) {
            CheckRecordCounts(n, elemBytes, 4096 + misalign, cores, lim);
          }
        }
      }
    }
  }
  std::printf("%lld checks, %lld failed\n", static_cast<long long>(g_checks),
              static_cast<long long>(g_failed));
  return g_failed == 0 ? 0 : 1;
}
