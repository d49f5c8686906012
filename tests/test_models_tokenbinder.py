"""TokenBinder at tiny sizes: forward/loss/backward (through the Gumbel candidate selection),
training lowers the loss, the two-stage evaluation (kernels equal references, chunking,
cost Nt*K, equal to scoring the candidates directly), the text encoder's indicators, bad
inputs, and another model's state dict."""
import numpy as np
import pytest
import torch

import tvr_kernels as tk
from tvr_models import evaluate as E
from tvr_models.checkpoints import identify_model, load_official_checkpoint
from tvr_models.tokenbinder import TokenBinder, tiny_tokenbinder
from tvr_models.ts2net import tiny_ts2net
from tvr_models.ucofia import tiny_ucofia
from model_inputs import generated_pairs, texts, videos

T, L, K = 4, 32, 3
VOCAB = 512            # a small vocabulary keeps the optimiser step on the token embedding cheap


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # At these tiny sizes intra-op threads only add synchronisation; on a machine whose cores
    # are busy with other work, each parallel region then waits for a descheduled thread and
    # this file ran 2.5 s -> 57 s (training test) with two threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _texts(n, seed=0, max_len=12):
    return texts(n, seed, max_len, vocab=VOCAB)


_videos = videos


def _tiny(**kw):
    return tiny_tokenbinder(num_frames=T, vocab_size=VOCAB, **kw)


def _live(model):
    """The delta MLP's output layer starts at zero (the focused view then changes nothing and
    passes no gradient back): give it weights, as training would."""
    with torch.no_grad():
        model.focused.delta[2].weight.normal_(0, 0.5)
        model.focused.delta[2].bias.normal_(0, 0.1)
    return model


def _features(nt, nv, d=32, t=T, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    mask = torch.ones(nv, t, dtype=torch.long)
    mask[::5, t // 2:] = 0
    frames = torch.randn(nv, t, d, generator=g) * mask[..., None]
    return ({"broad": unit(nt, d), "queries": torch.randn(nt, m - 1, d, generator=g)},
            {"video": unit(nv, d), "frames": frames, "mask": mask})


def test_forward_loss_backward(monkeypatch):
    model = _live(_tiny())
    model.set_selection(seed=3)
    calls, through_selection = [], []
    real = tk.perturbed_topk

    def spy(scores, *a, **k):
        calls.append(k)
        scores = scores * 1.0          # a node whose only consumer is the op: its grad is the op's
        scores.register_hook(through_selection.append)
        return real(scores, *a, **k)

    monkeypatch.setattr(tk, "perturbed_topk", spy)
    ids, mask = _texts(6)
    video, vmask = _videos(6, short=(1,))
    parts = model.losses(model.encode_text(ids, mask), model.encode_video(video, vmask))
    assert set(parts) == {"broad", "focus", "loss"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in parts.values())
    torch.testing.assert_close(parts["loss"], parts["broad"] + parts["focus"])
    parts["loss"].backward()
    assert calls and calls[0]["distribution"] == "gumbel" and not calls[0]["hard"]
    assert through_selection and through_selection[0].abs().sum() > 0      # gradient through the top-K
    named = dict(model.named_parameters())
    for n in ["query_indicators", "focused.slot_embedding", "focused.attn.in_proj_weight",
              "focused.mlp.0.weight", "focused.delta.0.weight", "focused.delta.2.weight",
              "clip.clip.vision_model.encoder.layers.1.self_attn.q_proj.weight",
              "clip.clip.text_model.encoder.layers.0.mlp.fc1.weight", "clip.clip.logit_scale"]:
        g = named[n].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
    # forward() is the same loss
    model.set_selection(seed=3)
    torch.testing.assert_close(model(ids, mask, video, vmask), parts["loss"])


def test_training_step_kernels_equal_reference():
    """The Gumbel top-K of training: the fused backend's loss and gradients equal the reference's."""
    model = _live(_tiny())
    ids, mask = _texts(6, seed=4)
    video, vmask = _videos(6, seed=4)
    out = {}
    for backend in ("cpp", "reference"):
        model.zero_grad()
        model.set_selection(seed=7)
        with tk.use_backend(backend):
            loss = model(ids, mask, video, vmask)
            loss.backward()
        out[backend] = (loss.detach(), model.query_indicators.grad.clone(),
                        model.focused.attn.in_proj_weight.grad.clone())
    for a, b in zip(out["cpp"], out["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_training_lowers_loss(tmp_path):
    ids, mask, loaded = generated_pairs(tmp_path, vocab=VOCAB)
    torch.manual_seed(0)
    model = _tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, focus = [], []
    for step in range(30):
        model.set_selection(seed=step)
        parts = model.losses(model.encode_text(ids, mask), model.encode_video(loaded.video, loaded.video_mask))
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
        focus.append(parts["focus"].item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert np.mean(focus[-3:]) < 0.5 * np.mean(focus[:3]), focus
    assert model.focused.delta[2].weight.abs().sum() > 0          # the focused view did learn


@pytest.mark.parametrize("token_shift", [False, True])
def test_eval_50x50_kernels_equal_reference(token_shift):
    torch.manual_seed(0)
    model = _live(_tiny())
    model.token_shift = token_shift
    model.set_selection(seed=11)                  # training-time only: evaluation selects hard
    ids, mask = _texts(50, seed=2)
    video, vmask = _videos(50, seed=2, short=(3, 17))
    kw = dict(text_to_video=None, video_batch=16, chunk_size=16, progress=False)
    fused = E.evaluate(model, ids, mask, video, vmask, **kw)
    with tk.use_backend("reference"):
        reference = E.evaluate(model, ids, mask, video, vmask, **kw)
    assert fused["sim"].shape == (50, 50) and torch.isfinite(fused["sim"]).all()
    torch.testing.assert_close(fused["sim"], reference["sim"], rtol=1e-4, atol=1e-4)
    assert fused["metrics"] == reference["metrics"]
    unchunked = E.evaluate(model, ids, mask, video, vmask, **{**kw, "chunk_size": 1000})
    torch.testing.assert_close(unchunked["sim"], fused["sim"], rtol=1e-5, atol=1e-5)
    again = E.evaluate(model, ids, mask, video, vmask, **kw)
    assert torch.equal(again["sim"], fused["sim"])                 # deterministic


def test_two_stage_equals_direct_and_costs_nt_times_k(capsys):
    """Final = broad + delta at each text's top-K (the delta of all K candidates scored
    together), broad elsewhere; the focused view sees Nt * K candidates whatever Nv."""
    torch.manual_seed(0)
    model = _live(_tiny()).eval()
    ls = model.clip.logit_scale.exp()
    for nv in (40, 400):
        tf, vf = _features(20, nv, seed=nv)
        seen = []
        h = model.focused.register_forward_hook(lambda m, a, o: seen.append(a[1].shape[:2]))
        sim = model.similarity(tf, vf, chunk_size=6, progress=True)
        h.remove()
        assert sum(b * k for b, k in seen) == 20 * K and all(k == K for _, k in seen)
        with torch.no_grad():
            broad = ls * tf["broad"] @ vf["video"].t()
            idx = torch.topk(broad, K).indices.sort(-1).values
            delta = model.focused(tf["queries"], vf["frames"][idx], vf["mask"][idx])
        want = broad.scatter_add(1, idx, ls * delta)
        torch.testing.assert_close(sim, want, rtol=1e-5, atol=1e-5)
        outside = torch.ones_like(sim, dtype=torch.bool).scatter(1, idx, False)
        torch.testing.assert_close(sim[outside], broad[outside], rtol=1e-6, atol=1e-6)
    assert "focused view" in capsys.readouterr().err                  # the progress bar
    # a gallery smaller than K: every video is a candidate
    tf, vf = _features(3, 2)
    assert model.similarity(tf, vf).shape == (3, 2)


def test_selection_slot_order_matches_the_op():
    scores = torch.randn(7, 30)
    idx = TokenBinder.select_candidates(scores, 5)
    assert torch.equal(tk.perturbed_topk(scores, 5, hard=True).argmax(-1), idx)


def test_indicators_follow_the_caption():
    """Indicators sit after EOT: the caption's own features are CLIP's, the indicators see
    the caption, and the padding length is irrelevant."""
    torch.manual_seed(0)
    model = _tiny().eval()
    ids, mask = _texts(4, seed=3)
    with torch.no_grad():
        a = model.encode_text(ids, mask)
        b = model.encode_text(ids[:, :20], mask[:, :20])              # less padding
        torch.testing.assert_close(a["broad"], b["broad"])
        torch.testing.assert_close(a["queries"], b["queries"])
        changed = ids.clone()
        changed[0, 1] += 1                                             # a caption token of text 0
        c = model.encode_text(changed, mask)
        assert not torch.allclose(c["broad"][0], a["broad"][0])
        torch.testing.assert_close(c["broad"][1:], a["broad"][1:])
        # the EOT (sentence) feature is plain CLIP's: the causal mask hides the indicators
        plain, _ = model.clip.encode_text(ids)
        n = int(ids.argmax(-1).max()) + 1 + model.num_indicators
        emb = model.clip.clip.text_model.embeddings.token_embedding(ids[:, :n]).clone()
        slots = ids.argmax(-1)[:, None] + 1 + torch.arange(model.num_indicators)
        emb.scatter_(1, slots[..., None].expand(-1, -1, emb.shape[-1]),
                     model.query_indicators.expand(4, -1, -1))
        sentence, _ = model.clip.encode_text(ids[:, :n], inputs_embeds=emb)
        torch.testing.assert_close(sentence, plain)


def test_bad_inputs_name_the_problem():
    model = _tiny()
    video, vmask = _videos(2)
    with pytest.raises(ValueError, match="3 frames, the model was built for num_frames = 4"):
        model.encode_video(video[:, :3], vmask[:, :3])
    with pytest.raises(ValueError, match=r"video_mask must be \[Bv, T\]"):
        model.encode_video(video, vmask[:, :3])
    with pytest.raises(ValueError, match=r"video must be \[Bv, T, 3, H, W\]"):
        model.encode_video(video[0], vmask)
    tf, vf = _features(3, 5)
    with pytest.raises(ValueError, match=r"text_feats\['broad'\] must be \[Nt, D\] with D = 32, got \(3, 16\)"):
        model.score({**tf, "broad": tf["broad"][:, :16]}, vf)
    with pytest.raises(ValueError, match=r"video_feats\['frames'\] must be \[Nv, T, D\]"):
        model.score(tf, {**vf, "frames": vf["frames"][:4]})
    with pytest.raises(ValueError, match=r"text_feats\['queries'\].*num_indicators M = 4"):
        model.rerank(torch.zeros(3, 5), {**tf, "queries": tf["queries"][:, :2]}, vf)
    with pytest.raises(ValueError, match=r"sim must be \[Nt, Nv\] = \[3, 5\]"):
        model.rerank(torch.zeros(3, 4), tf, vf)
    ids, mask = _texts(2)
    long_ids = torch.randint(1, 400, (1, L))
    long_ids[0, -1] = VOCAB - 1
    with pytest.raises(ValueError, match="plus 4 query indicators needs 36 positions"):
        model.encode_text(long_ids, torch.ones_like(long_ids))
    with pytest.raises(ValueError, match="2 captions but video 3 videos"):
        model(ids, mask, *_videos(3))
    bb = model.clip
    with pytest.raises(ValueError, match="num_indicators must be >= 2"):
        TokenBinder(bb, num_indicators=1)
    with pytest.raises(ValueError, match="focus_heads 3 must divide"):
        TokenBinder(bb, focus_heads=3)
    with pytest.raises(ValueError, match="topk_gradient must be one of"):
        TokenBinder(bb, focus_heads=2, topk_gradient="exact")


def test_state_dicts_of_other_models_are_refused():
    model = _tiny()
    ts2 = tiny_ts2net(num_frames=T, vocab_size=VOCAB).state_dict()
    assert identify_model(ts2) == "TS2-Net"
    assert identify_model(tiny_ucofia(num_frames=T, vocab_size=VOCAB).state_dict()) == "UCoFiA"
    with pytest.raises(ValueError, match="state_dict is a TS2-Net state dict"):
        model.load_state_dict(ts2)
    with pytest.raises(ValueError, match="state_dict is a TS2-Net state dict"):
        model.load_state_dict(ts2, strict=False)
    with pytest.raises(ValueError, match="state_dict is a UCoFiA state dict"):
        model.load_state_dict(tiny_ucofia(num_frames=T, vocab_size=VOCAB).state_dict())
    with pytest.raises(ValueError, match="TokenBinder has no official checkpoint and this state dict "
                                         "is a TS2-Net's"):
        load_official_checkpoint(model, ts2)
    other = TokenBinder(model.clip, num_frames=T, num_candidates=5, focus_heads=2).state_dict()
    with pytest.raises(ValueError, match=r"other sizes:(.|\n)*focused.slot_embedding.*num_candidates"):
        model.load_state_dict(other)
    # its own state dict round-trips, also as saved from DistributedDataParallel
    twin = _tiny()
    twin.load_state_dict({"module." + k: v for k, v in _live(model).state_dict().items()})
    assert torch.equal(twin.focused.delta[2].weight, model.focused.delta[2].weight)


def test_demo_cli(capsys):
    assert E.main(["--demo", "--model", "tokenbinder"]) == 0
    out = capsys.readouterr().out
    assert "texts 8  videos 8" in out and "R@1" in out and "skipped 1" in out


def test_focused_attention_equals_multihead_attention():
    """The reordered products of FocusedView.attend are nn.MultiheadAttention's function."""
    torch.manual_seed(0)
    view = _tiny().focused
    with torch.no_grad():
        view.attn.in_proj_bias.normal_()          # nonzero biases, so their handling is checked
        q, kv = torch.randn(5, 3, 32), torch.randn(5, 12, 32)
        ignore = torch.zeros(5, 12, dtype=torch.bool)
        ignore[1, 6:] = True
        want = view.attn(q, kv, kv, key_padding_mask=ignore, need_weights=False)[0]
        torch.testing.assert_close(view.attend(q, kv, ignore), want, rtol=1e-5, atol=1e-5)


def test_benchmark_stages_run_at_small_sizes():
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks import bench_tokenbinder_eval as b
    inputs = b._inputs(12, 40)("cpu")
    full, broad, every = b._two_stage(**inputs), b._stage1_only(**inputs), b._all_pairs(**inputs)
    assert full.shape == broad.shape == every.shape == (12, 40)
    changed = (full != broad).sum(1)
    assert (changed <= b.K).all() and changed.sum() > 0             # stage 2 touches top-K only
    assert ((every != broad).sum(1) > b.K).all()                      # all pairs touch every video


def test_cli_checkpoint(tmp_path, monkeypatch):
    """``--model tokenbinder --checkpoint``: another model's state dict is refused by name,
    a TokenBinder's loads (the run then stops at the tokenizer, which this test replaces)."""
    from tvr_models.clip import CLIPBackbone
    from tvr_models.tokenizer import ClipTokenizer
    from tvr_models.ts2net import TINY_CLIP

    def backbone(path, **kw):
        torch.manual_seed(0)
        return CLIPBackbone.from_config(**{**TINY_CLIP, "vocab_size": VOCAB})

    class Stop(Exception):
        pass

    def tokenizer(path, **kw):
        raise Stop

    monkeypatch.setattr(CLIPBackbone, "from_pretrained", staticmethod(backbone))
    monkeypatch.setattr(ClipTokenizer, "from_pretrained", staticmethod(tokenizer))
    args = ["--model", "tokenbinder", "--clip", "clip", "--annotations", "a.csv", "--videos", "v",
            "--frames", str(T), "--checkpoint"]
    torch.save(tiny_ts2net(num_frames=T, vocab_size=VOCAB).state_dict(), tmp_path / "ts2net.pt")
    with pytest.raises(ValueError, match="state_dict is a TS2-Net state dict"):
        E.main(args + [str(tmp_path / "ts2net.pt")])
    own = E.build_model("tokenbinder", backbone(None), T, L)
    torch.save(own.state_dict(), tmp_path / "tokenbinder.pt")
    with pytest.raises(Stop):
        E.main(args + [str(tmp_path / "tokenbinder.pt")])
