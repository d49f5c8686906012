"""TS2-Net and UCoFiA at tiny sizes: forward/loss/backward, training lowers the loss, the
evaluation with the fused kernels equals the one with the references, masks, and that the
models call the tvr_kernels ops."""
import numpy as np
import pytest
import torch

import tvr_kernels as tk
from tvr_models import _ops, evaluate as E
from tvr_models.ts2net import TS2Net, tiny_ts2net
from tvr_models.ucofia import UCoFiA, tiny_ucofia
from model_inputs import generated_pairs, texts, videos

T, L, VOCAB = 4, 32, 49408
MAKERS = {"ts2net": tiny_ts2net, "ucofia": tiny_ucofia}


def _texts(n, seed=0):
    return texts(n, seed)


_videos = videos


def loss_reaches(model, must_have_grad):
    """The training loss of 3 pairs (one short video) is a finite scalar whose backward gives
    each named parameter a finite, non-zero gradient. Returns the batch (ids, mask, video, vmask)."""
    ids, mask = _texts(3)
    video, vmask = _videos(3, short=(1,))
    loss = model(ids, mask, video, vmask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    named = dict(model.named_parameters())
    for n in must_have_grad:
        g = named[n].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
    return ids, mask, video, vmask


@pytest.mark.parametrize("name", ["ts2net", "ucofia"])
def test_forward_loss_backward(name):
    model = MAKERS[name](num_frames=T)
    model.set_selection(seed=3)
    must_have_grad = ["visual_token_selector.score_predictor.out_conv.0.weight",   # via top-k backward
                      "transformerClip.resblocks.0.attn.in_proj_weight",
                      "clip.clip.vision_model.encoder.layers.1.self_attn.q_proj.weight",
                      "clip.clip.text_model.encoder.layers.0.mlp.fc1.weight",
                      "clip.clip.logit_scale"]
    if name == "ucofia":
        must_have_grad += ["global_mat_weight", "frame_logit_weight", "word_mat_weight", "pixel_mat_weight2",
                           "local_mat_weight"]
    ids, mask, video, vmask = loss_reaches(model, must_have_grad)
    # shapes of the evaluation path
    model.eval()
    with torch.no_grad():
        tf, vf = model.encode_text(ids, mask), model.encode_video(video, vmask)
        s = model.score(tf, vf)
    assert s.shape == (model.granularities, 3, 3) and torch.isfinite(s).all()


@pytest.mark.parametrize("name", ["ts2net", "ucofia"])
def test_training_lowers_loss(name, tmp_path):
    ids, mask, loaded = generated_pairs(tmp_path)
    torch.manual_seed(0)
    model = MAKERS[name](num_frames=T)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(30):
        model.set_selection(seed=step)
        loss = model(ids, mask, loaded.video, loaded.video_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("name", ["ts2net", "ucofia"])
@pytest.mark.parametrize("mode", ["hard", "seeded"])
def test_eval_50x50_kernels_equal_reference(name, mode):
    torch.manual_seed(0)
    model = MAKERS[name](num_frames=T)
    model.set_selection(hard=(mode == "hard"), seed=None if mode == "hard" else 11)
    ids, mask = _texts(50, seed=2)
    video, vmask = _videos(50, seed=2, short=(3, 17))
    bank_ids, bank_mask = _texts(20, seed=5)
    kw = dict(text_to_video=None, bank_ids=bank_ids if name == "ucofia" else None,
              bank_mask=bank_mask if name == "ucofia" else None, video_batch=16, chunk_size=16,
              progress=False)
    fused = E.evaluate(model, ids, mask, video, vmask, **kw)
    with tk.use_backend("reference"):
        reference = E.evaluate(model, ids, mask, video, vmask, **kw)
    torch.testing.assert_close(fused["sim"], reference["sim"], rtol=1e-4, atol=1e-4)
    assert fused["sim"].shape == (50, 50)
    if mode == "hard":
        assert fused["metrics"] == reference["metrics"]
    # chunking does not change the result
    unchunked = E.evaluate(model, ids, mask, video, vmask, **{**kw, "chunk_size": 1000})
    torch.testing.assert_close(unchunked["sim"], fused["sim"], rtol=1e-5, atol=1e-5)


def test_ts2net_mask_is_interleaved():
    """Padded frames' selected tokens must not reach the valid frames' CLS slots."""
    torch.manual_seed(0)
    model = tiny_ts2net(num_frames=T).eval()
    model.set_selection(hard=True)
    video, vmask = _videos(2, short=(0,))               # video 0: frames 2, 3 padded
    outs = []
    for noise in (0.0, 5.0):
        def hook(mod, args, out, noise=noise):
            out = out.clone()
            out[0, 2 * 4:] += noise                     # tokens of frames 2 and 3 (interleaved layout)
            return out
        h = model.visual_token_selector.register_forward_hook(hook)
        with torch.no_grad():
            outs.append(model.encode_video(video, vmask)["frames"])
        h.remove()
    torch.testing.assert_close(outs[0][0, :2], outs[1][0, :2])   # valid frames unaffected
    assert not torch.allclose(outs[0][0, 2:], outs[1][0, 2:])    # (the noise did arrive)
    # and the frame-weighted score ignores padded slots entirely
    tf = model.encode_text(*_texts(2))
    vf = {"frames": outs[0], "mask": vmask}
    vf2 = {"frames": outs[0].clone(), "mask": vmask}
    vf2["frames"][0, 2:] = torch.randn(2, outs[0].shape[-1])
    torch.testing.assert_close(model.score(tf, vf), model.score(tf, vf2))


def _isa_dense(sim, w, dim, tau=0.01):
    # the authors' expression: sum(softmax(softmax(sim/tau) @ w / tau) * sim) along dim
    s = sim.movedim(dim, -1)
    return (torch.softmax(torch.softmax(s / tau, -1) @ w / tau, -1) * s).sum(-1)


def test_ucofia_scores_match_authors_formulas():
    torch.manual_seed(0)
    model = tiny_ucofia(num_frames=T).eval()
    model.set_selection(hard=True)
    with torch.no_grad():
        for p in ("global_mat_weight", "global_mat_weight_1", "local_mat_weight", "frame_logit_weight",
                  "word_mat_weight", "word_mat_weight2", "pixel_mat_weight", "pixel_mat_weight2"):
            w = getattr(model, p)
            w.add_(0.3 * torch.randn_like(w))           # break the identity so argument order matters
        tf = model.encode_text(*_texts(3))
        vf = model.encode_video(*_videos(2))
        got = model.score(tf, vf)
        ls = model.clip.logit_scale.exp()
        s, words, v, f, p = tf["sentence"], tf["words"], vf["video"], vf["frames"], vf["patches"]
        vs = ls * (s @ model.global_mat_weight) @ (v @ model.global_mat_weight_1).t()
        sf = ls * _isa_dense(torch.einsum("td,vfd->tvf", s, f), model.frame_logit_weight, -1)
        g = torch.einsum("tld,vpd->tlvp", words @ model.local_mat_weight, p)
        word_level = _isa_dense(g, model.word_mat_weight, 1)                 # [t, v, p]
        a = _isa_dense(word_level, model.pixel_mat_weight2, -1)
        frame_level = _isa_dense(g, model.pixel_mat_weight, -1)              # [t, l, v]
        b = _isa_dense(frame_level, model.word_mat_weight2, 1)
        want = torch.stack([vs, sf, (a + b) / 2])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ucofia_sinkhorn_bias_per_granularity():
    model = tiny_ucofia(num_frames=T)
    sims = torch.randn(3, 5, 4)
    bank = torch.randn(3, 9, 4) * 3
    got = model.finalize(sims, bank)
    want = sum(sims[g] + _ops.op("sinkhorn_knopp")(bank[g], 4)[1][None] for g in range(3)) / 3
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.finalize(sims), sims.mean(0))
    assert not torch.allclose(got, sims.mean(0))


def test_models_call_tvr_kernels_ops(monkeypatch):
    """Every op the models use is looked up on tvr_kernels at call time."""
    calls = []

    def spy(name):
        real = _ops.op(name)

        def f(*a, **k):
            calls.append(name)
            return real(*a, **k)
        return f

    for name in ("token_shift", "perturbed_topk", "isa", "bi_isa", "sinkhorn_knopp"):
        monkeypatch.setattr(tk, name, spy(name), raising=False)
    model = tiny_ucofia(num_frames=T).eval()
    ids, mask = _texts(4)
    video, vmask = _videos(4)
    E.evaluate(model, ids, mask, video, vmask, bank_ids=ids, bank_mask=mask, progress=False)
    assert {"token_shift", "perturbed_topk", "isa", "bi_isa", "sinkhorn_knopp"} <= set(calls)


def test_frame_count_and_size_errors():
    with pytest.raises(ValueError, match="frames"):
        video, vmask = _videos(1)
        tiny_ts2net(num_frames=T).encode_video(video[:, :3], vmask[:, :3])
    with pytest.raises(ValueError, match="max_positions"):
        TS2Net(tiny_ts2net().clip, num_frames=12, max_positions=40)
    with pytest.raises(ValueError, match="tokens"):
        UCoFiA(tiny_ts2net().clip, num_frames=T, max_words=16, max_positions=16).encode_text(*_texts(1))


@pytest.mark.parametrize("cls", [TS2Net, UCoFiA])
def test_topk_gradient_option(cls):
    """``topk_gradient="full"`` reaches the token selection: same loss, a different gradient
    for the score predictor (the only parameters behind the top-k), the same for the rest."""
    torch.manual_seed(0)
    base = tiny_ts2net(num_frames=T)
    kw = dict(num_frames=T, topk=3, temporal_layers=1, temporal_heads=2, max_positions=T * 4,
              num_samples=50)
    if cls is UCoFiA:
        kw["max_words"] = L
    models = {g: cls(base.clip, topk_gradient=g, **kw) for g in ("diagonal", "full")}
    models["full"].load_state_dict(models["diagonal"].state_dict())
    ids, mask = _texts(3)
    video, vmask = _videos(3)
    losses, grads = {}, {}
    for g, m in models.items():
        m.set_selection(seed=3)
        m.zero_grad()
        losses[g] = m(ids, mask, video, vmask)
        losses[g].backward()
        grads[g] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert torch.equal(losses["diagonal"], losses["full"])
    sel = "visual_token_selector.score_predictor.out_conv.0.weight"
    assert not torch.allclose(grads["diagonal"][sel], grads["full"][sel])
    other = "clip.clip.text_model.encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(grads["diagonal"][other], grads["full"][other])
    with pytest.raises(ValueError, match="topk_gradient must be one of"):
        cls(base.clip, topk_gradient="exact", **kw)


def test_temporal_layernorm_uses_the_authors_epsilon():
    """The authors' temporal transformer normalises with eps = 1e-12: at small feature scale
    a block equals that computation and differs measurably from PyTorch's default 1e-5."""
    from tvr_models._modules import TemporalTransformer
    torch.manual_seed(0)
    tt = TemporalTransformer(32, 1, 2).eval()
    x, mask = torch.randn(3, 8, 32) * 1e-3, torch.ones(3, 8)

    def block(x, eps):
        blk = tt.resblocks[0]
        ln = lambda m, v: torch.nn.functional.layer_norm(v, (32,), m.weight, m.bias, eps)  # noqa: E731
        h = ln(blk.ln_1, x)
        x = x + blk.attn(h, h, h, need_weights=False)[0]
        return x + blk.mlp(ln(blk.ln_2, x))
    with torch.no_grad():
        out = tt(x, mask)
        torch.testing.assert_close(out, block(x, 1e-12), rtol=1e-5, atol=1e-6)
        assert (out - block(x, 1e-5)).abs().max() > 1e-3 * out.abs().max()


def test_ts2net_video_without_valid_frames_scores_zero():
    model = tiny_ts2net(num_frames=T).eval()
    model.set_selection(hard=True)
    ids, mask = _texts(2)
    video, vmask = _videos(3)
    vmask[1] = 0
    with torch.no_grad():
        s = model.score(model.encode_text(ids, mask), model.encode_video(video, vmask))
    assert torch.isfinite(s).all()
    assert torch.equal(s[0, :, 1], torch.zeros(2))
    assert (s[0, :, [0, 2]] != 0).all()
