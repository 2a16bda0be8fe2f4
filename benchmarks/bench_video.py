"""Random-window reads per second from video files and from frame folders, with 0, 1
and 2 data-loader workers: the figure that says whether decoding can feed training.

A window is what one TimeCycle sample reads: ``SampleConfig.span`` consecutive frames
at 12 fps with the short side resized to 256. Frame folders are made once, in a
temporary folder, by writing the mp4 files' frames out as JPEGs.

    python benchmarks/bench_video.py [--data ../shared/data/videos] [--reads 60]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from timecycle.config import SampleConfig
from timecycle.video import VideoInfo, open_video, probe


class RandomWindows(Dataset):
    def __init__(self, videos: list[VideoInfo], reads: int, cfg: SampleConfig):
        self.videos, self.reads, self.cfg = videos, reads, cfg

    def __len__(self) -> int:
        return self.reads

    def __getitem__(self, i: int) -> int:
        rng = np.random.default_rng(i)
        info = self.videos[i % len(self.videos)]
        with open_video(info, fps=self.cfg.fps, short_side=self.cfg.short_side) as video:
            span = min(self.cfg.span, len(video))
            start = int(rng.integers(0, len(video) - span + 1))
            return int(video.read_window(start, span).shape[0])


def frame_folders(videos: list[VideoInfo], root: Path, limit: int) -> list[VideoInfo]:
    out = []
    for info in videos:
        folder = root / Path(info.path).stem
        folder.mkdir()
        with open_video(info) as video:
            for k, frame in zip(range(limit), video):
                Image.fromarray(frame).save(folder / f"{k:05d}.jpg", quality=90)
        out.append(probe(folder, folder_fps=info.fps))
    return out


def rate(videos: list[VideoInfo], workers: int, reads: int, cfg: SampleConfig) -> float:
    loader = DataLoader(RandomWindows(videos, reads, cfg), batch_size=None, num_workers=workers,
                        shuffle=False, persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up is not part of the rate
    t0 = time.perf_counter()
    count = sum(1 for _ in it)
    return count / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/videos")
    parser.add_argument("--reads", type=int, default=60)
    parser.add_argument("--frames-per-folder", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = SampleConfig()
    mp4s = [probe(p) for p in sorted(args.data.rglob("*.mp4"))]
    print(f"{len(mp4s)} mp4 files under {args.data}; window = {cfg.span} frames at {cfg.fps:g} fps, "
          f"short side {cfg.short_side}; {args.reads} reads each")
    with tempfile.TemporaryDirectory() as tmp:
        folders = frame_folders(mp4s, Path(tmp), args.frames_per_folder)
        print(f"{'input':<14}{'workers':>8}{'windows/s':>12}{'frames/s':>11}")
        for name, videos in (("mp4 files", mp4s), ("frame folders", folders)):
            for workers in (0, 1, 2):
                r = rate(videos, workers, args.reads, cfg)
                print(f"{name:<14}{workers:>8}{r:>12.1f}{r * cfg.span:>11.0f}")


if __name__ == "__main__":
    main()
