"""VIP: mIoU as the standard tool computes it, and ``timecycle evaluate vip`` end to end
on a synthetic VIP_Fine layout (there is no VIP sample)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from timecycle.cli import main
from timecycle.data.datasets import VIP_CLASSES, read_ids, read_mask, vip_frames
from timecycle.data.synthetic import SyntheticConfig, generate_clip
from timecycle.evaluate.vip import class_iou, confusion, mean_iou


def test_iou_by_hand():
    gt = np.array([[0, 0, 1, 1, 255], [2, 2, 1, 0, 3]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1, 3], [2, 0, 40, 5, 3]], dtype=np.uint8)
    hist = confusion(gt, pred)
    assert hist.shape == (20, 21)
    assert hist.sum() == 9  # the void (255) pixel is not scored
    assert hist[1, 20] == 1  # id 40 is no class: a miss for class 1, a hit for none
    iou = class_iou(hist)
    # 0: TP 1, GT 3, Pred 2; 1: TP 2, GT 3, Pred 3; 2: TP 1, GT 2, Pred 1; 3: TP 1, GT 1, Pred 1
    # (the 3 predicted on void does not count); 5: only predicted; the rest: absent.
    assert np.allclose(iou[:6], [1 / 4, 2 / 4, 1 / 2, 1.0, np.nan, 0.0], equal_nan=True)
    assert np.isnan(iou[6:]).all()
    assert np.isclose(mean_iou(hist), (1 / 4 + 2 / 4 + 1 / 2 + 1 + 0) / 5)


def test_one_confusion_matrix_over_the_dataset_not_a_mean_over_frames():
    a_gt, a_pred = np.array([[1, 1, 1, 1]]), np.array([[1, 1, 1, 0]])  # class 1: 3/4
    b_gt, b_pred = np.array([[1, 0, 0, 0]]), np.array([[0, 0, 0, 0]])  # class 1: 0/1
    hist = confusion(a_gt, a_pred) + confusion(b_gt, b_pred)
    assert np.isclose(class_iou(hist)[1], 3 / 5)  # pooled, where a mean over frames says 3/8
    assert np.isclose(class_iou(hist)[0], 3 / 5)


def test_truth_against_itself_and_nothing_scored():
    gt = np.random.default_rng(0).integers(0, 20, (30, 40)).astype(np.uint8)
    gt[0, :5] = 255
    assert mean_iou(confusion(gt, gt)) == 1.0
    assert np.isnan(mean_iou(np.zeros((20, 21), dtype=np.int64)))
    with pytest.raises(ValueError, match="differ in size"):
        confusion(gt, gt[1:])


def test_part_maps_keep_255(tmp_path):
    labels = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "grey.png")
    assert read_ids(tmp_path / "grey.png").tolist() == labels.tolist()
    assert read_mask(tmp_path / "grey.png").max() == 1  # the DAVIS-2016 reading, which VIP must not use


def _write_vip(root, videos):
    """VIP_Fine layout: Images/<video>/<12 digits>.jpg, a Category_ids PNG (grey, class ids,
    a void top row) for every other frame, as VIP annotates one frame in 25, and
    lists/val_videos.txt."""
    for name, objects in videos.items():
        clip = generate_clip(SyntheticConfig(height=48, width=64, frames=5, num_objects=objects,
                                             first_frame_objects=True), seed=3)
        images, labels = root / "Images" / name, root / "Annotations" / "Category_ids" / name
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for t, (frame, mask) in enumerate(zip(clip.frames, clip.masks)):
            stem = f"{25 * t + 1:012d}"
            Image.fromarray(frame).save(images / f"{stem}.jpg", quality=95)
            if t % 2 == 0:
                parts = mask * 5  # ids 0, 5, 10
                parts[0] = 255
                Image.fromarray(parts).save(labels / f"{stem}.png")
    (root / "lists").mkdir()
    (root / "lists" / "val_videos.txt").write_text("".join(f"{name}\n" for name in videos))


def test_command_on_a_synthetic_layout(tmp_path, capsys):
    root, out = tmp_path / "VIP_Fine", tmp_path / "run"
    _write_vip(root, {"videos1": 2, "videos2": 0})
    annotated = [f"{25 * t + 1:012d}.png" for t in (0, 2, 4)]
    assert [label is not None for _, label in vip_frames(root, "videos1")] == [True, False, True, False, True]
    args = ["evaluate", "vip", "--root", str(root), "--out", str(out), "--size", "64"]
    assert main([*args, "--checkpoint", "pixels"]) == 0
    assert sorted(p.name for p in (out / "videos1").iterdir()) == annotated
    assert not read_ids(out / "videos2" / annotated[2]).any()  # no person in frame 0: all background
    first = read_ids(root / "Annotations" / "Category_ids" / "videos1" / annotated[0])
    assert np.array_equal(read_ids(out / "videos1" / annotated[0])[1:], first[1:])
    assert set(np.unique(read_ids(out / "videos1" / annotated[2])).tolist()) <= {0, 5, 10}  # void is not carried
    rows = dict(line.split(",") for line in (out / "vip_iou.csv").read_text().splitlines())
    assert list(rows)[1:] == [*VIP_CLASSES, "mIoU"]
    assert rows["hat"] == "nan" and 0 < float(rows["mIoU"]) <= 100
    printed = capsys.readouterr().out
    assert "2 videos, 6 annotated frames" in printed

    assert main(args) == 0  # resumed: no model needed
    assert "resuming: 2 of 2 videos" in capsys.readouterr().out

    given = tmp_path / "given"
    shutil.copytree(root / "Annotations" / "Category_ids", given)
    assert main([*args, "--results-dir", str(given)]) == 0
    rows = dict(line.split(",") for line in (out / "vip_iou.csv").read_text().splitlines())
    assert rows["mIoU"] == "100.000" and rows["background"] == "100.000" and rows["hair"] == "nan"

    Image.fromarray(np.zeros((40, 64), np.uint8)).save(given / "videos1" / annotated[1])
    assert main([*args, "--results-dir", str(given)]) == 1
    assert f"{annotated[1]}: is 64x40, its annotation" in capsys.readouterr().err
    (given / "videos1" / annotated[1]).unlink()
    assert main([*args, "--results-dir", str(given)]) == 1
    assert f"{annotated[1]}: missing prediction" in capsys.readouterr().err


def test_command_needs_the_first_annotation(tmp_path, capsys):
    root = tmp_path / "VIP_Fine"
    _write_vip(root, {"videos1": 2})
    (root / "Annotations" / "Category_ids" / "videos1" / f"{1:012d}.png").unlink()
    args = ["evaluate", "vip", "--root", str(root), "--out", str(tmp_path / "run"), "--checkpoint", "pixels"]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert f"videos1/{1:012d}.jpg: the first frame of videos1 has no annotation" in error
    assert f"(Annotations/Category_ids/videos1/{1:012d}.png)" in error
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "Annotations" / "Category_ids" / "videos1" / f"{1:012d}.png")
    assert main(args) == 1
    assert f"videos1/{1:012d}.png: is 10x10, its frame" in capsys.readouterr().err
    shutil.rmtree(root / "Images" / "videos1")
    assert main(args) == 1
    assert "Images/videos1: no frame folder for VIP video videos1" in capsys.readouterr().err
