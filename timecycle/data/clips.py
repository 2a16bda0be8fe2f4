"""The CRW training clip (METHOD.md section 6): T consecutive frames and a grid of nodes per frame.

Not the TimeCycle sampler: no target frame, no query patch, no motion search. A clip is
``clip_len`` consecutive frames at ``fps`` (8 in the release), each cut from the video by
its own random resized crop, so that neighbouring frames differ by a small random zoom
and shift on top of the video's own motion. Each frame's nodes are the windows of a
regular grid, each jittered by its own random resized crop inside its window, so that
no two nodes line up pixel for pixel across frames.

Everything random is drawn here, from the item's keyed generator (so a resumed run
draws what an uninterrupted one would); the frames are cropped and resized here, and
the patches are cut later on the batch's device from the returned affines
(:func:`timecycle.model.crw.cut_patches`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from timecycle.config import CRWConfig
from timecycle.data.sampling import KeyedVideoDataset
from timecycle.model.crw import box_thetas, check_config, grid_boxes
from timecycle.video import Video, VideoInfo, open_video

if TYPE_CHECKING:
    from timecycle.video import VideoIndex


def random_resized_boxes(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], n: int,
                         rng: np.random.Generator) -> np.ndarray:
    """(n, 4) int boxes (top, left, height, width) inside a height x width image, drawn
    as torchvision's RandomResizedCrop draws them: area share uniform in ``scale``,
    aspect ratio (width / height) log-uniform in ``ratio``, up to 10 tries for a box that
    fits, else the largest central box of an aspect ratio within ``ratio``. Vectorised
    over the n boxes (the same distribution; not the same numbers as torchvision)."""
    tries = 10
    area = height * width * rng.uniform(*scale, size=(n, tries))
    aspect = np.exp(rng.uniform(*np.log(ratio), size=(n, tries)))
    ws = np.round(np.sqrt(area * aspect)).astype(int)
    hs = np.round(np.sqrt(area / aspect)).astype(int)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = fits.argmax(1)  # the first try that fits (0 when none does)
    h, w = hs[np.arange(n), first], ws[np.arange(n), first]
    top = rng.integers(0, height - np.where(fits.any(1), h, 0) + 1)
    left = rng.integers(0, width - np.where(fits.any(1), w, 0) + 1)
    # The fallback, for rows where no try fits.
    if width / height < ratio[0]:
        fh, fw = round(width / ratio[0]), width
    elif width / height > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fh, fw = height, width
    none = ~fits.any(1)
    h, w = np.where(none, fh, h), np.where(none, fw, w)
    top, left = np.where(none, (height - fh) // 2, top), np.where(none, (width - fw) // 2, left)
    return np.stack([top, left, h, w], 1)


def make_clip(frames: np.ndarray, cfg: CRWConfig, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One training clip from (clip_len, H, W, 3) uint8 consecutive frames.

    Returns ``clip`` (T, 3, S, S) floats in [0, 1], each frame its own random resized crop
    resized to S = ``frame_size`` (bilinear, antialiased); ``patch_theta`` (T, N, 2, 3)
    float32, the affine (normalised coordinates of the resized frame) of each node's
    jittered patch, N = grid ** 2 row-major; and ``frame_boxes`` (T, 4), where each frame
    was cut from the video (top, left, height, width in video pixels).
    """
    t = cfg.clip_len
    if frames.ndim != 4 or frames.shape[0] != t or frames.shape[-1] != 3:
        raise ValueError(f"expected ({t}, H, W, 3) frames, got {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    s = cfg.frame_size
    boxes = random_resized_boxes(height, width, cfg.frame_scale, cfg.frame_ratio, t, rng)
    clip = torch.empty(t, 3, s, s)
    for k, (top, left, h, w) in enumerate(boxes):
        crop = torch.from_numpy(np.ascontiguousarray(frames[k, top:top + h, left:left + w]))
        crop = crop.permute(2, 0, 1)[None].float()  # (1, 3, h, w)
        clip[k] = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
    clip = clip.div_(255).clamp_(0, 1)

    windows = grid_boxes(s, cfg.patch, cfg.patch_stride)  # (N, 4)
    n = windows.shape[0]
    jitter = torch.from_numpy(random_resized_boxes(cfg.patch, cfg.patch, cfg.patch_scale, cfg.patch_ratio, t * n,
                                                   rng)).float().view(t, n, 4)
    patches = jitter + torch.cat([windows[:, :2], torch.zeros(n, 2)], 1)  # offset into each window
    return {
        "clip": clip,
        "patch_theta": box_thetas(patches, s, s),  # (T, N, 2, 3)
        "frame_boxes": torch.from_numpy(boxes),
    }


class CRWClipDataset(KeyedVideoDataset):
    """CRW clips (:func:`make_clip`) from a list of probed videos, one per video per epoch,
    keyed and failing over as :class:`~timecycle.data.sampling.KeyedVideoDataset` says.
    The clip starts at a uniformly drawn frame; videos shorter than ``clip_len`` frames at
    ``fps`` are left out."""

    def __init__(
        self,
        videos: VideoIndex | Sequence[VideoInfo],
        cfg: CRWConfig,
        seed: int = 0,
        open_fn: Callable[..., Video] = open_video,
    ):
        check_config(cfg)
        self.cfg = cfg
        super().__init__(videos, cfg.fps, cfg.short_side, cfg.clip_len, seed, open_fn)

    def layout(self, num_frames: int, rng: np.random.Generator) -> tuple[int, list[int]]:
        start = int(rng.integers(0, num_frames - self.cfg.clip_len + 1))
        return start, list(range(start, start + self.cfg.clip_len))

    def make(self, frames: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return make_clip(frames, self.cfg, rng)


__all__ = ["CRWClipDataset", "make_clip", "random_resized_boxes"]
