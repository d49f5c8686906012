// Token shift (SPEC 1), CUDA. One thread block per group of token rows; a row is copied with
// 16-byte vector accesses when C * elem_size allows it (C = 768 float32 rows are 3 KiB).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"
#include "tvr/token_shift.h"

namespace tvr {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename V>
__global__ void shift_rows(const V* __restrict__ x, V* __restrict__ y, int64_t rows, int64_t N,
                           int64_t vecs_per_row, int64_t T, int64_t fold, int64_t offset) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t bt = r / N, n = r % N, t = bt % T;
    const int64_t s = token_shift_source(t, n, T, fold, offset);
    const V* src = x + ((bt - t + s) * N + n) * vecs_per_row;
    V* dst = y + r * vecs_per_row;
    for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) dst[c] = src[c];
  }
}

template <typename T_>
__device__ __forceinline__ float to_f(T_ v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T_, typename Acc>
__device__ __forceinline__ T_ from_acc(Acc v) { return static_cast<T_>(v); }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

template <typename T_, typename Acc>
__global__ void shift_rows_bwd(const T_* __restrict__ g, T_* __restrict__ gx, int64_t rows, int64_t N,
                               int64_t C, int64_t T, int64_t fold, int64_t offset) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t bt = r / N, n = r % N, t = bt % T;
    int64_t frames[3];
    const int count = token_shift_readers(t, n, T, fold, offset, frames);
    T_* o = gx + r * C;
    const T_* a = g + ((bt - t + frames[0]) * N + n) * C;
    const T_* b = g + ((bt - t + frames[count > 1 ? 1 : 0]) * N + n) * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      if (count == 0) {
        o[c] = from_acc<T_, Acc>(Acc(0));
      } else if (count == 1) {
        o[c] = a[c];
      } else {
        o[c] = from_acc<T_, Acc>(static_cast<Acc>(to_f(a[c])) + static_cast<Acc>(to_f(b[c])));
      }
    }
  }
}

template <>
__global__ void shift_rows_bwd<double, double>(const double* __restrict__ g, double* __restrict__ gx,
                                               int64_t rows, int64_t N, int64_t C, int64_t T,
                                               int64_t fold, int64_t offset) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t bt = r / N, n = r % N, t = bt % T;
    int64_t frames[3];
    const int count = token_shift_readers(t, n, T, fold, offset, frames);
    double* o = gx + r * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      double acc = 0.0;
      for (int i = 0; i < count; ++i) acc += g[((bt - t + frames[i]) * N + n) * C + c];
      o[c] = acc;
    }
  }
}

unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(rows < (1 << 20) ? rows : (1 << 20));
}

}  // namespace

cudaError_t token_shift_fwd(const void* x, void* y, int64_t rows, int64_t N, int64_t C, int64_t T,
                            int64_t fold, int64_t offset, int64_t elem_size, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t row_bytes = C * elem_size;
  const bool aligned16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(y) % 16 == 0;
  if (aligned16) {
    shift_rows<<<grid_for(rows), kThreads, 0, stream>>>(static_cast<const int4*>(x), static_cast<int4*>(y),
                                                         rows, N, row_bytes / 16, T, fold, offset);
  } else {
    shift_rows<<<grid_for(rows), kThreads, 0, stream>>>(static_cast<const char*>(x), static_cast<char*>(y),
                                                         rows, N, row_bytes, T, fold, offset);
  }
  return cudaGetLastError();
}

cudaError_t token_shift_bwd(const void* grad, void* gx, DType dtype, int64_t rows, int64_t N, int64_t C,
                            int64_t T, int64_t fold, int64_t offset, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const unsigned grid = grid_for(rows);
  switch (dtype) {
    case DType::kFloat32:
      shift_rows_bwd<float, float><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(grad), static_cast<float*>(gx), rows, N, C, T, fold, offset);
      break;
    case DType::kFloat16:
      shift_rows_bwd<__half, float><<<grid, kThreads, 0, stream>>>(
          static_cast<const __half*>(grad), static_cast<__half*>(gx), rows, N, C, T, fold, offset);
      break;
    case DType::kBFloat16:
      shift_rows_bwd<__nv_bfloat16, float><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(grad), static_cast<__nv_bfloat16*>(gx), rows, N, C, T, fold, offset);
      break;
    case DType::kFloat64:
      shift_rows_bwd<double, double><<<grid, kThreads, 0, stream>>>(
          static_cast<const double*>(grad), static_cast<double*>(gx), rows, N, C, T, fold, offset);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tvr
