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

// Per-task accumulators of one row: counts[j * d + i] and W[j * d + i] (double, so the sum
// over up to S samples adds no error of its own before the final float32 rounding).
struct RowAcc {
  std::vector<int32_t> counts;
  std::vector<double> w;
};

// Strict order of the selection: larger p first, the smaller index among equal p (torch.topk
// leaves exact ties unspecified; this makes the result independent of the visiting order).
template <typename acc_t>
inline bool ranks_before(acc_t p, int64_t i, acc_t q, int64_t j) {
  return (p > q) | ((p == q) & (i < j));  // non-short-circuit: one branch at the caller
}

// Select the k largest of p = score + (z * sigma) over one sample, indices sorted ascending,
// and add the sample to the accumulators. The sum rounds z * sigma to float32 first, as the
// authors' `x[:, None, :] + noise * sigma` does (float32 noise times a Python float).
//
// Elements are visited in descending score order (`order`, with `sorted_sc` the scores in
// that order). Once k are held, element t can only enter if
// p = fl(sc + fl(z * sigma)) > threshold; since rounding is monotone and z <= zmax,
// p <= fl(sc + fl(zmax * sigma)) = bound, and the bound only decreases along the order: the
// first bound below the threshold ends the sample. With sigma small against the spread of
// the scores this touches a handful of the d elements, and the result is exact.
template <typename acc_t>
inline void select_sample(const int64_t* order, const acc_t* sorted_sc, const float* z, float sigma,
                          float zmax_sigma, int64_t d, int64_t k, bool gumbel, acc_t* bv,
                          int64_t* bi, int32_t* counts, double* w) {
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
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = bi[j];
    counts[j * d + i] += 1;
    w[j * d + i] += static_cast<double>(ptopk_noise_grad(z[i], gumbel));
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
// b is large. Depends on (b, S) only, never on the thread count, so the summation order of W
// (hence the result) is the same on every machine and run.
int64_t chunks_per_row(int64_t b, int64_t S) {
  if (b >= 64) return 1;
  const int64_t want = (64 + b - 1) / b;
  return std::max<int64_t>(1, std::min<int64_t>(want, (S + 31) / 32));
}

std::tuple<at::Tensor, at::Tensor> perturbed_topk_fwd_cpu(const at::Tensor& scores_in, int64_t k,
                                                          int64_t num_samples, double sigma,
                                                          const c10::optional<at::Tensor>& noise_in,
                                                          int64_t seed, bool gumbel, bool hard) {
  TORCH_CHECK(scores_in.dim() == 2, "perturbed_topk: scores must be [b, d], got ", scores_in.sizes());
  const int64_t B = scores_in.size(0), d = scores_in.size(1);
  TORCH_CHECK(k >= 1 && k <= d, "perturbed_topk: need 1 <= k <= d");
  TORCH_CHECK(num_samples >= 1, "perturbed_topk: num_samples must be >= 1");
  TORCH_CHECK(num_samples < (int64_t(1) << 31) && B < (int64_t(1) << 32) && d < (int64_t(1) << 32),
              "perturbed_topk: b, num_samples and d must fit the 32-bit Philox counter words");
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor noise;
  if (noise_in.has_value() && !hard) {
    noise = noise_in->contiguous();
    TORCH_CHECK(noise.scalar_type() == at::kFloat && noise.dim() == 3 && noise.size(0) == B &&
                    noise.size(1) == num_samples && noise.size(2) == d,
                "perturbed_topk: noise must be float32 [b, num_samples, d]");
  }
  const int64_t S = hard ? 1 : num_samples;
  const float sig = hard ? 0.0f : static_cast<float>(sigma);
  at::Tensor ind = at::empty({B, k, d}, scores.options().dtype(at::kFloat));
  at::Tensor wout = at::empty({B, k, d}, scores.options().dtype(at::kFloat));
  if (B == 0) return {ind, wout};  // an empty last batch: nothing to do (and no 64 / b below)
  const int64_t nchunk = hard ? 1 : chunks_per_row(B, S);
  const int64_t chunk = (S + nchunk - 1) / nchunk;
  const int64_t kd = k * d;
  // Partial sums per (row, chunk) only when a row is split; at most 64 rows' worth.
  std::vector<int32_t> part_counts(nchunk > 1 ? B * nchunk * kd : 0);
  std::vector<double> part_w(nchunk > 1 ? B * nchunk * kd : 0);
  const float* noise_ptr = noise.defined() ? noise.const_data_ptr<float>() : nullptr;
  float* ind_ptr = ind.mutable_data_ptr<float>();
  float* w_ptr = wout.mutable_data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "perturbed_topk_fwd", [&] {
    // float64 scores perturb in float64 (the authors' sum promotes), the rest in float32.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* sc_ptr = scores.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * nchunk, 1, [&](int64_t begin, int64_t end) {
      const int64_t Q = (d + 3) / 4;
      const int64_t sb = std::max<int64_t>(1, std::min<int64_t>(chunk, kGroupsPerBlock / Q));
      // Per-thread scratch, O(block): noise of sb samples with the padded stride 4Q.
      std::vector<uint32_t> work_u(noise_ptr || hard ? 0 : 6 * sb * Q);
      std::vector<float> zbuf(noise_ptr ? 0 : (hard ? d : sb * 4 * Q), 0.0f);
      std::vector<acc_t> bv(k);
      std::vector<int64_t> bi(k);
      std::vector<int32_t> counts(kd);
      std::vector<double> w(kd);
      std::vector<int64_t> order(d);
      std::vector<acc_t> sorted_sc(d);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / nchunk, c = task % nchunk;
        const int64_t s_begin = c * chunk, s_end = std::min(S, s_begin + chunk);
        std::fill(counts.begin(), counts.end(), 0);
        std::fill(w.begin(), w.end(), 0.0);
        const scalar_t* sc = sc_ptr + row * d;
        for (int64_t i = 0; i < d; ++i) order[i] = i;
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
          return static_cast<acc_t>(sc[a]) > static_cast<acc_t>(sc[b]);
        });
        for (int64_t t = 0; t < d; ++t) sorted_sc[t] = static_cast<acc_t>(sc[order[t]]);
        const float gen_zmax_sigma = (gumbel ? kMaxGumbel : kMaxNormal) * sig;
        for (int64_t s0 = s_begin; s0 < s_end; s0 += sb) {
          const int64_t ns = std::min(sb, s_end - s0);
          const float* zb;
          int64_t stride;
          if (noise_ptr) {
            zb = noise_ptr + (row * S + s0) * d;
            stride = d;
          } else if (hard) {
            zb = zbuf.data();  // zeros, with sigma 0: p = scores
            stride = d;
          } else {
            generate_noise(static_cast<uint64_t>(seed), static_cast<uint32_t>(row),
                           static_cast<uint32_t>(s0), ns, d, gumbel, zbuf.data(), work_u.data());
            zb = zbuf.data();
            stride = 4 * Q;
          }
          for (int64_t sl = 0; sl < ns; ++sl) {
            const float* z = zb + sl * stride;
            // Injected noise has no a-priori bound: use this sample's maximum.
            const float zmax_sigma = noise_ptr ? max_of(z, d) * sig : gen_zmax_sigma;
            select_sample<acc_t>(order.data(), sorted_sc.data(), z, sig, zmax_sigma, d, k, gumbel,
                                 bv.data(), bi.data(), counts.data(), w.data());
          }
        }
        if (nchunk == 1) {
          for (int64_t e = 0; e < kd; ++e) {
            ind_ptr[row * kd + e] = static_cast<float>(counts[e]) / static_cast<float>(S);
            w_ptr[row * kd + e] = hard ? 0.0f : static_cast<float>(w[e]);
          }
        } else {
          std::copy(counts.begin(), counts.end(), part_counts.begin() + task * kd);
          std::copy(w.begin(), w.end(), part_w.begin() + task * kd);
        }
      }
    });
  });
  if (nchunk > 1) {  // reduce the chunks of each row in chunk order (deterministic)
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t e = 0; e < kd; ++e) {
          int64_t cnt = 0;
          double acc = 0.0;
          for (int64_t c = 0; c < nchunk; ++c) {
            cnt += part_counts[(row * nchunk + c) * kd + e];
            acc += part_w[(row * nchunk + c) * kd + e];
          }
          ind_ptr[row * kd + e] = static_cast<float>(cnt) / static_cast<float>(S);
          w_ptr[row * kd + e] = static_cast<float>(acc);
        }
      }
    });
  }
  return {ind, wout};
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
  m.def("perturbed_topk_noise(int b, int num_samples, int d, int seed, bool gumbel) -> Tensor");
  m.def("perturbed_topk_noise_scalar(int b, int num_samples, int d, int seed, bool gumbel) -> Tensor");
}

TORCH_LIBRARY_IMPL(tvr_C, CPU, m) {
  m.impl("perturbed_topk_fwd", &perturbed_topk_fwd_cpu);
  m.impl("perturbed_topk_bwd", &perturbed_topk_bwd_cpu);
}

// The noise hooks take no tensor, so they are registered for every dispatch key.
TORCH_LIBRARY_IMPL(tvr_C, CompositeExplicitAutograd, m) {
  m.impl("perturbed_topk_noise", &perturbed_topk_noise_cpu);
  m.impl("perturbed_topk_noise_scalar", &perturbed_topk_noise_scalar_cpu);
}

}  // namespace tvr
