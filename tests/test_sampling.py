"""The TimeCycle training sample: geometry of theta, patch placement on motion, the
frame layout for short videos, and the dataset's handling of broken videos."""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from timecycle.config import ALIGN_CORNERS, SampleConfig
from timecycle.data.sampling import (
    TimeCycleDataset,
    make_sample,
    min_frames,
    motion_cells,
    pick_window,
    sample_offsets,
    window_scores,
)
from timecycle.video import VideoError, VideoInfo



DEFAULT = SampleConfig()
# Every size and count differs from the default, so nothing hard-coded can pass.
SMALL = SampleConfig(short_side=100, crop=96, patch=32, clip_frames=3, clip_gap=3, target_offset=5,
                     motion_offset=1, motion_grid=6, motion_window=2, motion_top_k=4, max_rotation=30.0)


def noise_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def moving_square_video(cfg: SampleConfig, num_frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """A static grey noise background, square frames of side ``short_side``, and one red
    textured square circling inside a small region near the left edge (so that a
    patch mirrored to the wrong side would land far from it). A circle with a period of
    7 frames moves the square between any two frames less than 7 apart.

    Returns frames (N, S, S, 3), the square's top-left (y, x) per frame, and its side."""
    rng = np.random.default_rng(seed)
    size, side, radius = cfg.short_side, cfg.crop // 5, cfg.crop / 24
    grey = rng.integers(0, 256, size=(size, size, 1), dtype=np.uint8)
    frames = np.repeat(np.repeat(grey[None], 3, axis=-1), num_frames, axis=0)
    texture = np.zeros((side, side, 3), dtype=np.uint8)
    texture[..., 0] = rng.integers(150, 256, size=(side, side))
    texture[..., 1:] = rng.integers(0, 60, size=(side, side, 2))
    angle = 2 * np.pi * np.arange(num_frames) / 7
    ys = np.round(size / 2 + radius * (1 + np.sin(angle))).astype(int)
    xs = np.round(size / 10 + radius * (1 + np.cos(angle))).astype(int)
    for frame, y, x in zip(frames, ys, xs):
        frame[y:y + side, x:x + side] = texture
    return frames, np.stack([ys, xs], axis=1), side


def patch_centre(theta: torch.Tensor, crop: int) -> tuple[float, float]:
    """(y, x) in crop pixel indices of the point that theta maps the patch centre to."""
    tx, ty = float(theta[0, 2]), float(theta[1, 2])
    if ALIGN_CORNERS:
        return (ty + 1) / 2 * (crop - 1), (tx + 1) / 2 * (crop - 1)
    return ((ty + 1) * crop - 1) / 2, ((tx + 1) * crop - 1) / 2


def is_red(patch: torch.Tensor) -> torch.Tensor:
    r, g, b = patch
    return (r > 0.55) & (g < 0.3) & (b < 0.3)


# ----------------------------------------------------------------------------- theta and patch


@pytest.mark.parametrize("cfg", [DEFAULT, SMALL], ids=["default", "small"])
def test_sample_shapes_and_dtypes(cfg):
    n = cfg.clip_frames + 2
    sample = make_sample(noise_frames(n, cfg.short_side, cfg.short_side + 30), cfg, np.random.default_rng(0))
    c, p = cfg.crop, cfg.patch
    assert sample["clip"].shape == (cfg.clip_frames, 3, c, c)
    assert sample["target"].shape == (3, c, c)
    assert sample["patch"].shape == (3, p, p)
    assert sample["theta"].shape == (2, 3)
    for key in ("clip", "target", "patch", "theta"):
        assert sample[key].dtype == torch.float32
    assert 0 <= sample["clip"].min() and sample["clip"].max() <= 1


@pytest.mark.parametrize("cfg", [DEFAULT, SMALL], ids=["default", "small"])
def test_rewarping_target_by_theta_gives_the_patch(cfg):
    frames = noise_frames(cfg.clip_frames + 2, cfg.short_side, cfg.short_side)
    for seed in range(5):
        sample = make_sample(frames, cfg, np.random.default_rng(seed))
        grid = F.affine_grid(sample["theta"][None], (1, 3, cfg.patch, cfg.patch), align_corners=ALIGN_CORNERS)
        patch = F.grid_sample(sample["target"][None], grid, mode="bilinear", align_corners=ALIGN_CORNERS)[0]
        assert torch.equal(patch, sample["patch"])


def test_clip_and_target_are_the_cropped_flipped_frames():
    cfg = replace(DEFAULT, flip_p=1.0)
    frames = noise_frames(cfg.clip_frames + 2, 256, 300)
    sample = make_sample(frames, cfg, np.random.default_rng(3))
    top, left = sample["crop_yx"].tolist()
    assert sample["flipped"]
    expected = frames[:, top:top + cfg.crop, left:left + cfg.crop, :][:, :, ::-1]
    got = (torch.cat([sample["clip"], sample["target"][None]]) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, expected[:-1])


@pytest.mark.parametrize("cfg", [DEFAULT, SMALL], ids=["default", "small"])
def test_theta_stays_in_documented_ranges(cfg):
    frames = noise_frames(cfg.clip_frames + 2, cfg.short_side, cfg.short_side)
    thetas = torch.stack([make_sample(frames, cfg, np.random.default_rng(s))["theta"] for s in range(200)])
    a, b = thetas[:, 0, :2], thetas[:, 1, :2]
    s = cfg.patch_scale
    torch.testing.assert_close(a[:, 0] ** 2 + b[:, 0] ** 2, torch.full((200,), s**2))
    # A rotation at fixed scale, nothing else: [[s cos, -s sin], [s sin, s cos]].
    torch.testing.assert_close(a[:, 1], -b[:, 0])
    torch.testing.assert_close(b[:, 1], a[:, 0])
    angle = torch.rad2deg(torch.atan2(b[:, 0], a[:, 0]))
    assert angle.abs().max() <= cfg.max_rotation + 1e-4
    assert angle.min() < -0.8 * cfg.max_rotation and angle.max() > 0.8 * cfg.max_rotation
    translation = thetas[:, :, 2]
    assert translation.abs().max() <= 1 - s + 1e-6
    # The extremes are reachable: noise moves everywhere, so windows are picked all over.
    assert translation.min() < -0.8 * (1 - s) and translation.max() > 0.8 * (1 - s)


@pytest.mark.parametrize("flip_p", [0.0, 1.0], ids=["unflipped", "flipped"])
@pytest.mark.parametrize("cfg", [DEFAULT, SMALL], ids=["default", "small"])
def test_patch_lands_on_the_moving_square(cfg, flip_p):
    cfg = replace(cfg, flip_p=flip_p)
    offsets = sample_offsets(10 * cfg.span, cfg)
    frames, corners, side = moving_square_video(cfg, 3 * cfg.span)
    c, cell = cfg.crop, cfg.crop // cfg.motion_grid
    # The chosen window overlaps the motion, so its centre is within half a window of
    # it; the jitter and the rounding of cells to whole pixels add under a cell.
    reach = cfg.motion_window * cell / 2 + cell
    distances, red_shares = [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        start = int(rng.integers(0, len(frames) - offsets.span + 1))
        sample = make_sample(frames[[start + k for k in offsets.indices]], cfg, rng)
        assert bool(sample["flipped"]) == bool(flip_p)
        top, left = sample["crop_yx"].tolist()
        y, x = patch_centre(sample["theta"], c)
        if flip_p:
            x = c - 1 - x
        y, x = y + top, x + left  # in the frame
        # Where the square is in the target or the motion frame: all the motion there is.
        moved = corners[[start + offsets.target, start + offsets.motion]]
        y0, x0 = moved.min(axis=0)
        y1, x1 = moved.max(axis=0) + side - 1
        distances.append(math.hypot(max(y0 - y, 0, y - y1), max(x0 - x, 0, x - x1)))
        red_shares.append(is_red(sample["patch"]).float().mean().item())
    distances, red_shares = np.array(distances), np.array(red_shares)
    assert distances.max() <= reach, f"a patch centre is {distances.max():.0f} px from the motion"
    assert np.median(distances) <= cell / 2  # mostly on or next to the square
    # The patch is cut from the target frame, so it shows the square itself: its area
    # is (crop/5)^2 against the patch's (crop/3)^2, a share of 0.36 when fully inside.
    assert np.mean(red_shares > 0.02) >= 0.9 and red_shares.mean() > 0.15


def test_static_video_spreads_patches_over_the_frame():
    cfg = DEFAULT
    frames = np.repeat(noise_frames(1, 256, 256), cfg.clip_frames + 2, axis=0)
    xs = [float(make_sample(frames, cfg, np.random.default_rng(s))["theta"][0, 2]) for s in range(200)]
    assert min(xs) < -0.4 and max(xs) > 0.4


# ----------------------------------------------------------------------------- motion windows


def test_motion_cells_sum_equal_cells_of_a_centred_grid():
    diff = np.arange(11 * 11).reshape(11, 11)
    cells = motion_cells(diff, 3)  # cells of 3 px, the 2 leftover pixels split over both borders
    assert cells.shape == (3, 3)
    assert cells[0, 0] == diff[1:4, 1:4].sum()
    assert cells[2, 1] == diff[7:10, 4:7].sum()
    assert cells.sum() == diff[1:10, 1:10].sum()


def test_window_scores_hand_computed():
    cells = np.array([[1, 0, 0, 0],
                      [0, 2, 0, 0],
                      [0, 0, 0, 5],
                      [0, 0, 0, 0]])
    expected = np.array([[3, 2, 0],
                         [2, 2, 5],
                         [0, 0, 5]])
    np.testing.assert_array_equal(window_scores(cells, 2), expected)
    np.testing.assert_array_equal(window_scores(cells, 4), [[8]])


def test_pick_window_draws_only_among_the_best():
    scores = np.array([[3, 2, 5],
                       [2, 2, 9],
                       [0, 0, 5]])
    picks = {pick_window(scores, 1, np.random.default_rng(s)) for s in range(20)}
    assert picks == {(1, 2)}
    picks = {pick_window(scores, 3, np.random.default_rng(s)) for s in range(100)}
    assert picks == {(1, 2), (0, 2), (2, 2)}
    # Ties are broken at random, so an all-equal map can give any window.
    picks = {pick_window(np.zeros((3, 3)), 2, np.random.default_rng(s)) for s in range(200)}
    assert len(picks) == 9


# ----------------------------------------------------------------------------- frame layout


def test_sample_offsets_full_gap_for_long_videos():
    for n in (DEFAULT.span, 1000):
        offsets = sample_offsets(n, DEFAULT)
        assert offsets.clip == (0, 2, 4, 6) and offsets.target == 15 and offsets.motion == 17
        assert offsets.span == DEFAULT.span == 18
        assert offsets.indices == [0, 2, 4, 6, 15, 17]


@pytest.mark.parametrize("cfg", [DEFAULT, SMALL], ids=["default", "small"])
def test_sample_offsets_shrink_for_short_videos(cfg):
    previous = 0
    for n in range(min_frames(cfg), cfg.span):
        offsets = sample_offsets(n, cfg)
        gap = offsets.clip[1] - offsets.clip[0] if cfg.clip_frames > 1 else 1
        target, motion = offsets.target - offsets.clip[-1], offsets.motion - offsets.target
        assert offsets.clip == tuple(range(0, gap * cfg.clip_frames, gap))
        assert min(gap, target, motion) >= 1
        assert offsets.span <= n, f"{n} frames: layout {offsets} does not fit"
        assert gap <= cfg.clip_gap and target <= cfg.target_offset and motion <= cfg.motion_offset
        assert offsets.span >= previous  # more frames never give a tighter layout
        previous = offsets.span
    # Shrunk proportionally: halfway to full length, the target is still the largest distance.
    half = sample_offsets(cfg.span // 2 + 1, cfg)
    assert half.target - half.clip[-1] > half.clip[1] - half.clip[0]


def test_sample_offsets_minimal_layout_and_error():
    assert sample_offsets(6, DEFAULT) == ((0, 1, 2, 3), 4, 5)
    with pytest.raises(ValueError, match=r"5 frames.*shorter than one sample.*at least 6"):
        sample_offsets(5, DEFAULT)


# ----------------------------------------------------------------------------- dataset


class FakeVideo:
    """An in-memory stand-in for timecycle.video.Video that records what was read."""

    def __init__(self, info: VideoInfo, frames: np.ndarray, fail_read: bool = False):
        self.info, self.frames, self.fail_read = info, frames, fail_read
        self.reads: list[list[int]] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def __len__(self) -> int:
        return len(self.frames)

    def read(self, indices):
        if self.fail_read:
            raise VideoError(self.info.path, "decoding failed after frame 3")
        indices = list(indices)
        assert all(0 <= k < len(self.frames) for k in indices)
        self.reads.append(indices)
        return self.frames[indices]


class FakeLibrary:
    """open_fn over in-memory videos; paths containing 'broken' fail to open, 'corrupt' to
    read, and 'stale' decode to fewer frames than their index entry says."""

    def __init__(self, cfg: SampleConfig, lengths: dict[str, int]):
        self.infos = [VideoInfo(path, n, cfg.fps, 300, cfg.short_side) for path, n in lengths.items()]
        self.frames = {i.path: noise_frames(3 if "stale" in i.path else i.num_frames, cfg.short_side, 300, seed=k)
                       for k, i in enumerate(self.infos)}
        self.opened: list[FakeVideo] = []

    def __call__(self, info: VideoInfo, fps=None, short_side=None) -> FakeVideo:
        if "broken" in info.path:
            raise VideoError(info.path, "not a readable video (Invalid data)")
        video = FakeVideo(info, self.frames[info.path], fail_read="corrupt" in info.path)
        self.opened.append(video)
        return video


def test_dataset_sample_shapes_and_reads_only_needed_frames():
    cfg = SMALL
    library = FakeLibrary(cfg, {"a.mp4": 40, "short.mp4": 8})
    dataset = TimeCycleDataset(library.infos, cfg, seed=1, open_fn=library)
    assert len(dataset) == 2
    for i, n in enumerate((40, 8)):
        sample = dataset[i]
        assert sample["index"] == i
        offsets = sample_offsets(n, cfg)
        assert 0 <= sample["start"] <= n - offsets.span
        assert library.opened[-1].reads == [[sample["start"] + k for k in offsets.indices]]
        assert sample["clip"].shape == (cfg.clip_frames, 3, cfg.crop, cfg.crop)
        assert sample["patch"].shape == (3, cfg.patch, cfg.patch)
    batch = default_collate([dataset[0], dataset[1]])
    assert batch["clip"].shape == (2, cfg.clip_frames, 3, cfg.crop, cfg.crop)
    assert batch["theta"].shape == (2, 2, 3)


def test_dataset_leaves_out_too_short_videos_and_warns(caplog):
    cfg = SMALL
    library = FakeLibrary(cfg, {"a.mp4": 40, "tiny1.mp4": 4, "tiny2.mp4": 2})
    with caplog.at_level(logging.WARNING, logger="timecycle.data.sampling"):
        dataset = TimeCycleDataset(library.infos, cfg, open_fn=library)
    assert len(dataset) == 1 and dataset.too_short == 2
    (record,) = caplog.records
    assert "2 of 3" in record.getMessage() and "tiny1.mp4" in record.getMessage()
    with pytest.raises(ValueError, match="none of the 2 videos"):
        TimeCycleDataset(library.infos[1:], cfg, open_fn=library)


def test_dataset_skips_videos_that_fail_to_decode(caplog):
    cfg = SMALL
    library = FakeLibrary(cfg, {"broken.mp4": 40, "corrupt.mp4": 40, "stale.mp4": 40, "good.mp4": 40})
    dataset = TimeCycleDataset(library.infos, cfg, open_fn=library)
    with caplog.at_level(logging.WARNING, logger="timecycle.data.sampling"):
        sample = dataset[0]
    assert sample["index"] == 3 and sample["skipped"] == 3  # the next video that reads
    messages = [r.getMessage() for r in caplog.records]
    assert any("broken.mp4" in m and "not a readable video" in m for m in messages)
    assert any("corrupt.mp4" in m and "decoding failed" in m for m in messages)
    assert any("stale.mp4" in m and "3 frames" in m for m in messages)
    assert dataset[3]["index"] == 3 and dataset[3]["skipped"] == 0


def test_dataset_gives_up_when_every_video_fails():
    cfg = SMALL
    library = FakeLibrary(cfg, {"broken1.mp4": 40, "corrupt2.mp4": 40})
    dataset = TimeCycleDataset(library.infos, cfg, open_fn=library)
    with pytest.raises(RuntimeError, match="every one of the 2 videos failed"):
        dataset[1]


def test_dataset_is_deterministic_per_seed_epoch_and_item():
    cfg = SMALL
    library = FakeLibrary(cfg, {f"v{k}.mp4": 60 for k in range(3)})

    def draw(order, epoch=0, seed=0):
        dataset = TimeCycleDataset(library.infos, cfg, seed=seed, open_fn=library)
        return {i: dataset[(epoch, i)] for i in order}

    first, shuffled = draw([0, 1, 2]), draw([2, 0, 1, 1])  # order and repeats do not matter
    for i in range(3):
        for key, value in first[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(shuffled[i][key])), key

    def key(sample):
        return sample["start"], tuple(sample["theta"].flatten().tolist())

    assert key(draw([0], epoch=1)[0]) != key(first[0])
    assert key(draw([0], seed=1)[0]) != key(first[0])
