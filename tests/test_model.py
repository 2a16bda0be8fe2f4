"""Encoders, tracker and cycle losses on small CPU inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from timecycle.config import EncoderConfig, LossConfig, ModelConfig, TrackerConfig
from timecycle.model import (
    Encoder,
    Localiser,
    TimeCycle,
    Tracker,
    affinity,
    feature_size,
    inlier_score,
    l2_normalize,
    long_cycle_frames,
    normalize_frames,
    sample_patch,
    theta_from_params,
    torchvision_weights,
    tracking_distance,
)


def small_model(similarity: str = "inlier", query: str = "patch") -> TimeCycle:
    """ResNet-18 on 72-px frames and 24-px patches: 9x9 and 3x3 grids, hence a 2x2 localiser kernel."""
    cfg = ModelConfig(
        EncoderConfig("resnet18", dim=32), TrackerConfig(kernel=2), LossConfig(similarity=similarity), query=query
    )
    return TimeCycle(cfg, frame_size=72, patch_size=24)


def centred_theta(b: int, scale: float, tx: float = 0.0, ty: float = 0.0) -> torch.Tensor:
    return theta_from_params(torch.tensor([[tx, ty, 0.0]]).expand(b, 3), scale)


# Encoders


@torch.no_grad()
def test_resnet50_stride_8_and_512_d():
    enc = Encoder("resnet50").eval()
    assert enc.layer3[0].conv2.stride == (1, 1) and enc.layer3[0].conv2.dilation == (1, 1)
    assert enc.layer3[0].downsample[0].stride == (1, 1)
    y = enc(torch.randn(1, 3, 240, 240))
    assert y.shape == (1, 512, 30, 30) and enc.out_dim == 512
    assert (y >= 0).all()


@torch.no_grad()
def test_resnet18_stride_8_256_d_and_projection():
    x = torch.randn(1, 3, 240, 240)
    assert Encoder("resnet18", dim=None).eval()(x).shape == (1, 256, 30, 30)
    enc = Encoder("resnet18", dim=64).eval()
    assert enc(x).shape == (1, 64, 30, 30) and enc.out_dim == 64
    assert enc(torch.randn(1, 3, 70, 64)).shape[-2:] == (feature_size(70), feature_size(64)) == (9, 8)


@torch.no_grad()
def test_reflect_padding_reaches_every_padded_conv():
    enc = Encoder("resnet18", dim=None, padding_mode="reflect").eval()
    padded = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
    assert padded and all(m.padding_mode == "reflect" for m in padded)
    zeros = Encoder("resnet18", dim=None).eval()
    zeros.load_state_dict(enc.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert enc(x).shape == zeros(x).shape and not torch.allclose(enc(x), zeros(x))


def test_weights_names_resolve_without_download():
    assert torchvision_weights("resnet50", "imagenet") is torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    assert torchvision_weights("resnet18", "imagenet") is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert torchvision_weights("resnet18", None) is None
    with pytest.raises(ValueError):
        torchvision_weights("resnet18", "imagenet21k")
    with pytest.raises(ValueError):
        Encoder("vgg16")


def test_normalize_frames_uses_imagenet_statistics():
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(normalize_frames(mean), torch.zeros(2, 3, 4, 4), atol=1e-6)
    white = normalize_frames(torch.ones(1, 3, 1, 1)).flatten()
    assert torch.allclose(white, torch.tensor([2.2489, 2.4286, 2.6400]), atol=1e-4)


# Tracker


def test_affinity_is_a_softmax_over_frame_positions_peaking_at_the_crop():
    torch.manual_seed(0)
    frame = l2_normalize(torch.randn(2, 16, 6, 5))
    query = frame[:, :, 1:4, 2:4]
    aff = affinity(query, frame)
    assert aff.shape == (2, 30, 3, 2)
    assert torch.allclose(aff.sum(1), torch.ones(2, 3, 2), atol=1e-6)
    rows, cols = torch.meshgrid(torch.arange(1, 4), torch.arange(2, 4), indexing="ij")
    assert (aff.argmax(1) == rows * 5 + cols).all()
    assert (affinity(query, frame, temperature=0.01).amax(1) > 0.99).all()  # sharper at low temperature


def test_localiser_shapes_and_grid_checks():
    loc = Localiser(900, (10, 10))
    assert loc.head.in_features == 64 * 4 * 4
    assert loc(torch.rand(2, 900, 10, 10)).shape == (2, 3)
    assert Localiser(81, (3, 3), kernel=2).head.in_features == 64  # 3 -> 2 -> 1
    with pytest.raises(ValueError, match="at least 7 cells"):
        Localiser(900, (6, 10))
    with pytest.raises(ValueError, match="built for"):
        loc(torch.rand(2, 400, 10, 10))


def test_fresh_localiser_predicts_the_centred_unrotated_crop():
    torch.manual_seed(0)
    tracker = Tracker((30, 30), (10, 10), 1 / 3)
    frame = torch.rand(4, 32, 30, 30)
    query = l2_normalize(torch.rand(4, 32, 10, 10))
    hop = tracker(query, frame)
    assert hop.affinity.shape == (4, 900, 10, 10) and hop.patch.shape == (4, 32, 10, 10)
    assert hop.theta.shape == (4, 2, 3)
    assert torch.allclose(hop.theta, centred_theta(4, 1 / 3), atol=0.02)
    assert torch.allclose(hop.patch.norm(dim=1), torch.ones(4, 10, 10), atol=1e-5)


def test_theta_from_params():
    theta = theta_from_params(torch.tensor([[0.2, -0.4, math.pi / 2], [0.0, 0.0, 0.0]]), 0.5)
    expected = torch.tensor([[[0.0, -0.5, 0.2], [0.5, 0.0, -0.4]], [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]])
    assert torch.allclose(theta, expected, atol=1e-6)


def smooth_image(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    channels = [
        torch.sin(2 * math.pi * (0.7 * xx + 0.3 * yy)),
        torch.cos(2 * math.pi * (0.4 * xx - 0.5 * yy)),
        torch.sin(2 * math.pi * xx * yy),
    ]
    return torch.stack(channels)[None]  # (1, 3, S, S)


@pytest.mark.parametrize(
    "params, atol", [((1 / 3, -1 / 3, 0.0), 1e-5), ((1 / 6, -0.2, 0.5), 0.03), ((0.3, 0.1, -0.7), 0.03)]
)
def test_theta_cuts_the_same_patch_from_pixels_and_from_features(params, atol):
    """Features = 8x8 average pooling, equivariant to whole-cell shifts, nearly so to any
    motion on a smooth image: the theta that cut the pixel patch cuts its features out of
    the frame's features. Exact for the 16-px shift; the release's align_corners=True
    convention would miss by ~0.15 here."""
    size, patch = 96, 32
    image = smooth_image(size)
    theta = theta_from_params(torch.tensor([params]), patch / size)
    from_pixels = F.avg_pool2d(sample_patch(image, theta, (patch, patch)), 8)  # (1, 3, 4, 4)
    from_features = sample_patch(F.avg_pool2d(image, 8), theta, (4, 4))
    assert (from_pixels - from_features).abs().max() < atol
    grid = F.affine_grid(theta, [1, 3, patch, patch], align_corners=True)
    other = F.avg_pool2d(F.grid_sample(image, grid, align_corners=True), 8)
    grid = F.affine_grid(theta, [1, 3, 4, 4], align_corners=True)
    assert (other - F.grid_sample(F.avg_pool2d(image, 8), grid, align_corners=True)).abs().max() > 0.1


def test_tracker_learns_to_regress_a_known_translation():
    """Random features; every 7x7 crop of a 15x15 map is a query whose true theta is known.
    Only the localiser learns; after training the sampled patch is the crop."""
    torch.manual_seed(0)
    grid, patch = 15, 7
    frame = torch.randn(1, 32, grid, grid)
    offsets = [(y, x) for y in range(grid - patch + 1) for x in range(grid - patch + 1)]
    queries = l2_normalize(torch.stack([frame[0, :, y : y + patch, x : x + patch] for y, x in offsets]))
    centre = torch.tensor(offsets, dtype=torch.float32).flip(-1) + patch / 2  # (N, 2) x, y in cells
    params = torch.cat([centre * 2 / grid - 1, torch.zeros(len(offsets), 1)], 1)  # (N, 3): tx, ty, angle 0
    true = theta_from_params(params, patch / grid)
    frames = frame.expand(len(offsets), -1, -1, -1)
    tracker = Tracker((grid, grid), (patch, patch), patch / grid, TrackerConfig(channels=(32, 16)))
    opt = torch.optim.Adam(tracker.parameters(), 3e-3)
    initial = tracking_distance(tracker(queries, frames).theta, true).item()
    for _ in range(60):
        loss = tracking_distance(tracker(queries, frames).theta, true)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hop = tracker(queries, frames)
    assert tracking_distance(hop.theta, true).item() < 0.02 * initial
    assert (hop.patch * queries).sum(1).mean() > 0.95


# Losses


def test_tracking_distance_by_hand():
    theta = theta_from_params(torch.tensor([[0.1, -0.3, 0.4], [0.5, 0.2, -1.0]]), 1 / 3)
    assert tracking_distance(theta, theta).item() == 0.0
    d = torch.tensor([0.3, -0.4])
    shifted = theta.clone()
    shifted[:, :, 2] += d
    assert tracking_distance(shifted, theta).item() == pytest.approx(0.25, abs=1e-6)
    # A rotation by 180 degrees at scale 1 sends p to -p: mean |2p|^2 over the grid.
    half_turn = theta_from_params(torch.tensor([[0.0, 0.0, math.pi]]), 1.0)
    lin = torch.linspace(-1, 1, 5)
    expected = 4 * 2 * lin.pow(2).mean()
    value = tracking_distance(half_turn, centred_theta(1, 1.0), points=5).item()
    assert value == pytest.approx(expected.item(), abs=1e-5)


def delta_affinity(rows: torch.Tensor, cols: torch.Tensor, grid: int = 30) -> torch.Tensor:
    """(1, grid*grid, h, w) affinity: patch cell (i, j) all on frame cell (rows[i, j], cols[i, j])."""
    return F.one_hot(rows * grid + cols, grid * grid).permute(2, 0, 1)[None].float()


def test_inlier_score_is_one_for_a_delta_where_theta_points():
    i, j = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    centred = centred_theta(1, 1 / 3)
    ones = torch.ones(1, 10, 10)
    assert torch.allclose(inlier_score(delta_affinity(10 + i, 10 + j), centred, (30, 30)), ones)
    # Three cells right, one up.
    moved = centred_theta(1, 1 / 3, tx=3 * 2 / 30, ty=-2 / 30)
    assert torch.allclose(inlier_score(delta_affinity(9 + i, 13 + j), moved, (30, 30)), ones)
    # A quarter turn: patch point (x, y) goes to (-y, x) / 3, so cell (i, j) to (10 + j, 19 - i).
    turned = theta_from_params(torch.tensor([[0.0, 0.0, math.pi / 2]]), 1 / 3)
    assert torch.allclose(inlier_score(delta_affinity(10 + j, 19 - i), turned, (30, 30)), ones, atol=1e-5)
    # A cell off: nothing; half a cell off: half, and theta gets a gradient.
    assert inlier_score(delta_affinity(10 + i, 11 + j), centred, (30, 30)).abs().max() < 1e-6
    half = centred_theta(1, 1 / 3, tx=1 / 30).requires_grad_()
    score = inlier_score(delta_affinity(10 + i, 10 + j), half, (30, 30))
    assert torch.allclose(score, torch.full((1, 10, 10), 0.5))
    score.sum().backward()
    assert half.grad.abs().sum() > 0


def test_long_cycle_frames():
    assert long_cycle_frames(4, 1) == [3, 4]
    assert long_cycle_frames(4, 2) == [3, 2, 3, 4]
    assert long_cycle_frames(4, 4) == [3, 2, 1, 0, 1, 2, 3, 4]


# The whole model


@pytest.mark.parametrize("similarity,query", [("inlier", "patch"), ("feature", "patch"),
                                              ("inlier", "target"), ("inlier", "target-rolled")])
def test_total_loss_reaches_encoder_and_localiser(similarity, query):
    torch.manual_seed(0)
    model = small_model(similarity, query)
    b, t = 2, 3
    clip, target, patch = torch.randn(b, t, 3, 72, 72), torch.randn(b, 3, 72, 72), torch.randn(b, 3, 24, 24)
    out = model(clip, target, patch, centred_theta(b, 1 / 3, 0.2))
    assert all(out[k].dim() == 0 and torch.isfinite(out[k]) for k in ("long", "skip", "sim", "total"))
    assert out["cycle_thetas"].shape == (b, 2 * t, 2, 3) and not out["cycle_thetas"].requires_grad
    out["total"].backward()
    assert model.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.encoder.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tracker.localiser.parameters())


@torch.no_grad()
def test_losses_compare_where_the_cycles_end_with_the_true_theta():
    """A localiser that always answers the centred crop ends every cycle there: both
    tracking losses are then exactly |d|^2 for a true theta translated by d."""
    model = small_model()
    torch.nn.init.zeros_(model.tracker.localiser.head.weight)
    b, t = 2, 4
    d = torch.tensor([0.3, -0.1])
    clip, target, patch = torch.rand(b, t, 3, 72, 72), torch.rand(b, 3, 72, 72), torch.rand(b, 3, 24, 24)
    out = model(clip, target, patch, centred_theta(b, 1 / 3, *d.tolist()))
    assert out["long"].item() == pytest.approx(d.pow(2).sum().item(), abs=1e-6)
    assert out["skip"].item() == pytest.approx(d.pow(2).sum().item(), abs=1e-6)
    assert torch.allclose(out["cycle_thetas"], centred_theta(b, 1 / 3)[:, None].expand(b, 2 * t, 2, 3))
    weighted = 0.02 * out["long"] + 0.1 * out["skip"] + out["sim"]
    assert out["total"].item() == pytest.approx(weighted.item(), abs=1e-6)


def test_unknown_similarity_is_rejected():
    with pytest.raises(ValueError, match="similarity"):
        TimeCycle(ModelConfig(EncoderConfig("resnet18"), loss=LossConfig(similarity="l2")), 72, 24)
    with pytest.raises(ValueError, match="query"):
        TimeCycle(ModelConfig(EncoderConfig("resnet18"), query="crop"), 72, 24)


class PoolEncoder(torch.nn.Module):
    """A stand-in encoder that commutes exactly with circular shifts by whole cells."""

    stride = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.stride).relu() + 0.1


@torch.no_grad()
@pytest.mark.parametrize("query", ["target", "target-rolled"])
def test_target_queries_are_the_target_features_where_theta_cut_the_patch(query):
    """'target' samples the target's own features under the true theta (the patch image is
    not used); 'target-rolled' encodes the target again under a random circular shift by
    whole cells and shifts the features back, which for a shift-equivariant encoder is
    the same thing."""
    model = small_model(query=query)
    model.encoder = PoolEncoder()
    target = torch.rand(2, 3, 72, 72)
    theta = centred_theta(2, 1 / 3, 2 / 9, -4 / 9)  # whole cells: an exact 3x3 crop
    query_feats = model.query_features(torch.rand(2, 3, 24, 24), target, model.encoder(target), theta)
    expected = l2_normalize(model.encoder(target))[:, :, 1:4, 4:7]
    assert torch.allclose(query_feats, expected, atol=1e-6)


def test_rolled_query_encodes_the_target_again_under_a_shift():
    model = small_model(query="target-rolled").eval()
    target = torch.rand(1, 3, 72, 72)
    calls = []
    model.encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0]))
    with torch.no_grad():
        model.query_features(None, target, model.encoder(target), centred_theta(1, 1 / 3))
    shifted = calls[-1]
    assert not torch.equal(shifted, target)
    assert any(torch.equal(shifted, torch.roll(target, (dy, dx), (-2, -1)))
               for dy in range(8, 72, 8) for dx in range(8, 72, 8))


@torch.no_grad()
def test_batched_cycles_equal_plain_sequential_cycles():
    """The model runs the skip cycles and the long cycles' forward halves as batches;
    hop by hop, one cycle at a time, they must give the same losses and drawn thetas."""
    torch.manual_seed(1)
    model = small_model().eval()  # eval: BatchNorm must not depend on how frames are batched
    torch.nn.init.normal_(model.tracker.localiser.head.weight, 0, 0.3)  # cycles that wander
    b, t = 2, 4
    clip, target, patch = torch.rand(b, t, 3, 72, 72), torch.rand(b, 3, 72, 72), torch.rand(b, 3, 24, 24)
    theta_true = centred_theta(b, 1 / 3, 0.2, -0.3)
    out = model(clip, target, patch, theta_true)

    feats = [model.encoder(clip[:, i]) for i in range(t)] + [model.encoder(target)]
    query = l2_normalize(model.encoder(patch))

    def run(frames: list[int]) -> list[torch.Tensor]:
        q, thetas = query, []
        for i in frames:
            hop = model.tracker(q, feats[i])
            q, thetas = hop.patch, thetas + [hop.theta]
        return thetas

    longs = [tracking_distance(run(long_cycle_frames(t, k))[-1], theta_true) for k in range(1, t + 1)]
    skips = [tracking_distance(run([i, t])[-1], theta_true) for i in range(t)]
    assert out["long"].item() == pytest.approx(torch.stack(longs).mean().item(), abs=1e-5)
    assert out["skip"].item() == pytest.approx(torch.stack(skips).mean().item(), abs=1e-5)
    assert torch.allclose(out["cycle_thetas"], torch.stack(run(long_cycle_frames(t, t)), 1), atol=1e-5)
