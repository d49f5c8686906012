// Counter-based random numbers shared by every backend: Philox4x32-10 (Salmon et al., SC'11)
// in plain 32-bit integer arithmetic, so g++, nvcc and the Triton transcription
// (tvr_kernels/triton/philox.py) and the torch transcription (tvr_kernels/_philox.py) produce
// the same bits for the same (seed, counter). Ops key the counter by element, e.g.
// (index / 4, sample, row, stream), so a backward pass can regenerate any single value
// without replaying the whole stream.
#pragma once
#include "tvr/common.h"

namespace tvr {

struct U32x4 {
  uint32_t v[4];
};

TVR_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

TVR_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return U32x4{{c0, c1, c2, c3}};
}

// 24 random bits -> a float in [0, 1) that every backend represents exactly.
TVR_HD float unit_float(uint32_t x) { return static_cast<float>(x >> 8) * 5.9604644775390625e-08f; }

// Same, in (0, 1]: safe under log().
TVR_HD float unit_float_open0(uint32_t x) {
  return static_cast<float>((x >> 8) + 1u) * 5.9604644775390625e-08f;
}

// Box-Muller: two uniforms -> two standard normals. Only this transform may round differently
// between backends (libm vs device math); the uniforms above are exact.
TVR_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = unit_float_open0(a);
  const float u2 = unit_float(b);
  const float r = sqrtf(-2.0f * logf(u1));
  const float th = 6.283185307179586f * u2;
  *z0 = r * cosf(th);
  *z1 = r * sinf(th);
}

}  // namespace tvr
