// Constants shared by the Ascend C kernels (record_kernels.cpp) and their host tiling
// (record_tiling.h). Plain integers only: this header is compiled for the AI core and the host.
#pragma once

namespace eplb_ascend {

// How map_record_* turns a logical id into the slot it counts (kernel argument `mode`).
constexpr int kModeIdentity = 0;   // record_topk: the id is the slot, counted when in [0, P)
constexpr int kModeSpread = 1;     // log2phy [E, M]; replica = (flat_index / k) % logcnt[e]
constexpr int kModeRankLocal = 2;  // log2phy [E]; slot = log2phy[e]

// Unified buffer the tiling plans with. Ascend910B's vector core has 192 KiB of UB; 16 KiB is
// left unplanned for TPipe's own bookkeeping and for smaller parts (310P has 256 KiB, so the
// same plan fits there too).
constexpr int kUbPlanBytes = 176 * 1024;
// Every UB buffer starts on a 32-byte block (DataCopy moves whole 32-byte blocks).
constexpr int kUbBlockBytes = 32;

}  // namespace eplb_ascend
