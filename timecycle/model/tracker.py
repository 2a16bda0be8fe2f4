"""The differentiable tracker: one hop of a cycle, from a patch's features to where it is in a frame.

A hop compares every cell of the query patch with every cell of the frame (softmax
affinity), lets a small CNN (the localiser) read the affinity and regress a rigid motion
(tx, ty, angle) at the fixed patch scale, and bilinearly samples the frame's features
under that motion: the sampled patch is the query of the next hop.

Coordinate convention (the whole project uses it, pixels and features alike): theta acts
on torch's normalised coordinates with ``align_corners=False`` (``config.ALIGN_CORNERS``),
so -1 and +1 are the outer *edges* of the first and last pixel or feature cell. At stride
8 with that convention a normalised coordinate names the same physical point in the
240x240 frame and in its 30x30 feature grid, so the theta that cuts the 80x80 query patch
out of the frame's pixels also cuts its 10x10 features out of the frame's features, and
theta = [[1/3, 0, 0], [0, 1/3, 0]] is an exact crop (no interpolation) of the central
80x80 pixels and the central 10x10 cells. The release used ``align_corners=True``, under
which -1/+1 are the centres of the border pixels or cells: the same theta then names
points that differ between pixels and features by up to 3.5 px at the frame border
(none at the centre), and the 80-px crop is resampled by 79.67/79. The data sampler
warps pixels with the same flag, so both sides agree.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timecycle.config import ALIGN_CORNERS, TrackerConfig
from timecycle.model.encoder import l2_normalize


def affinity(query: Tensor, frame: Tensor, temperature: float | None = None) -> Tensor:
    """Softmax over frame positions of the cosine similarity of each query cell with each frame cell.

    query (B, C, h, w) and frame (B, C, H, W) are unit length per cell. Returns (B, H*W, h, w),
    frame positions in row-major order as channels: the layout the localiser convolves.
    The default temperature C ** -0.5 scales cosines like a dot product of unnormalised
    C-dimensional vectors would be (the release's choice).
    """
    b, c, h, w = query.shape
    t = c**-0.5 if temperature is None else temperature
    logits = torch.bmm(frame.flatten(2).transpose(1, 2), query.flatten(2)) / t  # (B, HW, hw)
    return logits.softmax(dim=1).reshape(b, -1, h, w)


def theta_from_params(params: Tensor, scale: float) -> Tensor:
    """(B, 3) as (tx, ty, angle in radians) -> (B, 2, 3) rotation + translation at a fixed scale.

    theta maps the patch's normalised coordinates to the frame's (torch's affine_grid
    convention): a patch point p lands at scale * R(angle) p + t in the frame.
    """
    tx, ty, angle = params.unbind(-1)
    cos, sin = angle.cos() * scale, angle.sin() * scale
    rows = (torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1))
    return torch.stack(rows, -2)


def sample_patch(x: Tensor, theta: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly sample an (h, w) patch of x (B, C, H, W) under theta (B, 2, 3); outside is zero.

    Usable for pixels and features alike; both must use ``config.ALIGN_CORNERS``.
    """
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], *size], align_corners=ALIGN_CORNERS)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=ALIGN_CORNERS)


class Localiser(nn.Module):
    """Reads an affinity (B, H*W, h, w) and regresses (tx, ty, angle).

    Two unpadded k x k convolutions shrink the patch grid by 2 (k - 1) cells a side
    (10 -> 7 -> 4 for k = 4), so the grid must be at least 2 (k - 1) + 1 cells a side
    (7 for k = 4, i.e. a 56-px patch at stride 8); smaller grids raise a ValueError at
    construction rather than silently changing the architecture: choose a smaller
    ``kernel`` for them. The input channels and the flatten size follow from the grids
    given, so any training resolution works, but a localiser only reads the grids it
    was built for.
    """

    def __init__(
        self,
        frame_cells: int,
        patch_grid: tuple[int, int],
        channels: tuple[int, int] = (128, 64),
        kernel: int = 4,
        negative_slope: float = 0.1,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        h, w = patch_grid
        shrink = 2 * (kernel - 1)
        if min(h, w) <= shrink:
            raise ValueError(
                f"patch grid {h}x{w} is too small for two {kernel}x{kernel} convolutions: "
                f"it needs at least {shrink + 1} cells a side; use a larger patch or a smaller kernel"
            )
        self.frame_cells, self.patch_grid = frame_cells, (h, w)
        c1, c2 = channels
        self.convs = nn.Sequential(
            nn.Conv2d(frame_cells, c1, kernel, bias=False),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(c1, c2, kernel, bias=False),
            nn.LeakyReLU(negative_slope),
        )
        self.head = nn.Linear(c2 * (h - shrink) * (w - shrink), 3)
        # Near-zero output: the first hops predict the centred, unrotated crop.
        nn.init.normal_(self.head.weight, 0.0, init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, aff: Tensor) -> Tensor:
        expected = (self.frame_cells, *self.patch_grid)
        if tuple(aff.shape[1:]) != expected:
            got = tuple(aff.shape)
            raise ValueError(f"localiser built for affinities of shape (B, {expected}), got {got}")
        return self.head(self.convs(aff).flatten(1))  # (B, 3)


class Hop(NamedTuple):
    affinity: Tensor  # (B, H*W, h, w)
    theta: Tensor  # (B, 2, 3)
    patch: Tensor  # (B, C, h, w), unit length per cell


class Tracker(nn.Module):
    """One hop: affinity, localiser, sampling. A single instance (one localiser) serves every hop."""

    def __init__(
        self,
        frame_grid: tuple[int, int],
        patch_grid: tuple[int, int],
        scale: float,
        cfg: TrackerConfig | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or TrackerConfig()
        self.frame_grid, self.patch_grid, self.scale = tuple(frame_grid), tuple(patch_grid), scale
        self.temperature = cfg.temperature
        self.localiser = Localiser(
            frame_grid[0] * frame_grid[1], self.patch_grid, tuple(cfg.channels), cfg.kernel,
            cfg.negative_slope, cfg.init_std,
        )

    def forward(self, query: Tensor, frame: Tensor, frame_unit: Tensor | None = None) -> Hop:
        """Track query (B, C, h, w), unit length per cell, into frame (B, C, H, W), post-ReLU features.

        ``frame_unit`` is l2_normalize(frame), passed in when a frame serves several hops.
        The patch is sampled from the un-normalised map and then normalised per cell, so a
        cell between two feature vectors is their interpolation's direction.
        """
        if frame_unit is None:
            frame_unit = l2_normalize(frame)
        aff = affinity(query, frame_unit, self.temperature)  # (B, HW, h, w)
        theta = theta_from_params(self.localiser(aff), self.scale)  # (B, 2, 3)
        patch = l2_normalize(sample_patch(frame, theta, self.patch_grid))  # (B, C, h, w)
        return Hop(aff, theta, patch)
