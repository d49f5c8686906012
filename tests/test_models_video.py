"""Video writing/reading round trips, uniform sampling, frame masks, preprocessing, errors,
and annotation formats. Videos are written here with PyAV."""
import json

import numpy as np
import pytest
import torch

from tvr_models import video as V


def _frames(n, h=32, w=64):
    # frame i is a flat grey of level 10 + 20 i: its index can be read back from the pixels
    return np.stack([np.full((h, w, 3), 10 + 20 * i, np.uint8) for i in range(n)])


def _level_to_index(frames):
    return ((frames.reshape(len(frames), -1).mean(1) - 10) / 20).round().astype(int).tolist()


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_uniform_sampling_round_trip(tmp_path, backend):
    p = V.write_test_video(tmp_path / "v.mp4", _frames(12))
    got = V.read_frames(p, 4, backend=backend)
    assert got.shape == (4, 32, 64, 3)
    assert _level_to_index(got) == [0, 4, 7, 11] == V.sample_indices(12, 4)


def test_auto_backend_and_short_video_mask(tmp_path):
    p = V.write_test_video(tmp_path / "short.mp4", _frames(3))
    video, mask = V.load_video(p, num_frames=5, size=24)
    assert video.shape == (5, 3, 24, 24)
    assert mask.tolist() == [1, 1, 1, 0, 0]
    assert (video[3:] == 0).all() and not (video[:3] == 0).all()
    # normalised with CLIP's mean/std: frame 0 has grey level 10/255
    want = (10 / 255 - torch.tensor(V.CLIP_MEAN)) / torch.tensor(V.CLIP_STD)
    torch.testing.assert_close(video[0].mean((1, 2)), want, atol=0.05, rtol=0)


def test_preprocess_resize_and_centre_crop():
    # 40 x 80 frame: left half 0, right half 255; shorter side -> 20, crop the middle 20 x 20
    f = np.zeros((1, 40, 80, 3), np.uint8)
    f[:, :, 40:] = 255
    x = V.preprocess(f, size=20, mean=(0, 0, 0), std=(1, 1, 1))
    assert x.shape == (1, 3, 20, 20)
    # resized width 40: crop columns 10..29, boundary at column 20
    assert x[0, 0, :, :8].max() < 0.05 and x[0, 0, :, 12:].min() > 0.95


def test_missing_empty_corrupt_videos_name_the_file(tmp_path):
    with pytest.raises(V.VideoError, match="nope.mp4: no such file"):
        V.load_video(tmp_path / "nope.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(V.VideoError, match="empty.mp4: empty file"):
        V.load_video(empty)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(V.VideoError, match="bad.mp4: cannot decode"):
        V.load_video(bad)


def test_load_videos_skips_with_warning_and_reports(tmp_path):
    V.write_test_video(tmp_path / "a.mp4", _frames(4))
    (tmp_path / "b.mp4").write_bytes(b"not a video at all" * 10)
    V.write_test_video(tmp_path / "c.mp4", _frames(6))
    with pytest.warns(RuntimeWarning, match="skipping video 'b'"):
        out = V.load_videos(str(tmp_path), ["a", "b", "c", "d"], num_frames=4, size=24)
    assert out.kept == [0, 2]
    assert set(out.skipped) == {"b", "d"} and "b.mp4" in out.skipped["b"]
    assert out.video.shape == (2, 4, 3, 24, 24) and out.video_mask.tolist() == [[1] * 4, [1] * 4]


def test_annotation_formats(tmp_path):
    msr = tmp_path / "msr.csv"
    msr.write_text("key,vid_key,video_id,sentence\nret0,msr1,video1,a cat\nret1,msr2,video2,a dog\n")
    a = V.read_annotations(msr)
    assert a.texts == ["a cat", "a dog"] and a.video_ids == ["video1", "video2"] and a.text_to_video == [0, 1]
    simple = tmp_path / "s.csv"
    simple.write_text("video_id,caption\nv1,x\nv2,y\nv1,z\n")
    a = V.read_annotations(simple)
    assert a.video_ids == ["v1", "v2"] and a.text_to_video == [0, 1, 0]
    js = tmp_path / "a.json"
    js.write_text(json.dumps([{"video_id": "v9", "caption": ["p", "q"]}, {"video_id": "v8", "caption": "r"}]))
    a = V.read_annotations(js)
    assert a.texts == ["p", "q", "r"] and a.text_to_video == [0, 0, 1]
    js2 = tmp_path / "b.json"
    js2.write_text(json.dumps({"v1": "one", "v2": ["two", "three"]}))
    assert V.read_annotations(js2).text_to_video == [0, 1, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="video_id"):
        V.read_annotations(bad)


def test_find_video(tmp_path):
    (tmp_path / "x.avi").write_bytes(b"1")
    assert V.find_video(str(tmp_path), "x").endswith("x.avi")
    assert V.find_video(str(tmp_path), "y").endswith("y.mp4")
