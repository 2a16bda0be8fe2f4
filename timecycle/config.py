"""Typed configuration with the paper's and the release's values as named presets.

Every number of the method lives here once, so that a preset is the whole record of
an experiment: a YAML file under ``configs/`` only overrides fields of a preset.
Where the paper and the public release disagree, the release's value is the
default and the field's comment names the paper's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One convention for every affine warp in the project, pixels and features alike.
# With align_corners=False a normalised coordinate names the same physical point at
# any resolution (-1 and 1 are the outer edges of the image), so a theta that cuts an
# 80x80 patch out of a 240x240 frame cuts the matching 10x10 cells out of its 30x30
# feature map. The release used True, under which the two warps disagree by up to
# half a cell at the borders.
ALIGN_CORNERS = False


@dataclass
class SampleConfig:
    """How one TimeCycle training example is cut out of a video (METHOD.md section 4)."""

    fps: float = 12.0  # videos are resampled to this rate before sampling
    short_side: int = 256  # frames are resized so their short side is this
    crop: int = 240  # one square crop shared by all frames of a sample
    clip_frames: int = 4  # frames the patch is tracked through
    clip_gap: int = 2  # frames between consecutive clip frames
    target_offset: int = 9  # frames from the last clip frame to the target frame
    motion_offset: int = 2  # the target is compared with this many frames later for motion
    patch: int = 80  # side of the query patch in pixels
    max_rotation: float = 45.0  # degrees, rotation drawn uniformly in +-this
    motion_grid: int = 9  # cells per side of the motion grid over the crop
    motion_window: int = 3  # cells per side of a candidate patch window
    motion_top_k: int = 10  # the window is drawn uniformly among this many best
    flip_p: float = 0.5  # probability of one horizontal flip shared by all frames

    @property
    def patch_scale(self) -> float:
        """The fixed scale of theta (1/3): derived, so that pixels and feature cells agree."""
        return self.patch / self.crop

    @property
    def span(self) -> int:
        """Frames a sample needs at ``fps`` with the full gap: first clip frame .. motion frame."""
        return (self.clip_frames - 1) * self.clip_gap + self.target_offset + self.motion_offset + 1


def _override(obj: Any, values: dict[str, Any], where: str) -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` applied, recursing into nested
    dataclasses; unknown keys are an error naming the key, so typos never pass silently."""
    known = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise KeyError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _override(current, value, f"{where}.{key}")
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def load_yaml_overrides(obj: Any, path: str | Path) -> Any:
    """Apply the settings of a YAML file to a config dataclass."""
    import yaml

    path = Path(path)
    with path.open() as fh:
        values = yaml.safe_load(fh) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return _override(obj, values, str(path))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


__all__ = ["ALIGN_CORNERS", "SampleConfig", "load_yaml_overrides", "to_dict"]


@dataclass
class EncoderConfig:
    """The stride-8 backbone (METHOD.md section 2)."""

    arch: str = "resnet50"  # 'resnet50' (TimeCycle) or 'resnet18' (CRW and successors, the small model)
    dim: int | None = 512  # channels of the 1x1 projection + ReLU; None keeps the backbone's (1024 / 256)
    weights: str | None = None  # None: random (the release trains from scratch); 'imagenet': torchvision's
    padding_mode: str = "zeros"  # of every padded conv; CRW's released encoder uses 'reflect'


@dataclass
class TrackerConfig:
    """The differentiable tracker (METHOD.md section 3)."""

    temperature: float | None = None  # affinity = cosine / temperature; None: feature_dim ** -0.5
    channels: tuple[int, int] = (128, 64)  # the localiser's two convolutions
    kernel: int = 4  # of both localiser convs; the patch grid needs >= 2 * (kernel - 1) + 1 cells a side
    negative_slope: float = 0.1  # of the LeakyReLUs
    init_std: float = 0.01  # of the final linear layer's weights (bias 0), so it starts at a centred crop


@dataclass
class LossConfig:
    """The TimeCycle objective (METHOD.md section 5)."""

    long_weight: float = 0.02  # paper: 0.1
    skip_weight: float = 0.1  # paper: 0.1
    sim_weight: float = 1.0  # paper: 1.0
    similarity: str = "inlier"  # release: 'inlier' (affinity mass at the tracked location); paper: 'feature'
    grid_points: int = 20  # points per side of the grid the tracking distance is measured on


@dataclass
class ModelConfig:
    """Everything the TimeCycle model needs besides the frame and patch sizes, which the sampler owns."""

    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)


__all__ += ["EncoderConfig", "TrackerConfig", "LossConfig", "ModelConfig"]
