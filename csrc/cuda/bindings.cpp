// CUDA implementations of the tvr_C ops (compiled only when the extension is a CUDAExtension):
// adapts tensors to the plain launchers in csrc/cuda/launch.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

namespace tvr {
namespace {

cuda::DType dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kFloat64;
    default: TORCH_CHECK(false, "tvr cuda kernels take float16/bfloat16/float32/float64, got ", t.scalar_type());
  }
}

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "tvr cuda launch failed: ", cudaGetErrorString(err)); }

at::Tensor token_shift_fwd_cuda(const at::Tensor& x_in, int64_t num_frames, int64_t fold_div, int64_t offset) {
  TORCH_CHECK(x_in.dim() == 3, "token_shift: x must be [B*T, N, C]");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  check(cuda::token_shift_fwd(x.const_data_ptr(), y.mutable_data_ptr(), x.size(0) * x.size(1), x.size(1), x.size(2),
                              num_frames, x.size(1) / fold_div, offset, x.element_size(),
                              c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor token_shift_bwd_cuda(const at::Tensor& g_in, int64_t num_frames, int64_t fold_div, int64_t offset) {
  TORCH_CHECK(g_in.dim() == 3, "token_shift: grad must be [B*T, N, C]");
  const c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous();
  at::Tensor gx = at::empty_like(g);
  check(cuda::token_shift_bwd(g.const_data_ptr(), gx.mutable_data_ptr(), dtype_code(g), g.size(0) * g.size(1),
                              g.size(1), g.size(2), num_frames, g.size(1) / fold_div, offset,
                              c10::cuda::getCurrentCUDAStream()));
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tvr_C, CUDA, m) {
  m.impl("token_shift_fwd", &token_shift_fwd_cuda);
  m.impl("token_shift_bwd", &token_shift_bwd_cuda);
}

}  // namespace tvr
