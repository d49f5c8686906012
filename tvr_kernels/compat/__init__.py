"""Drop-in replacements for the authors' own training code: same names, same calls, the fused
kernels underneath.

For code written against the authors' repositories (TS2-Net ``yuqi657/ts2_net``, UCoFiA
``Ziyang412/UCoFiA``, T-MASS ``Jiamian-Wang/T-MASS-text-video-retrieval`` on X-Pool):

==========================================  ===============================================
ours                                        replaces (the authors' file: name)
==========================================  ===============================================
:class:`PerturbedTopK`                      ``modules/differential_topk.py``: ``PerturbedTopK``
                                            and ``PerturbedTopKFuntion`` (TS2-Net, UCoFiA)
:class:`PatchShiftModule`                   ``modules/until_module.py``: ``PatchShiftModule``
                                            (TS2-Net, UCoFiA)
:func:`sinkhorn_knopp`                      ``eval_*/main_ucofia.py``: ``sinkhorn_knopp`` (UCoFiA)
:func:`tmass_similarity_query_conditioned`  ``trainer/trainer_stochastic.py``: the selection
:func:`tmass_similarity_leaky`              loop of ``_valid_epoch_step`` with
:func:`per_video_id`                        ``modules/metrics.py``:
                                            ``generate_embeds_per_video_id_stochastic``,
                                            ``sim_matrix_inference_stochastic`` (T-MASS)
:func:`patch` / :func:`unpatch`             swap the two modules into / out of a built model
==========================================  ===============================================

Each one's docstring says what it computes and where it departs from the authors'.
"""
from .patching import PatchReport, Swap, patch, unpatch
from .tmass import (per_video_id, radius_parameters, tmass_similarity_leaky,
                    tmass_similarity_query_conditioned)
from .ts2net import PatchShiftModule, PerturbedTopK
from .ucofia import sinkhorn_knopp

__all__ = ["PatchReport", "Swap", "patch", "unpatch", "PerturbedTopK", "PatchShiftModule",
           "sinkhorn_knopp", "tmass_similarity_query_conditioned", "tmass_similarity_leaky",
           "per_video_id", "radius_parameters"]
