"""Video loading: decoding (decord, PyAV fallback), uniform T-frame sampling, CLIP
preprocessing, frame masks, and annotation files.

Decoding: decord when importable and it opens the file; otherwise (or when decord fails on
it) PyAV. Any missing, empty (no frames) or undecodable file raises :class:`VideoError`
whose message starts with the path; a dataset loop catches it, warns, and reports the video as
skipped (:func:`load_videos`), never dropping it silently.

Sampling: ``T`` frame indices spread uniformly over the video (``linspace(0, n-1, T)``
rounded, as the authors' ``slice_framepos=2``); a video with ``n < T`` frames keeps all ``n``
and the remaining slots are zeros with ``video_mask = 0``.

Preprocessing: shorter side resized to ``size`` (bicubic, antialiased, in torch rather than
PIL, so values differ from CLIP's PIL pipeline by interpolation rounding), centre crop
``size x size``, scaled to [0, 1], normalised with CLIP's mean and std.
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")


class VideoError(RuntimeError):
    """A video that cannot be used (missing, empty, corrupt). ``path`` names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """Uniform frame indices: all of them if ``num_available <= num_frames``."""
    if num_available <= num_frames:
        return list(range(num_available))
    return np.linspace(0, num_available - 1, num_frames).round().astype(int).tolist()


def _read_decord(path: str, num_frames: int) -> np.ndarray:
    import decord
    vr = decord.VideoReader(path, num_threads=1)
    n = len(vr)
    if n == 0:
        raise ValueError("no frames")
    return vr.get_batch(sample_indices(n, num_frames)).asnumpy()


def _read_pyav(path: str, num_frames: int) -> np.ndarray:
    import av
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        # Frame counts in headers are unreliable (0 for many files): decode everything once.
        # MSR-VTT clips are 10-30 s, so this stays cheap.
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no frames")
    return np.stack([frames[i] for i in sample_indices(len(frames), num_frames)])


def read_frames(path: str, num_frames: int, backend: str = "auto") -> np.ndarray:
    """Decode ``<= num_frames`` uniformly sampled RGB frames: uint8 [n, H, W, 3].

    backend: ``"auto"`` (decord, then PyAV), ``"decord"`` or ``"pyav"``."""
    path = str(path)
    if not os.path.isfile(path):
        raise VideoError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "empty file")
    readers = {"decord": _read_decord, "pyav": _read_pyav}
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    errors = []
    for name in order:
        try:
            frames = readers[name](path, num_frames)
        except ImportError as e:
            errors.append(f"{name} unavailable ({e})")
            continue
        except Exception as e:  # decoders raise many types on corrupt input
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if frames.ndim != 4 or frames.shape[0] == 0:
            errors.append(f"{name}: no frames")
            continue
        return frames
    raise VideoError(path, "cannot decode (" + "; ".join(errors) + ")")


def preprocess(frames: np.ndarray | Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """CLIP preprocessing. frames: uint8 [n, H, W, 3] -> float32 [n, 3, size, size]."""
    x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 255) / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def load_video(path: str, num_frames: int = 12, size: int = 224, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One video as model input: ``(video [T, 3, size, size], video_mask [T])``.

    Slots past the video's length are zeros with mask 0. Raises :class:`VideoError`."""
    frames = preprocess(read_frames(path, num_frames, backend), size)
    video = torch.zeros(num_frames, 3, size, size)
    mask = torch.zeros(num_frames, dtype=torch.long)
    video[: len(frames)] = frames
    mask[: len(frames)] = 1
    return video, mask


# --------------------------------------------------------------------------- annotations
@dataclass
class Annotations:
    """Captions and their videos. ``texts[i]`` describes ``video_ids[text_to_video[i]]``."""
    texts: list[str]
    video_ids: list[str]
    text_to_video: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def read_annotations(path: str) -> Annotations:
    """Read an annotation file.

    Formats: the MSR-VTT CSV (columns ``key,vid_key,video_id,sentence``), a CSV with columns
    ``video_id,caption`` (or ``sentence``), or JSON: a list of ``{"video_id", "caption"}``
    objects (``"caption"`` may be a list of captions) or a ``{video_id: caption(s)}`` object.
    Videos keep their order of first appearance."""
    path = str(path)
    pairs: list[tuple[str, str]] = []
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        items = data.items() if isinstance(data, dict) else (
            (d["video_id"], d.get("caption", d.get("sentence"))) for d in data)
        for vid, caps in items:
            for c in ([caps] if isinstance(caps, str) else caps):
                pairs.append((str(vid), c))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            text_col = "sentence" if "sentence" in cols else "caption" if "caption" in cols else None
            if "video_id" not in cols or text_col is None:
                raise ValueError(f"{path}: expected columns video_id and sentence/caption, got {cols}")
            pairs = [(row["video_id"], row[text_col]) for row in reader]
    if not pairs:
        raise ValueError(f"{path}: no captions")
    order: dict[str, int] = {}
    t2v = []
    for vid, _ in pairs:
        t2v.append(order.setdefault(vid, len(order)))
    return Annotations([c for _, c in pairs], list(order), t2v)


def find_video(video_dir: str, video_id: str) -> str:
    """Path of ``video_id`` in ``video_dir`` (any of :data:`VIDEO_EXTENSIONS`, or the exact name).
    Returns the ``.mp4`` path when none exists, so the error names the expected file."""
    exact = os.path.join(video_dir, video_id)
    if os.path.isfile(exact):
        return exact
    for ext in VIDEO_EXTENSIONS:
        p = exact + ext
        if os.path.isfile(p):
            return p
    return exact + ".mp4"


@dataclass
class LoadedVideos:
    """Result of :func:`load_videos`: the usable videos and the skipped ones with reasons."""
    video: Tensor                      # [V, T, 3, S, S]
    video_mask: Tensor                 # [V, T]
    kept: list[int]                    # indices into the requested ids
    skipped: dict[str, str] = field(default_factory=dict)   # video_id -> error message


def load_videos(video_dir: str, video_ids: Sequence[str], num_frames: int = 12, size: int = 224,
                backend: str = "auto", progress: bool = False) -> LoadedVideos:
    """Load several videos, skipping (with a warning, and recording) the unusable ones."""
    from tqdm.auto import tqdm

    vids, masks, kept, skipped = [], [], [], {}
    for i, vid in enumerate(tqdm(video_ids, desc="videos", disable=not progress)):
        try:
            v, m = load_video(find_video(video_dir, vid), num_frames, size, backend)
        except VideoError as e:
            warnings.warn(f"skipping video {vid!r}: {e}", RuntimeWarning, stacklevel=2)
            skipped[vid] = str(e)
            continue
        vids.append(v)
        masks.append(m)
        kept.append(i)
    if vids:
        return LoadedVideos(torch.stack(vids), torch.stack(masks), kept, skipped)
    return LoadedVideos(torch.zeros(0, num_frames, 3, size, size), torch.zeros(0, num_frames, dtype=torch.long),
                        kept, skipped)


def write_test_video(path: str, frames: np.ndarray, fps: int = 5, codec: str = "mpeg4") -> str:
    """Encode uint8 [n, H, W, 3] frames (H, W even) into ``path`` with PyAV (tests, the demo)."""
    import av
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}  # near-lossless, so tests can read values back
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)
