// Sinkhorn-Knopp (SPEC 4), CPU.
//
// Notation: L = logits [Nq, Nv]. Both domains are the same map in exact arithmetic when written
// with log-potentials f [Nq] (= log a) and g [Nv] (= log b - max L), so that the plan of step t
// is P = exp(L + f + g):
//   g_0 = -LSE_i L,   f_t = -LSE_j (L + g_{t-1}),   g_t = -LSE_i (L + f_t),   t = 1..T,
//   row_bias = log_softmax(f_T),   col_bias = log_softmax(g_T).
// The forward returns the histories f [T, Nq] and g [T+1, Nv] (accumulation dtype); the
// Python op turns the last ones into the biases and saves them for the backward, which is
// analytic (O(T (Nq + Nv)) saved, nothing of size Nq*Nv but the gradient itself).
//
// Forward, one read of L per pass, parallel over rows with per-thread column accumulators:
//   pass 0: max(L), a non-finite check (sum of x*0 is NaN iff some x is inf/NaN), and in the
//           log domain the column maxima;
//   pass 1: column sums of exp(L - max) (probability domain, as the authors) or of
//           exp(L - colmax) (log domain: stable) -> b_0 / g_0;
//   pass t: each row computes its exp(L_i. - m) b (probability) or its stabilised
//           exp(L_i. + g - rowmax) (log) into a row buffer of Nv (L1-resident), reduces it to
//           a_i / f_i, and adds a_i k_ij / (e_ij / s_i) to its thread's column sums.
//   In the log domain the column update is g_t = g_{t-1} - log(sum_i e_ij / s_i): the
//   column sums of a row-normalised plan, >= 1/(Nq Nv) because every column of the previous,
//   column-normalised plan holds an entry >= 1/Nq. Hence no column max is needed after pass 1
//   and nothing overflows or underflows for any finite logits.
//
// Backward (dR, dC -> dL), with dF = dR - softmax(f_T) sum dR and dG = dC - softmax(g_T) sum dC
// computed by the Python op: for t = T..1 one pass over rows does
//   Pg = exp(L + f_t + g_t):      dL -= dG_t[None] Pg,  dF_t -= Pg @ dG_t   (row reduction)
//   Pf = exp(L + f_t + g_{t-1}):  dL -= dF_t[:, None] Pf,  dG_{t-1} = -(dF_t @ Pf)  (columns)
// and a last pass adds dL -= dG_0[None] exp(L + g_0). (max L cancels out of the result, so it
// gets no gradient.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "tvr/fast_math.h"

// The row loops are exp-bound. They are compiled in several ISA clones chosen at load time
// (GCC function multi-versioning), since the extension itself is built for baseline x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TVR_SK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TVR_SK_CLONES
#endif
#define TVR_SK_INLINE inline __attribute__((always_inline))

namespace tvr {
namespace {

// ---------------------------------------------------------------- row kernels (templates)

// max over the row, x*0 summed (NaN iff some x is not finite), optional column maxima.
template <typename T>
TVR_SK_INLINE void k_stats(const T* x, int64_t n, T* colmax, T& mx, T& bad) {
  // Fixed-width lane accumulators: GCC leaves a loop with two omp-simd reductions (max and
  // sum) scalar, and the scalar max/add chain costs ~1 ns per logit (3x this pass).
  constexpr int W = 16;
  T mv[W], sv[W];
  for (int l = 0; l < W; ++l) {
    mv[l] = mx;
    sv[l] = T(0);
  }
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    for (int l = 0; l < W; ++l) {
      mv[l] = std::max(mv[l], x[j + l]);
      sv[l] += x[j + l] * T(0);
    }
  }
  T m = mx, s = bad;
  for (; j < n; ++j) {
    m = std::max(m, x[j]);
    s += x[j] * T(0);
  }
  for (int l = 0; l < W; ++l) {
    m = std::max(m, mv[l]);
    s += sv[l];
  }
  if (colmax != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) colmax[j] = std::max(colmax[j], x[j]);
  }
  mx = m;
  bad = s;
}

// colacc += exp(x - shift)
template <typename T>
TVR_SK_INLINE void k_expsum(const T* x, int64_t n, const T* shift, T* colacc) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) colacc[j] += fast_exp(x[j] - shift[j]);
}

// Probability domain row: k = exp(x - m); a = 1 / (k . b); colacc += a k. Returns a.
template <typename T>
TVR_SK_INLINE T k_prob(const T* x, int64_t n, T m, const T* b, T* colacc, T* kbuf) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T k = fast_exp(x[j] - m);
    kbuf[j] = k;
    s += k * b[j];
  }
  const T a = T(1) / s;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) colacc[j] += a * kbuf[j];
  return a;
}

// Log domain row: v = x + g; e = exp(v - max v); s = sum e; colacc += e / s.
// Returns f = -LSE(v) = -(max v + log s).
template <typename T>
TVR_SK_INLINE T k_log(const T* x, int64_t n, const T* g, T* colacc, T* buf) {
  T vmax = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : vmax)
  for (int64_t j = 0; j < n; ++j) {
    const T v = x[j] + g[j];
    buf[j] = v;
    vmax = std::max(vmax, v);
  }
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T e = fast_exp(buf[j] - vmax);
    buf[j] = e;
    s += e;
  }
  const T inv = T(1) / s;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) colacc[j] += inv * buf[j];
  return -(vmax + std::log(s));
}

// Backward row of step t (see the header comment). dl is written (FIRST) or accumulated.
// With `ratio` (RATIO), Pf = Pg * ratio_j, ratio = exp(g_{t-1} - g_t): one exp per logit
// instead of two. g_{t-1} - g_t = log(column sums of a row-stochastic plan) <= log(Nq), so
// the factor is bounded and Pf = Pg ratio is exact up to rounding wherever Pg has not
// underflowed; where it has, the true Pf is below exp(-104 + log Nq): an absolute error far
// below the gradient's rounding. The driver checks the bound (< 60) and falls back to two
// exps when it fails, which only non-finite (probability-domain overflow) potentials do.
template <bool FIRST, bool RATIO, typename T>
TVR_SK_INLINE void k_bwd_t(const T* x, int64_t n, T f, const T* gt, const T* gp, const T* ratio,
                           const T* dgt, T df_in, T* dl, T* colacc, T* buf) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) {
    const T pg = fast_exp(x[j] + f + gt[j]);
    buf[j] = pg;
    dot += pg * dgt[j];
  }
  const T df = df_in - dot;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T pf;
    if constexpr (RATIO) {
      pf = buf[j] * ratio[j];
    } else {
      pf = fast_exp(x[j] + f + gp[j]);
    }
    const T d = -dgt[j] * buf[j] - df * pf;
    if constexpr (FIRST) {
      dl[j] = d;
    } else {
      dl[j] += d;
    }
    colacc[j] -= df * pf;
  }
}

template <typename T>
TVR_SK_INLINE void k_bwd(const T* x, int64_t n, T f, const T* gt, const T* gp, const T* ratio,
                         const T* dgt, T df_in, T* dl, bool first, T* colacc, T* buf) {
  if (first) {
    if (ratio) k_bwd_t<true, true>(x, n, f, gt, gp, ratio, dgt, df_in, dl, colacc, buf);
    else k_bwd_t<true, false>(x, n, f, gt, gp, ratio, dgt, df_in, dl, colacc, buf);
  } else {
    if (ratio) k_bwd_t<false, true>(x, n, f, gt, gp, ratio, dgt, df_in, dl, colacc, buf);
    else k_bwd_t<false, false>(x, n, f, gt, gp, ratio, dgt, df_in, dl, colacc, buf);
  }
}

// Last backward pass: dl -= dg0 exp(x + g0).
template <typename T>
TVR_SK_INLINE void k_bwd0(const T* x, int64_t n, const T* g0, const T* dg0, T* dl) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dl[j] -= dg0[j] * fast_exp(x[j] + g0[j]);
}

// ------------------------------------- float instances in ISA clones, double plain

#define TVR_SK_INSTANCES(ATTR, T)                                                              \
  ATTR void r_stats(const T* x, int64_t n, T* cm, T& mx, T& bad) { k_stats(x, n, cm, mx, bad); } \
  ATTR void r_expsum(const T* x, int64_t n, const T* sh, T* acc) { k_expsum(x, n, sh, acc); }   \
  ATTR T r_prob(const T* x, int64_t n, T m, const T* b, T* acc, T* kb) {                        \
    return k_prob(x, n, m, b, acc, kb);                                                         \
  }                                                                                             \
  ATTR T r_log(const T* x, int64_t n, const T* g, T* acc, T* buf) { return k_log(x, n, g, acc, buf); } \
  ATTR void r_bwd(const T* x, int64_t n, T f, const T* gt, const T* gp, const T* ratio,        \
                  const T* dgt, T df_in, T* dl, bool first, T* acc, T* buf) {                   \
    k_bwd(x, n, f, gt, gp, ratio, dgt, df_in, dl, first, acc, buf);                             \
  }                                                                                             \
  ATTR void r_bwd0(const T* x, int64_t n, const T* g0, const T* dg0, T* dl) { k_bwd0(x, n, g0, dg0, dl); }

TVR_SK_INSTANCES(TVR_SK_CLONES, float)
TVR_SK_INSTANCES(, double)
#undef TVR_SK_INSTANCES

// ---------------------------------------------------------------- drivers

// Scratch per row chunk: column accumulators and two row buffers, each of Nv. The rows are
// cut into `n` contiguous chunks (one per thread) that own their buffers, which keeps the
// column sums deterministic for a given thread count and does not rely on thread ids.
template <typename acc_t>
struct Scratch {
  int64_t n, nv;
  std::vector<acc_t> col, rows;
  Scratch(int64_t nchunks, int64_t Nv)
      : n(nchunks), nv(Nv), col(nchunks * Nv), rows(nchunks * 2 * Nv) {}
  acc_t* acc(int64_t c) { return col.data() + c * nv; }
  acc_t* xbuf(int64_t c) { return rows.data() + c * 2 * nv; }
  acc_t* buf(int64_t c) { return rows.data() + c * 2 * nv + nv; }
  void zero() { std::fill(col.begin(), col.end(), acc_t(0)); }
  // out[j] = sum over chunks of acc(c)[j]
  void reduce(acc_t* out) {
    std::fill(out, out + nv, acc_t(0));
    for (int64_t c = 0; c < n; ++c) {
      const acc_t* a = acc(c);
      for (int64_t j = 0; j < nv; ++j) out[j] += a[j];
    }
  }
};

// Chunks: one per thread, but at least ~32K logits each so small inputs stay serial.
int64_t num_chunks(int64_t Nq, int64_t Nv) {
  const int64_t min_rows = std::max<int64_t>(1, (int64_t(1) << 15) / Nv);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (Nq + min_rows - 1) / min_rows));
}

// Run body(i, row, chunk) for every row of L, chunks in parallel. `row` points to the row in
// acc_t (the input itself, or a converted copy for half types).
template <typename acc_t, typename scalar_t, typename Body>
void for_rows(const scalar_t* L, int64_t Nq, int64_t Nv, Scratch<acc_t>& sc, const Body& body) {
  at::parallel_for(0, sc.n, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t begin = Nq * c / sc.n, end = Nq * (c + 1) / sc.n;
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* src = L + i * Nv;
        const acc_t* row;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          row = src;
        } else {
          acc_t* xb = sc.xbuf(c);
          for (int64_t j = 0; j < Nv; ++j) xb[j] = static_cast<acc_t>(src[j]);
          row = xb;
        }
        body(i, row, c);
      }
    }
  });
}

void check_logits(const at::Tensor& logits, int64_t n_iters) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "sinkhorn_knopp: logits must be 2-D [Nq, Nv], got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(0) > 0 && logits.size(1) > 0,
                    "sinkhorn_knopp: logits must be non-empty, got ", logits.sizes());
  TORCH_CHECK_VALUE(n_iters >= 1, "sinkhorn_knopp: n_iters must be >= 1, got ", n_iters);
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()),
                    "sinkhorn_knopp: logits must be floating point, got ", logits.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_knopp_fwd_cpu(const at::Tensor& logits_in,
                                                          int64_t n_iters, bool log_domain) {
  check_logits(logits_in, n_iters);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t Nq = logits.size(0), Nv = logits.size(1), T = n_iters;
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor f_hist = at::empty({T, Nq}, logits.options().dtype(acc_type));
  at::Tensor g_hist = at::empty({T + 1, Nv}, logits.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sinkhorn_knopp_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* L = logits.const_data_ptr<scalar_t>();
    acc_t* F = f_hist.mutable_data_ptr<acc_t>();
    acc_t* G = g_hist.mutable_data_ptr<acc_t>();
    const int64_t nt = num_chunks(Nq, Nv);
    Scratch<acc_t> sc(nt, Nv);
    std::vector<acc_t> col(Nv), shift(Nv);

    // pass 0: max, finiteness, column maxima (log domain; accumulated in sc.col)
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    std::fill(sc.col.begin(), sc.col.end(), ninf);
    std::vector<acc_t> tmax(nt, ninf), tbad(nt, acc_t(0));
    for_rows<acc_t>(L, Nq, Nv, sc, [&](int64_t, const acc_t* x, int64_t c) {
      r_stats(x, Nv, log_domain ? sc.acc(c) : nullptr, tmax[c], tbad[c]);
    });
    acc_t m = ninf, bad = 0;
    for (int64_t t = 0; t < nt; ++t) {
      m = std::max(m, tmax[t]);
      bad += tbad[t];
    }
    TORCH_CHECK_VALUE(bad == acc_t(0),
                      "sinkhorn_knopp: logits contain NaN or +-inf; only finite logits are "
                      "supported (mask by a large finite negative value instead of -inf)");
    if (log_domain) {
      for (int64_t j = 0; j < Nv; ++j) shift[j] = ninf;
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t j = 0; j < Nv; ++j) shift[j] = std::max(shift[j], sc.acc(t)[j]);
    } else {
      std::fill(shift.begin(), shift.end(), m);
    }

    // pass 1: column sums of exp(L - shift) -> b_0 (probability) / g_0 (log)
    sc.zero();
    for_rows<acc_t>(L, Nq, Nv, sc, [&](int64_t, const acc_t* x, int64_t c) {
      r_expsum(x, Nv, shift.data(), sc.acc(c));
    });
    sc.reduce(col.data());
    // Probability domain: the state is b itself (kept in `shift`'s storage as `b`).
    std::vector<acc_t>& b = shift;
    for (int64_t j = 0; j < Nv; ++j) {
      if (log_domain) {
        G[j] = -(shift[j] + std::log(col[j]));
      } else {
        b[j] = acc_t(1) / col[j];
        G[j] = std::log(b[j]) - m;
      }
    }

    // passes 2..T+1: one read of L per (a, b) update
    for (int64_t t = 1; t <= T; ++t) {
      acc_t* f = F + (t - 1) * Nq;
      const acc_t* gprev = G + (t - 1) * Nv;
      acc_t* g = G + t * Nv;
      sc.zero();
      if (log_domain) {
        for_rows<acc_t>(L, Nq, Nv, sc, [&](int64_t i, const acc_t* x, int64_t c) {
          f[i] = r_log(x, Nv, gprev, sc.acc(c), sc.buf(c));
        });
        sc.reduce(col.data());
        for (int64_t j = 0; j < Nv; ++j) g[j] = gprev[j] - std::log(col[j]);
      } else {
        for_rows<acc_t>(L, Nq, Nv, sc, [&](int64_t i, const acc_t* x, int64_t c) {
          f[i] = std::log(r_prob(x, Nv, m, b.data(), sc.acc(c), sc.buf(c)));
        });
        sc.reduce(col.data());
        for (int64_t j = 0; j < Nv; ++j) {
          b[j] = acc_t(1) / col[j];
          g[j] = std::log(b[j]) - m;
        }
      }
    }
  });
  return {f_hist, g_hist};
}

// dF [Nq], dG [Nv]: gradients of f_T and g_T (after the log_softmax backward), acc dtype.
at::Tensor sinkhorn_knopp_bwd_cpu(const at::Tensor& logits_in, const at::Tensor& f_hist_in,
                                  const at::Tensor& g_hist_in, const at::Tensor& dF_in,
                                  const at::Tensor& dG_in) {
  const int64_t T = f_hist_in.size(0);
  check_logits(logits_in, T);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t Nq = logits.size(0), Nv = logits.size(1);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(f_hist_in.sizes() == at::IntArrayRef({T, Nq}) &&
                  g_hist_in.sizes() == at::IntArrayRef({T + 1, Nv}) &&
                  dF_in.sizes() == at::IntArrayRef({Nq}) && dG_in.sizes() == at::IntArrayRef({Nv}),
              "sinkhorn_knopp_bwd: history / gradient shapes do not match logits");
  const at::Tensor f_hist = f_hist_in.to(acc_type).contiguous();
  const at::Tensor g_hist = g_hist_in.to(acc_type).contiguous();
  const at::Tensor dF = dF_in.to(acc_type).contiguous();
  const at::Tensor dG_T = dG_in.to(acc_type).contiguous();
  // The gradient is accumulated in acc_t: in place in the result for float / double, in a
  // float buffer cast at the end for half types.
  at::Tensor dL = at::empty({Nq, Nv}, logits.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sinkhorn_knopp_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* L = logits.const_data_ptr<scalar_t>();
    const acc_t* F = f_hist.const_data_ptr<acc_t>();
    const acc_t* G = g_hist.const_data_ptr<acc_t>();
    const acc_t* dFT = dF.const_data_ptr<acc_t>();
    acc_t* D = dL.mutable_data_ptr<acc_t>();
    Scratch<acc_t> sc(num_chunks(Nq, Nv), Nv);
    std::vector<acc_t> dg(dG_T.const_data_ptr<acc_t>(), dG_T.const_data_ptr<acc_t>() + Nv);
    std::vector<acc_t> dgp(Nv), ratio(Nv);
    for (int64_t t = T; t >= 1; --t) {
      const acc_t* f = F + (t - 1) * Nq;
      const acc_t* gt = G + t * Nv;
      const acc_t* gp = G + (t - 1) * Nv;
      const bool first = t == T;
      // Pf = Pg exp(g_{t-1} - g_t) when that factor is safely bounded (see k_bwd_t)
      acc_t max_step = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < Nv; ++j) {
        ratio[j] = gp[j] - gt[j];
        max_step = std::max(max_step, ratio[j]);
      }
      const bool use_ratio = max_step < acc_t(60) && std::isfinite(max_step);
      if (use_ratio)
        for (int64_t j = 0; j < Nv; ++j) ratio[j] = std::exp(ratio[j]);
      sc.zero();
      for_rows<acc_t>(L, Nq, Nv, sc, [&](int64_t i, const acc_t* x, int64_t c) {
        r_bwd(x, Nv, f[i], gt, gp, use_ratio ? ratio.data() : nullptr, dg.data(), first ? dFT[i] : acc_t(0), D + i * Nv, first,
              sc.acc(c), sc.buf(c));
      });
      sc.reduce(dgp.data());
      dg.swap(dgp);
    }
    for_rows<acc_t>(L, Nq, Nv, sc, [&](int64_t i, const acc_t* x, int64_t) {
      r_bwd0(x, Nv, G, dg.data(), D + i * Nv);
    });
  });
  return dL.scalar_type() == logits.scalar_type() ? dL : dL.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tvr_C, m) {
  m.def("sinkhorn_knopp_fwd(Tensor logits, int n_iters, bool log_domain) -> (Tensor, Tensor)");
  m.def("sinkhorn_knopp_bwd(Tensor logits, Tensor f_hist, Tensor g_hist, Tensor dF, Tensor dG) -> Tensor");
}

TORCH_LIBRARY_IMPL(tvr_C, CPU, m) {
  m.impl("sinkhorn_knopp_fwd", &sinkhorn_knopp_fwd_cpu);
  m.impl("sinkhorn_knopp_bwd", &sinkhorn_knopp_bwd_cpu);
}

}  // namespace tvr
