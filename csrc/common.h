// Shared by the CPU and CUDA kernels: buffer checks that return ffi::Error, and the export macro.
#ifndef JEM_CSRC_COMMON_H_
#define JEM_CSRC_COMMON_H_

#include <cstdint>
#include <initializer_list>
#include <string>

#include "xla/ffi/api/ffi.h"

// Handlers are extern "C" and exported, so a plain shared library can be loaded with ctypes as well
// as through the pybind11 module (which hides every other symbol).
#define JEM_DECLARE_HANDLER(fn) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* fn(XLA_FFI_CallFrame* call_frame)

// One AnyBuffer argument / result of a handler binding: every handler here takes and returns plain
// buffers and checks them itself (csrc/<feature>.h). Macros, as FFI bindings cannot be passed around.
#define JEM_ARG .Arg<::xla::ffi::AnyBuffer>()
#define JEM_RET .Ret<::xla::ffi::AnyBuffer>()

#define JEM_RETURN_IF_ERROR(expr)            \
  do {                                       \
    ::xla::ffi::Error jem_err_ = (expr);     \
    if (jem_err_.failure()) return jem_err_; \
  } while (0)

namespace jem {
namespace ffi = xla::ffi;

inline std::string DimsToString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Error unless `buf` has exactly the dimensions `expected`.
inline ffi::Error ExpectShape(const char* op, const char* name, const ffi::AnyBuffer& buf,
                              std::initializer_list<int64_t> expected) {
  auto dims = buf.dimensions();
  bool same = dims.size() == expected.size();
  size_t i = 0;
  for (int64_t e : expected) same = same && dims[i++] == e;
  if (same) return ffi::Error::Success();
  std::string want = "[";
  i = 0;
  for (int64_t e : expected) want += (i++ ? ", " : "") + std::to_string(e);
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " has shape " + DimsToString(dims) +
                                     ", expected " + want + "]");
}

inline ffi::Error ExpectRank(const char* op, const char* name, const ffi::AnyBuffer& buf, size_t rank) {
  if (buf.dimensions().size() == rank) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " must have rank " + std::to_string(rank) +
                                     ", got shape " + DimsToString(buf.dimensions()));
}

inline ffi::Error ExpectDtype(const char* op, const char* name, const ffi::AnyBuffer& buf, ffi::DataType dtype) {
  if (buf.element_type() == dtype) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " has dtype code " +
                                     std::to_string(static_cast<int>(buf.element_type())) + ", expected " +
                                     std::to_string(static_cast<int>(dtype)));
}

// Rows are copied as bytes, so any dtype of at least one byte works.
inline ffi::Error ExpectWholeBytes(const char* op, const char* name, const ffi::AnyBuffer& buf) {
  if (ffi::ByteWidth(buf.element_type()) > 0) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " must have a dtype of whole bytes");
}

inline bool IsFloat(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

inline ffi::Error ExpectFloat(const char* op, const char* name, const ffi::AnyBuffer& buf) {
  if (IsFloat(buf.element_type())) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " must be float32, bfloat16 or float16");
}

// Scratch of the CUDA device-wide exclusive scan: one partial sum per tile plus the total.
constexpr int64_t kScanTile = 2048;
inline int64_t ScanScratchElems(int64_t n) { return (n + kScanTile - 1) / kScanTile + 1; }

inline ffi::Error ExpectScratch(const char* op, const ffi::AnyBuffer& scratch, int64_t elems) {
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "scratch", scratch, ffi::DataType::S32));
  return ExpectShape(op, "scratch", scratch, {elems});
}

}  // namespace jem

#endif  // JEM_CSRC_COMMON_H_
