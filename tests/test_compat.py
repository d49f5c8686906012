"""tvr_kernels.compat: the authors' module names and calls on the fused ops, and patch/unpatch.

The stand-ins below are written from the authors' interfaces (class names, constructor
arguments, attributes, call signatures), with our references doing the arithmetic: the
authors' code itself is never imported (their repositories are not packages).
"""
import types

import pytest
import torch
from torch import nn

import tvr_kernels as tk
from tvr_kernels import compat
from tvr_kernels.reference.perturbed_topk import _PerturbedTopK
from tvr_kernels.reference.stochastic_max_similarity import authors_stochastic_text
from tvr_kernels.reference.token_shift import token_shift as ref_token_shift

from helpers import authors_sinkhorn, randn

torch.set_num_threads(1)

T, N, D = 4, 15, 16           # frames, tokens per frame (CLS + 14), width; fold = 15 // 7 = 2


# ------------------------------------------------------------- stand-ins of the authors' code

class PerturbedTopK(nn.Module):
    """The authors' interface: PerturbedTopK(k, num_samples=500, sigma=0.05), module(x),
    torch.normal noise drawn on the CPU at every call."""

    def __init__(self, k, num_samples=500, sigma=0.05):
        super().__init__()
        self.k, self.num_samples, self.sigma = k, num_samples, sigma

    def forward(self, x):
        b, d = x.shape
        noise = torch.normal(mean=0.0, std=1.0, size=(b, self.num_samples, d)).to(x.device)
        return _PerturbedTopK.apply(x, self.k, self.num_samples, self.sigma, noise, "normal",
                                    "diagonal")


class PatchShiftModule(nn.Module):
    """The authors' interface: PatchShiftModule(net, video_frame, n_div) around an attention,
    query [L, N, D]; shifts whole tokens (offset 3), calls net(x, x, x, ...)."""

    def __init__(self, net, video_frame, n_div):
        super().__init__()
        self.net, self.video_frame, self.n_div = net, video_frame, n_div

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None):
        x = ref_token_shift(query.permute(1, 0, 2), self.video_frame, self.n_div, 3).permute(1, 0, 2)
        return self.net(x, x, x, need_weights=need_weights, attn_mask=attn_mask)


class Block(nn.Module):
    """CLIP's ResidualAttentionBlock: attn is called as attn(x, x, x, need_weights=False,
    attn_mask=...)[0] on [L, N, D]."""

    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=None)[0]
        return x + self.mlp(self.ln_2(x))


class Selector(nn.Module):
    """VisualTokenSelection's shape: a score per patch token, perturbed top-3, CLS kept."""

    def __init__(self, topk_selector):
        super().__init__()
        self.score_predictor = nn.Linear(D, 1)
        self.topk_selector = topk_selector

    def forward(self, x):
        scores = torch.tanh(self.score_predictor(x)).squeeze(-1)[:, 1:]
        ind = self.topk_selector(scores)
        return torch.cat([x[:, :1], torch.einsum("bkl,bld->bkd", ind, x[:, 1:])], dim=1)


class TinyVideoModel(nn.Module):
    """Three visual blocks, the last two shifted (as make_patch_shift does for 10-11), then
    the token selection; forward [B*T, N, D] -> [B*T, 4, D]."""

    def __init__(self, num_samples=64):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block(), Block())
        for i in (1, 2):
            self.blocks[i].attn = PatchShiftModule(self.blocks[i].attn, video_frame=T, n_div=7)
        self.selector = Selector(PerturbedTopK(3, num_samples))

    def forward(self, x):
        return self.selector(self.blocks(x.transpose(0, 1)).transpose(0, 1))


def _run(model, x, g, seed=3):
    """Output, and gradients of <output, g> to x and every parameter, under torch seed."""
    torch.manual_seed(seed)
    out = model(x)
    params = [p for _, p in sorted(model.named_parameters())]
    grads = torch.autograd.grad((out * g).sum(), [x, *params])
    return out, grads


def _input(b=2):
    x = randn(b * T, N, D, requires_grad=True)
    return x, randn(b * T, 4, D)


# ------------------------------------------------------------------------ patch / unpatch

def test_patch_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    model = TinyVideoModel()
    x, g = _input()
    out0, grads0 = _run(model, x, g)
    shifted = [model.blocks[i].attn for i in (1, 2)]
    selector = model.selector.topk_selector

    report = compat.patch(model, rng="torch")
    assert report and not report.skipped
    assert [s.path for s in report.swapped] == ["blocks.1.attn", "blocks.2.attn",
                                                "selector.topk_selector"]
    assert "PatchShiftModule -> tvr_kernels.compat.ts2net.PatchShiftModule" in str(report)
    assert isinstance(model.selector.topk_selector, compat.PerturbedTopK)
    for i, old in zip((1, 2), shifted):
        new = model.blocks[i].attn
        assert isinstance(new, compat.PatchShiftModule) and new.net is old.net
        assert (new.video_frame, new.n_div, new.offset) == (T, 7, 3)
    assert model.selector.topk_selector.k == 3 and model.selector.topk_selector.num_samples == 64

    # rng="torch" draws the authors' noise: same selection, so the same output bit for bit;
    # the gradients go through the authors' estimator, summed in another order
    out1, grads1 = _run(model, x, g)
    assert torch.equal(out1, out0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    back = compat.unpatch(model)
    assert len(back.swapped) == 3
    assert [model.blocks[i].attn for i in (1, 2)] == shifted
    assert model.selector.topk_selector is selector
    out2, _ = _run(model, x, g)
    assert torch.equal(out2, out0)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    model = TinyVideoModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert "blocks.1.attn.net.in_proj_weight" in before
    compat.patch(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # a state dict saved before patching loads strictly after it ...
    other = {k: v + 0.5 for k, v in before.items()}
    model.load_state_dict(other, strict=True)
    # ... and one saved after patching (here: after a training step) into the authors' model
    x, g = _input()
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    (model(x) * g).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    trained = model.state_dict()
    fresh = TinyVideoModel()
    fresh.load_state_dict(trained, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], trained[k]) for k in trained)
    # unpatching keeps the trained weights (the wrapped attention is the same object)
    compat.unpatch(model)
    assert type(model.blocks[1].attn).__module__ == __name__
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)


def test_nothing_to_patch():
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1))
    report = compat.patch(model)
    assert not report and report.swapped == [] and report.skipped == []
    assert str(report).startswith("nothing to patch in Sequential")
    assert not compat.unpatch(model) and str(compat.unpatch(model)).startswith("nothing to unpatch")
    # patching twice: the second finds only our modules
    tiny = TinyVideoModel()
    assert len(compat.patch(tiny).swapped) == 3
    again = compat.patch(tiny)
    assert not again and len(again.skipped) == 3
    assert all("already" in why for _, why in again.skipped)


def test_lookalikes_are_skipped_and_shared_modules_swapped_once():
    class PerturbedTopKLike(nn.Module):          # right name, wrong content
        def __init__(self):
            super().__init__()
            self.k = 3
            self.scale = nn.Parameter(torch.ones(1))
    PerturbedTopKLike.__name__ = "PerturbedTopK"
    shared = PerturbedTopK(2, 16)
    model = nn.ModuleDict({"a": Selector(shared), "b": Selector(shared),
                           "c": Selector(PerturbedTopKLike())})
    report = compat.patch(model)
    assert [s.path for s in report.swapped] == ["a.topk_selector", "b.topk_selector"]
    assert model["a"].topk_selector is model["b"].topk_selector
    assert isinstance(model["a"].topk_selector, compat.PerturbedTopK)
    assert type(model["c"].topk_selector) is PerturbedTopKLike
    (path, why), = report.skipped
    assert path == "c.topk_selector" and "num_samples" in why
    compat.unpatch(model)
    assert model["a"].topk_selector is shared and model["b"].topk_selector is shared


def test_patch_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        compat.patch(42)
    with pytest.raises(ValueError, match="itself the authors' PerturbedTopK"):
        compat.patch(PerturbedTopK(3))
    with pytest.raises(ValueError, match="rng"):
        compat.patch(TinyVideoModel(), rng="numpy")
    with pytest.raises(ValueError, match="gradient"):
        compat.patch(TinyVideoModel(), gradient="exact")
    direct = nn.Sequential(compat.PerturbedTopK(3))
    (path, why), = compat.unpatch(direct).skipped
    assert path == "0" and "no original" in why


# ------------------------------------------------------------------------ PerturbedTopK

def test_perturbed_topk_injected_noise_is_the_authors():
    x = randn(6, 20, requires_grad=True)
    g = randn(6, 3, 20)
    torch.manual_seed(5)
    want = PerturbedTopK(3, 100, 0.1)(x)
    (gwant,) = torch.autograd.grad((want * g).sum(), x)
    torch.manual_seed(5)
    noise = torch.normal(mean=0.0, std=1.0, size=(6, 100, 20))
    got = compat.PerturbedTopK(3, 100, 0.1)(x, noise=noise)
    (ggot,) = torch.autograd.grad((got * g).sum(), x)
    assert got.dtype == torch.float32 and got.shape == (6, 3, 20)
    assert torch.equal(got, want)
    torch.testing.assert_close(ggot, gwant, rtol=1e-5, atol=1e-5)


def test_perturbed_topk_philox_is_seeded_by_torch():
    m = compat.PerturbedTopK(3, 4000, 0.5)
    x = randn(2, 8)
    torch.manual_seed(11)
    a = m(x)
    torch.manual_seed(11)
    assert torch.equal(m(x), a)                  # torch.manual_seed governs the noise
    assert not torch.equal(m(x), a)              # and each call draws afresh
    torch.manual_seed(11)
    authors = PerturbedTopK(3, 4000, 0.5)(x)     # another stream, the same distribution
    assert not torch.equal(a, authors)
    torch.testing.assert_close(a, authors, rtol=0, atol=0.05)
    assert torch.equal(m(x, seed=7), m(x, seed=7))


def test_perturbed_topk_bad_input():
    with pytest.raises(ValueError, match="k must be >= 1"):
        compat.PerturbedTopK(0)
    with pytest.raises(ValueError, match="sigma"):
        compat.PerturbedTopK(3, sigma=0.0)
    with pytest.raises(ValueError, match="rng"):
        compat.PerturbedTopK(3, rng="cuda")
    with pytest.raises(ValueError, match=r"x must be 2-D \[b, d\]"):
        compat.PerturbedTopK(3, rng="torch")(randn(10))
    with pytest.raises(ValueError, match="k must be <= d"):
        compat.PerturbedTopK(5)(randn(2, 4))
    with pytest.raises(ValueError, match="noise must have shape"):
        compat.PerturbedTopK(2, 10)(randn(2, 4), noise=randn(2, 9, 4))


# ------------------------------------------------------------------------ PatchShiftModule

class Recorder(nn.Module):
    """Stands in for the attention: returns the query it got, and what else it was given."""

    def forward(self, query, key, value, need_weights=True, attn_mask=None, **kw):
        self.seen = (key is query and value is query, need_weights, attn_mask, kw)
        return query, None


def test_patch_shift_moves_whole_tokens_as_the_authors():
    """Which token of which frame lands where, from the authors' indices (SPEC 1): with
    L = 15 and n_div = 7, fold = 2; tokens 1, 3, ..., 13 read frame t-1, tokens 4, 6, ...,
    14 read frame t+1 (and win over the first set), CLS and the end frames stay."""
    B = 2
    src = torch.arange(B * T, dtype=torch.float32)[None, :, None].expand(N, B * T, 3).clone()
    m = compat.PatchShiftModule(Recorder(), video_frame=T, n_div=7)
    out, _ = m(src, src, src)
    frame = out[..., 0].t().reshape(B, T, N) - torch.arange(B)[:, None, None] * T  # source frame
    for t in range(T):
        for n in range(N):
            want = t
            if n >= 1 and (n - 1) % 2 == 0 and t >= 1:
                want = t - 1
            if n >= 4 and (n - 4) % 2 == 0 and t <= T - 2:
                want = t + 1
            assert torch.all(frame[:, t, n] == want), (t, n)
    assert torch.equal(out[..., 1:], out[..., :1].expand(-1, -1, 2))  # whole tokens moved
    assert m.net.seen == (True, True, None, {})


def test_patch_shift_passes_the_call_on():
    torch.manual_seed(2)
    att = nn.MultiheadAttention(D, 2)
    q = randn(N, 2 * T, D)
    mask = torch.zeros(2 * T, N, dtype=torch.bool)
    mask[:, -3:] = True
    attn_mask = randn(N, N)
    shifted = ref_token_shift(q.transpose(0, 1), T, 7, 3).transpose(0, 1)
    ours = compat.PatchShiftModule(att, T, 7)
    for kw in ({}, {"key_padding_mask": mask}, {"attn_mask": attn_mask, "need_weights": False}):
        got, w = ours(q, q, q, **kw)
        want, w_want = att(shifted, shifted, shifted, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert (w is None) == (w_want is None)


def test_patch_shift_bad_input():
    att = nn.MultiheadAttention(D, 2)
    with pytest.raises(TypeError, match="net must be an nn.Module"):
        compat.PatchShiftModule(lambda q, k, v: q, T, 7)
    with pytest.raises(ValueError, match="n_div must be >= 1"):
        compat.PatchShiftModule(att, T, 0)
    m = compat.PatchShiftModule(att, T, 7)
    with pytest.raises(ValueError, match=r"query must be 3-D \[L, N, D\]"):
        m(randn(N, D), None, None)
    with pytest.raises(ValueError, match="N = 6 frames must be a multiple of video_frame = 4"):
        m(randn(N, 6, D), None, None)
    with pytest.raises(ValueError, match="fold = L // n_div must be >= 1"):
        m(randn(5, 8, D), None, None)


# ------------------------------------------------------------------------ sinkhorn_knopp

@pytest.mark.parametrize("shape", [(30, 30), (57, 20)])
def test_sinkhorn_knopp_is_the_authors(shape):
    sim = randn(*shape, dtype=torch.float64, scale=20.0, requires_grad=True)
    for got, want in zip(compat.sinkhorn_knopp(sim), authors_sinkhorn(sim, 4)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    text_bias, video_bias = compat.sinkhorn_knopp(sim, 6, log_domain=True)
    assert text_bias.shape == (shape[0],) and video_bias.shape == (shape[1],)
    assert video_bias.requires_grad
    assert not compat.sinkhorn_knopp(sim, detach=True)[1].requires_grad


def test_sinkhorn_knopp_bad_input():
    with pytest.raises(ValueError, match=r"log_sim_matrix must be 2-D \[Nq, Nv\]"):
        compat.sinkhorn_knopp(randn(5))
    with pytest.raises(TypeError, match="detach must be a bool"):
        compat.sinkhorn_knopp(randn(3, 4), 4, "yes")
    with pytest.raises(ValueError, match="n_iters must be >= 1"):
        compat.sinkhorn_knopp(randn(3, 4), 0)


# ------------------------------------------------------------------------ T-MASS evaluation

TF, DM, M = 5, 12, 6           # frames, embedding dim, stochastic trials


class LinearCosRadius(nn.Module):
    """The authors' radius module: linear_proj = Linear(num_frames, embed_dim), a config."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.linear_proj = nn.Linear(TF, DM)


class StochasticText(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.std_branch = LinearCosRadius(config)


def _tmass_inputs(nt, nv, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(nt, DM, generator=g)
    frames = torch.randn(nv, TF, DM, generator=g)
    pooled = torch.randn(nv, nt, DM, generator=g)
    config = types.SimpleNamespace(stochastic_prior="uniform01", stochastic_prior_std=1.0)
    stochastic = StochasticText(config)
    with torch.no_grad():
        stochastic.std_branch.linear_proj.weight.normal_(0, 0.3, generator=g)
    noise = torch.rand(nt, nv, M, DM, generator=g)
    return text, frames, pooled, stochastic, noise


def test_tmass_query_conditioned_is_the_authors_selection():
    text, frames, pooled, stochastic, noise = _tmass_inputs(7, 5)
    got = compat.tmass_similarity_query_conditioned(text, frames, pooled, stochastic, M,
                                                    noise=noise)
    lin = stochastic.std_branch.linear_proj
    want = torch.empty(7, 5)
    for j in range(5):                           # the authors' loop over videos
        rep = frames[j][None].repeat(7, 1, 1)
        trials = torch.stack([authors_stochastic_text(text, rep, lin.weight, lin.bias, noise[:, j, m])
                              for m in range(M)])
        trials = trials / trials.norm(dim=-1, keepdim=True)
        target = pooled[j] / pooled[j].norm(dim=-1, keepdim=True)
        want[:, j] = (trials * target).sum(-1).max(0).values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # any handle on the radius gives the same; the model's config chooses the prior
    lw = (lin.weight, lin.bias)
    for handle in (types.SimpleNamespace(stochastic=stochastic), stochastic.std_branch, lin, lw):
        assert torch.equal(compat.tmass_similarity_query_conditioned(text, frames, pooled, handle,
                                                                     M, noise=noise), got)
    stochastic.config.stochastic_prior, stochastic.config.stochastic_prior_std = "normal", 3e-3
    seeded = compat.tmass_similarity_query_conditioned(text, frames, pooled, stochastic, M, seed=4)
    op, _ = tk.stochastic_max_similarity(text, frames, pooled, *lw, M, prior="normal", std=3e-3,
                                         seed=4)
    assert torch.equal(seeded, op)


def test_tmass_leaky_is_the_authors_evaluation():
    """Against tvr_models.tmass.authors_evaluation (the authors' selection, grouping per video
    id and batched diagonal product re-enacted), with several captions per video."""
    tmass = pytest.importorskip("tvr_models.tmass")
    nt, nv = 11, 5
    text, frames, _, stochastic, noise = _tmass_inputs(nt, nv, seed=3)
    t2v = torch.tensor([0, 1, 2, 3, 4, 2, 2, 0, 4, 1, 3])
    ids = [f"video{int(v)}" for v in t2v]
    pool = tmass.TextConditionedPooling(DM, dropout=0.0)
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(0.2 * torch.randn_like(p))
        pooled = tmass.authors_pooling(pool, text, frames)
        model = types.SimpleNamespace(pool_frames=pool, num_samples=M,
                                      stochastic=types.SimpleNamespace(std_branch=stochastic.std_branch))
        want, gap = tmass.authors_evaluation(model, text, frames, t2v, noise, return_margin=True)
    got = compat.tmass_similarity_leaky(text, frames, pooled, stochastic, ids, M, noise=noise)
    missing = torch.isnan(want)                  # their -inf padding: NaN; ours -inf
    assert missing.any() and torch.equal(torch.isinf(got), missing)
    clear = ~missing & (gap > 1e-5)              # no near tie in the selection
    assert clear.sum() > 0.9 * (~missing).sum()
    torch.testing.assert_close(got[clear], want[clear], rtol=1e-5, atol=1e-6)
    # one caption per video: the diagonal is the intended score, the rest is not
    text1, pooled1 = text[:nv], pooled[:, :nv]
    leaky = compat.tmass_similarity_leaky(text1, frames, pooled1, stochastic, range(nv), M,
                                          noise=noise[:nv])
    intended = compat.tmass_similarity_query_conditioned(text1, frames, pooled1, stochastic, M,
                                                         noise=noise[:nv])
    torch.testing.assert_close(leaky.diag(), intended.diag(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(leaky, intended)


def test_tmass_per_video_id_layout():
    sims = randn(6, 3)
    ids = ["b", "a", "b", "c", "b", "a"]         # rows of vid_embeds: b, a, c
    out = compat.per_video_id(sims, ids)
    assert out.shape == (3, 3, 3)
    for t, (g, s) in enumerate([(0, 0), (1, 0), (0, 1), (2, 0), (0, 2), (1, 1)]):
        assert torch.equal(out[g, s], sims[t])
    assert torch.isinf(out[1, 2]).all() and torch.isinf(out[2, 1:]).all()


def test_tmass_seeded_leaky_is_reproducible():
    text, frames, pooled, stochastic, _ = _tmass_inputs(4, 4, seed=5)
    torch.manual_seed(9)
    a = compat.tmass_similarity_leaky(text, frames, pooled, stochastic, range(4), M)
    torch.manual_seed(9)
    assert torch.equal(compat.tmass_similarity_leaky(text, frames, pooled, stochastic, range(4), M), a)
    assert torch.isfinite(a).all()


def test_tmass_bad_input():
    text, frames, pooled, stochastic, _ = _tmass_inputs(4, 3)
    q = compat.tmass_similarity_query_conditioned
    with pytest.raises(ValueError, match=r"vid_embeds_pooled must be \[Nv, Nt, D\] = \(3, 4, 12\)"):
        q(text, frames, pooled.transpose(0, 1), stochastic)
    with pytest.raises(ValueError, match="text_embeds must be 2-D"):
        q(text[0], frames, pooled, stochastic)
    with pytest.raises(TypeError, match="stochastic must be the authors' model.stochastic"):
        q(text, frames, pooled, nn.Identity())
    stochastic.config.stochastic_prior = "laplace"
    with pytest.raises(ValueError, match="'laplace' is not one of the authors' priors"):
        q(text, frames, pooled, stochastic)
    with pytest.raises(ValueError, match="prior must be one of"):
        q(text, frames, pooled, stochastic, prior="laplace")
    leaky = compat.tmass_similarity_leaky
    with pytest.raises(ValueError, match="each of the Nt = 4 texts, got 3 ids"):
        leaky(text, frames, pooled, stochastic, [0, 1, 2], prior="uniform")
    with pytest.raises(ValueError, match="names 2 distinct videos but vid_embeds holds Nv = 3"):
        leaky(text, frames, pooled, stochastic, [0, 1, 1, 0], prior="uniform")
