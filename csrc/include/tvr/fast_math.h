// exp that vectorises, shared by the CPU kernels (host code only).
//
// The CPU kernels of Sinkhorn-Knopp, ISA/Bi-ISA and T-MASS are bound by exp, and the extension
// is built without -march flags (the hot functions are compiled per instruction set with
// target_clones), so neither ATen's Vectorized<float>::exp nor glibc's vector expf (which
// needs -ffast-math) is available: glibc's scalar expf call keeps every loop scalar. This is a
// branch-free exp that GCC auto-vectorises in every clone (with -fno-trapping-math, set in
// setup.py, for the selects): Cody-Waite reduction x = n ln2 + r (ln2_hi has 16 significant
// bits, so n * ln2_hi is exact without an FMA), a degree-7 Taylor polynomial on |r| <= ln2/2
// (truncation error 0.35^8 / 8! ~ 5e-9, max error ~1 ulp measured against double), and the
// scale 2^n applied as two normal powers 2^(n/2) 2^(n - n/2) so that results in the denormal
// range round once, like expf: exp(-100) is 3.78e-44, exp(x < -103.97) is 0 and exp(x > 88.7)
// is inf, as torch.exp gives (the authors' Sinkhorn inf/NaN beyond a logit range of ~88-104
// depends on this); NaN in gives NaN out.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace tvr {

// always_inline: a call (GCC declines to inline it into the larger backward loops) keeps the
// loop scalar, 10x slower.
inline __attribute__((always_inline)) float fast_exp(float x) {
  // Clamp so that n stays in [-159, 129]: exp(-110) rounds to 0, exp(89) to inf, as expf.
  // std::max/min (not ?:) keep the loop free of control flow for the vectoriser.
  float xc = std::min(std::max(x, -110.f), 89.f);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
  float r = n * -0.693145751953125f + xc;
  r = n * -1.428606765330187045e-06f + r;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof s1);
  std::memcpy(&s2, &b2, sizeof s2);
  const float y = p * s1 * s2;
  return x != x ? x : y;  // NaN in, NaN out (the clamp would have hidden it)
}

inline double fast_exp(double x) { return std::exp(x); }

}  // namespace tvr
