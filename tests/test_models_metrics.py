"""Retrieval metrics against rankings worked out by hand."""
import math

import pytest
import torch

from tvr_models import metrics


def test_t2v_v2t_hand_computed():
    # 3 texts x 3 videos, ground truth on the diagonal.
    sim = torch.tensor([[0.9, 0.1, 0.2],    # text 0: video 0 first          -> rank 1
                        [0.8, 0.5, 0.7],    # text 1: 0.8, 0.7 beat 0.5       -> rank 3
                        [0.1, 0.6, 0.3]])   # text 2: 0.6 beats 0.3           -> rank 2
    assert metrics.t2v_ranks(sim).tolist() == [1, 3, 2]
    # video 0 column [0.9, 0.8, 0.1]: text 0 first -> 1; video 1 [0.1, 0.5, 0.6]: text 1 second
    # -> 2; video 2 [0.2, 0.7, 0.3]: text 2 second -> 2
    assert metrics.v2t_ranks(sim).tolist() == [1, 2, 2]
    m = metrics.retrieval_metrics(sim)
    assert m["t2v"]["R@1"] == pytest.approx(100 / 3)
    assert m["t2v"]["R@5"] == 100.0
    assert m["t2v"]["MdR"] == 2.0
    assert m["t2v"]["MnR"] == pytest.approx(2.0)
    assert m["v2t"]["R@1"] == pytest.approx(100 / 3)
    assert m["v2t"]["MnR"] == pytest.approx(5 / 3)


def test_ties_favour_ground_truth():
    # text 0 ties with two other videos at the top: rank 1, not 3 (nor random).
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.1],
                        [0.9, 0.2, 0.2, 0.2],   # gt 0.2 tied with two, beaten by 0.9 -> 2
                        [0.0, 0.0, 0.0, 0.0],   # all equal -> 1
                        [0.3, 0.3, 0.4, 0.3]])  # gt 0.3, one strictly higher -> 2
    assert metrics.t2v_ranks(sim).tolist() == [1, 2, 1, 2]


def test_multi_caption():
    # 4 texts, 2 videos: texts 0,1 -> video 0; texts 2,3 -> video 1.
    t2v = torch.tensor([0, 0, 1, 1])
    sim = torch.tensor([[0.2, 0.9],   # text 0: video 1 higher -> 2
                        [0.8, 0.1],   # text 1 -> 1
                        [0.7, 0.6],   # text 2: video 0 higher -> 2
                        [0.3, 0.4]])  # text 3 -> 1
    assert metrics.t2v_ranks(sim, t2v).tolist() == [2, 1, 2, 1]
    # video 0 column [0.2, 0.8, 0.7, 0.3]: its captions 0 (rank 4) and 1 (rank 1) -> 1
    # video 1 column [0.9, 0.1, 0.6, 0.4]: captions 2 (rank 2) and 3 (rank 3) -> 2
    assert metrics.v2t_ranks(sim, t2v).tolist() == [1, 2]
    m = metrics.retrieval_metrics(sim, t2v)
    assert m["t2v"]["R@1"] == 50.0 and m["t2v"]["MdR"] == 1.5
    assert m["v2t"]["R@1"] == 50.0 and m["v2t"]["MnR"] == 1.5


def test_recall_at_50_and_median():
    n = 60
    # text i's gt placed at rank i+1 exactly: gt score n-i, others n-0.5-j for j < i higher.
    sim = torch.zeros(n, n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        sim[i, i] = 0.0
        for r, j in enumerate(others):
            sim[i, j] = 1.0 if r < i else -1.0
    ranks = metrics.t2v_ranks(sim)
    assert ranks.tolist() == list(range(1, n + 1))
    s = metrics.summarize(ranks)
    assert s["R@1"] == pytest.approx(100 / 60) and s["R@10"] == pytest.approx(1000 / 60)
    assert s["R@50"] == pytest.approx(5000 / 60)
    assert s["MdR"] == 30.5 and s["MnR"] == 30.5


def test_errors():
    with pytest.raises(ValueError, match="NaN"):
        metrics.retrieval_metrics(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="text_to_video"):
        metrics.retrieval_metrics(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="without any caption"):
        metrics.v2t_ranks(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_dsl_and_sinkhorn_bias():
    sim = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    sm = torch.softmax(sim, 0)
    torch.testing.assert_close(metrics.dsl(sim), sim * sm)
    assert math.isclose(metrics.dsl(sim)[0, 0].item(), 1.0 * math.e / (math.e + 1), rel_tol=1e-6)
    bank = torch.randn(7, 2)
    out = metrics.sinkhorn_bias(sim, bank)
    bias = out - sim
    # a column bias: constant down each column, and a log-distribution over videos
    torch.testing.assert_close(bias[0], bias[1])
    torch.testing.assert_close(bias[0].exp().sum(), torch.tensor(1.0))
