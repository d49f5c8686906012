// Perturbed top-K (SPEC 2): the per-element math shared by the C++ CPU kernel and any CUDA
// kernel. The Triton kernel (tvr_kernels/triton/perturbed_topk.py) and the reference
// (tvr_kernels/reference/perturbed_topk.py, perturbed_topk_noise) draw the same Philox bits.
//
// Noise keying. Element (row b, sample s, index i) of the [b, S, d] noise comes from ONE
// Philox4x32-10 call per group of four consecutive indices,
//     counter = (i / 4, s, b, TVR_PTOPK_STREAM),  key = seed,
// lane i % 4 of its outputs (r0, r1, r2, r3):
//   * normal: Box-Muller on (r0, r1) gives lanes 0 (r cos) and 1 (r sin), on (r2, r3) lanes
//     2 and 3; u1 = unit_float_open0 (in (0, 1], safe under log), u2 = unit_float.
//   * gumbel: z = -log(-log(u)) with u = unit_float_open01(r_lane), strictly inside (0, 1)
//     so both logs are finite (z in [-2.8, 16.7]).
// So any single value can be regenerated from (seed, b, s, i) alone, without replaying a
// stream, and the 24/23-bit uniforms are exact on every backend; only the transforms below
// (log, sqrt, sin, cos) may round differently between backends (~1 ulp).
//
// The transforms here are our own polynomial log and sin/cos rather than libm: plain
// arithmetic that gcc vectorises (libm's scalar calls do not, and glibc's vector variants
// need -ffast-math), and that gives the same bits in a vector loop and in a scalar call.
#pragma once
#include <string.h>

#include "tvr/common.h"
#include "tvr/philox.h"

#define TVR_PTOPK_STREAM 0x544F504Bu  // "TOPK": separates this op's stream from other ops'

// Forced inlining on the host: the CPU kernel calls these inside `#pragma omp simd` loops,
// which only vectorise if every call is inlined (g++ otherwise keeps the larger ones, e.g.
// Box-Muller, as calls).
#if defined(__CUDACC__)
#define TVR_PTOPK_HD TVR_HD
#elif defined(__GNUC__)
#define TVR_PTOPK_HD inline __attribute__((always_inline))
#else
#define TVR_PTOPK_HD inline
#endif

namespace tvr {

// uint32 -> float strictly inside (0, 1): ((x >> 9) + 0.5) * 2^-23. 23 bits plus a half fit
// in float32's 24-bit significand, so the value is exact: range [2^-24, 1 - 2^-24].
TVR_PTOPK_HD float unit_float_open01(uint32_t x) {
  return (static_cast<float>(static_cast<int32_t>(x >> 9)) + 0.5f) * 1.1920928955078125e-07f;
}

// tvr::unit_float / unit_float_open0 (same values), converting through int32: the shifted
// value fits, and a signed conversion vectorises on AVX2 (unsigned needs AVX-512).
TVR_PTOPK_HD float ptopk_unit_float(uint32_t x) {
  return static_cast<float>(static_cast<int32_t>(x >> 8)) * 5.9604644775390625e-08f;
}
TVR_PTOPK_HD float ptopk_unit_float_open0(uint32_t x) {
  return static_cast<float>(static_cast<int32_t>(x >> 8) + 1) * 5.9604644775390625e-08f;
}

TVR_PTOPK_HD uint32_t ptopk_float_bits(float x) {
  uint32_t b;
  memcpy(&b, &x, sizeof(b));
  return b;
}

TVR_PTOPK_HD float ptopk_bits_float(uint32_t b) {
  float x;
  memcpy(&x, &b, sizeof(x));
  return x;
}

// Natural log of a positive normal float (all our arguments are >= 2^-24), ~1 ulp.
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)): offsetting the bits by 1 - sqrt(1/2) before
// splitting exponent and mantissa lands m there without a branch (a select here keeps gcc
// from vectorising the loop for AVX2). log(m) = 2 atanh(t), t = (m - 1) / (m + 1),
// |t| <= 0.172, by its odd series to t^9 (next term < 1e-9 relative). ln 2 is split into an
// exactly representable high part and a small low part so e * ln2_hi is exact.
TVR_PTOPK_HD float ptopk_log(float x) {
  const uint32_t bits = ptopk_float_bits(x) + (0x3F800000u - 0x3F3504F3u);
  const int e = static_cast<int>(bits >> 23) - 127;
  const float m = ptopk_bits_float((bits & 0x007FFFFFu) + 0x3F3504F3u);
  const float t = (m - 1.0f) / (m + 1.0f);  // m - 1 is exact (Sterbenz)
  const float t2 = t * t;
  const float series =
      2.0f + t2 * (0.666666667f + t2 * (0.4f + t2 * (0.285714286f + t2 * 0.222222222f)));
  const float fe = static_cast<float>(e);
  return (fe * -2.12194440e-4f + t * series) + fe * 0.693359375f;
}

// cos(2 pi u), sin(2 pi u) for u in [0, 1) with exact range reduction: v = 4u is exact,
// n = round(v), f = v - n in [-1/2, 1/2] is exact, a = f * pi/2 in [-pi/4, pi/4]; Taylor
// polynomials there (truncation < 2e-9); rotate by the quadrant n mod 4.
TVR_PTOPK_HD void ptopk_sincos_2pi(float u, float* c_out, float* s_out) {
  const float v = 4.0f * u;
  // round(v): v + 0.5 is exact (v < 4 lies on a 2^-22 grid) and positive, so truncating
  // it is floor (an int conversion vectorises everywhere; floorf needs SSE4.1).
  const int qi = static_cast<int>(v + 0.5f);
  const float n = static_cast<float>(qi);
  const float a = (v - n) * 1.57079637f;
  const float a2 = a * a;
  const float s = a + a * a2 * (-0.166666667f + a2 * (8.33333377e-3f + a2 * (-1.98412701e-4f +
                                                   a2 * 2.75573188e-6f)));
  const float c = 1.0f + a2 * (-0.5f + a2 * (4.16666679e-2f + a2 * (-1.38888892e-3f +
                                          a2 * (2.48015876e-5f + a2 * -2.75573188e-7f))));
  // Quadrant rotation with integer masks rather than branches/selects, so the loop that
  // calls this stays a straight line and vectorises: odd quadrants swap cos and sin,
  // quadrants 1, 2 negate cos and 2, 3 negate sin (sign bit flips are exact).
  const uint32_t q = static_cast<uint32_t>(qi);
  const uint32_t swap = 0u - (q & 1u);
  const uint32_t cb = ptopk_float_bits(c), sb = ptopk_float_bits(s);
  const uint32_t cq = (cb & ~swap) | (sb & swap), sq = (sb & ~swap) | (cb & swap);
  *c_out = ptopk_bits_float(cq ^ (((q + 1u) & 2u) << 30));
  *s_out = ptopk_bits_float(sq ^ ((q & 2u) << 30));
}

// Two uniforms' bits -> two standard normals (Box-Muller, same roles as tvr::box_muller).
TVR_PTOPK_HD void ptopk_box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float r = sqrtf(-2.0f * ptopk_log(ptopk_unit_float_open0(a)));
  float c, s;
  ptopk_sincos_2pi(ptopk_unit_float(b), &c, &s);
  *z0 = r * c;
  *z1 = r * s;
}

// One uniform's bits -> a standard Gumbel sample.
TVR_PTOPK_HD float ptopk_gumbel(uint32_t a) { return -ptopk_log(-ptopk_log(unit_float_open01(a))); }

// The noise of one element (b, s, i): what the bulk CPU generator writes for it.
TVR_PTOPK_HD float ptopk_noise(uint64_t seed, uint32_t b, uint32_t s, uint32_t i, bool gumbel) {
  const U32x4 r = philox4x32_10(i >> 2, s, b, TVR_PTOPK_STREAM, seed);
  const int lane = static_cast<int>(i & 3u);
  if (gumbel) return ptopk_gumbel(r.v[lane]);
  float z0, z1;
  ptopk_box_muller(r.v[lane & 2], r.v[(lane & 2) + 1], &z0, &z1);
  return (lane & 1) ? z1 : z0;
}

// g(z): the gradient of the negative log-density of the noise; the estimator's weight.
TVR_PTOPK_HD float ptopk_noise_grad(float z, bool gumbel) { return gumbel ? 1.0f - expf(-z) : z; }

}  // namespace tvr
