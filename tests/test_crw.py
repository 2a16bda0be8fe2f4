"""The contrastive random walk: transitions, palindromes, edge dropout, the clip sampler,
training through the shared loop, loading what it trained, and that it learns."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from timecycle.config import PRESETS, CRWConfig, EncoderConfig, OptimConfig, preset
from timecycle.data.clips import CRWClipDataset, make_clip, random_resized_boxes
from timecycle.data.synthetic import SyntheticConfig, generate_set, write_videos
from timecycle.model.checkpoints import load_checkpoint, load_model, load_timecycle
from timecycle.model.crw import (
    CRW,
    box_thetas,
    cut_patches,
    grid_boxes,
    palindromes,
    transitions,
)
from timecycle.model.cycle import TimeCycle
from timecycle.model.encoder import EncoderFeatures
from timecycle.train import LAST, build_model, optim_config, train
from timecycle.video import VideoError, VideoInfo

# 48x48 frames of 3x3 nodes (16-px patches at stride 16): every size differs from the
# release's, so nothing hard-coded can pass, and a forward pass takes milliseconds.
TINY = CRWConfig(short_side=56, clip_len=4, frame_size=48, patch=16, patch_stride=16, dim=32)
R18 = EncoderConfig(arch="resnet18", dim=None, padding_mode="reflect")


def tiny_model(**changes) -> CRW:
    torch.manual_seed(0)
    return CRW(dataclasses.replace(TINY, **changes), R18)


# ----------------------------------------------------------------------------- transitions and walks


def test_transition_matrices_are_row_stochastic_and_so_are_the_walks():
    affinity = torch.randn(2, 3, 9, 9).clamp(-1, 1)
    for drop in (0.0, 0.5):
        p = transitions(affinity, 0.05, drop)
        assert p.shape == affinity.shape and (p >= 0).all()
        assert torch.allclose(p.sum(-1), torch.ones(2, 3, 9), atol=1e-5)
    model = tiny_model().train()
    nodes = torch.nn.functional.normalize(torch.randn(2, 5, 9, 32), dim=-1)
    walks = model.walks(nodes)
    assert sorted(walks) == [2, 3, 4]  # 0 -> k -> 0 for k = 2 .. T-1
    for walk in walks.values():
        assert walk.shape == (2, 9, 9) and torch.allclose(walk.sum(-1), torch.ones(2, 9), atol=1e-5)


def test_backward_steps_use_the_transposed_affinities():
    """The walk 0 -> 2 -> 0 is P01 P12 P21 P10 with P(t+1 -> t) = softmax(A_t^T), not A_t's columns."""
    torch.manual_seed(1)
    nodes = torch.nn.functional.normalize(torch.randn(1, 3, 6, 8), dim=-1)
    a = nodes[:, :-1] @ nodes[:, 1:].transpose(-1, -2)  # (1, 2, 6, 6)
    fwd, bwd = (a / 0.05).softmax(-1), (a.transpose(-1, -2) / 0.05).softmax(-1)
    expected = fwd[:, 0] @ fwd[:, 1] @ bwd[:, 1] @ bwd[:, 0]
    assert torch.allclose(tiny_model().eval().walks(nodes)[2], expected, atol=1e-6)
    assert torch.allclose(palindromes(fwd, bwd)[2], expected, atol=1e-6)


def test_a_walk_on_identical_frames_with_identity_features_comes_home():
    """Every node is its own one-hot vector in every frame: the walker's every step is a
    softmax of 1 / tau on its own node against 0 elsewhere, so it comes home with
    probability ~1 (1 - (N - 1) e^-20 a step)."""
    model = tiny_model().eval()
    n = 9
    nodes = torch.eye(n).expand(2, 4, n, n)  # (B, T, N, D = N)
    walks = model.walks(nodes)
    assert sorted(walks) == [2, 3]
    for walk in walks.values():
        assert walk.diagonal(dim1=-2, dim2=-1).min() > 1 - 1e-6


def test_edge_dropout_is_on_in_training_and_off_in_eval():
    model = tiny_model(edge_dropout=0.5)
    nodes = torch.nn.functional.normalize(torch.randn(2, 4, 9, 32), dim=-1)
    model.train()
    a, b = model.walks(nodes), model.walks(nodes)
    assert not torch.equal(a[2], b[2])  # new edges dropped on every call
    model.eval()
    a, b = model.walks(nodes), model.walks(nodes)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    affinity = nodes[:, :-1] @ nodes[:, 1:].transpose(-1, -2)
    plain = palindromes(transitions(affinity, 0.05), transitions(affinity.transpose(-1, -2), 0.05))
    assert torch.allclose(a[3], plain[3])
    dropped = transitions(affinity, 0.05, 0.5)
    share = (dropped == 0).float().mean()
    assert 0.4 < share < 0.6  # half the edges get probability exactly 0


def test_forward_gives_scalar_losses_that_train_the_encoder_and_head():
    model = tiny_model().train()
    out = model(torch.randn(2, 4, 3, 48, 48))
    assert set(out) == {"walk2", "walk3", "acc2", "acc3", "acc", "total"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert out["total"].item() == pytest.approx((out["walk2"] + out["walk3"]).item() / 2)
    out["total"].backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.encoder.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no palindrome walk"):
        model(torch.randn(1, 2, 3, 48, 48))
    with pytest.raises(ValueError, match="node grid is built for 48x48"):
        model(torch.randn(1, 4, 3, 40, 40))


# ----------------------------------------------------------------------------- nodes


def test_node_grid_and_unjittered_patches_are_exact_crops():
    boxes = grid_boxes(256, 64, 32)
    assert boxes.shape == (49, 4) and boxes[-1].tolist() == [192, 192, 64, 64]  # the release's 7x7
    frames = torch.rand(2, 3, 48, 48)
    thetas = box_thetas(grid_boxes(48, 16, 16), 48, 48).expand(2, 9, 2, 3)
    patches = cut_patches(frames, thetas, 16).view(2, 9, 3, 16, 16)
    for i in range(3):
        for j in range(3):
            assert torch.allclose(patches[:, 3 * i + j], frames[:, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16],
                                  atol=1e-5)
    # A box of half the output's size is the same pixels upsampled: its corners' pixels agree.
    half = box_thetas(torch.tensor([[[8.0, 24.0, 8.0, 8.0]]]), 48, 48)
    up = cut_patches(frames[:1], half, 16)[0]
    assert torch.allclose(up[:, 1::2, 1::2][:, 1:-1, 1:-1].mean(), frames[0, :, 8:16, 24:32][:, 1:-1, 1:-1].mean(),
                          atol=0.05)


def test_random_resized_boxes_fit_and_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    boxes = random_resized_boxes(112, 150, (0.8, 0.95), (0.7, 1.3), 2000, rng)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 112).all() and (left + w <= 150).all()
    area = h * w / (112 * 150)
    assert area.min() > 0.77 and area.max() < 0.98  # within the range, up to rounding
    assert (w / h).min() > 0.68 and (w / h).max() < 1.32
    # Nothing fits a 1 x 10 image at ratios near 1: torchvision's fallback, the largest central box.
    assert random_resized_boxes(1, 10, (0.8, 0.95), (0.7, 1.3), 3, rng).tolist() == [[0, 4, 1, 1]] * 3


def test_make_clip_crops_each_frame_on_its_own_and_jitters_each_node():
    cfg = dataclasses.replace(TINY, clip_len=5)
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 56, 70, 3), dtype=np.uint8)
    clip = make_clip(frames, cfg, np.random.default_rng(1))
    assert clip["clip"].shape == (5, 3, 48, 48) and clip["clip"].dtype == torch.float32
    assert 0 <= clip["clip"].min() and clip["clip"].max() <= 1
    assert clip["patch_theta"].shape == (5, 9, 2, 3)
    assert len({tuple(b) for b in clip["frame_boxes"].tolist()}) == 5  # one crop per frame
    theta = clip["patch_theta"]
    scale = theta[..., 0, 0] * theta[..., 1, 1]  # area share of the frame
    assert ((scale * 48 * 48 / 16**2 > 0.65) & (scale * 48 * 48 / 16**2 < 0.95)).all()
    # Each jittered patch stays inside its window.
    centres = (theta[..., :, 2] + 1) * 48 / 2  # (T, N, 2) x, y in pixels
    halves = torch.stack([theta[..., 0, 0], theta[..., 1, 1]], -1) * 48 / 2  # (T, N, 2) half width, height
    windows = grid_boxes(48, 16, 16)[:, [1, 0]]  # (N, 2) left, top
    assert (centres - halves >= windows - 1e-4).all() and (centres + halves <= windows + 16 + 1e-4).all()
    assert not torch.allclose(theta[0], theta[1])  # every frame's nodes jittered anew
    with pytest.raises(ValueError, match=r"expected \(5, H, W, 3\)"):
        make_clip(frames[:4], cfg, np.random.default_rng(1))


# ----------------------------------------------------------------------------- the sampler


class _Video:
    def __init__(self, frames: np.ndarray, fail: bool):
        self.frames, self.fail, self.reads = frames, fail, []

    def __len__(self) -> int:
        return len(self.frames)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def read(self, indices):
        if self.fail:
            raise VideoError("corrupt.mp4", "decoding failed")
        self.reads.append(list(indices))
        return self.frames[list(indices)]


class _Library:
    """In-memory videos of the given lengths at 8 fps; 'corrupt' ones fail to read."""

    def __init__(self, lengths: dict[str, int]):
        self.infos = [VideoInfo(p, n, 8.0, 70, 56) for p, n in lengths.items()]
        self.opened: list[_Video] = []

    def __call__(self, info: VideoInfo, fps=None, short_side=None) -> _Video:
        frames = np.random.default_rng(info.num_frames).integers(0, 256, (info.num_frames, 56, 70, 3), np.uint8)
        self.opened.append(_Video(frames, "corrupt" in info.path))
        return self.opened[-1]


def test_clip_dataset_reads_consecutive_frames_keyed_and_counts_failures(caplog):
    library = _Library({"a.mp4": 20, "tiny.mp4": 3, "corrupt.mp4": 20, "b.mp4": 4})
    with caplog.at_level(logging.WARNING):
        dataset = CRWClipDataset(library.infos, TINY, seed=3, open_fn=library)
    assert len(dataset) == 3 and dataset.too_short == 1  # tiny: 3 frames < clip_len 4
    assert "1 of 4 videos are shorter than one sample" in caplog.text
    first = dataset[(2, 0)]
    start = first["start"]
    assert library.opened[-1].reads == [[start, start + 1, start + 2, start + 3]] and 0 <= start <= 16
    again = dataset[(2, 0)]
    assert all(torch.equal(torch.as_tensor(first[k]), torch.as_tensor(again[k])) for k in first)
    assert not torch.equal(dataset[(3, 0)]["patch_theta"], first["patch_theta"])
    skipped = dataset[(0, 1)]  # corrupt.mp4 fails: the next video stands in
    assert skipped["index"] == 2 and skipped["skipped"] == 1 and skipped["start"] == 0  # b.mp4 has 4 frames
    batch = default_collate([first, skipped])
    assert batch["clip"].shape == (2, 4, 3, 48, 48) and batch["patch_theta"].shape == (2, 4, 9, 2, 3)
    with pytest.raises(ValueError, match="clip_len 2 < 3"):
        CRWClipDataset(library.infos, dataclasses.replace(TINY, clip_len=2), open_fn=library)


# ----------------------------------------------------------------------------- presets and the loop


def test_crw_preset_holds_the_release_values_and_cpu_small_takes_either_objective():
    r18 = PRESETS["crw-r18"]
    c = r18.crw
    assert r18.objective == "crw" and r18.batch_size == 20 and r18.model.encoder == R18
    assert (c.clip_len, c.fps, c.frame_size, c.patch, c.patch_stride, c.grid) == (4, 8.0, 256, 64, 32, 7)
    assert (c.temperature, c.edge_dropout, c.dim, c.frame_scale, c.patch_scale) == (0.05, 0.1, 128, (0.8, 0.95),
                                                                                  (0.7, 0.9))
    assert (r18.crw.optim.lr, r18.crw.optim.betas, r18.crw.optim.grad_clip) == (1e-4, (0.9, 0.999), None)
    small = preset("cpu-small")
    walk = dataclasses.replace(small, objective="crw", crw=dataclasses.replace(small.crw, optim=OptimConfig(lr=5e-5)))
    assert optim_config(small) == small.optim and optim_config(walk).lr == 5e-5  # each objective its own optimiser
    assert isinstance(build_model(small), TimeCycle)
    assert isinstance(build_model(dataclasses.replace(small, objective="crw")), CRW)
    with pytest.raises(ValueError, match="unknown objective 'walk'"):
        build_model(dataclasses.replace(small, objective="walk"))


def tiny_run_config(**changes):
    cfg = dataclasses.replace(preset("cpu-small"), objective="crw", crw=TINY, batch_size=2, workers=0, log_every=1,
                              checkpoint_every=1000, epochs=50)
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crw_videos")
    write_videos(generate_set(SyntheticConfig(height=56, width=64, frames=16), 3, seed=5), folder)
    return folder


def test_training_resumes_exactly_and_loads_as_an_encoder(videos, tmp_path):
    """The shared loop trains CRW: the encoder learns from the first step (cpu-small's
    warm-up is TimeCycle's), the history logs each walk's loss and accuracy and
    TensorBoard the walk figure, a resumed run
    repeats an uninterrupted one (edge dropout draws included), and the checkpoint loads
    with load_model (the encoder) and load_timecycle (the encoder under a fresh tracker)."""
    cfg = tiny_run_config()
    assert cfg.freeze_encoder_steps > 0
    torch.manual_seed(cfg.seed)
    init = build_model(cfg).state_dict()
    train(dataclasses.replace(cfg, max_steps=3), videos, tmp_path / "a", progress_bar=False)
    train(dataclasses.replace(cfg, max_steps=2), videos, tmp_path / "b", progress_bar=False)
    train(dataclasses.replace(cfg, max_steps=3), videos, tmp_path / "b", resume=tmp_path / "b" / LAST,
          progress_bar=False)
    a, b = (load_checkpoint(tmp_path / x / LAST) for x in "ab")
    last_a, last_b = a["progress"]["history"][-1], b["progress"]["history"][-1]
    assert {"total", "walk2", "walk3", "acc2", "acc3", "acc", "clips_per_s"} <= set(last_a)
    assert all(last_b[k] == pytest.approx(last_a[k], abs=1e-6) for k in ("total", "walk2", "walk3"))
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6) for k in a["model"])
    assert not torch.equal(a["model"]["encoder.conv1.weight"], init["encoder.conv1.weight"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "a" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"loss/total", "loss/walk2", "loss/walk3", "accuracy/acc2", "accuracy/acc"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["cycle"]  # the walk figure, at step 1
    image = events.Images("cycle")[0]
    assert image.step == 1 and (image.width, image.height) == (4 * 48 + 3 * 4, 48)  # 4 frames of 48 px

    trained = build_model(cfg)
    trained.load_state_dict(a["model"])
    frames = torch.rand(1, 3, 48, 64)
    encoder = load_model(tmp_path / "a" / LAST)
    assert isinstance(encoder, EncoderFeatures)
    assert torch.allclose(encoder(frames), EncoderFeatures(trained.encoder.eval())(frames), atol=1e-6)
    with pytest.warns(UserWarning, match="holds no tracker weights"):
        timecycle = load_timecycle(tmp_path / "a" / LAST)
    assert isinstance(timecycle, TimeCycle)
    assert torch.equal(timecycle.encoder.conv1.weight, trained.encoder.conv1.weight)


def test_cli_objective_flag_and_init_from_a_timecycle_run(videos, tmp_path):
    from timecycle.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text("preset: cpu-small\nbatch_size: 2\nworkers: 0\nfreeze_encoder_steps: 0\n"
                      "sample: {short_side: 80, crop: 72, patch: 24, motion_grid: 6, motion_window: 2}\n"
                      "crw: {short_side: 56, frame_size: 48, patch: 16, patch_stride: 16, dim: 32}\n")
    assert main(["train", "--config", str(config), "--data", str(videos), "--out", str(tmp_path / "tc"),
                 "--max-steps", "1"]) == 0
    assert main(["train", "--config", str(config), "--objective", "crw", "--data", str(videos),
                 "--out", str(tmp_path / "crw"), "--max-steps", "1", "--init", str(tmp_path / "tc" / LAST)]) == 0
    ckpt = load_checkpoint(tmp_path / "crw" / LAST)
    assert ckpt["config"]["objective"] == "crw" and "head.weight" in ckpt["model"]


# ----------------------------------------------------------------------------- it learns


@pytest.mark.timeout(1200)
def test_crw_learns_on_synthetic_videos_and_beats_its_initialisation(learning_run, capsys):
    """cpu-small with the CRW objective, trained on synthetic videos: the walk's loss falls,
    and its features propagate held-out first-frame masks better than the same network at
    its initialisation, even once that network's BatchNorm statistics are re-estimated on
    the training videos (all J-Means printed). About two minutes on two free CPU cores."""
    steps = 48
    run = learning_run(dataclasses.replace(preset("cpu-small"), objective="crw", max_steps=steps, log_every=1), "crw")
    history = run["history"]
    assert len(history) == steps
    early, late = (np.mean([h["total"] for h in part]) for part in (history[:8], history[-8:]))
    with capsys.disabled():
        print(f"\ncpu-small, CRW, {steps} steps: walk loss {early:.3f} -> {late:.3f}; held-out J-Mean: "
              f"init {run['init']:.3f}, init with recalibrated BatchNorm {run['init_bn']:.3f}, "
              f"trained {run['trained']:.3f} ({run['seconds']:.0f} s)")
    assert late < early
    assert run["trained"] > max(run["init"], run["init_bn"])
