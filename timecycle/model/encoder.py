"""ResNet backbones at output stride 8, the feature extractor shared by training and propagation.

The networks are torchvision's ResNets, cut after layer3 with layer3's stride set to 1
(no dilation, as in the TimeCycle release), so a 240x240 frame gives a 30x30 grid. The
encoder returns the post-ReLU features *un-normalised*: the tracker samples that map at
sub-cell positions and re-normalises each sampled cell, which differs from sampling an
already normalised map. Call :func:`l2_normalize` for the unit-length features that
affinities and label propagation use.

Inputs are RGB normalised with :func:`normalize_frames` (ImageNet statistics by default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from timecycle.config import EncoderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ARCHS = {
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights, 1024),
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights, 256),
}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def normalize_frames(
    x: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> Tensor:
    """Map RGB in [0, 1] (..., 3, H, W) to the statistics the encoder expects.

    Kept outside the encoder so that data code can normalise on the device in one place and
    so that other statistics (CRW trained with CIFAR's) stay a caller's choice.
    """
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


def l2_normalize(x: Tensor, dim: int = 1) -> Tensor:
    """Unit length along the channel axis; all-zero cells (e.g. sampled outside the frame) stay zero."""
    return F.normalize(x, dim=dim, eps=1e-6)


def feature_size(pixels: int) -> int:
    """Cells along one side of the feature grid for ``pixels`` along that side of the input.

    Every stride-2 stage of the stem and layer2 rounds up, and nested ceilings of divisions
    by 2 equal one ceiling of the division by 8.
    """
    return -(-pixels // Encoder.stride)


def torchvision_weights(arch: str, weights: str | None) -> torchvision.models.WeightsEnum | None:
    """Resolve a weights name to torchvision's enum; constructing the network then downloads it."""
    if weights is None:
        return None
    if weights == "imagenet":
        return _ARCHS[arch][1].IMAGENET1K_V1
    raise ValueError(f"unknown weights {weights!r}: use None (random) or 'imagenet'")


class Encoder(nn.Module):
    """ResNet stem..layer3 at stride 8, then an optional 1x1 projection + ReLU.

    The layer names match torchvision's (conv1, bn1, layer1..layer3), so torchvision and
    other ResNet state dicts load with at most a prefix change; layer4 and fc are dropped
    so that every parameter takes part in the loss (DDP needs no unused-parameter search).
    """

    stride = 8

    def __init__(
        self,
        arch: str = "resnet50",
        dim: int | None = 512,
        weights: str | None = None,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"unknown encoder {arch!r}; known: {', '.join(_ARCHS)}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"unknown padding_mode {padding_mode!r}; known: {', '.join(_PADDING_MODES)}")
        build, _, backbone_dim = _ARCHS[arch]
        net = build(weights=torchvision_weights(arch, weights))
        # The first block of layer3 holds its stride 2 in one 3x3 conv (conv2 in a
        # Bottleneck, conv1 in a BasicBlock) and in the 1x1 downsample; both go to 1.
        for m in net.layer3[0].modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.proj = nn.Conv2d(backbone_dim, dim, kernel_size=1, bias=False) if dim else None
        self.arch = arch
        self.out_dim = dim or backbone_dim
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and any(p > 0 for p in m.padding):
                m.padding_mode = padding_mode

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised RGB -> (B, out_dim, ceil(H/8), ceil(W/8)) non-negative, un-normalised."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.proj is not None:
            x = F.relu(self.proj(x))
        return x


def build_encoder(cfg: EncoderConfig) -> Encoder:
    return Encoder(cfg.arch, cfg.dim, cfg.weights, cfg.padding_mode)


class EncoderFeatures:
    """An :class:`Encoder` as a propagation model: RGB in [0, 1] -> features, normalising
    inside, since propagation hands every model plain RGB."""

    def __init__(self, encoder: Encoder, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> None:
        self.encoder = encoder
        self.stats = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}

    @property
    def arch(self) -> str:
        return self.encoder.arch

    def __call__(self, frames: Tensor) -> Tensor:
        return self.encoder(normalize_frames(frames, **self.stats))
