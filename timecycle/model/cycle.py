"""Cycles through time and the TimeCycle objective (METHOD.md section 5).

A training example is a clip of T frames, a later target frame, a query patch cut from
the target with a known theta, and that theta. The patch is tracked backward through the
clip and forward again into the target; wherever it lands should be where it was cut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timecycle.config import ALIGN_CORNERS, ModelConfig
from timecycle.model.encoder import build_encoder, feature_size, l2_normalize
from timecycle.model.tracker import Tracker, sample_patch

SIMILARITIES = ("inlier", "feature")
QUERIES = ("patch", "target", "target-rolled")


def tracking_distance(theta: Tensor, theta_true: Tensor, points: int = 20) -> Tensor:
    """Mean squared distance between a points x points grid over [-1, 1]^2 mapped by either theta.

    theta, theta_true: (..., 2, 3). Measuring on points rather than on theta's entries
    weighs rotation and translation errors by how far they move the patch. For a pure
    translation difference d the value is |d|^2.
    """
    lin = torch.linspace(-1.0, 1.0, points, device=theta.device, dtype=theta.dtype)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([x.flatten(), y.flatten(), torch.ones_like(x.flatten())], -1)  # (N, 3)
    diff = grid @ (theta - theta_true).transpose(-1, -2)  # (..., N, 2)
    return diff.pow(2).sum(-1).mean()


def _cell_coords(x: Tensor, cells: int) -> Tensor:
    """Normalised coordinate -> grid index coordinate, in which cell i's centre is at i."""
    return (x + 1) * (cells - 1) / 2 if ALIGN_CORNERS else ((x + 1) * cells - 1) / 2


def inlier_score(aff: Tensor, theta: Tensor, frame_grid: tuple[int, int]) -> Tensor:
    """Affinity mass each patch cell puts where theta says that cell went: (B, h, w), in [0, 1].

    aff (B, H*W, h, w) as from :func:`~timecycle.model.tracker.affinity`. "Where" is the
    theta-mapped centre of the cell, and the affinity map is read there by bilinear
    interpolation between the four nearest frame cells (zero beyond the border cells'
    centres, like grid_sample's zero padding). It is therefore 1 exactly when the affinity
    is a delta on a cell centre that theta hits, and differentiable in the affinity (the
    encoder) and in theta (the localiser) alike. The release counted the mass at the mapped
    location too; reading it bilinearly is this project's choice.
    """
    b, _, h, w = aff.shape
    H, W = frame_grid
    loc = F.affine_grid(theta.to(aff.dtype), [b, 1, h, w], align_corners=ALIGN_CORNERS)  # (B, h, w, 2)
    u, v = _cell_coords(loc[..., 0], W), _cell_coords(loc[..., 1], H)  # (B, h, w)
    cols = torch.arange(W, device=aff.device, dtype=aff.dtype)
    rows = torch.arange(H, device=aff.device, dtype=aff.dtype)
    wx = (1 - (u[..., None] - cols).abs()).clamp(min=0)  # (B, h, w, W)
    wy = (1 - (v[..., None] - rows).abs()).clamp(min=0)  # (B, h, w, H)
    return torch.einsum("byxhw,bhwy,bhwx->bhw", aff.reshape(b, H, W, h, w), wy, wx)


def feature_similarity(query: Tensor, tracked: Tensor) -> Tensor:
    """Cosine between corresponding cells of two unit-length feature patches (B, C, h, w) -> (B, h, w)."""
    return (query * tracked).sum(1)


def long_cycle_frames(clip_frames: int, k: int) -> list[int]:
    """Frames visited by the long cycle of length k, in hop order; ``clip_frames`` is the target.

    Backward through the k clip frames nearest the target, forward through k - 1 of them,
    home into the target: 2k hops.
    """
    t = clip_frames
    return list(range(t - 1, t - k - 1, -1)) + list(range(t - k + 1, t + 1))


class TimeCycle(nn.Module):
    """The encoder, one tracker (one localiser for every hop) and the cycle losses.

    ``frame_size`` and ``patch_size`` (square, pixels, multiples of 8 for exact grids)
    fix the localiser's input grids and theta's scale patch_size / frame_size; they are
    the sampler's crop and patch sides.
    """

    def __init__(self, cfg: ModelConfig | None = None, frame_size: int = 240, patch_size: int = 80) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        if cfg.loss.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {cfg.loss.similarity!r}; known: {', '.join(SIMILARITIES)}")
        if cfg.query not in QUERIES:
            raise ValueError(f"unknown query {cfg.query!r}; known: {', '.join(QUERIES)}")
        self.loss_cfg = cfg.loss
        self.query = cfg.query
        self.patch_grid = (feature_size(patch_size),) * 2
        if cfg.query == "target-rolled":
            # Training batches seen: seeds each batch's shift, and travels in the state dict,
            # so that a resumed run draws the shifts an uninterrupted one would have.
            self.register_buffer("rolls", torch.zeros((), dtype=torch.int64))
        self.encoder = build_encoder(cfg.encoder)
        g, p = feature_size(frame_size), feature_size(patch_size)
        self.tracker = Tracker((g, g), (p, p), patch_size / frame_size, cfg.tracker)

    def query_features(self, patch: Tensor, target: Tensor, target_feats: Tensor, theta_true: Tensor) -> Tensor:
        """The query of the first hop, (B, C, h, w) unit length per cell, as ``cfg.query`` says.

        'patch' (the release): the patch image (B, 3, P, P) encoded on its own. A small
        patch is then mostly the encoder's padding: its cells resemble the target's
        features where it was cut hardly more than anywhere else, so the first hop's
        affinity, and with it the localiser's input, carries no information at the start.
        'target': the target's features ``target_feats`` (B, C, H, W), sampled under
        theta_true (the same bilinear sampling as a tracked patch). The query then also
        carries the target's absolute position, which a cycle could follow instead of
        the content ("stay still" comes home too). 'target-rolled': the same, from the
        target encoded again after a circular shift by a random whole number of cells
        (one per batch, drawn from the count of training batches seen) and shifted back,
        so that the query matches the target in content but not in position.
        """
        if self.query == "patch":
            return l2_normalize(self.encoder(patch))
        if self.query == "target-rolled":
            s = self.encoder.stride
            h, w = target_feats.shape[-2:]
            g = torch.Generator().manual_seed(int(self.rolls))
            if self.training:
                self.rolls += 1
            dy, dx = int(torch.randint(1, h, (), generator=g)), int(torch.randint(1, w, (), generator=g))
            rolled = self.encoder(torch.roll(target, (dy * s, dx * s), (-2, -1)))
            target_feats = torch.roll(rolled, (-dy, -dx), (-2, -1))
        return l2_normalize(sample_patch(target_feats, theta_true, self.patch_grid))

    def forward(self, clip: Tensor, target: Tensor, patch: Tensor, theta_true: Tensor) -> dict[str, Tensor]:
        """Losses of one batch.

        clip (B, T, 3, S, S) in time order (clip[:, -1] nearest the target), target
        (B, 3, S, S), patch (B, 3, P, P): all normalised with ``normalize_frames``;
        theta_true (B, 2, 3) cut the patch from the target. Returns the scalar losses
        'long', 'skip', 'sim' and their weighted sum 'total', and 'cycle_thetas'
        (B, 2T, 2, 3), detached: the hops of the longest cycle, in the order of
        ``long_cycle_frames(T, T)``, for drawing.
        """
        b, t = clip.shape[:2]
        frames = torch.cat([clip, target[:, None]], 1).flatten(0, 1)  # (B*(T+1), 3, S, S)
        feats = self.encoder(frames).unflatten(0, (b, t + 1))  # (B, T+1, C, H, W); index T: target
        units = l2_normalize(feats, dim=2)
        query = self.query_features(patch, target, feats[:, t], theta_true)  # (B, C, h, w)

        def each(x: Tensor) -> Tensor:
            """(B, ...) -> (B*T, ...), one copy per clip frame."""
            return x[:, None].expand(b, t, *x.shape[1:]).flatten(0, 1)

        # The patch into every clip frame at once: the similarity term's hops, the skip
        # cycles' first halves and the long cycles' first hop.
        first = self.tracker(each(query), feats[:, :t].flatten(0, 1), units[:, :t].flatten(0, 1))
        home = self.tracker(first.patch, each(feats[:, t]), each(units[:, t]))
        skip = tracking_distance(home.theta, each(theta_true), self.loss_cfg.grid_points)

        # Long cycles share their backward halves: extend one backward track a frame at a
        # time; after k hops it is at clip frame t - k.
        back = [first.patch.unflatten(0, (b, t))[:, t - 1]]  # each (B, C, h, w)
        thetas = [first.theta.unflatten(0, (b, t))[:, t - 1]]  # the longest cycle's hops, for drawing
        for k in range(2, t + 1):
            step = self.tracker(back[-1], feats[:, t - k], units[:, t - k])
            back.append(step.patch)
            thetas.append(step.theta)
        # Forward halves in lockstep: at step j every cycle k > j hops into its frame
        # t - k + 1 + j, all of them as one batch, so the tracker runs t times, not t(t+1)/2.
        current = dict(enumerate(back, start=1))  # cycle k -> its patch
        long_terms = []
        for j in range(t):
            active = list(range(j + 1, t + 1))
            frames_at = torch.tensor([t - k + 1 + j for k in active], device=feats.device)
            step = self.tracker(
                torch.cat([current[k] for k in active]),  # (n*B, C, h, w)
                feats[:, frames_at].transpose(0, 1).flatten(0, 1),  # (n*B, C, H, W)
                units[:, frames_at].transpose(0, 1).flatten(0, 1),
            )
            for k, patch_k, theta_k in zip(active, step.patch.chunk(len(active)), step.theta.chunk(len(active))):
                current[k] = patch_k
                if k == j + 1:  # cycle k's last hop, home into the target
                    long_terms.append(tracking_distance(theta_k, theta_true, self.loss_cfg.grid_points))
                if k == t:
                    thetas.append(theta_k)
        long = torch.stack(long_terms).mean()

        if self.loss_cfg.similarity == "inlier":
            score = inlier_score(first.affinity, first.theta, self.tracker.frame_grid)
        else:
            score = feature_similarity(each(query), first.patch)
        sim = -score.mean()

        c = self.loss_cfg
        total = c.long_weight * long + c.skip_weight * skip + c.sim_weight * sim
        return {
            "long": long, "skip": skip, "sim": sim, "total": total,
            "cycle_thetas": torch.stack(thetas, 1).detach(),
        }
