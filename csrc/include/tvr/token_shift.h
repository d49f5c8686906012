#pragma once
#include "tvr/common.h"

namespace tvr {

// Frame that output token (t, n) reads from (SPEC 1). The forward-looking set
// If = range(1 + offset, N, fold) wins over the backward-looking set Ib = range(1, N, fold)
// where both contain n, as the authors' two successive slice assignments do; there is no
// zero padding, so the first/last frame keeps its own token when it has no neighbour.
TVR_HD int token_shift_source(int64_t t, int64_t n, int64_t T, int64_t fold, int64_t offset) {
  const bool fwd = n >= 1 + offset && (n - 1 - offset) % fold == 0;
  if (fwd && t < T - 1) return static_cast<int>(t + 1);
  const bool bwd = n >= 1 && (n - 1) % fold == 0;
  if (bwd && t >= 1) return static_cast<int>(t - 1);
  return static_cast<int>(t);
}

// Backward is the transposed gather: input frame t of token n collects the gradient of every
// output frame t' in {t-1, t, t+1} whose source is t. Writes those frames to `frames` and
// returns how many there are (at most 2: see the proof in tests/test_token_shift.py).
TVR_HD int token_shift_readers(int64_t t, int64_t n, int64_t T, int64_t fold, int64_t offset,
                               int64_t frames[3]) {
  int count = 0;
  for (int64_t tp = t - 1; tp <= t + 1; ++tp) {
    if (tp >= 0 && tp < T && token_shift_source(tp, n, T, fold, offset) == t) frames[count++] = tp;
  }
  return count;
}

}  // namespace tvr
