"""The evaluation scoring stage of UCoFiA and TS2-Net at MSR-VTT 1k-A size: cached features
of 1000 texts and 1000 videos -> the final [1000, 1000] similarity matrix.

Both providers run the same driver (``tvr_models.evaluate.score_features``, 128 x 128 blocks):
``reference`` forces every op onto its pure-PyTorch reference (``tk.use_backend("reference")``,
e.g. UCoFiA's Bi-ISA materialising each block's ``[128, 32, 128, 48]`` word-patch tensor), the
fused providers run the library's kernels. UCoFiA also scores a bank of 1000 texts for the
Sinkhorn bias (the authors use the training captions; the bank size is an input here).
Shapes: D = 512, T = 12 frames, L = 32 words, P = 48 selected tokens.
``TVR_BENCH_EVAL_N`` overrides N (e.g. 200 for a quick look).
"""
import functools
import os

import torch

from benchmarks.common import Case

N = int(os.environ.get("TVR_BENCH_EVAL_N", "1000"))
D, T, L, P, CHUNK = 512, 12, 32, 48, 128


@functools.lru_cache(maxsize=None)
def _model(name: str):
    # Only the scoring head matters here: a backbone with the real joint dim D = 512 but a
    # tiny tower (the towers are not run in this stage).
    from tvr_models.clip import CLIPBackbone
    from tvr_models.ts2net import TS2Net
    from tvr_models.ucofia import UCoFiA
    torch.manual_seed(0)
    bb = CLIPBackbone.from_config(embed_dim=D, vocab_size=64, context_length=L, text_width=32, text_layers=1,
                                  text_heads=1, image_size=32, patch_size=8, vision_width=32,
                                  vision_layers=1, vision_heads=1, shift_layers=())
    model = TS2Net(bb, num_frames=T) if name == "ts2net" else UCoFiA(bb, num_frames=T, max_words=L)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mat_weight") or "mat_weight" in n or n == "frame_logit_weight":
                p.add_(0.01 * torch.randn_like(p))   # trained weights are near, not at, the identity
    return model.eval()


def _unit(*shape, device):
    return torch.nn.functional.normalize(torch.randn(*shape, device=device), dim=-1)


def _ucofia_inputs(n):
    def make(device):
        return dict(sentence=_unit(n, D, device=device), words=_unit(n, L, D, device=device),
                    bank_sentence=_unit(n, D, device=device), bank_words=_unit(n, L, D, device=device),
                    video=_unit(n, D, device=device), frames=_unit(n, T, D, device=device),
                    patches=torch.randn(n, P, D, device=device) * 0.05)
    return make


def _ucofia_stage(sentence, words, bank_sentence, bank_words, video, frames, patches):
    from tvr_models.evaluate import score_features
    model = _model("ucofia").to(sentence.device)
    return score_features(model, {"sentence": sentence, "words": words},
                          {"video": video, "frames": frames, "patches": patches},
                          {"sentence": bank_sentence, "words": bank_words}, chunk_size=CHUNK)


def _ts2net_inputs(n):
    def make(device):
        mask = torch.ones(n, T, dtype=torch.long, device=device)
        mask[::7, 9:] = 0   # some short videos
        return dict(sentence=torch.randn(n, D, device=device), frames=torch.randn(n, T, D, device=device),
                    mask=mask)
    return make


def _ts2net_stage(sentence, frames, mask):
    from tvr_models.evaluate import score_features
    model = _model("ts2net").to(sentence.device)
    return score_features(model, {"sentence": sentence}, {"frames": frames, "mask": mask}, chunk_size=CHUNK)


def _with_references(stage):
    def run(**inputs):
        import tvr_kernels as tk
        with tk.use_backend("reference"):
            return stage(**inputs)
    return run


def _sources(model):
    """The model code the reference stage runs: its scoring head and the evaluation driver."""
    return (f"tvr_models/{model}.py", "tvr_models/_modules.py", "tvr_models/_ops.py", "tvr_models/evaluate.py")


def _cases(n, shapes):
    big = n * n > 128 * 128
    return [
        Case(op="ucofia_eval_scoring", name=f"{n}x{n} (+{n} bank) D{D} L{L} P{P}", make_inputs=_ucofia_inputs(n),
             modes=("fwd",), compile_reference=False, reference=_with_references(_ucofia_stage),
             fused=_ucofia_stage, note="features -> similarity, Sinkhorn bias included",
             warmup=0 if big else 1, min_reps=1 if big else 3, shapes=shapes,
             heavy=("reference",) if big else (),   # minutes per call at 1000 x 1000
             reference_sources=_sources("ucofia")),
        Case(op="ts2net_eval_scoring", name=f"{n}x{n} D{D} T{T}", make_inputs=_ts2net_inputs(n),
             modes=("fwd",), compile_reference=False, reference=_with_references(_ts2net_stage),
             fused=_ts2net_stage, note="no tvr op in this stage: fused == reference (a floor check)",
             shapes=shapes, reference_sources=_sources("ts2net")),
    ]


CASES = _cases(N, ("paper",)) + _cases(16, ("small",))
