"""Label propagation speed and memory on DAVIS frames: frames/s split into decoding,
feature extraction and propagation, and peak memory, for a short and a long video, with
random-init ResNet-18 and ResNet-50 encoders or any models :func:`timecycle.load_model`
reads (``--models``); and the dense reference (the full affinity of a frame against its
whole context, as the CRW release computes it) for comparison.

Each measurement runs in a fresh subprocess, so peak memory (ru_maxrss) is its own.
The target: propagation costs less than feature extraction, in memory that does not
grow with the video. On the CPU the CRW, DINO and VFS presets shortlist keys in
bfloat16 (see timecycle.propagate): the shortlist gives the exact results, but its time
depends on the features (how closely the best scores are packed), so measure trained
weights too where you have them; on a GPU every key is scored in float32, a frame's
tiles in batches. The machine's load average is printed with
each row: on a shared machine, compare extraction and propagation measured under the
same load (and threads).

    python benchmarks/bench_propagate.py [--data ../shared/data/davis-sample] [--threads 2]
        [--device cpu] [--models random-resnet18 random-resnet50 run/last.pt] [--preset crw] [--frames 30]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from timecycle import load_model
from timecycle.propagate import PropagationConfig, preset, propagate, resolve_config
from timecycle.video import open_video

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis-sample"


def davis_mask(path: Path) -> np.ndarray:
    """A DAVIS annotation as object ids: palette PNGs hold them, 2016's grey PNGs hold 0/255."""
    with Image.open(path) as im:
        values = np.asarray(im)
    if im.mode == "P":
        return values.astype(np.uint8)
    ids = np.unique(values[values > 0])
    return np.searchsorted(np.concatenate([[0], ids]), values).astype(np.uint8)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TimedModel:
    """A propagation model that adds up the seconds spent in it."""

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        self.model, self.device, self.seconds = model, device, 0.0
        self.arch = model.arch

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(frames)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


def measure_propagation(seq: Path, annotations: Path, model_name: str, preset_name: str, device: str,
                        frames: int | None) -> dict:
    """One video streamed through :func:`propagate`. Decoding is timed in a pass of its
    own and subtracted; J is the mean IoU against the annotations over frames 1..T-2.
    The random baselines are the same network in every run, so J compares across versions."""
    model = TimedModel(load_model(model_name, device), device)
    with open_video(seq) as video:
        count = len(video) if frames is None else min(frames, len(video))
        start = time.perf_counter()
        for _ in zip(range(count), video):
            pass
        decode = time.perf_counter() - start

        first = davis_mask(annotations / "00000.png")
        ious, scoring = [], 0.0
        start = time.perf_counter()
        out = propagate(video, first, model, preset_name, device=device, progress=False)
        for t, mask in zip(range(count), out):
            if 0 < t < count - 1:
                scored = time.perf_counter()
                truth = davis_mask(annotations / f"{t:05d}.png")
                for k in np.unique(first)[1:]:
                    union = ((mask == k) | (truth == k)).sum()
                    ious.append(((mask == k) & (truth == k)).sum() / union if union else 1.0)
                scoring += time.perf_counter() - scored
        sync(device)
        total = time.perf_counter() - start - scoring
    return {
        "frames": count,
        "decode_s_per_frame": decode / count,
        "extract_s_per_frame": model.seconds / count,
        "propagate_s_per_frame": (total - model.seconds - decode) / count,
        "fps": count / total,
        "J": float(np.mean(ious)) if ious else math.nan,
    }


def measure_dense_reference(seq: Path, model_name: str, preset_name: str, device: str, frames: int) -> dict:
    """The dense reference of tests/test_propagate.py over the first ``frames`` frames."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_propagate import dense_reference

    encoder = load_model(model_name, device)
    cfg: PropagationConfig = preset(preset_name, encoder.arch)
    torch.manual_seed(0)
    with open_video(seq) as video, torch.no_grad():
        x = torch.from_numpy(video.read(range(frames))).to(device).permute(0, 3, 1, 2).float() / 255
        feats = torch.nn.functional.normalize(torch.cat([encoder(x[i:i + 4]) for i in range(0, frames, 4)]), dim=1)
    first = torch.rand(2, *feats.shape[2:], device=device)
    start = time.perf_counter()
    dense_reference(feats.cpu(), first.cpu(), cfg)
    return {"frames": frames, "context_reached": frames - 1,
            "dense_s_per_frame": (time.perf_counter() - start) / (frames - 1)}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seq = args.data / "JPEGImages" / "480p" / args.seq
    if args.dense:
        result = measure_dense_reference(seq, args.models[0], args.preset, args.device, args.frames)
    else:
        annotations = args.data / "Annotations" / "480p" / args.seq
        result = measure_propagation(seq, annotations, args.models[0], args.preset, args.device, args.frames)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    result["rss_growth_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2 ** 20
    if args.device.startswith("cuda"):
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(json.dumps(result))


def run_child(args: argparse.Namespace, **changes) -> dict:
    argv = [sys.executable, __file__, "--child", "--data", str(args.data), "--threads", str(args.threads),
            "--device", args.device, "--preset", args.preset]
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["random-resnet18", "random-resnet50"],
                        help="baseline names or checkpoint files, as timecycle.load_model takes them")
    parser.add_argument("--preset", default="crw")
    parser.add_argument("--short", default="car-shadow", help="the short video")
    parser.add_argument("--long", default="dance-twirl", help="the long video")
    parser.add_argument("--frames", type=int, default=None, help="at most this many frames of each video")
    parser.add_argument("--dense-frames", type=int, default=3, help="frames for the dense reference (0: skip)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seq", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    cfg = resolve_config(args.preset)
    print(f"preset {args.preset}: {cfg}")
    print(f"device {args.device}, {args.threads} threads; the encoders' own features (no projection head)")
    name = max(18, 2 + max(map(len, args.models)))  # the model column's width: checkpoint paths can be long
    print(f"{'model':<{name}}{'video':<13}{'frames':>7}{'decode s/f':>12}{'extract s/f':>13}{'propagate s/f':>15}"
          f"{'prop/extr':>11}{'fps':>7}{'peak RSS GiB':>14}{'J':>7}{'load':>7}")
    for model in args.models:
        for seq in (args.short, args.long):
            load = os.getloadavg()[0]
            r = run_child(args, models=[model], seq=seq, frames=args.frames)
            print(f"{model:<{name}}{seq:<13}{r['frames']:>7}{r['decode_s_per_frame']:>12.3f}{r['extract_s_per_frame']:>13.3f}"
                  f"{r['propagate_s_per_frame']:>15.3f}{r['propagate_s_per_frame'] / r['extract_s_per_frame']:>11.2f}"
                  f"{r['fps']:>7.2f}{r['peak_rss_gib']:>14.2f}{r['J']:>7.3f}{load:>7.2f}"
                  + (f"   GPU peak {r['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in r else ""), flush=True)
        if args.dense_frames:
            load = os.getloadavg()[0]
            d = run_child(args, models=[model], seq=args.short, frames=args.dense_frames, dense=True)
            print(f"{model:<{name}}{'dense ref.':<13}{d['frames']:>7}{'':>25}{d['dense_s_per_frame']:>15.3f}{'':>18}"
                  f"{d['peak_rss_gib']:>14.2f}{'':>7}{load:>7.2f}   (float64, context of {d['context_reached']} "
                  f"frames at most; its memory grows with the context)", flush=True)


if __name__ == "__main__":
    main()
