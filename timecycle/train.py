"""Self-supervised training: one loop from a laptop CPU to many GPUs.

One loop for both objectives (``TrainConfig.objective``): TimeCycle's cycles of a
tracked patch (:mod:`timecycle.model.cycle`) and the contrastive random walk
(:mod:`timecycle.model.crw`). Each has its sampler and its model, which returns a dict
of scalar losses with 'total'; everything else (distribution, checkpoints, resuming,
logging) is shared.

Run as ``timecycle train`` for one process, or under ``torchrun`` for several
(DistributedDataParallel: nccl on GPU, gloo on CPU). Rank 0 alone logs and writes
checkpoints. A checkpoint holds everything needed to continue as if never stopped:
the model, the optimiser, the step, the position in the epoch's sample order and the
random states; it is written to a temporary file and renamed, so a crash mid-write
leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from timecycle.config import OptimConfig, TrainConfig, to_dict
from timecycle.data.clips import CRWClipDataset
from timecycle.data.sampling import KeyedVideoDataset, TimeCycleDataset
from timecycle.model.checkpoints import (
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from timecycle.model.crw import CRW
from timecycle.model.cycle import TimeCycle
from timecycle.model.encoder import normalize_frames
from timecycle.video import VideoIndex

log = logging.getLogger(__name__)

LAST = "checkpoint_last.pt"
OBJECTIVES = ("timecycle", "crw")


class EpochSampler(Sampler[tuple[int, int]]):
    """This process's share of a seeded shuffle of the dataset, epoch after epoch, as
    ``(epoch, index)`` keys, from any position.

    The order of epoch e depends only on (seed, e), so a resumed run can skip the
    samples already seen without loading them, and every process agrees on the order;
    each process takes every world-th index, the list padded to a multiple of world
    by wrapping around, as DistributedSampler does. Each epoch's share is cut to
    whole batches, so one data loader (and its workers) serves the whole run and no
    batch straddles two epochs.
    """

    def __init__(self, size: int, batch: int, epochs: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.size, self.batch, self.epochs = size, batch, epochs
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.start = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.size / self.world) // self.batch

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Begin at this process's ``start``-th sample of ``epoch``."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        total = math.ceil(self.size / self.world) * self.world
        padded = (perm.tolist() * math.ceil(total / self.size))[:total]
        return padded[self.rank::self.world][: self.steps_per_epoch * self.batch]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in range(self.epoch, self.epochs):
            skip = self.start if epoch == self.epoch else 0
            yield from ((epoch, i) for i in self.order(epoch)[skip:])

    def __len__(self) -> int:
        return (self.epochs - self.epoch) * self.steps_per_epoch * self.batch - self.start


@dataclass
class Progress:
    """Where a run stands: what a checkpoint must restore beyond the weights."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0
    epoch_step: int = 0  # steps taken within ``epoch``
    skipped_videos: int = 0  # broken videos passed over while training
    seconds: float = 0.0  # training time so far, for the ``minutes`` budget
    history: list[dict] = field(default_factory=list)  # logged losses, for curves without TensorBoard


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def _rng_state() -> dict:
    """Random states as tensors and plain values, so checkpoints load with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, model: TimeCycle | CRW, optimizer: torch.optim.Optimizer,
                        cfg: TrainConfig, progress: Progress) -> None:
    save_checkpoint(path, {
        "config": to_dict(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "progress": vars(progress),
        "rng": _rng_state(),
    })


def _check_objective(cfg: TrainConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; known: {', '.join(OBJECTIVES)}")


def build_model(cfg: TrainConfig) -> TimeCycle | CRW:
    """The model that ``cfg.objective`` trains: encoder and tracker, or encoder and walk head."""
    _check_objective(cfg)
    if cfg.objective == "crw":
        return CRW(cfg.crw, cfg.model.encoder)
    return TimeCycle(cfg.model, frame_size=cfg.sample.crop, patch_size=cfg.sample.patch)


def optim_config(cfg: TrainConfig) -> OptimConfig:
    """The optimiser settings of the objective being trained (each has its own)."""
    _check_objective(cfg)
    return cfg.crw.optim if cfg.objective == "crw" else cfg.optim


def build_dataset(cfg: TrainConfig, videos) -> KeyedVideoDataset:
    """The sampler that ``cfg.objective`` trains on: TimeCycle's samples or CRW's clips."""
    _check_objective(cfg)
    if cfg.objective == "crw":
        return CRWClipDataset(videos, cfg.crw, seed=cfg.seed)
    return TimeCycleDataset(videos, cfg.sample, seed=cfg.seed)


def model_inputs(cfg: TrainConfig, batch: dict, dev: torch.device, channels_last: bool = False) -> tuple:
    """The model's arguments from a collated batch, on ``dev``, frames normalised with the
    statistics the objective trains with (ImageNet's for TimeCycle, CIFAR's for CRW)."""
    if cfg.objective == "crw":
        clip = normalize_frames(batch["clip"].to(dev, non_blocking=True), cfg.crw.mean, cfg.crw.std)
        return clip, batch["patch_theta"].to(dev, non_blocking=True)
    clip, target, patch = (normalize_frames(batch[k].to(dev, non_blocking=True)) for k in ("clip", "target", "patch"))
    if channels_last:
        target, patch = (x.contiguous(memory_format=torch.channels_last) for x in (target, patch))
    return clip, target, patch, batch["theta"].to(dev, non_blocking=True)


def scalars(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The scalar entries of a model's output (losses, accuracies), as floats for logging."""
    return {k: float(v.detach()) for k, v in losses.items() if v.dim() == 0}


def _tag(name: str) -> str:
    """TensorBoard tag of a logged value: accuracies apart from losses."""
    return f"accuracy/{name}" if name.startswith("acc") else f"loss/{name}"


def _index(data: str | Path, rank: int, world: int) -> VideoIndex:
    """Rank 0 probes; the others then read its cache instead of probing the same files."""
    if world > 1 and rank != 0:
        dist.barrier()
    index = VideoIndex.scan(data, progress=rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    return index


def _init_weights(model: TimeCycle | CRW, path: str | Path) -> None:
    """The file's encoder, and whatever else of the model it holds (a tracker, a walk head);
    the rest keeps its initialisation. Files of either objective and of every format that
    :func:`~timecycle.model.checkpoints.read_checkpoint` reads fit, if their encoder is the config's."""
    source = read_checkpoint(path)[1]["model"]
    own = model.state_dict()
    misfit = [k for k, v in source.items() if k in own and own[k].shape != v.shape]
    # BatchNorm's batch counters: absent from files older than them (the TimeCycle release).
    missing = [k for k in own if k.startswith("encoder.") and k not in source
               and not k.endswith("num_batches_tracked")]
    if misfit or missing:
        raise ValueError(f"{path}: its weights do not fit the model this config builds "
                         f"(shape differs: {misfit[:3]}, missing: {missing[:3]}); "
                         "pick a config with the checkpoint's encoder")
    model.load_state_dict({k: v for k, v in source.items() if k in own}, strict=False)
    fresh = sorted({k.split(".")[0] for k in own if k not in source and not k.startswith("encoder.")} - {"rolls"})
    log.info("starting from the weights of %s%s", path, f" ({', '.join(fresh)} at initialisation)" if fresh else "")


def train(cfg: TrainConfig, data: str | Path, out: str | Path, resume: str | Path | None = None,
          device: str | None = None, progress_bar: bool = True, init: str | Path | None = None) -> dict:
    """Train on every video under ``data``; write checkpoints and logs to ``out``.

    ``resume`` continues one of our training checkpoints exactly (optimiser, step,
    sampler position, random states). ``init`` starts a new run (step 0, fresh optimiser)
    from the weights of any checkpoint :func:`~timecycle.model.checkpoints.read_checkpoint`
    reads: ours of either objective, the TimeCycle release, CRW's or torchvision's (what
    the file lacks, a tracker or a walk head, starts from its initialisation), to
    fine-tune what others trained.

    Returns a summary (steps, last losses, skipped videos, ...), also written to
    ``out/summary.json`` by rank 0.
    """
    from tqdm import tqdm

    rank, world, local_rank = _distributed()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # plain "cuda": this process's GPU, which DDP needs by index
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over {world} processes")
    per_rank = cfg.batch_size // world
    out = Path(out)
    torch.manual_seed(cfg.seed)

    index = _index(data, rank, world)
    dataset = build_dataset(cfg, index)
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"{data}: {len(dataset)} usable videos, fewer than one batch of {cfg.batch_size}; "
                         "lower batch_size or add videos")
    sampler = EpochSampler(len(dataset), per_rank, cfg.epochs, cfg.seed, rank, world)
    steps_per_epoch = sampler.steps_per_epoch

    model = build_model(cfg).to(dev)
    gpu = dev.type == "cuda"
    if gpu and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = optim_config(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
    progress = Progress()
    if init is not None and resume is not None:
        raise ValueError("give either resume (continue a run) or init (start from weights), not both")
    if init is not None:
        _init_weights(model, init)
    if resume is not None:
        ckpt = load_checkpoint(resume, map_location=dev)
        if ckpt["config"] != to_dict(cfg):
            log.warning("resuming %s with a config that differs from the checkpoint's", resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        progress = Progress(**ckpt["progress"])
        _set_rng_state(ckpt["rng"])
        log.info("resumed from %s at step %d (epoch %d, step %d of it)", resume, progress.step,
                 progress.epoch, progress.epoch_step)
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if gpu else None) if world > 1 else model

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=progress.step or None)
        log.info("%s; %d usable, %d too short; %d steps per epoch of %d clips", index.summary(), len(dataset),
                 dataset.too_short, steps_per_epoch, cfg.batch_size)

    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    bar = tqdm(total=total_steps, initial=progress.step, desc=cfg.name, unit="step",
               disable=rank != 0 or not progress_bar, dynamic_ncols=True)
    encoder_params = list(model.encoder.parameters())
    # TimeCycle's remedy for a stalled start, a localiser that learns alone first; CRW has no tracker.
    frozen_steps = cfg.freeze_encoder_steps if cfg.objective == "timecycle" else 0
    last: dict[str, float] = {}
    window_clips, window_start = 0, time.perf_counter()

    sampler.set_position(progress.epoch, start=progress.epoch_step * per_rank)
    # The loader's own generator: its workers' base seed would otherwise be drawn from the
    # global torch state when iteration starts, which a resumed run restores first, so
    # that the model's random draws (CRW's edge dropout) would run one draw apart.
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers, drop_last=True,
                        pin_memory=gpu, persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    for batch in loader:
        if progress.step >= total_steps:
            break
        step_start = time.perf_counter()
        inputs = model_inputs(cfg, batch, dev, channels_last=gpu and cfg.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu and cfg.amp):
            losses = ddp(*inputs)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if progress.step < frozen_steps:
            for p in encoder_params:
                p.grad = None  # Adam leaves parameters without gradients untouched
        if opt.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()

        progress.step += 1
        progress.epoch_step += 1
        skipped = batch["skipped"].sum().to(dev)
        if world > 1:
            dist.all_reduce(skipped)
        progress.skipped_videos += int(skipped)
        progress.seconds += time.perf_counter() - step_start
        window_clips += cfg.batch_size
        last = scalars(losses)
        if cfg.minutes is not None:
            bar.total = projected_steps(progress, cfg.minutes, total_steps)
        bar.update(1)

        if rank == 0 and (progress.step % cfg.log_every == 0 or progress.step == 1):
            rate = window_clips / (time.perf_counter() - window_start)
            window_clips, window_start = 0, time.perf_counter()
            shown = {k: f"{v:.3f}" for k, v in last.items() if not k[-1].isdigit()}  # not CRW's per walk
            bar.set_postfix({**shown, "clips/s": f"{rate:.1f}"})
            progress.history.append({"step": progress.step, **last, "clips_per_s": rate})
            for k, v in last.items():
                writer.add_scalar(_tag(k), v, progress.step)
            writer.add_scalar("lr", optimizer.param_groups[0]["lr"], progress.step)
            writer.add_scalar("clips_per_s", rate, progress.step)
        if rank == 0 and (progress.step % cfg.image_every == 0 or progress.step == 1):
            # A loss curve cannot tell features that follow the content from a shortcut; the picture can.
            from timecycle.viz import cycle_figure, model_walk_figure

            if "cycle_thetas" in losses:
                figure = cycle_figure(batch["clip"][0], batch["target"][0],
                                      losses["cycle_thetas"][0].float().cpu(), batch["theta"][0])
            else:  # CRW: the first clip's walk from its centre node, on the unjittered grid
                figure = model_walk_figure(model, batch["clip"][0], start=len(model.grid_theta) // 2)
            writer.add_image("cycle", figure, progress.step, dataformats="HWC")

        end_of_epoch = progress.epoch_step == steps_per_epoch
        if end_of_epoch:
            progress.epoch, progress.epoch_step = progress.epoch + 1, 0
        out_of_time = cfg.minutes is not None and progress.seconds >= cfg.minutes * 60
        stop = progress.step >= total_steps or out_of_time
        if rank == 0 and (end_of_epoch or stop or progress.step % cfg.checkpoint_every == 0):
            save_training_state(out / LAST, model, optimizer, cfg, progress)
            if end_of_epoch and cfg.keep_epoch_checkpoints:
                save_training_state(out / f"checkpoint_epoch{progress.epoch:03d}.pt", model, optimizer, cfg,
                                    progress)
        if stop:
            bar.total = progress.step  # a run stopped by the clock ends its bar full
            break
    bar.close()

    summary = {
        "steps": progress.step, "epochs": progress.epoch, "losses": last,
        "videos": len(index), "unreadable_videos": len(index.failures), "too_short_videos": dataset.too_short,
        "skipped_while_training": progress.skipped_videos, "seconds": round(progress.seconds, 1),
        "world_size": world, "weights_identical_across_ranks": _weights_agree(model) if world > 1 else True,
        "checkpoint": str(out / LAST),
    }
    if rank == 0:
        writer.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("trained %d steps; %d unreadable videos skipped at indexing, %d while training; checkpoint %s",
                 progress.step, len(index.failures), progress.skipped_videos, out / LAST)
    if world > 1:
        dist.destroy_process_group()
    return summary


def projected_steps(progress: Progress, minutes: float, total_steps: int) -> int:
    """The step at which a run with a time budget will stop, at its pace so far: the
    progress bar's total, so that its ETA is the budget's end and not the epochs'."""
    if progress.step == 0 or progress.seconds <= 0:
        return total_steps
    left = max(minutes * 60 - progress.seconds, 0.0) * progress.step / progress.seconds
    return min(total_steps, progress.step + math.ceil(left))


def _weights_agree(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same weights: the check that DDP kept them in step.

    Parameters only: BatchNorm's running statistics are buffers that each rank updates
    from its own batch after DDP broadcast rank 0's at the start of the step."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
