"""Seconds to score a DAVIS-2017-val-sized result set: 30 sequences, 1999 frames of
854x480, 61 objects, as the official toolkit scores it (J and F per object and frame).

Ground truth and predictions are synthetic: wobbly ellipses that move, predicted with
an offset of a few pixels and a ragged edge, so that boundaries are about as long as
DAVIS objects' and the match search does real work. Two figures: the metrics on
masks already in memory, and the whole scoring from PNG files (reading and checking
both sides too), as ``timecycle evaluate davis --results-dir`` does it.

    python benchmarks/bench_metrics.py [--frames 1999] [--objects 61] [--sequences 30] [--no-files]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from timecycle.data.datasets import davis_sequences, save_indexed_png
from timecycle.evaluate.davis import davis_tables, score_labels, score_sequence

HEIGHT, WIDTH = 480, 854


def split(total: int, parts: int, low: int, rng: np.random.Generator) -> list[int]:
    """``parts`` random counts of at least ``low`` that sum to ``total``."""
    counts = low + rng.multinomial(total - low * parts, np.ones(parts) / parts)
    return counts.tolist()


def sequence(frames: int, objects: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and prediction (T, H, W) uint8 of ``objects`` moving blobs."""
    gt = np.zeros((frames, HEIGHT, WIDTH), np.uint8)
    pred = np.zeros_like(gt)
    for k in range(1, objects + 1):
        start = rng.uniform([120, 100], [WIDTH - 120, HEIGHT - 100])
        velocity = rng.uniform(-2, 2, 2)
        axes = rng.uniform([30, 30], [140, 110])
        phase, lobes = rng.uniform(0, 2 * np.pi), rng.integers(3, 7)
        error = rng.uniform(-6, 6, 2)  # the prediction's offset, pixels
        for t in range(frames):
            cx, cy = start + velocity * t
            # Only the blob's bounding box is drawn: 1.25 axes hold the widest lobe.
            x0, x1 = (np.clip([cx - 1.25 * axes[0] - 8, cx + 1.25 * axes[0] + 8], 0, WIDTH)).astype(int)
            y0, y1 = (np.clip([cy - 1.25 * axes[1] - 8, cy + 1.25 * axes[1] + 8], 0, HEIGHT)).astype(int)
            ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            for out, (dx, dy), ragged in ((gt, (0, 0), 0.0), (pred, error, 0.08)):
                u, v = (xs - cx - dx) / axes[0], (ys - cy - dy) / axes[1]
                angle = np.arctan2(v, u)
                edge = 1 + 0.15 * np.sin(lobes * angle + phase + 0.05 * t) + ragged * np.sin(23 * angle)
                out[t, y0:y1, x0:x1][u * u + v * v < edge * edge] = k
    gt[:, :8, :] = 255  # a strip of void, as the toolkit must leave it out
    return gt, pred


def write_davis_layout(root: Path, name: str, gt: np.ndarray, pred: np.ndarray) -> None:
    for kind, folder in (("JPEGImages", root / "JPEGImages" / "480p" / name),
                         ("Annotations", root / "Annotations" / "480p" / name),
                         ("results", root / "results" / name)):
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(len(gt)):
            if kind == "JPEGImages":
                if t == 0:
                    Image.new("RGB", (WIDTH, HEIGHT)).save(folder / "00000.jpg")
                else:
                    (folder / f"{t:05d}.jpg").hardlink_to(folder / "00000.jpg")  # only headers are read
            else:
                save_indexed_png(folder / f"{t:05d}.png", (gt if kind == "Annotations" else pred)[t])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1999)
    parser.add_argument("--objects", type=int, default=61)
    parser.add_argument("--sequences", type=int, default=30)
    parser.add_argument("--no-files", action="store_true", help="time the in-memory metrics only")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    lengths = split(args.frames, args.sequences, 25, rng)
    objects = split(args.objects, args.sequences, 1, rng)
    metric_seconds, scored_frames = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (frames, k) in enumerate(zip(lengths, objects)):
            gt, pred = sequence(frames, k, rng)
            t0 = time.perf_counter()
            score_labels(gt[1:-1], pred[1:-1], k)  # the toolkit scores all frames but the first and last
            metric_seconds += time.perf_counter() - t0
            scored_frames += frames - 2
            if not args.no_files:
                write_davis_layout(root, f"seq{i:02d}", gt, pred)
        print(f"{args.sequences} sequences, {args.frames} frames of {WIDTH}x{HEIGHT}, {args.objects} objects "
              f"({scored_frames} frames scored)")
        print(f"metrics in memory: {metric_seconds:.1f} s ({1000 * metric_seconds / scored_frames:.1f} ms per frame)")
        if args.no_files:
            return
        (root / "ImageSets" / "2017").mkdir(parents=True)
        (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"seq{i:02d}\n" for i in range(args.sequences)))
        t0 = time.perf_counter()
        sequences = davis_sequences(root, "2017", "val")
        row, _ = davis_tables([score_sequence(seq, root / "results") for seq in sequences])
        seconds = time.perf_counter() - t0
        print(f"scoring from PNG files: {seconds:.1f} s ({1000 * seconds / scored_frames:.1f} ms per frame); "
              f"J&F {row[0]:.3f}")


if __name__ == "__main__":
    main()
