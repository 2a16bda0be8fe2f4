"""The TimeCycle training sample (METHOD.md section 4).

A sample is a short clip, a later target frame and a query patch cut out of the
target by a known affine ``theta``; the model tracks the patch back through the clip
and forward again and is scored against that ``theta``. The patch is placed where the
target frame moves, because a patch on static background can be "tracked" by any
feature and teaches nothing.

:func:`make_sample` is pure (frames and a generator in, tensors out) so that it can be
tested without files; :class:`TimeCycleDataset` adds the video reading around it,
through :class:`KeyedVideoDataset`, which the CRW clip sampler
(:mod:`timecycle.data.clips`) shares.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import Dataset

from timecycle.config import SampleConfig
from timecycle.model.tracker import sample_patch, theta_from_params
from timecycle.video import Video, VideoError, VideoInfo, open_video

if TYPE_CHECKING:
    from timecycle.video import VideoIndex

log = logging.getLogger(__name__)


def check_config(cfg: SampleConfig) -> None:
    """Fail when the sampler is built, not in a data-loader worker halfway through an epoch."""
    problems = []
    if cfg.crop > cfg.short_side:
        problems.append(f"crop {cfg.crop} is larger than short_side {cfg.short_side}")
    if not 1 <= cfg.motion_window < cfg.motion_grid <= cfg.crop:
        problems.append(f"need 1 <= motion_window ({cfg.motion_window}) < motion_grid "
                        f"({cfg.motion_grid}) <= crop ({cfg.crop})")
    if min(cfg.clip_frames, cfg.clip_gap, cfg.target_offset, cfg.motion_offset, cfg.patch, cfg.motion_top_k) < 1:
        problems.append("clip_frames, clip_gap, target_offset, motion_offset, patch and motion_top_k must be >= 1")
    if not 0 < cfg.patch < cfg.crop:
        problems.append(f"patch {cfg.patch} must be smaller than crop {cfg.crop}")
    if not 0 <= cfg.flip_p <= 1:
        problems.append(f"flip_p {cfg.flip_p} is not a probability")
    if problems:
        raise ValueError("invalid SampleConfig: " + "; ".join(problems))


# ----------------------------------------------------------------------------- frame layout


class Offsets(NamedTuple):
    """Positions of a sample's frames, counted from its first clip frame at the sampling fps."""

    clip: tuple[int, ...]
    target: int
    motion: int

    @property
    def span(self) -> int:
        """Frames from the first clip frame to the motion frame, both included."""
        return self.motion + 1

    @property
    def indices(self) -> list[int]:
        """The frames to read, in the order :func:`make_sample` expects them."""
        return [*self.clip, self.target, self.motion]


def min_frames(cfg: SampleConfig) -> int:
    """Length of the tightest layout: every gap 1."""
    return cfg.clip_frames + 2


def sample_offsets(num_frames: int, cfg: SampleConfig) -> Offsets:
    """The release's layout, or for a video shorter than ``cfg.span`` the same layout
    shrunk proportionally, so that short clips still give samples with as much temporal
    distance as they have rather than being thrown away."""
    minimum = min_frames(cfg)
    if num_frames < minimum:
        raise ValueError(f"video of {num_frames} frames at {cfg.fps:g} fps is shorter than one sample "
                         f"(at least {minimum} frames: {cfg.clip_frames} clip frames, target, motion frame)")
    full = np.array([cfg.clip_gap, cfg.target_offset, cfg.motion_offset])
    repeats = np.array([cfg.clip_frames - 1, 1, 1])  # how often each distance occurs in the span
    parts = full
    if num_frames < cfg.span:
        parts = np.maximum(1, np.round(full * (num_frames - 1) / (cfg.span - 1))).astype(int)
        # Rounding can overshoot: take frames from whichever distance is furthest above its share.
        while repeats @ parts > num_frames - 1:
            share = np.where((parts > 1) & (repeats > 0), parts / full, -np.inf)
            parts[np.argmax(share)] -= 1
    gap, target, motion = (int(p) for p in parts)
    last_clip = (cfg.clip_frames - 1) * gap
    return Offsets(tuple(range(0, last_clip + 1, gap)), last_clip + target, last_clip + target + motion)


# ----------------------------------------------------------------------------- where the patch goes


def motion_cells(diff: np.ndarray, grid: int) -> np.ndarray:
    """Sum a (crop, crop) difference map over grid x grid equal square cells.

    When the crop is not a multiple of the grid the cells keep the whole-pixel size
    crop // grid and the grid is centred, dropping the few leftover border pixels (the
    release's 26-px cells on a 240 crop) rather than making unequal cells."""
    cell = diff.shape[0] // grid
    m = (diff.shape[0] - grid * cell) // 2
    inner = diff[m:m + grid * cell, m:m + grid * cell]
    return inner.reshape(grid, cell, grid, cell).sum(axis=(1, 3))  # (grid, grid)


def window_scores(cells: np.ndarray, window: int) -> np.ndarray:
    """Motion inside every window x window block of cells: the candidate patch places."""
    return sliding_window_view(cells, (window, window)).sum(axis=(-2, -1))  # (grid-window+1,) * 2


def pick_window(scores: np.ndarray, top_k: int, rng: np.random.Generator) -> tuple[int, int]:
    """A (row, column) drawn uniformly among the ``top_k`` best windows. Ties are broken
    at random, so a static video spreads its patches over the frame instead of
    piling them into the top-left corner."""
    flat = scores.ravel()
    perm = rng.permutation(flat.size)
    best = perm[np.argsort(-flat[perm], kind="stable")[:top_k]]
    i, j = np.unravel_index(rng.choice(best), scores.shape)
    return int(i), int(j)


def patch_theta(diff: np.ndarray, cfg: SampleConfig, rng: np.random.Generator) -> torch.Tensor:
    """The true affine of the query patch: fixed scale, random rotation, translation
    onto a high-motion window of the (crop, crop) difference map ``diff``."""
    scores = window_scores(motion_cells(diff, cfg.motion_grid), cfg.motion_window)
    i, j = pick_window(scores, cfg.motion_top_k, rng)
    positions = cfg.motion_grid - cfg.motion_window
    # Window index -> fraction of the range over which the patch stays inside the
    # crop, jittered by half a window step so patch places are not quantised.
    yx = np.array([i, j]) / positions + rng.uniform(-0.5, 0.5, size=2) / positions
    ty, tx = (2 * np.clip(yx, 0.0, 1.0) - 1) * (1 - cfg.patch_scale)
    angle = math.radians(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    return theta_from_params(torch.tensor([[tx, ty, angle]], dtype=torch.float32), cfg.patch_scale)[0]


# ----------------------------------------------------------------------------- the sample


def make_sample(frames: np.ndarray, cfg: SampleConfig, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One training sample from the (clip_frames + 2, H, W, 3) uint8 frames read at
    ``Offsets.indices``: the clip frames, the target frame, the motion frame.

    Crop and flip are applied to every frame before the motion is measured, so the
    patch is chosen in the coordinates it is cut in and lands on the moving region
    whether or not the sample is flipped.

    Returns ``clip`` (clip_frames, 3, crop, crop), ``target`` (3, crop, crop) and
    ``patch`` (3, patch, patch), floats in [0, 1]; ``theta`` (2, 3) float32 in the
    normalised coordinates of the cropped target; and, to map results back onto the
    video, ``crop_yx`` (top, left) of the crop and ``flipped``.
    """
    expected = cfg.clip_frames + 2
    if frames.ndim != 4 or frames.shape[0] != expected or frames.shape[-1] != 3:
        raise ValueError(f"expected ({expected}, H, W, 3) frames, got {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    c = cfg.crop
    if min(height, width) < c:
        raise ValueError(f"frames of {width}x{height} are smaller than the {c}x{c} crop")
    top, left = int(rng.integers(0, height - c + 1)), int(rng.integers(0, width - c + 1))
    flipped = bool(rng.random() < cfg.flip_p)
    crop = frames[:, top:top + c, left:left + c]
    if flipped:
        crop = crop[:, :, ::-1]
    diff = np.abs(crop[-2].astype(np.int16) - crop[-1].astype(np.int16)).sum(axis=-1)  # (c, c)
    theta = patch_theta(diff, cfg, rng)
    pixels = torch.from_numpy(np.ascontiguousarray(crop[:-1])).permute(0, 3, 1, 2).float().div_(255)  # (T+1, 3, c, c)
    target = pixels[-1]
    return {
        "clip": pixels[:-1],  # (clip_frames, 3, c, c)
        "target": target,
        "patch": sample_patch(target[None], theta[None], (cfg.patch, cfg.patch))[0],  # (3, patch, patch)
        "theta": theta,
        "crop_yx": torch.tensor([top, left]),
        "flipped": torch.tensor(flipped),
    }


# ----------------------------------------------------------------------------- dataset


class KeyedVideoDataset(Dataset):
    """One training sample per video per epoch, reproducible from its key: the reading,
    keying and failure handling that every objective's sampler shares.

    Items are keyed by ``(epoch, i)`` (a plain ``i`` means epoch 0), and item ``i`` of
    an epoch draws everything (start frame, crops, ...) from
    ``np.random.default_rng([seed, epoch, i])``: the same sample whatever the number of
    workers or the order they ask in. The epoch travels in the key rather than living
    in the dataset so that data-loader workers can persist across epochs.

    Videos with fewer than ``minimum`` frames at ``fps`` are left out when the dataset is
    built (counted in ``too_short``). A video that raises :class:`VideoError` when opened
    or read (or turns out shorter than its index said) is logged and replaced by the
    next video; the item's ``skipped`` says how many were passed over. The count travels
    with the batch because a counter kept in a data-loader worker never reaches the
    training loop.

    Subclasses say which frames a sample reads (:meth:`layout`) and what it makes of
    them (:meth:`make`).
    """

    def __init__(
        self,
        videos: VideoIndex | Sequence[VideoInfo],
        fps: float,
        short_side: int,
        minimum: int,
        seed: int = 0,
        open_fn: Callable[..., Video] = open_video,
    ):
        self.fps, self.short_side, self.minimum = fps, short_side, minimum
        self.seed = seed
        self.open_fn = open_fn
        entries = list(getattr(videos, "entries", videos))
        self.videos = [v for v in entries if v.frames_at(fps) >= minimum]
        short = [v.path for v in entries if v.frames_at(fps) < minimum]
        self.too_short = len(short)
        if short:
            log.warning("%d of %d videos are shorter than one sample (%d frames at %g fps) and are left out, e.g. %s",
                        len(short), len(entries), minimum, fps, ", ".join(short[:3]))
        if entries and not self.videos:
            raise ValueError(f"none of the {len(entries)} videos is long enough for one sample "
                             f"({minimum} frames at {fps:g} fps)")

    def layout(self, num_frames: int, rng: np.random.Generator) -> tuple[int, list[int]]:
        """(first frame, the frames to read) of a sample from a video of ``num_frames`` >= minimum."""
        raise NotImplementedError

    def make(self, frames: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The sample from the frames that :meth:`layout` named, (n, H, W, 3) uint8."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        """The sample of video ``i`` in ``epoch`` (key ``(epoch, i)``), or of the next
        readable video; ``index`` says which video it came from and ``start`` its first
        frame at ``fps``."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, i])
        for attempt in range(len(self)):
            index = (i + attempt) % len(self)
            info = self.videos[index]
            try:
                with self.open_fn(info, fps=self.fps, short_side=self.short_side) as video:
                    num_frames = len(video)
                    if num_frames < self.minimum:
                        raise VideoError(info.path, f"{num_frames} frames at {self.fps:g} fps, "
                                                    f"fewer than the {self.minimum} of one sample")
                    start, indices = self.layout(num_frames, rng)
                    frames = video.read(indices)
            except VideoError as err:
                log.warning("skipping video %s: %s", info.path, err.problem if err.path == info.path else err)
                continue
            return {**self.make(frames, rng), "index": index, "start": start, "skipped": attempt}
        raise RuntimeError(f"every one of the {len(self)} videos failed to decode; see the warnings above")


class TimeCycleDataset(KeyedVideoDataset):
    """TimeCycle samples (:func:`make_sample`) from a list of probed videos, one per video
    per epoch, keyed and failing over as :class:`KeyedVideoDataset` says. Videos shorter
    than the release's layout get it shrunk (:func:`sample_offsets`)."""

    def __init__(
        self,
        videos: VideoIndex | Sequence[VideoInfo],
        cfg: SampleConfig,
        seed: int = 0,
        open_fn: Callable[..., Video] = open_video,
    ):
        check_config(cfg)
        self.cfg = cfg
        super().__init__(videos, cfg.fps, cfg.short_side, min_frames(cfg), seed, open_fn)

    def layout(self, num_frames: int, rng: np.random.Generator) -> tuple[int, list[int]]:
        offsets = sample_offsets(num_frames, self.cfg)
        start = int(rng.integers(0, num_frames - offsets.span + 1))
        return start, [start + k for k in offsets.indices]

    def make(self, frames: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return make_sample(frames, self.cfg, rng)


__all__ = [
    "KeyedVideoDataset",
    "Offsets",
    "TimeCycleDataset",
    "check_config",
    "make_sample",
    "min_frames",
    "motion_cells",
    "patch_theta",
    "pick_window",
    "sample_offsets",
    "window_scores",
]
