"""Loading the authors' released state dicts: synthetic dicts with exactly their names and
(tiny) shapes."""
import pytest
import torch

from test_models_clip import D, HEADS, tiny_openai_state_dict
from tvr_models.checkpoints import load_official_checkpoint
from tvr_models.clip import CLIPBackbone
from tvr_models.ts2net import TS2Net
from tvr_models.ucofia import UCoFiA

T, K, LAYERS_T, POS, WORDS = 4, 3, 1, 77, 32
P = T * (K + 1)


def _authors_clip(shift_layers=(1,)):
    sd = tiny_openai_state_dict()
    out = {}
    for k, v in sd.items():
        for i in shift_layers:   # the authors wrap the shifted layers' attention: attn.net.*
            k = k.replace(f"visual.transformer.resblocks.{i}.attn.", f"visual.transformer.resblocks.{i}.attn.net.")
        out["clip." + k] = v
    return out


def _authors_common(d=D):
    sd = {"frame_position_embeddings.weight": torch.randn(POS, d)}
    for i in range(LAYERS_T):
        p = f"transformerClip.resblocks.{i}."
        sd.update({p + "attn.in_proj_weight": torch.randn(3 * d, d), p + "attn.in_proj_bias": torch.randn(3 * d),
                   p + "attn.out_proj.weight": torch.randn(d, d), p + "attn.out_proj.bias": torch.randn(d),
                   p + "ln_1.weight": torch.randn(d), p + "ln_1.bias": torch.randn(d),
                   p + "mlp.c_fc.weight": torch.randn(4 * d, d), p + "mlp.c_fc.bias": torch.randn(4 * d),
                   p + "mlp.c_proj.weight": torch.randn(d, 4 * d), p + "mlp.c_proj.bias": torch.randn(d),
                   p + "ln_2.weight": torch.randn(d), p + "ln_2.bias": torch.randn(d)})
    return sd


def _ts2net_dict():
    sp = "visual_token_selector.score_predictor."
    sd = {**_authors_clip(), **_authors_common(),
          sp + "in_conv.0.weight": torch.randn(D), sp + "in_conv.0.bias": torch.randn(D),
          sp + "in_conv.1.weight": torch.randn(D // 2, D), sp + "out_conv.0.weight": torch.randn(D // 2, D),
          sp + "out_conv.2.weight": torch.randn(1, D // 2),
          # present in the authors' TS2-Net, unused by its forward
          "text_token_selector.score_predictor.in_conv.0.weight": torch.randn(D)}
    return sd


def _ucofia_dict():
    sp = "visual_token_selector.score_predictor."
    sd = {**_authors_clip(), **_authors_common(),
          sp + "in_conv.0.weight": torch.randn(2 * D), sp + "in_conv.0.bias": torch.randn(2 * D),
          sp + "in_conv.1.weight": torch.randn(D, 2 * D), sp + "out_conv.0.weight": torch.randn(D, 2 * D),
          sp + "out_conv.2.weight": torch.randn(1, D),
          "frame_logit_weight": torch.randn(T, T),
          "word_mat_weight": torch.randn(WORDS, WORDS), "word_mat_weight2": torch.randn(WORDS, WORDS),
          "pixel_mat_weight": torch.randn(P, P), "pixel_mat_weight2": torch.randn(P, P),
          # unused by the authors' forward
          "word_logit_weight": torch.randn(WORDS, WORDS), "frame_mat_weight": torch.randn(T, T),
          "frame_mat_weight2": torch.randn(T, T), "word_mat_weight_for_pixel": torch.randn(WORDS, WORDS)}
    for n in ("global_mat_weight", "global_mat_weight_1", "local_mat_weight", "local_mat_weight1"):
        sd[n] = torch.randn(D, D)
    return {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}  # some DDP prefixes


def _backbone():
    return CLIPBackbone.from_config(embed_dim=D, vocab_size=64, context_length=12, text_width=32, text_layers=2,
                                    text_heads=HEADS, image_size=24, patch_size=8, vision_width=48,
                                    vision_layers=2, vision_heads=HEADS, shift_layers=(1,))


def test_ts2net_official_names():
    model = TS2Net(_backbone(), num_frames=T, topk=K, temporal_layers=LAYERS_T, temporal_heads=HEADS,
                   max_positions=POS)
    sd = _ts2net_dict()
    rep = load_official_checkpoint(model, sd)
    assert rep.missing == [] and rep.unexpected == []
    assert sorted(rep.ignored) == ["clip.context_length", "clip.input_resolution", "clip.vocab_size",
                                   "text_token_selector.score_predictor.in_conv.0.weight"]
    own = dict(model.named_parameters())
    torch.testing.assert_close(own["frame_position_embeddings.weight"], sd["frame_position_embeddings.weight"])
    torch.testing.assert_close(own["transformerClip.resblocks.0.mlp.c_proj.weight"],
                               sd["transformerClip.resblocks.0.mlp.c_proj.weight"])
    torch.testing.assert_close(own["visual_token_selector.score_predictor.out_conv.2.weight"],
                               sd["visual_token_selector.score_predictor.out_conv.2.weight"])
    # the shifted layer's attention, stored as attn.net.in_proj_weight, lands on k_proj
    w = sd["clip.visual.transformer.resblocks.1.attn.net.in_proj_weight"]
    torch.testing.assert_close(own["clip.clip.vision_model.encoder.layers.1.self_attn.k_proj.weight"], w[48:96])
    torch.testing.assert_close(own["clip.clip.text_projection.weight"], sd["clip.text_projection"].t())
    # loaded backbone equals the one built from the OpenAI dict
    ref = CLIPBackbone.from_openai_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("clip.")},
                                              shift_layers=(1,), text_heads=HEADS, vision_heads=HEADS)
    img = torch.randn(2 * T, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model.clip.encode_image(img, T), ref.encode_image(img, T))


def test_ucofia_official_names():
    model = UCoFiA(_backbone(), num_frames=T, max_words=WORDS, topk=K, temporal_layers=LAYERS_T,
                   temporal_heads=HEADS, max_positions=POS)
    sd = _ucofia_dict()
    rep = load_official_checkpoint(model, sd, strict=True)
    assert rep.missing == [] and rep.unexpected == []
    assert sorted(k for k in rep.ignored if not k.startswith("clip.")) == sorted(
        ["word_logit_weight", "frame_mat_weight", "frame_mat_weight2", "word_mat_weight_for_pixel"])
    plain = {k.removeprefix("module."): v for k, v in sd.items()}
    for n in ("global_mat_weight", "pixel_mat_weight2", "frame_logit_weight", "word_mat_weight",
              "visual_token_selector.score_predictor.in_conv.1.weight"):
        torch.testing.assert_close(model.state_dict()[n], plain[n])


def test_reports_missing_and_unexpected_and_refuses_shapes():
    model = UCoFiA(_backbone(), num_frames=T, max_words=WORDS, topk=K, temporal_layers=LAYERS_T,
                   temporal_heads=HEADS, max_positions=POS)
    sd = {k.removeprefix("module."): v for k, v in _ucofia_dict().items()}
    del sd["pixel_mat_weight"]
    sd["some_new_head.weight"] = torch.zeros(3)
    sd["clip.visual.bogus"] = torch.zeros(1)
    rep = load_official_checkpoint(model, sd)
    assert rep.missing == ["pixel_mat_weight"]
    assert sorted(rep.unexpected) == ["clip.visual.bogus", "some_new_head.weight"]
    with pytest.raises(ValueError, match="strict"):
        load_official_checkpoint(model, sd, strict=True)
    # a checkpoint for 12 frames into a 4-frame model: refused, naming the tensor and shapes
    before = model.global_mat_weight.detach().clone()
    sd["frame_logit_weight"] = torch.randn(12, 12)
    sd["global_mat_weight"] = torch.randn(D, D)
    with pytest.raises(ValueError, match=r"frame_logit_weight: checkpoint \(12, 12\) vs model \(4, 4\)"):
        load_official_checkpoint(model, sd)
    torch.testing.assert_close(model.global_mat_weight, before)   # nothing copied
    # a TS2-Net score MLP into UCoFiA: refused
    with pytest.raises(ValueError, match="score_predictor"):
        load_official_checkpoint(model, _ts2net_dict())


def test_ucofia_keep_pretrained_shifted_attention():
    """The authors' UCoFiA loader misses the shifted layers' attn.net.* keys, so their
    evaluated model keeps the backbone's attention there: the named option reproduces that;
    the default loads the checkpoint's weights."""
    sd = _ucofia_dict()
    shifted = "clip.clip.vision_model.encoder.layers.1.self_attn.q_proj.weight"
    plain_layer = "clip.clip.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    got = {}
    for keep in (False, True):
        torch.manual_seed(0)
        model = UCoFiA(_backbone(), num_frames=T, max_words=WORDS, topk=K, temporal_layers=LAYERS_T,
                       temporal_heads=HEADS, max_positions=POS)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rep = load_official_checkpoint(model, sd, keep_pretrained_shifted_attention=keep)
        after = model.state_dict()
        assert not torch.equal(after[plain_layer], before[plain_layer])      # loaded either way
        got[keep] = after[shifted].clone()
        net_keys = [k for k in rep.ignored if ".attn.net." in k]
        if keep:
            assert torch.equal(after[shifted], before[shifted])
            assert len(net_keys) == 4  # in_proj and out_proj, weight and bias, of layer 1
            assert shifted in rep.missing
        else:
            assert not torch.equal(after[shifted], before[shifted]) and net_keys == []
    assert not torch.equal(got[False], got[True])
