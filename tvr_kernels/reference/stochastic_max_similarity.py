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
# same user seed (the four counter words are all taken by (d // 4, m, j, i)). Every backend
# applies the same XOR: csrc/include/tvr/stochastic_max_similarity.h, triton kernel.
STREAM_KEY = 0x544D415353  # "TMASS"

# Elements of a generated noise block the reference materialises at once (bounds its memory).
_CHUNK_ELEMS = 1 << 22


def philox_key(seed: int) -> int:
    """The 64-bit Philox key this op uses for a user ``seed``."""
    return seed ^ STREAM_KEY


def check_stochastic_max_similarity_args(text, frames, pooled, radius_weight, radius_bias,
                                         num_samples, prior, std, seed, noise) -> None:
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
    Nt, D = text.shape
    Nv, T, Df = frames.shape
    if Df != D:
        raise ValueError(f"frames is [Nv, T, D] = {tuple(frames.shape)} but text is [Nt, D] = "
                         f"{tuple(text.shape)}: D must agree (frames.shape[2] = {Df}, D = {D})")
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


def philox_noise(seed: int, rows: torch.Tensor, cols: torch.Tensor, num_samples: int, dim: int,
                 prior: str, std: float, device=None) -> torch.Tensor:
    """The prior samples of pairs ``(rows[a], cols[b])``: float32 ``[len(rows), len(cols), M, D]``.

    Keying (shared by every backend): Philox4x32-10 with key ``seed ^ STREAM_KEY`` and counter
    ``(q, m, j, i)`` for ``q < Q = ceil(D / 4)``; output word ``l`` of counter ``q`` is element
    ``d = l * Q + q`` (the four words fill four contiguous quarters of the vector, so kernels
    read and write every per-element array contiguously). Uniform: ``unit_float``
    (``U[0, 1)``, the authors' ``torch.rand``). Normal: Box-Muller on words (0, 1) -> elements
    (4q, 4q+1) and words (2, 3) -> (4q+2, 4q+3), times ``std`` in float32.
    """
    q = torch.arange((dim + 3) // 4, dtype=torch.int64, device=device)
    m = torch.arange(num_samples, dtype=torch.int64, device=device)
    r = rows.to(torch.int64)
    c = cols.to(torch.int64)
    w = _philox.philox4x32_10(q[None, None, None, :], m[None, None, :, None],
                              c[None, :, None, None], r[:, None, None, None], philox_key(seed))
    if prior == "uniform":
        vals = [_philox.unit_float(x) for x in w]
    else:
        z0, z1 = _philox.box_muller(w[0], w[1])
        z2, z3 = _philox.box_muller(w[2], w[3])
        vals = [z * float(std) for z in (z0, z1, z2, z3)]
    eps = torch.stack(vals, dim=-2).flatten(-2)  # [.., 4, Q] -> element l * Q + q
    return eps[..., :dim]


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last dim, as the authors write it (divide by the norm, no epsilon)."""
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


def radius(text: torch.Tensor, frames: torch.Tensor, radius_weight: torch.Tensor,
           radius_bias: torch.Tensor) -> torch.Tensor:
    """``R[i, j] = exp(radius_weight @ S_ij + radius_bias)``: ``[Nt, Nv, D]`` from ``text``
    ``[Nt, D]``, ``frames`` ``[Nv, T, D]``, ``radius_weight`` ``[D, T]``, ``radius_bias`` ``[D]``."""
    tn = text / text.norm(dim=-1, keepdim=True)
    fn = frames / frames.norm(dim=-1, keepdim=True)
    S = torch.einsum("id,jkd->ijk", tn, fn)
    return torch.exp(F.linear(S, radius_weight, radius_bias))


def _noise_block(noise, seed, i0, i1, Nv, M, D, prior, std, dtype, device):
    if noise is not None:
        return noise[i0:i1]
    rows = torch.arange(i0, i1, device=device)
    cols = torch.arange(Nv, device=device)
    return philox_noise(seed, rows, cols, M, D, prior, std, device).to(dtype)


def stochastic_max_similarity(text, frames, pooled, radius_weight, radius_bias, num_samples=20,
                              *, prior="uniform", std=1.0, seed=None, noise=None):
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

    Returns:
        ``(sims, best)``: ``[Nt, Nv]`` in the input dtype and ``[Nt, Nv]`` int64 (first argmax).
    """
    check_stochastic_max_similarity_args(text, frames, pooled, radius_weight, radius_bias,
                                         num_samples, prior, std, seed, noise)
    if noise is None and seed is None:
        seed = _philox.draw_seed()
    Nt, D = text.shape
    Nv = frames.shape[0]
    M = num_samples
    step = max(1, _CHUNK_ELEMS // max(1, Nv * M * D))
    sims, best = [], []
    for i0 in range(0, Nt, step):
        i1 = min(Nt, i0 + step)
        R = radius(text[i0:i1], frames, radius_weight, radius_bias)            # [c, Nv, D]
        eps = _noise_block(noise, seed, i0, i1, Nv, M, D, prior, std, text.dtype, text.device)
        t = text[i0:i1, None, None, :] + eps * R[:, :, None, :]                # [c, Nv, M, D]
        p = pooled[:, i0:i1].transpose(0, 1)[:, :, None, :]                    # [c, Nv, 1, D]
        c = _cos_rows(t, p)                                                    # [c, Nv, M]
        s, b = c.max(dim=-1)  # first maximum on ties (torch.max documents it for CPU/CUDA)
        sims.append(s)
        best.append(b)
    if Nt == 0:
        return text.new_zeros(0, Nv), torch.zeros(0, Nv, dtype=torch.int64, device=text.device)
    return torch.cat(sims), torch.cat(best)


def stochastic_text_embedding(text, frames, radius_weight, radius_bias, best, pairs=None, *,
                              prior="uniform", std=1.0, seed=None, noise=None):
    """The selected stochastic text ``t_best = text_i + eps_best * R_ij`` of given pairs.

    Args:
        text ``[Nt, D]``, frames ``[Nv, T, D]``, radius_weight ``[D, T]``, radius_bias ``[D]``:
            as passed to :func:`stochastic_max_similarity`.
        best: ``[Nt, Nv]`` int64, the ``best`` it returned.
        pairs: ``[P, 2]`` integer ``(i, j)`` rows, or ``None`` for every pair.
        prior, std, seed, noise: as passed to :func:`stochastic_max_similarity` (``seed`` is
            required when ``noise`` is None: the noise is recomputed from it).

    Returns:
        ``[P, D]`` (or ``[Nt, Nv, D]`` when ``pairs`` is None) in ``text``'s dtype; its cosine
        with ``pooled[j, i]`` is ``sims[i, j]``.
    """
    _validate.tensor("text", text, ndim=2, shape_doc="[Nt, D]")
    _validate.tensor("frames", frames, ndim=3, shape_doc="[Nv, T, D]")
    Nt, D = text.shape
    Nv = frames.shape[0]
    if not isinstance(best, torch.Tensor) or best.dtype != torch.int64 or tuple(best.shape) != (Nt, Nv):
        raise ValueError(f"best must be an int64 tensor [Nt, Nv] = {(Nt, Nv)}")
    M = int(noise.shape[2]) if isinstance(noise, torch.Tensor) and noise.dim() == 4 else 1
    # pooled is not needed here: a broadcast stand-in of the right shape passes its checks.
    stand_in = text.new_empty(()).expand(Nv, Nt, D)
    check_stochastic_max_similarity_args(text, frames, stand_in, radius_weight, radius_bias,
                                         M, prior, std, seed, noise)
    if noise is not None and best.numel() and int(best.max()) >= M:
        raise ValueError(f"best holds sample index {int(best.max())} but noise has M = {M}")
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
    tn = text[ii] / text[ii].norm(dim=-1, keepdim=True)
    fn = frames[jj] / frames[jj].norm(dim=-1, keepdim=True)
    S = torch.einsum("pd,pkd->pk", tn, fn)
    R = torch.exp(F.linear(S, radius_weight, radius_bias))
    if noise is not None:
        eps = noise[ii, jj, m]
    elif ii.numel():
        eps = torch.stack([_one_pair_noise(seed, int(a), int(b), int(c), D, prior, std, text.device)
                           for a, b, c in zip(ii.tolist(), jj.tolist(), m.tolist())]).to(text.dtype)
    else:
        eps = text.new_zeros(0, D)
    out = text[ii] + eps * R
    return out.reshape(Nt, Nv, D) if full else out


def _one_pair_noise(seed, i, j, m, D, prior, std, device):
    """Sample ``m`` of pair ``(i, j)``: float32 ``[D]`` (the same bits as :func:`philox_noise`)."""
    q = torch.arange((D + 3) // 4, dtype=torch.int64, device=device)
    w = _philox.philox4x32_10(q, m, j, i, philox_key(seed))
    if prior == "uniform":
        vals = [_philox.unit_float(x) for x in w]
    else:
        z0, z1 = _philox.box_muller(w[0], w[1])
        z2, z3 = _philox.box_muller(w[2], w[3])
        vals = [z * float(std) for z in (z0, z1, z2, z3)]
    return torch.stack(vals, dim=0).flatten()[:D]  # [4, Q] -> element l * Q + q


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
