// Per-layer placement policies. Internal to the planner: Plan() in placement.cpp validates the
// input once and calls these per layer, possibly from several threads (they share no state).
#pragma once

#include <cstdint>
#include <vector>

#include "planner/placement.h"

namespace eplb {

// DeepSeek EPLB for one layer: grouped when shape.deepseek_grouped(), else global.
// load: [E]; phy2log: [P] out; phyrank: [P] out, the replica ordinal of each slot (0 = first
// copy), which orders DeepSeek's log2phy columns; nullptr where not wanted.
void DeepSeekLayer(const double* load, const Shape& shape, int64_t* phy2log, int64_t* phyrank);
// DeepSeekLayer on num_layers layers at once: load [num_layers, E], phy2log and phyrank
// [num_layers, P] out; the same placements. The layers' greedy packings run interleaved (each
// is a chain of dependent steps; the core overlaps independent chains).
void DeepSeekLayers(const double* load, const Shape& shape, int64_t num_layers, int64_t* phy2log,
                    int64_t* phyrank);

// Best balance found for one layer under the same topology rules as DeepSeekLayer:
// BalancedSearchLayer, then RefineLayer (refine.cpp).
void BalancedLayer(const double* load, const Shape& shape, int64_t* phy2log);

// The search of `balanced` (balanced.cpp): the max rank load as low as it gets.
void BalancedSearchLayer(const double* load, const Shape& shape, int64_t* phy2log);

// A lower bound on the max rank load of BalancedLayer's placement (not of every placement):
// hierarchical, the smallest over balanced's candidate group->node partitions of the largest
// mean rank load of a node; 0 for global shapes.
double BalancedFloor(const double* load, const Shape& shape);

// `balanced`'s post-pass (refine.cpp): swaps replicas between ranks of one pack (one node when
// hierarchical) so that no rank holds two replicas of an expert where a swap can avoid it and
// rank loads are flatter; no rank ends above the pack's max rank load, replica counts unchanged.
void RefineLayer(const double* load, const Shape& shape, int64_t* phy2log);

// PlanOptions::distinct_ranks (distinct.cpp): rewrites phy2log [P] so that no rank holds one
// expert twice, per pack of ranks; then PackSearch's steps under that constraint lower the max
// rank load: not at all, down to the layer's max before (min_move), or until none helps
// (balanced). Needs every pack to hold >= S experts (Plan checks).
enum DistinctMode { kDistinctRepairOnly, kDistinctToPolicyMax, kDistinctFull };
void DistinctLayer(const double* load, const Shape& shape, DistinctMode mode, int64_t* phy2log);
// PackSearch's constrained steps on a placement without repeats, per pack, until the max rank
// load is <= stop or no step lowers it (distinct.cpp).
void DistinctDescend(const double* load, const Shape& shape, double stop, int64_t* phy2log);
// True if some rank of phy2log [P] holds one expert in two slots.
bool HasRepeatOnRank(const int64_t* phy2log, const Shape& shape);

// Starts from old_phy2log [P] (old_max: its MaxRankLoad) and changes few slots while reaching
// `target` x the balancedness of `balanced_phy2log` [P] (BalancedLayer's answer for the same
// load).
void MinMoveLayer(const double* load, const int64_t* old_phy2log, double old_max,
                  const int64_t* balanced_phy2log, const Shape& shape, double target,
                  int64_t* phy2log);

// LowerBound (placement.h) given greedy_cnt [E], the replica counts of DeepSeek's global
// replication (packing.h Replicate of the whole layer into P slots), which it would otherwise
// compute itself; ignored for hierarchical shapes. Same result as LowerBound(load, shape).
double LowerBound(const double* load, const Shape& shape, const int64_t* greedy_cnt);

// min_move without `balanced` (min_move.cpp, step 0): searches from old_phy2log [P] (old_max:
// its MaxRankLoad; hierarchical: within its old group->node partition, or that partition with
// one pair of groups traded) toward
// max(bound, BalancedFloor) / target (bound: LowerBound of the layer; both are <= balanced's
// max rank load, so the result is within `target` of balanced's balance). True with phy2log [P]
// written when it gets there; false (phy2log unspecified) when MinMoveLayer must run with
// balanced's placement.
bool MinMoveFromBound(const double* load, const int64_t* old_phy2log, double old_max,
                      const Shape& shape, double target, double bound, int64_t* phy2log);

namespace detail {

// Each expert group's load [num_groups] (balanced.cpp; experts are grouped consecutively).
std::vector<double> GroupLoads(const double* load, const Shape& shape);

// min_move's renumbering step (min_move.cpp): matches the blocks (runs of `block` slots) of
// `fresh` to those of `old` greedily by shared experts (multiset intersection), largest first,
// then by fresh block, then by old block; target[b] (out) = the old block that fresh block b
// goes to. Only the blocks listed in fresh_ids / old_ids (same length) take part; experts are
// < num_logical. Declared here for tests/cpp, which checks it against listing every pair.
void MatchBlocks(const int64_t* fresh, const int64_t* old, int64_t block,
                 const std::vector<int64_t>& fresh_ids, const std::vector<int64_t>& old_ids,
                 int64_t num_logical, std::vector<int64_t>* target);

}  // namespace detail

}  // namespace eplb
