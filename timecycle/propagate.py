"""Label propagation: carry any per-pixel labels from the first frame through a video
by nearest neighbours in feature space, with no fine-tuning (METHOD.md section 7).

One engine serves every label type, because a label map is just K channels per cell:
one-hot object masks, keypoint heatmaps, part classes, or colours. For each new frame
the context is the first frame (with its given labels) and the ``context`` frames
before it (with their predicted soft labels). Every query cell scores the context's
cells by cosine / temperature, keeps the best ``top_k`` (over all context frames
together, or per frame), turns the kept scores into weights and averages their labels;
the prediction is then fed back as that frame's label.

Work and memory do not grow with the video: the context lives in ring buffers, and
queries are handled a tile of cells at a time. With a radius, a tile only meets the
cells within reach of it, read as strided views of the buffers (no copies of the
keys), so at native 480p the largest intermediate is about 5 MB where the dense
affinity over CRW's context of 21 frames would take 3.5 GB.

The top-level :func:`propagate` goes from pixels to pixels: frames are resized for the
model, encoded in batches, labels are brought to the feature grid, propagated, and the
soft output is upsampled bilinearly to the frame size.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from timecycle.model.encoder import Encoder, EncoderFeatures, l2_normalize
from timecycle.video import Video, open_video, resized_size

FeatureModel = Callable[[Tensor], Tensor]  # (B, 3, H, W) RGB in [0, 1] -> (B, C, h, w)

_INPUT_MODES = ("native", "short", "square")
_DOWNSAMPLE_MODES = ("bilinear", "nearest", "area")
_SHAPES = ("circle", "square")
_SOFTMAX_SCOPES = ("kept", "frame")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class InputSize:
    """The frame size the model sees: ``native``, ``short`` (short side = size, aspect
    kept) or ``square`` (size x size, aspect not kept). Predictions always come back at
    the video's own frame size."""

    mode: str = "native"
    size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in _INPUT_MODES:
            raise ValueError(f"input mode {self.mode!r} unknown; use one of {', '.join(_INPUT_MODES)}")
        if (self.mode == "native") != (self.size is None):
            raise ValueError(f"input mode {self.mode!r} " + ("takes no size" if self.mode == "native"
                                                             else "needs a size in pixels"))
        if self.size is not None and self.size < 1:
            raise ValueError(f"input size must be positive, got {self.size}")

    @classmethod
    def parse(cls, value: InputSize | str | tuple[str, int]) -> InputSize:
        """Accept ``'native'``, ``('short', 480)`` or ``('square', 320)`` as well."""
        if isinstance(value, InputSize):
            return value
        if value == "native":
            return cls()
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(str(value[0]), int(value[1]))
        raise ValueError(f"input size {value!r}: use 'native', ('short', N) or ('square', N)")

    def resolve(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the model's input for a frame of ``height`` x ``width``."""
        if self.mode == "native":
            return height, width
        if self.mode == "square":
            return self.size, self.size
        w, h = resized_size(width, height, self.size)
        return h, w


@dataclass(frozen=True)
class PropagationConfig:
    """Every setting of a propagation protocol; the defaults are CRW's (see :data:`PRESETS`).

    A radius is in feature cells, inclusive: a key at distance exactly ``radius`` from
    the query's cell is used (Euclidean for ``circle``, max(|dy|, |dx|) for ``square``,
    so a square of radius 12 is a 25x25 window).

    ``softmax`` says how kept scores become weights. ``'kept'``: one softmax over all
    kept keys (CRW, DINO, VFS). ``'frame'``: a softmax over each context frame's
    (in-window) keys, the top-k *probabilities* are kept, and the weights are those
    probabilities divided by the number of context frames (the TimeCycle release).

    ``label_downsample`` brings labels to the feature grid; each cell stands for an
    ``s`` x ``s`` block of the model's input (s = the model's stride). ``'bilinear'``
    samples at the block's centre (as cv2/torch bilinear resizing does, no
    anti-aliasing), ``'nearest'`` takes the pixel at the centre, ``'area'`` averages
    the block.
    """

    context: int = 20  # previous frames besides the first
    temperature: float = 0.05  # affinity = cosine / temperature
    top_k: int = 10  # keys kept per query (per context frame when top_k_per_frame)
    top_k_per_frame: bool = False
    softmax: str = "kept"  # 'kept' | 'frame', see above
    radius: float | None = 12.0  # None: every cell of a context frame is a key
    radius_shape: str = "circle"  # 'circle' | 'square'
    radius_on_first: bool = False  # whether the first frame's keys are restricted too
    label_downsample: str = "bilinear"  # 'bilinear' | 'nearest' | 'area'
    minmax: bool = False  # rescale each channel of a prediction to [0, 1] before it is fed back
    input_size: InputSize = InputSize()

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", InputSize.parse(self.input_size))
        if self.context < 0:
            raise ValueError(f"context must be >= 0 frames, got {self.context}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.radius is not None and self.radius < 0:
            raise ValueError(f"radius must be >= 0 cells or None, got {self.radius}")
        for name, value, allowed in (("softmax", self.softmax, _SOFTMAX_SCOPES),
                                     ("radius_shape", self.radius_shape, _SHAPES),
                                     ("label_downsample", self.label_downsample, _DOWNSAMPLE_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} unknown; use one of {', '.join(allowed)}")


PRESETS: dict[str, PropagationConfig] = {
    # The TimeCycle release: per-frame softmax at sqrt(512)^-1, top-5 per frame, no radius,
    # predictions min-max normalised before being fed back.
    "timecycle": PropagationConfig(
        context=7, temperature=512 ** -0.5, top_k=5, top_k_per_frame=True, softmax="frame",
        radius=None, minmax=True, input_size=InputSize("square", 320)),
    "crw": PropagationConfig(
        context=20, temperature=0.05, top_k=10, radius=12.0, radius_shape="circle",
        radius_on_first=False, input_size=InputSize()),
    # DINO's 25x25 window also restricts the first frame; it resizes labels with nearest.
    "dino": PropagationConfig(
        context=7, temperature=0.1, top_k=5, radius=12.0, radius_shape="square",
        radius_on_first=True, label_downsample="nearest", input_size=InputSize("short", 480)),
    # VFS runs CRW's protocol; radius 12 is its ResNet-18 value (see VFS_RADIUS).
    "vfs": PropagationConfig(
        context=20, temperature=0.07, top_k=10, radius=12.0, radius_shape="circle",
        radius_on_first=False, input_size=InputSize("short", 480)),
}
# VFS tuned the radius to the backbone.
VFS_RADIUS = {"resnet18": 12.0, "resnet50": 18.0}


def preset(name: str, arch: str | None = None) -> PropagationConfig:
    """A named protocol; ``arch`` picks the backbone-specific values (VFS's radius)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    if name == "vfs" and arch is not None:
        if arch not in VFS_RADIUS:
            raise ValueError(f"VFS has no radius for {arch!r}; known: {', '.join(VFS_RADIUS)}")
        cfg = dataclasses.replace(cfg, radius=VFS_RADIUS[arch])
    return cfg


def resolve_config(
    cfg_or_preset: PropagationConfig | str, arch: str | None = None, **overrides
) -> PropagationConfig:
    """A config from a preset name or a config, with fields overridden; a misspelt field is an error."""
    cfg = preset(cfg_or_preset, arch) if isinstance(cfg_or_preset, str) else cfg_or_preset
    known = {f.name for f in dataclasses.fields(PropagationConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown propagation setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **overrides)


# ----------------------------------------------------------------------------- the engine

_TILE = 8  # query cells per tile side: big enough for efficient matmuls, small enough to waste little


def propagate_features(
    features: Iterable[Tensor], first_labels: Tensor, cfg: PropagationConfig
) -> Iterator[Tensor]:
    """Soft labels (K, h, w) for every frame after the first, in order.

    ``features`` are the frames' (C, h, w) L2-normalised feature maps, the first frame's
    first; ``first_labels`` (K, h, w) are its labels on the same grid. The prediction
    for frame t is what is fed back as its label (min-max normalised when
    ``cfg.minmax``). Features are consumed one at a time, so they may come from a
    generator that encodes the video as it goes.

    Work is in float32. Post-ReLU features give many nearly equal scores, and where two
    keys tie for the k-th place within float32 rounding, another implementation (or
    device) may keep the other one; that is the only way results differ from an exact
    computation.
    """
    if first_labels.dim() != 3:
        raise ValueError(f"first labels must be (K, h, w), got shape {tuple(first_labels.shape)}")
    return _propagate(iter(features), first_labels, cfg)


def _propagate(features: Iterator[Tensor], first_labels: Tensor, cfg: PropagationConfig) -> Iterator[Tensor]:
    first = next(features, None)
    if first is None:
        raise ValueError("no frames: propagation needs at least the first frame's features")
    engine = _Propagator(first, first_labels, cfg)
    for feat in features:
        yield engine.step(feat)


# Both kinds of context give scores as (A, S, B, Q): S frames of A*B keys each (a block
# of A rows of B cells, or A = 1 and B = h*w), queries last, the layout a batched matmul
# of keys by queries produces without copying; labels come as (A, S, B, K) to match.


class _DenseContext:
    """Context frames whose every cell is a key, as (S, hw, C) features and (S, hw, K) labels."""

    def __init__(self, slots: int, channels: int, classes: int, grid: tuple[int, int], device: torch.device):
        self.feats = torch.zeros(slots, grid[0] * grid[1], channels, device=device)
        self.labs = torch.zeros(slots, grid[0] * grid[1], classes, device=device)
        self.filled = 0  # slots are filled in order, so the filled ones are a prefix

    def write(self, slot: int, feat: Tensor, labels: Tensor) -> None:
        self.feats[slot] = feat.flatten(1).T
        self.labs[slot] = labels.flatten(1).T

    def candidates(self, q: Tensor, y0: int, x0: int) -> tuple[Tensor, Tensor]:
        s = self.filled
        scores = torch.matmul(self.feats[:s], q.T)  # (S, hw, Q)
        return scores[None], self.labs[None, :s]


class _LocalContext:
    """Context frames whose keys are restricted to a radius around the query.

    The maps are kept zero-padded by the radius, channels-last, rows outermost and slots
    next: (H', S, W', C). The keys a tile can reach, a block of rows and columns across
    all slots, then form a strided view that a batched matmul reads without copying,
    because one buffer row is exactly S slot-rows long.
    """

    def __init__(self, slots: int, channels: int, classes: int, grid: tuple[int, int],
                 tiles: tuple[int, int], cfg: PropagationConfig, device: torch.device):
        self.h, self.w = grid
        self.r = r = int(math.floor(cfg.radius))
        self.span = span = _TILE + 2 * r
        hp, wp = tiles[0] * _TILE + 2 * r, tiles[1] * _TILE + 2 * r
        self.feats = torch.zeros(hp, slots, wp, channels, device=device)
        self.labs = torch.zeros(hp, slots, wp, classes, device=device)
        self.filled = 0
        # Whether key (a, b) of a tile's (R, R) key block, which starts r cells above and
        # left of the tile, is within the radius of the tile's query (u, v): (R, 1, R, T*T).
        u = torch.arange(_TILE, device=device)
        d = (torch.arange(span, device=device)[:, None] - r - u[None, :]).float()  # (R, T) offsets
        dy, dx = d[:, None, :, None], d[None, :, None, :]  # over (a, b, u, v)
        if cfg.radius_shape == "circle":
            reach = dy * dy + dx * dx <= cfg.radius ** 2
        else:
            reach = torch.maximum(dy.abs(), dx.abs()) <= cfg.radius
        self.reach = reach.reshape(span, 1, span, _TILE * _TILE)

    def write(self, slot: int, feat: Tensor, labels: Tensor) -> None:
        r = self.r
        self.feats[r:r + self.h, slot, r:r + self.w] = feat.permute(1, 2, 0)
        self.labs[r:r + self.h, slot, r:r + self.w] = labels.permute(1, 2, 0)

    def candidates(self, q: Tensor, y0: int, x0: int) -> tuple[Tensor, Tensor]:
        """Unreachable and out-of-frame keys score -inf."""
        r, s, span = self.r, self.filled, self.span
        block = self.feats[y0:y0 + span, :s, x0:x0 + span]  # (R, S, R, C); padded y0 is the block's top
        scores = torch.matmul(block.reshape(span * s, span, -1), q.T).view(span, s, span, -1)  # (R, S, R, Q)
        rows = torch.arange(y0 - r, y0 - r + span, device=q.device)
        cols = torch.arange(x0 - r, x0 - r + span, device=q.device)
        in_frame = ((rows >= 0) & (rows < self.h))[:, None, None, None] & ((cols >= 0) & (cols < self.w))[:, None]
        scores.masked_fill_(~(self.reach & in_frame), -math.inf)
        return scores, self.labs[y0:y0 + span, :s, x0:x0 + span]


class _Propagator:
    """The state of one propagation: the context buffers and the per-frame step."""

    def __init__(self, first: Tensor, first_labels: Tensor, cfg: PropagationConfig) -> None:
        if first.dim() != 3:
            raise ValueError(f"features must be (C, h, w), got shape {tuple(first.shape)}")
        if first.shape[1:] != first_labels.shape[1:]:
            raise ValueError(f"first labels are on a {tuple(first_labels.shape[1:])} grid, "
                             f"the features on {tuple(first.shape[1:])}")
        self.cfg = cfg
        self.channels, self.h, self.w = first.shape
        self.classes = first_labels.shape[0]
        self.device = device = first.device
        self.tiles = (-(-self.h // _TILE), -(-self.w // _TILE))
        self.queries = torch.zeros(self.tiles[0] * _TILE, self.tiles[1] * _TILE, self.channels, device=device)

        # The first frame sits in slot 0 of its group; the previous frames cycle through
        # the ring of ``cfg.context`` slots after it, or from slot 0 of a group of their own.
        n, dims = cfg.context, (self.channels, self.classes, (self.h, self.w))
        first_group: _DenseContext | _LocalContext
        if cfg.radius is None:
            first_group = ring = _DenseContext(1 + n, *dims, device)
        elif cfg.radius_on_first:
            first_group = ring = _LocalContext(1 + n, *dims, self.tiles, cfg, device)
        else:
            first_group = _DenseContext(1, *dims, device)
            ring = _LocalContext(n, *dims, self.tiles, cfg, device)
        first_group.write(0, first.float(), first_labels.to(device, torch.float32))
        first_group.filled = 1
        self.groups = [first_group] if ring is first_group else [first_group, ring]
        self.ring, self.ring_start = ring, 1 if ring is first_group else 0
        self.seen = 0  # frames predicted so far

    @torch.no_grad()
    def step(self, feat: Tensor) -> Tensor:
        """Predict the next frame's (K, h, w) labels from its (C, h, w) features, and add it to the context."""
        if feat.shape != (self.channels, self.h, self.w):
            raise ValueError(f"features of shape {tuple(feat.shape)} after a first frame of "
                             f"{(self.channels, self.h, self.w)}: every frame must have the same grid")
        feat = feat.to(self.device, torch.float32)
        self.queries[:self.h, :self.w] = feat.permute(1, 2, 0) / self.cfg.temperature
        out = torch.empty(self.h, self.w, self.classes, device=self.device)  # (h, w, K)
        for y0 in range(0, self.h, _TILE):
            for x0 in range(0, self.w, _TILE):
                q = self.queries[y0:y0 + _TILE, x0:x0 + _TILE].reshape(_TILE * _TILE, self.channels)
                pred = self._tile(q, y0, x0).view(_TILE, _TILE, self.classes)
                out[y0:y0 + _TILE, x0:x0 + _TILE] = pred[:self.h - y0, :self.w - x0]
        pred = out.permute(2, 0, 1).contiguous()  # (K, h, w)
        if self.cfg.minmax:
            pred = minmax_normalize(pred)
        n = self.cfg.context
        if n:
            self.ring.write(self.ring_start + self.seen % n, feat, pred)
            self.ring.filled = self.ring_start + min(self.seen + 1, n)
        self.seen += 1
        return pred

    def _tile(self, q: Tensor, y0: int, x0: int) -> Tensor:
        """Predicted labels (Q, K) for the Q = T*T queries (already divided by the
        temperature) of the tile whose top-left cell is (y0, x0)."""
        kept = [self._select(*g.candidates(q, y0, x0)) for g in self.groups if g.filled]
        values = torch.cat([v for v, _ in kept])  # (M, Q)
        labels = torch.cat([lab for _, lab in kept])  # (M, Q, K)
        if len(kept) > 1 and not self.cfg.top_k_per_frame:
            # The joint top-k lies within the union of each group's own top-k.
            values, idx = values.topk(min(self.cfg.top_k, len(values)), dim=0)
            labels = labels.gather(0, idx[..., None].expand(-1, -1, self.classes))
        if self.cfg.softmax == "kept":
            weights = values.softmax(dim=0)
        else:
            weights = values.exp() / sum(g.filled for g in self.groups)
        return torch.einsum("mq,mqk->qk", weights, labels)

    def _select(self, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The kept values (M, Q) and their labels (M, Q, K) from scores (A, S, B, Q) and
        labels (A, S, B, K) of S frames. Values are scores, or per-frame log-probabilities
        under ``softmax='frame'``. A frame with fewer than k usable keys contributes -inf
        values, which weigh nothing."""
        a, s, b, q = scores.shape
        k = self.cfg.top_k
        if self.cfg.softmax == "frame":
            scores = scores - scores.logsumexp(dim=(0, 2), keepdim=True)
        if self.cfg.top_k_per_frame:
            per_frame = scores.transpose(0, 1).reshape(s, a * b, q)
            values, idx = per_frame.topk(min(k, a * b), dim=1)  # (S, k, Q)
            frame = torch.arange(s, device=scores.device)[:, None, None]
            labels = labels.transpose(0, 1).reshape(s, a * b, -1)[frame, idx]  # (S, k, Q, K)
            return values.flatten(0, 1), labels.flatten(0, 1)
        values, idx = scores.reshape(-1, q).topk(min(k, a * s * b), dim=0)  # (k, Q)
        return values, labels.reshape(a * s * b, -1)[idx]


def minmax_normalize(labels: Tensor) -> Tensor:
    """Each channel of (K, h, w) rescaled to [0, 1]; a constant channel becomes 0."""
    low = labels.amin(dim=(1, 2), keepdim=True)
    span = labels.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (labels - low) / span.clamp_min(torch.finfo(labels.dtype).tiny), 0.0)


# ----------------------------------------------------------------------------- frames <-> feature grid


class _Geometry:
    """How the video's frames (H, W), the model's input (H', W') and the feature grid
    (h, w) line up, as separable resampling matrices built once per video.

    Cell i of the grid stands for model-input pixels [i*s, (i+1)*s), s the model's
    stride, taken as round(H' / h): a stride-8 encoder rounds its grid up, so the last
    cells may reach past the frame, and the grid is not simply stretched over it.
    Coordinates are continuous with pixel edges at integers.
    """

    def __init__(self, frame: tuple[int, int], model_input: tuple[int, int], grid: tuple[int, int],
                 device: torch.device) -> None:
        self.frame, self.grid = frame, grid
        # Per axis: (label-map pixels per cell, i.e. stride * frame / model input; pixels; cells).
        self.axes = [(max(1, round(m / g)) * f / m, f, g) for f, m, g in zip(frame, model_input, grid)]
        self.device = device
        self._up = [_linear_weights((torch.arange(f, dtype=torch.float64) + 0.5) / cell - 0.5, g)
                    .to(device, torch.float32) for cell, f, g in self.axes]  # (pixels, cells) per axis

    def to_grid(self, labels: Tensor, mode: str) -> Tensor:
        """(K, H, W) labels at the frame size -> (K, h, w) on the feature grid."""
        my, mx = (_downsample_weights(*axis, mode).to(self.device, torch.float32) for axis in self.axes)
        return my @ labels @ mx.T

    def to_frame(self, pred: Tensor) -> Tensor:
        """(K, h, w) on the grid -> (K, H, W) at the frame size, bilinearly."""
        uy, ux = self._up
        return uy @ (pred @ ux.T)


def _linear_weights(pos: Tensor, n: int) -> Tensor:
    """(len(pos), n) weights of linear interpolation at positions in index units, clamped at the ends."""
    pos = pos.clamp(0, n - 1)
    low = pos.floor().long()
    frac = pos - low
    rows = torch.arange(len(pos))
    weights = torch.zeros(len(pos), n, dtype=torch.float64)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, (low + 1).clamp(max=n - 1)), frac, accumulate=True)
    return weights


def _downsample_weights(cell: float, pixels: int, cells: int, mode: str) -> Tensor:
    """(cells, pixels) weights bringing one axis of a label map to the grid; cell i covers
    [i * cell, (i + 1) * cell) of the map."""
    low = torch.arange(cells, dtype=torch.float64) * cell
    high = low + cell
    if mode == "area":
        edges = torch.arange(pixels + 1, dtype=torch.float64)
        overlap = (torch.minimum(high[:, None], edges[1:]) - torch.maximum(low[:, None], edges[:-1])).clamp_min(0)
        return overlap / overlap.sum(1, keepdim=True)
    centre = (low + high) / 2
    if mode == "nearest":
        return F.one_hot(centre.floor().long().clamp(0, pixels - 1), pixels).double()
    return _linear_weights(centre - 0.5, pixels)  # pixel k's centre is at k + 0.5


# ----------------------------------------------------------------------------- public API


def one_hot(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W) integer mask as (K, H, W) float32 channels, one per id present
    (background 0 always first), and the ids in channel order."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    ids = np.union1d(np.zeros(1, mask.dtype), np.unique(mask))
    return (mask[None] == ids[:, None, None]).astype(np.float32), ids


def to_mask(soft: np.ndarray | Tensor, ids: np.ndarray | None = None) -> np.ndarray:
    """(K, H, W) soft labels -> (H, W) index map of the strongest channel, or its id in ``ids``."""
    best = torch.as_tensor(soft).argmax(dim=0).cpu().numpy()
    if ids is not None:
        return np.asarray(ids)[best]
    return best.astype(np.uint8 if soft.shape[0] <= 256 else np.int64)


def to_points(heatmaps: np.ndarray | Tensor, top_k: int = 5) -> np.ndarray:
    """(J, H, W) propagated heatmaps -> (J, 2) points (x, y), each the mean of its
    channel's ``top_k`` strongest pixels weighted by their values: steadier than the
    arg-max, which jumps between pixels of a flat peak. Pixel centres are at integers."""
    maps = torch.as_tensor(heatmaps).flatten(1).double()
    width = heatmaps.shape[-1]
    values, idx = maps.topk(min(top_k, maps.shape[1]), dim=1)  # (J, k)
    weights = values.clamp_min(0)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
    weights = weights / weights.sum(1, keepdim=True)
    xy = torch.stack([idx % width, idx // width], -1).double()  # (J, k, 2)
    return (weights[..., None] * xy).sum(1).cpu().numpy()


def propagate(
    video: str | Path | Video | np.ndarray,
    first_labels: np.ndarray | Tensor,
    model: FeatureModel | Encoder,
    cfg_or_preset: PropagationConfig | str = "crw",
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    **overrides,
) -> Iterator[np.ndarray]:
    """Propagate the first frame's labels through a video; one prediction per frame, frame 0 included.

    ``video``: a path (file or frame folder), an opened :class:`Video`, or (T, H, W, 3)
    uint8 RGB frames. ``first_labels``: an (H, W) integer mask (0 = background), or
    (K, H, W) float labels of any kind (heatmaps, parts, colours). The output follows
    the input: a mask gives (H, W) masks with the same ids and dtype (bool becomes
    uint8); float labels give (K, H, W) float32 soft labels (use :func:`to_mask` or
    :func:`to_points` on them). Frame 0's output is the input itself.

    ``model`` maps RGB in [0, 1] (B, 3, H', W') to features (B, C, h, w) on ``device``
    and in eval mode; an :class:`Encoder` is wrapped in :class:`EncoderFeatures`, and its
    ``arch`` picks backbone-specific preset values. ``overrides`` replace fields of the
    config. Checks run at the call; decoding errors surface while iterating, as
    :class:`timecycle.video.VideoError`.
    """
    cfg = resolve_config(cfg_or_preset, getattr(model, "arch", None), **overrides)
    if isinstance(model, Encoder):
        model = EncoderFeatures(model)
    module = model.encoder if isinstance(model, EncoderFeatures) else model
    if getattr(module, "training", False):
        warnings.warn("the propagation model is in training mode: BatchNorm will use batch statistics, "
                      "so features depend on the batch; call .eval() first", stacklevel=2)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    frames, count, size, owned = _open_frames(video)
    try:
        labels, ids = _check_labels(first_labels, size)
    except ValueError:
        if owned is not None:
            owned.close()
        raise
    return _propagate_video(frames, count, size, labels, ids, model, cfg, torch.device(device),
                            batch_size, progress, owned)


def _open_frames(video: str | Path | Video | np.ndarray) -> tuple[Iterable[np.ndarray], int, tuple[int, int], Video | None]:
    """The frames, their count, their (H, W) and the Video to close afterwards, if opened here."""
    if isinstance(video, (str, Path)):
        video = opened = open_video(video)
    else:
        opened = None
    if isinstance(video, Video):
        width, height = video.size
        return video, len(video), (height, width), opened
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(f"frames must be a (T, H, W, 3) uint8 array, got {video.dtype} {video.shape}")
        if len(video) == 0:
            raise ValueError("the frame array holds no frames")
        return video, len(video), video.shape[1:3], None
    raise TypeError(f"video must be a path, a Video or a (T, H, W, 3) uint8 array, not {type(video).__name__}")


def _check_labels(labels: np.ndarray | Tensor, size: tuple[int, int]) -> tuple[Tensor, np.ndarray | None]:
    """(K, H, W) float labels and, for a mask, the id of each channel."""
    labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if labels.shape[-2:] != tuple(size):
        raise ValueError(f"the first frame's labels are {labels.shape[-2]}x{labels.shape[-1]} (HxW) "
                         f"but the video's frames are {size[0]}x{size[1]}")
    if labels.ndim == 2:
        if not (labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"a 2-D first mask must hold integer object ids, got {labels.dtype}; "
                             "give float labels as (K, H, W)")
        if not labels.any():
            raise ValueError("the first mask is empty: every pixel is background (0), there is no object to propagate")
        channels, ids = one_hot(labels)
        return torch.from_numpy(channels), ids
    if labels.ndim != 3:
        raise ValueError(f"first labels must be an (H, W) mask or (K, H, W) channels, got shape {labels.shape}")
    labels = torch.from_numpy(labels.astype(np.float32))
    if not torch.isfinite(labels).all():
        raise ValueError("the first frame's labels hold NaN or infinite values")
    if not labels.any():
        raise ValueError("the first frame's labels are all zero: there is nothing to propagate")
    return labels, None


def _propagate_video(frames: Iterable[np.ndarray], count: int, size: tuple[int, int], labels: Tensor,
                     ids: np.ndarray | None, model: FeatureModel, cfg: PropagationConfig, device: torch.device,
                     batch_size: int, progress: bool, owned: Video | None) -> Iterator[np.ndarray]:
    from tqdm import tqdm

    model_input = cfg.input_size.resolve(*size)
    # Gradients are switched off around each computation, not across the yields, which
    # hand control back to the caller's code.
    try:
        with tqdm(total=count, unit="frame", disable=not progress) as bar:
            features = _encode(frames, model, model_input, device, batch_size)
            first = next(features)
            geometry = _Geometry(size, model_input, tuple(first.shape[1:]), device)
            grid_labels = geometry.to_grid(labels.to(device), cfg.label_downsample)
            yield labels.numpy() if ids is None else ids[labels.argmax(0).numpy()]
            bar.update()
            for pred in propagate_features(_chain(first, features), grid_labels, cfg):
                soft = geometry.to_frame(pred)
                yield soft.cpu().numpy() if ids is None else to_mask(soft, ids)
                bar.update()
    finally:
        if owned is not None:
            owned.close()


def _chain(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


def _encode(frames: Iterable[np.ndarray], model: FeatureModel, model_input: tuple[int, int],
            device: torch.device, batch_size: int) -> Iterator[Tensor]:
    """L2-normalised (C, h, w) features of each frame, in order, encoded ``batch_size`` at a time."""
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            yield from _encode_batch(batch, model, model_input, device)
            batch = []
    if batch:
        yield from _encode_batch(batch, model, model_input, device)


@torch.no_grad()
def _encode_batch(batch: list[np.ndarray], model: FeatureModel, model_input: tuple[int, int],
                  device: torch.device) -> Tensor:
    x = torch.from_numpy(np.stack(batch)).to(device).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)
    if tuple(x.shape[-2:]) != model_input:
        x = F.interpolate(x, size=model_input, mode="bilinear", align_corners=False, antialias=True)
    feats = model(x)
    if feats.dim() != 4 or feats.shape[0] != len(batch):
        raise ValueError(f"the model must return (B, C, h, w) features, got shape {tuple(feats.shape)} "
                         f"for a batch of {len(batch)}")
    return l2_normalize(feats.float())  # (B, C, h, w)

