// Perturbed top-K (SPEC 2), CPU.
//
// Forward, per (row, chunk of samples): draw the noise of a block of samples into small arrays
// (Philox + transform in plain vector loops, compiled for AVX-512 / AVX2 / baseline with
// runtime dispatch), then per sample keep the k largest of scores + sigma * z in an insertion
// buffer, sort their indices ascending and count them. Nothing of size b*S*d exists.
//
// Backward needs, per row, only W[j, i] = sum_s onehot[s, j, i] * g(z[s, i]) (the authors'
// einsum("bnkd,bnd->bkd", one_hot, noise) before its division by S * sigma), a [b, k, d]
// tensor as small as the output. The forward has every selected z at hand, so it accumulates
// W as it counts and returns it for autograd to save: the backward is then O(b*k*d), neither
// stores nor regenerates any noise, and the noise is drawn exactly once.
//
// The full estimator's backward (perturbed_topk_full_bwd) needs every g(z) of every sample,
// weighted by the output gradient at that sample's selection: it walks the samples again with
// the forward's walker (SampleWalker), so forward and backward select identically.

// g++ contracts a * b + c into an FMA by default in C++ (-ffp-contract=fast) wherever the
// target has FMA (our AVX-512/AVX2 clones). That would round `scores + noise * sigma`
// differently from torch and make the vector and scalar noise paths differ by an ulp, so this
// file turns contraction off (before any include, so every inlined function agrees).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "tvr/perturbed_topk.h"

namespace tvr {
namespace {

// Philox groups (4 noise values each) per generated block: keeps the ~44 bytes of work arrays
// per group within L1/L2 while giving the vector loops long trip counts.
constexpr int64_t kGroupsPerBlock = 1024;

#if defined(__x86_64__) && !defined(__clang__)
#define TVR_PTOPK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TVR_PTOPK_CLONES
#endif

// Noise of samples [s0, s0 + ns) of row `row` into z[ns][4 * Q] (Q = ceil(d / 4) Philox
// groups per sample; entries past d of each sample are padding), the values ptopk_noise()
// gives element by element. Work: u32 [6 * ns * Q].
TVR_PTOPK_CLONES
void generate_noise(uint64_t seed, uint32_t row, uint32_t s0, int64_t ns, int64_t d, bool gumbel,
                    float* z, uint32_t* work_u) {
  const int64_t Q = (d + 3) / 4, G = ns * Q;
  uint32_t *c0 = work_u, *c1 = work_u + G;
  uint32_t *o0 = work_u + 2 * G, *o1 = work_u + 3 * G, *o2 = work_u + 4 * G, *o3 = work_u + 5 * G;
  // Counters laid out flat so the Philox loop runs over all groups of the block at once
  // (a per-sample loop of Q = 13 groups would waste most of a 16-lane vector).
  for (int64_t sl = 0; sl < ns; ++sl) {
    for (int64_t q = 0; q < Q; ++q) {
      c0[sl * Q + q] = static_cast<uint32_t>(q);
      c1[sl * Q + q] = s0 + static_cast<uint32_t>(sl);
    }
  }
#pragma omp simd
  for (int64_t g = 0; g < G; ++g) {
    const U32x4 r = philox4x32_10(c0[g], c1[g], row, TVR_PTOPK_STREAM, seed);
    o0[g] = r.v[0];
    o1[g] = r.v[1];
    o2[g] = r.v[2];
    o3[g] = r.v[3];
  }
  // Group g of the block holds indices 4q..4q+3 of sample g / Q, i.e. z[4g .. 4g+3] with the
  // padded sample stride 4Q: the four lanes are written interleaved, no transpose pass.
  if (gumbel) {
#pragma omp simd
    for (int64_t g = 0; g < G; ++g) {
      z[4 * g] = ptopk_gumbel(o0[g]);
      z[4 * g + 1] = ptopk_gumbel(o1[g]);
      z[4 * g + 2] = ptopk_gumbel(o2[g]);
      z[4 * g + 3] = ptopk_gumbel(o3[g]);
    }
  } else {
#pragma omp simd
    for (int64_t g = 0; g < G; ++g) {
      float a, b, c, e;
      ptopk_box_muller(o0[g], o1[g], &a, &b);
      ptopk_box_muller(o2[g], o3[g], &c, &e);
      z[4 * g] = a;
      z[4 * g + 1] = b;
      z[4 * g + 2] = c;
      z[4 * g + 3] = e;
    }
  }
}

// Strict order of the selection: larger p first, the smaller index among equal p (torch.topk
// leaves exact ties unspecified; this makes the result independent of the visiting order).
template <typename acc_t>
inline bool ranks_before(acc_t p, int64_t i, acc_t q, int64_t j) {
  return (p > q) | ((p == q) & (i < j));  // non-short-circuit: one branch at the caller
}

// Select the k largest of p = score + (z * sigma) over one sample into bi, indices sorted
// ascending. The sum rounds z * sigma to float32 first, as the authors'
// `x[:, None, :] + noise * sigma` does (float32 noise times a Python float).
//
// Elements are visited in descending score order (`order`, with `sorted_sc` the scores in
// that order). Once k are held, element t can only enter if
// p = fl(sc + fl(z * sigma)) > threshold; since rounding is monotone and z <= zmax,
// p <= fl(sc + fl(zmax * sigma)) = bound, and the bound only decreases along the order: the
// first bound below the threshold ends the sample. With sigma small against the spread of
// the scores this touches a handful of the d elements, and the result is exact.
template <typename acc_t>
inline void select_sample(const int64_t* order, const acc_t* sorted_sc, const float* z, float sigma,
                          float zmax_sigma, int64_t d, int64_t k, acc_t* bv, int64_t* bi) {
  int64_t n = 0;
  for (int64_t t = 0; t < d; ++t) {
    const int64_t i = order[t];
    const acc_t sc = sorted_sc[t];
    if (n == k && sc + static_cast<acc_t>(zmax_sigma) < bv[k - 1]) break;
    const float zs = z[i] * sigma;
    const acc_t p = sc + static_cast<acc_t>(zs);
    int64_t j;
    if (n < k) {
      j = n++;
    } else if (ranks_before(p, i, bv[k - 1], bi[k - 1])) {
      j = k - 1;
    } else {
      continue;
    }
    while (j > 0 && ranks_before(p, i, bv[j - 1], bi[j - 1])) {
      bv[j] = bv[j - 1];
      bi[j] = bi[j - 1];
      --j;
    }
    bv[j] = p;
    bi[j] = i;
  }
  if (k <= 32) {
    for (int64_t a = 1; a < k; ++a) {  // insertion sort of the k chosen indices
      const int64_t v = bi[a];
      int64_t j = a;
      for (; j > 0 && bi[j - 1] > v; --j) bi[j] = bi[j - 1];
      bi[j] = v;
    }
  } else {
    std::sort(bi, bi + k);
  }
}

// Largest value the generated noise can take: Box-Muller's radius is at most
// sqrt(-2 log 2^-24) = 5.77 and a Gumbel draw at most -log(-log(1 - 2^-24)) = 16.64; the
// bounds below leave a margin for the transforms' rounding.
constexpr float kMaxNormal = 6.0f, kMaxGumbel = 17.0f;

inline float max_of(const float* z, int64_t d) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < d; ++i) m = std::max(m, z[i]);
  return m;
}

// Sample chunks per row: enough tasks for the threads when b is small, one chunk per row when
// b is large. Depends on (b, S) only, never on the thread count, so the summation order of the
// accumulators (hence the result) is the same on every machine and run.
int64_t chunks_per_row(int64_t b, int64_t S) {
  if (b >= 64) return 1;
  const int64_t want = (64 + b - 1) / b;
  return std::max<int64_t>(1, std::min<int64_t>(want, (S + 31) / 32));
}

// What every pass over the samples shares: the problem, and where its noise comes from.
struct SampleSource {
  int64_t d, k, S;
  float sigma;
  const float* noise;  // injected [b, S, d] noise, or null: Philox draws it
  uint64_t seed;
  bool gumbel, hard;
};

// One thread's walk over samples of a row: sorts the row's scores once, draws (or reads) the
// noise a block of samples at a time, selects each sample's top k and hands the sample's
// noise and sorted indices to `visit(z, idx)`. The forward counts with it; the full-estimator
// backward walks the very same selections again. Scratch is O(block + d), per thread.
template <typename acc_t>
class SampleWalker {
 public:
  explicit SampleWalker(const SampleSource& src)
      : src_(src),
        Q_((src.d + 3) / 4),
        work_u_(src.noise || src.hard ? 0 : 6 * kGroupsPerBlock + 6 * Q_),
        zbuf_(src.noise ? 0 : (src.hard ? src.d : (kGroupsPerBlock + Q_) * 4), 0.0f),
        bv_(src.k),
        bi_(src.k),
        order_(src.d),
        sorted_sc_(src.d) {}

  template <typename scalar_t, typename Visit>
  void walk(const scalar_t* sc, int64_t row, int64_t s_begin, int64_t s_end, Visit&& visit) {
    const int64_t d = src_.d;
    for (int64_t i = 0; i < d; ++i) order_[i] = i;
    std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) {
      return static_cast<acc_t>(sc[a]) > static_cast<acc_t>(sc[b]);
    });
    for (int64_t t = 0; t < d; ++t) sorted_sc_[t] = static_cast<acc_t>(sc[order_[t]]);
    const float gen_zmax_sigma = (src_.gumbel ? kMaxGumbel : kMaxNormal) * src_.sigma;
    // Samples per block: the block's noise fits the work arrays sized in the constructor.
    const int64_t sb = std::max<int64_t>(1, kGroupsPerBlock / Q_);
    for (int64_t s0 = s_begin; s0 < s_end; s0 += sb) {
      const int64_t ns = std::min(sb, s_end - s0);
      const float* zb;
      int64_t stride;
      if (src_.noise) {
        zb = src_.noise + (row * src_.S + s0) * d;
        stride = d;
      } else if (src_.hard) {
        zb = zbuf_.data();  // zeros, with sigma 0: p = scores
        stride = d;
      } else {
        generate_noise(src_.seed, static_cast<uint32_t>(row), static_cast<uint32_t>(s0), ns, d,
                       src_.gumbel, zbuf_.data(), work_u_.data());
        zb = zbuf_.data();
        stride = 4 * Q_;
      }
      for (int64_t sl = 0; sl < ns; ++sl) {
        const float* z = zb + sl * stride;
        // Injected noise has no a-priori bound: use this sample's maximum.
        const float zmax_sigma = src_.noise ? max_of(z, d) * src_.sigma : gen_zmax_sigma;
        select_sample<acc_t>(order_.data(), sorted_sc_.data(), z, src_.sigma, zmax_sigma, d,
                             src_.k, bv_.data(), bi_.data());
        visit(z, static_cast<const int64_t*>(bi_.data()));
      }
    }
  }

 private:
  SampleSource src_;
  int64_t Q_;
  std::vector<uint32_t> work_u_;
  std::vector<float> zbuf_;
  std::vector<acc_t> bv_;
  std::vector<int64_t> bi_;
  std::vector<int64_t> order_;
  std::vector<acc_t> sorted_sc_;
};

// Runs `task(walker, row, s_begin, s_end, acc)` for every (row, chunk of samples) in parallel,
// each task filling its own `width` doubles, then hands each row's chunk sums, added in chunk
// order, to `finish(row, sums)`: results do not depend on the thread count or scheduling.
template <typename acc_t, typename Task, typename Finish>
void for_each_row_chunk(const SampleSource& src, int64_t B, int64_t width, Task&& task,
                        Finish&& finish) {
  const int64_t nchunk = src.hard ? 1 : chunks_per_row(B, src.S);
  const int64_t chunk = (src.S + nchunk - 1) / nchunk;
  // Partial sums per (row, chunk) only when a row is split; at most 64 rows' worth.
  std::vector<double> part(nchunk > 1 ? B * nchunk * width : 0);
  at::parallel_for(0, B * nchunk, 1, [&](int64_t begin, int64_t end) {
    SampleWalker<acc_t> walker(src);
    std::vector<double> acc(width);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = t / nchunk, c = t % nchunk;
      const int64_t s_begin = c * chunk, s_end = std::min(src.S, s_begin + chunk);
      std::fill(acc.begin(), acc.end(), 0.0);
      task(walker, row, s_begin, s_end, acc.data());
      if (nchunk == 1) {
        finish(row, static_cast<const double*>(acc.data()));
      } else {
        std::copy(acc.begin(), acc.end(), part.begin() + t * width);
      }
    }
  });
  if (nchunk > 1) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> sums(width);
      for (int64_t row = begin; row < end; ++row) {
        std::fill(sums.begin(), sums.end(), 0.0);
        for (int64_t c = 0; c < nchunk; ++c) {
          const double* p = part.data() + (row * nchunk + c) * width;
          for (int64_t e = 0; e < width; ++e) sums[e] += p[e];
        }
        finish(row, static_cast<const double*>(sums.data()));
      }
    });
  }
}

void check_sizes(int64_t B, int64_t d, int64_t k, int64_t num_samples) {
  TORCH_CHECK(k >= 1 && k <= d, "perturbed_topk: need 1 <= k <= d");
  TORCH_CHECK(num_samples >= 1, "perturbed_topk: num_samples must be >= 1");
  TORCH_CHECK(num_samples < (int64_t(1) << 31) && B < (int64_t(1) << 32) && d < (int64_t(1) << 32),
              "perturbed_topk: b, num_samples and d must fit the 32-bit Philox counter words");
}

at::Tensor checked_noise(const c10::optional<at::Tensor>& noise_in, bool hard, int64_t B,
                         int64_t num_samples, int64_t d) {
  if (!noise_in.has_value() || hard) return at::Tensor();
  at::Tensor noise = noise_in->contiguous();
  TORCH_CHECK(noise.scalar_type() == at::kFloat && noise.dim() == 3 && noise.size(0) == B &&
                  noise.size(1) == num_samples && noise.size(2) == d,
              "perturbed_topk: noise must be float32 [b, num_samples, d]");
  return noise;
}

std::tuple<at::Tensor, at::Tensor> perturbed_topk_fwd_cpu(const at::Tensor& scores_in, int64_t k,
                                                          int64_t num_samples, double sigma,
                                                          const c10::optional<at::Tensor>& noise_in,
                                                          int64_t seed, bool gumbel, bool hard) {
  TORCH_CHECK(scores_in.dim() == 2, "perturbed_topk: scores must be [b, d], got ", scores_in.sizes());
  const int64_t B = scores_in.size(0), d = scores_in.size(1);
  check_sizes(B, d, k, num_samples);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor noise = checked_noise(noise_in, hard, B, num_samples, d);
  at::Tensor ind = at::empty({B, k, d}, scores.options().dtype(at::kFloat));
  at::Tensor wout = at::empty({B, k, d}, scores.options().dtype(at::kFloat));
  if (B == 0) return {ind, wout};  // an empty last batch: nothing to do
  const SampleSource src{d, k, hard ? 1 : num_samples, hard ? 0.0f : static_cast<float>(sigma),
                         noise.defined() ? noise.const_data_ptr<float>() : nullptr,
                         static_cast<uint64_t>(seed), gumbel, hard};
  const int64_t kd = k * d;
  float* ind_ptr = ind.mutable_data_ptr<float>();
  float* w_ptr = wout.mutable_data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "perturbed_topk_fwd", [&] {
    // float64 scores perturb in float64 (the authors' sum promotes), the rest in float32.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* sc_ptr = scores.const_data_ptr<scalar_t>();
    // Per task: counts[j * d + i] in acc[0, kd) (exact in double up to 2^53 samples) and
    // W[j * d + i] in acc[kd, 2 kd) (double, so the sum over up to S samples adds no error of
    // its own before the final float32 rounding).
    for_each_row_chunk<acc_t>(
        src, B, 2 * kd,
        [&](SampleWalker<acc_t>& walker, int64_t row, int64_t s_begin, int64_t s_end, double* acc) {
          double* w = acc + kd;
          walker.walk(sc_ptr + row * d, row, s_begin, s_end, [&](const float* z, const int64_t* idx) {
            for (int64_t j = 0; j < k; ++j) {
              const int64_t i = idx[j];
              acc[j * d + i] += 1.0;
              w[j * d + i] += static_cast<double>(ptopk_noise_grad(z[i], gumbel));
            }
          });
        },
        [&](int64_t row, const double* acc) {
          for (int64_t e = 0; e < kd; ++e) {
            ind_ptr[row * kd + e] = static_cast<float>(acc[e]) / static_cast<float>(src.S);
            w_ptr[row * kd + e] = hard ? 0.0f : static_cast<float>(acc[kd + e]);
          }
        });
  });
  return {ind, wout};
}

// acc[i] += g(z[i]) * c over one sample (outside the dispatch macro: a pragma cannot sit in
// a macro argument).
void add_weighted_noise_grad(double* acc, const float* z, double c, int64_t d, bool gumbel) {
  if (gumbel) {
    for (int64_t i = 0; i < d; ++i) acc[i] += static_cast<double>(ptopk_noise_grad(z[i], true)) * c;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) acc[i] += static_cast<double>(z[i]) * c;
  }
}

// The full perturbed-optimiser estimator contracted with grad (see the ops module):
// grad_scores[b, e] = sum_s g(z[b, s, e]) * c[b, s] / S / sigma with
// c[b, s] = sum_j grad[b, j, idx[b, s, j]]. Walks the forward's selections again (same noise,
// same order, same tie rule, so the same indices) instead of storing them.
at::Tensor perturbed_topk_full_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& scores_in,
                                       int64_t k, int64_t num_samples, double sigma,
                                       const c10::optional<at::Tensor>& noise_in, int64_t seed,
                                       bool gumbel) {
  TORCH_CHECK(scores_in.dim() == 2, "perturbed_topk_full_bwd: scores must be [b, d]");
  const int64_t B = scores_in.size(0), d = scores_in.size(1);
  check_sizes(B, d, k, num_samples);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == k && grad_in.size(2) == d,
              "perturbed_topk_full_bwd: grad must be [b, k, d]");
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const at::Tensor noise = checked_noise(noise_in, false, B, num_samples, d);
  at::Tensor out = at::empty({B, d}, scores.options().dtype(at::kFloat));
  if (B == 0) return out;
  const SampleSource src{d, k, num_samples, static_cast<float>(sigma),
                         noise.defined() ? noise.const_data_ptr<float>() : nullptr,
                         static_cast<uint64_t>(seed), gumbel, false};
  const float* g = grad.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const double scale = 1.0 / (static_cast<double>(num_samples) * sigma);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "perturbed_topk_full_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* sc_ptr = scores.const_data_ptr<scalar_t>();
    for_each_row_chunk<acc_t>(
        src, B, d,
        [&](SampleWalker<acc_t>& walker, int64_t row, int64_t s_begin, int64_t s_end, double* acc) {
          const float* gr = g + row * k * d;
          walker.walk(sc_ptr + row * d, row, s_begin, s_end, [&](const float* z, const int64_t* idx) {
            double c = 0.0;
            for (int64_t j = 0; j < k; ++j) c += static_cast<double>(gr[j * d + idx[j]]);
            add_weighted_noise_grad(acc, z, c, d, gumbel);
          });
        },
        [&](int64_t row, const double* acc) {
          for (int64_t i = 0; i < d; ++i) o[row * d + i] = static_cast<float>(acc[i] * scale);
        });
  });
  return out;
}

// grad_scores[b, i] = sum_j grad[b, j, i] * (W[b, j, i] / S / sigma), the authors' order
// (expected_gradient = einsum(...) / S / sigma, then einsum("bkd,bkd->bd")).
at::Tensor perturbed_topk_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& w_in,
                                  int64_t num_samples, double sigma) {
  TORCH_CHECK(w_in.dim() == 3 && w_in.scalar_type() == at::kFloat,
              "perturbed_topk_bwd: expected_grad must be float32 [b, k, d]");
  TORCH_CHECK(grad_in.sizes() == w_in.sizes(), "perturbed_topk_bwd: grad must be [b, k, d]");
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const at::Tensor w = w_in.contiguous();
  const int64_t B = w.size(0), k = w.size(1), d = w.size(2);
  at::Tensor out = at::empty({B, d}, w.options());
  const float* g = grad.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const float S = static_cast<float>(num_samples), sig = static_cast<float>(sigma);
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < d; ++i) {
        float acc = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t e = (r * k + j) * d + i;
          acc += g[e] * (wp[e] / S / sig);
        }
        o[r * d + i] = acc;
      }
    }
  });
  return out;
}

// Test hook: the [b, S, d] float32 noise the forward draws for `seed` (bulk generator).
at::Tensor perturbed_topk_noise_cpu(int64_t B, int64_t S, int64_t d, int64_t seed, bool gumbel) {
  TORCH_CHECK(B >= 0 && S >= 0 && d >= 1, "perturbed_topk_noise: bad sizes");
  at::Tensor z = at::empty({B, S, d}, at::TensorOptions().dtype(at::kFloat));
  float* zp = z.mutable_data_ptr<float>();
  const int64_t Q = (d + 3) / 4;
  std::vector<uint32_t> work_u(6 * Q);
  std::vector<float> zbuf(4 * Q);
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t s = 0; s < S; ++s) {
      generate_noise(static_cast<uint64_t>(seed), static_cast<uint32_t>(r), static_cast<uint32_t>(s),
                     1, d, gumbel, zbuf.data(), work_u.data());
      std::copy(zbuf.begin(), zbuf.begin() + d, zp + (r * S + s) * d);
    }
  }
  return z;
}

// Test hook: the same noise, element by element through the scalar ptopk_noise().
at::Tensor perturbed_topk_noise_scalar_cpu(int64_t B, int64_t S, int64_t d, int64_t seed, bool gumbel) {
  at::Tensor z = at::empty({B, S, d}, at::TensorOptions().dtype(at::kFloat));
  float* zp = z.mutable_data_ptr<float>();
  for (int64_t r = 0; r < B; ++r)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < d; ++i)
        zp[(r * S + s) * d + i] = ptopk_noise(static_cast<uint64_t>(seed), static_cast<uint32_t>(r),
                                              static_cast<uint32_t>(s), static_cast<uint32_t>(i), gumbel);
  return z;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tvr_C, m) {
  m.def("perturbed_topk_fwd(Tensor scores, int k, int num_samples, float sigma, Tensor? noise, "
        "int seed, bool gumbel, bool hard) -> (Tensor, Tensor)");
  m.def("perturbed_topk_bwd(Tensor grad, Tensor expected_grad, int num_samples, float sigma) -> Tensor");
  m.def("perturbed_topk_full_bwd(Tensor grad, Tensor scores, int k, int num_samples, float sigma, "
        "Tensor? noise, int seed, bool gumbel) -> Tensor");
  m.def("perturbed_topk_noise(int b, int num_samples, int d, int seed, bool gumbel) -> Tensor");
  m.def("perturbed_topk_noise_scalar(int b, int num_samples, int d, int seed, bool gumbel) -> Tensor");
}

TORCH_LIBRARY_IMPL(tvr_C, CPU, m) {
  m.impl("perturbed_topk_fwd", &perturbed_topk_fwd_cpu);
  m.impl("perturbed_topk_bwd", &perturbed_topk_bwd_cpu);
  m.impl("perturbed_topk_full_bwd", &perturbed_topk_full_bwd_cpu);
}

// The noise hooks take no tensor, so they are registered for every dispatch key.
TORCH_LIBRARY_IMPL(tvr_C, CompositeExplicitAutograd, m) {
  m.impl("perturbed_topk_noise", &perturbed_topk_noise_cpu);
  m.impl("perturbed_topk_noise_scalar", &perturbed_topk_noise_scalar_cpu);
}

}  // namespace tvr
