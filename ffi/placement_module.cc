// pybind11 module jax_elastic_moe.placement._loops: the native loops of the placement decision (csrc/placement.h) on numpy
// arrays. jax_elastic_moe/placement/packing.py calls it when it is built and falls back to its numpy
// reference otherwise. Arrays must already have the right dtype and be C-contiguous (the Python side
// makes them so): in/out arrays are never copied, so a mismatch is an error, not a silent copy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "csrc/placement.h"

namespace py = pybind11;

namespace {

template <typename T>
T* Data(py::array& a, const char* name, py::ssize_t size, bool writable) {
  if (!a.dtype().is(py::dtype::of<T>())) throw std::invalid_argument(std::string(name) + ": wrong dtype");
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + ": not C-contiguous");
  if (a.size() != size) {
    throw std::invalid_argument(std::string(name) + ": " + std::to_string(a.size()) + " elements, expected " +
                                std::to_string(size));
  }
  if (writable && !a.writeable()) throw std::invalid_argument(std::string(name) + ": read-only");
  return static_cast<T*>(const_cast<void*>(a.data()));  // written only where `writable` was checked
}

template <typename T>
T* Optional(py::object a, const char* name, py::ssize_t size, bool writable) {
  if (a.is_none()) return nullptr;
  py::array arr = py::reinterpret_borrow<py::array>(a);
  return Data<T>(arr, name, size, writable);
}

}  // namespace

PYBIND11_MODULE(_loops, m) {
  m.doc() = "native loops of jax-elastic-moe's placement decision (reference: placement/packing.py)";
  m.def(
      "replicate_experts",
      [](py::array loads, py::array logcnt, int64_t extra, int64_t max_count) {
        if (loads.ndim() != 2) throw std::invalid_argument("loads must be [layers, experts]");
        const int64_t layers = loads.shape(0), experts = loads.shape(1);
        const double* ld = Data<double>(loads, "loads", layers * experts, false);
        int64_t* out = Data<int64_t>(logcnt, "logcnt", layers * experts, true);
        py::gil_scoped_release release;
        jem::placement::ReplicateExperts(layers, experts, extra, max_count, ld, out);
      },
      py::arg("loads"), py::arg("logcnt"), py::arg("extra"), py::arg("max_count"));
  m.def(
      "pack_sorted",
      [](py::array weight, py::array key, py::array present, py::array sizes, py::array shares,
         py::array fair_limit, py::object preferred, py::array load, py::array holds, py::array pack_of_item,
         int64_t num_keys) {
        if (weight.ndim() != 2 || sizes.ndim() != 2) throw std::invalid_argument("weight and sizes must be 2-D");
        const int64_t layers = weight.shape(0), items = weight.shape(1), packs = sizes.shape(1);
        const int64_t cube = layers * (num_keys + 1) * packs;
        const double* w = Data<double>(weight, "weight", layers * items, false);
        const int64_t* k = Data<int64_t>(key, "key", layers * items, false);
        const bool* pr = Data<bool>(present, "present", layers * items, false);
        const int64_t* sz = Data<int64_t>(sizes, "sizes", layers * packs, false);
        const double* sh = Data<double>(shares, "shares", packs, false);
        const double* fl = Data<double>(fair_limit, "fair_limit", layers, false);
        const bool* pf = Optional<bool>(preferred, "preferred", cube, false);
        double* ld = Data<double>(load, "load", layers * packs, true);
        bool* hd = Data<bool>(holds, "holds", cube, true);
        int64_t* out = Data<int64_t>(pack_of_item, "pack_of_item", layers * items, true);
        for (int64_t i = 0; i < layers * items; ++i) {
          if (pr[i] && (k[i] < 0 || k[i] > num_keys)) throw std::invalid_argument("key out of range");
        }
        py::gil_scoped_release release;
        jem::placement::PackSorted(layers, items, packs, num_keys, w, k, pr, sz, sh, fl, pf, ld, hd, out);
      },
      py::arg("weight"), py::arg("key"), py::arg("present"), py::arg("sizes"), py::arg("shares"),
      py::arg("fair_limit"), py::arg("preferred"), py::arg("load"), py::arg("holds"), py::arg("pack_of_item"),
      py::arg("num_keys"));
  m.def(
      "refine_by_swaps",
      [](py::array expert, py::array weight, py::object target_max, py::object move_cost, py::array swaps,
         int64_t partners, int64_t max_rounds) {
        if (expert.ndim() != 3) throw std::invalid_argument("expert must be [layers, packs, slots]");
        const int64_t layers = expert.shape(0), packs = expert.shape(1), slots = expert.shape(2);
        const int64_t n = layers * packs * slots;
        int64_t* ex = Data<int64_t>(expert, "expert", n, true);
        double* wt = Data<double>(weight, "weight", n, true);
        const double* tm = Optional<double>(target_max, "target_max", layers, false);
        double* mc = Optional<double>(move_cost, "move_cost", n, true);
        int64_t* sw = Data<int64_t>(swaps, "swaps", layers, true);
        if (partners < 1) throw std::invalid_argument("partners must be >= 1");
        py::gil_scoped_release release;
        jem::placement::RefineBySwaps(layers, packs, slots, partners, max_rounds, ex, wt, tm, mc, sw);
      },
      py::arg("expert"), py::arg("weight"), py::arg("target_max"), py::arg("move_cost"), py::arg("swaps"),
      py::arg("partners"), py::arg("max_rounds"));
}
