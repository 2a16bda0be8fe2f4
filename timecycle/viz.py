"""Pictures of what the model does, each written as PNG, GIF or MP4 (:func:`save_picture`).

- the cycle figure, the paper's first figure made from a real sample: the query patch
  on the target frame, where each hop of the longest cycle put it on the way back
  through the clip, and where it came home. TensorBoard shows it during training,
  because a loss curve cannot tell a tracker that follows the object from one that
  learnt to stay put (:func:`cycle_figure`, :func:`model_cycle_figure`);
- the walk figure, its counterpart for the CRW objective: a node of the first frame
  followed by its most likely steps forward through the clip and back home
  (:func:`walk_figure`, :func:`model_walk_figure`);
- masks, keypoints and skeletons drawn over frames (:func:`overlay_mask`,
  :func:`draw_points`, :func:`draw_skeleton`);
- texture propagation: a logo pasted on the first frame as soft labels and carried
  through the video (:func:`texture_labels`, :func:`paste_texture`);
- the affinity of one chosen point across frames (:func:`point_affinity`,
  :func:`affinity_figure`);
- training curves from a run's TensorBoard logs (:func:`training_curves`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from timecycle.data.datasets import davis_palette
from timecycle.model.cycle import long_cycle_frames
from timecycle.model.encoder import l2_normalize, normalize_frames
from timecycle.video import write_video

TRUE_COLOUR = (40, 220, 40)  # where the patch was cut; where a point truly is
BACKWARD_COLOUR = (240, 60, 40)  # hops back in time
FORWARD_COLOUR = (40, 140, 255)  # hops forward again
BONE_COLOUR = (255, 255, 255)
HIDDEN_BONE_COLOUR = (150, 150, 150)  # a bone with an end estimated hidden
# Saturated colours for the logo's squares.
LOGO_COLOURS = ((230, 40, 40), (250, 200, 30), (40, 170, 70), (30, 110, 230), (160, 60, 200), (250, 130, 20))
# The bones of the JHMDB body, as pairs of indices into datasets.JHMDB_JOINTS (neck, belly,
# face, right/left shoulder, right/left hip, right/left elbow, knee, wrist, ankle).
JHMDB_SKELETON = ((0, 2), (0, 1), (0, 3), (0, 4), (1, 5), (1, 6), (3, 7), (7, 11), (4, 8), (8, 12),
                  (5, 9), (9, 13), (6, 10), (10, 14))
_PALETTE = davis_palette()


# ----------------------------------------------------------------------------- the cycle figure


def theta_corners(theta: torch.Tensor, width: int, height: int) -> list[tuple[float, float]]:
    """Pixel corners of the patch that ``theta`` (2, 3) cuts from a width x height frame,
    under the align_corners=False convention (-1 and 1 are the frame's outer edges)."""
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])
    xy = corners @ theta.float().T  # (4, 2) normalised
    return [((x + 1) / 2 * width, (y + 1) / 2 * height) for x, y in xy.tolist()]


def _to_image(frame: torch.Tensor, scale: int = 1) -> Image.Image:
    """(3, H, W) float in [0, 1] -> PIL RGB, enlarged ``scale`` times."""
    array = (frame.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(enlarge(array, scale))


def cycle_figure(clip: torch.Tensor, target: torch.Tensor, cycle_thetas: torch.Tensor,
                 theta_true: torch.Tensor, gap: int = 4, scale: int = 1) -> np.ndarray:
    """The longest cycle drawn on its frames, in time order: clip frames then the target.

    clip (T, 3, S, S) and target (3, S, S) in [0, 1]; cycle_thetas (2T, 2, 3) in the
    hop order of ``long_cycle_frames(T, T)``; theta_true (2, 3). The true patch is a
    green box on the target, backward hops red, forward hops blue. Frames are enlarged
    ``scale`` times before drawing. Returns (sS, (T+1)sS + T*gap, 3) uint8.
    """
    t = clip.shape[0]
    frames = [_to_image(f, scale) for f in (*clip, target)]
    draws = [ImageDraw.Draw(im) for im in frames]
    size = frames[0].size
    draws[t].polygon(theta_corners(theta_true, *size), outline=TRUE_COLOUR, width=2 * scale)
    for hop, (frame_index, theta) in enumerate(zip(long_cycle_frames(t, t), cycle_thetas)):
        colour = BACKWARD_COLOUR if hop < t else FORWARD_COLOUR
        draws[frame_index].polygon(theta_corners(theta, *size), outline=colour, width=scale)
    return strip([np.asarray(im) for im in frames], gap=gap)


@torch.no_grad()
def model_cycle_figure(model: torch.nn.Module, sample: dict, scale: int = 1, gap: int = 4) -> np.ndarray:
    """:func:`cycle_figure` of a TimeCycle model (in eval mode, as at test time) on one
    training sample (``clip``, ``target``, ``patch``, ``theta`` as the dataset gives them)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        clip, target, patch = (normalize_frames(sample[k][None].to(device)) for k in ("clip", "target", "patch"))
        out = model(clip, target, patch, sample["theta"][None].to(device))
    finally:
        model.train(was_training)
    return cycle_figure(sample["clip"], sample["target"], out["cycle_thetas"][0].float().cpu(), sample["theta"],
                        gap=gap, scale=scale)


def walk_figure(frames: torch.Tensor, boxes: torch.Tensor, path: Sequence[int], gap: int = 4,
                scale: int = 1) -> np.ndarray:
    """A palindrome walk 0 -> T-1 -> 0 drawn on its T frames, in time order.

    frames (T, 3, S, S) in [0, 1]; boxes (N, 4) pixel (top, left, height, width) of the
    nodes' windows; path the 2T - 1 nodes visited, in the frames 0, 1, .., T-1, .., 1, 0.
    The start is a green box, steps forward blue, steps back red: a walk that comes home
    ends with a red box just inside the green one. Returns (sS, T sS + (T-1) gap, 3) uint8.
    """
    t = frames.shape[0]
    if len(path) != 2 * t - 1:
        raise ValueError(f"a walk over {t} frames and back visits {2 * t - 1} nodes, got {len(path)}")
    images = [_to_image(f, scale) for f in frames]
    draws = [ImageDraw.Draw(im) for im in images]
    visits = list(range(t)) + list(range(t - 2, -1, -1))  # the frame of each step
    for step, (frame, node) in enumerate(zip(visits, path)):
        top, left, h, w = (float(v) * scale for v in boxes[node])
        colour, width = ((TRUE_COLOUR, 2 * scale) if step == 0 else
                         (FORWARD_COLOUR if step < t else BACKWARD_COLOUR, scale))
        # Nested, so that a node visited on the way out and back shows both boxes inside the start's.
        inset = (0 if step == 0 else 2 if step < t else 3) * scale
        draws[frame].rectangle((left + inset, top + inset, left + w - 1 - inset, top + h - 1 - inset),
                               outline=colour, width=width)
    return strip([np.asarray(im) for im in images], gap=gap)


@torch.no_grad()
def model_walk_figure(model: torch.nn.Module, frames: torch.Tensor, start: int, scale: int = 1,
                      gap: int = 4) -> np.ndarray:
    """:func:`walk_figure` of a CRW model (in eval mode: no edges dropped) on frames
    (T, 3, S, S) in [0, 1] at the model's frame size, from node ``start`` of the first
    frame, each step to the most likely node (the transition's arg-max)."""
    from timecycle.model.crw import grid_boxes

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        nodes = model.embed(normalize_frames(frames[None].to(device), *model.stats))[0]  # (T, N, D)
    finally:
        model.train(was_training)
    path = [start]
    for t in range(len(nodes) - 1):  # forward: the node of t+1 most like the current one
        path.append(int((nodes[t + 1] @ nodes[t][path[-1]]).argmax()))
    for t in range(len(nodes) - 2, -1, -1):  # back home
        path.append(int((nodes[t] @ nodes[t + 1][path[-1]]).argmax()))
    boxes = grid_boxes(model.frame_size, model.patch, model.patch_stride)
    return walk_figure(frames, boxes, path, gap=gap, scale=scale)


# ----------------------------------------------------------------------------- masks, points, skeletons


def overlay_mask(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Objects tinted in their DAVIS palette colours over a (H, W, 3) uint8 frame; the
    background is left as it is, so what the mask covers is what changes."""
    colours = _PALETTE[mask]  # (H, W, 3)
    out = frame.astype(np.float32)
    on = mask > 0
    out[on] = (1 - alpha) * out[on] + alpha * colours[on]
    return out.round().astype(np.uint8)


def draw_points(frame: np.ndarray, points: np.ndarray, visible: np.ndarray, radius: int = 4) -> np.ndarray:
    """Tracked points as dots, each in its own palette colour; hollow where the track
    is estimated to be hidden."""
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    for j, ((x, y), seen) in enumerate(zip(points, visible)):
        colour = point_colour(j)
        box = (x - radius, y - radius, x + radius, y + radius)
        draw.ellipse(box, fill=colour if seen else None, outline=colour, width=2)
    return np.asarray(image)


def point_colour(j: int) -> tuple[int, int, int]:
    """The colour of point ``j`` in :func:`draw_points` and :func:`draw_skeleton`."""
    return tuple(int(c) for c in _PALETTE[1 + j % 20])


def draw_skeleton(frame: np.ndarray, points: np.ndarray, visible: np.ndarray,
                  edges: Sequence[tuple[int, int]] = JHMDB_SKELETON, radius: int = 3,
                  width: int = 2) -> np.ndarray:
    """Keypoints joined by the bones in ``edges`` (pairs of point indices; JHMDB's body
    by default), over a (H, W, 3) uint8 frame. A bone whose ends are both visible is
    drawn in BONE_COLOUR, any other thinner in HIDDEN_BONE_COLOUR; the joints then as
    :func:`draw_points` draws them."""
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    for a, b in sorted(edges, key=lambda e: bool(visible[e[0]] and visible[e[1]])):  # visible bones on top
        seen = bool(visible[a] and visible[b])
        draw.line([tuple(map(float, points[a])), tuple(map(float, points[b]))],
                  fill=BONE_COLOUR if seen else HIDDEN_BONE_COLOUR, width=width if seen else max(1, width // 2))
    return draw_points(np.asarray(image), points, visible, radius=radius)


# ----------------------------------------------------------------------------- texture propagation


def make_logo(size: int = 96, cells: int = 4) -> np.ndarray:
    """A (size, size, 4) RGBA logo to paste and propagate: a disc of ``cells`` x ``cells``
    saturated colour squares in a white ring, transparent around the disc."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    r = np.hypot(xs - size / 2, ys - size / 2) / (size / 2)
    cell = (ys * cells // size).astype(int) * cells + (xs * cells // size).astype(int)
    colours = np.array(LOGO_COLOURS, dtype=np.uint8)
    rgb = colours[(cell + cell // cells) % len(colours)]
    rgb[(r > 0.8) & (r <= 0.95)] = 255
    alpha = np.clip((0.95 - r) * size / 2 + 0.5, 0, 1)  # antialiased edge
    return np.concatenate([rgb, (alpha * 255).round().astype(np.uint8)[..., None]], -1)


TEXTURE_MODES = ("coordinates", "colours")


def texture_labels(texture: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float],
                   mask: np.ndarray | None = None, mode: str = "coordinates") -> np.ndarray:
    """The first frame's labels for texture propagation, (K, H, W) float32: the texture
    ``texture`` (h, w, 3 or 4) uint8 stretched over ``box`` (x0, y0, x1, y1 in pixels,
    x1 and y1 excluded) on a frame of ``size`` (H, W), limited to ``mask`` (H, W) bool
    when given (to paste onto one object only).

    Propagation averages labels, so every channel is premultiplied by the pasted region's
    coverage ``a`` and a background channel ``1 - a`` comes last; :func:`paste_texture`
    divides back. ``mode`` says what is carried:

    - ``'coordinates'`` (u a, v a, a, 1 - a), u, v in [0, 1] across the texture: where in
      the texture each pixel lies. The texture is looked up again at full resolution in
      every frame, so it stays sharp although labels travel on the stride-8 feature grid.
    - ``'colours'`` (r a, g a, b a, a, 1 - a): the texture's colours themselves, as the
      paper's texture figure propagates them; neighbouring colours blur together.
    """
    if mode not in TEXTURE_MODES:
        raise ValueError(f"texture mode {mode!r} unknown; use one of {', '.join(TEXTURE_MODES)}")
    height, width = size
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box} is empty")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(f"box {box} lies outside the {width}x{height} frame")
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
    u, v = (xs - x0) / (x1 - x0), (ys - y0) / (y1 - y0)
    cover = ((u >= 0) & (u < 1) & (v >= 0) & (v < 1)).astype(np.float32)
    if mask is not None:
        cover *= np.asarray(mask, bool)
    if mode == "coordinates":
        channels = [u * cover, v * cover]
    else:
        rgba = _sample(texture, u, v)
        cover *= rgba[..., 3]
        channels = [rgba[..., c] * cover for c in range(3)]
    return np.stack([*channels, cover, 1 - cover]).astype(np.float32)


def paste_texture(frame: np.ndarray, labels: np.ndarray, texture: np.ndarray | None = None) -> np.ndarray:
    """Composite texture labels (see :func:`texture_labels`), given or propagated, over a
    (H, W, 3) uint8 frame. With ``texture`` the labels are coordinates and the texture
    is looked up at them; without, they are colours. The pasted region's coverage is
    ``a / (a + background)``, so a prediction spread thinner still shows where it leans."""
    labels = np.asarray(labels, np.float32)
    cover = np.clip(labels[-2], 0, None)
    share = cover / np.maximum(cover + np.clip(labels[-1], 0, None), 1e-6)
    inside = np.maximum(cover, 1e-6)
    if texture is not None:
        rgba = _sample(texture, labels[0] / inside, labels[1] / inside)
        colour, alpha = rgba[..., :3], share * rgba[..., 3]
    else:
        colour, alpha = np.clip(labels[:3] / inside, 0, 1).transpose(1, 2, 0), share
    out = frame.astype(np.float32) * (1 - alpha[..., None]) + colour * 255 * alpha[..., None]
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def _sample(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear RGBA in [0, 1] of a (h, w, 3 or 4) uint8 texture at u, v in [0, 1]
    (the texture's outer edges); transparent outside it."""
    from scipy.ndimage import map_coordinates

    texture = np.asarray(texture, np.float32) / 255
    if texture.shape[-1] == 3:
        texture = np.concatenate([texture, np.ones(texture.shape[:2] + (1,), np.float32)], -1)
    h, w = texture.shape[:2]
    rows, cols = v * h - 0.5, u * w - 0.5
    out = np.stack([map_coordinates(texture[..., c], [rows, cols], order=1, mode="nearest") for c in range(4)], -1)
    out[..., 3] *= (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    return out


# ----------------------------------------------------------------------------- affinity of one point


@torch.no_grad()
def point_affinity(frames: np.ndarray, point: tuple[float, float], model, temperature: float = 0.05,
                   batch_size: int = 8) -> np.ndarray:
    """Where one point of the first frame goes, as the model sees it: for each frame, the
    softmax over its feature cells of the cosine between the point's feature and each cell
    (over ``temperature``, CRW's 0.05 by default), upsampled bilinearly to the frame.

    ``frames`` (T, H, W, 3) uint8; ``point`` (x, y) in pixels of frame 0 (centres at
    integers); ``model`` maps RGB in [0, 1] to (B, C, h, w) features, as propagation's
    models do. The point's feature is read bilinearly from frame 0's feature map.
    Returns (T, H, W) float32, each frame's map summing to 1 over its cells.
    """
    frames = np.asarray(frames)
    height, width = frames.shape[1:3]
    feats = []
    for i in range(0, len(frames), batch_size):
        x = torch.from_numpy(frames[i:i + batch_size]).permute(0, 3, 1, 2).float() / 255
        feats.append(l2_normalize(model(x).float()))
    feats = torch.cat(feats)  # (T, C, h, w)
    gx, gy = (point[0] + 0.5) / width * 2 - 1, (point[1] + 0.5) / height * 2 - 1
    grid = torch.tensor([[[[gx, gy]]]], dtype=feats.dtype)
    query = l2_normalize(F.grid_sample(feats[:1], grid, mode="bilinear", align_corners=False))[0, :, 0, 0]  # (C,)
    logits = torch.einsum("c,tchw->thw", query, feats) / temperature
    maps = logits.flatten(1).softmax(1).view_as(logits)  # (T, h, w)
    up = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return up.numpy().astype(np.float32)


def heatmap_overlay(frame: np.ndarray, heat: np.ndarray, alpha: float = 0.6, cmap: str = "inferno") -> np.ndarray:
    """A (H, W) map, scaled to its own maximum, in a matplotlib colour map over a grey
    version of the (H, W, 3) uint8 frame."""
    from matplotlib import colormaps

    scaled = heat / max(float(heat.max()), 1e-12)
    colour = colormaps[cmap](scaled)[..., :3] * 255
    grey = frame.astype(np.float32).mean(-1, keepdims=True)
    return np.clip((1 - alpha) * grey + alpha * colour, 0, 255).round().astype(np.uint8)


def affinity_figure(frames: np.ndarray, maps: np.ndarray, point: tuple[float, float],
                    truth: np.ndarray | None = None, count: int = 6, gap: int = 4) -> np.ndarray:
    """A strip of ``count`` frames (evenly spaced, the first included): the first with the
    chosen point (a white cross), the others with :func:`point_affinity`'s maps as heat
    and, given ``truth`` (T, 2) x, y per frame, a green ring where the point really is."""
    picks = frame_picks(len(frames), count)
    panels = []
    for t in picks:
        if t == 0:
            image = Image.fromarray(np.asarray(frames[0]))
            draw = ImageDraw.Draw(image)
            x, y = point
            draw.line([(x - 6, y), (x + 6, y)], fill=(255, 255, 255), width=2)
            draw.line([(x, y - 6), (x, y + 6)], fill=(255, 255, 255), width=2)
        else:
            image = Image.fromarray(heatmap_overlay(np.asarray(frames[t]), maps[t]))
            if truth is not None:
                x, y = truth[t]
                ImageDraw.Draw(image).ellipse((x - 6, y - 6, x + 6, y + 6), outline=TRUE_COLOUR, width=2)
        panels.append(np.asarray(image))
    return strip(panels, gap=gap)


# ----------------------------------------------------------------------------- training curves


def read_scalars(logdir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar of a TensorBoard log folder: tag -> (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    quiet = logging.getLogger("tensorboard")  # it logs each file it finishes at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    finally:
        quiet.setLevel(level)
    out = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        out[tag] = (np.array([p.step for p in points]), np.array([p.value for p in points]))
    return out


def training_curves(logdir: str | Path, path: str | Path, tags: Sequence[str] | None = None) -> dict:
    """Plot the losses (every ``loss/*`` scalar) and the training speed of a run's
    TensorBoard logs to an image file (PNG by the suffix; any format matplotlib
    writes); returns the series plotted, tag -> (steps, values)."""
    from matplotlib.figure import Figure

    scalars = read_scalars(logdir)
    if tags is None:
        tags = sorted(t for t in scalars if t.startswith("loss/")) + [t for t in ("clips_per_s",) if t in scalars]
    series = {t: scalars[t] for t in tags if t in scalars}
    if not series:
        raise ValueError(f"{logdir}: no scalars to plot (found {sorted(scalars) or 'none'})")
    cols = min(3, len(series))
    rows = -(-len(series) // cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), dpi=100, layout="constrained")
    for i, (tag, (steps, values)) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(steps, values, lw=1.2, marker="o" if len(steps) < 30 else None, ms=3)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return series


# ----------------------------------------------------------------------------- writing pictures


def frame_picks(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames, first and last included."""
    if total <= count:
        return list(range(total))
    return sorted({round(float(i)) for i in np.linspace(0, total - 1, count)})


def strip(images: Sequence[np.ndarray], gap: int = 4, background: int = 255) -> np.ndarray:
    """Images side by side (heights must agree), ``gap`` pixels of ``background`` between."""
    images = [np.asarray(im) for im in images]
    height = images[0].shape[0]
    if any(im.shape[0] != height for im in images):
        raise ValueError(f"images of different heights: {[im.shape[0] for im in images]}")
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    out = np.full((height, width, 3), background, np.uint8)
    x = 0
    for im in images:
        out[:, x:x + im.shape[1]] = im[..., :3]
        x += im.shape[1] + gap
    return out


def enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    """Pixels repeated ``factor`` times along each side (no smoothing): small frames made visible."""
    return np.asarray(image).repeat(factor, 0).repeat(factor, 1) if factor > 1 else np.asarray(image)


def save_picture(path: str | Path, frames: np.ndarray | Sequence[np.ndarray], fps: float = 12.0,
                 count: int = 6) -> Path:
    """Write a picture by its suffix: ``.png`` an image ((H, W, 3) uint8), or for frames a
    strip of ``count`` of them; ``.gif`` (looping) and ``.mp4`` every frame at ``fps``
    (mp4 crops an odd last row or column: its colour format needs even sizes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    single = isinstance(frames, np.ndarray) and frames.ndim == 3
    suffix = path.suffix.lower()
    if suffix == ".png":
        image = frames if single else strip([frames[t] for t in frame_picks(len(frames), count)])
        Image.fromarray(np.asarray(image, np.uint8)).save(path)
    elif suffix == ".gif":
        images = [Image.fromarray(np.asarray(f, np.uint8)) for f in ([frames] if single else frames)]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                       optimize=False)
    elif suffix == ".mp4":
        seq = [frames] if single else frames
        write_video(path, (np.asarray(f)[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in seq), fps)
    else:
        raise ValueError(f"{path}: write pictures as .png, .gif or .mp4")
    return path
