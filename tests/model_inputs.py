"""Inputs shared by the model tests: token ids, generated videos, and a small generated
training set written to disk and read back by the loader."""
import numpy as np
import torch

from tvr_models.video import load_videos, write_test_video

FRAMES, LENGTH, CLIP_VOCAB = 4, 32, 49408


def texts(n, seed=0, max_len=12, vocab=CLIP_VOCAB, length=LENGTH):
    """``n`` captions of 3..max_len-1 tokens: ids ``[n, length]`` (SOT, random tokens, EOT,
    padding 0) and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(n):
        k = int(torch.randint(3, max_len, (), generator=g))
        ids[i, :k] = torch.randint(1, 400, (k,), generator=g)
        ids[i, 0], ids[i, k - 1] = vocab - 2, vocab - 1
        mask[i, :k] = 1
    return ids, mask


def videos(n, seed=0, short=(), frames=FRAMES):
    """``n`` random 32-px videos ``[n, frames, 3, 32, 32]`` and their frame mask; the videos in
    ``short`` keep only 2 valid frames."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(n, frames, 3, 32, 32, generator=g)
    mask = torch.ones(n, frames, dtype=torch.long)
    for i in short:
        mask[i, 2:] = 0
        video[i, 2:] = 0
    return video, mask


def generated_pairs(tmp_path, n=8, frames=FRAMES, vocab=CLIP_VOCAB):
    """``n`` video-caption pairs: videos written to ``tmp_path`` and decoded by the loader.
    Returns ``(ids, mask, loaded)``."""
    rng = np.random.default_rng(0)
    names = [f"v{i}" for i in range(n)]
    for vid in names:
        write_test_video(tmp_path / f"{vid}.mp4", rng.integers(0, 256, (frames, 32, 64, 3), dtype=np.uint8))
    loaded = load_videos(str(tmp_path), names, num_frames=frames, size=32)
    assert loaded.kept == list(range(n))
    ids, mask = texts(n, seed=1, vocab=vocab)
    return ids, mask, loaded
