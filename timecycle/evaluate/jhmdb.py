"""JHMDB keypoints: propagate the 15 joints of frame 0 and score PCK@0.1..0.5.

The protocol of METHOD.md sections 7 and 8, as the TimeCycle, UVC and CRW releases ran
it: frames resized to 320x320 for the model, each joint a Gaussian heatmap of sigma
half a feature cell (plus a background channel), propagated with the preset's settings,
read back as the top-k weighted mean of each heatmap. A joint counts as found when it
lies within a * 0.6 * the diagonal of the bounding box of that frame's ground-truth
joints; frame 0 (given) is not scored; PCK is taken per joint over every scored frame of
the dataset, then averaged over the 15 joints.

Predictions are written per video as ``<out>/<class>/<video>.npy``: (T, 15, 2) float64
x, y in 0-based pixel coordinates of the original frames, frame 0 included.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from timecycle.data.datasets import (
    JHMDB_JOINTS,
    jhmdb_frames,
    jhmdb_split,
    read_jhmdb_joints,
    read_name_list,
    read_rgb,
)
from timecycle.evaluate import (
    add_common_arguments,
    atomic_write,
    cli_errors,
    format_table,
    load_eval_model,
    write_csv,
)

PCK_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
BOX_SCALE = 0.6  # the reference length is this share of the joint box's diagonal
SIGMA_CELLS = 0.5  # heatmap sigma in feature cells
STRIDE = 8  # pixels of model input per feature cell, for every inference model (model/checkpoints.py)
INPUT_SIDE = 320


def pck_hits(pred: np.ndarray, gt: np.ndarray, thresholds=PCK_THRESHOLDS) -> np.ndarray:
    """(A, J) counts, over frames 1..T-1, of the joints predicted within a * 0.6 * the
    diagonal of that frame's ground-truth joint box, for each threshold a.

    ``pred`` and ``gt`` are (T, J, 2) x, y. The test is written d <= a * reference rather
    than d / reference <= a, so that a box of zero size (every joint on one pixel) admits
    exact hits only instead of dividing by zero; a NaN prediction is a miss.
    """
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or gt.ndim != 3 or gt.shape[-1] != 2:
        raise ValueError(f"predictions {pred.shape} and ground truth {gt.shape} must both be (T, J, 2)")
    diagonal = np.linalg.norm(gt[1:].max(1) - gt[1:].min(1), axis=-1)  # (T-1,)
    distance = np.linalg.norm(pred[1:] - gt[1:], axis=-1)  # (T-1, J)
    reference = np.asarray(thresholds)[:, None, None] * BOX_SCALE * diagonal[None, :, None]  # (A, T-1, 1)
    return (distance[None] <= reference).sum(1)


def pck_table(hits: np.ndarray, frames: int) -> np.ndarray:
    """(A, J + 1) percentages from summed :func:`pck_hits` over ``frames`` scored frames:
    each joint's PCK, then their mean (the published figure)."""
    if frames < 1:
        raise ValueError("no frames to score: every video has only its given first frame")
    per_joint = 100.0 * hits / frames
    return np.concatenate([per_joint, per_joint.mean(1, keepdims=True)], 1)


def joint_heatmaps(joints: np.ndarray, height: int, width: int, sigma: tuple[float, float]) -> np.ndarray:
    """(J, 2) x, y -> (J + 1, H, W) float32: a Gaussian per joint and a background channel
    that takes what no joint claims. ``sigma`` is (x, y) in pixels: half a feature cell is
    wider than tall on a 320x240 frame squeezed into a 320x320 input, and the protocol
    wants the Gaussian round on the feature grid."""
    gx = np.exp(-((np.arange(width) - joints[:, :1]) ** 2) / (2 * sigma[0] ** 2))  # (J, W)
    gy = np.exp(-((np.arange(height) - joints[:, 1:]) ** 2) / (2 * sigma[1] ** 2))  # (J, H)
    maps = gy[:, :, None] * gx[:, None, :]  # (J, H, W)
    background = np.clip(1 - maps.sum(0, keepdims=True), 0, 1)
    return np.concatenate([maps, background]).astype(np.float32)


def predict_video(frames: np.ndarray, first_joints: np.ndarray, model, preset: str = "crw",
                  device: str = "cpu", size: int = INPUT_SIDE) -> np.ndarray:
    """(T, J, 2) joint positions through (T, H, W, 3) frames from the (J, 2) joints of
    frame 0, which is returned as given."""
    from timecycle.propagate import propagate, to_points

    height, width = frames.shape[1:3]
    sigma = (SIGMA_CELLS * STRIDE * width / size, SIGMA_CELLS * STRIDE * height / size)
    labels = joint_heatmaps(first_joints, height, width, sigma)
    out = np.empty((len(frames), len(first_joints), 2))
    out[0] = first_joints
    predictions = propagate(frames, labels, model, preset, device=device, progress=False,
                            input_size=("square", size))
    next(predictions)  # frame 0: the labels themselves
    for t, heat in enumerate(predictions, start=1):
        out[t] = to_points(heat[:-1])
    return out


def video_names(root: Path, split: int, names_file: Path | None) -> list[str]:
    """``<class>/<video>`` names from a list file, else the split's test videos. A list
    line may be a longer path ending in <class>/<video>, as in the CRW and UVC lists."""
    if names_file is None:
        return jhmdb_split(root, split)
    return ["/".join(Path(word).parts[-2:]) for word in read_name_list(names_file)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, preset="crw")
    parser.add_argument("--root", type=Path, required=True,
                        help="JHMDB folder holding Rename_Images/, joint_positions/ and splits/")
    parser.add_argument("--split", type=int, choices=(1, 2, 3), default=1,
                        help="official split whose test videos to evaluate (default 1: 268 videos)")
    parser.add_argument("--list", type=Path, default=None, dest="names_file", metavar="FILE",
                        help="evaluate the videos of this file instead (one <class>/<video> per line)")
    parser.add_argument("--size", type=int, default=INPUT_SIDE,
                        help=f"frames are resized to SIZE x SIZE for the model (default {INPUT_SIDE}, the protocol's)")


@cli_errors
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    names = video_names(args.root, args.split, args.names_file)
    # The whole layout is read before anything is propagated: a missing file found hours
    # into a run would cost those hours.
    truth = {name: read_jhmdb_joints(args.root / "joint_positions" / name / "joint_positions.mat") for name in names}
    results = args.results_dir or args.out
    if args.results_dir is None:
        pending = [n for n in names if not (results / f"{n}.npy").is_file()]
        if len(pending) < len(names):
            print(f"resuming: {len(names) - len(pending)} of {len(names)} videos already predicted in {results}")
        paths = {name: jhmdb_frames(args.root, name, len(truth[name])) for name in pending}
        model = load_eval_model(args) if pending else None
        for name in tqdm(pending, desc="jhmdb", unit="video"):
            frames = np.stack([read_rgb(path) for path in paths[name]])
            predicted = predict_video(frames, truth[name][0], model, args.preset, args.device, args.size)
            path = results / f"{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                np.save(tmp, predicted)

    hits = np.zeros((len(PCK_THRESHOLDS), len(JHMDB_JOINTS)), dtype=np.int64)
    scored = 0
    per_video = []
    for name, gt in truth.items():
        path = results / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing prediction for video {name}")
        try:
            pred = np.load(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable .npy file of keypoints ({exc})") from None
        if pred.shape != gt.shape:
            raise ValueError(f"{path}: predictions are {pred.shape}, the ground truth of {name} is {gt.shape} (T, J, 2)")
        video_hits = pck_hits(pred, gt)
        hits += video_hits
        scored += len(gt) - 1
        if len(gt) > 1:
            per_video.append([name, len(gt) - 1, *pck_table(video_hits, len(gt) - 1)[:, -1]])

    table = pck_table(hits, scored)
    header = ["joint", *(f"PCK@{a}" for a in PCK_THRESHOLDS)]
    rows = [[joint, *table[:, j]] for j, joint in enumerate([*JHMDB_JOINTS, "mean"])]
    print(format_table(header, rows, digits=1))
    print(f"{len(names)} videos, {scored} scored frames")
    write_csv(args.out / "jhmdb_pck.csv", header, rows)
    write_csv(args.out / "jhmdb_pck_per_video.csv", ["video", "frames", *header[1:]], per_video)
    return 0
