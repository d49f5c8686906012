// ISA and fused Bi-ISA (SPEC 3), CPU.
//
// isa: rows are independent (the Python op moves the reduced axis last), parallel over rows;
// the weight gradient is accumulated per thread and summed at the end. Short rows (n <= 32)
// run 16 at a time "across lanes" (transposed, so each step is one vector op over 16 rows).
//
// bi_isa: the pairs (t, v) are processed by blocks of tb texts x vb videos. For a block, one
// GEMM words[t0:t1] [tb*L, D] x patches[v0:v1]^T [D, vb*P] gives the [L, P] tiles of G of all
// its pairs; then each pair's two ISA paths run on its tile (parallel over pairs): the first
// stages across lanes (path A over the tile's columns, path B over its transpose's), the
// second stages with the per-row code of tvr/isa.h. Only that
// block buffer (bounded by kBlockElems, whatever Bt and Bv are) ever holds G. The backward
// recomputes the block, turns each tile into dL/dG in place and applies it with two GEMMs,
// gwords[t0:t1] += dG patches[v0:v1] and gpatches[v0:v1] += dG^T words[t0:t1].
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

// Everything a pair needs besides its tile: sizes, the four weights and their transposes.
template <typename T>
struct BiCtx {
  int64_t L, P, ld;  // ld: leading dimension of the G block
  const T *ww, *pw, *ww2, *pw2, *wwT, *pwT, *ww2T, *pw2T;
  T s;  // 1 / tau
};

// ISA of the K columns of X [n, K] at once ("across lanes", as rows_forward_lanes above): each
// column k is reduced over the n rows, every step is elementwise over the K lanes. Writes the
// softmaxes A, B [n, K] (kept for the backward) and y [K]; tmp holds 2 K values. N and KC fix n
// and K at compile time when > 0.
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
      const T e = fast_exp((V[i * K + k] - m[k]) * s);
      V[i * K + k] = e;
      sum[k] += e;
    }
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) sum[k] = T(1) / sum[k];
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) V[i * K + k] *= sum[k];
}

template <int N, int KC, typename T>
TVR_ROW void cols_forward(const T* X, int64_t n_, int64_t K_, const T* W, T s, T* A, T* B, T* y,
                          T* tmp) {
  const int64_t n = N > 0 ? N : n_, K = KC > 0 ? KC : K_;
  std::memcpy(A, X, sizeof(T) * n * K);
  cols_softmax<N, KC>(A, n, K, s, tmp);
  for (int64_t j = 0; j < n * K; ++j) B[j] = 0;
  for (int64_t j = 0; j < n; ++j)  // B[j, :] = sum_i W[i, j] A[i, :]
    for (int64_t i = 0; i < n; ++i) {
      const T wij = W[i * n + j];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) B[j * K + k] += wij * A[i * K + k];
    }
  cols_softmax<N, KC>(B, n, K, s, tmp);
  for (int64_t k = 0; k < K; ++k) y[k] = 0;
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) y[k] += B[i * K + k] * X[i * K + k];
}

// Backward of cols_forward for incoming gradients g [K]: writes GX [n, K] and adds the weight
// gradient to gW [n, n]. DB and DA are [n, K] scratch, tmp K values. Per lane this is
// isa_row_backward (tvr/isa.h).
template <int N, int KC, typename T>
TVR_ROW void cols_backward(const T* X, int64_t n_, int64_t K_, const T* W, T s, const T* g,
                           const T* A, const T* B, const T* y, T* GX, T* gW, T* DB, T* DA,
                           T* tmp) {
  const int64_t n = N > 0 ? N : n_, K = KC > 0 ? KC : K_;
  for (int64_t j = 0; j < n; ++j)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k)
      DB[j * K + k] = s * g[k] * B[j * K + k] * (X[j * K + k] - y[k]);
  for (int64_t i = 0; i < n * K; ++i) DA[i] = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const T wij = W[i * n + j];
      T acc = 0;  // gW[i, j] += sum_k A[i, k] DB[j, k]
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) {
        DA[i * K + k] += wij * DB[j * K + k];
        acc += A[i * K + k] * DB[j * K + k];
      }
      gW[i * n + j] += acc;
    }
  T* ada = tmp;
  for (int64_t k = 0; k < K; ++k) ada[k] = 0;
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) ada[k] += A[i * K + k] * DA[i * K + k];
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k)
      GX[i * K + k] = g[k] * B[i * K + k] + s * A[i * K + k] * (DA[i * K + k] - ada[k]);
}

// Per-thread scratch of one pair: the tile [L, P] and its transpose [P, L] (path A reduces the
// tile's rows per column, path B the transpose's rows per column: both across lanes), the
// first stages' softmaxes (kept for the backward), their outputs yA [P] and yB [L], the second
// stages' softmaxes, and the gradients.
template <typename T>
struct PairScratch {
  std::vector<T> buf;
  T *tile, *tileT, *aA, *wA, *aB, *wB, *gtile, *gtileT, *db, *da, *yA, *yB, *gyA, *gyB, *a2A,
      *w2A, *a2B, *w2B, *row;
  PairScratch(int64_t L, int64_t P) {
    const int64_t LP = L * P;
    buf.resize(10 * LP + 4 * (L + P) + 4 * std::max(L, P));
    T* q = buf.data();
    for (T** p : {&tile, &tileT, &aA, &wA, &aB, &wB, &gtile, &gtileT, &db, &da}) { *p = q; q += LP; }
    for (T** p : {&yA, &gyA, &a2A, &w2A}) { *p = q; q += P; }
    for (T** p : {&yB, &gyB, &a2B, &w2B}) { *p = q; q += L; }
    row = q;
  }
};

// Forward of one pair from its tile Gt (rows l, leading dimension c.ld): both paths' first
// stages (softmaxes kept in S), then the second stages. Returns (sA + sB) / 2.
template <int LN, int PN, typename T>
TVR_ROW T pair_forward(const T* Gt, const BiCtx<T>& c, PairScratch<T>& S, T* sA, T* sB) {
  const int64_t L = LN > 0 ? LN : c.L, P = PN > 0 ? PN : c.P;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t p = 0; p < P; ++p) {
      const T v = Gt[l * c.ld + p];
      S.tile[l * P + p] = v;
      S.tileT[p * L + l] = v;
    }
  // Path A, stage 1: ISA over words (each column p of the tile) with word_weight -> yA [P].
  cols_forward<LN, PN>(S.tile, L, P, c.ww, c.s, S.aA, S.wA, S.yA, S.row);
  // Path B, stage 1: ISA over patches (each column l of the transpose) with patch_weight -> yB [L].
  cols_forward<PN, LN>(S.tileT, P, L, c.pw, c.s, S.aB, S.wB, S.yB, S.row);
  *sA = isa_row_forward<PN>(S.yA, P, c.pw2, c.s, S.a2A, S.w2A);
  *sB = isa_row_forward<LN>(S.yB, L, c.ww2, c.s, S.a2B, S.w2B);
  return (*sA + *sB) / 2;
}

// Backward of one pair given its output gradient g: overwrites the tile Gt with dL/dG and
// adds the four weight gradients to gW = [gww (L*L), gpw (P*P), gww2 (L*L), gpw2 (P*P)].
template <int LN, int PN, typename T>
TVR_ROW void pair_backward(T* Gt, const BiCtx<T>& c, PairScratch<T>& S, T g, T* gW) {
  const int64_t L = LN > 0 ? LN : c.L, P = PN > 0 ? PN : c.P;
  T* gww = gW;
  T* gpw = gW + L * L;
  T* gww2 = gpw + P * P;
  T* gpw2 = gww2 + L * L;
  T sA, sB;
  pair_forward<LN, PN>(Gt, c, S, &sA, &sB);
  const T half = g / 2;  // out = (sA + sB) / 2
  isa_row_backward<PN>(S.yA, P, c.pw2T, c.s, half, S.a2A, S.w2A, sA, S.gyA, gpw2, S.row);
  isa_row_backward<LN>(S.yB, L, c.ww2T, c.s, half, S.a2B, S.w2B, sB, S.gyB, gww2, S.row);
  cols_backward<LN, PN>(S.tile, L, P, c.ww, c.s, S.gyA, S.aA, S.wA, S.yA, S.gtile, gww, S.db,
                        S.da, S.row);
  cols_backward<PN, LN>(S.tileT, P, L, c.pw, c.s, S.gyB, S.aB, S.wB, S.yB, S.gtileT, gpw, S.db,
                        S.da, S.row);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t p = 0; p < P; ++p) Gt[l * c.ld + p] = S.gtile[l * P + p] + S.gtileT[p * L + l];
}

// Pairs [begin, end) of a block with vb videos: pair = t * vb + v, its tile at
// G + t*L*ld + v*P, its output at out[t * out_ld + v].
template <int LN, int PN, typename T>
TVR_ROW void pairs_forward_n(const T* G, const BiCtx<T>& c, int64_t vb, int64_t begin,
                             int64_t end, T* out, int64_t out_ld) {
  PairScratch<T> S(c.L, c.P);
  T sA, sB;
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t t = pair / vb, v = pair % vb;
    out[t * out_ld + v] = pair_forward<LN, PN>(G + t * c.L * c.ld + v * c.P, c, S, &sA, &sB);
  }
}

template <int LN, int PN, typename T>
TVR_ROW void pairs_backward_n(T* G, const BiCtx<T>& c, int64_t vb, int64_t begin, int64_t end,
                              const T* grad, int64_t grad_ld, T* gW) {
  PairScratch<T> S(c.L, c.P);
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t t = pair / vb, v = pair % vb;
    pair_backward<LN, PN>(G + t * c.L * c.ld + v * c.P, c, S, grad[t * grad_ld + v], gW);
  }
}

// The papers' L = 32 words and P = 48 patches get a compile-time instance.
template <typename T>
TVR_ROW void pairs_forward(const T* G, const BiCtx<T>& c, int64_t vb, int64_t begin, int64_t end,
                           T* out, int64_t out_ld) {
  if (c.L == 32 && c.P == 48) pairs_forward_n<32, 48>(G, c, vb, begin, end, out, out_ld);
  else pairs_forward_n<0, 0>(G, c, vb, begin, end, out, out_ld);
}

template <typename T>
TVR_ROW void pairs_backward(T* G, const BiCtx<T>& c, int64_t vb, int64_t begin, int64_t end,
                            const T* grad, int64_t grad_ld, T* gW) {
  if (c.L == 32 && c.P == 48) pairs_backward_n<32, 48>(G, c, vb, begin, end, grad, grad_ld, gW);
  else pairs_backward_n<0, 0>(G, c, vb, begin, end, grad, grad_ld, gW);
}

TVR_CLONES void pairs_forward_f32(const float* G, const BiCtx<float>& c, int64_t vb, int64_t begin,
                                  int64_t end, float* out, int64_t out_ld) {
  pairs_forward(G, c, vb, begin, end, out, out_ld);
}
void pairs_forward_f64(const double* G, const BiCtx<double>& c, int64_t vb, int64_t begin,
                       int64_t end, double* out, int64_t out_ld) {
  pairs_forward(G, c, vb, begin, end, out, out_ld);
}
TVR_CLONES void pairs_backward_f32(float* G, const BiCtx<float>& c, int64_t vb, int64_t begin,
                                   int64_t end, const float* grad, int64_t grad_ld, float* gW) {
  pairs_backward(G, c, vb, begin, end, grad, grad_ld, gW);
}
void pairs_backward_f64(double* G, const BiCtx<double>& c, int64_t vb, int64_t begin, int64_t end,
                        const double* grad, int64_t grad_ld, double* gW) {
  pairs_backward(G, c, vb, begin, end, grad, grad_ld, gW);
}

template <typename T>
void run_pairs_forward(const T* G, const BiCtx<T>& c, int64_t vb, int64_t b, int64_t e, T* out,
                       int64_t out_ld) {
  if constexpr (std::is_same_v<T, float>) pairs_forward_f32(G, c, vb, b, e, out, out_ld);
  else pairs_forward_f64(G, c, vb, b, e, out, out_ld);
}

template <typename T>
void run_pairs_backward(T* G, const BiCtx<T>& c, int64_t vb, int64_t b, int64_t e, const T* grad,
                        int64_t grad_ld, T* gW) {
  if constexpr (std::is_same_v<T, float>) pairs_backward_f32(G, c, vb, b, e, grad, grad_ld, gW);
  else pairs_backward_f64(G, c, vb, b, e, grad, grad_ld, gW);
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
  c.wwT = wT[0].const_data_ptr<T>();
  c.pwT = wT[1].const_data_ptr<T>();
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
        at::parallel_for(0, tb * vb, 1, [&](int64_t begin, int64_t end) {
          FlushDenormals ftz;
          run_pairs_forward(Gp, c, vb, begin, end, op + t0 * g.Bv + v0, g.Bv);
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
          at::parallel_for(0, tb * vb, 1, [&](int64_t begin, int64_t end) {
            FlushDenormals ftz;
            run_pairs_backward(Gp, c, vb, begin, end, gp + t0 * g.Bv + v0, g.Bv,
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
