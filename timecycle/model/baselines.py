"""The raw-pixel baseline: what propagation achieves with no learning at all.

Frames become CIE Lab colour averaged over 8x8 cells, the same stride as the learned
encoders, so any gain of a learned model over this one is what learning adds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# sRGB (D65) -> XYZ, and the D65 white point.
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIE Lab (L in [0, 100], a and b about +-100)."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(rgb), linear) / _WHITE.to(rgb)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


class LabPixels(nn.Module):
    """RGB in [0, 1] -> (B, 3, ceil(H/8), ceil(W/8)) Lab colour, centred so that cosine
    similarity compares colours rather than brightness alone."""

    arch = "pixels"
    stride = 8

    def forward(self, frames: Tensor) -> Tensor:
        lab = rgb_to_lab(frames)
        lab = lab - torch.tensor([50.0, 0.0, 0.0], device=lab.device, dtype=lab.dtype)[:, None, None]
        return F.avg_pool2d(lab, self.stride, ceil_mode=True)  # (B, 3, h, w)
