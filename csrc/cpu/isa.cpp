// ISA and fused Bi-ISA (SPEC 3), CPU.
//
// isa: rows are independent (the Python op moves the reduced axis last), parallel over rows;
// the weight gradient is accumulated per thread and summed at the end.
//
// bi_isa: the pairs (t, v) are processed by blocks of tb texts x vb videos. For a block, one
// GEMM words[t0:t1] [tb*L, D] x patches[v0:v1]^T [D, vb*P] gives the [L, P] tiles of G of all
// its pairs; then each pair's two ISA paths run on its tile (parallel over pairs). Only that
// block buffer (bounded by kBlockElems, whatever Bt and Bv are) ever holds G. The backward
// recomputes the block, turns each tile into dL/dG in place and applies it with two GEMMs,
// gwords[t0:t1] += dG patches[v0:v1] and gpatches[v0:v1] += dG^T words[t0:t1].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "tvr/isa.h"

namespace tvr {
namespace {

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

// Rows per task: enough work (~16k multiply-adds) to amortise the scheduling.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n * n)); }

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
      std::vector<scalar_t> scratch(2 * n);
      for (int64_t r = begin; r < end; ++r)
        yp[r] = isa_row_forward(xp + r * n, n, Wp, s, scratch.data(), scratch.data() + n);
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
  const int64_t nthreads = at::get_num_threads();
  at::Tensor gW_part = at::zeros({nthreads, n, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "isa_bwd", [&] {
    const scalar_t s = static_cast<scalar_t>(1.0 / tau);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* Wp = W.const_data_ptr<scalar_t>();
    const scalar_t* WTp = WT.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* gWp = gW_part.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(4 * n);
      scalar_t* gW = gWp + at::get_thread_num() * n * n;
      for (int64_t r = begin; r < end; ++r)
        isa_row_backward(xp + r * n, n, Wp, WTp, s, gp[r], gxp + r * n, gW, scratch.data());
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

// Upper bound on the elements of one block of G (float: 8 MiB), so memory never depends on
// Bt * Bv. Text blocks of up to 1024 word rows keep the GEMM large and the block near square.
constexpr int64_t kBlockElems = int64_t(1) << 21;

std::pair<int64_t, int64_t> block_sizes(const BiGeometry& g) {
  const int64_t tb = std::max<int64_t>(1, std::min<int64_t>(g.Bt, 1024 / std::max<int64_t>(1, g.L)));
  const int64_t vb = std::max<int64_t>(1, std::min<int64_t>(g.Bv, kBlockElems / std::max<int64_t>(1, tb * g.L * g.P)));
  return {tb, vb};
}

// Per-thread scratch of one pair: the tile [L, P], its transpose [P, L], the first-stage
// outputs yA [P] and yB [L], and row scratch (4 max(L, P) values).
template <typename T>
struct PairScratch {
  std::vector<T> buf;
  T *tile, *tileT, *yA, *yB, *row, *gyA, *gyB, *gtile, *gtileT;
  PairScratch(int64_t L, int64_t P) {
    const int64_t m = std::max(L, P);
    buf.resize(4 * L * P + 2 * (L + P) + 4 * m);
    tile = buf.data();
    tileT = tile + L * P;
    gtile = tileT + L * P;
    gtileT = gtile + L * P;
    yA = gtileT + L * P;
    yB = yA + P;
    gyA = yB + L;
    gyB = gyA + P;
    row = gyB + L;
  }
  // Copy the pair's [L, P] tile out of the block (leading dimension ld) and transpose it, so
  // the word-axis ISA (columns of the tile) also reads contiguous rows.
  void load(const T* G, int64_t ld, int64_t L, int64_t P) {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t p = 0; p < P; ++p) {
        const T v = G[l * ld + p];
        tile[l * P + p] = v;
        tileT[p * L + l] = v;
      }
  }
};

// Both paths' first stages: yA[p] = ISA over words of column p (word_weight), yB[l] = ISA over
// patches of row l (patch_weight). The second stages run on yA and yB.
template <typename T>
void first_stages(PairScratch<T>& S, int64_t L, int64_t P, const T* ww, const T* pw, T s) {
  T* a = S.row;
  T* w = S.row + std::max(L, P);
  for (int64_t p = 0; p < P; ++p) S.yA[p] = isa_row_forward(S.tileT + p * L, L, ww, s, a, w);
  for (int64_t l = 0; l < L; ++l) S.yB[l] = isa_row_forward(S.tile + l * P, P, pw, s, a, w);
}

at::Tensor bi_isa_fwd_cpu(const at::Tensor& words_in, const at::Tensor& patches_in,
                          const at::Tensor& ww_in, const at::Tensor& pw_in, const at::Tensor& ww2_in,
                          const at::Tensor& pw2_in, double tau) {
  const BiGeometry g = check_bi(words_in, patches_in, ww_in, pw_in, ww2_in, pw2_in);
  const auto acc = acc_type(words_in);
  const at::Tensor words = as_acc(words_in, acc), patches = as_acc(patches_in, acc);
  const at::Tensor ww = as_acc(ww_in, acc), pw = as_acc(pw_in, acc), ww2 = as_acc(ww2_in, acc),
                   pw2 = as_acc(pw2_in, acc);
  at::Tensor out = at::empty({g.Bt, g.Bv}, words.options());
  if (g.Bt == 0 || g.Bv == 0) return out.to(words_in.scalar_type());
  const auto [tb_max, vb_max] = block_sizes(g);
  const at::Tensor words2d = words.view({g.Bt * g.L, g.D});
  const at::Tensor patches2d = patches.view({g.Bv * g.P, g.D});
  AT_DISPATCH_FLOATING_TYPES(acc, "bi_isa_fwd", [&] {
    const scalar_t s = static_cast<scalar_t>(1.0 / tau);
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t *wwp = ww.const_data_ptr<scalar_t>(), *pwp = pw.const_data_ptr<scalar_t>(),
                   *ww2p = ww2.const_data_ptr<scalar_t>(), *pw2p = pw2.const_data_ptr<scalar_t>();
    for (int64_t t0 = 0; t0 < g.Bt; t0 += tb_max) {
      const int64_t tb = std::min(tb_max, g.Bt - t0);
      for (int64_t v0 = 0; v0 < g.Bv; v0 += vb_max) {
        const int64_t vb = std::min(vb_max, g.Bv - v0);
        // G block [tb*L, vb*P]: row t*L + l, column v*P + p (pair-local t, v).
        const at::Tensor G = at::mm(words2d.narrow(0, t0 * g.L, tb * g.L),
                                    patches2d.narrow(0, v0 * g.P, vb * g.P).t());
        const scalar_t* Gp = G.const_data_ptr<scalar_t>();
        const int64_t ld = vb * g.P;
        at::parallel_for(0, tb * vb, 1, [&](int64_t begin, int64_t end) {
          PairScratch<scalar_t> S(g.L, g.P);
          scalar_t* a = S.row;
          scalar_t* w = S.row + std::max(g.L, g.P);
          for (int64_t pair = begin; pair < end; ++pair) {
            const int64_t t = pair / vb, v = pair % vb;
            S.load(Gp + t * g.L * ld + v * g.P, ld, g.L, g.P);
            first_stages(S, g.L, g.P, wwp, pwp, s);
            const scalar_t sa = isa_row_forward(S.yA, g.P, pw2p, s, a, w);
            const scalar_t sb = isa_row_forward(S.yB, g.L, ww2p, s, a, w);
            op[(t0 + t) * g.Bv + v0 + v] = (sa + sb) / 2;
          }
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
  const at::Tensor ww = as_acc(ww_in, acc), pw = as_acc(pw_in, acc), ww2 = as_acc(ww2_in, acc),
                   pw2 = as_acc(pw2_in, acc);
  const at::Tensor wwT = ww.t().contiguous(), pwT = pw.t().contiguous(),
                   ww2T = ww2.t().contiguous(), pw2T = pw2.t().contiguous();
  at::Tensor gwords = at::zeros_like(words), gpatches = at::zeros_like(patches);
  // Per-thread weight-gradient accumulators: [threads, L*L + P*P + L*L + P*P].
  const int64_t nthreads = at::get_num_threads();
  const int64_t LL = g.L * g.L, PP = g.P * g.P;
  at::Tensor gW_part = at::zeros({nthreads, 2 * (LL + PP)}, words.options());
  if (g.Bt > 0 && g.Bv > 0) {
    const auto [tb_max, vb_max] = block_sizes(g);
    const at::Tensor words2d = words.view({g.Bt * g.L, g.D});
    const at::Tensor patches2d = patches.view({g.Bv * g.P, g.D});
    at::Tensor gwords2d = gwords.view({g.Bt * g.L, g.D});
    at::Tensor gpatches2d = gpatches.view({g.Bv * g.P, g.D});
    AT_DISPATCH_FLOATING_TYPES(acc, "bi_isa_bwd", [&] {
      const scalar_t s = static_cast<scalar_t>(1.0 / tau);
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t *wwp = ww.const_data_ptr<scalar_t>(), *pwp = pw.const_data_ptr<scalar_t>(),
                     *ww2p = ww2.const_data_ptr<scalar_t>(), *pw2p = pw2.const_data_ptr<scalar_t>();
      const scalar_t *wwTp = wwT.const_data_ptr<scalar_t>(), *pwTp = pwT.const_data_ptr<scalar_t>(),
                     *ww2Tp = ww2T.const_data_ptr<scalar_t>(), *pw2Tp = pw2T.const_data_ptr<scalar_t>();
      scalar_t* gWbase = gW_part.mutable_data_ptr<scalar_t>();
      for (int64_t t0 = 0; t0 < g.Bt; t0 += tb_max) {
        const int64_t tb = std::min(tb_max, g.Bt - t0);
        const at::Tensor wblk = words2d.narrow(0, t0 * g.L, tb * g.L);
        for (int64_t v0 = 0; v0 < g.Bv; v0 += vb_max) {
          const int64_t vb = std::min(vb_max, g.Bv - v0);
          const at::Tensor pblk = patches2d.narrow(0, v0 * g.P, vb * g.P);
          // Recompute the block of G, then overwrite each tile with dL/dG.
          at::Tensor G = at::mm(wblk, pblk.t());
          scalar_t* Gp = G.mutable_data_ptr<scalar_t>();
          const int64_t ld = vb * g.P;
          at::parallel_for(0, tb * vb, 1, [&](int64_t begin, int64_t end) {
            PairScratch<scalar_t> S(g.L, g.P);
            scalar_t* gW = gWbase + at::get_thread_num() * 2 * (LL + PP);
            scalar_t *gww = gW, *gpw = gW + LL, *gww2 = gW + LL + PP, *gpw2 = gW + 2 * LL + PP;
            for (int64_t pair = begin; pair < end; ++pair) {
              const int64_t t = pair / vb, v = pair % vb;
              scalar_t* Gt = Gp + t * g.L * ld + v * g.P;
              S.load(Gt, ld, g.L, g.P);
              first_stages(S, g.L, g.P, wwp, pwp, s);
              // out = (sA + sB) / 2: each path's second stage gets half the pair's gradient.
              const scalar_t half = gp[(t0 + t) * g.Bv + v0 + v] / 2;
              isa_row_backward(S.yA, g.P, pw2p, pw2Tp, s, half, S.gyA, gpw2, S.row);
              isa_row_backward(S.yB, g.L, ww2p, ww2Tp, s, half, S.gyB, gww2, S.row);
              for (int64_t p = 0; p < g.P; ++p)
                isa_row_backward(S.tileT + p * g.L, g.L, wwp, wwTp, s, S.gyA[p],
                                 S.gtileT + p * g.L, gww, S.row);
              for (int64_t l = 0; l < g.L; ++l)
                isa_row_backward(S.tile + l * g.P, g.P, pwp, pwTp, s, S.gyB[l],
                                 S.gtile + l * g.P, gpw, S.row);
              for (int64_t l = 0; l < g.L; ++l)
                for (int64_t p = 0; p < g.P; ++p)
                  Gt[l * ld + p] = S.gtile[l * g.P + p] + S.gtileT[p * g.L + l];
            }
          });
          // G now holds dL/dG of the block: G[t, l, v, p] = <words[t, l], patches[v, p]>.
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
