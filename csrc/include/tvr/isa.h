// ISA (SPEC 3) on one row: the forward and its analytic backward, written once and used by the
// standalone isa kernel and by both paths (both stages) of the fused Bi-ISA kernel.
//
// For a row x of length n, weight W [n, n] (row-major) and 1/tau = s:
//   a = softmax(s x),  b_j = sum_i a_i W[i, j],  w = softmax(s b),  y = sum_j w_j x_j.
// Backward for an incoming gradient gy:
//   dy/dw_j = x_j                       -> db_j = s w_j (gy x_j - sum_k w_k gy x_k)
//                                               = s gy w_j (x_j - y)
//   b = a W                             -> da_i = sum_j W[i, j] db_j,  gW[i, j] += a_i db_j
//   y also reads x directly (gy w_i), and a = softmax(s x):
//   gx_i = gy w_i + s a_i (da_i - sum_k a_k da_k).
// Loops are written over contiguous memory (the transposed weight WT turns W db into a sum
// of rows) so the compiler vectorises them; exp is the polynomial below for float (glibc's
// expf is a scalar call and dominates Bi-ISA otherwise), std::exp for double.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "tvr/common.h"

namespace tvr {

// exp(x) for x <= 0 in float, branch-free so loops over it vectorise: x = k ln2 + r with
// |r| <= ln2/2, exp(r) by a degree-6 minimax polynomial (~1 ulp), times 2^k built in the
// exponent bits. Inputs below -87 (exp < 2^-125, under the normal range) give 0, which is
// what a softmax needs (they are negligible against the row maximum's exp(0) = 1).
inline float isa_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const bool tiny = x < -87.0f;
  x = tiny ? -87.0f : x;
  const float t = x * kLog2e;
  const int k = static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f));  // round to nearest
  const float kf = static_cast<float>(k);
  const float r = (x - kf * kLn2Hi) - kf * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : e * scale;
}
inline double isa_exp(double x) { return std::exp(x); }

// In place: v <- softmax(s v) over n entries.
template <typename T>
inline void isa_softmax(T* v, int64_t n, T s) {
  T m = v[0];
  for (int64_t i = 1; i < n; ++i) m = v[i] > m ? v[i] : m;
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = isa_exp((v[i] - m) * s);
    sum += v[i];
  }
  const T inv = T(1) / sum;
  for (int64_t i = 0; i < n; ++i) v[i] *= inv;
}

// Forward of one row. a[n] and w[n] are scratch that receive A and w (the backward reuses
// them). Returns y.
template <typename T>
inline T isa_row_forward(const T* x, int64_t n, const T* W, T s, T* a, T* w) {
  for (int64_t i = 0; i < n; ++i) a[i] = x[i];
  isa_softmax(a, n, s);
  for (int64_t j = 0; j < n; ++j) w[j] = 0;
  for (int64_t i = 0; i < n; ++i) {  // w = a W as a sum of W's rows (contiguous, vectorises)
    const T ai = a[i];
    const T* Wi = W + i * n;
    for (int64_t j = 0; j < n; ++j) w[j] += ai * Wi[j];
  }
  isa_softmax(w, n, s);
  T y = 0;
  for (int64_t j = 0; j < n; ++j) y += w[j] * x[j];
  return y;
}

// Backward of one row given gy: writes gx[n] (overwritten, not accumulated) and adds a^T db to
// gW [n, n]. WT is W transposed (row-major). scratch holds 4 n values. Returns y.
template <typename T>
inline T isa_row_backward(const T* x, int64_t n, const T* W, const T* WT, T s, T gy, T* gx,
                          T* gW, T* scratch) {
  T* a = scratch;
  T* w = scratch + n;
  T* db = scratch + 2 * n;
  T* da = scratch + 3 * n;
  const T y = isa_row_forward(x, n, W, s, a, w);
  const T c = s * gy;
  for (int64_t j = 0; j < n; ++j) db[j] = c * w[j] * (x[j] - y);
  for (int64_t i = 0; i < n; ++i) da[i] = 0;
  for (int64_t j = 0; j < n; ++j) {  // da = W db = sum_j db_j WT[j, :]
    const T dbj = db[j];
    const T* WTj = WT + j * n;
    for (int64_t i = 0; i < n; ++i) da[i] += dbj * WTj[i];
  }
  for (int64_t i = 0; i < n; ++i) {  // gW += a^T db
    const T ai = a[i];
    T* gWi = gW + i * n;
    for (int64_t j = 0; j < n; ++j) gWi[j] += ai * db[j];
  }
  T ada = 0;
  for (int64_t i = 0; i < n; ++i) ada += a[i] * da[i];
  for (int64_t i = 0; i < n; ++i) gx[i] = gy * w[i] + s * a[i] * (da[i] - ada);
  return y;
}

}  // namespace tvr
