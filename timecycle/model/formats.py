"""Checkpoint files from elsewhere: how each is recognised, and how its weights become ours.

Users come with weights that others trained: the TimeCycle release, CRW's release and
torchvision's ResNets. Each is recognised from its keys alone and turned into a payload
of our own layout (``config``, ``model``, ``source``), so that everything after reading a
file (:func:`~timecycle.model.checkpoints.load_model`, ``load_timecycle``, ``convert``)
handles one format. Shapes are checked later, against the model the config builds.

Where the release's architecture differs from ours, the converted weights are adapted so
that the loaded model computes what the release computed:

- The release flattened each frame's features column by column (it transposed H and W
  first, "for the inlier counter"), so channel ``x * H + y`` of its affinity is our
  channel ``y * W + x``: the localiser's first convolution has its input channels
  permuted accordingly, which makes its output identical to the release's.

Two differences stay, since they live in the tracker, not in the weights (METHOD.md
section 3): the release warped with ``align_corners=True`` (here ``False``: a tracked
patch lands up to half a cell apart at the frame border, identically at its centre),
and it multiplied translations by 227/210 when run under Python 3 (1 under Python 2,
the value used here; which of the two the released model was trained with is not
recorded in the file).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import Tensor

from timecycle.config import EncoderConfig, TrainConfig, preset, to_dict
from timecycle.model.encoder import feature_size

OURS = "timecycle"
TIMECYCLE_RELEASE = "timecycle-release"
CRW = "crw"
TORCHVISION = "torchvision"

FORMAT_NAMES = {
    OURS: "a timecycle checkpoint",
    TIMECYCLE_RELEASE: "the TimeCycle release",
    CRW: "CRW's release",
    TORCHVISION: "a torchvision ResNet state dict",
}

EXPECTED = (
    "a timecycle checkpoint (a dict with format='timecycle'); the TimeCycle release (a dict with "
    "'state_dict' whose keys start with 'module.encoderVideo.'); CRW's release (a dict with 'model' "
    "whose keys start with 'encoder.model.'); or a torchvision ResNet-18/50 state dict (keys "
    "'conv1.weight', 'layer1.0.conv1.weight', ...)"
)

_RELEASE_ENCODER = "module.encoderVideo."
_CRW_ENCODER = "encoder.model."
# The release's projection and localiser, under our module names.
_RELEASE_RENAMES = {
    "module.afterconv1.weight": "encoder.proj.weight",
    "module.afterconv3_trans.weight": "tracker.localiser.convs.0.weight",
    "module.afterconv4_trans.weight": "tracker.localiser.convs.2.weight",
    "module.linear2.weight": "tracker.localiser.head.weight",
    "module.linear2.bias": "tracker.localiser.head.bias",
}
# A reflect-pad layer once sat at index 0 of CRW's padded convs, so some of its files
# name them conv1.1 / conv2.1.
_CRW_PADDED_CONV = re.compile(r"\b(conv[12])\.1\.weight$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit; the message names the file."""


def detect(obj: Any) -> str | None:
    """The format of a loaded file's contents, from its keys alone; None when none fits."""
    if not isinstance(obj, dict):
        return None
    if obj.get("format") == OURS:
        return OURS
    if _is_state(obj.get("state_dict")) and f"{_RELEASE_ENCODER}conv1.weight" in obj["state_dict"]:
        return TIMECYCLE_RELEASE
    if _is_state(obj.get("model")) and any(k.startswith(f"{_CRW_ENCODER}conv1.") for k in obj["model"]):
        return CRW
    if _is_state(obj) and "conv1.weight" in obj and "layer1.0.conv1.weight" in obj:
        return TORCHVISION
    return None


def describe(obj: Any) -> str:
    """What a file holds, in a line, for errors about files that fit no format."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    inner = next((k for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
    if inner is not None:
        return f"a dict with keys {few(obj)}, its {inner!r} with keys {few(obj[inner])}"
    return f"a dict with keys {few(obj)}"


def to_ours(fmt: str, obj: dict) -> dict:
    """Our payload (config, model state dict, source) from a file of a foreign format.

    The config holds timecycle-r50's training settings (the release's) around the file's
    encoder, so that converted weights also start a training run.
    """
    encoder, state = {TIMECYCLE_RELEASE: _from_release, CRW: _from_crw, TORCHVISION: _from_torchvision}[fmt](obj)
    cfg = preset("timecycle-r50")
    cfg = dataclasses.replace(cfg, name=fmt, model=dataclasses.replace(cfg.model, encoder=encoder))
    if fmt == TIMECYCLE_RELEASE:
        state = _release_localiser(state, cfg)
    return {"config": to_dict(cfg), "model": state, "source": {"format": fmt, "epoch": obj.get("epoch")}}


def _from_release(obj: dict) -> tuple[EncoderConfig, dict[str, Tensor]]:
    state = {}
    for key, value in obj["state_dict"].items():
        if key.startswith(_RELEASE_ENCODER):
            key = "encoder." + key.removeprefix(_RELEASE_ENCODER)
        key = _RELEASE_RENAMES.get(key, key)
        if not key.startswith("encoder.layer4."):  # present in the file, unused by the release's model
            # Inflated 3-D convs: (out, in, 1, kh, kw) -> (out, in, kh, kw).
            state[key] = value.squeeze(2) if value.dim() == 5 else value
    return EncoderConfig("resnet50", dim=512), state


def _release_localiser(state: dict[str, Tensor], cfg: TrainConfig) -> dict[str, Tensor]:
    """Permute the localiser's input channels from the release's column-major frame
    positions to our row-major ones (see the module's docstring)."""
    key = "tracker.localiser.convs.0.weight"
    w = state.get(key)  # (128, H*W, k, k)
    g = feature_size(cfg.sample.crop)
    if w is None or w.dim() != 4 or w.shape[1] != g * g:
        return state  # left for the shape check, which reports it against the expected shape
    return {**state, key: w.unflatten(1, (g, g)).transpose(1, 2).flatten(1, 2).contiguous()}


def _from_crw(obj: dict) -> tuple[EncoderConfig, dict[str, Tensor]]:
    """CRW's encoder (layer3 at stride 1, like ours); its walk head ``selfsim_fc`` and
    layer4 are dropped, as CRW's evaluation drops them."""
    state = {}
    for key, value in obj["model"].items():
        if key.startswith("selfsim_fc."):
            continue
        if key.startswith(_CRW_ENCODER):
            key = "encoder." + _CRW_PADDED_CONV.sub(r"\1.weight", key.removeprefix(_CRW_ENCODER))
        if not key.startswith("encoder.layer4."):
            state[key] = value
    # CRW builds only its 'scratch' encoder (the released one) with reflect padding.
    model_type = getattr(obj.get("args"), "model_type", "scratch")
    padding = "reflect" if model_type == "scratch" else "zeros"
    return EncoderConfig(_arch(state, "encoder."), dim=None, padding_mode=padding), state


def _from_torchvision(obj: dict) -> tuple[EncoderConfig, dict[str, Tensor]]:
    state = {f"encoder.{k}": v for k, v in obj.items() if not k.startswith(("layer4.", "fc."))}
    return EncoderConfig(_arch(state, "encoder."), dim=None), state


def _arch(state: dict[str, Tensor], prefix: str) -> str:
    """ResNet-50's blocks have a third conv, ResNet-18's do not; any other ResNet then
    fails the shape check with the keys that do not fit."""
    return "resnet50" if f"{prefix}layer1.0.conv3.weight" in state else "resnet18"


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def few(keys: Any, n: int = 4) -> str:
    """The first n of many keys, and how many there are in all."""
    keys = [str(k) for k in keys]
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + more + "]"

