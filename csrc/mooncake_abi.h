// The few declarations of Mooncake Transfer Engine's C++ API that the exchange op calls, written
// from Mooncake's public headers (mooncake-transfer-engine/include/transfer_engine.h,
// transport/transport.h, common/base/status.h) of the pinned versions (pyproject: 0.3.13.x).
//
// Nothing here is defined: the symbols resolve at load time against the Python binding's shared
// object (mooncake/engine.so, which exports these member functions), promoted to global scope by
// runtime/exchange_ffi.py before the module that uses them is imported. Names and argument types
// are checked by the dynamic linker (a renamed or retyped function fails the import); struct
// layouts are not, so the worker runs a self-test transfer before trusting them (ExchangeSelfTest).
#ifndef JEM_CSRC_MOONCAKE_ABI_H_
#define JEM_CSRC_MOONCAKE_ABI_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mooncake {

// common/base/status.h: a 16-bit code and an owned C string (nullptr when OK). Its destructor is
// non-trivial, so it is returned through a hidden pointer: ours must be non-trivial too.
class Status final {
 public:
  Status() = default;
  ~Status() { delete[] message_; }
  Status(const Status&) = delete;
  Status& operator=(const Status&) = delete;
  bool ok() const { return code_ == 0; }
  uint16_t code() const { return code_; }
  const char* message() const { return message_ ? message_ : ""; }

 private:
  uint16_t code_ = 0;
  const char* message_ = nullptr;
};

// transport/transport.h (only the nested types the engine's methods take).
class Transport {
 public:
  using SegmentID = uint64_t;
  using SegmentHandle = SegmentID;
  using BatchID = uint64_t;

  struct TransferRequest {
    enum OpCode { READ, WRITE };
    OpCode opcode;
    void* source;
    SegmentID target_id;
    uint64_t target_offset;
    size_t length;
    int advise_retry_cnt = 0;
    int transport_hint = 0;      // TENT only
    uint64_t task_group_id = 0;  // since 0.3.13 (scatter batching)
  };

  enum TransferStatusEnum { WAITING, PENDING, INVALID, CANCELED, COMPLETED, TIMEOUT, FAILED };

  struct TransferStatus {
    TransferStatusEnum s;
    size_t transferred_bytes;
  };

 private:
  Transport() = delete;
};

// transfer_engine.h: only obtained as a pointer (TransferEngine.get_engine_ptr() in Python).
class TransferEngine {
 public:
  Transport::SegmentHandle openSegment(const std::string& segment_name);
  Transport::BatchID allocateBatchID(size_t batch_size);
  Status freeBatchID(Transport::BatchID batch_id);
  Status submitTransfer(Transport::BatchID batch_id, const std::vector<Transport::TransferRequest>& entries);
  Status getTransferStatus(Transport::BatchID batch_id, size_t task_id, Transport::TransferStatus& status);

 private:
  TransferEngine() = delete;
};

}  // namespace mooncake

#endif  // JEM_CSRC_MOONCAKE_ABI_H_
