// exp that vectorises, shared by the CPU kernels (host code only).
//
// The CPU kernels of Sinkhorn-Knopp, ISA/Bi-ISA and T-MASS are bound by exp, and the extension
// is built without -march flags (the hot functions are compiled per instruction set with
// target_clones), so neither ATen's Vectorized<float>::exp nor glibc's vector expf (which
// needs -ffast-math) is available: glibc's scalar expf call keeps every loop scalar. These are
// branch-free exps that GCC auto-vectorises in every clone (with -fno-trapping-math, set in
// setup.py, for the selects): Cody-Waite reduction x = n ln2 + r (ln2_hi has 16 significant
// bits, so n * ln2_hi is exact without an FMA) and a degree-6 minimax polynomial on
// |r| <= ln2/2 (relative error 2e-9; max error 1.31 ulp measured against double over
// [-110, 0]). Results in the denormal range round once, like expf: exp(-100) is 3.78e-44 and
// exp(x < -103.97) is 0, as torch.exp gives (the authors' Sinkhorn inf/NaN beyond a logit range
// of ~88-104 depends on this).
//
// Two variants:
// - fast_exp: any input; exp(x > 88.7) is inf and NaN in gives NaN out. The scale 2^n is
//   applied as two normal powers 2^(n/2) 2^(n - n/2), so that n may span [-159, 129].
// - fast_exp_nonpos: x <= 0 (softmax-style arguments: x - max), about half the instructions
//   of fast_exp. The polynomial's coefficients carry a factor 2^-64 (exact), so the scale is
//   one normal power 2^(n + 64) and no clamp from above or NaN select is needed. Exact for
//   x <= 43 (n + 64 stays a normal exponent); callers only pass x <= 0.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>

// always_inline: a call (GCC declines to inline it into the larger backward loops) keeps the
// loop scalar, 10x slower.
#define TVR_EXP_INLINE inline __attribute__((always_inline))

namespace tvr {
namespace exp_detail {

constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr uint32_t kRoundBits = 0x4B400000u;  // its bit pattern

// t = n + 1.5 * 2^23 (n = round(x / ln2) sits in t's low mantissa bits), returns r = x - n ln2.
TVR_EXP_INLINE float reduce(float x, float& t) {
  t = x * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const float r = n * -0.693145751953125f + x;
  return n * -1.428606765330187045e-06f + r;
}

constexpr float exp2_const(int e) {
  float v = 1.f;
  for (; e > 0; --e) v *= 2.f;
  for (; e < 0; ++e) v *= 0.5f;
  return v;
}

// 2^kLog2Scale * exp(r) for |r| <= ln2/2; the scale is a power of two, so scaling the
// coefficients is exact.
template <int kLog2Scale>
TVR_EXP_INLINE float poly(float r) {
  constexpr float s = exp2_const(kLog2Scale);
  float p = 0.0013843653621584053f * s;
  p = p * r + 0.008374155460122086f * s;
  p = p * r + 0.0416680020419913f * s;
  p = p * r + 0.1666643126083107f * s;
  p = p * r + 0.49999994208987447f * s;
  p = p * r + 1.0000000321654523f * s;
  return p * r + s;
}

// n from t (see reduce), in integer arithmetic.
TVR_EXP_INLINE int32_t exponent(float t) {
  uint32_t u;
  std::memcpy(&u, &t, sizeof u);
  return static_cast<int32_t>(u - kRoundBits);
}

// 2^e for e in [-126, 127].
TVR_EXP_INLINE float pow2(int32_t e) {
  const uint32_t b = static_cast<uint32_t>(e + 127) << 23;
  float s;
  std::memcpy(&s, &b, sizeof s);
  return s;
}

}  // namespace exp_detail

TVR_EXP_INLINE float fast_exp(float x) {
  namespace d = exp_detail;
  // Clamp so that n stays in [-159, 129]: exp(-110) rounds to 0, exp(89) to inf, as expf.
  // std::max/min (not ?:) keep the loop free of control flow for the vectoriser.
  const float xc = std::min(std::max(x, -110.f), 89.f);
  float t;
  const float r = d::reduce(xc, t);
  const float p = d::poly<0>(r);
  // n = n1 + n2 with both halves normal exponents; one rounding, in the last product.
  const int32_t n = d::exponent(t), n1 = n >> 1;
  const float y = p * d::pow2(n1) * d::pow2(n - n1);
  return x != x ? x : y;  // NaN in, NaN out (the clamp would have hidden it)
}

TVR_EXP_INLINE float fast_exp_nonpos(float x) {
  namespace d = exp_detail;
  // -110: n >= -159, so n + 64 + 127 >= 32 stays a normal exponent; exp(-110) rounds to 0.
  const float xc = std::max(x, -110.f);
  float t;
  const float r = d::reduce(xc, t);
  return d::poly<-64>(r) * d::pow2(d::exponent(t) + 64);
}

inline double fast_exp(double x) { return std::exp(x); }
inline double fast_exp_nonpos(double x) { return std::exp(x); }

}  // namespace tvr
