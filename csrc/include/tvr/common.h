// Macros shared by the CPU (g++) and CUDA (nvcc) builds. Headers under csrc/include/tvr hold
// the per-element math of each op once, so the C++ CPU kernels, the CUDA kernels and (by
// transcription, tested for equality) the Triton kernels compute the same thing.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define TVR_HD __host__ __device__ __forceinline__
#else
#define TVR_HD inline
#endif
