// Expert placement: the planner's public C++ interface. Pure C++17: no torch, no Python.
//
// Glossary (../../DESIGN.md): a logical expert is an expert of the model; a physical expert
// (slot) is one copy of a logical expert's weights on one rank. Rank r owns slots
// r*S .. r*S+S-1, S = num_physical / num_ranks. All arrays are dense, row-major, owned by the
// caller unless stated otherwise.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace eplb {

// Every policy is deterministic: the same input gives the same plan on every rank.
enum class Policy : int {
  // DeepSeek EPLB exactly (deepseek.cpp): hierarchical when num_groups % num_nodes == 0 and
  // num_nodes > 1, global otherwise; ties go to the lowest index.
  kDeepSeek = 0,
  // The best balance found under the same topology (balanced.cpp, search.h): DeepSeek's
  // placement refined by local search (swaps, replica-count changes) until no step lowers the
  // max rank load. Never worse than kDeepSeek on any layer.
  kBalanced = 1,
  // From the old placement, the fewest changed slots that reach min_move_target x kBalanced's
  // balancedness on each layer (min_move.cpp). Needs an old placement.
  kMinMove = 2,
};

// Topology of one plan.
struct Shape {
  int64_t num_layers = 0;    // L
  int64_t num_logical = 0;   // E, logical experts per layer
  int64_t num_physical = 0;  // P, slots per layer (E + redundant), P % num_ranks == 0
  int64_t num_ranks = 0;     // R
  int64_t num_nodes = 1;     // ranks are split evenly over nodes
  int64_t num_groups = 1;    // expert groups (DeepSeek-V3: 8); hierarchical needs E % groups == 0

  int64_t slots_per_rank() const { return num_physical / num_ranks; }
  // DeepSeek EPLB's rule: hierarchical when groups divide evenly over nodes.
  bool hierarchical() const { return num_groups % num_nodes == 0 && num_nodes > 1; }
  // DeepSeek EPLB's own rule (its code and vLLM's): groups -> nodes, then replicas inside each
  // node, whenever num_groups % num_nodes == 0, one node included. With one node that only
  // orders the experts by group load, which decides ties (and, with one slot per rank, which
  // rank gets which expert); `deepseek` follows it, the other policies treat one node as global.
  bool deepseek_grouped() const { return num_groups % num_nodes == 0 && num_groups > 1; }
  // The packs of ranks `balanced` / `min_move` place each expert's replicas within: the nodes
  // when hierarchical (every replica on its group's node), else the whole EP group.
  int64_t num_packs() const { return hierarchical() ? num_nodes : 1; }
};

struct PlanOptions {
  Policy policy = Policy::kBalanced;
  bool preserve_slots = true;  // an expert that stays on a rank keeps its old slot
  int threads = 1;             // layers are independent: plan them on this many threads
  // No rank holds one logical expert in two slots (distinct.cpp), as vllm-ascend's expert maps
  // require. Needs num_logical / packs >= slots per rank (packs: nodes when hierarchical, else 1).
  bool distinct_ranks = false;
  // Without distinct_ranks, `balanced` still takes a placement with no repeats where one is
  // within 0.1% of its max rank load and not above DeepSeek's (placement.cpp PreferDistinct);
  // false: the lowest max found, repeats or not. Other policies ignore it.
  bool prefer_distinct = true;
  // min_move: the fraction of `balanced`'s balancedness it must reach on each layer.
  double min_move_target = 0.99;
  // Build the transfer plan (needs an old placement). Off when only the placement is wanted.
  bool transfers = true;
  // Columns of log2phy: 0 for the largest replica count M of the plan; otherwise this many
  // (>= M), as DeepSeek's rebalance_experts returns P - E + 1 whatever the counts.
  int64_t log2phy_width = 0;
};

// One slot's worth of expert weights to bring to (dst_rank, dst_slot).
//
// The transfer plan of a layer (PlanTransfers, transfer.cpp) has exactly one Transfer per slot
// whose logical expert changes between old and new phy2log, and none for the others:
//   - kLocal (src_rank == dst_rank) when the destination rank already held the expert in the old
//     placement: a copy inside the rank from src_slot, which holds it in the OLD placement;
//   - kWire otherwise, for the first (lowest) slot of the rank that needs the expert: one source
//     per destination, the only old holder rank or, once those are counted, the holder with the
//     fewest sends so far (ties: same node as the destination, then the lowest rank); src_slot
//     holds it in the OLD placement;
//   - kDup for the rank's further slots of that expert: a copy inside the rank of what the kWire
//     transfer brings (src_rank == dst_rank, src_slot = that transfer's dst_slot, so it reads the
//     NEW placement, once that transfer is done); the expert crosses the wire once per rank;
//   - an executor that overwrites slots in place must stage what kWire / kLocal read first (a
//     slot may be both read and written in one layer);
//   - batch: wire transfers of one batch form a matching of ranks: every rank exchanges weights
//     with at most one peer per batch (possibly several experts, both directions). Local copies
//     are in batch 0, a kDup in the batch of the wire transfer it copies (after it in the
//     (batch, dst_slot) order). Batches are numbered from 0 without gaps per layer.
// Applying every transfer of a layer in that order to old_phy2log gives new_phy2log.
struct Transfer {
  enum Kind : int64_t { kWire = 0, kLocal = 1, kDup = 2 };
  int64_t layer = 0;
  int64_t batch = 0;     // transfers of one batch can run together: no rank talks to two peers
  int64_t logical = 0;   // logical expert whose weights travel
  int64_t src_rank = 0;  // rank that sends (== dst_rank for kLocal and kDup)
  int64_t src_slot = 0;  // global slot index the weights are read from (see kind)
  int64_t dst_rank = 0;
  int64_t dst_slot = 0;  // global slot index written (new placement)
  int64_t kind = kWire;
};

// Result of planning L layers. Every vector is owned by this struct.
struct PlanResult {
  Shape shape;
  int64_t max_replicas = 1;             // M (or PlanOptions::log2phy_width when set)
  std::vector<int64_t> phy2log;         // [L, P]
  std::vector<int64_t> log2phy;         // [L, E, M], -1 padded
  std::vector<int64_t> logcnt;          // [L, E], >= 1
  std::vector<double> mean_load;        // [L], mean rank load (sum of load / R)
  std::vector<double> max_load_before;  // [L], max rank load of the old placement (NaN if none)
  std::vector<double> max_load_after;   // [L], max rank load of the new placement
  std::vector<double> lower_bound;      // [L], no placement of these slots does better
  std::vector<int64_t> moved_slots;     // [L], slots whose logical expert changed
  std::vector<Transfer> transfers;      // sorted by (layer, batch, dst_slot)
};

// Plans every layer. load: [L, E] tokens per logical expert (finite, >= 0).
// old_phy2log: [L, P] or nullptr (no current placement). Throws std::invalid_argument whose
// message names the argument and the expected value on bad input; never returns half a plan.
PlanResult Plan(const double* load, const int64_t* old_phy2log, const Shape& shape,
                const PlanOptions& options);

// What Plan checks of its inputs before any work, alone (Planner::submit's checks at once):
// throws std::invalid_argument naming the argument, as Plan would. totals: [L] out, each
// layer's sum of load.
void ValidatePlan(const double* load, const int64_t* old_phy2log, const Shape& shape,
                  const PlanOptions& options, std::vector<double>* totals);

// Checks a placement: ids in [0, E), every logical expert has >= 1 slot. Throws
// std::invalid_argument naming `name` on failure.
void ValidatePhy2Log(const int64_t* phy2log, const Shape& shape, const std::string& name);

// Builds log2phy [L, E, M] and logcnt [L, E] from phy2log [L, P]; replicas listed by slot order.
void BuildLog2Phy(const int64_t* phy2log, const Shape& shape, std::vector<int64_t>* log2phy,
                  std::vector<int64_t>* logcnt, int64_t* max_replicas);

// Max rank load of one layer's placement: sum over a rank's slots of load[log] / logcnt[log].
double MaxRankLoad(const double* layer_load, const int64_t* layer_phy2log, const Shape& shape);

// vLLM's preserve_intragpu_slots: permutes each rank's slots in `phy2log` [L, P] so that a
// logical expert the rank held in `old_phy2log` stays in its old slot. Same multiset per rank.
// Ids must be >= 0 (a negative one reads out of bounds; Plan and the bindings check first).
void PreserveSlots(int64_t* phy2log, const int64_t* old_phy2log, const Shape& shape);

// Lower bound on the max rank load of ANY placement of one layer with these slots and this
// topology (hierarchical placements keep groups on nodes, as DeepSeek's): no plan does better.
// The argument is in bound.cpp. It holds in exact arithmetic and, with loads in the normal
// range, up to rounding; loads below DBL_MIN (subnormal) divide inexactly by replica counts,
// and there the bound (and balanced's "never worse than deepseek") can miss by a few ulps
// (Plan caps its lower_bound at the plan's own max).
double LowerBound(const double* layer_load, const Shape& shape);

// Transfer plan old -> new for one layer; appends to `out`.
void PlanTransfers(int64_t layer, const int64_t* old_phy2log, const int64_t* new_phy2log,
                   const Shape& shape, std::vector<Transfer>* out);
// The same into out [changed slots of the layer] (the caller sized it); returns that count.
int64_t PlanTransfers(int64_t layer, const int64_t* old_phy2log, const int64_t* new_phy2log,
                      const Shape& shape, Transfer* out);

}  // namespace eplb
