"""UCoFiA's test-time Sinkhorn bias under the authors' name and call, on the fused op."""
from __future__ import annotations

from torch import Tensor

from .. import _validate
from ..ops.sinkhorn_knopp import sinkhorn_knopp as _sinkhorn_knopp


def sinkhorn_knopp(log_sim_matrix: Tensor, n_iters: int = 4, detach: bool = False, *,
                   log_domain: bool = False) -> tuple[Tensor, Tensor]:
    """UCoFiA's ``sinkhorn_knopp`` on the fused ``tk.sinkhorn_knopp``.

    Replaces ``sinkhorn_knopp`` of ``eval_t2v/main_ucofia.py`` (and ``eval_v2t/``) in UCoFiA
    (``Ziyang412/UCoFiA``). Same call and result: with ``K = exp(log_sim_matrix - max)``,
    ``b = 1 / K.sum(0)``, ``n_iters`` updates ``a = 1 / (K b)``, ``b = 1 / (a K)``, returns
    ``(log_softmax(log a), log_softmax(log b - max))``. The authors call it on the
    ``[N_train_texts, N_test_videos]`` similarities of each granularity and add the second
    result to the test similarities' columns::

        text_bias, video_bias = sinkhorn_knopp(sim_matrix_train)
        sim_matrix = sim_matrix + video_bias.unsqueeze(0)

    Args:
        log_sim_matrix: ``[Nq, Nv]`` float tensor.
        n_iters: ``(a, b)`` updates, >= 1 (4, as the authors).
        detach: compute from ``log_sim_matrix.detach()`` (no gradient), as the authors' flag.
        log_domain: False (default) = the authors' probability-domain iteration, quirk
            included: a float32 range of ``log_sim_matrix`` above ~88 underflows whole
            columns of ``K`` and gives inf/NaN, as theirs. True = log-sum-exp updates, equal
            where that one is finite and finite for any finite input.

    Returns:
        ``(text_bias [Nq], video_bias [Nv])`` in ``log_sim_matrix``'s dtype; differentiable
        (analytic backward through the iterations) unless ``detach``.

    Differences from the authors': rows are scaled to sum to ``Nv / Nq`` instead of 1, so
    that ``a`` and ``b`` do not drift by ``Nq / Nv`` per iteration and overflow (the biases
    are the same up to rounding wherever the authors' are finite: see
    ``tvr_kernels.reference.sinkhorn_knopp``); half-precision input is computed in float32;
    NaN or infinite entries raise ``ValueError`` (the authors' result is then NaN).
    """
    _validate.tensor("log_sim_matrix", log_sim_matrix, ndim=2, shape_doc="[Nq, Nv]")
    if not isinstance(detach, bool):
        raise TypeError(f"detach must be a bool, got {type(detach).__name__}")
    if detach:
        log_sim_matrix = log_sim_matrix.detach()
    return _sinkhorn_knopp(log_sim_matrix, n_iters, log_domain=log_domain)
