"""T-MASS at tiny sizes: the training losses and the pooling against the authors' formulas,
forward/loss/backward, training lowers the loss, the evaluation (fused kernels = references,
independent of the chunk size to the bit, unequal numbers of texts and videos), the authors'
leaky evaluation reproduced and its leak shown, checkpoint names, and bad input."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tvr_kernels as tk
from model_inputs import generated_pairs
from test_models_retrieval import L, T, _texts, _videos, loss_reaches
from tvr_kernels.reference.stochastic_max_similarity import authors_stochastic_text, philox_noise
from tvr_models import evaluate as E
from tvr_models import metrics as M
from tvr_models.checkpoints import load_official_checkpoint
from tvr_models.tmass import TMASS, authors_evaluation, tiny_tmass

D = 32   # the tiny CLIP's joint dim


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny sizes: intra-op threads only add synchronisation, and on busy cores each parallel
    # region waits for a descheduled thread (this file: 10 s with one thread, 40-100 s with two).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _features(nt, nv, seed=0, common=0.0):
    """Feature-level inputs: texts [nt, D], frames [nv, T, D] (+ ``common`` * a shared clip)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(nt, D, generator=g)
    frames = common * torch.randn(1, T, D, generator=g) + torch.randn(nv, T, D, generator=g)
    return {"text": text}, {"frames": frames}


def _perturbed(model, seed=0, amount=0.2):
    """Break the identity start of the heads, so argument order and transposes matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("pool_frames.", "stochastic.")):
                p.add_(amount * torch.randn(p.shape, generator=g))
    return model


def _scale(model):
    return math.exp(min(model.clip.logit_scale.item(), math.log(100)))


# ---------------------------------------------------------------------- the authors' formulas
def _authors_pooling(pool, text, frames):
    """X-Pool's pooling in the authors' order (out_proj after the attention average)."""
    a = pool.cross_attn
    t, f = pool.layer_norm1(text), pool.layer_norm1(frames)
    q, k, v = a.q_proj(t), a.k_proj(f), a.v_proj(f)
    w = torch.softmax(torch.einsum("vkd,td->vkt", k, q) / math.sqrt(D), dim=1)   # over frames
    o = pool.layer_norm2(a.out_proj(torch.einsum("vkd,vkt->vtd", v, w)))
    return pool.layer_norm3(o + pool.linear_proj(o))


def _authors_training_loss(model, text, frames, eps):
    """The authors' trainer: CLIP loss of the stochastic texts + alpha * that of the support
    texts, ``sims[i, j] = cos(text_i, pooled[j, i])``."""
    lin = model.stochastic.std_branch.linear_proj
    pooled = _authors_pooling(model.pool_frames, text, frames)
    stochastic = authors_stochastic_text(text, frames, lin.weight, lin.bias, eps)
    radius = authors_stochastic_text(text, frames, lin.weight, lin.bias, torch.ones_like(eps)) - text

    def sims(t, p):
        t, p = t / t.norm(dim=-1, keepdim=True), p / p.norm(dim=-1, keepdim=True)
        return torch.bmm(t[:, None, :], p.permute(1, 2, 0)).squeeze(1)

    def clip_loss(s):
        logits = s * model.clip.logit_scale.exp()
        return -(F.log_softmax(logits, 1).diag().mean() + F.log_softmax(logits, 0).diag().mean()) / 2

    pointer = pooled.mean(1) - text
    support = pointer / pointer.norm(dim=-1, keepdim=True) * radius + text
    return clip_loss(sims(stochastic, pooled)) + model.alpha * clip_loss(sims(support, pooled))


# ---------------------------------------------------------------------- training
def test_forward_loss_backward():
    torch.manual_seed(0)
    model = tiny_tmass(num_frames=T)
    ids, mask, video, vmask = loss_reaches(model, [
        "pool_frames.cross_attn.q_proj.weight", "pool_frames.cross_attn.k_proj.weight",
        "pool_frames.cross_attn.v_proj.weight", "pool_frames.cross_attn.out_proj.bias",
        "pool_frames.linear_proj.weight", "pool_frames.layer_norm1.weight",
        "pool_frames.layer_norm3.bias", "stochastic.std_branch.linear_proj.weight",
        "stochastic.std_branch.linear_proj.bias",
        "clip.clip.vision_model.encoder.layers.1.self_attn.q_proj.weight",
        "clip.clip.text_model.encoder.layers.0.mlp.fc1.weight", "clip.clip.logit_scale"])
    model.eval()
    with torch.no_grad():
        tf, vf = model.encode_text(ids, mask), model.encode_video(video, vmask)
        s = model.score(tf, vf)
    assert tf["text"].shape == (3, D) and vf["frames"].shape == (3, T, D)
    assert s.shape == (1, 3, 3) and torch.isfinite(s).all()


def test_training_losses_follow_the_authors():
    torch.manual_seed(0)
    model = _perturbed(tiny_tmass(num_frames=T, dropout=0.0, alpha=0.8))
    tf, vf = _features(5, 5, seed=1)
    eps = torch.rand(5, D)
    got = model.training_losses(tf, vf, noise=eps)
    want = _authors_training_loss(model, tf["text"], vf["frames"], eps)
    torch.testing.assert_close(got["total"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["total"], got["loss"] + 0.8 * got["support"])
    # the logit scale is capped at 100, as the authors clamp it after each step
    with torch.no_grad():
        model.clip.logit_scale.fill_(7.0)
    capped = model.training_losses(tf, vf, noise=eps)["total"]
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(100))
    torch.testing.assert_close(capped, model.training_losses(tf, vf, noise=eps)["total"])
    # priors: U[0, 1) by default; N(0, std^2) on request (the authors' LSMDC std = 3e-3)
    u = model.stochastic.sample_prior(torch.empty(20000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    normal = tiny_tmass(num_frames=T, prior="normal", std=3e-3).stochastic.sample_prior(torch.empty(20000))
    assert abs(normal.mean()) < 1e-4 and abs(normal.std() - 3e-3) < 1e-4


def test_pooling_and_radius_follow_the_authors():
    torch.manual_seed(0)
    model = _perturbed(tiny_tmass(num_frames=T)).eval()
    tf, vf = _features(9, 7, seed=2)
    text, frames = tf["text"], vf["frames"]
    pool = model.pool_frames
    with torch.no_grad():
        want = _authors_pooling(pool, text, frames)                                 # [Nv, Nt, D]
        torch.testing.assert_close(pool(text, frames), want, rtol=1e-5, atol=1e-5)
        pairs = pool(text[:7], frames, pairwise=True)
        torch.testing.assert_close(pairs, want[torch.arange(7), torch.arange(7)], rtol=1e-5, atol=1e-5)
        q, (k, v) = pool.project_text(text), pool.project_frames(frames)
        block = pool.pooled_block(q[2:9], k[3:7], v[3:7], offset=(2, 3), tile=(4, 3))
        torch.testing.assert_close(block, want[3:7, 2:9], rtol=1e-5, atol=1e-5)
        # the radius: exp(Linear(T -> D)) of the T text-frame cosines, as their module
        eps = torch.rand(7, D)
        st, radius = model.stochastic(text[:7], frames, eps)
        lin = model.stochastic.std_branch.linear_proj
        torch.testing.assert_close(st, authors_stochastic_text(text[:7], frames, lin.weight, lin.bias, eps))
        torch.testing.assert_close(st, text[:7] + eps * radius)


def test_training_lowers_loss(tmp_path):
    ids, mask, loaded = generated_pairs(tmp_path)
    torch.manual_seed(0)
    model = tiny_tmass(num_frames=T)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, mask, loaded.video, loaded.video_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


# ---------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("legacy", [False, True])
def test_eval_50x50_kernels_equal_reference(legacy):
    torch.manual_seed(0)
    model = tiny_tmass(num_frames=T, legacy_leaky_scoring=legacy)
    model.set_selection(seed=11)
    ids, mask = _texts(50, seed=2)
    video, vmask = _videos(50, seed=2, short=(3, 17))
    kw = dict(video_batch=16, chunk_size=16, progress=False)
    fused = E.evaluate(model, ids, mask, video, vmask, **kw)
    with tk.use_backend("reference"):
        reference = E.evaluate(model, ids, mask, video, vmask, **kw)
    assert fused["sim"].shape == (50, 50)
    torch.testing.assert_close(fused["sim"], reference["sim"], rtol=1e-4, atol=1e-4)


def test_scores_do_not_depend_on_chunk_size():
    torch.manual_seed(0)
    model = _perturbed(tiny_tmass(num_frames=T)).eval()
    tf, vf = _features(45, 38, seed=3)
    sims = {c: model.similarity(tf, vf, chunk_size=c) for c in (7, 16, 128)}
    assert torch.equal(sims[7], sims[16]) and torch.equal(sims[7], sims[128])
    # and they are the op's, on the whole pooling at once, times the logit scale
    pool, lin = model.pool_frames, model.stochastic.std_branch.linear_proj
    with torch.no_grad():
        q, (k, v) = pool.project_text(tf["text"]), pool.project_frames(vf["frames"])
        pooled = pool.pooled_block(q, k, v, (0, 0))
        want, _ = tk.stochastic_max_similarity(tf["text"], vf["frames"], pooled, lin.weight, lin.bias,
                                               20, seed=model.seed)
    torch.testing.assert_close(sims[128], _scale(model) * want, rtol=1e-6, atol=1e-6)
    # another seed, other samples
    model.set_selection(seed=5)
    assert not torch.equal(model.similarity(tf, vf, chunk_size=16), sims[16])


def test_unequal_numbers_of_texts_and_videos():
    """30 captions of 12 videos (1 to 4 each) and 12 x 30 the other way: the authors'
    evaluation silently assumes as many texts as videos; ours scores every pair."""
    torch.manual_seed(0)
    model = _perturbed(tiny_tmass(num_frames=T)).eval()
    t2v = torch.tensor([i % 12 for i in range(30)])
    t2v[[0, 5, 7]] = 3                                            # an uneven number of captions
    tf, vf = _features(30, 12, seed=4)
    sim = model.similarity(tf, vf, chunk_size=8)
    assert sim.shape == (30, 12) and torch.isfinite(sim).all()
    torch.testing.assert_close(sim, model.similarity(tf, vf, chunk_size=100), rtol=0, atol=0)
    m = M.retrieval_metrics(sim, t2v)
    assert set(m) == {"t2v", "v2t"}
    tf2, vf2 = _features(12, 30, seed=5)
    assert model.similarity(tf2, vf2, chunk_size=8).shape == (12, 30)
    # the legacy scoring follows the authors' grouping of captions per video
    model.legacy_leaky_scoring = True
    legacy = model.similarity(tf, vf, chunk_size=8, text_to_video=t2v) / _scale(model)
    eps = philox_noise(model.seed, torch.arange(30), torch.arange(12), 20, D, "uniform", 1.0)
    with torch.no_grad():
        want, gap = authors_evaluation(model, tf["text"], vf["frames"], t2v, eps, return_margin=True)
    missing = torch.isnan(want)                                   # their -inf padding: NaN
    assert missing.any() and torch.equal(torch.isinf(legacy), missing)
    clear = ~missing & (gap > 1e-5)                               # no near tie in the selection
    assert clear.sum() > 0.9 * (~missing).sum()
    torch.testing.assert_close(legacy[clear], want[clear], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="text_to_video"):
        model.similarity(tf, vf)


def test_legacy_scoring_reproduces_the_authors_evaluation():
    torch.manual_seed(0)
    model = _perturbed(tiny_tmass(num_frames=T, num_samples=8, legacy_leaky_scoring=True)).eval()
    model.set_selection(seed=7)
    tf, vf = _features(20, 20, seed=6)
    got = model.similarity(tf, vf, chunk_size=6) / _scale(model)
    eps = philox_noise(7, torch.arange(20), torch.arange(20), 8, D, "uniform", 1.0)
    with torch.no_grad():
        want, gap = authors_evaluation(model, tf["text"], vf["frames"], None, eps, return_margin=True)
    clear = gap > 1e-5
    assert clear.float().mean() > 0.9
    torch.testing.assert_close(got[clear], want[clear], rtol=1e-4, atol=1e-5)
    # the diagonal (query = the video's own caption) is the intended score
    model.legacy_leaky_scoring = False
    ours = model.similarity(tf, vf, chunk_size=6) / _scale(model)
    torch.testing.assert_close(got.diag(), ours.diag(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ours)


def test_legacy_scoring_leaks_the_ground_truth():
    """Texts drawn independently of the videos: nothing to retrieve. The intended scoring
    ranks the true video at chance (R@1 ~ 1 %, median rank ~ 50 of 100); the authors' ranks it
    first far more often, because only the true video is scored with the pooling conditioned
    on the query itself."""
    torch.manual_seed(0)
    model = tiny_tmass(num_frames=T).eval()
    tf, vf = _features(100, 100, seed=0, common=1 / 0.3)
    vf["frames"] *= 0.3                                          # similar videos, as real galleries
    ours = M.retrieval_metrics(model.similarity(tf, vf, chunk_size=64))["t2v"]
    model.legacy_leaky_scoring = True
    leaky = M.retrieval_metrics(model.similarity(tf, vf, chunk_size=64))["t2v"]
    assert ours["R@1"] <= 5 and 30 <= ours["MdR"] <= 70, ours
    assert leaky["R@1"] >= 8 and leaky["MdR"] <= 15, leaky


def test_padded_frames_repeat_the_last_real_frame():
    """The authors' loader repeats the last frame of a short video: a padded slot's feature is
    the nearest real frame before it (the first real one if none precedes it)."""
    torch.manual_seed(0)
    model = tiny_tmass(num_frames=T).eval()
    video, vmask = _videos(3)
    vmask[0, 2:] = 0
    vmask[1] = torch.tensor([0, 1, 1, 0])
    repeated = video.clone()
    repeated[0, 2:] = video[0, 1]
    with torch.no_grad():
        f = model.encode_video(video, vmask)["frames"]
        full = model.encode_video(repeated, torch.ones_like(vmask))["frames"]
    assert torch.equal(f[0, 2], f[0, 1]) and torch.equal(f[0, 3], f[0, 1])
    assert torch.equal(f[1, 0], f[1, 1]) and torch.equal(f[1, 3], f[1, 2])
    torch.testing.assert_close(f[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f[2], full[2], rtol=1e-5, atol=1e-5)


def test_evaluation_calls_the_tvr_kernels_ops(monkeypatch):
    calls = []

    def spy(name):
        real = getattr(tk, name)

        def f(*a, **k):
            calls.append((name, k.get("pair_offset")))
            return real(*a, **k)
        return f

    for name in ("stochastic_max_similarity", "stochastic_text_embedding"):
        monkeypatch.setattr(tk, name, spy(name))
    model = tiny_tmass(num_frames=T).eval()
    tf, vf = _features(10, 6, seed=8)
    model.similarity(tf, vf, chunk_size=4)
    assert calls == [("stochastic_max_similarity", (i, j)) for i in (0, 4, 8) for j in (0, 4)]
    calls.clear()
    model.legacy_leaky_scoring = True
    model.similarity(tf, vf, chunk_size=4, text_to_video=torch.arange(10) % 6)
    assert {c[0] for c in calls} == {"stochastic_max_similarity", "stochastic_text_embedding"}


def test_bad_input_is_named():
    model = tiny_tmass(num_frames=T)
    video, vmask = _videos(2)
    with pytest.raises(ValueError, match="video has 3 frames, the model was built for num_frames = 4"):
        model.encode_video(video[:, :3], vmask[:, :3])
    with pytest.raises(ValueError, match=r"video_mask must be \[Bv, T\]"):
        model.encode_video(video, vmask[:, :3])
    vmask[1] = 0
    with pytest.raises(ValueError, match=r"video_mask rows \[1\] have no valid frame"):
        model.encode_video(video, vmask)
    tf, vf = _features(3, 3)
    with pytest.raises(ValueError, match=r"frame features must be \[Nv, T, D\] with T = 4"):
        model.score(tf, {"frames": vf["frames"][:, :3]})
    with pytest.raises(ValueError, match=r"text features must be \[Nt, D\] with D = 32"):
        model.score({"text": tf["text"][:, :16]}, vf)
    with pytest.raises(ValueError, match="with T = 4 frames and D = 32"):
        model.score(tf, {"frames": vf["frames"][..., :16]})
    with pytest.raises(ValueError, match="matching pairs: 3 texts but 2 videos"):
        model.training_losses(tf, {"frames": vf["frames"][:2]})
    with pytest.raises(ValueError, match=r"noise must be \[B, D\]"):
        model.training_losses(tf, vf, noise=torch.rand(3, 5))
    with pytest.raises(ValueError, match="prior must be one of"):
        tiny_tmass(prior="gaussian")
    with pytest.raises(ValueError, match="alpha"):
        tiny_tmass(alpha=-1.0)
    with pytest.raises(ValueError, match="no token selection"):
        model.set_selection(hard=True)
    model.legacy_leaky_scoring = True
    with pytest.raises(ValueError, match=r"text_to_video must be \[Nt\]"):
        model.similarity(tf, vf, text_to_video=torch.tensor([0, 1, 5]))
    with pytest.raises(RuntimeError, match="prepare_scoring"):
        model.score(tf, vf)


# ---------------------------------------------------------------------- checkpoints
def _authors_tmass_dict(model, num_frames):
    """A T-MASS training checkpoint: CLIP under ``clip.`` with Hugging Face names (and the
    ``position_ids`` buffers transformers 4.30 saved), the heads, the unused scalar."""
    g = torch.Generator().manual_seed(9)
    sd = {"clip." + k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.clip.clip.state_dict().items()}
    sd["clip.logit_scale"] = torch.tensor(3.0)
    sd["clip.text_model.embeddings.position_ids"] = torch.arange(L)[None]
    sd["clip.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    for k, v in model.pool_frames.state_dict().items():
        sd["pool_frames." + k] = torch.randn(v.shape, generator=g)
    sd["stochastic.std_branch.linear_proj.weight"] = torch.randn(D, num_frames, generator=g)
    sd["stochastic.std_branch.linear_proj.bias"] = torch.randn(D, generator=g)
    sd["stochastic.std_branch.learnable_scalar"] = torch.randn(1, generator=g)
    return {"epoch": 3, "state_dict": sd, "optimizer": {}}


def test_official_checkpoint_names():
    torch.manual_seed(0)
    model = tiny_tmass(num_frames=T)
    ckpt = _authors_tmass_dict(model, T)
    rep = load_official_checkpoint(model, ckpt, strict=True)
    assert rep.missing == [] and rep.unexpected == []
    assert sorted(rep.ignored) == ["clip.text_model.embeddings.position_ids",
                                   "clip.vision_model.embeddings.position_ids",
                                   "stochastic.std_branch.learnable_scalar"]
    sd, own = ckpt["state_dict"], model.state_dict()
    for k in ("pool_frames.cross_attn.q_proj.weight", "pool_frames.layer_norm2.bias",
              "stochastic.std_branch.linear_proj.weight"):
        assert torch.equal(own[k], sd[k]), k
    assert torch.equal(own["clip.clip.text_projection.weight"], sd["clip.text_projection.weight"])
    # the Hugging Face names under clip. are our backbone's: its text feature is CLIPModel's
    from transformers import CLIPModel
    hf = CLIPModel(model.clip.clip.config)
    hf.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("clip.") and "position_ids" not in k},
                       strict=False)
    ids, mask = _texts(3)
    with torch.no_grad():
        want = hf.get_text_features(input_ids=ids)
        want = getattr(want, "pooler_output", want)
        torch.testing.assert_close(model.encode_text(ids, mask)["text"], want, rtol=1e-5, atol=1e-5)
    # a DDP prefix is stripped; a plain state dict works as well
    plain = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}
    assert load_official_checkpoint(model, plain, strict=True).unexpected == []


def test_checkpoint_for_another_model_or_size_is_refused():
    from test_models_checkpoints import _backbone, _ts2net_dict
    from tvr_models.ts2net import TS2Net
    model = tiny_tmass(num_frames=T)
    before = model.pool_frames.linear_proj.weight.detach().clone()
    with pytest.raises(ValueError, match=r"TS2-Net checkpoint \(it has .*\) but the model is a TMASS"):
        load_official_checkpoint(model, _ts2net_dict())
    ts2net = TS2Net(_backbone(), num_frames=T, topk=3, temporal_layers=1, temporal_heads=2)
    with pytest.raises(ValueError, match=r"T-MASS checkpoint \(it has .*\) but the model is a TS2Net"):
        load_official_checkpoint(ts2net, _authors_tmass_dict(model, T))
    # a 12-frame checkpoint into a 4-frame model: refused, naming the tensor, nothing copied
    with pytest.raises(ValueError, match=r"stochastic.std_branch.linear_proj.weight: checkpoint "
                                         r"\(32, 12\) vs model \(32, 4\)"):
        load_official_checkpoint(model, _authors_tmass_dict(model, 12))
    assert torch.equal(model.pool_frames.linear_proj.weight, before)


# ---------------------------------------------------------------------- CLI
def test_cli_demo(capsys):
    assert E.main(["--demo", "--model", "tmass"]) == 0
    out = capsys.readouterr().out
    assert "t2v: R@1" in out and "skipped 1 unusable videos" in out
    model = E.build_model("tmass", tiny_tmass().clip, 4, 32, legacy_leaky_scoring=True)
    assert isinstance(model, TMASS) and model.legacy_leaky_scoring
    with pytest.raises(SystemExit):
        E.main(["--model", "tmass", "--clip", "c", "--annotations", "a", "--videos", "v", "--bank", "b"])
    assert "T-MASS has no text bank" in capsys.readouterr().err
