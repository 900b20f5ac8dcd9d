// Makes the torch ops library importable as `eplb_native._ops`: importing it runs the
// TORCH_LIBRARY registrations in csrc/ops. Besides that it only says which native backends this
// build holds (each backend adds its compile definition in CMakeLists.txt).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace {

std::vector<std::string> BuiltBackends() {
  std::vector<std::string> backends{"cpu"};
#ifdef EPLB_WITH_CUDA
  backends.emplace_back("cuda");
#endif
#ifdef EPLB_WITH_ASCEND
  backends.emplace_back("ascendc");
#endif
  return backends;
}

}  // namespace

PYBIND11_MODULE(_ops, m) {
  m.doc() = "eplb_native device ops (see torch.ops.eplb_native)";
  m.def("built_backends", &BuiltBackends,
        "Native kernel families compiled into this build: 'cpu' always, 'cuda' and 'ascendc' "
        "when built with them.");
}
