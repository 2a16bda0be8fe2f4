"""VIP human parts: propagate the first frame's part map and score mIoU over 20 classes.

The protocol of METHOD.md sections 7 and 8: frames resized to 560x560 for the model, the
first frame's Category_ids map (background + 19 parts) propagated with the preset's
settings, and every annotated frame scored as the standard tool (TimeCycle's
eval_vip.py, reused by UVC and CRW) scores it: one confusion matrix over the whole
dataset, IoU = TP / (GT + Pred - TP) per class, mIoU = the mean over the classes whose
IoU is defined (a class absent from both truth and prediction is left out, one that is
only predicted scores 0). Like the standard tool, the first frame counts too (its
prediction is its ground truth), so that figures compare with the published ones.

Predictions are written as ``<out>/<video>/<frame>.png``, palette PNGs of class ids,
for the annotated frames.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from timecycle.data.datasets import (
    VIP_CLASSES,
    read_ids,
    read_name_list,
    save_indexed_png,
    vip_frames,
)
from timecycle.evaluate import (
    add_common_arguments,
    atomic_write,
    cli_errors,
    format_table,
    is_complete,
    load_eval_model,
    write_csv,
)

INPUT_SIDE = 560


def confusion(gt: np.ndarray, pred: np.ndarray, classes: int = len(VIP_CLASSES)) -> np.ndarray:
    """(C, C + 1) pixel counts, rows the true class, columns the predicted one; the last
    column holds predictions of an id outside 0..C-1, which are wrong for every class.
    Pixels whose truth is outside 0..C-1 (void) are not scored, as in the standard tool."""
    if gt.shape != pred.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    gt, pred = gt.astype(np.int64).ravel(), pred.astype(np.int64).ravel()
    keep = (gt >= 0) & (gt < classes)
    column = np.where((pred >= 0) & (pred < classes), pred, classes)
    counts = np.bincount(gt[keep] * (classes + 1) + column[keep], minlength=classes * (classes + 1))
    return counts.reshape(classes, classes + 1)


def class_iou(hist: np.ndarray) -> np.ndarray:
    """(C,) IoU per class from a :func:`confusion` matrix; NaN for a class that is neither
    in the truth nor predicted."""
    classes = hist.shape[0]
    hits = np.diag(hist[:, :classes]).astype(np.float64)
    union = hist.sum(1) + hist[:, :classes].sum(0) - hits
    with np.errstate(invalid="ignore"):
        return hits / union


def mean_iou(hist: np.ndarray) -> float:
    """The mean of the defined IoUs (NaN when none is defined: nothing was scored)."""
    iou = class_iou(hist)
    defined = iou[~np.isnan(iou)]
    return float(defined.mean()) if defined.size else float("nan")


def check_first_frames(video: str, frames: list[tuple[Path, Path | None]]) -> None:
    """Propagation starts from the first frame's annotation: it must be there and fit its
    frame. Checked for every video before any is propagated, so that a broken layout
    does not surface hours into a run."""
    from PIL import Image

    frame, label = frames[0]
    if label is None:
        raise FileNotFoundError(f"{frame}: the first frame of {video} has no annotation "
                                f"(Annotations/Category_ids/{video}/{frame.stem}.png), and propagation starts from it")
    with Image.open(frame) as image, Image.open(label) as first:
        if image.size != first.size:
            raise ValueError(f"{label}: is {first.size[0]}x{first.size[1]}, its frame {frame} "
                             f"is {image.size[0]}x{image.size[1]}")


def predict_video(frames: list[tuple[Path, Path | None]], model, out: Path, preset: str = "crw",
                  device: str = "cpu", size: int = INPUT_SIDE) -> None:
    """Write out/<frame>.png for the annotated ones of a video's ``frames`` (from
    :func:`~timecycle.data.datasets.vip_frames`), propagating the first frame's part map
    through every frame."""
    from timecycle.propagate import propagate

    first = read_ids(frames[0][1])
    first[first >= len(VIP_CLASSES)] = 0  # void is no part to carry along
    out.mkdir(parents=True, exist_ok=True)
    if first.any():
        predictions = propagate(frames[0][0].parent, first, model, preset, device=device, progress=False,
                                input_size=("square", size))
    else:  # no person in the first frame: nothing to carry, every frame is background
        predictions = (first for _ in frames)
    for (frame, label), predicted in zip(frames, predictions):
        if label is not None:
            with atomic_write(out / f"{frame.stem}.png") as tmp:
                save_indexed_png(tmp, np.asarray(predicted, dtype=np.uint8))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, preset="crw")
    parser.add_argument("--root", type=Path, required=True,
                        help="the VIP_Fine folder holding Images/, Annotations/Category_ids/ and lists/")
    parser.add_argument("--list", type=Path, default=None, dest="names_file", metavar="FILE",
                        help="videos to evaluate, one per line (default ROOT/lists/val_videos.txt)")
    parser.add_argument("--size", type=int, default=INPUT_SIDE,
                        help=f"frames are resized to SIZE x SIZE for the model (default {INPUT_SIDE}, the protocol's)")


@cli_errors
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    videos = read_name_list(args.names_file or args.root / "lists" / "val_videos.txt")
    results = args.results_dir or args.out
    layout = {video: vip_frames(args.root, video) for video in videos}
    annotated = {video: [frame.stem for frame, label in frames if label is not None] for video, frames in layout.items()}
    if args.results_dir is None:
        pending = [v for v in videos if not is_complete(results / v, [f"{s}.png" for s in annotated[v]])]
        if len(pending) < len(videos):
            print(f"resuming: {len(videos) - len(pending)} of {len(videos)} videos already predicted in {results}")
        for video in pending:
            check_first_frames(video, layout[video])
        model = load_eval_model(args) if pending else None
        for video in tqdm(pending, desc="vip", unit="video"):
            predict_video(layout[video], model, results / video, args.preset, args.device, args.size)

    hist = np.zeros((len(VIP_CLASSES), len(VIP_CLASSES) + 1), dtype=np.int64)
    for video in videos:
        for stem in annotated[video]:
            path = results / video / f"{stem}.png"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing prediction for an annotated frame of {video}")
            label = args.root / "Annotations" / "Category_ids" / video / f"{stem}.png"
            gt, pred = read_ids(label), read_ids(path)
            if gt.shape != pred.shape:
                raise ValueError(f"{path}: is {pred.shape[1]}x{pred.shape[0]}, its annotation {label} "
                                 f"is {gt.shape[1]}x{gt.shape[0]}")
            hist += confusion(gt, pred)

    iou = class_iou(hist)
    rows = [[name, 100 * value] for name, value in zip(VIP_CLASSES, iou)] + [["mIoU", 100 * mean_iou(hist)]]
    print(format_table(["class", "IoU"], rows, digits=1))
    scored = hist.sum()
    accuracy = 100 * np.trace(hist[:, :len(VIP_CLASSES)]) / scored if scored else float("nan")
    print(f"{len(videos)} videos, {sum(map(len, annotated.values()))} annotated frames, pixel accuracy {accuracy:.1f}")
    write_csv(args.out / "vip_iou.csv", ["class", "IoU"], rows)
    return 0
