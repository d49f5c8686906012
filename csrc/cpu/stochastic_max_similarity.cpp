// T-MASS stochastic max similarity (SPEC 5), CPU.
//
// Forward, per pair (i, j), never materialising a sample:
//   S_k = cos(t, f_k), R = exp(W S + b),  t_m = t + eps_m * R,  c_m = cos(t_m, p)
// with p = pooled[j, i]. Expanding t_m:
//   t_m . p    = t.p + sum_d eps_d (R_d p_d)
//   |t_m|^2    = |t|^2 + 2 sum_d eps_d (R_d t_d) + sum_d eps_d^2 R_d^2
// so after a per-pair precompute of a = R*p, b = R*t, c = R^2 each sample costs its Philox
// draw plus three multiply-adds per element. The per-pair vectors live in thread-local scratch
// (4 * D values), so nothing of size Nt*Nv*D or Nt*Nv*M*D is ever allocated.
//
// One Philox call yields elements q, Q+q, 2Q+q, 3Q+q (Q = ceil(D / 4); see the keying in
// tvr/stochastic_max_similarity.h), so the sample loop runs over q with four contiguous
// streams per array and the compiler vectorises the Philox rounds across q. Arrays are padded
// to 4Q with zeros, so padding elements contribute nothing.
//
// Backward goes through the selected sample only (max is differentiable almost everywhere):
// the noise of m = best[i, j] is regenerated from (seed, i, j, m).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "tvr/fast_math.h"
#include "tvr/stochastic_max_similarity.h"

namespace tvr {
namespace {

int parse_prior(c10::string_view prior) {
  if (prior == "uniform") return kTmassUniform;
  if (prior == "normal") return kTmassNormal;
  TORCH_CHECK(false, "stochastic_max_similarity: prior must be 'uniform' or 'normal', got ", prior);
}

struct Dims {
  int64_t Nt, Nv, T, D, M, Q;
  int64_t i0, j0;  // global index of text 0 / video 0: the noise is keyed by (i0 + i, j0 + j)
};

Dims check_dims(const at::Tensor& text, const at::Tensor& frames, const at::Tensor& pooled,
                const at::Tensor& w, const at::Tensor& b, int64_t M,
                const c10::optional<at::Tensor>& noise, int64_t i0, int64_t j0) {
  TORCH_CHECK(text.dim() == 2 && frames.dim() == 3 && pooled.dim() == 3 && w.dim() == 2 && b.dim() == 1,
              "stochastic_max_similarity: expected text [Nt, D], frames [Nv, T, D], pooled [Nv, Nt, D], "
              "radius_weight [D, T], radius_bias [D]");
  const int64_t Nt = text.size(0), D = text.size(1), Nv = frames.size(0), T = frames.size(1);
  TORCH_CHECK(frames.size(2) == D && pooled.size(0) == Nv && pooled.size(1) == Nt && pooled.size(2) == D &&
                  w.size(0) == D && w.size(1) == T && b.size(0) == D,
              "stochastic_max_similarity: inconsistent shapes");
  TORCH_CHECK(M >= 1, "stochastic_max_similarity: num_samples must be >= 1");
  if (noise.has_value()) {
    TORCH_CHECK(noise->dim() == 4 && noise->size(0) == Nt && noise->size(1) == Nv && noise->size(2) == M &&
                    noise->size(3) == D,
                "stochastic_max_similarity: noise must be [Nt, Nv, M, D]");
  }
  TORCH_CHECK(i0 >= 0 && j0 >= 0 && i0 + Nt <= (int64_t(1) << 32) && j0 + Nv <= (int64_t(1) << 32) &&
                  M <= (int64_t(1) << 32),
              "stochastic_max_similarity: global indices and M must fit the 32-bit Philox counter words");
  return {Nt, Nv, T, D, M, (D + 3) / 4, i0, j0};
}


// Per-thread scratch: lane-major a, b, c (3 * 4Q), the radius R and frame cosines S.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> A, B, C, E, R, S;
  explicit Scratch(const Dims& g)
      : A(4 * g.Q, 0), B(4 * g.Q, 0), C(4 * g.Q, 0), E(4 * g.Q, 0), R(g.D), S(g.T) {}
};

#define TVR_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TVR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TVR_CLONES
#endif

template <typename acc_t, typename scalar_t>
TVR_ALWAYS_INLINE acc_t dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += acc_t(x[d]) * acc_t(y[d]);
  return s;
}

// S_k = cos(t, f_k) and R = exp(W S + b) of one pair, into sc.S and sc.R. wt is radius_weight
// transposed to [T, D] so the radius loop runs over contiguous d.
template <typename acc_t, typename scalar_t>
TVR_ALWAYS_INLINE void pair_radius(const Dims& g, const scalar_t* t, acc_t t_norm, const scalar_t* f, const acc_t* f_norm,
                 const acc_t* wt, const acc_t* b, Scratch<acc_t>& sc) {
  for (int64_t k = 0; k < g.T; ++k) {
    sc.S[k] = dot<acc_t>(t, f + k * g.D, g.D) / (t_norm * f_norm[k]);
  }
  acc_t* R = sc.R.data();
#pragma omp simd
  for (int64_t d = 0; d < g.D; ++d) R[d] = b[d];
  for (int64_t k = 0; k < g.T; ++k) {
    const acc_t Sk = sc.S[k];
    const acc_t* wk = wt + k * g.D;
#pragma omp simd
    for (int64_t d = 0; d < g.D; ++d) R[d] += wk[d] * Sk;
  }
#pragma omp simd
  for (int64_t d = 0; d < g.D; ++d) R[d] = fast_exp(R[d]);
}

// Everything a pair needs before its samples: S, R (pair_radius), the arrays a = R*p, b = R*t,
// c = R^2 into sc.A/B/C, and t.p, |p|^2.
template <typename acc_t, typename scalar_t>
TVR_ALWAYS_INLINE void pair_prepare(const Dims& g, const scalar_t* t, acc_t t_norm, const scalar_t* f,
                                    const acc_t* f_norm, const acc_t* wt, const acc_t* bias,
                                    const scalar_t* pv, Scratch<acc_t>& sc, acc_t* tp_out, acc_t* pp_out) {
  pair_radius<acc_t>(g, t, t_norm, f, f_norm, wt, bias, sc);
  acc_t *A = sc.A.data(), *B = sc.B.data(), *C = sc.C.data();
  const acc_t* R = sc.R.data();
  acc_t tp = 0, pp = 0;
#pragma omp simd reduction(+ : tp, pp)
  for (int64_t d = 0; d < g.D; ++d) {
    const acc_t td = acc_t(t[d]), pd = acc_t(pv[d]), r = R[d];
    A[d] = r * pd;
    B[d] = r * td;
    C[d] = r * r;
    tp += td * pd;
    pp += pd * pd;
  }
  *tp_out = tp;
  *pp_out = pp;
}

TVR_CLONES void pair_prepare_f32(const Dims& g, const float* t, float t_norm, const float* f, const float* f_norm,
                                 const float* wt, const float* bias, const float* pv, Scratch<float>& sc,
                                 float* tp_out, float* pp_out) {
  pair_prepare<float>(g, t, t_norm, f, f_norm, wt, bias, pv, sc, tp_out, pp_out);
}

// Sums s1 = sum eps*a, s2 = sum eps*b, s3 = sum eps^2*c of every sample m < M of pair (i, j)
// and the running max / first argmax of its cosine. The float uniform case is the hot path
// of evaluation; it is compiled for several ISAs and dispatched at load time.
struct Best {
  float c;
  int64_t m;
};

TVR_CLONES Best uniform_samples_f32(const float* __restrict A, const float* __restrict B,
                         const float* __restrict C, int64_t Q, int64_t M, uint32_t j,
                         uint32_t i, uint64_t key, float tp, float tt, float p_norm) {
  const float* A0 = A; const float* A1 = A + Q; const float* A2 = A + 2 * Q; const float* A3 = A + 3 * Q;
  const float* B0 = B; const float* B1 = B + Q; const float* B2 = B + 2 * Q; const float* B3 = B + 3 * Q;
  const float* C0 = C; const float* C1 = C + Q; const float* C2 = C + 2 * Q; const float* C3 = C + 3 * Q;
  Best best{-std::numeric_limits<float>::infinity(), 0};
  for (int64_t m = 0; m < M; ++m) {
    float s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s1, s2, s3)
    for (int64_t q = 0; q < Q; ++q) {
      const U32x4 w = philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(m), j, i, key);
      const float e0 = unit_float(w.v[0]), e1 = unit_float(w.v[1]);
      const float e2 = unit_float(w.v[2]), e3 = unit_float(w.v[3]);
      s1 += e0 * A0[q] + e1 * A1[q] + e2 * A2[q] + e3 * A3[q];
      s2 += e0 * B0[q] + e1 * B1[q] + e2 * B2[q] + e3 * B3[q];
      s3 += e0 * e0 * C0[q] + e1 * e1 * C1[q] + e2 * e2 * C2[q] + e3 * e3 * C3[q];
    }
    const float n2 = tt + 2.f * s2 + s3;
    const float c = (tp + s1) / (std::sqrt(n2) * p_norm);
    if (tmass_replaces_max(c, best.c)) best = {c, m};
  }
  return best;
}

// Any dtype / prior / injected noise: generate the sample into lane-major E, then reduce.
template <typename acc_t, typename scalar_t>
int64_t generic_samples(const Dims& g, Scratch<acc_t>& sc, int prior, float stdf, uint64_t key, int64_t i,
                        int64_t j, const scalar_t* noise_pair, acc_t tp, acc_t tt, acc_t p_norm,
                        acc_t* best_out) {
  int64_t best_m = 0;
  acc_t best_c = -std::numeric_limits<acc_t>::infinity();
  const int64_t Q = g.Q;
  acc_t* E = sc.E.data();
  for (int64_t m = 0; m < g.M; ++m) {
    if (noise_pair != nullptr) {
      const scalar_t* nz = noise_pair + m * g.D;
      for (int64_t d = 0; d < g.D; ++d) E[d] = acc_t(nz[d]);
    } else {
      for (int64_t q = 0; q < Q; ++q) {
        float e[4];
        tmass_noise4(static_cast<uint32_t>(q), static_cast<uint32_t>(m), static_cast<uint32_t>(g.j0 + j),
                     static_cast<uint32_t>(g.i0 + i), key, prior, stdf, e);
        for (int l = 0; l < 4; ++l) E[l * Q + q] = acc_t(e[l]);
      }
    }
    acc_t s1 = 0, s2 = 0, s3 = 0;
    const acc_t *A = sc.A.data(), *B = sc.B.data(), *C = sc.C.data();
#pragma omp simd reduction(+ : s1, s2, s3)
    for (int64_t x = 0; x < 4 * Q; ++x) {
      s1 += E[x] * A[x];
      s2 += E[x] * B[x];
      s3 += E[x] * E[x] * C[x];
    }
    const acc_t c = (tp + s1) / (std::sqrt(tt + 2 * s2 + s3) * p_norm);
    if (tmass_replaces_max(c, best_c)) {
      best_c = c;
      best_m = m;
    }
  }
  *best_out = best_c;
  return best_m;
}

template <typename acc_t, typename scalar_t>
void fwd_impl(const Dims& g, const at::Tensor& text, const at::Tensor& frames, const at::Tensor& pooled,
              const at::Tensor& w, const at::Tensor& b, const at::Tensor* noise, int prior, float stdf,
              uint64_t key, at::Tensor& sims, at::Tensor& best) {
  const scalar_t* tx = text.const_data_ptr<scalar_t>();
  const scalar_t* fr = frames.const_data_ptr<scalar_t>();
  const scalar_t* pl = pooled.const_data_ptr<scalar_t>();
  const at::Tensor wt = w.t().contiguous();  // [T, D]: the radius loop runs over contiguous d
  const acc_t* wtp = wt.const_data_ptr<acc_t>();
  const acc_t* bp = b.const_data_ptr<acc_t>();
  const scalar_t* nz = noise ? noise->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = sims.mutable_data_ptr<scalar_t>();
  int64_t* arg = best.mutable_data_ptr<int64_t>();
  const int64_t D = g.D, Q = g.Q;

  // Norms once: |text_i| (Nt) and |frames_j,k| (Nv*T).
  std::vector<acc_t> t_sq(g.Nt), t_norm(g.Nt), f_norm(g.Nv * g.T);
  at::parallel_for(0, g.Nt, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      t_sq[i] = dot<acc_t>(tx + i * D, tx + i * D, D);
      t_norm[i] = std::sqrt(t_sq[i]);
    }
  });
  at::parallel_for(0, g.Nv * g.T, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) f_norm[r] = std::sqrt(dot<acc_t>(fr + r * D, fr + r * D, D));
  });

  const bool fast = std::is_same<acc_t, float>::value && nz == nullptr && prior == kTmassUniform;
  // Pairs in video-major order: pooled[j, i] is then read sequentially and frames_j stays hot.
  at::parallel_for(0, g.Nv * g.Nt, 16, [&](int64_t lo, int64_t hi) {
    Scratch<acc_t> sc(g);
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t j = p / g.Nt, i = p % g.Nt;
      const scalar_t* t = tx + i * D;
      const scalar_t* pv = pl + p * D;  // pooled[j, i]
      acc_t tp, pp;
      if constexpr (std::is_same<acc_t, float>::value) {
        pair_prepare_f32(g, t, t_norm[i], fr + j * g.T * D, f_norm.data() + j * g.T, wtp, bp, pv, sc, &tp, &pp);
      } else {
        pair_prepare<acc_t>(g, t, t_norm[i], fr + j * g.T * D, f_norm.data() + j * g.T, wtp, bp, pv, sc, &tp, &pp);
      }
      const acc_t tt = t_sq[i];
      if constexpr (std::is_same<acc_t, float>::value) {
        if (fast) {
          const Best bst = uniform_samples_f32(sc.A.data(), sc.B.data(), sc.C.data(), Q, g.M, static_cast<uint32_t>(g.j0 + j),
                                               static_cast<uint32_t>(g.i0 + i),
                                               key, tp, tt, std::sqrt(pp));
          out[i * g.Nv + j] = static_cast<scalar_t>(bst.c);
          arg[i * g.Nv + j] = bst.m;
          continue;
        }
      }
      const scalar_t* np = nz ? nz + (i * g.Nv + j) * g.M * D : nullptr;
      acc_t c;
      arg[i * g.Nv + j] = generic_samples<acc_t>(g, sc, prior, stdf, key, i, j, np, tp, tt, std::sqrt(pp), &c);
      out[i * g.Nv + j] = static_cast<scalar_t>(c);
    }
  });
}

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> smsim_fwd_cpu(const at::Tensor& text_in, const at::Tensor& frames_in,
                                                 const at::Tensor& pooled_in, const at::Tensor& w_in,
                                                 const at::Tensor& b_in, int64_t num_samples,
                                                 c10::string_view prior_s, double std_, int64_t seed,
                                                 const c10::optional<at::Tensor>& noise_in, int64_t i0,
                                                 int64_t j0) {
  const Dims g = check_dims(text_in, frames_in, pooled_in, w_in, b_in, num_samples, noise_in, i0, j0);
  const int prior = parse_prior(prior_s);
  // Half / bfloat16 compute in float32 (their values are exact in it) and round once.
  const at::ScalarType ct = compute_type(text_in.scalar_type());
  auto prep = [&](const at::Tensor& x) { return x.to(ct).contiguous(); };
  const at::Tensor text = prep(text_in), frames = prep(frames_in), pooled = prep(pooled_in),
                   w = prep(w_in), b = prep(b_in);
  at::Tensor noise;
  if (noise_in.has_value()) noise = prep(*noise_in);
  at::Tensor sims = at::empty({g.Nt, g.Nv}, text.options());
  at::Tensor best = at::empty({g.Nt, g.Nv}, text.options().dtype(at::kLong));
  const uint64_t key = tmass_key(static_cast<uint64_t>(seed));
  if (g.Nt * g.Nv > 0) {
    if (ct == at::kDouble) {
      fwd_impl<double, double>(g, text, frames, pooled, w, b, noise_in ? &noise : nullptr, prior,
                               static_cast<float>(std_), key, sims, best);
    } else {
      fwd_impl<float, float>(g, text, frames, pooled, w, b, noise_in ? &noise : nullptr, prior,
                             static_cast<float>(std_), key, sims, best);
    }
  }
  return {sims.to(text_in.scalar_type()), best};
}

// ---------------------------------------------------------------------------------------------
// Backward. For the selected sample t* = t + eps* R of pair (i, j), with c = cos(t*, p) and
// g = grad_sims[i, j]:
//   dc/dt* = p / (|t*||p|) - c t* / |t*|^2,   dc/dp = t* / (|t*||p|) - c p / |p|^2
//   grad pooled[j, i] = g dc/dp;  grad t_i += g dc/dt*  (direct path)
//   gz = g dc/dt* . eps* . R   (through R = exp(z), z = W S + b)
//   grad b += gz, grad W += gz S^T, gS = W^T gz
// and S_k = t^ . f^_k sends gS to text and frames; that last step is two matmuls over the
// stored [Nt, Nv, T] gS and S (Nt*Nv*T is allowed; Nt*Nv*D is not), done after the pair loop.
template <typename acc_t>
void bwd_impl(const Dims& g, const at::Tensor& grad, const at::Tensor& text, const at::Tensor& frames,
              const at::Tensor& pooled, const at::Tensor& w, const at::Tensor& b, const at::Tensor& best,
              const at::Tensor* noise, int prior, float stdf, uint64_t key, at::Tensor& g_text,
              at::Tensor& g_pooled, at::Tensor& gW, at::Tensor& gb, at::Tensor& gS, at::Tensor& Sall) {
  const acc_t* gs = grad.const_data_ptr<acc_t>();
  const acc_t* tx = text.const_data_ptr<acc_t>();
  const acc_t* fr = frames.const_data_ptr<acc_t>();
  const acc_t* pl = pooled.const_data_ptr<acc_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const at::Tensor wt = w.t().contiguous();
  const acc_t* wtp = wt.const_data_ptr<acc_t>();
  const acc_t* bp = b.const_data_ptr<acc_t>();
  const int64_t* bs = best.const_data_ptr<int64_t>();
  const acc_t* nz = noise ? noise->const_data_ptr<acc_t>() : nullptr;
  acc_t* gt = g_text.mutable_data_ptr<acc_t>();
  acc_t* gp = g_pooled.mutable_data_ptr<acc_t>();
  acc_t* gSp = gS.mutable_data_ptr<acc_t>();
  acc_t* Sp = Sall.mutable_data_ptr<acc_t>();
  const int64_t D = g.D, T = g.T;

  std::vector<acc_t> t_norm(g.Nt), f_norm(g.Nv * T);
  for (int64_t i = 0; i < g.Nt; ++i) t_norm[i] = std::sqrt(dot<acc_t>(tx + i * D, tx + i * D, D));
  for (int64_t r = 0; r < g.Nv * T; ++r) f_norm[r] = std::sqrt(dot<acc_t>(fr + r * D, fr + r * D, D));

  // W and b gradients sum over every pair: one accumulator per thread, reduced at the end.
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<acc_t>> gW_loc(nthreads, std::vector<acc_t>(D * T, 0)),
      gb_loc(nthreads, std::vector<acc_t>(D, 0));

  // Parallel over texts: each task owns rows i of grad text, and pooled[:, i] of grad pooled.
  at::parallel_for(0, g.Nt, 1, [&](int64_t lo, int64_t hi) {
    const int tid = at::get_thread_num();
    acc_t* gWl = gW_loc[tid].data();
    acc_t* gbl = gb_loc[tid].data();
    Scratch<acc_t> sc(g);
    std::vector<acc_t> eps(4 * g.Q), ts(D), gz(D);
    for (int64_t i = lo; i < hi; ++i) {
      const acc_t* t = tx + i * D;
      acc_t* gti = gt + i * D;
      for (int64_t d = 0; d < D; ++d) gti[d] = 0;
      for (int64_t j = 0; j < g.Nv; ++j) {
        const int64_t pair = i * g.Nv + j;
        const acc_t gij = gs[pair];
        const acc_t* p = pl + (j * g.Nt + i) * D;
        acc_t* gpv = gp + (j * g.Nt + i) * D;
        pair_radius<acc_t>(g, t, t_norm[i], fr + j * T * D, f_norm.data() + j * T, wtp, bp, sc);
        for (int64_t k = 0; k < T; ++k) Sp[pair * T + k] = sc.S[k];
        const int64_t m = bs[pair];
        if (nz) {
          const acc_t* e = nz + (pair * g.M + m) * D;
          for (int64_t d = 0; d < D; ++d) eps[d] = e[d];
        } else {
          for (int64_t q = 0; q < g.Q; ++q) {
            float e[4];
            tmass_noise4(static_cast<uint32_t>(q), static_cast<uint32_t>(m), static_cast<uint32_t>(g.j0 + j),
                         static_cast<uint32_t>(g.i0 + i), key, prior, stdf, e);
            for (int l = 0; l < 4; ++l) eps[l * g.Q + q] = acc_t(e[l]);
          }
        }
        const acc_t* R = sc.R.data();
        acc_t tp = 0, tt = 0, pp = 0;
        for (int64_t d = 0; d < D; ++d) {
          ts[d] = t[d] + eps[d] * R[d];
          tp += ts[d] * p[d];
          tt += ts[d] * ts[d];
          pp += p[d] * p[d];
        }
        const acc_t nt = std::sqrt(tt), np = std::sqrt(pp);
        const acc_t c = tp / (nt * np);
        const acc_t inv = gij / (nt * np), ct = gij * c / tt, cp = gij * c / pp;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t gtd = inv * p[d] - ct * ts[d];
          gpv[d] = inv * ts[d] - cp * p[d];
          gti[d] += gtd;
          gz[d] = gtd * eps[d] * R[d];
          gbl[d] += gz[d];
        }
        for (int64_t k = 0; k < T; ++k) {
          acc_t s = 0;
          const acc_t Sk = sc.S[k];
          for (int64_t d = 0; d < D; ++d) {
            s += wp[d * T + k] * gz[d];
            gWl[d * T + k] += gz[d] * Sk;
          }
          gSp[pair * T + k] = s;
        }
      }
    }
  });
  acc_t* gWp = gW.mutable_data_ptr<acc_t>();
  acc_t* gbp = gb.mutable_data_ptr<acc_t>();
  for (int64_t x = 0; x < D * T; ++x) gWp[x] = 0;
  for (int64_t d = 0; d < D; ++d) gbp[d] = 0;
  for (int th = 0; th < nthreads; ++th) {
    for (int64_t x = 0; x < D * T; ++x) gWp[x] += gW_loc[th][x];
    for (int64_t d = 0; d < D; ++d) gbp[d] += gb_loc[th][d];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> smsim_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& text_in, const at::Tensor& frames_in,
    const at::Tensor& pooled_in, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& best_in,
    int64_t num_samples, c10::string_view prior_s, double std_, int64_t seed,
    const c10::optional<at::Tensor>& noise_in, int64_t i0, int64_t j0) {
  const Dims g = check_dims(text_in, frames_in, pooled_in, w_in, b_in, num_samples, noise_in, i0, j0);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == g.Nt && grad_in.size(1) == g.Nv &&
                  best_in.dim() == 2 && best_in.size(0) == g.Nt && best_in.size(1) == g.Nv &&
                  best_in.scalar_type() == at::kLong,
              "stochastic_max_similarity backward: grad and best must be [Nt, Nv] (best int64)");
  const int prior = parse_prior(prior_s);
  const at::ScalarType ct = compute_type(text_in.scalar_type());
  auto prep = [&](const at::Tensor& x) { return x.to(ct).contiguous(); };
  const at::Tensor grad = prep(grad_in), text = prep(text_in), frames = prep(frames_in),
                   pooled = prep(pooled_in), w = prep(w_in), b = prep(b_in);
  const at::Tensor best = best_in.contiguous();
  at::Tensor noise;
  if (noise_in.has_value()) noise = prep(*noise_in);
  at::Tensor g_text = at::zeros({g.Nt, g.D}, text.options());
  at::Tensor g_pooled = at::zeros({g.Nv, g.Nt, g.D}, text.options());
  at::Tensor gW = at::zeros({g.D, g.T}, text.options()), gb = at::zeros({g.D}, text.options());
  at::Tensor gS = at::zeros({g.Nt, g.Nv, g.T}, text.options()), S = at::zeros({g.Nt, g.Nv, g.T}, text.options());
  const uint64_t key = tmass_key(static_cast<uint64_t>(seed));
  if (g.Nt * g.Nv > 0) {
    if (ct == at::kDouble) {
      bwd_impl<double>(g, grad, text, frames, pooled, w, b, best, noise_in ? &noise : nullptr, prior,
                       static_cast<float>(std_), key, g_text, g_pooled, gW, gb, gS, S);
    } else {
      bwd_impl<float>(g, grad, text, frames, pooled, w, b, best, noise_in ? &noise : nullptr, prior,
                      static_cast<float>(std_), key, g_text, g_pooled, gW, gb, gS, S);
    }
  }
  // Cosine path S_ijk = t^_i . f^_jk:
  //   grad t_i   += (sum_jk gS f^_jk - (sum_jk gS S) t^_i) / |t_i|
  //   grad f_jk   = (sum_i gS t^_i   - (sum_i gS S) f^_jk) / |f_jk|
  const at::Tensor t_norm = text.norm(2, -1, true), f_norm = frames.norm(2, -1, true);
  const at::Tensor t_hat = text / t_norm, f_hat = frames / f_norm;
  const at::Tensor gS2 = gS.reshape({g.Nt, g.Nv * g.T});
  const at::Tensor gSS = gS * S;
  g_text += (at::mm(gS2, f_hat.reshape({g.Nv * g.T, g.D})) - gSS.sum({1, 2}).unsqueeze(1) * t_hat) / t_norm;
  at::Tensor g_frames =
      (at::mm(gS2.t(), t_hat).reshape({g.Nv, g.T, g.D}) - gSS.sum(0).unsqueeze(2) * f_hat) / f_norm;
  const auto out_t = text_in.scalar_type();
  return {g_text.to(out_t), g_frames.to(out_t), g_pooled.to(out_t), gW.to(out_t), gb.to(out_t)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tvr_C, m) {
  m.def(
      "stochastic_max_similarity_fwd(Tensor text, Tensor frames, Tensor pooled, Tensor radius_weight, "
      "Tensor radius_bias, int num_samples, str prior, float std, int seed, Tensor? noise, int text_offset, int video_offset) -> (Tensor, Tensor)");
  m.def(
      "stochastic_max_similarity_bwd(Tensor grad, Tensor text, Tensor frames, Tensor pooled, "
      "Tensor radius_weight, Tensor radius_bias, Tensor best, int num_samples, str prior, float std, "
      "int seed, Tensor? noise, int text_offset, int video_offset) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tvr_C, CPU, m) {
  m.impl("stochastic_max_similarity_fwd", &smsim_fwd_cpu);
  m.impl("stochastic_max_similarity_bwd", &smsim_bwd_cpu);
}

}  // namespace tvr
