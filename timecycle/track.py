"""Carry a first-frame mask or a set of points through a video and write the results
where users and the official tools expect them: indexed-palette PNGs for masks, JSON for
point tracks, and an overlay video to look at. The ``timecycle propagate`` command is a
thin shell around these two functions.
"""
from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from timecycle.data.datasets import read_mask, save_indexed_png
from timecycle.propagate import propagate, to_points
from timecycle.video import Video, probe, write_video
from timecycle.viz import draw_points, overlay_mask

# A point's label is a Gaussian of this many pixels at the input's resolution: half a
# feature cell at stride 8, the keypoint protocol's sigma (METHOD.md section 7).
POINT_SIGMA = 4.0
# A point is estimated hidden when its heatmap peak falls below this share of its peak
# in frame 1: frame 0's labels are given at full resolution, later ones come through the
# stride-8 feature grid, which lowers a narrow peak by itself.
VISIBLE_SHARE = 0.5


class _KeptFrames(Video):
    """A video that keeps each frame it decodes until taken: propagation reads the
    frames (a batch ahead of its predictions), and the overlay takes them back in
    order, so the video is decoded once and only a batch of frames is ever held."""

    def __init__(self, path: str | Path):
        super().__init__(probe(path))
        self.kept: deque[np.ndarray] = deque()

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in super().__iter__():
            self.kept.append(frame)
            yield frame


def _write_streaming(out: Path, overlay: bool, results: Iterator[np.ndarray], fps: float) -> None:
    """Drain ``results`` (overlay frames, produced while other outputs are written), into
    out/overlay.mp4 when ``overlay``, else just for their side effects."""
    if overlay:
        write_video(out / "overlay.mp4", results, fps)
    else:
        deque(results, maxlen=0)


def track_mask(video: str | Path, mask: str | Path | np.ndarray, model, out: str | Path,
               preset: str = "crw", overlay: bool = True, device: str = "cpu", **overrides) -> dict:
    """Write out/masks/00000.png ... (palette PNGs of object ids) and, with ``overlay``,
    out/overlay.mp4, each frame as soon as it is predicted; return a summary."""
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    first = read_mask(mask) if isinstance(mask, (str, Path)) else np.asarray(mask)
    count = 0

    def overlays() -> Iterator[np.ndarray]:
        nonlocal count
        for t, predicted in enumerate(propagate(frames, first, model, preset, device=device, **overrides)):
            save_indexed_png(out / "masks" / f"{t:05d}.png", predicted.astype(np.uint8))
            count = t + 1
            yield _even(overlay_mask(frames.kept.popleft(), predicted))

    with _KeptFrames(video) as frames:
        _write_streaming(out, overlay, overlays(), frames.fps)
    return {"frames": count, "objects": int(np.count_nonzero(np.unique(first))), "masks": str(out / "masks"),
            "overlay": str(out / "overlay.mp4") if overlay else None}


def read_points(path: str | Path) -> np.ndarray:
    """(N, 2) x, y from a JSON file: ``[[x, y], ...]`` or ``{"points": [[x, y], ...]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file of points ({exc})") from None
    points = np.asarray(data["points"] if isinstance(data, dict) else data, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError(f"{path}: expected a list of [x, y] pairs, got an array of shape {points.shape}")
    return points


def point_heatmaps(points: np.ndarray, height: int, width: int, sigma: float = POINT_SIGMA) -> np.ndarray:
    """(N, 2) x, y -> (N + 1, H, W) float32: a Gaussian per point and a background
    channel, so propagation has somewhere to put what no point claims."""
    ys, xs = np.mgrid[0:height, 0:width]
    d2 = (xs[None] - points[:, 0, None, None]) ** 2 + (ys[None] - points[:, 1, None, None]) ** 2
    maps = np.exp(-d2 / (2 * sigma**2)).astype(np.float32)  # (N, H, W)
    background = np.clip(1 - maps.sum(0, keepdims=True), 0, 1)
    return np.concatenate([maps, background])


def track_points(video: str | Path, points: np.ndarray, model, out: str | Path, preset: str = "crw",
                 overlay: bool = True, device: str = "cpu", **overrides) -> dict:
    """Write out/points.json: per frame, each point's x, y, an estimated visibility and
    its score (heatmap peak over frame 1's); with ``overlay``, out/overlay.mp4."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tracks: list[dict] = []

    def overlays() -> Iterator[np.ndarray]:
        reference = None
        for t, heat in enumerate(propagate(frames, labels, model, preset, device=device, **overrides)):
            maps = heat[:-1]  # (N, H, W): the background channel is only there to absorb
            peak = maps.reshape(len(maps), -1).max(1)
            if t == 1:  # the first frame to come through the stride-8 grid, like every later one
                reference = peak
            score = np.ones_like(peak) if t == 0 else peak / np.maximum(reference, 1e-12)
            xy = to_points(maps)
            visible = score >= VISIBLE_SHARE
            tracks.append({"frame": t, "points": [
                {"x": float(x), "y": float(y), "visible": bool(v), "score": float(s)}
                for (x, y), v, s in zip(xy, visible, score)]})
            yield _even(draw_points(frames.kept.popleft(), xy, visible))

    with _KeptFrames(video) as frames:
        width, height = frames.size
        bad = [p for p in points if not (0 <= p[0] < width and 0 <= p[1] < height)]
        if bad:
            raise ValueError(f"point {tuple(bad[0])} lies outside the {width}x{height} first frame")
        labels = point_heatmaps(points, height, width)
        _write_streaming(out, overlay, overlays(), frames.fps)
    (out / "points.json").write_text(json.dumps({"video": str(video), "tracks": tracks}, indent=1))
    return {"frames": len(tracks), "points": len(points), "tracks": str(out / "points.json"),
            "overlay": str(out / "overlay.mp4") if overlay else None}


def _even(frame: np.ndarray) -> np.ndarray:
    """Crop a pixel off odd sides: mp4's 4:2:0 colour needs even sizes."""
    height, width = frame.shape[:2]
    return frame[: height - height % 2, : width - width % 2]
