"""Training speed per preset and objective: clips/s, peak memory, and the share of a
step spent in the encoder versus the rest (tracker and cycle losses, or walk head and walks).

The encoder must dominate (the tracker and losses under a quarter of a step for
timecycle-r50): the method's cost should be the features it learns, not the cycles.
``--objectives timecycle crw`` runs every preset under both objectives, which compares
them at the same encoder and resolution (cpu-small: ResNet-18, 96-px frames; TimeCycle
encodes 4 clip frames, the target and its 32-px patch, CRW 4 frames of 25 32-px patches).
Inputs are random tensors of the preset's sizes, so decoding is left out (see
bench_video.py for that). Each run is its own process so peak memory is its own (on CPU
the process's peak resident memory, on GPU the peak allocated by torch).

    python benchmarks/bench_train.py [--presets cpu-small timecycle-r50] [--objectives timecycle crw]
                                     [--batch-size 8] [--steps 5]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import torch

from timecycle.config import preset
from timecycle.model.crw import cut_patches
from timecycle.model.encoder import normalize_frames
from timecycle.train import build_model, optim_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, objective: str | None, batch: int, steps: int, device: str) -> dict:
    cfg = preset(name)
    cfg = dataclasses.replace(cfg, objective=objective or cfg.objective)
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    model = build_model(cfg).to(dev)
    if gpu and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = optim_config(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, betas=opt.betas)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu and cfg.amp)
    if cfg.objective == "crw":
        c = cfg.crw
        clip = normalize_frames(torch.rand(batch, c.clip_len, 3, c.frame_size, c.frame_size, device=dev), c.mean,
                                c.std)
        inputs = (clip, model.grid_theta.expand(batch, c.clip_len, *model.grid_theta.shape))  # jitter costs the same
        size = f"{c.frame_size}px x{c.clip_len}, {c.grid**2} nodes of {c.patch}px"

        def encoded() -> torch.Tensor:
            return model.encoder(cut_patches(clip.flatten(0, 1), inputs[1].flatten(0, 1), c.patch)).float().sum()
    else:
        s, p, t = cfg.sample.crop, cfg.sample.patch, cfg.sample.clip_frames
        clip = normalize_frames(torch.rand(batch, t, 3, s, s, device=dev))
        target = normalize_frames(torch.rand(batch, 3, s, s, device=dev))
        patch = normalize_frames(torch.rand(batch, 3, p, p, device=dev))
        theta = torch.tensor([[1 / 3, 0, 0.1], [0, 1 / 3, -0.1]], device=dev).expand(batch, 2, 3)
        inputs = (clip, target, patch, theta)
        size = f"{s}px x{t}+1, patch {p}px"

        def encoded() -> torch.Tensor:
            frames = torch.cat([clip, target[:, None]], 1).flatten(0, 1)
            return model.encoder(frames).float().sum() + model.encoder(patch).float().sum()

    def full_step() -> None:
        with autocast:
            losses = model(*inputs)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if opt.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()

    def encoder_step() -> None:
        """The encoder's share: the same forward and backward passes through it alone."""
        with autocast:
            out = encoded()
        optimizer.zero_grad(set_to_none=True)
        out.backward()

    def timed(fn) -> float:
        fn()  # warm-up: allocation, cuDNN autotuning
        _sync(dev)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(dev)
        return (time.perf_counter() - start) / steps

    if gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    step = timed(full_step)
    peak = (torch.cuda.max_memory_allocated(dev) if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    encoder = timed(encoder_step)
    return {"preset": name, "objective": cfg.objective, "encoder": cfg.model.encoder.arch, "input": size,
            "device": torch.cuda.get_device_name(dev) if gpu else f"cpu x{torch.get_num_threads()}",
            "batch": batch, "step_s": step, "clips_per_s": batch / step, "peak_gib": peak / 2**30,
            "encoder_share": min(1.0, encoder / step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu-small", "timecycle-r50"])
    parser.add_argument("--objectives", nargs="+", choices=["timecycle", "crw"], default=None,
                        help="run every preset under each of these objectives (default: each preset's own)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: each preset's own")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one preset in this process
    parser.add_argument("--objective", help=argparse.SUPPRESS)  # internal: under this objective
    args = parser.parse_args()
    if args.one:
        batch = args.batch_size or preset(args.one).batch_size
        print(json.dumps(measure(args.one, args.objective, batch, args.steps, args.device)))
        return
    print(f"{'preset':<15}{'objective':<11}{'encoder':<10}{'input':<32}{'device':<26}{'batch':>6}{'s/step':>9}"
          f"{'clips/s':>9}{'peak GiB':>10}{'encoder':>9}{'rest':>7}")
    for name in args.presets:
        for objective in args.objectives or [None]:
            cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--device", args.device]
            if objective:
                cmd += ["--objective", objective]
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"{r['preset']:<15}{r['objective']:<11}{r['encoder']:<10}{r['input']:<32}{r['device']:<26}"
                  f"{r['batch']:>6}{r['step_s']:>9.3f}{r['clips_per_s']:>9.1f}{r['peak_gib']:>10.2f}"
                  f"{r['encoder_share']:>9.0%}{1 - r['encoder_share']:>7.0%}")


if __name__ == "__main__":
    main()
