"""Optical flow: dense nearest-neighbour flow read off the features, scored by end-point error.

Each pixel of the first frame moves to where its feature cell's nearest neighbour lies
in the second frame. It is computed by the propagation engine itself, which makes the
preset's input size and search window apply unchanged: the second frame is the
"first" frame of a two-frame propagation whose labels are its own pixel coordinates,
and a single kept key (weight 1, no min-max rescaling) carries the matched cell's
coordinates over exactly; the output, upsampled bilinearly like any label, minus each
pixel's own position is the flow. Within half a cell of the frame's edge a pixel takes
the edge cell's match, so there the estimate is off by the pixel's distance to that
cell's centre. ``--top-k`` above 1 averages the best matches' positions instead.

End-point error (METHOD.md section 8) is the length of the difference of the flow
vectors, pooled over the pixels of every pair: over all pixels, over the valid ones
(not marked in invalid/, the headline figure) and over the valid non-occluded ones
(where occlusions/ has a mask). Predictions are written as Middlebury .flo files,
``<out>/<scene>/frame_NNNN.flo`` like the ground truth.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from timecycle.data.datasets import (
    FlowPair,
    read_flo,
    read_ids,
    read_rgb,
    sintel_pairs,
    write_flo,
)
from timecycle.evaluate import (
    add_common_arguments,
    atomic_write,
    cli_errors,
    format_table,
    load_eval_model,
    write_csv,
)

REGIONS = ("all", "valid", "noc")
# Coordinates are labels that must come through unchanged: sampled exactly at the cell
# centres, carried by kept keys whose weights sum to 1, never rescaled; and the preset's
# search window applies to the one context frame, which here is the adjacent frame.
_MATCHING = {"top_k_per_frame": False, "softmax": "kept", "minmax": False, "label_downsample": "bilinear",
             "radius_on_first": True}


def epe_totals(pred: np.ndarray, gt: np.ndarray, invalid: np.ndarray | None = None,
               occluded: np.ndarray | None = None) -> dict[str, tuple[float, int]]:
    """Summed end-point error and pixel count of (H, W, 2) flows over each region of
    :data:`REGIONS`; without an invalid mask every pixel is valid, without an occlusion
    mask "noc" is left out. Sums, not means, so that a dataset pools its pixels."""
    if pred.shape != gt.shape:
        raise ValueError(f"predicted flow {pred.shape} and ground truth {gt.shape} differ in size")
    error = np.linalg.norm(pred.astype(np.float64) - gt, axis=-1)  # (H, W)
    valid = np.ones(error.shape, dtype=bool) if invalid is None else ~invalid
    regions = {"all": np.ones(error.shape, dtype=bool), "valid": valid}
    if occluded is not None:
        regions["noc"] = valid & ~occluded
    return {name: (float(error[mask].sum()), int(mask.sum())) for name, mask in regions.items()}


def mean_epe(totals: dict[str, tuple[float, int]]) -> dict[str, float]:
    """The EPE of each region from summed totals; NaN for a region with no pixels."""
    return {name: totals[name][0] / totals[name][1] if name in totals and totals[name][1] else float("nan")
            for name in REGIONS}


def predict_flow(first: np.ndarray, second: np.ndarray, model, preset: str = "crw", device: str = "cpu",
                 top_k: int = 1) -> np.ndarray:
    """(H, W, 2) flow (u along x, v along y) from (H, W, 3) ``first`` to ``second``."""
    from timecycle.propagate import propagate

    height, width = first.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    coords = np.stack([xs, ys])  # (2, H, W)
    predictions = propagate(np.stack([second, first]), coords, model, preset, device=device, progress=False,
                            top_k=top_k, **_MATCHING)
    next(predictions)  # the second frame: its own coordinates
    return (next(predictions) - coords).transpose(1, 2, 0)


def _mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    if path is None:
        return None
    mask = read_ids(path) != 0
    if mask.shape != shape:
        raise ValueError(f"{path}: is {mask.shape[1]}x{mask.shape[0]}, the flow is {shape[1]}x{shape[0]}")
    return mask


def score_pair(pair: FlowPair, path: Path) -> dict[str, tuple[float, int]]:
    """:func:`epe_totals` of the prediction at ``path`` against the pair's ground truth."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing prediction for {pair.scene}/{pair.name}")
    gt, pred = read_flo(pair.flow), read_flo(path)
    if pred.shape != gt.shape:
        raise ValueError(f"{path}: is {pred.shape[1]}x{pred.shape[0]}, the ground truth {pair.flow} "
                         f"is {gt.shape[1]}x{gt.shape[0]}")
    return epe_totals(pred, gt, _mask(pair.invalid, gt.shape[:2]), _mask(pair.occlusions, gt.shape[:2]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, preset="crw")
    parser.add_argument("--root", type=Path, required=True,
                        help="MPI-Sintel folder (or its training/): <pass>/<scene>/frame_NNNN.png, flow/<scene>/"
                             "frame_NNNN.flo, and occlusions/ and invalid/ masks where present")
    parser.add_argument("--pass", choices=("clean", "final"), default="clean", dest="pass_name",
                        help="which rendering of the frames to match (default clean)")
    parser.add_argument("--top-k", type=int, default=1,
                        help="matches whose positions are averaged, softmax-weighted at the preset's temperature (default 1: "
                             "the nearest neighbour)")


@cli_errors
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    pairs = sintel_pairs(args.root, args.pass_name)
    results = args.results_dir or args.out
    if args.results_dir is None:
        pending = [p for p in pairs if not (results / p.scene / f"{p.name}.flo").is_file()]
        if len(pending) < len(pairs):
            print(f"resuming: {len(pairs) - len(pending)} of {len(pairs)} pairs already predicted in {results}")
        model = load_eval_model(args) if pending else None
        for pair in tqdm(pending, desc="flow", unit="pair"):
            first, second = (read_rgb(p) for p in pair.frames)
            if first.shape != second.shape:
                raise ValueError(f"{pair.frames[1]}: is {second.shape[1]}x{second.shape[0]}, "
                                 f"{pair.frames[0]} is {first.shape[1]}x{first.shape[0]}")
            flow = predict_flow(first, second, model, args.preset, args.device, args.top_k)
            (results / pair.scene).mkdir(parents=True, exist_ok=True)
            with atomic_write(results / pair.scene / f"{pair.name}.flo") as tmp:
                write_flo(tmp, flow)

    totals = {name: [0.0, 0] for name in REGIONS}
    rows = []
    for pair in pairs:
        scores = score_pair(pair, results / pair.scene / f"{pair.name}.flo")
        for name, (error, count) in scores.items():
            totals[name][0] += error
            totals[name][1] += count
        rows.append([pair.scene, pair.name, *mean_epe(scores).values()])
    overall = mean_epe({name: tuple(value) for name, value in totals.items()})
    rows.append(["all", f"{len(pairs)} pairs", *overall.values()])
    header = ["scene", "frame", *(f"EPE {name}" for name in REGIONS)]
    print(format_table(header, rows))
    write_csv(args.out / "flow_epe.csv", header, rows)
    return 0
