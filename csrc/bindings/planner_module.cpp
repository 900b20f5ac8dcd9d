// pybind11 face of the C++ planner: numpy in, numpy out, the GIL released while planning.
// Shapes and dtypes are checked in python/eplb_native/planner.py; values in the C++ core
// (std::invalid_argument becomes ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include "planner/placement.h"
#include "planner/worker.h"

namespace py = pybind11;
using eplb::PlanOptions;
using eplb::PlanResult;
using eplb::Shape;

namespace {

using F64 = py::array_t<double, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Hands a vector's buffer to numpy without copying: the array owns it through a capsule. Only
// O(1) work happens with the GIL held (a large log2phy would otherwise be copied under it).
template <typename T>
py::array_t<T> Own(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  if (v.empty()) return py::array_t<T>(shape);
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, heap->data(), owner);
}

// A Transfer is its 8 int64 fields in TRANSFER_COLUMNS order, nothing else: a list of them is
// already the [T, 8] int64 rows numpy gets, handed over without a copy.
static_assert(std::is_standard_layout<eplb::Transfer>::value &&
                  sizeof(eplb::Transfer) == 8 * sizeof(int64_t) &&
                  offsetof(eplb::Transfer, layer) == 0 && offsetof(eplb::Transfer, batch) == 8 &&
                  offsetof(eplb::Transfer, logical) == 16 &&
                  offsetof(eplb::Transfer, src_rank) == 24 &&
                  offsetof(eplb::Transfer, src_slot) == 32 &&
                  offsetof(eplb::Transfer, dst_rank) == 40 &&
                  offsetof(eplb::Transfer, dst_slot) == 48 && offsetof(eplb::Transfer, kind) == 56,
              "Transfer must be laid out as TRANSFER_COLUMNS");

// Transfers as a [T, 8] int64 array (TRANSFER_COLUMNS) owning the list's buffer.
py::array_t<int64_t> TransferRows(std::vector<eplb::Transfer>&& transfers) {
  const auto T = static_cast<py::ssize_t>(transfers.size());
  if (transfers.empty()) return py::array_t<int64_t>({T, static_cast<py::ssize_t>(8)});
  auto* heap = new std::vector<eplb::Transfer>(std::move(transfers));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<eplb::Transfer>*>(p); });
  return py::array_t<int64_t>({T, static_cast<py::ssize_t>(8)},
                              reinterpret_cast<const int64_t*>(heap->data()), owner);
}

Shape MakeShape(const F64& load, int64_t num_physical, int64_t num_ranks, int64_t num_nodes,
                int64_t num_groups) {
  if (load.ndim() != 2) throw std::invalid_argument("load must be 2-D [layers, experts]");
  Shape s;
  s.num_layers = load.shape(0);
  s.num_logical = load.shape(1);
  s.num_physical = num_physical;
  s.num_ranks = num_ranks;
  s.num_nodes = num_nodes;
  s.num_groups = num_groups;
  return s;
}

PlanOptions MakeOptions(int policy, bool preserve_slots, int threads, double min_move_target,
                        bool transfers, int64_t log2phy_width = 0, bool distinct_ranks = false,
                        bool prefer_distinct = true) {
  if (policy < 0 || policy > 2) throw std::invalid_argument("policy must be 0, 1 or 2");
  PlanOptions o;
  o.policy = static_cast<eplb::Policy>(policy);
  o.preserve_slots = preserve_slots;
  o.threads = threads;
  o.min_move_target = min_move_target;
  o.transfers = transfers;
  o.log2phy_width = log2phy_width;
  o.distinct_ranks = distinct_ranks;
  o.prefer_distinct = prefer_distinct;
  return o;
}

const int64_t* OldPtr(const std::optional<I64>& old, const Shape& s) {
  if (!old) return nullptr;
  if (old->ndim() != 2 || old->shape(0) != s.num_layers || old->shape(1) != s.num_physical)
    throw std::invalid_argument("old_phy2log must have shape [layers, num_replicas]");
  return old->data();
}

py::dict ToDict(PlanResult&& r) {
  const auto L = static_cast<py::ssize_t>(r.shape.num_layers);
  const auto E = static_cast<py::ssize_t>(r.shape.num_logical);
  const auto P = static_cast<py::ssize_t>(r.shape.num_physical);
  const auto M = static_cast<py::ssize_t>(r.max_replicas);
  py::dict d;
  d["phy2log"] = Own(std::move(r.phy2log), {L, P});
  d["log2phy"] = Own(std::move(r.log2phy), {L, E, M});
  d["logcnt"] = Own(std::move(r.logcnt), {L, E});
  d["mean_load"] = Own(std::move(r.mean_load), {L});
  d["max_load_before"] = Own(std::move(r.max_load_before), {L});
  d["max_load_after"] = Own(std::move(r.max_load_after), {L});
  d["lower_bound"] = Own(std::move(r.lower_bound), {L});
  d["moved_slots"] = Own(std::move(r.moved_slots), {L});
  d["transfers"] = TransferRows(std::move(r.transfers));
  return d;
}

py::dict PlanPy(const F64& load, const std::optional<I64>& old, int64_t num_physical,
                int64_t num_ranks, int64_t num_nodes, int64_t num_groups, int policy,
                bool preserve_slots, int threads, double min_move_target, bool transfers,
                int64_t log2phy_width, bool distinct_ranks, bool prefer_distinct) {
  const Shape s = MakeShape(load, num_physical, num_ranks, num_nodes, num_groups);
  const PlanOptions o = MakeOptions(policy, preserve_slots, threads, min_move_target, transfers,
                                    log2phy_width, distinct_ranks, prefer_distinct);
  const int64_t* old_ptr = OldPtr(old, s);
  PlanResult r;
  {
    py::gil_scoped_release release;
    r = eplb::Plan(load.data(), old_ptr, s, o);
  }
  return ToDict(std::move(r));
}

I64 PreserveSlotsPy(const I64& phy2log, const I64& old, int64_t num_ranks) {
  // (the Python wrapper checks these too: the binding must not trust its callers)
  if (phy2log.ndim() != 2) throw std::invalid_argument("phy2log must be 2-D [layers, slots]");
  if (old.ndim() != 2 || old.shape(0) != phy2log.shape(0) || old.shape(1) != phy2log.shape(1))
    throw std::invalid_argument("old_phy2log must have the shape of phy2log");
  if (num_ranks < 1 || phy2log.shape(1) % num_ranks != 0)
    throw std::invalid_argument("num_ranks must be >= 1 and divide the slots, got " +
                                std::to_string(num_ranks));
  // Ids are expert indices: >= 0 (PreserveSlots' general path marks taken entries with -1).
  // The largest id sizes its per-expert counters (none past 2^24 ids: the O(S^2) path then).
  int64_t largest = -1;
  for (const I64* a : {&phy2log, &old}) {
    const int64_t* d = a->data();
    for (py::ssize_t i = 0; i < a->size(); ++i) {
      if (d[i] < 0)
        throw std::invalid_argument(std::string(a == &old ? "old_phy2log" : "phy2log") +
                                    " must hold expert ids >= 0, got " + std::to_string(d[i]));
      largest = std::max(largest, d[i]);
    }
  }
  Shape s;
  s.num_layers = phy2log.shape(0);
  s.num_logical = largest < (int64_t{1} << 24) ? largest + 1 : 0;
  s.num_physical = phy2log.shape(1);
  s.num_ranks = num_ranks;
  I64 out({phy2log.shape(0), phy2log.shape(1)});
  std::memcpy(out.mutable_data(), phy2log.data(), static_cast<size_t>(phy2log.size()) * 8);
  eplb::PreserveSlots(out.mutable_data(), old.data(), s);
  return out;
}

// One layer's transfer plan, [T, 8] rows (TRANSFER_COLUMNS, layer 0). The caller
// (eplb_native.transfer.layer_schedule) has checked: 1-D, equal sizes divisible by num_ranks,
// num_ranks divisible by num_nodes, ids in [0, num_logical), every new id held in old.
py::array_t<int64_t> LayerTransfersPy(const I64& old, const I64& fresh, int64_t num_logical,
                                      int64_t num_ranks, int64_t num_nodes) {
  // The same checks again, cheaply: the binding must not read out of bounds on bad input.
  if (old.ndim() != 1 || fresh.ndim() != 1 || old.size() != fresh.size())
    throw std::invalid_argument("old/new phy2log must be 1-D of equal size");
  if (num_ranks < 1 || num_nodes < 1 || old.size() % num_ranks != 0 || num_ranks % num_nodes != 0)
    throw std::invalid_argument("num_ranks must divide the slots and num_nodes num_ranks");
  if (num_logical < 1 || num_logical > old.size())
    throw std::invalid_argument("num_logical must be in [1, slots]");
  {
    std::vector<char> held(static_cast<size_t>(num_logical), 0);
    for (py::ssize_t p = 0; p < old.size(); ++p) {
      const int64_t e = old.data()[p];
      if (e < 0 || e >= num_logical) throw std::invalid_argument("old id out of range");
      held[static_cast<size_t>(e)] = 1;
    }
    for (py::ssize_t p = 0; p < fresh.size(); ++p) {
      const int64_t e = fresh.data()[p];
      if (e < 0 || e >= num_logical || !held[static_cast<size_t>(e)])
        throw std::invalid_argument("new id out of range or held by no old slot");
    }
  }
  Shape s;
  s.num_layers = 1;
  s.num_logical = num_logical;
  s.num_physical = old.shape(0);
  s.num_ranks = num_ranks;
  s.num_nodes = num_nodes;
  std::vector<eplb::Transfer> transfers;
  {
    py::gil_scoped_release release;
    eplb::PlanTransfers(0, old.data(), fresh.data(), s, &transfers);
  }
  return TransferRows(std::move(transfers));
}

class WorkerPy {
 public:
  WorkerPy() : worker_(std::make_unique<eplb::Worker>()) {}

  uint64_t Submit(const F64& load, const std::optional<I64>& old, int64_t num_physical,
                  int64_t num_ranks, int64_t num_nodes, int64_t num_groups, int policy,
                  bool preserve_slots, int threads, double min_move_target, bool transfers,
                  bool distinct_ranks, bool prefer_distinct) {
    eplb::PlanJob job;
    job.shape = MakeShape(load, num_physical, num_ranks, num_nodes, num_groups);
    job.options = MakeOptions(policy, preserve_slots, threads, min_move_target, transfers, 0,
                              distinct_ranks, prefer_distinct);
    const int64_t* old_ptr = OldPtr(old, job.shape);
    {
      // Plan's own checks, at once: a bad input raises here, not through the future after the
      // jobs ahead of it (review 18); the worker checks again (cheap: one pass over the load).
      py::gil_scoped_release release;
      std::vector<double> totals;
      eplb::ValidatePlan(load.data(), old_ptr, job.shape, job.options, &totals);
    }
    job.load.assign(load.data(), load.data() + load.size());
    if (old_ptr) job.old_phy2log.assign(old_ptr, old_ptr + old->size());
    return worker_->Submit(std::move(job));
  }

  bool Cancel(uint64_t id) { return worker_->Cancel(id); }

  // Returns None once closed and drained, else (id, status, payload): status "started" with
  // None (the job began; its outcome follows), "ok" with the result dict, "cancelled" with
  // None, "invalid" / "error" with the message.
  py::object WaitNext() {
    eplb::PlanDone d;
    bool got;
    {
      py::gil_scoped_release release;
      got = worker_->WaitNext(&d);
    }
    if (!got) return py::none();
    if (d.started) return py::make_tuple(d.id, "started", py::none());
    if (d.ok) return py::make_tuple(d.id, "ok", ToDict(std::move(d.result)));
    if (d.cancelled) return py::make_tuple(d.id, "cancelled", py::none());
    return py::make_tuple(d.id, d.invalid_argument ? "invalid" : "error", d.error);
  }

  void Close() { worker_->Close(); }
  void Join() {
    py::gil_scoped_release release;
    worker_->Join();
  }

 private:
  std::unique_ptr<eplb::Worker> worker_;
};

}  // namespace

PYBIND11_MODULE(_planner, m) {
  m.doc() = "eplb_native C++ planner (internal; use eplb_native.plan / Planner)";
  m.def("plan", &PlanPy, py::arg("load"), py::arg("old_phy2log"), py::arg("num_physical"),
        py::arg("num_ranks"), py::arg("num_nodes"), py::arg("num_groups"), py::arg("policy"),
        py::arg("preserve_slots"), py::arg("threads"), py::arg("min_move_target"),
        py::arg("transfers") = true, py::arg("log2phy_width") = 0,
        py::arg("distinct_ranks") = false, py::arg("prefer_distinct") = true);
  m.def("preserve_slots", &PreserveSlotsPy, py::arg("phy2log"), py::arg("old_phy2log"),
        py::arg("num_ranks"));
  m.def("layer_transfers", &LayerTransfersPy, py::arg("old_phy2log"), py::arg("new_phy2log"),
        py::arg("num_logical"), py::arg("num_ranks"), py::arg("num_nodes"));
  py::class_<WorkerPy>(m, "Worker")
      .def(py::init<>())
      .def("submit", &WorkerPy::Submit, py::arg("load"), py::arg("old_phy2log"),
           py::arg("num_physical"), py::arg("num_ranks"), py::arg("num_nodes"),
           py::arg("num_groups"), py::arg("policy"), py::arg("preserve_slots"), py::arg("threads"),
           py::arg("min_move_target"), py::arg("transfers") = true,
           py::arg("distinct_ranks") = false, py::arg("prefer_distinct") = true)
      .def("cancel", &WorkerPy::Cancel)
      .def("wait_next", &WorkerPy::WaitNext)
      .def("close", &WorkerPy::Close)
      .def("join", &WorkerPy::Join);
}
