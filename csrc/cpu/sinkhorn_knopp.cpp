// Sinkhorn-Knopp (SPEC 4), CPU.
//
// Notation: L = logits [Nq, Nv]. Both domains are the same map in exact arithmetic when written
// with log-potentials f [Nq] (= log a) and g [Nv] (= log b - max L), so that the plans are
// P = exp(L + f + g). With kappa = ln(Nv / Nq):
//   g_0 = -LSE_i L,   f_t = kappa - LSE_j (L + g_{t-1}),   g_t = -LSE_i (L + f_t),   t = 1..T,
//   row_bias = log_softmax(f_T),   col_bias = log_softmax(g_T).
// kappa (probability domain: a = (Nv / Nq) / (K b)) is the one departure from the authors'
// a = 1 / (K b) (tvr_kernels/reference/sinkhorn_knopp.py, module docstring): rows summing to
// Nv / Nq agree with columns summing to 1, so f and g converge instead of drifting by
// |kappa| per iteration (float32 overflow, lost precision), and the constant it adds to f
// and g leaves the biases unchanged.
// The forward returns the histories f [T, Nq] and g [T+1, Nv] (accumulation dtype); the
// Python op turns the last ones into the biases and saves them for the backward, which is
// analytic (O(T (Nq + Nv)) saved, nothing of size Nq*Nv but the gradient itself).
//
// Forward, one read of L per pass, parallel over row chunks with per-chunk column accumulators:
//   pass 0: max(L), a non-finite check (sum of x*0 is NaN iff some x is inf/NaN), and in the
//           log domain the column maxima;
//   pass 1: column sums of exp(L - max) (probability domain, as the authors) or of
//           exp(L - colmax) (log domain: stable) -> b_0 / g_0;
//   pass t: each row computes its exp(L_i. - m) b (probability) or its stabilised
//           exp(L_i. + g - rowmax) (log) into a buffer (L1-resident, kBlock rows), reduces it
//           to a_i / f_i, and adds a_i k_ij / (e_ij / s_i) to its chunk's column sums.
//   In the log domain the column update is g_t = g_{t-1} - kappa - log(sum_i e_ij / s_i):
//   the column sums of a row-stochastic plan, >= 1/(Nq Nv) because every column of the
//   previous, column-stochastic plan holds an entry >= 1/Nq. Hence no column max is needed
//   after pass 1 and nothing overflows or underflows for any finite logits.
// The row chunks depend on the shape only (Scratch), and the column sums are added in row
// order within a chunk and in chunk order across them, so the results are bitwise the same
// for any number of threads.
//
// Backward (dR, dC -> dL), with dF = dR - softmax(f_T) sum dR and dG = dC - softmax(g_T) sum dC
// computed by the Python op: the stochastic plans of step t are
//   Pg = exp(L + f_t + g_t)              (columns sum to 1: dg_t/d(L, f_t) = -Pg)
//   Pf = exp(L + f_t + g_{t-1} - kappa)  (rows sum to 1:    df_t/d(L, g_{t-1}) = -Pf)
// and for t = T..1 one pass over rows does
//   dL -= dG_t[None] Pg,  dF_t -= Pg @ dG_t   (row reduction)
//   dL -= dF_t[:, None] Pf,  dG_{t-1} = -(dF_t @ Pf)  (column sums)
// and a last pass adds dL -= dG_0[None] exp(L + g_0). (max L cancels out of the result, so it
// gets no gradient; kappa is a constant of the shape.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
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
//
// What shaped them (one float32 pass over [45000, 1000] on a 2-core Xeon): GCC compiles an
// `omp simd reduction` over a row of ~1000 into the vector loop plus a scalar epilogue and a
// horizontal sum through the stack, which doubled the cost of the probability-domain row; the
// reductions here keep kLanes explicit accumulators instead. A pass streams L from memory, and
// loads and exps overlapped poorly until each row prefetches its successor into L2 as it is read
// (15 -> 11 ms per pass). Rows go kBlock at a time through the column update, which then
// reads and writes the column accumulators once per block; its sums keep the row order, so the
// result does not depend on the blocking. The forward exps have arguments <= 0 (x - max) and
// use fast_exp_nonpos; the backward's may be positive or non-finite (probability-domain
// overflow) and use fast_exp.

constexpr int kLanes = 16;  // accumulators of a row reduction: one 512-bit register of float
constexpr int kBlock = 4;   // rows per column update

// Prefetch into L2 the kLanes elements at address `at` (an integer address: the row after the
// last one of L lies past its end, which a prefetch tolerates but pointer arithmetic does not).
template <typename T>
TVR_SK_INLINE void prefetch_lanes(uintptr_t at) {
  for (size_t o = 0; o < kLanes * sizeof(T); o += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(at + o), 0, 2);
}

// The address of the row after `x` (rows of n elements).
template <typename T>
TVR_SK_INLINE uintptr_t next_row(const T* x, int64_t n) {
  return reinterpret_cast<uintptr_t>(x) + static_cast<uintptr_t>(n) * sizeof(T);
}

// Reduce term(j) for j < n with `combine` over kLanes accumulators, prefetching the row at
// address pf (0: none) alongside.
template <typename T, typename Combine, typename Term>
TVR_SK_INLINE T lane_reduce(int64_t n, uintptr_t pf, T init, const Combine& combine,
                            const Term& term) {
  T acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = init;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    if (pf != 0) prefetch_lanes<T>(pf + j * sizeof(T));
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] = combine(acc[l], term(j + l));
  }
  T r = init;
  for (; j < n; ++j) r = combine(r, term(j));
  for (int l = 0; l < kLanes; ++l) r = combine(r, acc[l]);
  return r;
}

template <typename T, typename Term>
TVR_SK_INLINE T lane_sum(int64_t n, uintptr_t pf, const Term& term) {
  return lane_reduce(n, pf, T(0), [](T a, T b) { return a + b; }, term);
}

template <typename T, typename Term>
TVR_SK_INLINE T lane_max(int64_t n, uintptr_t pf, const Term& term) {
  return lane_reduce(n, pf, -std::numeric_limits<T>::infinity(),
                     [](T a, T b) { return std::max(a, b); }, term);
}

// body(j) for j < n, vectorised kLanes at a time, prefetching the row at address pf alongside.
template <typename T, typename Body>
TVR_SK_INLINE void for_lanes(int64_t n, uintptr_t pf, const Body& body) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    prefetch_lanes<T>(pf + j * sizeof(T));
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) body(j + l);
  }
  for (; j < n; ++j) body(j);
}

// colacc[j] += sum_r w[r] v[r n + j] over R rows, in row order.
template <int R, typename T>
TVR_SK_INLINE void col_update(int64_t n, const T* w, const T* v, T* colacc) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T s = colacc[j];
    for (int r = 0; r < R; ++r) s += w[r] * v[r * n + j];
    colacc[j] = s;
  }
}

// max over the row, x*0 summed (NaN iff some x is not finite), optional column maxima.
template <typename T>
TVR_SK_INLINE void k_stats(const T* x, int64_t n, T* colmax, T& mx, T& bad) {
  mx = std::max(mx, lane_max<T>(n, next_row(x, n), [&](int64_t j) { return x[j]; }));
  bad += lane_sum<T>(n, 0, [&](int64_t j) { return x[j] * T(0); });
  if (colmax != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) colmax[j] = std::max(colmax[j], x[j]);
  }
}

// colacc += exp(x - shift), shift >= x (the maximum, or the column maxima).
template <typename T>
TVR_SK_INLINE void k_expsum(const T* x, int64_t n, const T* shift, T* colacc) {
  for_lanes<T>(n, next_row(x, n),
               [&](int64_t j) { colacc[j] += fast_exp_nonpos(x[j] - shift[j]); });
}

// Probability domain, R rows: k = exp(x_r - m); a_r = ratio / (k . b); colacc += a_r k.
template <int R, typename T>
TVR_SK_INLINE void k_prob(const T* x, int64_t n, T m, T ratio, const T* b, T* colacc, T* kbuf,
                          T* a) {
  for (int r = 0; r < R; ++r) {
    const T* xr = x + r * n;
    T* kr = kbuf + r * n;
    a[r] = ratio / lane_sum<T>(n, next_row(xr, n), [&](int64_t j) {
      const T k = fast_exp_nonpos(xr[j] - m);
      kr[j] = k;
      return k * b[j];
    });
  }
  col_update<R>(n, a, kbuf, colacc);
}

// Log domain, R rows: v = x_r + g; e = exp(v - max v); s = sum e; colacc += e / s (the
// row-stochastic plan; the column update subtracts kappa);
// f_r = kappa - LSE(v) = kappa - (max v + log s).
template <int R, typename T>
TVR_SK_INLINE void k_log(const T* x, int64_t n, const T* g, T kappa, T* colacc, T* buf, T* f) {
  T inv[R];
  for (int r = 0; r < R; ++r) {
    const T* xr = x + r * n;
    T* br = buf + r * n;
    const T vmax = lane_max<T>(n, next_row(xr, n), [&](int64_t j) {
      const T v = xr[j] + g[j];
      br[j] = v;
      return v;
    });
    const T s = lane_sum<T>(n, 0, [&](int64_t j) {
      const T e = fast_exp_nonpos(br[j] - vmax);
      br[j] = e;
      return e;
    });
    inv[r] = T(1) / s;
    f[r] = kappa - (vmax + std::log(s));
  }
  col_update<R>(n, inv, buf, colacc);
}

// Backward row of step t (see the header comment); gp = g_{t-1} - kappa. dl is written (FIRST)
// or accumulated. With `ratio` (RATIO), Pf = Pg * ratio_j, ratio = exp(gp - g_t): one exp per
// logit instead of two. gp - g_t = log(column sums of the row-stochastic Pf) <= log(Nq), so
// the factor is bounded and Pf = Pg ratio is exact up to rounding wherever Pg has not
// underflowed; where it has, the true Pf is below exp(-104 + log Nq): an absolute error far
// below the gradient's rounding. The driver checks the bound (< 60) and falls back to two
// exps when it fails, which only non-finite (probability-domain overflow) potentials do.
template <bool FIRST, bool RATIO, typename T>
TVR_SK_INLINE void k_bwd_t(const T* x, int64_t n, T f, const T* gt, const T* gp, const T* ratio,
                           const T* dgt, T df_in, T* dl, T* colacc, T* buf) {
  const T dot = lane_sum<T>(n, next_row(x, n), [&](int64_t j) {
    const T pg = fast_exp(x[j] + f + gt[j]);
    buf[j] = pg;
    return pg * dgt[j];
  });
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
  for_lanes<T>(n, next_row(x, n), [&](int64_t j) { dl[j] -= dg0[j] * fast_exp(x[j] + g0[j]); });
}

// ------------------------------------- float instances in ISA clones, double plain
// Each takes a block of nr <= kBlock consecutive rows x[nr, n] (stats and the backward go
// row by row inside).

#define TVR_SK_INSTANCES(ATTR, T)                                                              \
  ATTR void r_stats(const T* x, int64_t nr, int64_t n, T* cm, T& mx, T& bad) {                  \
    for (int64_t r = 0; r < nr; ++r) k_stats(x + r * n, n, cm, mx, bad);                        \
  }                                                                                             \
  ATTR void r_expsum(const T* x, int64_t nr, int64_t n, const T* sh, T* acc) {                  \
    for (int64_t r = 0; r < nr; ++r) k_expsum(x + r * n, n, sh, acc);                           \
  }                                                                                             \
  ATTR void r_prob(const T* x, int64_t nr, int64_t n, T m, T ratio, const T* b, T* acc, T* kb,  \
                   T* a) {                                                                      \
    if (nr == kBlock) k_prob<kBlock>(x, n, m, ratio, b, acc, kb, a);                            \
    else for (int64_t r = 0; r < nr; ++r) k_prob<1>(x + r * n, n, m, ratio, b, acc, kb, a + r);  \
  }                                                                                             \
  ATTR void r_log(const T* x, int64_t nr, int64_t n, const T* g, T kappa, T* acc, T* buf,       \
                  T* f) {                                                                       \
    if (nr == kBlock) k_log<kBlock>(x, n, g, kappa, acc, buf, f);                               \
    else for (int64_t r = 0; r < nr; ++r) k_log<1>(x + r * n, n, g, kappa, acc, buf, f + r);     \
  }                                                                                             \
  ATTR void r_bwd(const T* x, int64_t nr, int64_t n, const T* f, const T* gt, const T* gp,      \
                  const T* ratio, const T* dgt, const T* df_in, T* dl, bool first, T* acc,      \
                  T* buf) {                                                                     \
    for (int64_t r = 0; r < nr; ++r)                                                            \
      k_bwd(x + r * n, n, f[r], gt, gp, ratio, dgt, df_in ? df_in[r] : T(0), dl + r * n, first, \
            acc, buf);                                                                          \
  }                                                                                             \
  ATTR void r_bwd0(const T* x, int64_t nr, int64_t n, const T* g0, const T* dg0, T* dl) {       \
    for (int64_t r = 0; r < nr; ++r) k_bwd0(x + r * n, n, g0, dg0, dl + r * n);                 \
  }

TVR_SK_INSTANCES(TVR_SK_CLONES, float)
TVR_SK_INSTANCES(, double)
#undef TVR_SK_INSTANCES

// ---------------------------------------------------------------- drivers

// Row chunks: runs of whole row blocks, at least ~32K logits each (small inputs stay serial)
// and at most kMaxChunks. They depend on the shape only, never on the thread count: each chunk
// sums its rows into its own column accumulators, which are then added in chunk order, so the
// results are bitwise the same however the chunks are spread over threads. kMaxChunks bounds
// those accumulators (kMaxChunks * Nv) and the serial reduction per pass (kMaxChunks * Nv adds:
// ~0.1% of a pass at [45000, 1000]) and still balances up to a few dozen threads.
constexpr int64_t kMaxChunks = 64;

template <typename acc_t>
struct Scratch {
  int64_t n, nb, nv;  // chunks, row blocks, columns
  std::vector<acc_t> col;
  Scratch(int64_t Nq, int64_t Nv) : nb((Nq + kBlock - 1) / kBlock), nv(Nv) {
    const int64_t min_blocks = std::max<int64_t>(1, (int64_t(1) << 15) / (Nv * kBlock));
    n = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (nb + min_blocks - 1) / min_blocks));
    col.resize(n * nv);
  }
  int64_t row_begin(int64_t c) const { return kBlock * (nb * c / n); }
  acc_t* acc(int64_t c) { return col.data() + c * nv; }
  void zero() { std::fill(col.begin(), col.end(), acc_t(0)); }
  // out[j] = sum over chunks, in chunk order, of acc(c)[j]
  void reduce(acc_t* out) {
    std::fill(out, out + nv, acc_t(0));
    for (int64_t c = 0; c < n; ++c) {
      const acc_t* a = acc(c);
      for (int64_t j = 0; j < nv; ++j) out[j] += a[j];
    }
  }
};

// Run body(i, nr, rows, chunk, buf) for blocks of nr <= kBlock consecutive rows of L starting
// at row i, chunks in parallel. `rows` points to the block in acc_t (the input itself, or a
// converted copy for half types); `buf` is a kBlock x Nv scratch block. Both buffers belong to
// the task: they hold nothing across blocks, so which thread runs a chunk does not matter.
template <typename acc_t, typename scalar_t, typename Body>
void for_blocks(const scalar_t* L, int64_t Nq, int64_t Nv, const Scratch<acc_t>& sc,
                const Body& body) {
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, sc.n, 1, [&](int64_t cb, int64_t ce) {
    std::vector<acc_t> bufs((convert ? 2 : 1) * kBlock * Nv);
    acc_t* buf = bufs.data();
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t end = std::min(Nq, sc.row_begin(c + 1));
      for (int64_t i = sc.row_begin(c); i < end; i += kBlock) {
        const int64_t nr = std::min<int64_t>(kBlock, end - i);
        const scalar_t* src = L + i * Nv;
        const acc_t* rows;
        if constexpr (convert) {
          acc_t* xb = buf + kBlock * Nv;
          for (int64_t j = 0; j < nr * Nv; ++j) xb[j] = static_cast<acc_t>(src[j]);
          rows = xb;
        } else {
          rows = src;
        }
        body(i, nr, rows, c, buf);
      }
    }
  });
}

// (Nv / Nq, ln(Nv / Nq)) in acc_t: the row sums of the plans after a row update and kappa. The
// same double expressions as row_mass in tvr_kernels/reference/sinkhorn_knopp.py.
template <typename acc_t>
std::pair<acc_t, acc_t> row_mass(int64_t Nq, int64_t Nv) {
  const double ratio = static_cast<double>(Nv) / static_cast<double>(Nq);
  return {static_cast<acc_t>(ratio), static_cast<acc_t>(std::log(ratio))};
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
    Scratch<acc_t> sc(Nq, Nv);
    const int64_t nt = sc.n;
    const std::pair<acc_t, acc_t> mass = row_mass<acc_t>(Nq, Nv);
    const acc_t ratio = mass.first, kappa = mass.second;
    std::vector<acc_t> col(Nv), shift(Nv);

    // pass 0: max, finiteness, column maxima (log domain; accumulated in sc.col)
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    std::fill(sc.col.begin(), sc.col.end(), ninf);
    std::vector<acc_t> tmax(nt, ninf), tbad(nt, acc_t(0));
    for_blocks<acc_t>(L, Nq, Nv, sc, [&](int64_t, int64_t nr, const acc_t* x, int64_t c, acc_t*) {
      r_stats(x, nr, Nv, log_domain ? sc.acc(c) : nullptr, tmax[c], tbad[c]);
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
    for_blocks<acc_t>(L, Nq, Nv, sc, [&](int64_t, int64_t nr, const acc_t* x, int64_t c, acc_t*) {
      r_expsum(x, nr, Nv, shift.data(), sc.acc(c));
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
        for_blocks<acc_t>(L, Nq, Nv, sc,
                          [&](int64_t i, int64_t nr, const acc_t* x, int64_t c, acc_t* buf) {
                            r_log(x, nr, Nv, gprev, kappa, sc.acc(c), buf, f + i);
                          });
        sc.reduce(col.data());
        for (int64_t j = 0; j < Nv; ++j) g[j] = gprev[j] - kappa - std::log(col[j]);
      } else {
        for_blocks<acc_t>(L, Nq, Nv, sc,
                          [&](int64_t i, int64_t nr, const acc_t* x, int64_t c, acc_t* buf) {
                            r_prob(x, nr, Nv, m, ratio, b.data(), sc.acc(c), buf, f + i);  // a
                          });
        for (int64_t i = 0; i < Nq; ++i) f[i] = std::log(f[i]);
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
    Scratch<acc_t> sc(Nq, Nv);
    const acc_t kappa = row_mass<acc_t>(Nq, Nv).second;
    std::vector<acc_t> dg(dG_T.const_data_ptr<acc_t>(), dG_T.const_data_ptr<acc_t>() + Nv);
    std::vector<acc_t> dgp(Nv), gp(Nv), ratio(Nv);
    for (int64_t t = T; t >= 1; --t) {
      const acc_t* f = F + (t - 1) * Nq;
      const acc_t* gt = G + t * Nv;
      const acc_t* gprev = G + (t - 1) * Nv;
      const bool first = t == T;
      // gp = g_{t-1} - kappa makes Pf = exp(L + f_t + gp) row-stochastic (header comment);
      // Pf = Pg exp(gp - g_t) when that factor is safely bounded (see k_bwd_t)
      acc_t max_step = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < Nv; ++j) {
        gp[j] = gprev[j] - kappa;
        ratio[j] = gp[j] - gt[j];
        max_step = std::max(max_step, ratio[j]);
      }
      const bool use_ratio = max_step < acc_t(60) && std::isfinite(max_step);
      if (use_ratio)
        for (int64_t j = 0; j < Nv; ++j) ratio[j] = std::exp(ratio[j]);
      sc.zero();
      for_blocks<acc_t>(L, Nq, Nv, sc,
                        [&](int64_t i, int64_t nr, const acc_t* x, int64_t c, acc_t* buf) {
                          r_bwd(x, nr, Nv, f + i, gt, gp.data(),
                                use_ratio ? ratio.data() : nullptr, dg.data(),
                                first ? dFT + i : nullptr, D + i * Nv, first, sc.acc(c), buf);
                        });
      sc.reduce(dgp.data());
      dg.swap(dgp);
    }
    for_blocks<acc_t>(L, Nq, Nv, sc, [&](int64_t i, int64_t nr, const acc_t* x, int64_t, acc_t*) {
      r_bwd0(x, nr, Nv, G, dg.data(), D + i * Nv);
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
