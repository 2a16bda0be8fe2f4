"""Procedural videos with exact ground truth, written in the official benchmark layouts.

Every clip is a stack of opaque layers: an endless textured background that may pan,
and textured foreground objects under smooth affine motion, in a fixed depth order.
Each layer's texture and shape are continuous functions of the layer's own
coordinates, and each frame is rendered by inverse mapping (every pixel centre is
mapped back into the nearest layer that covers it), so masks, keypoints, flow and
occlusion follow from the known motions exactly rather than from estimation. That
makes the clips a check of the whole pipeline (training, label propagation,
metrics) whose correct answer is known.

Coordinates are pixels, x along the width, 0-based with pixel centres at integers; a
point is inside the frame when its nearest pixel is, i.e. x in [-0.5, W - 0.5).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from timecycle.data.datasets import save_indexed_png, write_flo
from timecycle.video import write_video


@dataclass
class SyntheticConfig:
    """What a clip looks like; the seed is given separately so one config makes a set."""

    height: int = 128
    width: int = 128
    frames: int = 64
    num_objects: int = 3
    keypoints_per_object: int = 5  # 3 objects x 5 = the 15 joints of JHMDB
    object_radius: tuple[float, float] = (0.10, 0.22)  # range, fraction of min(height, width)
    speed: float = 1.5  # mean object translation, pixels per frame
    wobble: float = 4.0  # pixels of smooth deviation from a straight path
    rotation_speed: float = 2.0  # largest steady rotation, degrees per frame
    scale_change: float = 0.25  # object scale oscillates within exp(+-this)
    pan_speed: float = 1.0  # background translation, pixels per frame; 0 for a still camera
    first_frame_objects: bool = False  # object centres start inside the frame, as DAVIS needs
    texture_scales: tuple[float, ...] = (32.0, 16.0, 8.0, 4.0)  # pixels between noise lattice points
    contrast: float = 40.0  # std of each texture channel's lattice values, grey levels
    fps: float = 12.0

    def __post_init__(self) -> None:
        if self.frames < 2 or self.height < 2 or self.width < 2:
            raise ValueError("a clip needs at least 2 frames of at least 2x2 pixels")
        if not 0 <= self.num_objects <= 254:
            raise ValueError(f"num_objects must be in 0..254 for uint8 masks, got {self.num_objects}")


@dataclass
class SyntheticClip:
    """A rendered clip and its ground truth; ``name`` becomes the sequence folder."""

    name: str
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    masks: np.ndarray  # (T, H, W) uint8, 0 background, 1..K objects after occlusion
    keypoints: np.ndarray  # (T, K*P, 2) float32 x, y; points of object k are rows (k-1)*P .. k*P-1
    visible: np.ndarray  # (T, K*P) bool: inside the frame and not covered by a nearer object
    flow: np.ndarray  # (T-1, H, W, 2) float32 forward flow t -> t+1, u along x, v along y
    occlusion: np.ndarray  # (T-1, H, W) bool, the point of pixel t is hidden or outside at t+1
    fps: float


@dataclass(frozen=True)
class _Shape:
    """A star-shaped region around the local origin, given by its boundary's radius
    along each direction; star-shapedness makes containment one comparison and
    puts every point between the origin and the boundary inside."""

    radius: float  # local pixels
    sides: int  # > 0: a regular polygon; 0: a smooth curve with the harmonics below
    orders: np.ndarray  # (n,) int
    amplitudes: np.ndarray  # (n,), sum < 1 keeps the radius positive
    phases: np.ndarray  # (n,)

    def boundary(self, phi: np.ndarray) -> np.ndarray:
        if self.sides:
            sector = 2 * math.pi / self.sides
            half = sector / 2
            offset = np.mod(phi - self.phases[0], sector) - half
            return self.radius * math.cos(half) / np.cos(offset)
        wave = np.cos(np.multiply.outer(phi, self.orders) + self.phases) @ self.amplitudes
        return self.radius * (1 + wave)

    def contains(self, q: np.ndarray) -> np.ndarray:  # (N, 2) local -> (N,) bool
        # Only points within the largest boundary radius need the angle: most of a frame is not.
        reach = self.radius * (1 if self.sides else 1 + np.abs(self.amplitudes).sum())
        distance = np.hypot(q[:, 0], q[:, 1])
        near = np.flatnonzero(distance < reach)
        inside = np.zeros(len(q), dtype=bool)
        inside[near] = distance[near] < self.boundary(np.arctan2(q[near, 1], q[near, 0]))
        return inside


@dataclass(frozen=True)
class _Texture:
    """Colour value noise: random colours on a few rotated square lattices of different
    spacing, blended with a fade that is flat to second order at lattice points. No
    direction or period stands out, so patches are distinctive for matching (a sum of
    plane waves looks like plaid), and the field is smooth (C2), so bilinear
    resampling of a rendered frame stays close to it. Lattices wrap around, which
    repeats the pattern only after ``_LATTICE`` lattice steps."""

    base: np.ndarray  # (3,) grey levels
    to_lattice: np.ndarray  # (O, 2, 2) local pixels -> lattice units, rotated per octave
    shift: np.ndarray  # (O, 2)
    values: np.ndarray  # (O, (_LATTICE+1)**2, 3) float32 at y * (_LATTICE+1) + x; edge rows wrap

    def __call__(self, q: np.ndarray) -> np.ndarray:  # (M, 2) local -> (M, 3) grey levels
        row = _LATTICE + 1
        out = np.zeros((len(q), 3), dtype=np.float32)
        for matrix, shift, values in zip(self.to_lattice, self.shift, self.values):
            g = _linear(q, matrix, shift) % _LATTICE  # (M, 2)
            cell = np.minimum(np.floor(g), _LATTICE - 1)  # a tiny negative g wraps to exactly _LATTICE
            f = (g - cell).astype(np.float32)
            w = f * f * f * (f * (6 * f - 15) + 10)  # quintic fade
            wx, wy = w[:, :1], w[:, 1:]
            i = (cell[:, 1] * row + cell[:, 0]).astype(np.intp)
            top = values[i]
            top += (values[i + 1] - top) * wx
            bottom = values[i + row]
            bottom += (values[i + row + 1] - bottom) * wx
            out += top + (bottom - top) * wy
        return out + self.base


_LATTICE = 64


class _Scene:
    """Layers with their per-frame affine maps local -> image: p = M[t, l] q + c[t, l].

    Layer 0 is the background, layer k the object with mask id k."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        t = np.arange(cfg.frames, dtype=np.float64)
        layers = cfg.num_objects + 1
        self.matrix = np.zeros((cfg.frames, layers, 2, 2))
        self.offset = np.zeros((cfg.frames, layers, 2))
        self.textures = [self._texture(rng)]
        self.matrix[:, 0] = np.eye(2)
        direction = rng.uniform(0, 2 * math.pi)
        self.offset[:, 0] = cfg.pan_speed * np.outer(t, [math.cos(direction), math.sin(direction)])
        self.offset[:, 0] += _wander(rng, t, cfg.wobble if cfg.pan_speed else 0.0)
        self.shapes: list[_Shape] = []
        for k in range(1, layers):
            self.shapes.append(self._shape(rng))
            self.textures.append(self._texture(rng))
            self.matrix[:, k], self.offset[:, k] = self._motion(rng, t)
        self.inverse = np.linalg.inv(self.matrix)
        self.depth_order = rng.permutation(np.arange(1, layers))  # far to near

    def _shape(self, rng: np.random.Generator) -> _Shape:
        cfg = self.cfg
        radius = rng.uniform(*cfg.object_radius) * min(cfg.height, cfg.width)
        kind = rng.integers(4)
        if kind == 0:  # polygon
            sides = int(rng.integers(3, 8))
            return _Shape(radius, sides, np.zeros(1, int), np.zeros(1), rng.uniform(0, 2 * math.pi, 1))
        if kind == 1:  # ellipse (the motion's aspect ratio stretches the circle)
            return _Shape(radius, 0, np.zeros(0, int), np.zeros(0), np.zeros(0))
        if kind == 2:  # star
            points = rng.integers(4, 8, size=1)
            return _Shape(radius, 0, points, rng.uniform(0.3, 0.45, 1), rng.uniform(0, 2 * math.pi, 1))
        orders = np.arange(2, 6)  # blob
        amplitudes = rng.dirichlet(np.ones(4)) * rng.uniform(0.15, 0.35)
        return _Shape(radius, 0, orders, amplitudes, rng.uniform(0, 2 * math.pi, 4))

    def _texture(self, rng: np.random.Generator) -> _Texture:
        scales = np.asarray(self.cfg.texture_scales, dtype=np.float64)
        to_lattice = _rotation(rng.uniform(0, 2 * math.pi, len(scales))) / scales[:, None, None]
        # Amplitude grows with the spacing, as in natural images: coarse octaves lay out a
        # pattern that does not repeat, fine ones add the detail that pins a match down.
        amplitude = self.cfg.contrast * np.sqrt(scales / scales.sum())
        values = rng.normal(0, 1, (len(scales), _LATTICE, _LATTICE, 3)) * amplitude[:, None, None, None]
        values = np.pad(values, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="wrap")  # spares a modulo per lookup
        shift = rng.uniform(0, _LATTICE, (len(scales), 2))
        base = rng.uniform(70, 185, 3)
        return _Texture(base, to_lattice, shift, values.reshape(len(scales), -1, 3).astype(np.float32))

    def _motion(self, rng: np.random.Generator, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A smooth path through an anchor point inside the frame at an anchor time, so
        that a fast object enters before it and leaves after it."""
        cfg = self.cfg
        size = np.array([cfg.width, cfg.height], dtype=np.float64)
        anchor = rng.uniform(0.2, 0.8, 2) * (size - 1)
        anchor_time = 0.0 if cfg.first_frame_objects else rng.uniform(0, cfg.frames - 1)
        heading = rng.uniform(0, 2 * math.pi)
        velocity = rng.uniform(0.5, 1.5) * cfg.speed * np.array([math.cos(heading), math.sin(heading)])
        wander = _wander(rng, np.append(t, anchor_time), cfg.wobble)  # (T+1, 2)
        centre = anchor + np.outer(t - anchor_time, velocity) + wander[:-1] - wander[-1]

        spin = math.radians(cfg.rotation_speed) * rng.uniform(-1, 1)
        angle = rng.uniform(0, 2 * math.pi) + spin * t + 0.3 * np.sin(_swing(rng, t))
        scale = np.exp(cfg.scale_change * np.sin(_swing(rng, t)))
        aspect = math.exp(rng.uniform(-0.4, 0.4))
        matrix = _rotation(angle) * (scale[:, None, None] * np.array([aspect, 1 / aspect]))  # scales columns
        return matrix, centre

    def to_local(self, p: np.ndarray, t: int, layer: int) -> np.ndarray:  # (N, 2) -> (N, 2)
        return _linear(p - self.offset[t, layer], self.inverse[t, layer])

    def to_image(self, q: np.ndarray, t: int, layer: int) -> np.ndarray:  # (N, 2) -> (N, 2)
        return _linear(q, self.matrix[t, layer], self.offset[t, layer])

    def cover(self, p: np.ndarray, t: int) -> np.ndarray:
        """Id of the nearest layer at each image point of frame t, (N, 2) -> (N,) uint8."""
        labels = np.zeros(len(p), dtype=np.uint8)
        for k in self.depth_order:
            labels[self.shapes[k - 1].contains(self.to_local(p, t, k))] = k
        return labels

    def in_frame(self, p: np.ndarray) -> np.ndarray:  # (N, 2) -> (N,) bool
        x, y = p[:, 0], p[:, 1]
        return (x >= -0.5) & (x < self.cfg.width - 0.5) & (y >= -0.5) & (y < self.cfg.height - 0.5)


def _linear(p: np.ndarray, matrix: np.ndarray, offset: np.ndarray | float = 0.0) -> np.ndarray:
    """``p @ matrix.T + offset`` for (N, 2) points; written out because matmul with an
    inner size of 2 is several times slower on large N."""
    return p[:, :1] * matrix[:, 0] + p[:, 1:] * matrix[:, 1] + offset


def _rotation(angle: np.ndarray) -> np.ndarray:  # (N,) radians -> (N, 2, 2)
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def _swing(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A phase that turns once in 16 to 64 frames, for slow oscillations."""
    return 2 * math.pi * t / rng.uniform(16, 64) + rng.uniform(0, 2 * math.pi)


def _wander(rng: np.random.Generator, t: np.ndarray, amplitude: float) -> np.ndarray:
    """Smooth 2-D deviation of about ``amplitude`` pixels, (T,) -> (T, 2)."""
    return amplitude / 2 * np.stack([np.sin(_swing(rng, t)) + np.sin(_swing(rng, t)) for _ in range(2)], 1)


def generate_clip(cfg: SyntheticConfig, seed: int, name: str | None = None) -> SyntheticClip:
    """Render one clip; the same config and seed give byte-identical arrays."""
    scene = _Scene(cfg, np.random.default_rng(seed))
    T, H, W, K, P = cfg.frames, cfg.height, cfg.width, cfg.num_objects, cfg.keypoints_per_object
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    pixels = np.stack([xs.ravel(), ys.ravel()], 1)  # (H*W, 2)

    # Keypoints between the local origin and the boundary are inside their star-shaped
    # object. Their own stream keeps the scene unchanged when keypoints_per_object changes.
    kp_rng = np.random.default_rng([seed, 1])
    local_keypoints = []
    for shape in scene.shapes:
        phi = kp_rng.uniform(0, 2 * math.pi, P)
        reach = kp_rng.uniform(0.15, 0.75, P) * shape.boundary(phi)
        local_keypoints.append(reach[:, None] * np.stack([np.cos(phi), np.sin(phi)], 1))  # (P, 2)

    frames = np.empty((T, H * W, 3), dtype=np.uint8)
    masks = np.empty((T, H * W), dtype=np.uint8)
    keypoints = np.zeros((T, K * P, 2), dtype=np.float32)
    visible = np.zeros((T, K * P), dtype=bool)
    flow = np.empty((T - 1, H * W, 2), dtype=np.float32)
    occlusion = np.empty((T - 1, H * W), dtype=bool)
    owner = np.repeat(np.arange(1, K + 1), P)  # (K*P,) mask id of each keypoint
    for t in range(T):
        labels = scene.cover(pixels, t)
        masks[t] = labels
        colour = np.empty((H * W, 3))
        target = np.empty((H * W, 2))  # where each pixel's point is at t+1
        for layer in range(K + 1):
            sel = labels == layer
            q = scene.to_local(pixels[sel], t, layer)
            colour[sel] = scene.textures[layer](q)
            if t + 1 < T:
                target[sel] = scene.to_image(q, t + 1, layer)
        frames[t] = np.clip(np.rint(colour), 0, 255)
        if t + 1 < T:
            flow[t] = target - pixels
            occlusion[t] = ~scene.in_frame(target) | (scene.cover(target, t + 1) != labels)
        if K:
            points = np.concatenate([scene.to_image(kp, t, k + 1) for k, kp in enumerate(local_keypoints)])
            keypoints[t] = points
            visible[t] = scene.in_frame(points) & (scene.cover(points, t) == owner)

    return SyntheticClip(
        name=name if name is not None else f"synthetic-{seed}",
        frames=frames.reshape(T, H, W, 3),
        masks=masks.reshape(T, H, W),
        keypoints=keypoints,
        visible=visible,
        flow=flow.reshape(T - 1, H, W, 2),
        occlusion=occlusion.reshape(T - 1, H, W),
        fps=cfg.fps,
    )


def generate_set(cfg: SyntheticConfig, n: int, seed: int) -> Iterator[SyntheticClip]:
    """Clips named synth0000, synth0001, ...; clip i depends only on (cfg, seed, i), so
    a longer set extends a shorter one. Lazy, since a set may not fit in memory."""
    for i, clip_seed in enumerate(np.random.SeedSequence(seed).generate_state(n)):
        yield generate_clip(cfg, int(clip_seed), name=f"synth{i:04d}")


def write_davis(clips: Iterable[SyntheticClip], root: str | Path, quality: int = 95) -> list[str]:
    """DAVIS-2017 layout: JPEGImages/480p/<seq>/00000.jpg, palette PNGs of object ids in
    Annotations/480p/<seq>/ for every frame, and ImageSets/2017/val.txt listing the
    sequences of this call. "480p" names the folder only; frames keep the clip's size."""
    root = Path(root)
    names = []
    for clip in clips:
        images = root / "JPEGImages" / "480p" / clip.name
        annotations = root / "Annotations" / "480p" / clip.name
        images.mkdir(parents=True, exist_ok=True)
        annotations.mkdir(parents=True, exist_ok=True)
        for t, (frame, mask) in enumerate(zip(clip.frames, clip.masks)):
            Image.fromarray(frame).save(images / f"{t:05d}.jpg", quality=quality, subsampling=0)
            save_indexed_png(annotations / f"{t:05d}.png", mask)
        names.append(clip.name)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    return names


def write_jhmdb(
    clips: Iterable[SyntheticClip], root: str | Path, action: str = "synthetic", joints: int = 15
) -> list[str]:
    """JHMDB layout: Rename_Images/<action>/<video>/00001.png (1-based) and
    joint_positions/<action>/<video>/joint_positions.mat whose pos_img (2, J, T) holds
    the first ``joints`` keypoints in 1-based (MATLAB) pixel coordinates."""
    from scipy.io import savemat

    root = Path(root)
    names = []
    for clip in clips:
        if clip.keypoints.shape[1] < joints:
            raise ValueError(f"{clip.name}: {clip.keypoints.shape[1]} keypoints, JHMDB needs {joints}")
        images = root / "Rename_Images" / action / clip.name
        positions = root / "joint_positions" / action / clip.name
        images.mkdir(parents=True, exist_ok=True)
        positions.mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(clip.frames, start=1):
            Image.fromarray(frame).save(images / f"{t:05d}.png")
        pos_img = clip.keypoints[:, :joints].astype(np.float64).transpose(2, 1, 0) + 1  # (2, J, T)
        savemat(positions / "joint_positions.mat", {"pos_img": pos_img})
        names.append(clip.name)
    return names


def write_sintel(clips: Iterable[SyntheticClip], root: str | Path) -> list[str]:
    """MPI-Sintel layout: clean/<seq>/frame_0001.png (1-based), and for each frame but the
    last flow/<seq>/frame_0001.flo (to the next frame) and occlusions/<seq>/frame_0001.png
    (255 where the pixel is not visible in the next frame)."""
    root = Path(root)
    names = []
    for clip in clips:
        folders = {kind: root / kind / clip.name for kind in ("clean", "flow", "occlusions")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(clip.frames, start=1):
            Image.fromarray(frame).save(folders["clean"] / f"frame_{t:04d}.png")
        for t, (flow, occluded) in enumerate(zip(clip.flow, clip.occlusion), start=1):
            write_flo(folders["flow"] / f"frame_{t:04d}.flo", flow)
            occlusion = Image.fromarray(occluded.astype(np.uint8) * 255)
            occlusion.save(folders["occlusions"] / f"frame_{t:04d}.png")
        names.append(clip.name)
    return names


def write_videos(clips: Iterable[SyntheticClip], folder: str | Path, format: str = "mp4") -> list[Path]:
    """Unlabeled training videos: ``mp4`` writes <folder>/<name>.mp4 (H.264 when the
    PyAV build has it, else MPEG-4 part 2; both need even frame sizes), ``frames``
    writes <folder>/<name>/00000.png, .... Returns the paths written."""
    if format not in ("mp4", "frames"):
        raise ValueError(f"format must be 'mp4' or 'frames', got {format!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for clip in clips:
        if format == "frames":
            path = folder / clip.name
            path.mkdir(exist_ok=True)
            for t, frame in enumerate(clip.frames):
                Image.fromarray(frame).save(path / f"{t:05d}.png")
        else:
            path = folder / f"{clip.name}.mp4"
            write_video(path, clip.frames, clip.fps)
        paths.append(path)
    return paths


__all__ = [
    "SyntheticClip",
    "SyntheticConfig",
    "generate_clip",
    "generate_set",
    "write_davis",
    "write_jhmdb",
    "write_sintel",
    "write_videos",
]
