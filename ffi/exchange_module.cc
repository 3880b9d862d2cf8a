// pybind11 module _exchange_cpu (or _exchange_cuda, built with JEM_PLATFORM_CUDA: the same
// functions and the CUDA handler): the jem_exchange handler capsule and the functions that create and
// update its per-process contexts (csrc/exchange.h). Separate from _ffi_cpu because it needs
// Mooncake's symbols at load time (runtime/exchange_ffi.py makes them visible first); the kernels
// of _ffi_cpu load without Mooncake.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "csrc/exchange.h"

#ifdef JEM_PLATFORM_CUDA
#define JEM_EXCHANGE_MODULE _exchange_cuda
#define JEM_EXCHANGE_HANDLER JemExchangeCuda
#else
#define JEM_EXCHANGE_MODULE _exchange_cpu
#define JEM_EXCHANGE_HANDLER JemExchangeCpu
#endif

namespace py = pybind11;
namespace ex = jem::exchange;

namespace {

void Raise(const std::string& error) {
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace

PYBIND11_MODULE(JEM_EXCHANGE_MODULE, m) {
  m.doc() = "jem_exchange: the cross-rank EP exchange through Mooncake, as an XLA FFI op";
  m.def("handler", []() { return py::capsule(reinterpret_cast<void*>(JEM_EXCHANGE_HANDLER)); });
  m.def(
      "create",
      [](uintptr_t engine, int64_t rank, int64_t num_ranks, int64_t buffers, int64_t slot_bytes,
         int64_t probes_offset, int64_t slots_offset, uint64_t recv_base, uint64_t recv_bytes, uint64_t staging_base,
         uint64_t staging_stride) {
        std::string error;
        const ex::Geometry g{rank, num_ranks, buffers, slot_bytes, probes_offset, slots_offset,
                             recv_base, recv_bytes, staging_base, staging_stride};
        const int64_t id = ex::Create(engine, g, &error);
        Raise(error);
        return id;
      },
      "Creates a context; returns its id (the op's ctx attribute).");
  m.def("destroy", [](int64_t id) {
    py::gil_scoped_release release;
    return ex::Destroy(id);
  });
  m.def("set_peer", [](int64_t id, int64_t rank, const std::string& segment, uint64_t recv_base, bool open,
                       const std::string& reason, int64_t drain_ns) {
    std::string error;
    {
      py::gil_scoped_release release;
      error = ex::SetPeer(id, rank, segment, recv_base, open, reason, drain_ns);
    }
    Raise(error);
  });
  m.def("set_blocked", [](int64_t id, int64_t rank) { Raise(ex::SetBlocked(id, rank)); });
  m.def("set_fault", [](int64_t id, bool drop, int64_t delay_ns) { Raise(ex::SetFault(id, drop, delay_ns)); });
  m.def("set_epoch", [](int64_t id, uint64_t epoch) { Raise(ex::SetEpoch(id, epoch)); });
  m.def("stale_signals", [](int64_t id) {
    int64_t count = 0;
    Raise(ex::StaleSignals(id, &count));
    return count;
  }, "Signals that arrived from another epoch or from a rank not live, and were dropped.");
  m.def("self_test", [](int64_t id, const std::string& own_segment, int64_t timeout_ns) {
    py::gil_scoped_release release;
    return ex::SelfTest(id, own_segment, timeout_ns);
  }, "\"\" when an 8-byte write to this rank's own segment arrives; else why not.");
  m.def("last_failure", [](int64_t id) {
    int64_t seq = 0;
    std::vector<ex::FailureRecord> records;
    Raise(ex::LastFailure(id, &seq, &records));
    py::list out;
    for (const auto& r : records) out.append(py::make_tuple(r.rank, r.kind, r.reason));
    return py::make_tuple(seq, out);
  }, "(seq, [(rank, kind, reason)]) of the last op; kind: failed, timeout or silent.");
  m.def("last_elapsed_ns", [](int64_t id) {
    int64_t ns = 0;
    Raise(ex::LastElapsed(id, &ns));
    return ns;
  }, "Nanoseconds the last op took inside C++ (benchmarks).");
  m.def("peers", [](int64_t id) {
    std::vector<ex::PeerReport> reports;
    {
      py::gil_scoped_release release;
      Raise(ex::Peers(id, &reports));
    }
    py::dict out;
    for (const auto& p : reports) out[py::int_(p.rank)] = py::make_tuple(p.state, p.reason, p.orphans);
    return out;
  }, "rank -> (state, reason, orphans)");
  m.def("reclaim", [](int64_t id) {
    py::gil_scoped_release release;
    return ex::Reclaim(id);
  });
}
