// Token shift (SPEC 1), CPU. Forward is a row gather (one memcpy per token row, no dtype
// dispatch needed); backward sums the at most two output rows that read each input row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "tvr/token_shift.h"

namespace tvr {
namespace {

struct ShiftGeometry {
  int64_t rows, N, C, T, fold, offset;
};

ShiftGeometry geometry(const at::Tensor& x, int64_t num_frames, int64_t fold_div, int64_t offset) {
  TORCH_CHECK(x.dim() == 3, "token_shift: x must be [B*T, N, C], got ", x.sizes());
  TORCH_CHECK(num_frames >= 1 && x.size(0) % num_frames == 0,
              "token_shift: x.size(0) must be a multiple of num_frames");
  TORCH_CHECK(fold_div >= 1 && x.size(1) / fold_div >= 1, "token_shift: N // fold_div must be >= 1");
  TORCH_CHECK(offset >= 0, "token_shift: offset must be >= 0");
  return {x.size(0) * x.size(1), x.size(1), x.size(2), num_frames, x.size(1) / fold_div, offset};
}

// Grain in rows so that one task moves at least ~64 KiB.
int64_t grain(const ShiftGeometry& g, int64_t elem) {
  return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, g.C * elem));
}

at::Tensor token_shift_fwd_cpu(const at::Tensor& x_in, int64_t num_frames, int64_t fold_div,
                               int64_t offset) {
  const at::Tensor x = x_in.contiguous();
  const ShiftGeometry g = geometry(x, num_frames, fold_div, offset);
  at::Tensor y = at::empty_like(x);
  const int64_t row_bytes = g.C * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(y.mutable_data_ptr());
  at::parallel_for(0, g.rows, grain(g, x.element_size()), [&](int64_t begin, int64_t end) {
    // Rows whose sources are consecutive too (most tokens stay in their frame) are copied by
    // one memcpy: per-row 3 KiB copies ran at 70% of a plain copy's bandwidth.
    int64_t run_dst = begin, run_src = -1, run_len = 0;
    const auto flush = [&] {
      if (run_len > 0) std::memcpy(dst + run_dst * row_bytes, src + run_src * row_bytes, run_len * row_bytes);
    };
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bt = r / g.N, n = r % g.N, t = bt % g.T;
      const int64_t src_row = (bt - t + token_shift_source(t, n, g.T, g.fold, g.offset)) * g.N + n;
      if (run_len > 0 && src_row == run_src + run_len) {
        ++run_len;
        continue;
      }
      flush();
      run_dst = r;
      run_src = src_row;
      run_len = 1;
    }
    flush();
  });
  return y;
}

at::Tensor token_shift_bwd_cpu(const at::Tensor& grad_in, int64_t num_frames, int64_t fold_div,
                               int64_t offset) {
  const at::Tensor grad = grad_in.contiguous();
  const ShiftGeometry g = geometry(grad, num_frames, fold_div, offset);
  at::Tensor gx = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "token_shift_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    scalar_t* out = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.rows, grain(g, sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bt = r / g.N, n = r % g.N, t = bt % g.T;
        int64_t frames[3];
        const int count = token_shift_readers(t, n, g.T, g.fold, g.offset, frames);
        scalar_t* o = out + r * g.C;
        if (count == 0) {
          std::memset(o, 0, g.C * sizeof(scalar_t));
        } else if (count == 1) {
          std::memcpy(o, go + ((bt - t + frames[0]) * g.N + n) * g.C, g.C * sizeof(scalar_t));
        } else {
          // Two readers: add in the op-math type and round once, as PyTorch's own add does.
          const scalar_t* a = go + ((bt - t + frames[0]) * g.N + n) * g.C;
          const scalar_t* b = go + ((bt - t + frames[1]) * g.N + n) * g.C;
          for (int64_t c = 0; c < g.C; ++c) o[c] = static_cast<scalar_t>(acc_t(a[c]) + acc_t(b[c]));
        }
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tvr_C, m) {
  m.def("token_shift_fwd(Tensor x, int num_frames, int fold_div, int offset) -> Tensor");
  m.def("token_shift_bwd(Tensor grad, int num_frames, int fold_div, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(tvr_C, CPU, m) {
  m.impl("token_shift_fwd", &token_shift_fwd_cpu);
  m.impl("token_shift_bwd", &token_shift_bwd_cpu);
}

}  // namespace tvr
