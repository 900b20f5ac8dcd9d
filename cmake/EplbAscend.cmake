# EPLB_NATIVE_ASCEND=AUTO|ON|OFF -> EPLB_WITH_ASCEND. The Ascend C build lives in its own issue;
# until then AUTO and OFF build nothing and ON says what is missing.
set(EPLB_WITH_ASCEND OFF)
string(TOUPPER "${EPLB_NATIVE_ASCEND}" _eplb_ascend)
if(_eplb_ascend STREQUAL "ON")
  message(FATAL_ERROR "EPLB_NATIVE_ASCEND=ON: the Ascend C kernels are not part of this build yet")
endif()
message(STATUS "eplb_native: Ascend C kernels: ${EPLB_WITH_ASCEND}")
