"""CLIP backbone: OpenAI state-dict conversion against a plain re-implementation of OpenAI
CLIP's forward, and the placement of token shift."""
import pytest
import torch
import torch.nn.functional as F

import tvr_kernels.reference as ref
from tvr_models.clip import CLIPBackbone, ShiftedLayerNorm, convert_openai_state_dict

W_T, W_V, D, L_CTX, VOCAB, PATCH, RES, LAYERS = 32, 48, 16, 12, 64, 8, 24, 2
HEADS = 2


def _block(prefix, w):
    return {
        f"{prefix}attn.in_proj_weight": torch.randn(3 * w, w) * 0.1,
        f"{prefix}attn.in_proj_bias": torch.randn(3 * w) * 0.1,
        f"{prefix}attn.out_proj.weight": torch.randn(w, w) * 0.1,
        f"{prefix}attn.out_proj.bias": torch.randn(w) * 0.1,
        f"{prefix}ln_1.weight": 1 + 0.1 * torch.randn(w), f"{prefix}ln_1.bias": 0.1 * torch.randn(w),
        f"{prefix}mlp.c_fc.weight": torch.randn(4 * w, w) * 0.1, f"{prefix}mlp.c_fc.bias": torch.randn(4 * w) * 0.1,
        f"{prefix}mlp.c_proj.weight": torch.randn(w, 4 * w) * 0.1, f"{prefix}mlp.c_proj.bias": torch.randn(w) * 0.1,
        f"{prefix}ln_2.weight": 1 + 0.1 * torch.randn(w), f"{prefix}ln_2.bias": 0.1 * torch.randn(w),
    }


def tiny_openai_state_dict():
    """A random OpenAI-format ViT CLIP at tiny size, with OpenAI's exact key names."""
    sd = {
        "positional_embedding": torch.randn(L_CTX, W_T) * 0.1,
        "text_projection": torch.randn(W_T, D) * 0.2,
        "logit_scale": torch.tensor(4.6052),
        "token_embedding.weight": torch.randn(VOCAB, W_T) * 0.1,
        "ln_final.weight": 1 + 0.1 * torch.randn(W_T), "ln_final.bias": 0.1 * torch.randn(W_T),
        "visual.class_embedding": torch.randn(W_V) * 0.1,
        "visual.positional_embedding": torch.randn((RES // PATCH) ** 2 + 1, W_V) * 0.1,
        "visual.proj": torch.randn(W_V, D) * 0.2,
        "visual.conv1.weight": torch.randn(W_V, 3, PATCH, PATCH) * 0.1,
        "visual.ln_pre.weight": 1 + 0.1 * torch.randn(W_V), "visual.ln_pre.bias": 0.1 * torch.randn(W_V),
        "visual.ln_post.weight": 1 + 0.1 * torch.randn(W_V), "visual.ln_post.bias": 0.1 * torch.randn(W_V),
        "input_resolution": torch.tensor(RES), "context_length": torch.tensor(L_CTX),
        "vocab_size": torch.tensor(VOCAB),
    }
    for i in range(LAYERS):
        sd.update(_block(f"transformer.resblocks.{i}.", W_T))
        sd.update(_block(f"visual.transformer.resblocks.{i}.", W_V))
    return sd


# ---- a plain OpenAI CLIP forward, written from the model's definition -----------------------
def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)


def _resblock(x, sd, p, heads, mask=None, shift_frames=None):
    # x: [B, N, W]
    b, n, w = x.shape
    h = _ln(x, sd, p + "ln_1")
    if shift_frames is not None:
        h = ref.token_shift(h, shift_frames)
    qkv = h @ sd[p + "attn.in_proj_weight"].t() + sd[p + "attn.in_proj_bias"]
    q, k, v = qkv.split(w, dim=-1)
    q, k, v = (t.reshape(b, n, heads, w // heads).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / (w // heads) ** 0.5
    if mask is not None:
        att = att + mask
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
    x = x + o @ sd[p + "attn.out_proj.weight"].t() + sd[p + "attn.out_proj.bias"]
    m = _ln(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"]
    m = m * torch.sigmoid(1.702 * m)                       # QuickGELU
    return x + m @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]


def openai_encode_text(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(LAYERS):
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", HEADS, mask)
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ sd["text_projection"]


def openai_encode_image_tokens(sd, img, shift_frames=None, shift_layers=()):
    x = F.conv2d(img, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(LAYERS):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", HEADS,
                      shift_frames=shift_frames if i in shift_layers else None)
    return _ln(x, sd, "visual.ln_post") @ sd["visual.proj"]


def _ids(b, n):
    ids = torch.randint(1, VOCAB - 2, (b, n))
    lengths = torch.randint(2, n + 1, (b,))
    for i, ln in enumerate(lengths.tolist()):
        ids[i, 0] = VOCAB - 2
        ids[i, ln - 1] = VOCAB - 1
        ids[i, ln:] = 0
    return ids


def test_openai_conversion_matches_plain_forward():
    sd = tiny_openai_state_dict()
    bb = CLIPBackbone.from_openai_state_dict(sd, shift_layers=(), text_heads=HEADS, vision_heads=HEADS)
    ids = _ids(5, L_CTX)
    img = torch.randn(3, 3, RES, RES)
    with torch.no_grad():
        sent, words = bb.encode_text(ids)
        tokens = bb.encode_image(img)
    torch.testing.assert_close(sent, openai_encode_text(sd, ids), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokens, openai_encode_image_tokens(sd, img), rtol=1e-4, atol=1e-5)
    # CLS feature = OpenAI's encode_image output
    assert words.shape == (5, L_CTX, D) and tokens.shape == (3, (RES // PATCH) ** 2 + 1, D)
    torch.testing.assert_close(bb.logit_scale.data, sd["logit_scale"])


def test_token_shift_on_layernorm1_output():
    sd = tiny_openai_state_dict()
    bb = CLIPBackbone.from_openai_state_dict(sd, shift_layers=(1,), text_heads=HEADS, vision_heads=HEADS)
    assert isinstance(bb.clip.vision_model.encoder.layers[1].layer_norm1, ShiftedLayerNorm)
    assert not isinstance(bb.clip.vision_model.encoder.layers[0].layer_norm1, ShiftedLayerNorm)
    # parameter names unchanged by the wrapper (checkpoints keep loading)
    assert "vision_model.encoder.layers.1.layer_norm1.weight" in bb.clip.state_dict()
    T = 3
    img = torch.randn(2 * T, 3, RES, RES)
    with torch.no_grad():
        got = bb.encode_image(img, num_frames=T)
        unshifted = bb.encode_image(img)
    want = openai_encode_image_tokens(sd, img, shift_frames=T, shift_layers=(1,))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, unshifted, atol=1e-4)   # the shift did something
    # the wrapper's frame count is reset after the call
    assert bb.clip.vision_model.encoder.layers[1].layer_norm1.num_frames is None


def test_conversion_errors_and_authors_attn_net_names():
    sd = tiny_openai_state_dict()
    # TS2-Net stores the shifted layers' attention under attn.net.*
    sd2 = {k.replace("visual.transformer.resblocks.1.attn.", "visual.transformer.resblocks.1.attn.net."): v
           for k, v in sd.items()}
    a = convert_openai_state_dict(sd)
    b = convert_openai_state_dict(sd2)
    assert a.keys() == b.keys()
    with pytest.raises(KeyError, match="bogus"):
        convert_openai_state_dict({**sd, "visual.bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="shift layer 5"):
        CLIPBackbone.from_openai_state_dict(sd, shift_layers=(5,), text_heads=HEADS, vision_heads=HEADS)


def test_from_pretrained_local_directory(tmp_path):
    bb = CLIPBackbone.from_config(embed_dim=8, vocab_size=40, context_length=8, text_width=16,
                                  text_layers=1, text_heads=2, image_size=24, patch_size=8,
                                  vision_width=16, vision_layers=2, vision_heads=2, shift_layers=(1,))
    bb.clip.save_pretrained(tmp_path)
    bb2 = CLIPBackbone.from_pretrained(str(tmp_path), shift_layers=(1,))
    img = torch.randn(4, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(img, num_frames=2), bb2.encode_image(img, num_frames=2))
    with pytest.raises(OSError):
        CLIPBackbone.from_pretrained(str(tmp_path / "missing"))
