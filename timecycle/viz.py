"""Pictures of what the model does.

The cycle figure is the paper's first figure made from a real batch: the query patch
on the target frame, where each hop of the longest cycle put it on the way back
through the clip, and where it came home. It is what TensorBoard shows during
training, because a loss curve cannot tell a tracker that follows the object from one
that learnt to stay put.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from timecycle.data.datasets import davis_palette
from timecycle.model.cycle import long_cycle_frames

TRUE_COLOUR = (40, 220, 40)  # where the patch was cut
BACKWARD_COLOUR = (240, 60, 40)  # hops back in time
FORWARD_COLOUR = (40, 140, 255)  # hops forward again


def theta_corners(theta: torch.Tensor, width: int, height: int) -> list[tuple[float, float]]:
    """Pixel corners of the patch that ``theta`` (2, 3) cuts from a width x height frame,
    under the align_corners=False convention (-1 and 1 are the frame's outer edges)."""
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])
    xy = corners @ theta.float().T  # (4, 2) normalised
    return [((x + 1) / 2 * width, (y + 1) / 2 * height) for x, y in xy.tolist()]


def _to_image(frame: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> PIL RGB."""
    array = (frame.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def cycle_figure(clip: torch.Tensor, target: torch.Tensor, cycle_thetas: torch.Tensor,
                 theta_true: torch.Tensor, gap: int = 4) -> np.ndarray:
    """The longest cycle drawn on its frames, in time order: clip frames then the target.

    clip (T, 3, S, S) and target (3, S, S) in [0, 1]; cycle_thetas (2T, 2, 3) in the
    hop order of ``long_cycle_frames(T, T)``; theta_true (2, 3). Returns (S, (T+1)S +
    T*gap, 3) uint8.
    """
    t = clip.shape[0]
    frames = [_to_image(f) for f in (*clip, target)]
    draws = [ImageDraw.Draw(im) for im in frames]
    size = frames[0].size
    draws[t].polygon(theta_corners(theta_true, *size), outline=TRUE_COLOUR, width=2)
    for hop, (frame_index, theta) in enumerate(zip(long_cycle_frames(t, t), cycle_thetas)):
        colour = BACKWARD_COLOUR if hop < t else FORWARD_COLOUR
        draws[frame_index].polygon(theta_corners(theta, *size), outline=colour, width=1)
    width, height = size
    canvas = Image.new("RGB", ((t + 1) * width + t * gap, height), (255, 255, 255))
    for i, im in enumerate(frames):
        canvas.paste(im, (i * (width + gap), 0))
    return np.asarray(canvas)


def overlay_mask(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Objects tinted in their DAVIS palette colours over a (H, W, 3) uint8 frame; the
    background is left as it is, so what the mask covers is what changes."""
    colours = davis_palette()[mask]  # (H, W, 3)
    out = frame.astype(np.float32)
    on = mask > 0
    out[on] = (1 - alpha) * out[on] + alpha * colours[on]
    return out.round().astype(np.uint8)


def draw_points(frame: np.ndarray, points: np.ndarray, visible: np.ndarray, radius: int = 4) -> np.ndarray:
    """Tracked points as dots, each in its own palette colour; hollow where the track
    is estimated to be hidden."""
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    palette = davis_palette()
    for j, ((x, y), seen) in enumerate(zip(points, visible)):
        colour = tuple(int(c) for c in palette[1 + j % 20])
        box = (x - radius, y - radius, x + radius, y + radius)
        draw.ellipse(box, fill=colour if seen else None, outline=colour, width=2)
    return np.asarray(image)
