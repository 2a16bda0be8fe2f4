"""Pictures: each is checked for what it shows (colours where the mask is, bones between
the joints, the texture in its box, the heat where the point went), and written as
PNG, GIF and MP4 with the right number of frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from timecycle import viz
from timecycle.data.datasets import davis_palette
from timecycle.model.baselines import LabPixels
from timecycle.video import open_video


def test_overlay_mask_tints_exactly_the_mask_in_its_palette_colour():
    frame = np.full((40, 60, 3), 100, np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:50] = 2
    out = viz.overlay_mask(frame, mask, alpha=0.5)
    changed = np.any(out != frame, axis=-1)
    assert np.array_equal(changed, mask > 0)
    expected = np.round(0.5 * 100 + 0.5 * davis_palette()[2].astype(float))
    assert np.all(out[mask == 2] == expected)


def test_draw_skeleton_joins_visible_joints_and_leaves_hidden_ones_hollow():
    frame = np.zeros((60, 80, 3), np.uint8)
    points = np.array([[10.0, 10.0], [50.0, 10.0], [50.0, 45.0]])
    out = viz.draw_skeleton(frame, points, np.array([True, True, False]), edges=[(0, 1), (1, 2)], radius=3)
    bone = np.all(out == viz.BONE_COLOUR, axis=-1)
    assert bone[9:12, 16:44].any(axis=0).all()  # the bone 0-1 along y = 10
    assert not bone[18:38, 45:56].any()  # the bone to the hidden joint 2 is thin and grey
    assert np.all(out[18:38, 50] == viz.HIDDEN_BONE_COLOUR)
    for j, (x, y) in enumerate(points.astype(int)):
        dot = np.all(out[y - 3:y + 4, x - 3:x + 4] == viz.point_colour(j), axis=-1)
        assert dot.any()
        assert dot[3, 3] == (j != 2)  # filled where visible, hollow where hidden
    assert not out[30:, :30].any()  # nothing drawn far from the skeleton


@pytest.mark.parametrize("mode", viz.TEXTURE_MODES)
def test_texture_pasted_on_the_first_frame_fills_its_box_and_nothing_else(mode):
    texture = np.zeros((16, 16, 3), np.uint8)
    texture[:8, :8] = (255, 0, 0)
    texture[:8, 8:] = (0, 255, 0)
    texture[8:, :8] = (0, 0, 255)
    texture[8:, 8:] = (255, 255, 0)
    frame = np.full((64, 80, 3), 50, np.uint8)
    box = (20, 10, 52, 42)  # 32 x 32 pixels
    labels = viz.texture_labels(texture, (64, 80), box, mode=mode)
    assert labels.shape == (4 if mode == "coordinates" else 5, 64, 80)
    out = viz.paste_texture(frame, labels, texture if mode == "coordinates" else None)
    inside = np.zeros((64, 80), bool)
    inside[10:42, 20:52] = True
    assert np.all(out[~inside] == 50)
    for (y, x), colour in zip([(18, 28), (18, 44), (34, 28), (34, 44)],
                              [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        assert np.abs(out[y - 3:y + 4, x - 3:x + 4].astype(int) - colour).max() <= 1


def test_pasted_texture_moves_with_its_labels_and_respects_the_mask():
    logo = viz.make_logo(32)
    assert logo[0, 0, 3] == 0 and logo[16, 16, 3] == 255  # transparent corners, opaque centre
    frame = np.full((48, 64, 3), 80, np.uint8)
    labels = viz.texture_labels(logo, (48, 64), (8, 8, 40, 40))
    moved = np.roll(labels, (4, 12), axis=(1, 2))  # as if propagated 12 px right, 4 down
    out, out_moved = viz.paste_texture(frame, labels, logo), viz.paste_texture(frame, moved, logo)
    assert np.array_equal(out_moved[4:, 12:], out[:-4, :-12])
    mask = np.zeros((48, 64), bool)
    mask[:, :24] = True
    half = viz.paste_texture(frame, viz.texture_labels(logo, (48, 64), (8, 8, 40, 40), mask=mask), logo)
    assert np.all(half[:, 24:] == 80) and np.array_equal(half[:, :24], out[:, :24])


def test_point_affinity_puts_the_heat_where_the_point_went():
    rng = np.random.default_rng(0)
    frames = np.empty((5, 64, 96, 3), np.uint8)
    frames[:] = (rng.integers(20, 60, (5, 64, 96, 1)) * [1, 1, 3]).clip(0, 255)  # dark blue noise
    for t in range(5):
        frames[t, 24:40, 8 + 16 * t:24 + 16 * t] = (230, 30, 30)  # a red square moving right
    maps = viz.point_affinity(frames, (15.5, 31.5), LabPixels().eval())
    assert maps.shape == (5, 64, 96)
    for t in range(5):
        y, x = np.unravel_index(maps[t].argmax(), maps[t].shape)
        assert 24 <= y < 40 and 8 + 16 * t <= x < 24 + 16 * t
    figure = viz.affinity_figure(frames, maps, (15.5, 31.5), truth=np.array([[16 + 16 * t, 32] for t in range(5)]),
                                 count=3, gap=2)
    assert figure.shape == (64, 3 * 96 + 2 * 2, 3)
    last = figure[:, -96:]
    ring = np.all(last == viz.TRUE_COLOUR, axis=-1)
    ys, xs = np.nonzero(ring)
    assert abs(xs.mean() - (16 + 16 * 4)) < 1.5 and abs(ys.mean() - 32) < 1.5


def test_training_curves_plot_the_logged_losses(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 6):
        writer.add_scalar("loss/total", 1.0 / step, step)
        writer.add_scalar("loss/sim", -0.1 * step, step)
        writer.add_scalar("clips_per_s", 3.0, step)
        writer.add_scalar("lr", 1e-3, step)
    writer.close()
    series = viz.training_curves(tmp_path / "tb", tmp_path / "curves.png")
    assert list(series) == ["loss/sim", "loss/total", "clips_per_s"]  # lr is not plotted
    steps, values = series["loss/total"]
    assert steps.tolist() == [1, 2, 3, 4, 5] and values == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (1200, 300)  # three panels of 4 x 3 inches at 100 dpi
    with pytest.raises(ValueError, match="no scalars"):
        viz.training_curves(tmp_path / "tb", tmp_path / "none.png", tags=["loss/missing"])


def test_pictures_are_written_as_png_gif_and_mp4_with_every_frame(tmp_path):
    frames = np.stack([np.full((31, 41, 3), 30 * t, np.uint8) for t in range(7)])
    viz.save_picture(tmp_path / "a.png", frames, count=3)
    with Image.open(tmp_path / "a.png") as image:
        assert image.size == (3 * 41 + 2 * 4, 31)
        strip = np.asarray(image)
    assert strip[0, 0, 0] == 0 and strip[0, 45, 0] == 90 and strip[0, -1, 0] == 180  # frames 0, 3, 6
    viz.save_picture(tmp_path / "a.gif", frames, fps=10)
    with Image.open(tmp_path / "a.gif") as image:
        assert image.n_frames == 7 and image.size == (41, 31)
    viz.save_picture(tmp_path / "a.mp4", frames, fps=10)
    with open_video(tmp_path / "a.mp4") as video:
        assert len(video) == 7 and video.size == (40, 30)  # odd sides cropped for 4:2:0 colour
    viz.save_picture(tmp_path / "one.png", frames[3])
    assert np.asarray(Image.open(tmp_path / "one.png")).shape == (31, 41, 3)
    with pytest.raises(ValueError, match="png, .gif or .mp4"):
        viz.save_picture(tmp_path / "a.bmp", frames)


def test_cycle_figure_of_a_model_on_a_sample_has_every_frame_enlarged():
    from timecycle.config import preset
    from timecycle.train import build_model

    cfg = preset("cpu-small")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    s = cfg.sample.crop
    theta = torch.tensor([[1 / 3, 0.0, 0.3], [0.0, 1 / 3, -0.2]])
    sample = {"clip": torch.rand(4, 3, s, s), "target": torch.rand(3, s, s), "patch": torch.rand(3, 32, 32),
              "theta": theta}
    figure = viz.model_cycle_figure(model, sample, scale=2, gap=3)
    assert figure.shape == (2 * s, 5 * 2 * s + 4 * 3, 3)
    assert model.training  # the caller's mode is restored
    target = figure[:, -2 * s:]
    green = np.all(target == viz.TRUE_COLOUR, axis=-1)
    (x0, y0), _, (x1, y1), _ = viz.theta_corners(theta, 2 * s, 2 * s)
    ys, xs = np.nonzero(green)
    assert xs.min() >= x0 - 2 and xs.max() <= x1 + 2 and ys.min() >= y0 - 2 and ys.max() <= y1 + 2
    for panel in range(4):  # the cycle visits every clip frame: back (red), and but for the first, forward (blue)
        frame = figure[:, panel * (2 * s + 3):panel * (2 * s + 3) + 2 * s]
        colours = [viz.BACKWARD_COLOUR] if panel == 0 else [viz.BACKWARD_COLOUR, viz.FORWARD_COLOUR]
        assert sum(np.all(frame == c, axis=-1).sum() for c in colours) > 20
        assert np.all(frame == viz.FORWARD_COLOUR, axis=-1).any() == (panel > 0)


def _box_pixels(figure: np.ndarray, panel: int, side: int, gap: int, colour) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of ``colour`` in panel ``panel`` of a strip of side x side frames."""
    frame = figure[:, panel * (side + gap):panel * (side + gap) + side]
    return np.nonzero(np.all(frame == colour, axis=-1))


def test_walk_figure_draws_each_step_on_its_frame_in_its_nodes_window():
    from timecycle.model.crw import grid_boxes

    boxes = grid_boxes(48, 16, 16)  # 3x3 nodes of 16 px, row-major
    frames = torch.zeros(3, 3, 48, 48)
    figure = viz.walk_figure(frames, boxes, [4, 5, 8, 2, 4], gap=4)  # 0 -> 1 -> 2 -> 1 -> 0
    assert figure.shape == (48, 3 * 48 + 2 * 4, 3)
    expected = {(0, viz.TRUE_COLOUR): 4, (1, viz.FORWARD_COLOUR): 5, (2, viz.FORWARD_COLOUR): 8,
                (1, viz.BACKWARD_COLOUR): 2, (0, viz.BACKWARD_COLOUR): 4}
    for (panel, colour), node in expected.items():
        ys, xs = _box_pixels(figure, panel, 48, 4, colour)
        top, left = (int(v) for v in boxes[node, :2])
        assert ys.min() >= top and ys.max() < top + 16 and xs.min() >= left and xs.max() < left + 16
        assert len(ys) > 20
    assert not _box_pixels(figure, 2, 48, 4, viz.BACKWARD_COLOUR)[0].size  # the walk turns at the last frame
    with pytest.raises(ValueError, match="visits 5 nodes"):
        viz.walk_figure(frames, boxes, [4, 5, 8], gap=4)


def test_model_walk_figure_steps_to_the_most_similar_node(monkeypatch):
    """Nodes whose embedding moves one node left per frame: the walk follows them out
    and back home, and the model's mode is restored."""
    from timecycle.config import CRWConfig
    from timecycle.model.crw import CRW, grid_boxes

    cfg = CRWConfig(frame_size=48, patch=16, patch_stride=16, dim=8)
    model = CRW(cfg).train()
    n, t = 9, 3
    eye = torch.eye(n)
    nodes = torch.stack([eye.roll(-k, dims=0) for k in range(t)])  # node i of frame k = e_(i + k)
    monkeypatch.setattr(model, "embed", lambda clip, patch_theta=None: nodes[None])
    figure = viz.model_walk_figure(model, torch.zeros(t, 3, 48, 48), start=5, gap=4)
    assert model.training
    boxes = grid_boxes(48, 16, 16)
    for panel, colour, node in ((0, viz.TRUE_COLOUR, 5), (1, viz.FORWARD_COLOUR, 4), (2, viz.FORWARD_COLOUR, 3),
                                (1, viz.BACKWARD_COLOUR, 4), (0, viz.BACKWARD_COLOUR, 5)):
        ys, xs = _box_pixels(figure, panel, 48, 4, colour)
        top, left = (int(v) for v in boxes[node, :2])
        assert ys.min() >= top and ys.max() < top + 16 and xs.min() >= left and xs.max() < left + 16
