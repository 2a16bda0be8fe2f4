"""Checkpoints, and models for inference from a checkpoint or a baseline's name.

Our checkpoint is a dict tagged ``format: "timecycle"`` with the package version and
the full training config, so a model loads without the user repeating its settings.
It holds only tensors and plain values, so it loads with ``weights_only=True``.

Every inference model maps RGB in [0, 1] (B, 3, H, W) to features (B, C, H/8, W/8),
so propagation and evaluation never ask where a model came from.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from timecycle.config import config_from_dict
from timecycle.model.baselines import LabPixels
from timecycle.model.encoder import Encoder, EncoderFeatures, build_encoder

CHECKPOINT_FORMAT = "timecycle"

# Baselines that users compare against: what a random network, ImageNet supervision
# and raw colour achieve, each with no video training.
BASELINES = {
    "random-resnet18": ("resnet18", None),
    "random-resnet50": ("resnet50", None),
    "imagenet-resnet18": ("resnet18", "imagenet"),
    "imagenet-resnet50": ("resnet50", "imagenet"),
    "pixels": None,
}


def load_model(path_or_name: str | Path, device: str | torch.device = "cpu"):
    """An inference model (eval mode, on ``device``) from a timecycle training checkpoint
    or a baseline name (see ``BASELINES``; the ImageNet ones download torchvision's weights)."""
    name = str(path_or_name)
    if name in BASELINES:
        if BASELINES[name] is None:
            return LabPixels().eval().to(device)
        arch, weights = BASELINES[name]
        with torch.random.fork_rng():  # the same "random" network every time, the caller's seed untouched
            torch.manual_seed(0)
            encoder = Encoder(arch, dim=None, weights=weights)
    else:
        path = Path(path_or_name)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint, and not a baseline name "
                                    f"({', '.join(BASELINES)})")
        encoder = _encoder_from_checkpoint(path)
    return EncoderFeatures(encoder.eval().to(device))


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a temporary file beside the target, then a rename, so a crash
    mid-write leaves the previous checkpoint whole."""
    from timecycle import __version__

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "version": __version__, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Our own checkpoint, loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable timecycle checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a timecycle training checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    return payload


def _encoder_from_checkpoint(path: Path) -> Encoder:
    payload = load_checkpoint(path)
    encoder = build_encoder(config_from_dict(payload["config"]).model.encoder)
    state = {k.removeprefix("encoder."): v for k, v in payload["model"].items() if k.startswith("encoder.")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: encoder weights do not fit the encoder its config describes "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return encoder
