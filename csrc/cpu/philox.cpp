// Exposes the shared Philox generator (csrc/include/tvr/philox.h) so tests can check that the
// C++, Triton and torch transcriptions produce the same bits.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "tvr/philox.h"

namespace tvr {
namespace {

// counters: int64 [n, 4] holding uint32 values; returns int64 [n, 4] of Philox outputs.
at::Tensor philox_cpu(const at::Tensor& counters_in, int64_t seed) {
  TORCH_CHECK(counters_in.dim() == 2 && counters_in.size(1) == 4 &&
                  counters_in.scalar_type() == at::kLong,
              "philox: counters must be int64 [n, 4]");
  const at::Tensor counters = counters_in.contiguous();
  at::Tensor out = at::empty_like(counters);
  const int64_t* c = counters.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < counters.size(0); ++i) {
    const U32x4 r = philox4x32_10(static_cast<uint32_t>(c[4 * i]), static_cast<uint32_t>(c[4 * i + 1]),
                                  static_cast<uint32_t>(c[4 * i + 2]), static_cast<uint32_t>(c[4 * i + 3]),
                                  static_cast<uint64_t>(seed));
    for (int j = 0; j < 4; ++j) o[4 * i + j] = r.v[j];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tvr_C, m) { m.def("philox(Tensor counters, int seed) -> Tensor"); }

TORCH_LIBRARY_IMPL(tvr_C, CPU, m) { m.impl("philox", &philox_cpu); }

}  // namespace tvr
