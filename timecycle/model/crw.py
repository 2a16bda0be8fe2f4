"""The contrastive random walk (CRW: Jabri, Owens, Efros, NeurIPS 2020; METHOD.md section 6).

TimeCycle's successor learns from the same signal, cycle consistency in time, with no
tracker to train. Each frame of a clip is a set of nodes (patches); neighbouring frames
are joined by transition matrices, row-softmaxes of the nodes' cosine similarities; a
walker that goes k frames forward and the same way back (a palindrome) should come home.
The loss is the cross-entropy of the round trip against the identity. A round trip only
comes home when every node's embedding picks out its own continuation among all the
other nodes of the next frame, so the walk is a contrastive objective along paths that
the model itself chooses, and the encoder's features become good for correspondence.

Shared with TimeCycle: the encoder (:class:`~timecycle.model.encoder.Encoder`, layer3 at
stride 8, see :class:`CRW`), the training loop, checkpoints and propagation. The clip
sampler is :class:`~timecycle.data.clips.CRWClipDataset`: it draws each frame's random
resized crop and each node's jitter; the patches themselves are cut here, on the batch's
device, from the affine ``patch_theta`` it returns (one ``grid_sample`` per frame instead
of T x N small resizes in a data-loader worker).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timecycle.config import ALIGN_CORNERS, CRWConfig, EncoderConfig
from timecycle.model.encoder import build_encoder

# Added to a walk's probabilities before the log, as the release did, so that a
# probability that underflowed to 0 gives a large finite loss rather than inf.
EPS = 1e-20


def check_config(cfg: CRWConfig) -> None:
    """Fail when the sampler or the model is built, not halfway through an epoch."""
    problems = []
    if cfg.clip_len < 3:
        problems.append(f"clip_len {cfg.clip_len} < 3: the shortest palindrome, 0 -> 2 -> 0, needs 3 frames")
    if not 0 < cfg.patch <= cfg.frame_size or cfg.patch_stride < 1:
        problems.append(f"need 0 < patch ({cfg.patch}) <= frame_size ({cfg.frame_size}) and patch_stride "
                        f"({cfg.patch_stride}) >= 1")
    for name in ("frame_scale", "patch_scale"):
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi <= 1:
            problems.append(f"{name} {(lo, hi)} is not a range of area shares in (0, 1]")
    for name in ("frame_ratio", "patch_ratio"):
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi:
            problems.append(f"{name} {(lo, hi)} is not a range of positive aspect ratios")
    if not cfg.temperature > 0 or not 0 <= cfg.edge_dropout < 1 or cfg.dim < 1 or not cfg.fps > 0:
        problems.append(f"need temperature ({cfg.temperature}) > 0, 0 <= edge_dropout ({cfg.edge_dropout}) < 1, "
                        f"dim ({cfg.dim}) >= 1 and fps ({cfg.fps}) > 0")
    if problems:
        raise ValueError("invalid CRWConfig: " + "; ".join(problems))


# ----------------------------------------------------------------------------- nodes


def grid_boxes(frame_size: int, patch: int, stride: int) -> Tensor:
    """(N, 4) float (top, left, height, width) of the patch x patch windows at ``stride``
    over a square frame, row-major: the nodes before jitter (N = 49 for 256 / 64 / 32).
    As skimage's view_as_windows, which the release used: windows that would cross the
    far border are left out."""
    starts = torch.arange(0, frame_size - patch + 1, stride, dtype=torch.float32)
    top, left = torch.meshgrid(starts, starts, indexing="ij")
    side = torch.full_like(top, float(patch))
    return torch.stack([top, left, side, side], -1).flatten(0, 1)


def box_thetas(boxes: Tensor, height: int, width: int) -> Tensor:
    """(..., 4) pixel boxes (top, left, height, width) -> (..., 2, 3) affines that sample them.

    In torch's normalised coordinates with align_corners=False (the project's convention,
    ``config.ALIGN_CORNERS``), where -1 and 1 are the frame's outer edges: the output's
    edges land on the box's edges, so a box of the output's size is an exact crop.
    """
    assert not ALIGN_CORNERS, "box_thetas maps pixel edges, the align_corners=False convention"
    top, left, h, w = boxes.unbind(-1)
    zero = torch.zeros_like(top)
    rows = (torch.stack([w / width, zero, (2 * left + w) / width - 1], -1),
            torch.stack([zero, h / height, (2 * top + h) / height - 1], -1))
    return torch.stack(rows, -2)


def cut_patches(frames: Tensor, thetas: Tensor, size: int) -> Tensor:
    """Bilinearly sample N patches of ``size`` pixels from each frame.

    frames (M, C, H, W), thetas (M, N, 2, 3) -> (M * N, C, size, size). The N sampling
    grids of a frame are stacked into one tall grid, so that every frame is read by one
    ``grid_sample`` and never copied N times.
    """
    m, n = thetas.shape[:2]
    grid = F.affine_grid(thetas.flatten(0, 1).to(frames.dtype), [m * n, 1, size, size],
                         align_corners=ALIGN_CORNERS)  # (M*N, size, size, 2)
    out = F.grid_sample(frames, grid.view(m, n * size, size, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=ALIGN_CORNERS)  # (M, C, N*size, size)
    return out.unflatten(2, (n, size)).transpose(1, 2).flatten(0, 1)  # (M*N, C, size, size)


# ----------------------------------------------------------------------------- walks


def transitions(affinity: Tensor, temperature: float, edge_dropout: float = 0.0) -> Tensor:
    """Row-stochastic transition matrices: row-softmax(affinity / temperature), (..., N, N).

    ``edge_dropout`` removes that share of the edges at random before the softmax (their
    probability becomes 0), so that a walk cannot rely on a single strong edge: the
    release's remedy for walks that come home along one shortcut. The caller passes 0
    outside training. Computed in float32: probabilities are multiplied along walks.
    """
    logits = affinity.float() / temperature
    if edge_dropout > 0:
        drop = torch.rand_like(logits) < edge_dropout
        logits = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
    return logits.softmax(-1)


def palindromes(forward: Tensor, backward: Tensor) -> dict[int, Tensor]:
    """Round-trip probabilities of the walks 0 -> k -> 0 for k = 2 .. T-1.

    forward[:, t] (B, T-1, N, N) moves a walker from frame t to t+1, backward[:, t] from
    t+1 back to t. Returns {k: (B, N, N)}: row i is where a walker that left node i of
    frame 0 ends, after k steps out and k back. Each walk reuses the previous one's
    products, so all of them cost 3 (T - 2) matrix products. k = 1 is left out, as in
    the release: one step out and back is solved by any features that are merely
    distinct within a frame.
    """
    out = {}
    there, back = forward[:, 0], backward[:, 0]  # 0 -> 1, 1 -> 0
    for k in range(2, forward.shape[1] + 1):
        there = there @ forward[:, k - 1]  # 0 -> k
        back = backward[:, k - 1] @ back  # k -> 0
        out[k] = there @ back
    return out


def walk_loss(walk: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of a round trip (B, N, N) against the identity, and the share of
    walkers whose most likely end is their start (the accuracy of coming home)."""
    n = walk.shape[-1]
    home = walk.diagonal(dim1=-2, dim2=-1)  # (B, N)
    loss = -torch.log(home + EPS).mean()
    accuracy = (walk.argmax(-1) == torch.arange(n, device=walk.device)).float().mean()
    return loss, accuracy


class CRW(nn.Module):
    """The encoder, the linear head and the palindrome walks.

    Nodes: each patch is encoded on its own, its feature map mean-pooled, mapped by a
    linear layer to ``cfg.dim`` (128) and L2-normalised. The encoder is the project's
    (stem to layer3, layer3 at stride 1: stride 8, 256-d for ResNet-18). The release
    trained with layer4 (also at stride 1, 512-d) under its head and dropped it at test;
    here the head reads layer3, the very features that propagation uses, so that no
    trained layer is thrown away. Either way propagation reads layer3.
    """

    def __init__(self, cfg: CRWConfig | None = None, encoder: EncoderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or CRWConfig()
        check_config(cfg)
        self.encoder = build_encoder(encoder or EncoderConfig(arch="resnet18", dim=None, padding_mode="reflect"))
        self.head = nn.Linear(self.encoder.out_dim, cfg.dim)
        self.temperature, self.edge_dropout = cfg.temperature, cfg.edge_dropout
        self.frame_size, self.patch, self.patch_stride = cfg.frame_size, cfg.patch, cfg.patch_stride
        self.stats = (cfg.mean, cfg.std)  # of the inputs it trains on
        # The nodes without jitter, for clips given without patch_theta (evaluation, benchmarks).
        grid = box_thetas(grid_boxes(cfg.frame_size, cfg.patch, cfg.patch_stride), cfg.frame_size, cfg.frame_size)
        self.register_buffer("grid_theta", grid, persistent=False)  # (N, 2, 3)

    def embed(self, clip: Tensor, patch_theta: Tensor | None = None) -> Tensor:
        """Node embeddings (B, T, N, dim), unit length, float32.

        clip (B, T, 3, S, S) normalised frames; patch_theta (B, T, N, 2, 3) where each node's
        patch is cut (from the sampler, jittered), or None for the unjittered grid.
        """
        b, t = clip.shape[:2]
        if patch_theta is None:
            if clip.shape[-2:] != (self.frame_size, self.frame_size):
                raise ValueError(f"frames of {tuple(clip.shape[-2:])} without patch_theta: the node grid is "
                                 f"built for {self.frame_size}x{self.frame_size} frames")
            patch_theta = self.grid_theta.expand(b, t, *self.grid_theta.shape)
        n = patch_theta.shape[2]
        patches = cut_patches(clip.flatten(0, 1), patch_theta.flatten(0, 1), self.patch)  # (B*T*N, 3, P, P)
        pooled = self.encoder(patches).mean((-2, -1))  # (B*T*N, C)
        nodes = self.head(pooled).float().view(b, t, n, -1)
        return F.normalize(nodes, dim=-1)

    def walks(self, nodes: Tensor) -> dict[int, Tensor]:
        """The palindromes' round trips {k: (B, N, N)} of node embeddings (B, T, N, D);
        edges dropped in training mode only."""
        affinity = nodes[:, :-1] @ nodes[:, 1:].transpose(-1, -2)  # (B, T-1, N, N): frame t's nodes x t+1's
        drop = self.edge_dropout if self.training else 0.0
        forward = transitions(affinity, self.temperature, drop)
        backward = transitions(affinity.transpose(-1, -2), self.temperature, drop)  # independent drops
        return palindromes(forward, backward)

    def forward(self, clip: Tensor, patch_theta: Tensor | None = None) -> dict[str, Tensor]:
        """Losses of one batch: clip (B, T, 3, S, S) normalised with the config's statistics,
        patch_theta (B, T, N, 2, 3) or None (see :meth:`embed`).

        Returns scalars: 'walk{k}' and 'acc{k}', the loss and the accuracy of coming home
        of the walk 0 -> k -> 0 for k = 2 .. T-1; 'acc' their mean accuracy; 'total' their
        mean loss, the objective (the release's).
        """
        if clip.shape[1] < 3:
            raise ValueError(f"a clip of {clip.shape[1]} frames has no palindrome walk; give at least 3")
        nodes = self.embed(clip, patch_theta)
        with torch.autocast(nodes.device.type, enabled=False):  # products of probabilities in float32
            results = {k: walk_loss(walk) for k, walk in self.walks(nodes).items()}
        out = {f"walk{k}": loss for k, (loss, _) in results.items()}
        out.update({f"acc{k}": acc for k, (_, acc) in results.items()})
        out["acc"] = torch.stack([acc for _, acc in results.values()]).mean()
        out["total"] = torch.stack([loss for loss, _ in results.values()]).mean()
        return out
