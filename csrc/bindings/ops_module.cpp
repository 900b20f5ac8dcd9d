// Makes the torch ops library importable as `eplb_native._ops`: importing it runs the
// TORCH_LIBRARY registrations in csrc/ops. It exposes nothing else.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_ops, m) { m.doc() = "eplb_native device ops (see torch.ops.eplb_native)"; }
