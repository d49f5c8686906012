"""torch.distributed on CPU: gloo, 2 processes on loopback (tests/dist_workers.py starts them,
with a deadline so that a failure never hangs the suite).

* the loss of gathered features and its gradients (after DDP's averaging) equal one process
  on the concatenated batch, ranks holding different numbers of pairs; a DDP SGD step equals
  the one-process step (all four models);
* the sharded evaluation equals the one-process evaluation: the similarity matrix bitwise,
  the metrics, the top-k mode (T-MASS's per-pair noise and UCoFiA's bank included);
* a resumed training run continues with the losses of an uninterrupted one;
* an unreadable video on one rank is reported and the run completes;
* the training CLI on one process (``--demo``) and the one-process helpers.
"""
import os
import warnings

import pytest
import torch

import dist_workers as W
from tvr_models import distributed as D
from tvr_models import evaluate as E
from tvr_models import train as T

MODELS = ["ts2net", "ucofia", "tmass", "tokenbinder"]


# tiny sizes (one thread is faster on busy cores); forked ranks set one thread themselves
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_gathered_loss_grads_and_ddp_step_equal_one_process(tmp_path):
    sizes = [3, 2]                                  # uneven: a rank may hold fewer pairs
    W.run_ranks(W.loss_and_grads, MODELS, sizes, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    parts = W.split(W.batch(sum(sizes), seed=1), sizes)
    for name in MODELS:
        model = W.make_model(name)
        loss = W.one_process_loss(model, parts, seed=5, step=0)
        loss.backward()
        for r in range(2):
            torch.testing.assert_close(ranks[r][name]["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
        assert with_grad == set(ranks[0][name]["grads"]) == set(ranks[1][name]["grads"]), name
        assert "clip.clip.logit_scale" in with_grad and len(with_grad) > 20
        for k, p in model.named_parameters():
            if p.grad is None:
                continue
            # DDP averages the ranks' gradients: the mean must be the one-process gradient
            mean = (ranks[0][name]["grads"][k] + ranks[1][name]["grads"][k]) / 2
            torch.testing.assert_close(mean, p.grad, rtol=1e-4, atol=1e-6, msg=f"{name} {k}")
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        for r in range(2):
            for k, p in model.named_parameters():
                torch.testing.assert_close(ranks[r][name]["params"][k], p.detach(), rtol=1e-4, atol=1e-6,
                                           msg=f"{name} {k} rank {r}")


def test_sharded_evaluation_equals_one_process(tmp_path):
    W.run_ranks(W.sharded_eval, MODELS, str(tmp_path), timeout=120)
    sharded = torch.load(tmp_path / "sharded.pt")
    ids, mask, video, vmask, bank_ids, bank_mask = W.eval_inputs()
    t2v = torch.tensor(W.TEXT_TO_VIDEO)
    for name in MODELS:
        model = W.eval_model(name)
        bank = (bank_ids, bank_mask) if name == "ucofia" else (None, None)
        one = E.evaluate(model, ids, mask, video, vmask, t2v, *bank, text_batch=4,
                         video_batch=W.VIDEO_BATCH, chunk_size=W.CHUNK)
        got = sharded[name]
        assert torch.equal(got["sim"], one["sim"]), (name, (got["sim"] - one["sim"]).abs().max())
        assert got["metrics"] == one["metrics"], name
        values, indices = got["topk"]
        top = torch.topk(one["sim"], 3, dim=-1)
        assert torch.equal(values, top.values) and torch.equal(indices, top.indices), name


def test_a_rank_with_an_unreadable_video_reports_it_and_the_run_completes(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    E.write_demo_data(str(data), num_videos=6, num_frames=W.FRAMES)     # video6 is corrupt
    W.run_ranks(W.gallery_with_a_broken_video, str(data), str(out), timeout=90)
    runs = [torch.load(out / f"run{r}.pt", weights_only=False) for r in range(2)]
    # the corrupt video is in rank 1's part: rank 1 warns, both know it was skipped
    assert runs[1]["warned"] and "video6" in runs[1]["warned"][0] and not runs[0]["warned"]
    for r in range(2):
        assert list(runs[r]["out"]["skipped_videos"]) == ["video6"]
        assert runs[r]["out"]["num_videos"] == 6 and runs[r]["out"]["texts_without_video"] == 1
    one = E.run(W.eval_model("ts2net"), E.demo_tokenizer(49408), str(data / "ann.csv"), str(data),
                W.FRAMES, 32, video_batch=2, chunk_size=2, progress=False)
    assert torch.equal(runs[0]["out"]["sim"], one["sim"])
    assert runs[0]["out"]["metrics"] == runs[1]["out"]["metrics"] == one["metrics"]


def test_resumed_training_continues_with_the_same_losses_on_two_ranks(tmp_path):
    # one pair per rank and micro-batch: the micro-batch holding the unreadable video is
    # empty on its rank, and every rank skips it (none waits in a collective)
    data = tmp_path / "data"
    data.mkdir()
    E.write_demo_data(str(data), num_videos=8, num_frames=W.FRAMES)
    W.run_ranks(W.resumed_training, str(data), "tmass", str(tmp_path), timeout=120)
    runs = [torch.load(tmp_path / f"train{r}.pt", weights_only=False) for r in range(2)]
    for run in runs:
        whole, first, rest = run["whole"]["losses"], run["first"]["losses"], run["rest"]["losses"]
        assert len(whole) == 4 and len(first) == 3 and len(rest) == 1
        assert first == whole[:3] and rest == whole[3:], (whole, first, rest)
        # the unreadable pair is reported on every rank (gathered), wherever it fell
        assert "video8" in run["whole"]["skipped"]
    assert runs[0]["whole"]["losses"] == runs[1]["whole"]["losses"]    # one global loss


def test_clis_under_torchrun_environment(tmp_path, capfd):
    W.run_ranks(W.clis, str(tmp_path), W.free_port(), init=False, timeout=120)
    out = capfd.readouterr().out                     # the ranks' prints (rank 0 only)
    assert out.count("tmass: 2 steps on 2 rank(s), global batch 4") == 1     # rank 0 reports
    assert out.count("texts 8  videos 8") == 1 and os.path.exists(tmp_path / "step2.pt")
    E.main(["--demo", "--model", "ucofia", "--batch-size", "2", "--chunk-size", "2",
            "--save-sim", str(tmp_path / "one.pt")])
    assert torch.equal(torch.load(tmp_path / "sim.pt"), torch.load(tmp_path / "one.pt"))


# ------------------------------------------------------------------------------ one process
def test_one_process_resume_and_accumulation(tmp_path):
    E.write_demo_data(str(tmp_path), num_videos=8, num_frames=W.FRAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        whole = W.train_run(str(tmp_path), "ts2net", max_steps=5, batch_size=2)
        first = W.train_run(str(tmp_path), "ts2net", out_dir=str(tmp_path / "ck"), max_steps=3, batch_size=2)
        rest = W.train_run(str(tmp_path), "ts2net", resume=first["checkpoint"], max_steps=5, batch_size=2)
    assert first["losses"] == whole["losses"][:3] and rest["losses"] == whole["losses"][3:]
    ck = torch.load(first["checkpoint"], weights_only=False)
    assert ck["step"] == 3 and set(ck) >= {"model", "optimizer", "scheduler", "rng"}


def test_bf16_autocast_step_on_cpu(tmp_path):
    E.write_demo_data(str(tmp_path), num_videos=4, num_frames=W.FRAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fp32 = W.train_run(str(tmp_path), "ucofia", max_steps=1, batch_size=4)
        bf16 = W.train_run(str(tmp_path), "ucofia", max_steps=1, batch_size=4, amp=True)
    # same data and seeds: the bf16 loss is the fp32 one to bf16's precision
    assert bf16["losses"][0] != fp32["losses"][0]
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], rel=0.05)


@pytest.mark.parametrize("name", ["ts2net", "tokenbinder"])
def test_train_cli_demo(name, capsys, tmp_path):
    assert T.main(["--model", name, "--demo", "--max-steps", "2", "--no-progress",
                   "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{name}: 2 steps on 1 rank(s)" in out and "video12" in out
    assert os.path.exists(tmp_path / "step2.pt")


def test_param_groups_and_schedule():
    model = W.make_model("ucofia")
    groups = T.param_groups(model, lr=1e-4, clip_lr=1e-7, weight_decay=0.2)
    named = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        names = [named[id(p)] for p in g["params"]]
        assert all(n.startswith("clip.") == (g["lr"] == 1e-7) for n in names)
        assert all((p.ndim >= 2) == (g["weight_decay"] == 0.2) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    f = T.warmup_cosine(total_steps=10, warmup_steps=2)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(6) == pytest.approx(0.5) and f(10) == 0.0


def test_helpers_degrade_to_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main()
    assert D.all_gather(x) is x and D.gather_to_main(x) is x
    feats = ({"a": x}, {"b": x})
    assert D.gather_pairs(*feats) == feats
    assert [D.shard_range(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    seeds = {D.derive_seed(5, "topk", s, r) for s in range(4) for r in range(4)}
    assert len(seeds) == 16 and D.derive_seed(5, 1, 0) == D.derive_seed(5, 1, 0)
    a = torch.rand(3)
    with D.shared_rng(7):
        b = torch.rand(3)
    with D.shared_rng(7):
        assert torch.equal(torch.rand(3), b)
    assert not torch.equal(a, b) and not torch.equal(torch.rand(3), b)
