# EPLB_NATIVE_ASCEND=AUTO|ON|OFF -> EPLB_WITH_ASCEND: the Ascend C kernels of csrc/ops/ascendc,
# built with CANN's own Ascend C CMake support (ascendc.cmake, ascendc_library) and registered
# for torch_npu's PrivateUse1 dispatch key.
#   AUTO  builds them when CANN and torch_npu are both found, otherwise says why not and goes on;
#   ON    fails the configure, naming what is missing;
#   OFF   never looks.
# Options (only read when not OFF):
#   EPLB_ASCEND_SOC_VERSION  SOC_VERSION given to CANN (default Ascend910B1).
#   EPLB_ASCEND_RUN_MODE     CANN's RUN_MODE: npu (default; the torch ops), cpu (CANN's CPU-debug
#                            model, ASCENDC_CPU_DEBUG) or sim (CANN's simulator). cpu and sim
#                            build only the kernel library `eplb_ascend_kernels` (for hosts with
#                            CANN and no NPU); torch_npu is not needed and nothing is registered.
# CANN is found from -DASCEND_CANN_PACKAGE_PATH, then $ASCEND_CANN_PACKAGE_PATH, then
# $ASCEND_HOME_PATH (set by CANN's set_env.sh).
set(EPLB_WITH_ASCEND OFF)
set(EPLB_ASCEND_SOC_VERSION "Ascend910B1" CACHE STRING "Ascend SOC_VERSION the kernels are built for")
set(EPLB_ASCEND_RUN_MODE "npu" CACHE STRING "CANN RUN_MODE of the Ascend C kernels: npu, cpu or sim")
string(TOUPPER "${EPLB_NATIVE_ASCEND}" _eplb_ascend)
if(NOT _eplb_ascend MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "EPLB_NATIVE_ASCEND must be AUTO, ON or OFF, got '${EPLB_NATIVE_ASCEND}'")
endif()

if(NOT _eplb_ascend STREQUAL "OFF")
  set(_eplb_ascend_missing "")
  if(NOT EPLB_ASCEND_RUN_MODE MATCHES "^(npu|cpu|sim)$")
    message(FATAL_ERROR "EPLB_ASCEND_RUN_MODE must be npu, cpu or sim, got '${EPLB_ASCEND_RUN_MODE}'")
  endif()

  # ---- CANN and its Ascend C CMake support
  if(NOT ASCEND_CANN_PACKAGE_PATH)
    if(DEFINED ENV{ASCEND_CANN_PACKAGE_PATH})
      set(ASCEND_CANN_PACKAGE_PATH "$ENV{ASCEND_CANN_PACKAGE_PATH}")
    elseif(DEFINED ENV{ASCEND_HOME_PATH})
      set(ASCEND_CANN_PACKAGE_PATH "$ENV{ASCEND_HOME_PATH}")
    endif()
  endif()
  set(_eplb_ascendc_cmake "")
  if(ASCEND_CANN_PACKAGE_PATH)
    foreach(_dir compiler/tikcpp/ascendc_kernel_cmake tools/tikcpp/ascendc_kernel_cmake
                 ascendc_devkit/tikcpp/samples/cmake)
      if(NOT _eplb_ascendc_cmake AND EXISTS "${ASCEND_CANN_PACKAGE_PATH}/${_dir}/ascendc.cmake")
        set(_eplb_ascendc_cmake "${ASCEND_CANN_PACKAGE_PATH}/${_dir}/ascendc.cmake")
      endif()
    endforeach()
    if(NOT _eplb_ascendc_cmake)
      list(APPEND _eplb_ascend_missing
        "CANN's ascendc.cmake (looked under ${ASCEND_CANN_PACKAGE_PATH}/{compiler,tools}/tikcpp/ascendc_kernel_cmake and ascendc_devkit/tikcpp/samples/cmake)")
    endif()
  else()
    list(APPEND _eplb_ascend_missing
      "CANN (set ASCEND_HOME_PATH by sourcing CANN's set_env.sh, or pass -DASCEND_CANN_PACKAGE_PATH=...)")
  endif()

  # ---- torch_npu (the torch ops only; cpu/sim build the kernel library alone)
  set(EPLB_TORCH_NPU_ROOT "")
  if(EPLB_ASCEND_RUN_MODE STREQUAL "npu")
    execute_process(
      COMMAND ${Python_EXECUTABLE} -c "import os, torch_npu; print(os.path.dirname(torch_npu.__file__))"
      OUTPUT_VARIABLE _eplb_torch_npu_out RESULT_VARIABLE _eplb_torch_npu_rc
      OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_eplb_torch_npu_rc EQUAL 0 AND EXISTS "${_eplb_torch_npu_out}/include")
      set(EPLB_TORCH_NPU_ROOT "${_eplb_torch_npu_out}")
    else()
      list(APPEND _eplb_ascend_missing "torch_npu (`import torch_npu` failed in ${Python_EXECUTABLE})")
    endif()
  endif()

  if(_eplb_ascend_missing)
    string(REPLACE ";" "; " _eplb_missing_text "${_eplb_ascend_missing}")
    if(_eplb_ascend STREQUAL "ON")
      message(FATAL_ERROR "EPLB_NATIVE_ASCEND=ON, but the Ascend C kernels need what was not found: "
        "${_eplb_missing_text}")
    endif()
    message(STATUS "eplb_native: Ascend C kernels not built (AUTO): missing ${_eplb_missing_text}")
  else()
    # CANN's ascendc.cmake reads SOC_VERSION, ASCEND_CANN_PACKAGE_PATH and RUN_MODE.
    set(SOC_VERSION "${EPLB_ASCEND_SOC_VERSION}")
    set(RUN_MODE "${EPLB_ASCEND_RUN_MODE}")
    if(RUN_MODE STREQUAL "cpu")
      list(APPEND CMAKE_PREFIX_PATH "${ASCEND_CANN_PACKAGE_PATH}/tools/tikicpulib/lib/cmake")
    endif()
    include("${_eplb_ascendc_cmake}")
    ascendc_library(eplb_ascend_kernels STATIC
      ${CMAKE_CURRENT_SOURCE_DIR}/csrc/ops/ascendc/record_kernels.cpp)
    ascendc_include_directories(eplb_ascend_kernels PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc/ops/ascendc)
    if(RUN_MODE STREQUAL "npu")
      set(EPLB_WITH_ASCEND ON)
    else()
      message(STATUS "eplb_native: Ascend C kernel library only (RUN_MODE=${RUN_MODE}); the torch "
        "ops need RUN_MODE=npu")
    endif()
  endif()
endif()
message(STATUS "eplb_native: Ascend C kernels: ${EPLB_WITH_ASCEND}")

# Adds the NPU launchers + PrivateUse1 registration to `target` (the _ops module) and links the
# kernel library. Called by CMakeLists.txt when EPLB_WITH_ASCEND is ON.
function(eplb_add_ascend_kernels target)
  target_sources(${target} PRIVATE ${PROJECT_SOURCE_DIR}/csrc/ops/ascendc/record_npu.cpp)
  target_include_directories(${target} PRIVATE ${EPLB_TORCH_NPU_ROOT}/include
    ${ASCEND_CANN_PACKAGE_PATH}/include)
  target_link_directories(${target} PRIVATE ${EPLB_TORCH_NPU_ROOT}/lib ${ASCEND_CANN_PACKAGE_PATH}/lib64)
  target_link_libraries(${target} PRIVATE eplb_ascend_kernels torch_npu)
  target_compile_definitions(${target} PRIVATE EPLB_WITH_ASCEND=1)
endfunction()
