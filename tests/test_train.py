"""The training loop: sampling order, checkpoints, resuming, warm-up, broken videos,
logging, presets, and several processes through torchrun."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from timecycle.config import PRESETS, SampleConfig, TrainConfig, load_train_config, preset, to_dict
from timecycle.data.synthetic import SyntheticConfig, generate_set, write_videos
from timecycle.model.checkpoints import load_checkpoint
from timecycle.train import LAST, EpochSampler, Progress, build_model, save_training_state, train
from timecycle.viz import TRUE_COLOUR, cycle_figure, theta_corners


def tiny_config(**changes) -> TrainConfig:
    """cpu-small shrunk to seconds: 72-px crops, 24-px patches (9x9 and 3x3 cells)."""
    cfg = preset("cpu-small")
    cfg = dataclasses.replace(
        cfg, sample=SampleConfig(short_side=80, crop=72, patch=24, motion_grid=6, motion_window=2),
        batch_size=2, workers=0, log_every=1, image_every=2, checkpoint_every=1000, epochs=50,
        keep_epoch_checkpoints=True)
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    write_videos(generate_set(SyntheticConfig(height=80, width=80, frames=24), 4, seed=3), folder)
    return folder


def history(out: Path) -> dict[int, dict]:
    ckpt = load_checkpoint(out / LAST)
    return {h["step"]: h for h in ckpt["progress"]["history"]}


# ----------------------------------------------------------------------------- sampling order


def test_epoch_sampler_partitions_shuffles_and_resumes():
    ranks = [EpochSampler(10, batch=2, epochs=2, seed=1, rank=r, world=3) for r in range(3)]
    assert all(s.steps_per_epoch == 2 for s in ranks)  # 10 padded to 12: 4 each, 2 batches of 2
    full = [EpochSampler(10, batch=1, epochs=1, seed=1, rank=r, world=3).order(0) for r in range(3)]
    assert set(sum(full, [])) == set(range(10))
    keys = list(ranks[0])
    assert [e for e, _ in keys] == [0] * 4 + [1] * 4 and len(ranks[0]) == 8
    assert ranks[0].order(0) != ranks[0].order(1) and ranks[0].order(0) == full[0]
    ranks[0].set_position(1, start=2)
    assert list(ranks[0]) == keys[6:] and len(ranks[0]) == 2


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_atomic_write(tmp_path, monkeypatch):
    cfg = tiny_config()
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters())
    path = tmp_path / LAST
    save_training_state(path, model, optimizer, cfg, Progress(step=7))
    payload = load_checkpoint(path)
    assert payload["progress"]["step"] == 7 and payload["config"] == to_dict(cfg)
    assert list(tmp_path.iterdir()) == [path]

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(path, model, optimizer, cfg, Progress(step=8))
    assert load_checkpoint(path)["progress"]["step"] == 7  # the previous one is whole


def test_wrong_checkpoint_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match=r"weights\.pt: not a timecycle training checkpoint"):
        load_checkpoint(bad)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.pt: not a readable"):
        load_checkpoint(tmp_path / "junk.pt")


def test_init_starts_a_new_run_from_another_checkpoints_weights(videos, tmp_path):
    """--init fine-tunes: the weights come from the file, the step count starts at 0, and a
    file whose encoder does not fit the config is refused with the reason."""
    from timecycle.train import _init_weights

    cfg = tiny_config()
    train(dataclasses.replace(cfg, max_steps=2), videos, tmp_path / "a", progress_bar=False)
    source = load_checkpoint(tmp_path / "a" / LAST)["model"]
    torch.manual_seed(123)
    model = build_model(cfg)
    assert not torch.equal(model.state_dict()["encoder.conv1.weight"], source["encoder.conv1.weight"])
    _init_weights(model, tmp_path / "a" / LAST)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items() if k != "rolls")

    run = train(dataclasses.replace(cfg, max_steps=1), videos, tmp_path / "b", init=tmp_path / "a" / LAST,
                progress_bar=False)
    assert run["steps"] == 1
    with pytest.raises(ValueError, match="either resume"):
        train(cfg, videos, tmp_path / "c", init=tmp_path / "a" / LAST, resume=tmp_path / "a" / LAST)

    import torchvision

    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"r50\.pth: its weights do not fit"):
        _init_weights(build_model(cfg), tmp_path / "r50.pth")


def test_resume_gives_the_same_next_step_as_an_uninterrupted_run(videos, tmp_path):
    """Step 4 falls in the second epoch (2 steps an epoch), so the resumed run must
    restore the weights, Adam's moments, the epoch and the position in its order."""
    cfg = tiny_config()
    straight = train(dataclasses.replace(cfg, max_steps=4), videos, tmp_path / "a", progress_bar=False)
    train(dataclasses.replace(cfg, max_steps=3), videos, tmp_path / "b", progress_bar=False)
    resumed = train(dataclasses.replace(cfg, max_steps=4), videos, tmp_path / "b", resume=tmp_path / "b" / LAST,
                    progress_bar=False)
    assert straight["steps"] == resumed["steps"] == 4
    a, b = history(tmp_path / "a"), history(tmp_path / "b")
    for k in ("total", "long", "skip", "sim"):
        assert b[3][k] == pytest.approx(a[3][k], abs=1e-6)
        assert b[4][k] == pytest.approx(a[4][k], abs=1e-6)
    final_a = load_checkpoint(tmp_path / "a" / LAST)["model"]
    final_b = load_checkpoint(tmp_path / "b" / LAST)["model"]
    assert all(torch.allclose(final_a[k].float(), final_b[k].float(), atol=1e-6) for k in final_a)
    assert (tmp_path / "a" / "checkpoint_epoch001.pt").is_file()


def test_freeze_encoder_steps_trains_only_the_tracker(videos, tmp_path):
    cfg = tiny_config(max_steps=2, freeze_encoder_steps=2)
    torch.manual_seed(cfg.seed)
    before = build_model(cfg).state_dict()
    train(cfg, videos, tmp_path, progress_bar=False)
    after = load_checkpoint(tmp_path / LAST)["model"]
    weights = [k for k in before if k.endswith("weight")]
    assert all(torch.equal(before[k], after[k]) for k in weights if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in weights if k.startswith("tracker."))


def test_a_broken_video_is_skipped_and_counted(videos, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in videos.iterdir():
        (data / p.name).symlink_to(p)
    (data / "broken.mp4").write_bytes(b"\x00" * 5000)
    summary = train(tiny_config(max_steps=2), data, tmp_path / "run", progress_bar=False)
    assert summary["steps"] == 2 and summary["unreadable_videos"] == 1 and summary["videos"] == 4
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["unreadable_videos"] == 1


def test_too_few_videos_for_a_batch_is_a_clear_error(videos, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        train(tiny_config(batch_size=8), videos, tmp_path, progress_bar=False)


def test_tensorboard_gets_losses_rate_and_cycle_figures(videos, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(max_steps=2), videos, tmp_path, progress_bar=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"loss/total", "loss/long", "loss/skip", "loss/sim", "lr", "clips_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2]
    assert [e.step for e in events.Images("cycle")] == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["name"] == "cpu-small"


# ----------------------------------------------------------------------------- configs


def test_presets_hold_the_release_values():
    r50 = PRESETS["timecycle-r50"]
    assert (r50.sample.crop, r50.sample.patch, r50.sample.clip_frames, r50.batch_size) == (240, 80, 4, 36)
    assert (r50.optim.lr, r50.optim.betas, r50.optim.grad_clip) == (2e-4, (0.5, 0.999), 10.0)
    assert (r50.model.encoder.arch, r50.model.encoder.dim) == ("resnet50", 512)
    assert (r50.model.loss.long_weight, r50.model.loss.sim_weight, r50.model.loss.skip_weight) == (0.02, 1.0, 0.1)
    assert PRESETS["cpu-small"].model.encoder.arch == "resnet18"


def test_yaml_config_overrides_a_preset_and_rejects_typos(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("preset: cpu-small\nbatch_size: 4\nsample:\n  fps: 8\n")
    cfg = load_train_config(good)
    assert (cfg.name, cfg.batch_size, cfg.sample.fps, cfg.sample.crop) == ("cpu-small", 4, 8, 96)
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: cpu-small\nsample:\n  fsp: 8\n")
    with pytest.raises(KeyError, match="unknown setting 'fsp'"):
        load_train_config(bad)
    for name in ("timecycle-r50", "crw-r18", "cpu-small"):
        assert load_train_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml") == preset(name)


# ----------------------------------------------------------------------------- pictures


def test_cycle_figure_draws_the_true_box_where_theta_cut_the_patch():
    clip, target = torch.zeros(4, 3, 72, 72), torch.zeros(3, 72, 72)
    theta = torch.tensor([[1 / 3, 0.0, 0.5], [0.0, 1 / 3, -0.5]])  # a patch in the top right
    figure = cycle_figure(clip, target, torch.zeros(8, 2, 3), theta, gap=4)
    assert figure.shape == (72, 5 * 72 + 4 * 4, 3)
    target_panel = figure[:, 4 * 76:]
    green = np.all(target_panel == TRUE_COLOUR, axis=-1)
    ys, xs = np.nonzero(green)
    (x0, y0), _, (x1, y1), _ = theta_corners(theta, 72, 72)
    assert (x0, y0, x1, y1) == pytest.approx((42, 6, 66, 30))
    assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1
    assert green.sum() > 80  # the outline of a 24-px box


# ----------------------------------------------------------------------------- several processes


@pytest.mark.parametrize("objective", ["timecycle", "crw"])
def test_two_process_gloo_run_through_torchrun_keeps_ranks_identical(videos, tmp_path, objective):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(f"preset: cpu-small\nobjective: {objective}\nbatch_size: 4\nworkers: 0\nmax_steps: 2\n"
                        "sample: {short_side: 80, crop: 72, patch: 24, motion_grid: 6, motion_window: 2}\n"
                        "crw: {short_side: 56, frame_size: 48, patch: 16, patch_stride: 16, dim: 32}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "--master_addr=127.0.0.1", "-m", "timecycle.cli", "train", "--config", str(cfg_file),
         "--data", str(videos), "--out", str(tmp_path / "run"), "--device", "cpu"],
        check=False, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and "total" in summary["losses"]
    assert summary["weights_identical_across_ranks"] is True


def test_a_time_budget_sets_the_progress_bars_total_at_the_pace_so_far():
    from timecycle.train import projected_steps

    assert projected_steps(Progress(step=0), minutes=1, total_steps=500) == 500  # no pace yet
    assert projected_steps(Progress(step=10, seconds=20.0), minutes=1, total_steps=500) == 30  # 40 s left, 2 s/step
    assert projected_steps(Progress(step=10, seconds=20.0), minutes=10, total_steps=100) == 100  # epochs end first
    assert projected_steps(Progress(step=31, seconds=61.0), minutes=1, total_steps=500) == 31  # out of time


# ----------------------------------------------------------------------------- it learns


@pytest.mark.timeout(1800)
def test_cpu_small_learns_on_synthetic_videos_and_beats_its_initialisation(learning_run, capsys):
    """cpu-small with the TimeCycle objective, 150 steps on synthetic videos (the first 50
    train the tracker alone): each loss term falls, and the features propagate held-out
    first-frame masks better than the same network at its initialisation, even once that
    network's BatchNorm statistics are re-estimated on the training videos (all J-Means
    printed). About three minutes on two free CPU cores."""
    steps = 150
    run = learning_run(dataclasses.replace(preset("cpu-small"), max_steps=steps, log_every=1), "timecycle")
    history = run["history"]
    assert len(history) == steps
    terms = ("total", "long", "skip", "sim")
    early, late = ({k: np.mean([h[k] for h in part]) for k in terms} for part in (history[:10], history[-10:]))
    with capsys.disabled():
        print(f"\ncpu-small, TimeCycle, {steps} steps: "
              + ", ".join(f"{k} {early[k]:.3f} -> {late[k]:.3f}" for k in terms)
              + f"; held-out J-Mean: init {run['init']:.3f}, init with recalibrated BatchNorm {run['init_bn']:.3f}, "
                f"trained {run['trained']:.3f} ({run['seconds']:.0f} s)")
    assert all(late[k] < early[k] for k in terms)
    assert run["trained"] > max(run["init"], run["init_bn"])
