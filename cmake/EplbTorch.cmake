# Finds the torch that is installed in the build's Python (never one from an isolated build env).
# Sets TORCH_INCLUDE_DIRS, EPLB_TORCH_LIBRARIES, EPLB_TORCH_CXX_FLAGS and EPLB_TORCH_HAS_CUDA.
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "import torch, torch.utils; print(torch.utils.cmake_prefix_path); print(int(torch.version.cuda is not None)); print(int(torch.compiled_with_cxx11_abi()))"
  OUTPUT_VARIABLE _eplb_torch_out RESULT_VARIABLE _eplb_torch_rc OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _eplb_torch_rc EQUAL 0)
  message(FATAL_ERROR "eplb_native: `import torch` failed in ${Python_EXECUTABLE}. Install torch first, "
    "then build with `pip install --no-build-isolation .`")
endif()
string(REPLACE "\n" ";" _eplb_torch_out "${_eplb_torch_out}")
list(GET _eplb_torch_out 0 _eplb_torch_prefix)
list(GET _eplb_torch_out 1 EPLB_TORCH_HAS_CUDA)
list(GET _eplb_torch_out 2 _eplb_cxx11_abi)
get_filename_component(_eplb_torch_root "${_eplb_torch_prefix}/../.." ABSOLUTE)
set(TORCH_INCLUDE_DIRS "${_eplb_torch_root}/include" "${_eplb_torch_root}/include/torch/csrc/api/include")
set(_eplb_torch_lib "${_eplb_torch_root}/lib")
# Link only what the ops use; find_package(Torch) would also drag in CUDA toolkit discovery for
# CPU-only builds of a CUDA torch.
set(EPLB_TORCH_LIBRARIES "${_eplb_torch_lib}/libc10${CMAKE_SHARED_LIBRARY_SUFFIX}"
  "${_eplb_torch_lib}/libtorch_cpu${CMAKE_SHARED_LIBRARY_SUFFIX}"
  "${_eplb_torch_lib}/libtorch${CMAKE_SHARED_LIBRARY_SUFFIX}")
set(EPLB_TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI=${_eplb_cxx11_abi}")
message(STATUS "eplb_native: torch at ${_eplb_torch_root} (CUDA: ${EPLB_TORCH_HAS_CUDA})")
