"""Models by name or checkpoint, the raw-pixel baseline, and the propagate command's outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_data
from timecycle import load_model, open_video
from timecycle.cli import main
from timecycle.data.datasets import davis_palette, read_mask, save_indexed_png
from timecycle.data.synthetic import SyntheticConfig, generate_clip
from timecycle.model.baselines import LabPixels, rgb_to_lab
from timecycle.model.encoder import EncoderFeatures
from timecycle.track import point_heatmaps, read_points, track_mask, track_points
from timecycle.video import write_video


@pytest.fixture(scope="module")
def clip():
    return generate_clip(SyntheticConfig(height=96, width=128, frames=6, num_objects=2, first_frame_objects=True,
                                         speed=1.0), seed=7)


@pytest.fixture(scope="module")
def clip_video(clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    for t, frame in enumerate(clip.frames):
        Image.fromarray(frame).save(folder / f"{t:05d}.png")
    return folder


# ----------------------------------------------------------------------------- models


def test_lab_conversion_by_hand():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).T[None, :, :, None]  # (1, 3, 3, 1)
    lab = rgb_to_lab(rgb)[0, :, :, 0].T
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.05)  # white
    assert lab[1].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.05)  # sRGB red
    assert lab[2].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=0.05)  # black


def test_pixel_baseline_pools_to_stride_8():
    features = LabPixels()(torch.rand(2, 3, 64, 100))
    assert features.shape == (2, 3, 8, 13)


def test_load_model_baselines_and_errors():
    model = load_model("random-resnet18")
    assert isinstance(model, EncoderFeatures) and not model.encoder.training
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 256, 8, 8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_model("random-resnet18")
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.parameters(), again.encoder.parameters()))
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is left alone
    assert isinstance(load_model("pixels"), LabPixels)
    with pytest.raises(FileNotFoundError, match="not a baseline name"):
        load_model("no-such-model.pt")


def test_load_model_from_a_training_checkpoint(tmp_path):
    from timecycle.config import preset
    from timecycle.train import Progress, build_model, save_training_state

    cfg = preset("cpu-small")
    trained = build_model(cfg)
    torch.nn.init.normal_(trained.encoder.conv1.weight)  # weights no fresh model has
    save_training_state(tmp_path / "c.pt", trained, torch.optim.Adam(trained.parameters()), cfg, Progress())
    model = load_model(tmp_path / "c.pt")
    assert torch.equal(model.encoder.conv1.weight, trained.encoder.conv1.weight)
    assert model.arch == "resnet18" and not model.encoder.training


# ----------------------------------------------------------------------------- masks


def test_read_mask_accepts_both_davis_conventions(tmp_path):
    ids = np.zeros((4, 6), np.uint8)
    ids[1:3, 2:5] = 2
    save_indexed_png(tmp_path / "p.png", ids)
    assert np.array_equal(read_mask(tmp_path / "p.png"), ids)
    Image.fromarray(((ids > 0) * 255).astype(np.uint8)).save(tmp_path / "g.png")
    assert np.array_equal(read_mask(tmp_path / "g.png"), (ids > 0).astype(np.uint8))
    Image.new("RGB", (6, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png: a mask must be a palette or grey PNG"):
        read_mask(tmp_path / "rgb.png")
    assert read_mask(shared_data("davis-sample", "Annotations", "480p", "blackswan", "00000.png")).max() == 1


def test_track_mask_writes_palette_pngs_and_an_overlay(clip, clip_video, tmp_path):
    model = load_model("pixels")
    summary = track_mask(clip_video, clip.masks[0], model, tmp_path, preset="crw", progress=False)
    assert summary["frames"] == 6 and summary["objects"] == 2
    pngs = sorted((tmp_path / "masks").glob("*.png"))
    assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(6)]
    first = Image.open(pngs[0])
    assert first.mode == "P" and np.array_equal(np.asarray(first), clip.masks[0])
    assert np.array_equal(np.asarray(first.getpalette()[:30]), davis_palette()[:10].ravel())
    last = np.asarray(Image.open(pngs[-1]))
    iou = [((last == k) & (clip.masks[-1] == k)).sum() / ((last == k) | (clip.masks[-1] == k)).sum() for k in (1, 2)]
    assert min(iou) > 0.5, iou  # colour alone follows these textured objects for 6 frames

    video = open_video(tmp_path / "overlay.mp4")
    assert len(video) == 6
    frame = video.read([5])[0].astype(float)
    original = clip.frames[5].astype(float)
    changed = np.abs(frame - original).sum(-1) > 40  # where the tint went
    assert changed[last > 0].mean() > 0.8 and changed[last == 0].mean() < 0.1


# ----------------------------------------------------------------------------- points


def test_point_heatmaps_peak_at_the_points():
    maps = point_heatmaps(np.array([[3.0, 2.0], [27.0, 20.0]]), 30, 40)
    assert maps.shape == (3, 30, 40)
    assert maps[0, 2, 3] == 1.0 and maps[1, 20, 27] == 1.0
    assert maps[0, 2, 7] == pytest.approx(np.exp(-16 / 32))  # sigma 4 px, 4 px away
    assert np.all(maps[-1] >= 0) and maps[-1, 0, 39] == pytest.approx(1.0, abs=1e-3)


def test_track_points_on_a_static_video_stays_put(tmp_path):
    frames = np.repeat(np.random.default_rng(0).integers(0, 255, (1, 48, 64, 3), dtype=np.uint8), 5, 0)
    write_video(tmp_path / "still.mp4", frames, 12)
    points = np.array([[10.0, 12.0], [40.0, 30.0]])
    summary = track_points(tmp_path / "still.mp4", points, load_model("random-resnet18"), tmp_path / "out",
                           progress=False)
    tracks = json.loads((tmp_path / "out" / "points.json").read_text())["tracks"]
    assert summary["frames"] == 5 and len(tracks) == 5
    assert [(p["x"], p["y"]) for p in tracks[0]["points"]] == [(10.0, 12.0), (40.0, 30.0)]
    # Labels travel on the stride-8 grid: a point can move by up to half a cell (4 px)
    # once, on its way down and up, and must then stay where it is.
    for frame in tracks:
        for (x, y), p in zip(points, frame["points"]):
            assert abs(p["x"] - x) <= 4 and abs(p["y"] - y) <= 4 and p["visible"]
    later = np.array([[(p["x"], p["y"]) for p in f["points"]] for f in tracks[1:]])
    assert np.abs(later - later[0]).max() < 1.0  # lossy mp4 frames differ slightly
    assert len(open_video(tmp_path / "out" / "overlay.mp4")) == 5


def test_bad_points_are_named(tmp_path, clip_video):
    (tmp_path / "p.json").write_text("[[1, 2, 3]]")
    with pytest.raises(ValueError, match=r"p\.json: expected a list of \[x, y\] pairs"):
        read_points(tmp_path / "p.json")
    with pytest.raises(ValueError, match="outside the 128x96 first frame"):
        track_points(clip_video, np.array([[130.0, 5.0]]), load_model("pixels"), tmp_path / "o", progress=False)


# ----------------------------------------------------------------------------- the command


def test_propagate_command_end_to_end(clip, clip_video, tmp_path, capsys):
    save_indexed_png(tmp_path / "first.png", clip.masks[0])
    assert main(["propagate", "--video", str(clip_video), "--mask", str(tmp_path / "first.png"),
                 "--checkpoint", "pixels", "--out", str(tmp_path / "run"), "--no-overlay"]) == 0
    assert len(list((tmp_path / "run" / "masks").glob("*.png"))) == 6
    assert not (tmp_path / "run" / "overlay.mp4").exists()
    (tmp_path / "pts.json").write_text(json.dumps({"points": [[20, 30]]}))
    assert main(["propagate", "--video", str(clip_video), "--points", str(tmp_path / "pts.json"),
                 "--checkpoint", "pixels", "--out", str(tmp_path / "pts")]) == 0
    assert (tmp_path / "pts" / "points.json").is_file()
    big = np.zeros((10, 10), np.uint8)
    big[2, 2] = 1
    save_indexed_png(tmp_path / "small.png", big)
    assert main(["propagate", "--video", str(clip_video), "--mask", str(tmp_path / "small.png"),
                 "--checkpoint", "pixels", "--out", str(tmp_path / "bad")]) == 1
    assert "10x10 (HxW) but the video's frames are 96x128" in capsys.readouterr().err
