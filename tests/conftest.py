"""Shared fixtures: where the sample data lives, and videos whose frames say their index."""
from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Index caches go to a temporary folder: tests never write to the user's cache."""
    monkeypatch.setenv("TIMECYCLE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The test machine's two cores are shared (and data-loader workers run torch on one
    thread anyway); small ops run several times faster on one thread than on two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test outside CI when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"sample data {path} not present")
    return path


def index_frame(i: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A frame that shows ``i`` in binary as 8 black or white columns, which survive
    lossy coding and resizing."""
    bits = (i >> np.arange(8)) & 1  # (8,)
    columns = np.repeat(bits * 255, -(-width // 8))[:width].astype(np.uint8)  # (W,)
    return np.broadcast_to(columns[None, :, None], (height, width, 3)).copy()


def frame_index(frame: np.ndarray) -> int:
    width = frame.shape[1]
    step = -(-width // 8)
    centres = (np.arange(8) * step + step // 2).clip(max=width - 1)
    bits = frame[:, centres].mean(axis=(0, 2)) > 127
    return int((bits * (1 << np.arange(8))).sum())


def write_index_video(path: Path, n: int, fps: int = 30, gop: int = 10, codec: str = "mpeg4") -> Path:
    """An mp4 of ``n`` frames (n <= 256), keyframes every ``gop``, frame i showing i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        stream.codec_context.gop_size = gop
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="session")
def learning_run(tmp_path_factory):
    """Train a config on 64 synthetic videos (48 frames of 128x128) and score first-frame
    mask propagation on 6 held-out clips (J-Mean) for the trained encoder, its
    initialisation, and that initialisation with BatchNorm statistics re-estimated on the
    training videos, the fair baseline: training replaces them whatever the gradients teach.
    Returns run(cfg, name) -> {"history", "init", "init_bn", "trained", "seconds"}."""
    import copy
    import time

    import torch

    from timecycle.data.synthetic import SyntheticConfig, generate_set, write_videos
    from timecycle.demo import calibrate_batchnorm
    from timecycle.evaluate.synthetic import score_clips
    from timecycle.model.checkpoints import load_checkpoint, load_model
    from timecycle.model.encoder import EncoderFeatures
    from timecycle.train import LAST, build_model, train

    root = tmp_path_factory.mktemp("learning")
    data = root / "train"
    write_videos(generate_set(SyntheticConfig(frames=48), 64, seed=11), data)
    held_out = list(generate_set(SyntheticConfig(height=112, width=112, frames=12, first_frame_objects=True),
                                 6, seed=99))

    def run(cfg, name: str) -> dict:
        start = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # the session's 1 thread is for small ops; this is a training run
        try:
            torch.manual_seed(cfg.seed)  # as train() does before it builds the model: the same initialisation
            init = build_model(cfg).encoder
            train(cfg, data, root / name, progress_bar=False)
            calibrated = calibrate_batchnorm(copy.deepcopy(init), data, cfg, 64, cfg.seed)
            return {
                "history": load_checkpoint(root / name / LAST)["progress"]["history"],
                "init": score_clips(EncoderFeatures(init.eval()), held_out, context=3)["J-Mean"],
                "init_bn": score_clips(EncoderFeatures(calibrated), held_out, context=3)["J-Mean"],
                "trained": score_clips(load_model(root / name / LAST), held_out, context=3)["J-Mean"],
                "seconds": time.perf_counter() - start,
            }
        finally:
            torch.set_num_threads(threads)

    return run
