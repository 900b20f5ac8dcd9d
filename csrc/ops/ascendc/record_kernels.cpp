// Ascend C kernels of eplb_native's recording ops (AI vector cores, CANN's kernel_operator.h).
// Built only by cmake/EplbAscend.cmake through CANN's ascendc_library(); launched from
// record_npu.cpp with the tiling of record_tiling.h. Semantics: csrc/ops/cpu/map_record.cpp.
//
// Counting is scalar work on the unified buffer (UB): the vector unit has no histogram
// instruction, so each core streams its ids GM -> UB tile by tile, looks each one up in the
// log2phy table it holds in UB, and counts into a private histogram in UB. At the end every core
// adds its histogram into the int32 bins in GM with one DMA atomic add (SetAtomicAdd + DataCopy),
// so there is one atomic add per bin per core and none per token.
//
// Synchronisation: the consumer of every tile is the scalar unit, so the hand-offs between the
// DMA pipes (MTE2 in, MTE3 out), the vector pipe (Duplicate) and the scalar pipe are explicit
// HardEvent flags (TQue's EnQue/DeQue only order MTE against the vector pipe).
#include "kernel_operator.h"
#include "record_modes.h"

namespace {

constexpr uint32_t kBlock = eplb_ascend::kUbBlockBytes;

__aicore__ inline uint32_t AlignBytes(uint64_t bytes) {
  return static_cast<uint32_t>((bytes + kBlock - 1) / kBlock * kBlock);
}

__aicore__ inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// Orders pipe `E`'s earlier work before the other pipe's later work (one event, fetched and
// released by TPipe).
template <AscendC::HardEvent E>
__aicore__ inline void Sync() {
  AscendC::TEventID ev = GetTPipePtr()->FetchEventID(E);
  AscendC::SetFlag<E>(ev);
  AscendC::WaitFlag<E>(ev);
}

// GM -> UB of `count` elements. Whole 32-byte blocks go by DataCopy; a length with a partial
// block goes by DataCopyPad, which moves exactly count * sizeof(T) bytes (the tail).
template <typename T>
__aicore__ inline void CopyIn(const AscendC::LocalTensor<T>& dst,
                              const AscendC::GlobalTensor<T>& src, uint32_t count) {
  const uint32_t bytes = count * sizeof(T);
  if (bytes % kBlock == 0) {
    AscendC::DataCopy(dst, src, count);
  } else {
    AscendC::DataCopyExtParams params{1, bytes, 0, 0, 0};
    AscendC::DataCopyPadExtParams<T> pad{false, 0, 0, 0};
    AscendC::DataCopyPad(dst, src, params, pad);
  }
}

// UB -> GM of `count` elements; DataCopyPad writes only the bytes that belong to the tail.
template <typename T>
__aicore__ inline void CopyOut(const AscendC::GlobalTensor<T>& dst,
                               const AscendC::LocalTensor<T>& src, uint32_t count) {
  const uint32_t bytes = count * sizeof(T);
  if (bytes % kBlock == 0) {
    AscendC::DataCopy(dst, src, count);
  } else {
    AscendC::DataCopyExtParams params{1, bytes, 0, 0, 0};
    AscendC::DataCopyPad(dst, src, params);
  }
}

// record_counts: load[offset + i] += counts[i] (group_list_type 1) or counts[i] - counts[i-1]
// (type 0, cumulative). Bins are split over the cores, each core owning a disjoint range whose
// inner boundaries are 32-byte aligned in GM, so no atomics are needed and int64 loads work.
// `load` already points at load + offset; `counts` is int64.
template <typename Load>
class RecordCountsKernel {
 public:
  __aicore__ inline void Init(GM_ADDR load, GM_ADDR counts, int64_t n, int64_t cumulative,
                              int64_t head, int64_t binsPerCore, int64_t tileLen) {
    n_ = n;
    cumulative_ = cumulative != 0;
    tileLen_ = tileLen;
    const int64_t idx = AscendC::GetBlockIdx();
    begin_ = idx == 0 ? 0 : Min(n, head + idx * binsPerCore);
    end_ = idx == AscendC::GetBlockNum() - 1 ? n : Min(n, head + (idx + 1) * binsPerCore);
    loadGm_.SetGlobalBuffer(reinterpret_cast<__gm__ Load*>(load), n);
    countsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(counts), n);
    // One extra count: the cumulative difference of a tile needs the element before it.
    pipe_.InitBuffer(countsBuf_, AlignBytes((tileLen + 1) * sizeof(int64_t)));
    pipe_.InitBuffer(loadBuf_, AlignBytes(tileLen * sizeof(Load)));
  }

  __aicore__ inline void Process() {
    AscendC::LocalTensor<int64_t> counts = countsBuf_.Get<int64_t>();
    AscendC::LocalTensor<Load> load = loadBuf_.Get<Load>();
    for (int64_t t = begin_; t < end_; t += tileLen_) {
      const int64_t len = Min(tileLen_, end_ - t);
      const int64_t shift = (cumulative_ && t > 0) ? 1 : 0;
      CopyIn(counts, countsGm_[t - shift], static_cast<uint32_t>(len + shift));
      CopyIn(load, loadGm_[t], static_cast<uint32_t>(len));
      Sync<AscendC::HardEvent::MTE2_S>();
      for (int64_t j = 0; j < len; ++j) {
        int64_t add = counts.GetValue(j + shift);
        if (cumulative_ && j + shift > 0) add -= counts.GetValue(j + shift - 1);
        load.SetValue(j, static_cast<Load>(load.GetValue(j) + static_cast<Load>(add)));
      }
      Sync<AscendC::HardEvent::S_MTE3>();
      CopyOut(loadGm_[t], load, static_cast<uint32_t>(len));
      // The next tile's DMA-in reuses both buffers.
      Sync<AscendC::HardEvent::MTE3_MTE2>();
    }
  }

 private:
  AscendC::TPipe pipe_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> countsBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> loadBuf_;
  AscendC::GlobalTensor<Load> loadGm_;
  AscendC::GlobalTensor<int64_t> countsGm_;
  int64_t n_ = 0;
  int64_t begin_ = 0;
  int64_t end_ = 0;
  int64_t tileLen_ = 0;
  bool cumulative_ = false;
};

// map_and_record / record_topk over flat ids [n] (k per token).
//   out[i] = slot of ids[i] (or -1), written when `out` is given (record_topk: slot = id);
//   hist[slot] += 1 for i < num_valid_tokens * k and 0 <= slot < numBins, when *record != 0.
// Core c owns ids [c * idsPerCore, ...); the last core takes the tail. Slots are counted in
// windows of binWindow bins (one pass over the core's ids per window; one window unless P is
// larger than the UB histogram). The table (log2phy + logcnt) is copied into UB when
// tableInUb, otherwise read from GM by the scalar unit.
template <typename Id>
class MapRecordKernel {
 public:
  __aicore__ inline void Init(GM_ADDR ids, GM_ADDR table, GM_ADDR logcnt, GM_ADDR out, GM_ADDR hist,
                              GM_ADDR record, GM_ADDR numValid, int64_t n, int64_t k,
                              int64_t numExperts, int64_t cols, int64_t numBins, int64_t mode,
                              int64_t idsPerCore, int64_t tileLen, int64_t binWindow,
                              int64_t tableInUb) {
    n_ = n;
    k_ = k;
    numExperts_ = numExperts;
    cols_ = cols;
    numBins_ = numBins;
    mode_ = mode;
    tileLen_ = tileLen;
    binWindow_ = binWindow;
    tableInUb_ = tableInUb != 0 && mode != eplb_ascend::kModeIdentity;
    hasOut_ = out != nullptr;
    hasNumValid_ = numValid != nullptr;
    const int64_t idx = AscendC::GetBlockIdx();
    begin_ = Min(n, idx * idsPerCore);
    end_ = idx == AscendC::GetBlockNum() - 1 ? n : Min(n, begin_ + idsPerCore);

    idsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ Id*>(ids), n);
    if (hasOut_) outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ Id*>(out), n);
    histGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(hist), numBins);
    recordGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(record), 1);
    if (hasNumValid_) numValidGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(numValid), 1);
    tableLen_ = mode == eplb_ascend::kModeSpread ? numExperts * cols : numExperts;
    if (mode != eplb_ascend::kModeIdentity) {
      tableGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(table), tableLen_);
    }
    if (mode == eplb_ascend::kModeSpread) {
      logcntGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(logcnt), numExperts);
    }

    pipe_.InitBuffer(flagBuf_, kBlock);
    pipe_.InitBuffer(numValidBuf_, kBlock);
    pipe_.InitBuffer(idsBuf_, AlignBytes(tileLen * sizeof(Id)));
    if (hasOut_) pipe_.InitBuffer(outBuf_, AlignBytes(tileLen * sizeof(Id)));
    pipe_.InitBuffer(histBuf_, AlignBytes(binWindow * sizeof(int32_t)));
    if (tableInUb_) {
      pipe_.InitBuffer(tableBuf_, AlignBytes(tableLen_ * sizeof(int32_t)));
      if (mode == eplb_ascend::kModeSpread) {
        pipe_.InitBuffer(logcntBuf_, AlignBytes(numExperts * sizeof(int32_t)));
      }
    }
  }

  __aicore__ inline void Process() {
    if (begin_ >= end_) return;
    // The record flag and num_valid_tokens are device scalars (no host sync on the launch path).
    AscendC::LocalTensor<int32_t> flag = flagBuf_.Get<int32_t>();
    AscendC::LocalTensor<int64_t> numValid = numValidBuf_.Get<int64_t>();
    CopyIn(flag, recordGm_, 1);
    if (hasNumValid_) CopyIn(numValid, numValidGm_, 1);
    if (tableInUb_) {  // tableLen_ > 0 (the tiling keeps an empty table in GM)
      table_ = tableBuf_.Get<int32_t>();
      CopyIn(table_, tableGm_, static_cast<uint32_t>(tableLen_));
      if (mode_ == eplb_ascend::kModeSpread) {
        logcnt_ = logcntBuf_.Get<int32_t>();
        CopyIn(logcnt_, logcntGm_, static_cast<uint32_t>(numExperts_));
      }
    }
    if (!tableInUb_ && mode_ != eplb_ascend::kModeIdentity) {
      // The table is read from GM through the scalar data cache: drop lines an earlier kernel
      // on this core may have left there.
      AscendC::DataCacheCleanAndInvalid<int32_t, AscendC::CacheLine::ENTIRE_DATA_CACHE,
                                        AscendC::DcciDst::CACHELINE_OUT>(tableGm_);
    }
    Sync<AscendC::HardEvent::MTE2_S>();
    const bool record = flag.GetValue(0) != 0;
    // Flat ids at or past countEnd belong to padding tokens and are not counted.
    int64_t validFlat = n_;
    if (hasNumValid_) {
      const int64_t tokens = numValid.GetValue(0);
      validFlat = tokens <= 0 ? 0 : (tokens >= (n_ + k_ - 1) / k_ ? n_ : tokens * k_);
    }
    const int64_t countEnd = (record && numBins_ > 0) ? Min(end_, validFlat) : begin_;
    const bool counting = countEnd > begin_;
    if (!counting && !hasOut_) return;

    AscendC::LocalTensor<Id> ids = idsBuf_.Get<Id>();
    AscendC::LocalTensor<int32_t> hist = histBuf_.Get<int32_t>();
    AscendC::LocalTensor<Id> out;
    if (hasOut_) out = outBuf_.Get<Id>();
    const int64_t windows = counting ? (numBins_ + binWindow_ - 1) / binWindow_ : 1;
    for (int64_t w = 0; w < windows; ++w) {
      const int64_t binLo = w * binWindow_;
      const int64_t bins = counting ? Min(binWindow_, numBins_ - binLo) : 0;
      const bool writeOut = hasOut_ && w == 0;
      if (counting) {
        AscendC::Duplicate(hist, static_cast<int32_t>(0), static_cast<int32_t>(bins));
        Sync<AscendC::HardEvent::V_S>();
      }
      const int64_t scanEnd = writeOut ? end_ : countEnd;
      for (int64_t t = begin_; t < scanEnd; t += tileLen_) {
        const int64_t len = Min(tileLen_, scanEnd - t);
        CopyIn(ids, idsGm_[t], static_cast<uint32_t>(len));
        Sync<AscendC::HardEvent::MTE2_S>();
        for (int64_t j = 0; j < len; ++j) {
          const int64_t i = t + j;
          const int64_t slot = Lookup(static_cast<int64_t>(ids.GetValue(j)), i);
          if (writeOut) out.SetValue(j, static_cast<Id>(slot));
          if (counting && i < countEnd && slot >= binLo && slot < binLo + bins) {
            hist.SetValue(slot - binLo, hist.GetValue(slot - binLo) + 1);
          }
        }
        if (writeOut) {
          Sync<AscendC::HardEvent::S_MTE3>();
          CopyOut(outGm_[t], out, static_cast<uint32_t>(len));
          // The next tile's scalar writes reuse `out`.
          Sync<AscendC::HardEvent::MTE3_S>();
        }
        // The next tile's DMA-in overwrites `ids`, which the scalar unit has just read.
        Sync<AscendC::HardEvent::S_MTE2>();
      }
      if (counting) {
        // One atomic add per bin for this core's whole range.
        Sync<AscendC::HardEvent::S_MTE3>();
        AscendC::SetAtomicAdd<int32_t>();
        CopyOut(histGm_[binLo], hist, static_cast<uint32_t>(bins));
        AscendC::SetAtomicNone();
        // The next window's Duplicate rewrites `hist`.
        Sync<AscendC::HardEvent::MTE3_V>();
      }
    }
  }

 private:
  // Slot of logical id `e` at flat index `i` (token i / k), or -1 for an id outside [0, E).
  // Spread mode uses replica (i / k) % clamp(logcnt[e], 1, M), as every backend does.
  __aicore__ inline int64_t Lookup(int64_t e, int64_t i) {
    if (mode_ == eplb_ascend::kModeIdentity) return e;
    if (e < 0 || e >= numExperts_) return -1;
    if (mode_ == eplb_ascend::kModeRankLocal) return TableAt(e);
    int64_t replicas = tableInUb_ ? logcnt_.GetValue(e) : logcntGm_.GetValue(e);
    replicas = replicas < 1 ? 1 : (replicas > cols_ ? cols_ : replicas);
    return TableAt(e * cols_ + (i / k_) % replicas);
  }

  __aicore__ inline int64_t TableAt(int64_t pos) {
    return tableInUb_ ? table_.GetValue(pos) : tableGm_.GetValue(pos);
  }

  AscendC::TPipe pipe_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> flagBuf_, numValidBuf_, idsBuf_, outBuf_, histBuf_,
      tableBuf_, logcntBuf_;
  AscendC::GlobalTensor<Id> idsGm_, outGm_;
  AscendC::GlobalTensor<int32_t> histGm_, recordGm_, tableGm_, logcntGm_;
  AscendC::GlobalTensor<int64_t> numValidGm_;
  AscendC::LocalTensor<int32_t> table_, logcnt_;
  int64_t n_ = 0, k_ = 1, numExperts_ = 0, cols_ = 1, numBins_ = 0, mode_ = 0;
  int64_t tileLen_ = 0, binWindow_ = 0, tableLen_ = 0, begin_ = 0, end_ = 0;
  bool tableInUb_ = false, hasOut_ = false, hasNumValid_ = false;
};

template <typename Load>
__aicore__ inline void RunRecordCounts(GM_ADDR load, GM_ADDR counts, int64_t n, int64_t cumulative,
                                       int64_t head, int64_t binsPerCore, int64_t tileLen) {
  RecordCountsKernel<Load> op;
  op.Init(load, counts, n, cumulative, head, binsPerCore, tileLen);
  op.Process();
}

template <typename Id>
__aicore__ inline void RunMapRecord(GM_ADDR ids, GM_ADDR table, GM_ADDR logcnt, GM_ADDR out,
                                    GM_ADDR hist, GM_ADDR record, GM_ADDR numValid, int64_t n,
                                    int64_t k, int64_t numExperts, int64_t cols, int64_t numBins,
                                    int64_t mode, int64_t idsPerCore, int64_t tileLen,
                                    int64_t binWindow, int64_t tableInUb) {
  MapRecordKernel<Id> op;
  op.Init(ids, table, logcnt, out, hist, record, numValid, n, k, numExperts, cols, numBins, mode,
          idsPerCore, tileLen, binWindow, tableInUb);
  op.Process();
}

}  // namespace

// One entry point per dtype: the launch ABI has no templates.
extern "C" __global__ __aicore__ void eplb_record_counts_i32(GM_ADDR load, GM_ADDR counts,
                                                             int64_t n, int64_t cumulative,
                                                             int64_t head, int64_t binsPerCore,
                                                             int64_t tileLen) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  RunRecordCounts<int32_t>(load, counts, n, cumulative, head, binsPerCore, tileLen);
}

extern "C" __global__ __aicore__ void eplb_record_counts_i64(GM_ADDR load, GM_ADDR counts,
                                                             int64_t n, int64_t cumulative,
                                                             int64_t head, int64_t binsPerCore,
                                                             int64_t tileLen) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  RunRecordCounts<int64_t>(load, counts, n, cumulative, head, binsPerCore, tileLen);
}

extern "C" __global__ __aicore__ void eplb_map_record_i32(
    GM_ADDR ids, GM_ADDR table, GM_ADDR logcnt, GM_ADDR out, GM_ADDR hist, GM_ADDR record,
    GM_ADDR numValid, int64_t n, int64_t k, int64_t numExperts, int64_t cols, int64_t numBins,
    int64_t mode, int64_t idsPerCore, int64_t tileLen, int64_t binWindow, int64_t tableInUb) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  RunMapRecord<int32_t>(ids, table, logcnt, out, hist, record, numValid, n, k, numExperts, cols,
                        numBins, mode, idsPerCore, tileLen, binWindow, tableInUb);
}

extern "C" __global__ __aicore__ void eplb_map_record_i64(
    GM_ADDR ids, GM_ADDR table, GM_ADDR logcnt, GM_ADDR out, GM_ADDR hist, GM_ADDR record,
    GM_ADDR numValid, int64_t n, int64_t k, int64_t numExperts, int64_t cols, int64_t numBins,
    int64_t mode, int64_t idsPerCore, int64_t tileLen, int64_t binWindow, int64_t tableInUb) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  RunMapRecord<int64_t>(ids, table, logcnt, out, hist, record, numValid, n, k, numExperts, cols,
                        numBins, mode, idsPerCore, tileLen, binWindow, tableInUb);
}
