// ISA and fused Bi-ISA (SPEC 3), CPU.
//
// isa: rows are independent (the Python op moves the reduced axis last), parallel over rows;
// the weight gradient is accumulated per thread and summed at the end. Short rows (n <= 32)
// run 16 at a time "across lanes" (transposed, so each step is one vector op over 16 rows).
//
// bi_isa: the pairs (t, v) are processed by blocks of tb texts x vb videos. For a block, one
// GEMM words[t0:t1] [tb*L, D] x patches[v0:v1]^T [D, vb*P] gives the [L, P] tiles of G of all
// its pairs. The block is then cut into units, one text x vc videos (a strip [L, vc*P]),
// processed in parallel: each unit runs the first stages of both paths for its vc pairs at
// once (elementwise over the strip, the mixing with word_weight / patch_weight as one small
// GEMM each), then each pair's second stages with the per-row code of tvr/isa.h. Only that
// block buffer (bounded by kBlockElems, whatever Bt and Bv are) ever holds G. The backward
// recomputes the block, turns each strip into dL/dG in place and applies it with two GEMMs,
// gwords[t0:t1] += dG patches[v0:v1] and gpatches[v0:v1] += dG^T words[t0:t1].
// All of it runs with denormals flushed (tvr/fp_env.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "tvr/fp_env.h"
#include "tvr/isa.h"

namespace tvr {
namespace {

// Hot loops are compiled once per instruction-set level and picked at load time (GCC
// function multiversioning), so the default x86-64 build still runs AVX2 / AVX-512 code where
// the CPU has it. The row helpers of tvr/isa.h are always_inline, so they inherit the clone's
// instruction set.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TVR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TVR_CLONES
#endif

// Compute dtype: float for half/bfloat16/float inputs, double for double.
at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// ---------------------------------------------------------------------------------------------
// isa over the last axis of a [R, n] tensor.

void check_isa(const at::Tensor& x, const at::Tensor& W) {
  TORCH_CHECK(x.dim() == 2, "isa: sim must be [R, n] here, got ", x.sizes());
  TORCH_CHECK(W.dim() == 2 && W.size(0) == x.size(1) && W.size(1) == x.size(1),
              "isa: weight must be [n, n] with n = ", x.size(1), ", got ", W.sizes());
}

// Rows per task: enough work (~64k multiply-adds) to amortise the scheduling (and the
// per-task reduction of the backward's per-lane weight gradient).
int64_t row_grain(int64_t n) { return std::max<int64_t>(16, 65536 / std::max<int64_t>(1, n * n)); }

template <int N, typename T>
TVR_ROW void rows_forward_n(const T* x, int64_t n, const T* W, T s, int64_t begin, int64_t end, T* y) {
  std::vector<T> scratch(2 * n);
  for (int64_t r = begin; r < end; ++r)
    y[r] = isa_row_forward<N>(x + r * n, n, W, s, scratch.data(), scratch.data() + n);
}

// Short rows (n <= 32, e.g. the 12 frames) "across lanes": kLanes rows are transposed into
// [n, kLanes] buffers so every step is elementwise over the rows (one vector per element of
// the reduced axis) and nothing is reduced horizontally; the per-row code above spends most
// of its time in horizontal max/sum reductions over a 12-wide row.
constexpr int kLanes = 16;
constexpr int64_t kMaxLaneN = 32;

template <int N, int KC, typename T>
TVR_ROW void cols_softmax(T* V, int64_t n_, int64_t K_, T s, T* tmp);

// In place over the n rows of V [n, kLanes]: softmax(s V) along n, per lane (cols_softmax
// with K fixed at kLanes and its scratch on the stack).
template <int N, typename T>
TVR_ROW void lanes_softmax(T* V, int64_t n_, T s) {
  T tmp[2 * kLanes];
  cols_softmax<N, kLanes>(V, n_, kLanes, s, tmp);
}

// Forward of `rows` (<= kLanes) rows of x (row-major, n wide): X gets them transposed (lanes
// past `rows` are zero), A and B the two softmaxes, y[k] the results. Buffers: [n, kLanes].
template <int N, typename T>
TVR_ROW void lanes_forward(const T* x, int64_t rows, int64_t n_, const T* W, T s, T* X, T* A,
                           T* B, T* y) {
  const int64_t n = N > 0 ? N : n_;
  for (int64_t i = 0; i < n; ++i)
    for (int k = 0; k < kLanes; ++k) X[i * kLanes + k] = k < rows ? x[k * n + i] : T(0);
  std::memcpy(A, X, sizeof(T) * n * kLanes);
  lanes_softmax<N>(A, n, s);
  for (int64_t j = 0; j < n; ++j) {  // B[j, :] = sum_i W[i, j] A[i, :]
    T acc[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) {
      const T wij = W[i * n + j];
#pragma omp simd
      for (int k = 0; k < kLanes; ++k) acc[k] += wij * A[i * kLanes + k];
    }
    for (int k = 0; k < kLanes; ++k) B[j * kLanes + k] = acc[k];
  }
  lanes_softmax<N>(B, n, s);
  for (int k = 0; k < kLanes; ++k) y[k] = 0;
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) y[k] += B[i * kLanes + k] * X[i * kLanes + k];
}

template <int N, typename T>
TVR_ROW void rows_forward_lanes(const T* x, int64_t n_, const T* W, T s, int64_t begin,
                                int64_t end, T* y) {
  const int64_t n = N > 0 ? N : n_;
  std::vector<T> buf(3 * n * kLanes);
  T yl[kLanes];
  for (int64_t r = begin; r < end; r += kLanes) {
    const int64_t rows = std::min<int64_t>(kLanes, end - r);
    lanes_forward<N>(x + r * n, rows, n, W, s, buf.data(), buf.data() + n * kLanes,
                     buf.data() + 2 * n * kLanes, yl);
    for (int64_t k = 0; k < rows; ++k) y[r + k] = yl[k];
  }
}

// Backward across lanes: the math of isa_row_backward, per lane. gW is accumulated per lane
// (gWl [n*n, kLanes]) and reduced over lanes once, at the end of the task.
template <int N, typename T>
TVR_ROW void rows_backward_lanes(const T* x, int64_t n_, const T* W, T s, const T* gy,
                                 int64_t begin, int64_t end, T* gx, T* gW) {
  const int64_t n = N > 0 ? N : n_;
  std::vector<T> buf(5 * n * kLanes + n * n * kLanes, T(0));
  T *X = buf.data(), *A = X + n * kLanes, *B = A + n * kLanes, *DB = B + n * kLanes,
    *DA = DB + n * kLanes, *gWl = DA + n * kLanes;
  T yl[kLanes], g[kLanes], ada[kLanes];
  for (int64_t r = begin; r < end; r += kLanes) {
    const int64_t rows = std::min<int64_t>(kLanes, end - r);
    lanes_forward<N>(x + r * n, rows, n, W, s, X, A, B, yl);
    for (int k = 0; k < kLanes; ++k) g[k] = k < rows ? gy[r + k] : T(0);  // padding: no gradient
    for (int64_t j = 0; j < n; ++j)
#pragma omp simd
      for (int k = 0; k < kLanes; ++k)
        DB[j * kLanes + k] = s * g[k] * B[j * kLanes + k] * (X[j * kLanes + k] - yl[k]);
    for (int64_t i = 0; i < n; ++i) {  // DA[i, :] = sum_j W[i, j] DB[j, :]; gW[i, j] += A_i DB_j
      T acc[kLanes] = {};
      for (int64_t j = 0; j < n; ++j) {
        const T wij = W[i * n + j];
        T* gwl = gWl + (i * n + j) * kLanes;
#pragma omp simd
        for (int k = 0; k < kLanes; ++k) {
          acc[k] += wij * DB[j * kLanes + k];
          gwl[k] += A[i * kLanes + k] * DB[j * kLanes + k];
        }
      }
      for (int k = 0; k < kLanes; ++k) DA[i * kLanes + k] = acc[k];
    }
    for (int k = 0; k < kLanes; ++k) ada[k] = 0;
    for (int64_t i = 0; i < n; ++i)
#pragma omp simd
      for (int k = 0; k < kLanes; ++k) ada[k] += A[i * kLanes + k] * DA[i * kLanes + k];
    for (int64_t k = 0; k < rows; ++k)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t q = i * kLanes + k;
        gx[(r + k) * n + i] = g[k] * B[q] + s * A[q] * (DA[q] - ada[k]);
      }
  }
  for (int64_t q = 0; q < n * n; ++q) {
    T acc = 0;
    for (int k = 0; k < kLanes; ++k) acc += gWl[q * kLanes + k];
    gW[q] += acc;
  }
}

// n = 12 (frames) gets a compile-time instance; other short rows run across lanes with n read
// at run time; long rows one by one.
template <typename T>
TVR_ROW void rows_forward(const T* x, int64_t n, const T* W, T s, int64_t begin, int64_t end, T* y) {
  if (n == 12) rows_forward_lanes<12>(x, n, W, s, begin, end, y);
  else if (n <= kMaxLaneN) rows_forward_lanes<0>(x, n, W, s, begin, end, y);
  else rows_forward_n<0>(x, n, W, s, begin, end, y);
}

template <int N, typename T>
TVR_ROW void rows_backward_n(const T* x, int64_t n, const T* W, const T* WT, T s, const T* gy,
                             int64_t begin, int64_t end, T* gx, T* gW) {
  std::vector<T> scratch(4 * n);
  T *a = scratch.data(), *w = a + n, *row = w + n;
  for (int64_t r = begin; r < end; ++r) {
    const T y = isa_row_forward<N>(x + r * n, n, W, s, a, w);
    isa_row_backward<N>(x + r * n, n, WT, s, gy[r], a, w, y, gx + r * n, gW, row);
  }
}

template <typename T>
TVR_ROW void rows_backward(const T* x, int64_t n, const T* W, const T* WT, T s, const T* gy,
                           int64_t begin, int64_t end, T* gx, T* gW) {
  if (n == 12) rows_backward_lanes<12>(x, n, W, s, gy, begin, end, gx, gW);
  else if (n <= kMaxLaneN) rows_backward_lanes<0>(x, n, W, s, gy, begin, end, gx, gW);
  else rows_backward_n<0>(x, n, W, WT, s, gy, begin, end, gx, gW);
}

TVR_CLONES void rows_forward_f32(const float* x, int64_t n, const float* W, float s, int64_t b,
                                 int64_t e, float* y) {
  rows_forward(x, n, W, s, b, e, y);
}
TVR_CLONES void rows_backward_f32(const float* x, int64_t n, const float* W, const float* WT,
                                  float s, const float* gy, int64_t b, int64_t e, float* gx,
                                  float* gW) {
  rows_backward(x, n, W, WT, s, gy, b, e, gx, gW);
}
void rows_forward_f64(const double* x, int64_t n, const double* W, double s, int64_t b, int64_t e,
                      double* y) {
  rows_forward(x, n, W, s, b, e, y);
}
void rows_backward_f64(const double* x, int64_t n, const double* W, const double* WT, double s,
                       const double* gy, int64_t b, int64_t e, double* gx, double* gW) {
  rows_backward(x, n, W, WT, s, gy, b, e, gx, gW);
}

template <typename T>
void run_rows_forward(const T* x, int64_t n, const T* W, T s, int64_t b, int64_t e, T* y) {
  if constexpr (std::is_same_v<T, float>) rows_forward_f32(x, n, W, s, b, e, y);
  else rows_forward_f64(x, n, W, s, b, e, y);
}

template <typename T>
void run_rows_backward(const T* x, int64_t n, const T* W, const T* WT, T s, const T* gy, int64_t b,
                       int64_t e, T* gx, T* gW) {
  if constexpr (std::is_same_v<T, float>) rows_backward_f32(x, n, W, WT, s, gy, b, e, gx, gW);
  else rows_backward_f64(x, n, W, WT, s, gy, b, e, gx, gW);
}

at::Tensor isa_fwd_cpu(const at::Tensor& sim, const at::Tensor& weight, double tau) {
  check_isa(sim, weight);
  const auto acc = acc_type(sim);
  const at::Tensor x = as_acc(sim, acc), W = as_acc(weight, acc);
  const int64_t R = x.size(0), n = x.size(1);
  at::Tensor y = at::empty({R}, x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "isa_fwd", [&] {
    const scalar_t s = static_cast<scalar_t>(1.0 / tau);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* Wp = W.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(n), [&](int64_t begin, int64_t end) {
      FlushDenormals ftz;
      run_rows_forward(xp, n, Wp, s, begin, end, yp);
    });
  });
  return y.to(sim.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> isa_bwd_cpu(const at::Tensor& grad, const at::Tensor& sim,
                                               const at::Tensor& weight, double tau) {
  check_isa(sim, weight);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == sim.size(0), "isa_bwd: grad must be [R]");
  const auto acc = acc_type(sim);
  const at::Tensor x = as_acc(sim, acc), W = as_acc(weight, acc), g = as_acc(grad, acc);
  const at::Tensor WT = W.t().contiguous();
  const int64_t R = x.size(0), n = x.size(1);
  at::Tensor gx = at::empty_like(x);
  // Per-thread weight-gradient accumulators, summed at the end.
  at::Tensor gW_part = at::zeros({at::get_num_threads(), n, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "isa_bwd", [&] {
    const scalar_t s = static_cast<scalar_t>(1.0 / tau);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* Wp = W.const_data_ptr<scalar_t>();
    const scalar_t* WTp = WT.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* gWp = gW_part.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(n), [&](int64_t begin, int64_t end) {
      FlushDenormals ftz;
      scalar_t* gW = gWp + at::get_thread_num() * n * n;
      run_rows_backward(xp, n, Wp, WTp, s, gp, begin, end, gxp, gW);
    });
  });
  return {gx.to(sim.scalar_type()), gW_part.sum(0).to(weight.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Bi-ISA.

struct BiGeometry {
  int64_t Bt, Bv, L, P, D;
};

BiGeometry check_bi(const at::Tensor& words, const at::Tensor& patches, const at::Tensor& ww,
                    const at::Tensor& pw, const at::Tensor& ww2, const at::Tensor& pw2) {
  TORCH_CHECK(words.dim() == 3 && patches.dim() == 3 && words.size(2) == patches.size(2),
              "bi_isa: words [Bt, L, D] and patches [Bv, P, D] with one D, got ", words.sizes(),
              " and ", patches.sizes());
  const int64_t L = words.size(1), P = patches.size(1);
  for (const auto* w : {&ww, &ww2})
    TORCH_CHECK(w->dim() == 2 && w->size(0) == L && w->size(1) == L, "bi_isa: word weights must be [L, L]");
  for (const auto* w : {&pw, &pw2})
    TORCH_CHECK(w->dim() == 2 && w->size(0) == P && w->size(1) == P, "bi_isa: patch weights must be [P, P]");
  return {words.size(0), patches.size(0), L, P, words.size(2)};
}

// The first rows * cols elements of a flat buffer as a contiguous [rows, cols] matrix.
at::Tensor block_view(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// Upper bound on the elements of one block of G (float: 8 MiB), so memory never depends on
// Bt * Bv. Text blocks of up to 1024 word rows keep the GEMM large and the block near square.
constexpr int64_t kBlockElems = int64_t(1) << 21;

std::pair<int64_t, int64_t> block_sizes(const BiGeometry& g) {
  const int64_t tb = std::max<int64_t>(1, std::min<int64_t>(g.Bt, 1024 / std::max<int64_t>(1, g.L)));
  const int64_t vb = std::max<int64_t>(1, std::min<int64_t>(g.Bv, kBlockElems / std::max<int64_t>(1, tb * g.L * g.P)));
  return {tb, vb};
}

// Videos per unit: a strip of L x vc P elements per buffer (32k: the unit's six [L, C]
// buffers, 0.75 MiB in float, stay in a core's L2; 64k measured no faster).
constexpr int64_t kUnitElems = int64_t(1) << 15;

int64_t unit_videos(const BiGeometry& g, int64_t vb) {
  return std::max<int64_t>(1, std::min<int64_t>(vb, kUnitElems / std::max<int64_t>(1, g.L * g.P)));
}

// In place over the K columns of V [n, K] at once ("across lanes", as rows_forward_lanes
// above): V <- softmax(s V) over the n rows of each column, every step elementwise over the K
// lanes. tmp holds 2 K values. N and KC fix n and K at compile time when > 0.
template <int N, int KC, typename T>
TVR_ROW void cols_softmax(T* V, int64_t n_, int64_t K_, T s, T* tmp) {
  const int64_t n = N > 0 ? N : n_, K = KC > 0 ? KC : K_;
  T* m = tmp;
  T* sum = tmp + K;
  for (int64_t k = 0; k < K; ++k) { m[k] = V[k]; sum[k] = 0; }
  for (int64_t i = 1; i < n; ++i)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) m[k] = V[i * K + k] > m[k] ? V[i * K + k] : m[k];
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const T e = fast_exp_nonpos((V[i * K + k] - m[k]) * s);
      V[i * K + k] = e;
      sum[k] += e;
    }
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) sum[k] = T(1) / sum[k];
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) V[i * K + k] *= sum[k];
}

// Row-major C [m, n] = (or += with accumulate) op(A) op(B) through ATen's GEMM (MKL / oneDNN;
// one thread inside our parallel regions). A is [m, k] ([k, m] when ta), B is [k, n] ([n, k]
// when tb). The stage-1 mixings of Bi-ISA are GEMMs with K = L or P over thousands of lanes:
// per-pair loops over 32x32 / 48x48 weights ran at a tenth of the GEMM's rate.
template <typename T>
void gemm(T* C, const T* A, bool ta, const T* B, bool tb, int64_t m, int64_t n, int64_t k,
          bool accumulate) {
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto wrap = [&](const T* ptr, int64_t rows, int64_t cols, bool t) {
    at::Tensor x = at::from_blob(const_cast<T*>(ptr), {t ? cols : rows, t ? rows : cols}, opt);
    return t ? x.t() : x;
  };
  at::Tensor out = at::from_blob(C, {m, n}, opt);
  if (accumulate) out.addmm_(wrap(A, m, k, ta), wrap(B, k, n, tb));
  else at::mm_out(out, wrap(A, m, k, ta), wrap(B, k, n, tb));
}

// Everything a unit needs besides its strip of G: sizes, the stage-1 weights (as tensors, for
// the mixing GEMMs) and the stage-2 weights and their transposes (raw, for the row code).
template <typename T>
struct BiCtx {
  int64_t L, P, ld;  // ld: leading dimension of the G block
  const T *ww, *pw, *ww2, *pw2, *ww2T, *pw2T;
  T s;  // 1 / tau
};

// A unit is one text against vc videos: the strip Gu = G[t] [L, C = vc P] of the block, rows l,
// columns k = v P + p. Path A's first stage reduces each column over l (across the C lanes),
// path B's each run of P columns (one (l, v)) over p; both mix with one GEMM over the strip.
// Per-thread scratch: the four stage-1 softmaxes and two gradients [L, C], the stage-1
// outputs yA [vc, P] and yB [vc, L] (transposed: one pair's words contiguous), their stage-2
// softmaxes and gradients, and the pairs' two path scores.
template <typename T>
struct UnitScratch {
  std::vector<T> buf;
  T *aA, *wA, *aB, *wB, *t1, *t2, *yA, *a2A, *w2A, *gyA, *yB, *a2B, *w2B, *gyB, *sA, *sB, *tmp;
  UnitScratch(int64_t L, int64_t P, int64_t vc) {
    const int64_t LC = L * vc * P;
    buf.resize(6 * LC + 4 * vc * (P + L) + 2 * vc + 2 * std::max(vc * P, vc * L) + 2 * std::max(L, P));
    T* q = buf.data();
    for (T** p : {&aA, &wA, &aB, &wB, &t1, &t2}) { *p = q; q += LC; }
    for (T** p : {&yA, &a2A, &w2A, &gyA}) { *p = q; q += vc * P; }
    for (T** p : {&yB, &a2B, &w2B, &gyB}) { *p = q; q += vc * L; }
    for (T** p : {&sA, &sB}) { *p = q; q += vc; }
    tmp = q;
  }
};

// Forward of a unit (vc pairs): the stage-1 softmaxes and outputs, the stage-2 rows and the
// two path scores stay in S for the backward; out[v] (if given) = (sA + sB) / 2.
template <int LN, int PN, typename T>
TVR_ROW void unit_forward(const T* Gu, int64_t vc, const BiCtx<T>& c, UnitScratch<T>& S, T* out) {
  const int64_t L = LN > 0 ? LN : c.L, P = PN > 0 ? PN : c.P, C = vc * P, ld = c.ld;
  const T s = c.s;
  // Path A, stage 1: ISA over the words of each column, with word_weight -> yA [vc, P].
  for (int64_t l = 0; l < L; ++l) std::memcpy(S.aA + l * C, Gu + l * ld, sizeof(T) * C);
  cols_softmax<LN, 0>(S.aA, L, C, s, S.tmp);
  gemm(S.wA, c.ww, true, S.aA, false, L, C, L, false);  // B = ww^T A
  cols_softmax<LN, 0>(S.wA, L, C, s, S.tmp);
  for (int64_t k = 0; k < C; ++k) S.yA[k] = 0;
  for (int64_t l = 0; l < L; ++l)
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) S.yA[k] += S.wA[l * C + k] * Gu[l * ld + k];
  // Path B, stage 1: ISA over the patches of each (word, video), with patch_weight -> yB.
  for (int64_t l = 0; l < L; ++l)
    for (int64_t v = 0; v < vc; ++v) {
      T* a = S.aB + (l * vc + v) * P;
      std::memcpy(a, Gu + l * ld + v * P, sizeof(T) * P);
      isa_softmax<PN>(a, P, s);
    }
  gemm(S.wB, S.aB, false, c.pw, false, L * vc, P, P, false);  // B = A pw
  for (int64_t l = 0; l < L; ++l)
    for (int64_t v = 0; v < vc; ++v) {
      T* w = S.wB + (l * vc + v) * P;
      const T* x = Gu + l * ld + v * P;
      isa_softmax<PN>(w, P, s);
      T y = 0;
#pragma omp simd reduction(+ : y)
      for (int64_t p = 0; p < P; ++p) y += w[p] * x[p];
      S.yB[v * L + l] = y;
    }
  // Stage 2 of each pair: path A over its patches (patch_weight2), path B over its words.
  for (int64_t v = 0; v < vc; ++v) {
    S.sA[v] = isa_row_forward<PN>(S.yA + v * P, P, c.pw2, s, S.a2A + v * P, S.w2A + v * P);
    S.sB[v] = isa_row_forward<LN>(S.yB + v * L, L, c.ww2, s, S.a2B + v * L, S.w2B + v * L);
    if (out) out[v] = (S.sA[v] + S.sB[v]) / 2;
  }
}

// Backward of a unit for its pairs' output gradients g [vc]: recomputes the forward, then
// overwrites the strip Gu with dL/dG and adds the four weight gradients to
// gW = [gww (L*L), gpw (P*P), gww2 (L*L), gpw2 (P*P)]. The formulas are isa_row_backward's
// (tvr/isa.h), per column for path A and per (l, v) run for path B.
template <int LN, int PN, typename T>
TVR_ROW void unit_backward(T* Gu, int64_t vc, const BiCtx<T>& c, UnitScratch<T>& S, const T* g,
                           T* gW) {
  const int64_t L = LN > 0 ? LN : c.L, P = PN > 0 ? PN : c.P, C = vc * P, ld = c.ld;
  const T s = c.s;
  T* gww = gW;
  T* gpw = gW + L * L;
  T* gww2 = gpw + P * P;
  T* gpw2 = gww2 + L * L;
  unit_forward<LN, PN>(Gu, vc, c, S, static_cast<T*>(nullptr));
  for (int64_t v = 0; v < vc; ++v) {
    const T half = g[v] / 2;  // out = (sA + sB) / 2
    isa_row_backward<PN>(S.yA + v * P, P, c.pw2T, s, half, S.a2A + v * P, S.w2A + v * P, S.sA[v],
                         S.gyA + v * P, gpw2, S.tmp);
    isa_row_backward<LN>(S.yB + v * L, L, c.ww2T, s, half, S.a2B + v * L, S.w2B + v * L, S.sB[v],
                         S.gyB + v * L, gww2, S.tmp);
  }
  // Path A, stage 1: DB = s gy wA (G - yA); DA = ww DB; gww += aA DB^T;
  // dG_A = gy wA + s aA (DA - sum_l aA DA), kept in t1 (over DB, no longer needed).
  T *DB = S.t1, *DA = S.t2, *ada = S.tmp;
  for (int64_t l = 0; l < L; ++l)
#pragma omp simd
    for (int64_t k = 0; k < C; ++k)
      DB[l * C + k] = s * S.gyA[k] * S.wA[l * C + k] * (Gu[l * ld + k] - S.yA[k]);
  gemm(DA, c.ww, false, DB, false, L, C, L, false);
  gemm(gww, S.aA, false, DB, true, L, L, C, true);
  for (int64_t k = 0; k < C; ++k) ada[k] = 0;
  for (int64_t l = 0; l < L; ++l)
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) ada[k] += S.aA[l * C + k] * DA[l * C + k];
  for (int64_t l = 0; l < L; ++l)
#pragma omp simd
    for (int64_t k = 0; k < C; ++k)
      S.t1[l * C + k] = S.gyA[k] * S.wA[l * C + k] + s * S.aA[l * C + k] * (DA[l * C + k] - ada[k]);
  // Path B, stage 1, per (l, v) run: DB in t2 (DA of path A is consumed), DA in wA.
  T *DBb = S.t2, *DAb = S.wA;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t v = 0; v < vc; ++v) {
      const int64_t r = (l * vc + v) * P;
      const T cg = s * S.gyB[v * L + l], y = S.yB[v * L + l];
      const T* x = Gu + l * ld + v * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) DBb[r + p] = cg * S.wB[r + p] * (x[p] - y);
    }
  gemm(DAb, DBb, false, c.pw, true, L * vc, P, P, false);  // DA = DB pw^T
  gemm(gpw, S.aB, true, DBb, false, P, P, L * vc, true);   // gpw += aB^T DB
  for (int64_t l = 0; l < L; ++l)
    for (int64_t v = 0; v < vc; ++v) {
      const int64_t r = (l * vc + v) * P;
      const T *a = S.aB + r, *da = DAb + r, *w = S.wB + r, *dgA = S.t1 + l * C + v * P;
      const T gy = S.gyB[v * L + l];
      T ad = 0;
#pragma omp simd reduction(+ : ad)
      for (int64_t p = 0; p < P; ++p) ad += a[p] * da[p];
      T* dst = Gu + l * ld + v * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) dst[p] = dgA[p] + gy * w[p] + s * a[p] * (da[p] - ad);
    }
}

// Units [begin, end) of a block of tb texts x vb videos cut into chunks of vc videos:
// unit = t * nch + j covers text t and videos [j vc, min(vb, (j + 1) vc)). out / grad: the
// block's corner of the [Bt, Bv] output / its gradient, leading dimension out_ld.
template <int LN, int PN, typename T>
TVR_ROW void units_forward_n(const T* G, const BiCtx<T>& c, int64_t vb, int64_t vc,
                             int64_t begin, int64_t end, T* out, int64_t out_ld) {
  UnitScratch<T> S(c.L, c.P, vc);
  const int64_t nch = (vb + vc - 1) / vc;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t t = u / nch, v0 = (u % nch) * vc;
    unit_forward<LN, PN>(G + t * c.L * c.ld + v0 * c.P, std::min(vc, vb - v0), c, S,
                         out + t * out_ld + v0);
  }
}

template <int LN, int PN, typename T>
TVR_ROW void units_backward_n(T* G, const BiCtx<T>& c, int64_t vb, int64_t vc, int64_t begin,
                              int64_t end, const T* grad, int64_t grad_ld, T* gW) {
  UnitScratch<T> S(c.L, c.P, vc);
  const int64_t nch = (vb + vc - 1) / vc;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t t = u / nch, v0 = (u % nch) * vc;
    unit_backward<LN, PN>(G + t * c.L * c.ld + v0 * c.P, std::min(vc, vb - v0), c, S,
                          grad + t * grad_ld + v0, gW);
  }
}

// The papers' L = 32 words and P = 48 patches get a compile-time instance.
template <typename T>
TVR_ROW void units_forward(const T* G, const BiCtx<T>& c, int64_t vb, int64_t vc, int64_t begin,
                           int64_t end, T* out, int64_t out_ld) {
  if (c.L == 32 && c.P == 48) units_forward_n<32, 48>(G, c, vb, vc, begin, end, out, out_ld);
  else units_forward_n<0, 0>(G, c, vb, vc, begin, end, out, out_ld);
}

template <typename T>
TVR_ROW void units_backward(T* G, const BiCtx<T>& c, int64_t vb, int64_t vc, int64_t begin,
                            int64_t end, const T* grad, int64_t grad_ld, T* gW) {
  if (c.L == 32 && c.P == 48) units_backward_n<32, 48>(G, c, vb, vc, begin, end, grad, grad_ld, gW);
  else units_backward_n<0, 0>(G, c, vb, vc, begin, end, grad, grad_ld, gW);
}

TVR_CLONES void units_forward_f32(const float* G, const BiCtx<float>& c, int64_t vb, int64_t vc,
                                  int64_t begin, int64_t end, float* out, int64_t out_ld) {
  units_forward(G, c, vb, vc, begin, end, out, out_ld);
}
void units_forward_f64(const double* G, const BiCtx<double>& c, int64_t vb, int64_t vc,
                       int64_t begin, int64_t end, double* out, int64_t out_ld) {
  units_forward(G, c, vb, vc, begin, end, out, out_ld);
}
TVR_CLONES void units_backward_f32(float* G, const BiCtx<float>& c, int64_t vb, int64_t vc,
                                   int64_t begin, int64_t end, const float* grad, int64_t grad_ld,
                                   float* gW) {
  units_backward(G, c, vb, vc, begin, end, grad, grad_ld, gW);
}
void units_backward_f64(double* G, const BiCtx<double>& c, int64_t vb, int64_t vc, int64_t begin,
                        int64_t end, const double* grad, int64_t grad_ld, double* gW) {
  units_backward(G, c, vb, vc, begin, end, grad, grad_ld, gW);
}

template <typename T>
void run_units_forward(const T* G, const BiCtx<T>& c, int64_t vb, int64_t vc, int64_t b,
                       int64_t e, T* out, int64_t out_ld) {
  if constexpr (std::is_same_v<T, float>) units_forward_f32(G, c, vb, vc, b, e, out, out_ld);
  else units_forward_f64(G, c, vb, vc, b, e, out, out_ld);
}

template <typename T>
void run_units_backward(T* G, const BiCtx<T>& c, int64_t vb, int64_t vc, int64_t b, int64_t e,
                        const T* grad, int64_t grad_ld, T* gW) {
  if constexpr (std::is_same_v<T, float>) units_backward_f32(G, c, vb, vc, b, e, grad, grad_ld, gW);
  else units_backward_f64(G, c, vb, vc, b, e, grad, grad_ld, gW);
}

template <typename T>
BiCtx<T> make_ctx(const BiGeometry& g, const at::Tensor* w, const at::Tensor* wT, double tau) {
  BiCtx<T> c;
  c.L = g.L;
  c.P = g.P;
  c.ld = 0;
  c.ww = w[0].const_data_ptr<T>();
  c.pw = w[1].const_data_ptr<T>();
  c.ww2 = w[2].const_data_ptr<T>();
  c.pw2 = w[3].const_data_ptr<T>();
  c.ww2T = wT[2].const_data_ptr<T>();
  c.pw2T = wT[3].const_data_ptr<T>();
  c.s = static_cast<T>(1.0 / tau);
  return c;
}

at::Tensor bi_isa_fwd_cpu(const at::Tensor& words_in, const at::Tensor& patches_in,
                          const at::Tensor& ww_in, const at::Tensor& pw_in, const at::Tensor& ww2_in,
                          const at::Tensor& pw2_in, double tau) {
  const BiGeometry g = check_bi(words_in, patches_in, ww_in, pw_in, ww2_in, pw2_in);
  const auto acc = acc_type(words_in);
  const at::Tensor words = as_acc(words_in, acc), patches = as_acc(patches_in, acc);
  const at::Tensor w[4] = {as_acc(ww_in, acc), as_acc(pw_in, acc), as_acc(ww2_in, acc),
                           as_acc(pw2_in, acc)};
  at::Tensor out = at::empty({g.Bt, g.Bv}, words.options());
  if (g.Bt == 0 || g.Bv == 0) return out.to(words_in.scalar_type());
  const auto [tb_max, vb_max] = block_sizes(g);
  const at::Tensor words2d = words.view({g.Bt * g.L, g.D});
  const at::Tensor patches2d = patches.view({g.Bv * g.P, g.D});
  // One buffer for every block (a fresh 8 MiB buffer per block costs page faults).
  at::Tensor Gbuf = at::empty({tb_max * g.L * std::min(vb_max, g.Bv) * g.P}, words.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "bi_isa_fwd", [&] {
    BiCtx<scalar_t> c = make_ctx<scalar_t>(g, w, w, tau);  // forward never reads the transposes
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t t0 = 0; t0 < g.Bt; t0 += tb_max) {
      const int64_t tb = std::min(tb_max, g.Bt - t0);
      for (int64_t v0 = 0; v0 < g.Bv; v0 += vb_max) {
        const int64_t vb = std::min(vb_max, g.Bv - v0);
        // G block [tb*L, vb*P]: row t*L + l, column v*P + p (block-local t, v).
        at::Tensor G = block_view(Gbuf, tb * g.L, vb * g.P);
        at::mm_out(G, words2d.narrow(0, t0 * g.L, tb * g.L),
                   patches2d.narrow(0, v0 * g.P, vb * g.P).t());
        const scalar_t* Gp = G.const_data_ptr<scalar_t>();
        c.ld = vb * g.P;
        const int64_t vc = unit_videos(g, vb), units = tb * ((vb + vc - 1) / vc);
        at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
          FlushDenormals ftz;
          run_units_forward(Gp, c, vb, vc, begin, end, op + t0 * g.Bv + v0, g.Bv);
        });
      }
    }
  });
  return out.to(words_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bi_isa_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& words_in, const at::Tensor& patches_in,
    const at::Tensor& ww_in, const at::Tensor& pw_in, const at::Tensor& ww2_in,
    const at::Tensor& pw2_in, double tau) {
  const BiGeometry g = check_bi(words_in, patches_in, ww_in, pw_in, ww2_in, pw2_in);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == g.Bt && grad_in.size(1) == g.Bv,
              "bi_isa_bwd: grad must be [Bt, Bv]");
  const auto acc = acc_type(words_in);
  const at::Tensor grad = as_acc(grad_in, acc);
  const at::Tensor words = as_acc(words_in, acc), patches = as_acc(patches_in, acc);
  const at::Tensor w[4] = {as_acc(ww_in, acc), as_acc(pw_in, acc), as_acc(ww2_in, acc),
                           as_acc(pw2_in, acc)};
  const at::Tensor wT[4] = {w[0].t().contiguous(), w[1].t().contiguous(), w[2].t().contiguous(),
                            w[3].t().contiguous()};
  at::Tensor gwords = at::zeros_like(words), gpatches = at::zeros_like(patches);
  // Per-thread weight-gradient accumulators [threads, L*L + P*P + L*L + P*P], summed at the end.
  const int64_t nthreads = at::get_num_threads();
  const int64_t LL = g.L * g.L, PP = g.P * g.P;
  at::Tensor gW_part = at::zeros({nthreads, 2 * (LL + PP)}, words.options());
  if (g.Bt > 0 && g.Bv > 0) {
    const auto [tb_max, vb_max] = block_sizes(g);
    const at::Tensor words2d = words.view({g.Bt * g.L, g.D});
    const at::Tensor patches2d = patches.view({g.Bv * g.P, g.D});
    at::Tensor gwords2d = gwords.view({g.Bt * g.L, g.D});
    at::Tensor gpatches2d = gpatches.view({g.Bv * g.P, g.D});
    at::Tensor Gbuf = at::empty({tb_max * g.L * std::min(vb_max, g.Bv) * g.P}, words.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "bi_isa_bwd", [&] {
      BiCtx<scalar_t> c = make_ctx<scalar_t>(g, w, wT, tau);
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      scalar_t* gWbase = gW_part.mutable_data_ptr<scalar_t>();
      for (int64_t t0 = 0; t0 < g.Bt; t0 += tb_max) {
        const int64_t tb = std::min(tb_max, g.Bt - t0);
        const at::Tensor wblk = words2d.narrow(0, t0 * g.L, tb * g.L);
        for (int64_t v0 = 0; v0 < g.Bv; v0 += vb_max) {
          const int64_t vb = std::min(vb_max, g.Bv - v0);
          const at::Tensor pblk = patches2d.narrow(0, v0 * g.P, vb * g.P);
          // Recompute the block of G; each pair then overwrites its tile with dL/dG.
          at::Tensor G = block_view(Gbuf, tb * g.L, vb * g.P);
          at::mm_out(G, wblk, pblk.t());
          scalar_t* Gp = G.mutable_data_ptr<scalar_t>();
          c.ld = vb * g.P;
          const int64_t vc = unit_videos(g, vb), units = tb * ((vb + vc - 1) / vc);
          at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
            FlushDenormals ftz;
            run_units_backward(Gp, c, vb, vc, begin, end, gp + t0 * g.Bv + v0, g.Bv,
                               gWbase + at::get_thread_num() * 2 * (LL + PP));
          });
          // G[t, l, v, p] = <words[t, l], patches[v, p]>, so with dG in place of G:
          gwords2d.narrow(0, t0 * g.L, tb * g.L).addmm_(G, pblk);
          gpatches2d.narrow(0, v0 * g.P, vb * g.P).addmm_(G.t(), wblk);
        }
      }
    });
  }
  const at::Tensor gW = gW_part.sum(0);
  // Four separate tensors (custom-op outputs may not alias each other).
  const auto part = [&](int64_t off, int64_t n) {
    return gW.narrow(0, off, n * n).view({n, n}).to(ww_in.scalar_type(), false, /*copy=*/true);
  };
  return {gwords.to(words_in.scalar_type()), gpatches.to(patches_in.scalar_type()),
          part(0, g.L), part(LL, g.P), part(LL + PP, g.L), part(2 * LL + PP, g.P)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tvr_C, m) {
  m.def("isa_fwd(Tensor sim, Tensor weight, float tau) -> Tensor");
  m.def("isa_bwd(Tensor grad, Tensor sim, Tensor weight, float tau) -> (Tensor, Tensor)");
  m.def("bi_isa_fwd(Tensor words, Tensor patches, Tensor word_weight, Tensor patch_weight, "
        "Tensor word_weight2, Tensor patch_weight2, float tau) -> Tensor");
  m.def("bi_isa_bwd(Tensor grad, Tensor words, Tensor patches, Tensor word_weight, "
        "Tensor patch_weight, Tensor word_weight2, Tensor patch_weight2, float tau) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tvr_C, CPU, m) {
  m.impl("isa_fwd", &isa_fwd_cpu);
  m.impl("isa_bwd", &isa_bwd_cpu);
  m.impl("bi_isa_fwd", &bi_isa_fwd_cpu);
  m.impl("bi_isa_bwd", &bi_isa_bwd_cpu);
}

}  // namespace tvr
