"""TokenBinder's two-stage evaluation at feature level: cached features of Nt = 1000 texts and
a gallery of Nv = 1000 or 10000 videos -> the final [Nt, Nv] similarity, through the driver
the CLI uses (``tvr_models.evaluate.score_features``): stage 1, the broad view, in 128 x 128
blocks; stage 2, the focused view on each text's K = 10 candidates, 128 texts a chunk.
Shapes: D = 512, T = 12 frames, M = 4 indicators (3 focused-view queries), K = 10, 8 heads.

What it shows: stage 2 costs ``Nt * K`` candidate fusions whatever the gallery, so 10x the
gallery costs far less than 10x the time; only stage 1 (one ``[Nt, D] x [D, Nv]`` product
and a top-K per text) grows with ``Nv``. Providers per case:

* ``reference``: the whole two-stage evaluation. No ``tvr_kernels`` op runs at evaluation
  (the hard top-K is ``torch.topk``; the Gumbel ``tk.perturbed_topk`` is training-only), so
  there is no fused provider: it would time the same code;
* ``stage1_only`` (baseline): the broad view alone, so stage 2 = ``reference`` - this.

``tokenbinder_eval_all_pairs`` compares with the eager alternative, the focused view on every
(text, video) pair (the gallery cut into groups of K videos scored together: ``Nt * Nv``
fusions, ``Nv / K`` = 100x stage 2's at Nv = 1000). At 1000 x 1000 that takes minutes per
call on a small CPU: a heavy provider, run by ``--shapes large`` (the default run reuses its
recorded figure).
``TVR_BENCH_TB_NT`` overrides Nt of the two main cases (e.g. 200 for a quick look).

Measured (AMD EPYC, 2 shared cores, ``OMP_NUM_THREADS=1``: the other core was busy with other
jobs, and two threads on a loaded pair of cores timed 2-10x slower and erratic; 2026-11-30,
two runs): 1000 x 1000: 1.46 / 1.52 s (stage 1 alone 0.075 / 0.060 s); 1000 x 10000:
2.29 / 2.28 s (stage 1 alone 0.72 / 0.41 s): 10x the gallery, 1.5x the time. Stage 2 is
1.4-1.5 s at 1000 videos and 1.6-1.9 s at 10000: the same 10000 fusions, with the candidates
gathered from a 245 MB gallery instead of 25 MB. All pairs, 128 x 1000: 29.0 s against the
two-stage 0.225 s (129x), so about 3.8 min at 1000 x 1000 against 1.5 s.
"""
import functools
import os

import torch

from benchmarks.common import Case

NT = int(os.environ.get("TVR_BENCH_TB_NT", "1000"))
D, T, M, K, CHUNK = 512, 12, 4, 10, 128


@functools.lru_cache(maxsize=None)
def _model():
    # The towers do not run in this stage: a backbone with the real joint dim D = 512 and tiny
    # towers; the focused view at its real size.
    from tvr_models.clip import CLIPBackbone
    from tvr_models.tokenbinder import TokenBinder
    torch.manual_seed(0)
    bb = CLIPBackbone.from_config(embed_dim=D, vocab_size=64, context_length=32, text_width=32,
                                  text_layers=1, text_heads=1, image_size=32, patch_size=8,
                                  vision_width=32, vision_layers=1, vision_heads=1, shift_layers=())
    model = TokenBinder(bb, num_frames=T, num_indicators=M, num_candidates=K)
    with torch.no_grad():   # a trained delta head is not zero
        model.focused.delta[2].weight.normal_(0, 0.02)
    return model.eval()


def _inputs(nt, nv):
    def make(device):
        g = torch.Generator().manual_seed(0)
        unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
        mask = torch.ones(nv, T, dtype=torch.long)
        mask[::7, 9:] = 0   # some short videos
        return {k: v.to(device) for k, v in dict(
            broad=unit(nt, D), queries=torch.randn(nt, M - 1, D, generator=g), video=unit(nv, D),
            frames=torch.randn(nv, T, D, generator=g) * mask[..., None], mask=mask).items()}
    return make


def _feats(broad, queries, video, frames, mask):
    return {"broad": broad, "queries": queries}, {"video": video, "frames": frames, "mask": mask}


def _two_stage(**inputs):
    from tvr_models.evaluate import score_features
    model = _model().to(inputs["broad"].device)
    return score_features(model, *_feats(**inputs), chunk_size=CHUNK)


def _stage1_only(**inputs):
    from tvr_models.evaluate import score_matrix
    model = _model().to(inputs["broad"].device)
    return model.finalize(score_matrix(model, *_feats(**inputs), chunk_size=CHUNK))


@torch.no_grad()
def _all_pairs(**inputs):
    """The focused view on every pair: each text against every group of K consecutive videos."""
    model = _model().to(inputs["broad"].device)
    tf, vf = _feats(**inputs)
    sim = _stage1_only(**inputs)
    ls = model.clip.logit_scale.exp()
    nt, nv = sim.shape
    for i in range(0, nt, CHUNK):
        q = tf["queries"][i:i + CHUNK]
        for j in range(0, nv, K):
            frames, mask = vf["frames"][j:j + K], vf["mask"][j:j + K]
            delta = model.focused(q, frames.expand(len(q), -1, -1, -1), mask.expand(len(q), -1, -1))
            sim[i:i + CHUNK, j:j + K] += ls * delta
    return sim


def _case(op, name, nt, nv, baselines, **kw):
    return Case(op=op, name=name, make_inputs=_inputs(nt, nv), modes=("fwd",), backends=(),
                compile_reference=False, reference=_two_stage, baselines=baselines,
                reference_sources=("tvr_models/tokenbinder.py", "tvr_models/evaluate.py"), **kw)


_STAGE1 = {"stage1_only": lambda inputs: _stage1_only}
CASES = [
    _case("tokenbinder_eval", f"{NT}x1000 D{D} T{T} K{K}", NT, 1000, _STAGE1, warmup=1, min_reps=3,
          note="two-stage: broad view over all pairs, focused view on Nt*K candidates"),
    _case("tokenbinder_eval", f"{NT}x10000 D{D} T{T} K{K}", NT, 10000, _STAGE1, warmup=1, min_reps=3,
          note="10x the gallery: only stage 1 grows"),
    _case("tokenbinder_eval_all_pairs", f"{NT}x1000 D{D} T{T} K{K}", NT, 1000,
          {"all_pairs": lambda inputs: _all_pairs}, warmup=0, min_reps=1, heavy=("all_pairs",),
          note="the focused view on every pair: Nv/K = 100x stage 2's fusions"),
    _case("tokenbinder_eval", f"16x40 D{D} T{T} K{K}", 16, 40, _STAGE1, shapes=("small",)),
]
