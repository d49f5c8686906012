// T-MASS stochastic max similarity (SPEC 5): the per-element pieces every backend shares.
//
// Noise keying (also tvr_kernels/reference/stochastic_max_similarity.py:philox_noise and the
// Triton kernel): Philox4x32-10 with key `seed ^ kStreamKey` and counter (d / 4, m, j, i);
// output word d % 4 is element d. The value depends on the pair (i, j), the sample m and the
// element d only, never on how a launch chunks texts or videos, and a backward pass can
// regenerate the selected sample m = best[i, j] alone.
#pragma once
#include "tvr/common.h"
#include "tvr/philox.h"

namespace tvr {

// "TMASS": keeps this op's stream apart from other ops' for the same user seed.
constexpr uint64_t kTmassStreamKey = 0x544D415353ull;

TVR_HD uint64_t tmass_key(uint64_t seed) { return seed ^ kTmassStreamKey; }

enum TmassPrior : int { kTmassUniform = 0, kTmassNormal = 1 };

// The four prior samples of elements q, Q+q, 2Q+q, 3Q+q of sample m of pair (i, j), float32 as the
// reference draws them (uniform: U[0, 1) from 24 bits; normal: Box-Muller on word pairs
// (0, 1) and (2, 3), times std in float32).
TVR_HD void tmass_noise4(uint32_t q, uint32_t m, uint32_t j, uint32_t i, uint64_t key, int prior,
                         float stdf, float out[4]) {
  const U32x4 w = philox4x32_10(q, m, j, i, key);
  if (prior == kTmassUniform) {
    for (int l = 0; l < 4; ++l) out[l] = unit_float(w.v[l]);
  } else {
    box_muller(w.v[0], w.v[1], &out[0], &out[1]);
    box_muller(w.v[2], w.v[3], &out[2], &out[3]);
    for (int l = 0; l < 4; ++l) out[l] *= stdf;
  }
}

// Whether sample cosine c replaces the running max `best` (started at -inf): torch.max's rule,
// which the reference uses and every kernel follows. A NaN beats any number and the first NaN
// stays, so a NaN or all-zero row scores NaN (not a -inf that silently ranks last) with the
// reference's `best`; among numbers only a strictly greater one wins (the first maximum stays).
template <typename T>
TVR_HD bool tmass_replaces_max(T c, T best) {
  return c > best || (c != c && best == best);
}

}  // namespace tvr
