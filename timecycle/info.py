"""What ``timecycle info`` reports: the software, the hardware, and what a video costs to read.

Decode speed is printed because it, not the model, often bounds training on CPU
machines: a user choosing data-loader workers needs the figure for their own files.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from timecycle.video import VideoIndex, open_video, probe


def describe_environment() -> str:
    import av
    import torch
    import torchvision

    from timecycle import __version__

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device = f"cuda ({len(names)}: {', '.join(names)})"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu"
    lines = [
        f"timecycle   {__version__}",
        f"python      {platform.python_version()} ({platform.system()} {platform.machine()})",
        f"torch       {torch.__version__}",
        f"torchvision {torchvision.__version__}",
        f"av (PyAV)   {av.__version__} (FFmpeg {_ffmpeg_version()})",
        f"numpy       {np.__version__}",
        f"device      {device}",
        f"threads     torch {torch.get_num_threads()}, cpus {os.cpu_count()}",
    ]
    return "\n".join(lines)


def _ffmpeg_version() -> str:
    import av

    libs = getattr(av, "library_versions", {})
    major, minor, micro = libs.get("libavformat", (0, 0, 0))
    return f"libavformat {major}.{minor}.{micro}"


def describe_video(path: Path, fps: float | None = None, short_side: int | None = None,
                   reads: int = 10, window: int = 8, seed: int = 0) -> str:
    """Probe ``path`` and time a sequential decode and random-window reads."""
    info = probe(path)
    with open_video(info, fps=fps, short_side=short_side) as video:
        n = len(video)
        t0 = time.perf_counter()
        decoded = 0
        for _ in video:
            decoded += 1
            if decoded >= 300:
                break
        sequential = decoded / (time.perf_counter() - t0)
        rng = np.random.default_rng(seed)
        span = min(window, n)
        t0 = time.perf_counter()
        for _ in range(reads):
            start = int(rng.integers(0, n - span + 1))
            video.read_window(start, span)
        random_rate = reads / (time.perf_counter() - t0)
        width, height = video.size
    lines = [
        f"video       {info.path} ({'frame folder' if info.kind == 'frames' else 'file'})",
        f"native      {info.num_frames} frames, {info.fps:.3f} fps, {info.duration:.2f} s, "
        f"{info.width}x{info.height}",
        f"as read     {n} frames at {fps or info.fps:g} fps, {width}x{height}",
        f"decode      {sequential:.1f} frames/s sequential; {random_rate:.1f} random {span}-frame windows/s",
    ]
    return "\n".join(lines)


def describe_index(root: Path, cache: Path | None = None) -> str:
    index = VideoIndex.scan(root, cache=cache)
    lines = [index.summary()]
    lines += [f"  unreadable: {path}: {reason}" for path, reason in index.failures]
    return "\n".join(lines)
