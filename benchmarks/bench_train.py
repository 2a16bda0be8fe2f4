"""Training speed per preset: clips/s, peak memory, and the share of a step spent in
the encoder versus the tracker and losses.

The encoder must dominate (the tracker and losses under a quarter of a step for
timecycle-r50): the method's cost should be the features it learns, not the cycles.
Inputs are random tensors of the preset's sizes, so decoding is left out (see
bench_video.py for that). Each preset runs in its own process so peak memory is its own.

    python benchmarks/bench_train.py [--presets cpu-small timecycle-r50] [--batch-size 8] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from timecycle.config import preset
from timecycle.model.cycle import TimeCycle
from timecycle.model.encoder import normalize_frames


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batch: int, steps: int, device: str) -> dict:
    cfg = preset(name)
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    model = TimeCycle(cfg.model, frame_size=cfg.sample.crop, patch_size=cfg.sample.patch).to(dev)
    if gpu and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    s, p, t = cfg.sample.crop, cfg.sample.patch, cfg.sample.clip_frames
    clip = normalize_frames(torch.rand(batch, t, 3, s, s, device=dev))
    target = normalize_frames(torch.rand(batch, 3, s, s, device=dev))
    patch = normalize_frames(torch.rand(batch, 3, p, p, device=dev))
    theta = torch.tensor([[1 / 3, 0, 0.1], [0, 1 / 3, -0.1]], device=dev).expand(batch, 2, 3)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu and cfg.amp)

    def full_step() -> None:
        with autocast:
            losses = model(clip, target, patch, theta)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()

    def encoder_step() -> None:
        """The encoder's share: the same forward and backward passes through it alone."""
        with autocast:
            frames = torch.cat([clip, target[:, None]], 1).flatten(0, 1)
            out = model.encoder(frames).float().sum() + model.encoder(patch).float().sum()
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
    return {"preset": name, "device": torch.cuda.get_device_name(dev) if gpu else f"cpu x{torch.get_num_threads()}",
            "batch": batch, "step_s": step, "clips_per_s": batch / step, "peak_gib": peak / 2**30,
            "encoder_share": min(1.0, encoder / step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu-small", "timecycle-r50"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: each preset's own")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one preset in this process
    args = parser.parse_args()
    if args.one:
        batch = args.batch_size or preset(args.one).batch_size
        print(json.dumps(measure(args.one, batch, args.steps, args.device)))
        return
    print(f"{'preset':<15}{'device':<26}{'batch':>6}{'s/step':>9}{'clips/s':>9}{'peak GiB':>10}"
          f"{'encoder':>9}{'tracker+losses':>16}")
    for name in args.presets:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--device", args.device]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{r['preset']:<15}{r['device']:<26}{r['batch']:>6}{r['step_s']:>9.3f}{r['clips_per_s']:>9.1f}"
              f"{r['peak_gib']:>10.2f}{r['encoder_share']:>9.0%}{1 - r['encoder_share']:>16.0%}")


if __name__ == "__main__":
    main()
