// pybind11 module exposing the FFI handlers of one platform as PyCapsules. Built twice from this
// file: _ffi_cpu (JEM_PLATFORM_CUDA undefined) and _ffi_cuda. jax_elastic_moe/ep/ffi.py registers
// the capsules with jax.ffi.register_ffi_target at import.
#include <pybind11/pybind11.h>

#include "csrc/dispatch.h"
#include "csrc/grouped_matmul.h"
#include "csrc/regroup.h"
#include "csrc/segment_sum.h"

#ifdef JEM_PLATFORM_CUDA
#define JEM_HANDLER(name) name##Cuda
#define JEM_MODULE_NAME _ffi_cuda
#define JEM_XLA_PLATFORM "CUDA"
#else
#define JEM_HANDLER(name) name##Cpu
#define JEM_MODULE_NAME _ffi_cpu
#define JEM_XLA_PLATFORM "cpu"
#endif

namespace py = pybind11;

namespace {

py::capsule Capsule(XLA_FFI_Error* (*fn)(XLA_FFI_CallFrame*)) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

PYBIND11_MODULE(JEM_MODULE_NAME, m) {
  m.doc() = "XLA FFI handlers of jax-elastic-moe's EP ops for one platform";
  m.attr("platform") = JEM_XLA_PLATFORM;
  // Keys are the handler symbols without the platform suffix (JemDispatchCpu -> JemDispatch).
  m.def("handlers", []() {
    py::dict d;
    d["JemDispatch"] = Capsule(JEM_HANDLER(JemDispatch));
    d["JemRegroup"] = Capsule(JEM_HANDLER(JemRegroup));
    d["JemUngroup"] = Capsule(JEM_HANDLER(JemUngroup));
    d["JemCombine"] = Capsule(JEM_HANDLER(JemCombine));
#ifndef JEM_PLATFORM_CUDA
    d["JemGroupedMatmul"] = Capsule(JemGroupedMatmulCpu);  // CUDA: the Mosaic GPU ragged_dot
    d["JemGroupedMatmulFp8"] = Capsule(JemGroupedMatmulFp8Cpu);
#endif
    return d;
  });
}
