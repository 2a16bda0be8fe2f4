"""Typed configuration with the paper's and the release's values as named presets.

Every number of the method lives here once, so that a preset is the whole record of
an experiment: a YAML file under ``configs/`` only overrides fields of a preset.
Where the paper and the public release disagree, the release's value is the
default and the field's comment names the paper's.
"""
from __future__ import annotations

import copy
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
    # The first hop's query. Release: 'patch' (the patch image encoded on its own). 'target':
    # the target's features sampled where the patch was cut; 'target-rolled': the same from
    # the target encoded under a random circular shift. See TimeCycle.query_features.
    query: str = "patch"


@dataclass
class OptimConfig:
    """Adam as in the release (METHOD.md section 5): constant rate, no weight decay."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 10.0  # max global gradient norm; None: no clipping (CRW's release)


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class CRWConfig:
    """The contrastive random walk (METHOD.md section 6): its clip sampler and its objective.

    The encoder is ``model.encoder``, shared with TimeCycle; nothing else of ``sample``,
    ``model`` or ``optim`` applies (CRW's optimiser is its own ``optim``: presets tuned for
    TimeCycle, like cpu-small, train CRW best at other rates). A clip is ``clip_len`` consecutive
    frames at ``fps``, each cut from the video by its own random resized crop to
    ``frame_size``; the nodes of a frame are its ``patch`` x ``patch`` windows at
    ``patch_stride`` (a 7x7 grid for the release's 256 / 64 / 32), each jittered by its
    own random resized crop inside the window.
    """

    fps: float = 8.0  # videos are resampled to this rate; the clip is consecutive frames at it
    short_side: int = 256  # frames are resized so their short side is this (Kinetics' train_256)
    clip_len: int = 4  # frames per clip, >= 3; walks 0 -> k -> 0 for k = 2 .. clip_len - 1
    frame_size: int = 256  # side of the square each frame's random resized crop is resized to
    frame_scale: tuple[float, float] = (0.8, 0.95)  # of the frame's area, drawn per frame
    frame_ratio: tuple[float, float] = (0.7, 1.3)  # width / height of the crop, log-uniform
    patch: int = 64  # side of a node's window in pixels of the resized frame
    patch_stride: int = 32  # between neighbouring windows
    patch_scale: tuple[float, float] = (0.7, 0.9)  # of the window's area, drawn per node
    patch_ratio: tuple[float, float] = (0.75, 4 / 3)  # torchvision's default (the release did not set it)
    dim: int = 128  # of the linear head after the mean-pooled encoder features
    temperature: float = 0.05  # transitions = row-softmax(cosine / temperature); release default 0.07
    edge_dropout: float = 0.1  # share of affinities dropped before each softmax, training only
    mean: tuple[float, float, float] = CIFAR_MEAN  # input statistics at training (the release's
    std: tuple[float, float, float] = CIFAR_STD  # CIFAR ones); propagation keeps ImageNet's, as CRW's
    # The optimiser of this objective (TrainConfig.optim is TimeCycle's): the release's Adam,
    # 1e-4 with torch's default betas, neither weight decay nor gradient clipping.
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.9, 0.999), grad_clip=None))

    @property
    def grid(self) -> int:
        """Windows along a side of the frame: the 7 of a 7x7 grid."""
        return (self.frame_size - self.patch) // self.patch_stride + 1


@dataclass
class TrainConfig:
    """One training run: data sampling, model, optimiser and the loop's own settings."""

    name: str = "timecycle-r50"
    objective: str = "timecycle"  # 'timecycle' (sample, model, optim) or 'crw' (crw, model.encoder)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    crw: CRWConfig = dataclasses.field(default_factory=CRWConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  # TimeCycle's; CRW's is crw.optim
    batch_size: int = 36  # clips per step over all processes; each of N processes takes batch_size / N
    epochs: int = 30  # an epoch draws one sample from every video
    max_steps: int | None = None  # stop earlier, after this many optimiser steps in all
    minutes: float | None = None  # stop earlier, after this much training time
    workers: int = 4  # data-loader processes per training process
    freeze_encoder_steps: int = 0  # TimeCycle's warm-up in which only the tracker learns; CRW ignores it
    checkpoint_every: int = 1000  # steps between checkpoints, besides one at every epoch's end
    keep_epoch_checkpoints: bool = True  # also keep each epoch's as checkpoint_epochNNN.pt
    log_every: int = 10  # steps between TensorBoard scalars
    image_every: int = 500  # steps between TensorBoard cycle figures (CRW: walk figures)
    seed: int = 0
    amp: bool = True  # bf16 autocast, on GPU only
    channels_last: bool = True  # on GPU only, where cuDNN's convolutions prefer it


PRESETS: dict[str, TrainConfig] = {
    # The release: ResNet-50 to layer3 at stride 8, 512-d, 240 crops and 80 patches,
    # 4 clip frames plus the target, batch 36, Adam 2e-4 (0.5, 0.999), clip 10, 30 epochs.
    "timecycle-r50": TrainConfig(),
    # A small encoder at low resolution that learns visibly within minutes on 2 CPU
    # cores: ResNet-18 (256-d), 96 crops and 32 patches (12x12 and 4x4 cells), so the
    # localiser's kernel shrinks to 2; the motion grid keeps cells of half a patch.
    # With the release's recipe it does not learn: a 32-px patch encoded on its own is
    # mostly padding, so the first hop's affinity tells the localiser nothing, the
    # localiser keeps answering the centred crop and the similarity term teaches the
    # encoder to put the affinity's peak there (a positional shortcut; tracking losses
    # stay at the constant answer's value, propagation gets worse than at init). Hence:
    # the query is the target's own features, encoded under a random shift so that it
    # matches in content but not in position; 50 steps in which only the tracker learns;
    # the paper's weight 0.1 on both tracking terms; and reflect padding, as in CRW's
    # encoder: zero padding lets the encoder mark where a cell sits in the frame, which
    # the cycle rewards as much as content (on GPU sweeps, 900 steps on synthetic videos,
    # held-out mask mean IoU after training rose from 0.51 / 0.41 with zero padding to
    # 0.53 / 0.48 with reflect). Last, the optimiser: the release's Adam betas (0.5, 0.999)
    # at 1e-3 left held-out J-Mean below the initialisation after 150 steps (0.373 against
    # 0.416; 0.477 with BatchNorm statistics re-estimated on the training videos), and
    # 600 steps did no better (0.393); Adam 3e-4 with torch's default betas, the rate that
    # CRW needs here too, reaches 0.539 in the same 150 steps (tests/test_train.py).
    # CRW's release (METHOD.md section 6): ResNet-18 with reflect padding, 4 frames at 8 fps,
    # 256x256 frames of 7x7 nodes (64-px patches at stride 32), tau 0.05, edge dropout 0.1,
    # batch 20, Adam 1e-4 with torch's default betas and neither weight decay nor gradient
    # clipping (CRWConfig's defaults); 25 epochs is the release's default. Not reproduced:
    # its learning-rate steps (x0.3 at epoch 20), and up to 5 clips per video an epoch
    # (here one); the head reads layer3 instead of layer4 (see timecycle.model.crw.CRW).
    "crw-r18": TrainConfig(
        name="crw-r18",
        objective="crw",
        model=ModelConfig(encoder=EncoderConfig(arch="resnet18", dim=None, padding_mode="reflect")),
        batch_size=20,
        epochs=25,
    ),
    "cpu-small": TrainConfig(
        name="cpu-small",
        sample=SampleConfig(short_side=112, crop=96, patch=32, motion_grid=6, motion_window=2),
        model=ModelConfig(encoder=EncoderConfig(arch="resnet18", dim=None, padding_mode="reflect"),
                          tracker=TrackerConfig(kernel=2),
                          loss=LossConfig(long_weight=0.1, skip_weight=0.1), query="target-rolled"),
        # With --objective crw: TimeCycle's crop as the frame, 5x5 nodes of 32 px at stride 16,
        # and the same Adam 3e-4 with the default betas. The release's 1e-3 and betas
        # (0.5, 0.999) leave held-out J-Mean where it started on synthetic videos (0.416 ->
        # 0.409 after 64 steps); 3e-4 raises it in every run so far (0.416 -> 0.541 and
        # 0.361 -> 0.542 for seeds 0 and 1, 64 steps; +0.11 already after 16).
        crw=CRWConfig(short_side=112, frame_size=96, patch=32, patch_stride=16,
                      optim=OptimConfig(lr=3e-4, betas=(0.9, 0.999))),
        optim=OptimConfig(lr=3e-4, betas=(0.9, 0.999)),
        batch_size=8,
        epochs=1000,
        workers=1,
        freeze_encoder_steps=50,
        checkpoint_every=200,
        keep_epoch_checkpoints=False,  # epochs of a small folder last seconds
        log_every=5,
        image_every=50,
        amp=False,
    ),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def load_train_config(spec: str | Path) -> TrainConfig:
    """A preset by name, or a YAML file naming a ``preset`` and overriding any of its fields."""
    if str(spec) in PRESETS:
        return preset(str(spec))
    import yaml

    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    with path.open() as fh:
        values = yaml.safe_load(fh) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    base = preset(values.pop("preset", "timecycle-r50"))
    return _override(base, values, str(path))


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """The inverse of :func:`to_dict`, for configs stored in checkpoints."""
    return _override(TrainConfig(), values, "checkpoint config")


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
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)  # YAML has no tuples
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


__all__ = [
    "ALIGN_CORNERS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "PRESETS",
    "CRWConfig",
    "EncoderConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "SampleConfig",
    "TrackerConfig",
    "TrainConfig",
    "config_from_dict",
    "load_train_config",
    "preset",
    "to_dict",
]
