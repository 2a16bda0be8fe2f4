"""DAVIS: semi-supervised video object segmentation, J and F as the official toolkit scores them.

J is the intersection over union of each object's mask with the ground truth, void
pixels left out. F compares the objects' boundaries: a boundary pixel of either mask
counts as matched when a boundary pixel of the other lies within a disk of radius
ceil(0.008 * image diagonal) (8 pixels at 854x480); precision and recall are the
matched fractions, F their harmonic mean (METHOD.md section 8, and davis2017-evaluation's
``db_eval_iou``, ``db_eval_boundary`` and ``db_statistics``).

The toolkit dilates both boundary maps of every object in every frame with the disk.
Here boundaries are sparse sets of pixel keys for all objects and frames of a
sequence at once, and a boundary pixel is matched when, in one of the 2r+1 rows of
its disk, the nearest boundary pixel of the other mask lies within that row's half
chord: one ``searchsorted`` per row, so the cost grows with the boundaries' length,
not the frame's area, and scoring all of DAVIS-2017 val takes seconds.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from timecycle.data.datasets import (
    DAVIS_RESOLUTIONS,
    DAVIS_VOID,
    DavisSequence,
    davis_sequences,
    read_davis_annotation,
    read_mask,
    save_indexed_png,
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

BOUND_TH = 0.008  # boundary tolerance, a fraction of the image diagonal
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")


# ----------------------------------------------------------------------------- per-frame measures


def boundary_tolerance(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """The disk radius in pixels within which boundary pixels match."""
    return math.ceil(bound_th * math.hypot(height, width))


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The toolkit's one-pixel boundary (``seg2bmap``) of a binary (H, W) mask as bool (H, W):
    pixels that differ from their right, lower or lower-right neighbour, the image
    edge not counting as a change. It lies half a pixel up and left of the true edge."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    keys = _boundary_keys(mask[None].astype(np.uint8), radius=0)
    out = np.zeros(height * width, dtype=bool)
    out[keys] = True  # with one frame, one object and no margin a key is y * W + x
    return out.reshape(height, width)


def region_similarity(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """J of binary masks (..., H, W) -> (...): 1 where both are empty, void pixels ignored."""
    gt_ids, pred_ids, lead = _binary_labels(gt, pred, void)
    return _region(gt_ids, pred_ids, 1)[0].reshape(lead)


def boundary_measure(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
                     bound_th: float = BOUND_TH) -> np.ndarray:
    """F of binary masks (..., H, W) -> (...). A side without boundary pixels has precision
    (prediction) or recall (truth) 1, so both empty give 1 and one empty gives 0."""
    gt_ids, pred_ids, lead = _binary_labels(gt, pred, void)
    radius = boundary_tolerance(*gt_ids.shape[1:], bound_th)
    return _boundary(gt_ids, pred_ids, 1, radius)[0].reshape(lead)


def _binary_labels(gt, pred, void) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Binary masks (..., H, W) as the id maps (N, H, W) of one object that
    :func:`score_labels` scores, and the leading shape to give the scores back."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape or gt.ndim < 2:
        raise ValueError(f"masks must be (..., H, W) of one shape, got {gt.shape} and {pred.shape}")
    labels = gt.astype(np.uint8)
    if void is not None:
        labels[np.broadcast_to(np.asarray(void, dtype=bool), gt.shape)] = DAVIS_VOID
    size = gt.shape[-2:]
    return (*_without_void(labels.reshape(-1, *size), pred.reshape(-1, *size).astype(np.uint8), 1), gt.shape[:-2])


def score_labels(gt: np.ndarray, pred: np.ndarray, num_objects: int,
                 bound_th: float = BOUND_TH) -> tuple[np.ndarray, np.ndarray]:
    """J and F, each (K, T), of objects 1..K in T frames of id maps (T, H, W) uint8.

    Ground-truth pixels of 255 are void: left out of J, and taken out of both masks
    before their boundaries are drawn, as the toolkit does. Ground-truth ids above K
    (objects that the first frame lacks) count as background."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"id maps must be (T, H, W) of one shape, got {gt.shape} and {pred.shape}")
    if pred.size and int(pred.max()) > num_objects:
        raise ValueError(f"the prediction holds object id {int(pred.max())}, but there are only {num_objects}")
    gt, pred = _without_void(gt, pred, num_objects)
    radius = boundary_tolerance(*gt.shape[1:], bound_th)
    return _region(gt, pred, num_objects), _boundary(gt, pred, num_objects, radius)


def _without_void(gt: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Both id maps with the truth's void pixels set to background, and the truth's ids
    above k too: what is left to score is then ids 1..k of two plain maps."""
    void = gt == DAVIS_VOID
    return np.where(gt <= k, gt, 0).astype(np.uint8), np.where(void, 0, pred).astype(np.uint8)


def _region(gt: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(K, T) IoU from each frame's joint histogram of (truth id, predicted id); void
    pixels were set to 0 in both, where they fall in the unused background cell."""
    n = k + 1
    counts = np.stack([np.bincount((g.astype(np.intp) * n + p).ravel(), minlength=n * n)
                       for g, p in zip(gt, pred)]).reshape(len(gt), n, n)  # (T, truth, pred)
    inter = counts.diagonal(axis1=1, axis2=2)[:, 1:]  # (T, K)
    union = counts.sum(2)[:, 1:] + counts.sum(1)[:, 1:] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0).T


def _boundary(gt: np.ndarray, pred: np.ndarray, k: int, radius: int) -> np.ndarray:
    """(K, T) boundary F-measure of every object in every frame."""
    frames, height, width = gt.shape
    gt_keys, pred_keys = _boundary_keys(gt, radius), _boundary_keys(pred, radius)
    per_group = (height + 2 * radius) * width  # keys of one (object, frame)

    def matched_share(keys: np.ndarray, other: np.ndarray) -> np.ndarray:
        group = keys // per_group
        total = np.bincount(group, minlength=k * frames)
        hits = np.bincount(group[_near(keys, other, radius, width)], minlength=k * frames)
        return np.where(total > 0, hits / np.maximum(total, 1), 1.0)  # no boundary: nothing unmatched

    precision, recall = matched_share(pred_keys, gt_keys), matched_share(gt_keys, pred_keys)
    total = precision + recall
    f = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    return f.reshape(k, frames)


def _boundary_keys(labels: np.ndarray, radius: int) -> np.ndarray:
    """Sorted keys of the boundary pixels of every object in id maps (T, H, W).

    For object k, seg2bmap marks p when [L(p) = k] differs from [L(q) = k] for q its
    right, lower or lower-right neighbour (q outside the image counts as p itself), that
    is when L(p) != L(q) and k is one of the two: so one pass over the id map finds
    the boundaries of all objects. A pixel (y, x) of object k in frame t gets the key
    ((g * (H + 2r)) + y + r) * W + x with g = (k - 1) * T + t: one band of rows per
    (object, frame), with r spare rows above and below so that rows up to r away stay
    in the band."""
    frames, height, width = labels.shape
    padded = np.pad(labels, ((0, 0), (0, 1), (0, 1)), mode="edge")  # (T, H+1, W+1)
    here = padded[:, :-1, :-1]
    changed = (here != padded[:, :-1, 1:]) | (here != padded[:, 1:, :-1]) | (here != padded[:, 1:, 1:])
    t, pixel = np.divmod(np.flatnonzero(changed), height * width)  # the few pixels next to a change
    y, x = np.divmod(pixel, width)
    at = (t * (height + 1) + y) * (width + 1) + x  # their index in the padded maps
    flat = padded.ravel()
    own = flat[at]
    keys = []
    for step in (1, width + 1, width + 2):  # right, lower, lower-right neighbour
        other = flat[at + step]
        for ids in (own, other):
            take = (own != other) & (ids > 0)
            group = (ids[take].astype(np.int64) - 1) * frames + t[take]
            keys.append(group * (height + 2 * radius) * width + radius * width + pixel[take])
    return np.unique(np.concatenate(keys))


def _near(queries: np.ndarray, points: np.ndarray, radius: int, width: int) -> np.ndarray:
    """Whether each query key has a point key within Euclidean distance ``radius`` (keys as
    made by :func:`_boundary_keys`, points sorted): in some row dy away, the nearest point
    left or right of the query's column lies within isqrt(r^2 - dy^2) columns. Rows are
    tried nearest first and only for queries still unmatched, and most boundary pixels
    of a fair prediction match in the first few rows."""
    found = np.zeros(len(queries), dtype=bool)
    if len(points) == 0:
        return found
    pending = np.arange(len(queries))
    for dy in sorted(range(-radius, radius + 1), key=abs):
        reach = math.isqrt(radius * radius - dy * dy)  # half chord of the disk in that row
        target = queries[pending] + dy * width  # the query's column in row y + dy
        row_start = target - target % width
        idx = np.searchsorted(points, target)
        right = points[np.minimum(idx, len(points) - 1)]  # the first point at or after the target
        left = points[np.maximum(idx - 1, 0)]  # the last point before it
        hit = (idx < len(points)) & (right - target <= reach) & (right < row_start + width)
        hit |= (idx > 0) & (target - left <= reach) & (left >= row_start)
        found[pending[hit]] = True
        pending = pending[~hit]
        if not pending.size:
            break
    return found


def statistics(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, recall (share of frames above 0.5) and decay of per-frame scores (K, n) -> 3 x (K,).

    Decay is the mean of the first quarter of the frames minus that of the last, with
    the toolkit's quarters: bounds round(linspace(1, n, 5)) - 1, each bin including its
    upper bound (neighbouring bins share a frame). The toolkit keeps the bounds in uint8,
    which wraps past 256 frames; DAVIS sequences are shorter, and here they do not wrap."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"statistics need per-frame scores (K, n) with n >= 1, got shape {values.shape}")
    bounds = (np.round(np.linspace(1, values.shape[1], 5) + 1e-10) - 1).astype(int)
    decay = values[:, bounds[0]:bounds[1] + 1].mean(1) - values[:, bounds[3]:bounds[4] + 1].mean(1)
    return values.mean(1), (values > 0.5).mean(1), decay


# ----------------------------------------------------------------------------- sequences and tables


@dataclass
class SequenceScores:
    """Per-frame J and F (K, n) of a sequence's objects over its scored frames (the
    annotated ones but the first and last)."""

    name: str
    j: np.ndarray
    f: np.ndarray


def score_sequence(seq: DavisSequence, results: str | Path, year: str | int = "2017") -> SequenceScores | None:
    """Score the predictions in ``results``/<seq>/NNNNN.png against the ground truth; None
    when the sequence has no annotation between its first and last annotated frames."""
    scored = seq.annotations[1:-1]
    if not scored:
        return None
    first = read_davis_annotation(seq.annotations[0], year)
    objects = np.setdiff1d(np.unique(first), [0, DAVIS_VOID])
    if objects.size == 0:
        raise ValueError(f"{seq.annotations[0]}: the first frame's annotation has no object")
    gt = np.stack([read_davis_annotation(path, year) for path in scored])  # (n, H, W)
    pred = np.stack([_read_prediction(Path(results) / seq.name / f"{path.stem}.png", seq, objects)
                     for path in scored])
    # As in the toolkit, objects are ids 1..max of the first frame (an absent id in
    # between is an object that is never there).
    j, f = score_labels(gt, pred, int(objects.max()))
    return SequenceScores(seq.name, j, f)


def _read_prediction(path: Path, seq: DavisSequence, objects: np.ndarray) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing result frame (sequence {seq.name} has ground truth for it)")
    labels = read_mask(path)
    if labels.shape != seq.size:
        raise ValueError(f"{path}: result mask is {labels.shape[1]}x{labels.shape[0]} but the frames of "
                         f"{seq.name} are {seq.size[1]}x{seq.size[0]}")
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
    unknown = np.setdiff1d(present, np.append(objects, 0))
    if unknown.size:
        raise ValueError(f"{path}: object id {unknown[0]} is not in the first frame's annotation "
                         f"{seq.annotations[0]} (its objects: {', '.join(map(str, objects))})")
    return labels


def davis_tables(scores: list[SequenceScores]) -> tuple[list[float], list[tuple[str, float, float]]]:
    """The official evaluator's two tables: the global row (:data:`GLOBAL_COLUMNS`), each
    object weighted equally, and one row per object, named <sequence>_<object id>."""
    if not scores:
        raise ValueError("no sequence to score")
    j_stats = [np.concatenate(s) for s in zip(*(statistics(sc.j) for sc in scores))]  # mean, recall, decay (N,)
    f_stats = [np.concatenate(s) for s in zip(*(statistics(sc.f) for sc in scores))]
    j_mean, f_mean = float(j_stats[0].mean()), float(f_stats[0].mean())
    row = [(j_mean + f_mean) / 2] + [float(v.mean()) for v in j_stats] + [float(v.mean()) for v in f_stats]
    names = [f"{sc.name}_{k + 1}" for sc in scores for k in range(len(sc.j))]
    return row, list(zip(names, j_stats[0].tolist(), f_stats[0].tolist()))


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True,
                        help="DAVIS folder holding JPEGImages/, Annotations/ and ImageSets/")
    parser.add_argument("--year", choices=["2016", "2017"], default="2017",
                        help="2016 scores every sequence as one object")
    parser.add_argument("--split", default="val", help="the ImageSets/<year>/<split>.txt to evaluate")
    parser.add_argument("--sequences", nargs="+", metavar="SEQ",
                        help="evaluate these sequences instead of the split's (no ImageSets needed)")
    parser.add_argument("--resolution", choices=DAVIS_RESOLUTIONS, default="480p")
    add_common_arguments(parser)


@cli_errors
def run(args: argparse.Namespace) -> int:
    """Propagate (unless --results-dir), score, print and write the two CSV tables."""
    sequences = davis_sequences(args.root, args.year, args.split, args.resolution, args.sequences)
    results = args.results_dir
    if results is None:
        model = load_eval_model(args)
        done = propagate_sequences(sequences, model, args.out, args.preset, args.device, args.year)
        print(f"propagated {len(done)} sequences into {args.out}; {len(sequences) - len(done)} were complete already")
        results = args.out
    scores, unscored = [], []
    for seq in _bar(sequences, "score"):
        score = score_sequence(seq, results, args.year)
        if score is None:
            unscored.append(seq.name)
        else:
            scores.append(score)
    if unscored:
        print(f"not scored (no ground truth between the first and last annotated frames): {', '.join(unscored)}")
    if not scores:
        print("nothing to score")
        return 0
    row, per_object = davis_tables(scores)
    global_csv = write_csv(args.out / f"global_results-{args.split}.csv", GLOBAL_COLUMNS, [row])
    sequence_csv = write_csv(args.out / f"per-sequence_results-{args.split}.csv", SEQUENCE_COLUMNS, per_object)
    print(f"---------- Global results for {args.split} ----------")
    print(format_table(GLOBAL_COLUMNS, [row]))
    print(f"---------- Per sequence results for {args.split} ----------")
    print(format_table(SEQUENCE_COLUMNS, per_object))
    print(f"tables: {global_csv}, {sequence_csv}")
    return 0


def propagate_sequences(sequences: list[DavisSequence], model, out: str | Path, preset: str = "crw",
                        device: str = "cpu", year: str | int = "2017", **overrides) -> list[str]:
    """Propagate each sequence's first-frame annotation and write out/<seq>/NNNNN.png
    (palette PNGs of object ids, every frame, the official results layout). A sequence
    whose folder already holds every frame is skipped, so an interrupted run resumes.
    Returns the names of the sequences propagated."""
    from timecycle.propagate import propagate
    from timecycle.video import open_video

    done = []
    with _bar(sequences, "propagate") as bar:
        for seq in bar:
            folder = Path(out) / seq.name
            names = [f"{frame.stem}.png" for frame in seq.frames]
            if is_complete(folder, names):
                continue
            folder.mkdir(parents=True, exist_ok=True)
            first = read_davis_annotation(seq.annotations[0], year)
            first[first == DAVIS_VOID] = 0  # void is no object to carry along
            with open_video(seq.frames[0].parent) as video:
                masks = propagate(video, first, model, preset, device=device, progress=False, **overrides)
                for t, (name, mask) in enumerate(zip(names, masks)):
                    with atomic_write(folder / name) as tmp:
                        save_indexed_png(tmp, mask.astype(np.uint8))
                    bar.set_postfix_str(f"{seq.name} {t + 1}/{len(names)}")
            done.append(seq.name)
    return done


def _bar(sequences: list[DavisSequence], what: str):
    from tqdm import tqdm

    return tqdm(sequences, desc=what, unit="seq")


__all__ = ["BOUND_TH", "GLOBAL_COLUMNS", "SEQUENCE_COLUMNS", "SequenceScores", "add_arguments", "boundary_map",
           "boundary_measure", "boundary_tolerance", "davis_tables", "propagate_sequences", "region_similarity",
           "run", "score_labels", "score_sequence", "statistics"]
