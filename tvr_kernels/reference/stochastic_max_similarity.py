"""T-MASS inference scoring (SPEC 5), written plainly.

For each text ``i`` and video ``j``::

    S    = [cos(text_i, frames_j,k) for k < T]            # T frame cosines
    R    = exp(radius_weight @ S + radius_bias)            # radius, a vector in R^D
    t_m  = text_i + eps_m * R          for m < M           # stochastic text samples
    c_m  = cos(t_m, pooled[j, i])
    sims[i, j] = max_m c_m,  best[i, j] = first argmax_m c_m

The noise ``eps`` is either given (``noise`` ``[Nt, Nv, M, D]``, used as is) or drawn from
the shared Philox generator keyed by the pair, never by the launch (see :func:`philox_noise`),
so every backend and every chunking of texts or videos draws the same values.

:func:`authors_stochastic_text` mirrors the authors' radius module (``LinearCosRadius`` +
``StochasticText`` of T-MASS) op by op, so a test can check our radius path against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _philox, _validate

PRIORS = ("uniform", "normal")

# Mixed into the Philox key so that this op's stream differs from other ops' streams for the
# same user seed (the four counter words are all taken by (q, m, j, i)). Every backend
# applies the same XOR: csrc/include/tvr/stochastic_max_similarity.h, triton kernel.
STREAM_KEY = 0x544D415353  # "TMASS"

# Elements of a generated noise block the reference materialises at once (bounds its memory).
_CHUNK_ELEMS = 1 << 22


def philox_key(seed: int) -> int:
    """The 64-bit Philox key this op uses for a user ``seed``."""
    return seed ^ STREAM_KEY


def check_stochastic_max_similarity_args(text, frames, pooled, radius_weight, radius_bias,
                                         num_samples, prior, std, seed, noise,
                                         pair_offset=(0, 0)) -> None:
    """Shape/type checks (shapes and Python numbers only, so it traces under compile)."""
    _validate.tensor("text", text, ndim=2, shape_doc="[Nt, D]")
    _validate.tensor("frames", frames, ndim=3, shape_doc="[Nv, T, D]")
    _validate.tensor("pooled", pooled, ndim=3, shape_doc="[Nv, Nt, D]")
    _validate.tensor("radius_weight", radius_weight, ndim=2, shape_doc="[D, T]")
    _validate.tensor("radius_bias", radius_bias, ndim=1, shape_doc="[D]")
    _validate.integer("num_samples", num_samples, min_value=1)
    _validate.choice("prior", prior, PRIORS)
    _validate.positive_finite("std", std)
    _validate.seed("seed", seed)
    if not isinstance(pair_offset, (tuple, list)) or len(pair_offset) != 2:
        raise TypeError(f"pair_offset must be a pair (text_offset, video_offset), got {pair_offset!r}")
    _validate.integer("pair_offset[0]", pair_offset[0], min_value=0)
    _validate.integer("pair_offset[1]", pair_offset[1], min_value=0)
    Nt, D = text.shape
    Nv, T, Df = frames.shape
    if D == 0:
        raise ValueError("text is [Nt, D] with D = 0: the embedding dimension must be >= 1 "
                         "(a cosine of empty vectors is undefined)")
    if Df != D:
        raise ValueError(f"frames is [Nv, T, D] = {tuple(frames.shape)} but text is [Nt, D] = "
                         f"{tuple(text.shape)}: D must agree (frames.shape[2] = {Df}, D = {D})")
    if pair_offset[0] + Nt > 2 ** 32 or pair_offset[1] + Nv > 2 ** 32 or num_samples > 2 ** 32:
        raise ValueError("global text/video indices and num_samples must be < 2**32 (they are "
                         "32-bit Philox counter words)")
    if tuple(pooled.shape) != (Nv, Nt, D):
        raise ValueError(f"pooled must be [Nv, Nt, D] = {(Nv, Nt, D)} (Nv from frames, Nt and D "
                         f"from text), got {tuple(pooled.shape)}")
    if tuple(radius_weight.shape) != (D, T):
        raise ValueError(f"radius_weight must be [D, T] = {(D, T)} (D from text, T from frames), "
                         f"got {tuple(radius_weight.shape)}")
    if tuple(radius_bias.shape) != (D,):
        raise ValueError(f"radius_bias must be [D] = {(D,)} (D from text), got "
                         f"{tuple(radius_bias.shape)}")
    tensors = dict(text=text, frames=frames, pooled=pooled, radius_weight=radius_weight,
                   radius_bias=radius_bias)
    if noise is not None:
        _validate.tensor("noise", noise, ndim=4, shape_doc="[Nt, Nv, M, D]")
        if tuple(noise.shape) != (Nt, Nv, num_samples, D):
            raise ValueError(f"noise must be [Nt, Nv, M, D] = {(Nt, Nv, num_samples, D)} "
                             f"(M = num_samples), got {tuple(noise.shape)}")
        tensors["noise"] = noise
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n} {str(d).replace('torch.', '')}" for n, d in dtypes.items())
        raise TypeError(f"all tensors must have one dtype, got {desc}")
    _validate.same_device(**tensors)


def noise_at(seed: int, i: torch.Tensor, j: torch.Tensor, m: torch.Tensor, dim: int, prior: str,
             std: float) -> torch.Tensor:
    """Prior samples ``eps[i, j, m]`` for broadcastable integer tensors ``i``, ``j``, ``m``:
    float32 of shape ``broadcast(i, j, m) + [D]``.

    Keying (shared by every backend): Philox4x32-10 with key ``seed ^ STREAM_KEY`` and counter
    ``(q, m, j, i)`` for ``q < Q = ceil(D / 4)``; output word ``l`` of counter ``q`` is element
    ``d = l * Q + q`` (the four words fill four contiguous quarters of the vector, so kernels
    read and write every per-element array contiguously). Uniform: ``unit_float``
    (``U[0, 1)``, the authors' ``torch.rand``). Normal: Box-Muller on words (0, 1) and (2, 3),
    times ``std`` in float32.
    """
    i, j, m = torch.broadcast_tensors(*(torch.as_tensor(x, dtype=torch.int64) for x in (i, j, m)))
    q = torch.arange((dim + 3) // 4, dtype=torch.int64, device=i.device)
    w = _philox.philox4x32_10(q, m[..., None], j[..., None], i[..., None], philox_key(seed))
    if prior == "uniform":
        vals = [_philox.unit_float(x) for x in w]
    else:
        z0, z1 = _philox.box_muller(w[0], w[1])
        z2, z3 = _philox.box_muller(w[2], w[3])
        vals = [z * float(std) for z in (z0, z1, z2, z3)]
    eps = torch.stack(vals, dim=-2).flatten(-2)  # [..., 4, Q] -> element l * Q + q
    return eps[..., :dim]


def philox_noise(seed: int, rows: torch.Tensor, cols: torch.Tensor, num_samples: int, dim: int,
                 prior: str, std: float) -> torch.Tensor:
    """Every sample of pairs ``(rows[a], cols[b])``: float32 ``[len(rows), len(cols), M, D]``
    (see :func:`noise_at` for the keying)."""
    m = torch.arange(num_samples, dtype=torch.int64, device=rows.device)
    return noise_at(seed, rows[:, None, None], cols[None, :, None], m[None, None, :], dim, prior, std)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half and bfloat16 compute in float32 (as the kernels do); float32/64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last dim, as the authors write it (divide by the norm, no epsilon)."""
    return (_unit(a) * _unit(b)).sum(-1)


def _radius_of_units(tn: torch.Tensor, fn: torch.Tensor, radius_weight: torch.Tensor,
                     radius_bias: torch.Tensor) -> torch.Tensor:
    """``exp(radius_weight @ S + radius_bias)`` with ``S_k = tn . fn[..., k, :]``: ``[..., D]``
    from unit texts ``tn`` ``[..., D]`` and unit frames ``fn`` ``[..., T, D]`` (broadcast).

    Written as products, sums over the last axis and one multiply-add per frame, never as a
    matmul: a matmul's blocking, and so its rounding, depends on the batch shape, which made a
    call over a chunk of texts or videos differ from one full call in the last bit. Row by row
    every entry here rounds the same for any batch shape."""
    batch = torch.broadcast_shapes(tn.shape[:-1], fn.shape[:-2])
    z = radius_bias.expand(*batch, radius_bias.shape[0])
    for k in range(fn.shape[-2]):
        z = z + (tn * fn[..., k, :]).sum(-1, keepdim=True) * radius_weight[:, k]
    return torch.exp(z)


def radius(text: torch.Tensor, frames: torch.Tensor, radius_weight: torch.Tensor,
           radius_bias: torch.Tensor) -> torch.Tensor:
    """``R[i, j] = exp(radius_weight @ S_ij + radius_bias)``: ``[Nt, Nv, D]`` from ``text``
    ``[Nt, D]``, ``frames`` ``[Nv, T, D]``, ``radius_weight`` ``[D, T]``, ``radius_bias`` ``[D]``.
    Entry ``[i, j]`` does not depend on the other texts and videos, to the bit."""
    return _radius_of_units(_unit(text)[:, None, :], _unit(frames)[None], radius_weight,
                            radius_bias)


def _noise_block(noise, seed, i0, i1, Nv, M, D, prior, std, dtype, device, pair_offset):
    if noise is not None:
        return noise[i0:i1]
    rows = torch.arange(i0, i1, device=device) + pair_offset[0]
    cols = torch.arange(Nv, device=device) + pair_offset[1]
    return philox_noise(seed, rows, cols, M, D, prior, std).to(dtype)


def stochastic_max_similarity(text, frames, pooled, radius_weight, radius_bias, num_samples=20,
                              *, prior="uniform", std=1.0, seed=None, noise=None,
                              pair_offset=(0, 0)):
    """Best-of-``M`` stochastic-text similarity of every text with every video (T-MASS).

    Args:
        text: ``[Nt, D]`` text embeddings (not necessarily normalised).
        frames: ``[Nv, T, D]`` frame embeddings.
        pooled: ``[Nv, Nt, D]``: video ``j`` pooled for text ``i`` (X-Pool).
        radius_weight: ``[D, T]``; radius_bias: ``[D]`` (the radius module's ``Linear(T, D)``).
        num_samples: ``M >= 1``.
        prior: ``"uniform"`` (``U[0, 1)``, the authors' default) or ``"normal"`` (``N(0, std^2)``).
        std: standard deviation of the normal prior (> 0; unused for uniform).
        seed: Philox seed (``None``: drawn from torch's generator). Ignored when ``noise`` is given.
        noise: optional ``[Nt, Nv, M, D]`` prior samples used as is.
        pair_offset: ``(i0, j0)``, the global index of this call's first text and first video:
            the noise of local pair ``(i, j)`` is keyed by ``(i0 + i, j0 + j)``, so scoring a
            gallery in chunks draws the noise of one call over everything and gives its entries
            bit for bit (every step rounds row by row: see :func:`_radius_of_units`).

    Returns:
        ``(sims, best)``: ``[Nt, Nv]`` in the input dtype and ``[Nt, Nv]`` int64 (first argmax;
        NaN and the first NaN sample where a sample's cosine is NaN, as ``torch.max``).
    """
    check_stochastic_max_similarity_args(text, frames, pooled, radius_weight, radius_bias,
                                         num_samples, prior, std, seed, noise, pair_offset)
    if noise is None and seed is None:
        seed = _philox.draw_seed()
    out_dtype = text.dtype
    ct = _compute_dtype(out_dtype)
    text, frames, pooled = text.to(ct), frames.to(ct), pooled.to(ct)
    radius_weight, radius_bias = radius_weight.to(ct), radius_bias.to(ct)
    noise = None if noise is None else noise.to(ct)
    Nt, D = text.shape
    Nv = frames.shape[0]
    M = num_samples
    step = max(1, _CHUNK_ELEMS // max(1, Nv * M * D))
    sims, best = [], []
    for i0 in range(0, Nt, step):
        i1 = min(Nt, i0 + step)
        R = radius(text[i0:i1], frames, radius_weight, radius_bias)            # [c, Nv, D]
        eps = _noise_block(noise, seed, i0, i1, Nv, M, D, prior, std, text.dtype, text.device,
                           pair_offset)
        t = text[i0:i1, None, None, :] + eps * R[:, :, None, :]                # [c, Nv, M, D]
        p = pooled[:, i0:i1].transpose(0, 1)[:, :, None, :]                    # [c, Nv, 1, D]
        c = _cos_rows(t, p)                                                    # [c, Nv, M]
        s, b = c.max(dim=-1)  # first maximum on ties (torch.max documents it for CPU/CUDA)
        sims.append(s)
        best.append(b)
    if Nt == 0:
        return text.new_zeros(0, Nv, dtype=out_dtype), torch.zeros(0, Nv, dtype=torch.int64,
                                                                    device=text.device)
    return torch.cat(sims).to(out_dtype), torch.cat(best)


def selected_similarity(text, frames, pooled, radius_weight, radius_bias, best, *,
                        prior="uniform", std=1.0, seed=0, noise=None, pair_offset=(0, 0)):
    """``cos(text_i + eps[i, j, best[i, j]] * R_ij, pooled[j, i])``: ``[Nt, Nv]``.

    The value of ``sims`` as a function of the five tensor inputs once ``best`` is fixed; its
    autograd is the reference backward of :func:`stochastic_max_similarity` (the max is
    differentiable almost everywhere, through the selected sample). Materialises
    ``[Nt, Nv, D]``: for tests and small inputs.
    """
    out_dtype = text.dtype
    ct = _compute_dtype(out_dtype)
    text, frames, pooled = text.to(ct), frames.to(ct), pooled.to(ct)
    radius_weight, radius_bias = radius_weight.to(ct), radius_bias.to(ct)
    Nt, D = text.shape
    Nv = frames.shape[0]
    if noise is not None:
        idx = best[:, :, None, None].expand(Nt, Nv, 1, D)
        eps = noise.to(ct).gather(2, idx)[:, :, 0]
    else:
        ii = torch.arange(Nt, device=text.device)[:, None] + pair_offset[0]
        jj = torch.arange(Nv, device=text.device)[None, :] + pair_offset[1]
        eps = noise_at(seed, ii, jj, best, D, prior, std).to(ct)
    t = text[:, None, :] + eps * radius(text, frames, radius_weight, radius_bias)
    return _cos_rows(t, pooled.transpose(0, 1)).to(out_dtype)


def stochastic_text_embedding(text, frames, radius_weight, radius_bias, best, pairs=None, *,
                              prior="uniform", std=1.0, seed=None, noise=None,
                              pair_offset=(0, 0)):
    """The selected stochastic text ``t_best = text_i + eps_best * R_ij`` of given pairs.

    Args:
        text ``[Nt, D]``, frames ``[Nv, T, D]``, radius_weight ``[D, T]``, radius_bias ``[D]``:
            as passed to :func:`stochastic_max_similarity`.
        best: ``[Nt, Nv]`` int64, the ``best`` it returned.
        pairs: ``[P, 2]`` integer ``(i, j)`` rows, or ``None`` for every pair.
        prior, std, seed, noise, pair_offset: as passed to :func:`stochastic_max_similarity`
            (``seed`` is required when ``noise`` is None: the noise is recomputed from it).

    Returns:
        ``[P, D]`` (or ``[Nt, Nv, D]`` when ``pairs`` is None) in ``text``'s dtype; its cosine
        with ``pooled[j, i]`` is ``sims[i, j]``.
    """
    _validate.tensor("text", text, ndim=2, shape_doc="[Nt, D]")
    _validate.tensor("frames", frames, ndim=3, shape_doc="[Nv, T, D]")
    Nt, D = text.shape
    Nv = frames.shape[0]
    if not isinstance(best, torch.Tensor) or best.dtype != torch.int64:
        got = best.dtype if isinstance(best, torch.Tensor) else type(best).__name__
        raise TypeError(f"best must be an int64 tensor [Nt, Nv] = {(Nt, Nv)} (the indices "
                        f"stochastic_max_similarity returned), got {got}")
    if tuple(best.shape) != (Nt, Nv):
        raise ValueError(f"best must be [Nt, Nv] = {(Nt, Nv)}, got {tuple(best.shape)}")
    M = int(noise.shape[2]) if isinstance(noise, torch.Tensor) and noise.dim() == 4 else 1
    if M == 0:  # M comes from noise here: say so, not "num_samples must be >= 1"
        raise ValueError(f"noise is [Nt, Nv, M, D] = {tuple(noise.shape)} with M = 0: it must "
                         "hold at least one sample")
    # pooled is not needed here: a broadcast stand-in of the right shape passes its checks.
    stand_in = text.new_empty(()).expand(Nv, Nt, D)
    check_stochastic_max_similarity_args(text, frames, stand_in, radius_weight, radius_bias,
                                         M, prior, std, seed, noise, pair_offset)
    if best.numel():
        lo, hi = int(best.min()), int(best.max())
        if lo < 0:
            raise ValueError(f"best must hold sample indices >= 0 (as returned by "
                             f"stochastic_max_similarity), got {lo}")
        if noise is not None and hi >= M:
            raise ValueError(f"best holds sample index {hi} but noise has M = {M}")
        if hi >= 2 ** 32:
            raise ValueError(f"best holds sample index {hi}: sample indices are 32-bit Philox "
                             "counter words (< 2**32)")
    if noise is None and seed is None:
        raise ValueError("seed is required to recompute the noise (pass the seed given to "
                         "stochastic_max_similarity)")
    full = pairs is None
    if full:
        ii, jj = torch.meshgrid(torch.arange(Nt, device=text.device),
                                torch.arange(Nv, device=text.device), indexing="ij")
        ii, jj = ii.reshape(-1), jj.reshape(-1)
    else:
        if not isinstance(pairs, torch.Tensor) or pairs.dim() != 2 or pairs.shape[1] != 2:
            raise ValueError("pairs must be an integer tensor [P, 2] of (text, video) indices")
        ii, jj = pairs[:, 0].long(), pairs[:, 1].long()
    m = best[ii, jj]
    out_dtype = text.dtype
    ct = _compute_dtype(out_dtype)
    text, frames = text.to(ct), frames.to(ct)
    radius_weight, radius_bias = radius_weight.to(ct), radius_bias.to(ct)
    R = _radius_of_units(_unit(text[ii]), _unit(frames[jj]), radius_weight, radius_bias)
    if noise is not None:
        eps = noise[ii, jj, m].to(ct)
    else:
        eps = noise_at(seed, ii + pair_offset[0], jj + pair_offset[1], m, D, prior, std).to(ct)
    out = (text[ii] + eps * R).to(out_dtype)
    return out.reshape(Nt, Nv, D) if full else out


def authors_stochastic_text(text, frames, radius_weight, radius_bias, eps):
    """Mirror of the authors' ``StochasticText`` at inference, for pairs ``(text[n], frames[n])``.

    Written op for op as their radius module computes it (normalise, repeat the text over the
    T frames, batched matmul, mean over the repeated axis, ``Linear(T, D)``, ``exp``, then
    ``text + eps * R``) so that tests compare our radius path with theirs.

    Args: text ``[N, D]``, frames ``[N, T, D]``, radius_weight ``[D, T]``, radius_bias ``[D]``,
    eps ``[N, D]``. Returns ``[N, D]``.
    """
    T = frames.shape[1]
    tn = text / text.norm(dim=-1, keepdim=True)
    fn = frames / frames.norm(dim=-1, keepdim=True)
    rep = tn.unsqueeze(1).repeat(1, T, 1)                     # [N, T, D]
    S = torch.matmul(rep, fn.permute(0, 2, 1)).mean(dim=1)    # [N, T, T] -> [N, T]
    log_var = F.linear(S, radius_weight, radius_bias)
    return text + eps * torch.exp(log_var)
