// Plain-C launch interface of the CUDA kernels. The .cu files include only the CUDA runtime
// and csrc/include/tvr headers (so `nvcc -c` checks them on a machine without a CUDA torch);
// csrc/cuda/bindings.cpp adapts these launchers to the torch dispatcher.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace tvr {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// x, y: contiguous [rows / N, N, C] with rows = B*T*N.
cudaError_t token_shift_fwd(const void* x, void* y, int64_t rows, int64_t N, int64_t C, int64_t T,
                            int64_t fold, int64_t offset, int64_t elem_size, cudaStream_t stream);
cudaError_t token_shift_bwd(const void* grad, void* gx, DType dtype, int64_t rows, int64_t N, int64_t C,
                            int64_t T, int64_t fold, int64_t offset, cudaStream_t stream);

}  // namespace cuda
}  // namespace tvr
