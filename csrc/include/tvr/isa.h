// ISA (SPEC 3) on one row: the forward and its analytic backward, written once. The standalone
// isa kernel uses them for long rows and Bi-ISA for its second stages; the "across lanes"
// variants in csrc/cpu/isa.cpp (short rows, Bi-ISA first stages) apply the same formulas to
// 16 or K rows at a time.
//
// For a row x of length n, weight W [n, n] (row-major) and 1/tau = s:
//   a = softmax(s x),  b_j = sum_i a_i W[i, j],  w = softmax(s b),  y = sum_j w_j x_j.
// Backward for an incoming gradient gy (from the forward's a, w, y):
//   dy/dw_j = x_j                       -> db_j = s w_j (gy x_j - sum_k w_k gy x_k)
//                                               = s gy w_j (x_j - y)
//   b = a W                             -> da_i = sum_j W[i, j] db_j,  gW[i, j] += a_i db_j
//   y also reads x directly (gy w_i), and a = softmax(s x):
//   gx_i = gy w_i + s a_i (da_i - sum_k a_k da_k).
// Loops are written over contiguous memory (the transposed weight WT turns W db into a sum
// of rows) so the compiler vectorises them; exp is tvr::fast_exp_nonpos (tvr/fast_math.h; the
// softmax arguments are <= 0; glibc's expf is a scalar call and dominates Bi-ISA otherwise).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "tvr/common.h"
#include "tvr/fast_math.h"

namespace tvr {

// The row helpers are forced inline so that the fused kernels' hot loops, compiled once per
// instruction set (target_clones in csrc/cpu/isa.cpp), inline them at that instruction set.
// `omp simd reduction` lets the compiler reassociate the sums and maxima (and so vectorise
// them) without -ffast-math for the whole file.
#if defined(__GNUC__) && !defined(__CUDACC__)
#define TVR_ROW inline __attribute__((always_inline))
#else
#define TVR_ROW inline
#endif

// In place: v <- softmax(s v) over n entries.
// Template argument N > 0 fixes n at compile time (the kernels instantiate the papers' sizes,
// 12, 32 and 48, so loops unroll and rows stay in registers); N = 0 reads n at run time.
template <int N = 0, typename T>
TVR_ROW void isa_softmax(T* v, int64_t n_, T s) {
  const int64_t n = N > 0 ? N : n_;
  T m = v[0];
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = v[i] > m ? v[i] : m;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = fast_exp_nonpos((v[i] - m) * s);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += v[i];
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] *= inv;
}

// Forward of one row. a[n] and w[n] receive A and w (the backward reuses them). Returns y.
template <int N = 0, typename T>
TVR_ROW T isa_row_forward(const T* x, int64_t n_, const T* W, T s, T* a, T* w) {
  const int64_t n = N > 0 ? N : n_;
  for (int64_t i = 0; i < n; ++i) a[i] = x[i];
  isa_softmax<N>(a, n, s);
  for (int64_t j = 0; j < n; ++j) w[j] = 0;
  for (int64_t i = 0; i < n; ++i) {  // w = a W as a sum of W's rows (contiguous, vectorises)
    const T ai = a[i];
    const T* Wi = W + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) w[j] += ai * Wi[j];
  }
  isa_softmax<N>(w, n, s);
  T y = 0;
#pragma omp simd reduction(+ : y)
  for (int64_t j = 0; j < n; ++j) y += w[j] * x[j];
  return y;
}

// Backward of one row from its forward (a, w, y as isa_row_forward left them) and gy: writes
// gx[n] (overwritten, not accumulated) and adds a^T db to gW [n, n]. WT is W transposed
// (row-major). scratch holds 2 n values.
template <int N = 0, typename T>
TVR_ROW void isa_row_backward(const T* x, int64_t n_, const T* WT, T s, T gy, const T* a,
                              const T* w, T y, T* gx, T* gW, T* scratch) {
  const int64_t n = N > 0 ? N : n_;
  T* db = scratch;
  T* da = scratch + n;
  const T c = s * gy;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) db[j] = c * w[j] * (x[j] - y);
  for (int64_t i = 0; i < n; ++i) da[i] = 0;
  for (int64_t j = 0; j < n; ++j) {  // da = W db = sum_j db_j WT[j, :]
    const T dbj = db[j];
    const T* WTj = WT + j * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) da[i] += dbj * WTj[i];
  }
  for (int64_t i = 0; i < n; ++i) {  // gW += a^T db
    const T ai = a[i];
    T* gWi = gW + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gWi[j] += ai * db[j];
  }
  T ada = 0;
#pragma omp simd reduction(+ : ada)
  for (int64_t i = 0; i < n; ++i) ada += a[i] * da[i];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) gx[i] = gy * w[i] + s * a[i] * (da[i] - ada);
}

}  // namespace tvr
