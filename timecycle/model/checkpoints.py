"""Checkpoints, and models for inference or fine-tuning from a checkpoint or a baseline's name.

Our checkpoint is a dict tagged ``format: "timecycle"`` with the package version and
the full training config, so a model loads without the user repeating its settings.
The TimeCycle release, CRW's release and torchvision ResNet state dicts are recognised
from their keys (:mod:`timecycle.model.formats`) and read as if they were ours; a file
that fits none gets an error naming what was expected and what was found.

Files load with ``weights_only=True``, which unpickles only tensors and plain values;
beyond those only ``argparse.Namespace`` is allowed (CRW stores its arguments as one).
Unpickling any other class can run arbitrary code, so it takes ``trust=True``
(``--trust-checkpoint``) and warns.

Every inference model maps RGB in [0, 1] (B, 3, H, W) to features (B, C, H/8, W/8),
so propagation and evaluation never ask where a model came from.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from timecycle.config import TrainConfig, config_from_dict
from timecycle.model.baselines import LabPixels
from timecycle.model.cycle import TimeCycle
from timecycle.model.encoder import Encoder, EncoderFeatures, build_encoder
from timecycle.model.formats import (
    EXPECTED,
    FORMAT_NAMES,
    OURS,
    CheckpointError,
    describe,
    detect,
    few,
    to_ours,
)

CHECKPOINT_FORMAT = OURS

# Baselines that users compare against: what a random network, ImageNet supervision
# and raw colour achieve, each with no video training.
BASELINES = {
    "random-resnet18": ("resnet18", None),
    "random-resnet50": ("resnet50", None),
    "imagenet-resnet18": ("resnet18", "imagenet"),
    "imagenet-resnet50": ("resnet50", "imagenet"),
    "pixels": None,
}

# How torch.load names the class a weights-only load refused.
_REFUSED = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_model(path_or_name: str | Path, device: str | torch.device = "cpu", trust: bool = False):
    """An inference model (eval mode, on ``device``) from a checkpoint of any recognised
    format or a baseline name (see ``BASELINES``; the ImageNet ones download torchvision's
    weights). ``trust`` allows unpickling classes beyond plain values (see the module's docstring)."""
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
        encoder = _encoder_from(*read_checkpoint(path, trust), path)
    return EncoderFeatures(encoder.eval().to(device))


def load_timecycle(path: str | Path, device: str | torch.device = "cpu", trust: bool = False) -> TimeCycle:
    """The whole TimeCycle model, encoder and tracker, in training mode: to fine-tune, or to
    track patches with the localiser.

    From our checkpoints (trained or converted) and from the TimeCycle release, whose
    localiser is adapted to compute what the release's did (see :mod:`timecycle.model.formats`).
    Files that hold an encoder only (CRW, torchvision, our CRW runs) get a tracker at its
    initialisation, with a warning.
    """
    path = Path(path)
    fmt, payload = read_checkpoint(path, trust)
    if not _has_tracker(payload):
        warnings.warn(f"{path}: holds no tracker weights; the localiser starts from its initialisation",
                      stacklevel=2)
    return _timecycle_from(fmt, payload, path).to(device)


def convert_checkpoint(src: str | Path, dst: str | Path, trust: bool = False) -> str:
    """Write a checkpoint of any recognised format as ours; returns the format it was read as.

    Every weight is checked against the model its config builds before anything is
    written. One of our training checkpoints is copied whole, optimiser state and
    progress included, so that training still resumes from the copy.
    """
    src = Path(src)
    fmt, payload = read_checkpoint(src, trust)
    _timecycle_from(fmt, payload, src)
    save_checkpoint(Path(dst), {k: v for k, v in payload.items() if k not in ("format", "version")})
    return fmt


def read_checkpoint(path: str | Path, trust: bool = False) -> tuple[str, dict]:
    """(format, payload in our layout) of a checkpoint file of any recognised format."""
    path = Path(path)
    obj = _unpickle(path, "cpu", trust)
    fmt = detect(obj)
    if fmt is None:
        raise CheckpointError(f"{path}: not a checkpoint format timecycle recognises. "
                              f"Expected {EXPECTED}. Found {describe(obj)}.")
    return fmt, obj if fmt == OURS else to_ours(fmt, obj)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a temporary file beside the target, then a rename, so a crash
    mid-write leaves the previous checkpoint whole."""
    from timecycle import __version__

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "version": __version__, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Our own checkpoint, the one training resumes from, loaded without unpickling arbitrary objects."""
    path = Path(path)
    payload = _unpickle(path, map_location)
    if detect(payload) != OURS:
        raise CheckpointError(f"{path}: not a timecycle training checkpoint (no format={OURS!r} entry; "
                              f"found {describe(payload)})")
    return payload


def _unpickle(path: Path, map_location: str | torch.device, trust: bool = False) -> object:
    """The file's contents, with weights_only unless a refused class is trusted; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises anything from EOFError to KeyError on bad files)
        refused = _REFUSED.search(str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if refused is None:
            raise _unreadable(path, exc) from None
        if not trust:
            raise CheckpointError(
                f"{path}: holds a {refused.group(1)} object, which a weights-only load refuses since "
                "unpickling it can run any code; if the file comes from a source you trust, pass "
                "--trust-checkpoint (in Python: trust=True)") from None
    warnings.warn(f"{path}: unpickling {refused.group(1)} and whatever else the file names, as trusted "
                  "(weights_only=False): only do this for files from a source you trust", stacklevel=3)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({path.stat().st_size} bytes; truncated, "
                           f"or not a checkpoint at all?): {exc.__class__.__name__}: {first}")


def _config(payload: dict, path: Path) -> TrainConfig:
    """The stored config, its initial weights dropped: the file's replace them, so no download."""
    try:
        cfg = config_from_dict(payload["config"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: its config, written by timecycle {payload.get('version', '?')}, "
                              f"does not fit this version: {exc}") from None
    encoder = dataclasses.replace(cfg.model.encoder, weights=None)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, encoder=encoder))


def _encoder_from(fmt: str, payload: dict, path: Path) -> Encoder:
    enc = _config(payload, path).model.encoder
    encoder = build_encoder(enc)
    state = {k.removeprefix("encoder."): v for k, v in payload["model"].items() if k.startswith("encoder.")}
    _fit(encoder, state, f"{path} ({FORMAT_NAMES[fmt]})",
         f"the encoder its config describes ({enc.arch}, dim {enc.dim}, {enc.padding_mode} padding)")
    return encoder


def _timecycle_from(fmt: str, payload: dict, path: Path) -> TimeCycle:
    from timecycle.train import build_model  # train imports this module

    cfg = _config(payload, path)
    model = build_model(dataclasses.replace(cfg, objective="timecycle"))  # whatever objective trained it
    state = payload["model"]
    if cfg.objective != "timecycle":  # a CRW run: its walk head is no part of TimeCycle
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if not _has_tracker(payload):  # the tracker (and query counter) at their initialisation
        state = {**{k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}, **state}
    _fit(model, state, f"{path} ({FORMAT_NAMES[fmt]})", f"the TimeCycle model its config describes "
         f"({cfg.model.encoder.arch}, {cfg.sample.crop}-px frames, {cfg.sample.patch}-px patches)")
    return model


def _has_tracker(payload: dict) -> bool:
    return any(k.startswith("tracker.") for k in payload["model"])


def _fit(module: nn.Module, state: dict[str, Tensor], where: str, what: str) -> None:
    """Load ``state`` into ``module``, or say which entries are missing, unexpected or of the wrong shape."""
    own = module.state_dict()
    # PyTorch 0.4.0, which wrote the TimeCycle release, predates BatchNorm's batch
    # counters (read only with momentum=None): missing ones keep the module's.
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        found = "; ".join(f"{label} {few(keys, 3)}" for label, keys in
                          (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if keys)
        raise CheckpointError(f"{where}: its weights do not fit {what}: {found}")
    module.load_state_dict(state)
