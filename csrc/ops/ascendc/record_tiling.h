// Host-side tiling of the Ascend C recording kernels (record_kernels.cpp): how the work is split
// over AI vector cores and how each core's unified buffer (UB) is laid out. Plain C++ (no CANN,
// no torch), so the same numbers are used by the launcher (record_npu.cpp) and can be checked
// anywhere.
#pragma once

#include <algorithm>
#include <cstdint>

#include "record_modes.h"

namespace eplb_ascend {

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t AlignUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }
inline int64_t UbBytes(int64_t elems, int64_t elemBytes) {
  return AlignUp(elems * elemBytes, kUbBlockBytes);
}

// Knobs of the tiling. The defaults are what the launcher uses; the tests shrink them to force
// many cores, many tiles, several histogram windows and the table-in-GM path on small inputs.
struct TilingLimits {
  int64_t minPerCore = 1024;     // fewer elements than this per core cost more to launch than run
  int64_t maxTileLen = 2048;     // elements per GM -> UB tile
  int64_t maxBinWindow = 16384;  // int32 bins of the per-core UB histogram (64 KiB)
  int64_t ubBytes = kUbPlanBytes;
};

// record_counts: n bins, each core owns [begin, end) with
//   begin(0) = 0, begin(c) = head + c * binsPerCore, the last core ending at n.
// `head` makes every inner boundary 32-byte aligned in GM (loadAddr = address of load[offset]),
// so neighbouring cores never write into the same 32-byte block.
struct RecordCountsTiling {
  int64_t blockDim = 0;
  int64_t head = 0;
  int64_t binsPerCore = 0;
  int64_t tileLen = 0;
};

inline RecordCountsTiling TileRecordCounts(int64_t n, int64_t loadElemBytes, uint64_t loadAddr,
                                           int64_t coreNum, const TilingLimits& lim = {}) {
  RecordCountsTiling t;
  if (n <= 0) return t;
  const int64_t perBlock = kUbBlockBytes / loadElemBytes;
  t.head = static_cast<int64_t>((kUbBlockBytes - loadAddr % kUbBlockBytes) % kUbBlockBytes) /
           loadElemBytes;
  const int64_t rest = std::max<int64_t>(n - t.head, 1);
  const int64_t cores =
      std::clamp<int64_t>(CeilDiv(n, lim.minPerCore), 1, std::max<int64_t>(coreNum, 1));
  t.binsPerCore = AlignUp(CeilDiv(rest, cores), perBlock);
  t.blockDim = std::max<int64_t>(CeilDiv(rest, t.binsPerCore), 1);
  // UB: (tileLen + 1) int64 counts (the cumulative form needs the count before the tile) and
  // tileLen load elements.
  const int64_t fit = (lim.ubBytes - 2 * kUbBlockBytes - 8) / (8 + loadElemBytes);
  const int64_t longest = t.head + t.binsPerCore;  // core 0 has the head on top of its share
  t.tileLen =
      std::max<int64_t>(std::min({fit, lim.maxTileLen, longest}) / perBlock * perBlock, perBlock);
  return t;
}

// map_and_record / record_topk: n flat ids, core c owns [c * idsPerCore, ...) (the last core
// the tail); idsPerCore is a multiple of 8 so every core's slice of `out` starts on a 32-byte
// block for int32 and int64 ids. UB per core: two 32-byte scalars (record, num_valid_tokens),
// the ids tile, the out tile (map_and_record), the histogram window, and the table (log2phy,
// plus logcnt in spread mode) when it fits; otherwise the table is read from GM.
struct MapRecordTiling {
  int64_t blockDim = 0;
  int64_t idsPerCore = 0;
  int64_t tileLen = 0;
  int64_t binWindow = 0;
  int64_t tableInUb = 0;
  int64_t ubUsed = 0;  // bytes of UB the kernel will ask TPipe for
};

inline MapRecordTiling TileMapRecord(int64_t n, int64_t idBytes, bool hasOut, int mode,
                                     int64_t numExperts, int64_t cols, int64_t numBins,
                                     int64_t coreNum, const TilingLimits& lim = {}) {
  MapRecordTiling t;
  if (n <= 0) return t;
  constexpr int64_t kIdAlign = 8;
  const int64_t cores =
      std::clamp<int64_t>(CeilDiv(n, lim.minPerCore), 1, std::max<int64_t>(coreNum, 1));
  t.idsPerCore = AlignUp(CeilDiv(n, cores), kIdAlign);
  t.blockDim = CeilDiv(n, t.idsPerCore);
  t.tileLen =
      std::max<int64_t>(std::min(lim.maxTileLen, t.idsPerCore) / kIdAlign * kIdAlign, kIdAlign);
  t.binWindow = std::max<int64_t>(std::min(AlignUp(std::max<int64_t>(numBins, 1), kIdAlign),
                                           lim.maxBinWindow / kIdAlign * kIdAlign),
                                  kIdAlign);
  int64_t used =
      2 * kUbBlockBytes + UbBytes(t.tileLen, idBytes) * (hasOut ? 2 : 1) + UbBytes(t.binWindow, 4);
  if (mode != kModeIdentity) {
    const int64_t tableLen = mode == kModeSpread ? numExperts * cols : numExperts;
    const int64_t tableBytes =
        UbBytes(tableLen, 4) + (mode == kModeSpread ? UbBytes(numExperts, 4) : 0);
    if (tableLen > 0 && used + tableBytes <= lim.ubBytes) {
      t.tableInUb = 1;
      used += tableBytes;
    }
  }
  t.ubUsed = used;
  return t;
}

}  // namespace eplb_ascend
