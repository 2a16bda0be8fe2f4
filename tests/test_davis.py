"""DAVIS: J and F against hand computations and a literal re-statement of the official
toolkit, the reader's checks of the official layouts, and `timecycle evaluate davis`
end to end on synthetic and real sequences."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from conftest import shared_data
from PIL import Image
from scipy import ndimage

from timecycle.cli import main
from timecycle.data.datasets import davis_sequences, read_mask, save_indexed_png
from timecycle.data.synthetic import SyntheticConfig, generate_set, write_davis
from timecycle.evaluate import SUITES, available_suites
from timecycle.evaluate.davis import (
    GLOBAL_COLUMNS,
    SequenceScores,
    boundary_map,
    boundary_measure,
    boundary_tolerance,
    davis_tables,
    region_similarity,
    score_labels,
    score_sequence,
    statistics,
)

# ----------------------------------------------------------------------------- the toolkit, restated


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """davis2017-evaluation's boundary map, written out as its definition reads."""
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def reference_jf(gt: np.ndarray, pred: np.ndarray, void: np.ndarray) -> tuple[float, float]:
    """J and F of one binary mask pair as the toolkit computes them: dense dilation of both
    boundary maps with a disk of radius ceil(0.008 * diagonal)."""
    inter, union = (gt & pred & ~void).sum(), ((gt | pred) & ~void).sum()
    j = 1.0 if union == 0 else inter / union
    r = math.ceil(0.008 * math.hypot(*gt.shape))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = yy ** 2 + xx ** 2 <= r * r
    fb, gb = seg2bmap(pred & ~void), seg2bmap(gt & ~void)
    nf, ng = fb.sum(), gb.sum()
    if nf == 0 and ng == 0:
        p = rc = 1.0
    elif nf == 0:
        p, rc = 1.0, 0.0
    elif ng == 0:
        p, rc = 0.0, 1.0
    else:
        p = (fb & ndimage.binary_dilation(gb, disk)).sum() / nf
        rc = (gb & ndimage.binary_dilation(fb, disk)).sum() / ng
    return j, (0.0 if p + rc == 0 else 2 * p * rc / (p + rc))


def square(size: int = 100, top: int = 40, left: int = 40, side: int = 20) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


# ----------------------------------------------------------------------------- J


def test_region_similarity_by_hand():
    empty = np.zeros((4, 6), dtype=bool)
    gt = empty.copy()
    gt[0:2, 0:2] = True  # 4 pixels
    pred = empty.copy()
    pred[0:2, 1:4] = True  # 6 pixels, 2 of them on the truth
    assert region_similarity(empty, empty) == 1.0  # empty union
    assert region_similarity(gt, empty) == 0.0
    assert region_similarity(empty, pred) == 0.0
    assert region_similarity(gt, pred) == pytest.approx(2 / 8)
    void = empty.copy()
    void[0:2, 3] = True  # part of the prediction's spill lies in void: 2 false positives left
    assert region_similarity(gt, pred, void) == pytest.approx(2 / 6)
    void[0:2, 1:4] = True  # void over everything predicted: the union is the truth's 2 free pixels
    assert region_similarity(gt, pred, void) == 0.0


def test_region_similarity_of_several_objects_and_frames():
    gt = np.array([[[1, 1, 2, 2], [0, 0, 255, 255]], [[0, 0, 0, 0], [0, 0, 0, 0]]], dtype=np.uint8)
    pred = np.array([[[1, 2, 2, 2], [0, 0, 1, 1]], [[0, 0, 0, 0], [0, 0, 0, 2]]], dtype=np.uint8)
    j, _ = score_labels(gt, pred, num_objects=2)
    # Frame 0: object 1 has 1 of 2 (the void pixels it covers do not count); object 2 has 2 of 3.
    # Frame 1: object 1 is absent from both (1), object 2 only predicted (0).
    np.testing.assert_allclose(j, [[1 / 2, 1.0], [2 / 3, 0.0]])


# ----------------------------------------------------------------------------- F


def test_boundary_map_by_hand():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:3, 1:3] = True
    expected = np.zeros((6, 6), dtype=bool)
    expected[0:3, 0:3] = True
    expected[1, 1] = False  # the ring of the 3x3 square half a pixel up-left of the object
    np.testing.assert_array_equal(boundary_map(mask), expected)
    half = np.zeros((6, 6), dtype=bool)
    half[:, 3:] = True  # touches the right, top and bottom edges: the image edge is no boundary
    expected = np.zeros((6, 6), dtype=bool)
    expected[:, 2] = True
    np.testing.assert_array_equal(boundary_map(half), expected)
    assert not boundary_map(np.ones((6, 6), dtype=bool)).any()


def test_boundary_tolerance_is_eight_pixels_at_480p():
    assert boundary_tolerance(480, 854) == 8
    assert boundary_tolerance(1080, 1920) == 18  # ceil(17.6)
    assert boundary_tolerance(100, 100) == 2  # ceil(1.13): the size of the hand computations below


def test_boundary_measure_edge_cases():
    empty = np.zeros((100, 100), dtype=bool)
    full = np.ones((100, 100), dtype=bool)
    assert boundary_measure(empty, empty) == 1.0  # P = R = 1
    assert boundary_measure(square(), empty) == 0.0  # P = 1, R = 0
    assert boundary_measure(empty, square()) == 0.0  # P = 0, R = 1
    assert boundary_measure(full, full) == 1.0  # a mask with no boundary is an empty boundary
    assert boundary_measure(square(top=10, left=10), square(top=60, left=60)) == 0.0  # P + R = 0
    void = square(top=35, left=35, side=30)  # the whole prediction, and the truth, in void
    assert boundary_measure(square(), square(top=42, left=42, side=10), void) == 1.0


def test_a_shifted_square_scores_the_hand_computed_values():
    """A 20x20 square against itself moved 3 pixels right, tolerance 2 (100x100 image).

    J: overlap 20 x 17 = 340, union 800 - 340 = 460. F: each boundary is the 80-pixel ring
    of a 21x21 square; of the truth's ring, the top and bottom rows but their leftmost
    pixel (2 x 20) are within 2 pixels of the moved ring, and of the right column the 2
    pixels nearest each corner (4): 44 / 80. By symmetry the prediction's share is the
    same, so P = R = F = 0.55."""
    gt, pred = square(), square(left=43)
    assert region_similarity(gt, pred) == pytest.approx(340 / 460)
    assert boundary_measure(gt, pred) == pytest.approx(0.55)
    assert boundary_measure(gt.T, pred.T) == pytest.approx(0.55)  # moved down instead
    # At exactly the tolerance every boundary pixel still matches.
    assert boundary_measure(gt, square(left=42)) == 1.0
    assert region_similarity(gt, square(left=42)) == pytest.approx(360 / 440)


def test_scores_equal_the_toolkit_restated_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(25):
        height, width = (int(v) for v in rng.integers(8, 130, 2))
        k = int(rng.integers(1, 4))
        blocks = rng.integers(0, k + 1, (height // 6 + 1, width // 6 + 1))
        gt = np.kron(blocks, np.ones((6, 6), dtype=np.int64))[:height, :width].astype(np.uint8)
        pred = np.roll(gt, tuple(int(v) for v in rng.integers(-4, 5, 2)), axis=(0, 1))
        pred[rng.random(gt.shape) < 0.03] = rng.integers(0, k + 1)
        gt[rng.random(gt.shape) < 0.03] = 255
        j, f = score_labels(gt[None], pred[None], k)
        for obj in range(1, k + 1):
            want = reference_jf(gt == obj, pred == obj, gt == 255)
            assert (j[obj - 1, 0], f[obj - 1, 0]) == pytest.approx(want, abs=1e-12)


def test_ground_truth_scores_exactly_one_against_itself():
    rng = np.random.default_rng(1)
    gt = np.kron(rng.integers(0, 4, (5, 6, 9)), np.ones((1, 80, 95), dtype=np.int64))[:, :, :854].astype(np.uint8)
    gt[:, 200:210] = 255
    pred = np.where(gt == 255, 0, gt).astype(np.uint8)  # what a prediction can be where the truth is void
    j, f = score_labels(gt, pred, 3)
    assert (j == 1.0).all() and (f == 1.0).all()


# ----------------------------------------------------------------------------- statistics and tables


def test_mean_recall_and_decay_by_hand():
    values = np.array([[1.0, 1.0, 0.8, 0.6, 0.4, 0.4, 0.2, 0.0]])
    mean, recall, decay = statistics(values)
    # Quarter bounds round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 5, 7]: the first bin is frames
    # 0..2, the last 5..7.
    assert mean[0] == pytest.approx(0.55)
    assert recall[0] == pytest.approx(0.5)  # 1, 1, 0.8, 0.6 are above 0.5
    assert decay[0] == pytest.approx((1 + 1 + 0.8) / 3 - (0.4 + 0.2 + 0.0) / 3)
    assert statistics(np.array([[0.7]]))[2][0] == 0.0


def test_tables_weigh_every_object_equally():
    a = SequenceScores("a", j=np.array([[1.0, 1.0], [0.0, 0.0]]), f=np.array([[1.0, 1.0], [1.0, 1.0]]))
    b = SequenceScores("b", j=np.array([[1.0, 1.0]]), f=np.array([[0.5, 0.5]]))
    row, per_object = davis_tables([a, b])
    j_mean, f_mean = 2 / 3, 2.5 / 3  # a sequence-weighted mean would give J 0.75
    assert row == pytest.approx([(j_mean + f_mean) / 2, j_mean, 2 / 3, 0.0, f_mean, 2 / 3, 0.0])
    assert per_object == [("a_1", 1.0, 1.0), ("a_2", 0.0, 1.0), ("b_1", 1.0, 0.5)]


# ----------------------------------------------------------------------------- layouts


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    cfg = SyntheticConfig(height=48, width=64, frames=6, num_objects=2, first_frame_objects=True, speed=1.0)
    write_davis(generate_set(cfg, 2, seed=3), root)
    return root


@pytest.fixture
def davis_copy(synthetic_root, tmp_path):
    return shutil.copytree(synthetic_root, tmp_path / "DAVIS")


def test_reader_on_the_synthetic_layout(synthetic_root):
    sequences = davis_sequences(synthetic_root)
    assert [s.name for s in sequences] == ["synth0000", "synth0001"]
    assert all(len(s.frames) == 6 and len(s.annotations) == 6 and s.size == (48, 64) for s in sequences)
    assert [s.name for s in davis_sequences(synthetic_root, sequences=["synth0001"])] == ["synth0001"]


def test_no_imagesets_is_named(davis_copy):
    shutil.rmtree(davis_copy / "ImageSets")
    with pytest.raises(FileNotFoundError, match=r"ImageSets/2017/val\.txt: missing"):
        davis_sequences(davis_copy)
    assert len(davis_sequences(davis_copy, sequences=["synth0000"])) == 1  # named sequences need no list


def test_a_missing_frame_is_named(davis_copy):
    (davis_copy / "JPEGImages/480p/synth0000/00003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"synth0000/00003\.jpg: missing frame"):
        davis_sequences(davis_copy)


def test_an_annotation_without_its_frame_is_named(davis_copy):
    (davis_copy / "JPEGImages/480p/synth0001/00005.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"synth0001/00005\.jpg: missing frame .*00005\.png annotates it"):
        davis_sequences(davis_copy)


def test_a_missing_first_annotation_is_named(davis_copy):
    (davis_copy / "Annotations/480p/synth0000/00000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"synth0000/00000\.png: missing first-frame annotation"):
        davis_sequences(davis_copy)


def test_a_mask_of_another_size_is_named(davis_copy):
    save_indexed_png(davis_copy / "Annotations/480p/synth0001/00002.png", np.zeros((48, 60), np.uint8))
    with pytest.raises(ValueError, match=r"synth0001/00002\.png: mask is 60x48 but the frames .* are 64x48"):
        davis_sequences(davis_copy)


def ground_truth_as_results(root, out):
    """The annotations copied into the results layout: a perfect prediction."""
    shutil.copytree(root / "Annotations" / "480p", out)
    return out


def test_bad_results_are_named(synthetic_root, tmp_path):
    results = ground_truth_as_results(synthetic_root, tmp_path / "results")
    seq = davis_sequences(synthetic_root, sequences=["synth0000"])[0]
    assert (score_sequence(seq, results).j == 1).all()

    mask = read_mask(results / "synth0000/00002.png")
    mask[0, 0] = 7
    save_indexed_png(results / "synth0000/00002.png", mask)
    with pytest.raises(ValueError, match=r"synth0000/00002\.png: object id 7 is not in the first frame's annotation"):
        score_sequence(seq, results)

    save_indexed_png(results / "synth0000/00002.png", np.zeros((24, 64), np.uint8))
    with pytest.raises(ValueError, match=r"00002\.png: result mask is 64x24 but the frames of synth0000 are 64x48"):
        score_sequence(seq, results)

    (results / "synth0000/00002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"synth0000/00002\.png: missing result frame"):
        score_sequence(seq, results)


# ----------------------------------------------------------------------------- the command


def test_evaluate_suites_are_registered():
    assert "davis" in available_suites() and set(available_suites()) <= set(SUITES)
    with pytest.raises(SystemExit):
        main(["evaluate", "davis", "--help"])


def test_evaluate_davis_propagates_scores_and_resumes(synthetic_root, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["evaluate", "davis", "--root", str(synthetic_root), "--checkpoint", "pixels", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Global results for val" in printed and "synth0001_2" in printed
    for seq in ("synth0000", "synth0001"):
        pngs = sorted(p.name for p in (out / seq).iterdir())
        assert pngs == [f"{t:05d}.png" for t in range(6)]  # every frame, nothing half-written left over
        with Image.open(out / seq / "00003.png") as image:
            assert image.mode == "P"
            assert set(np.unique(np.asarray(image))) <= {0, 1, 2}
    lines = (out / "global_results-val.csv").read_text().splitlines()
    assert lines[0] == ",".join(GLOBAL_COLUMNS) and len(lines) == 2
    values = [float(v) for v in lines[1].split(",")]
    assert values[0] == pytest.approx((values[1] + values[4]) / 2, abs=1e-3)  # J&F is the mean of J and F
    assert all(0 <= v <= 1 for v in values[:3] + values[4:6])
    per_sequence = (out / "per-sequence_results-val.csv").read_text().splitlines()
    assert per_sequence[0] == "Sequence,J-Mean,F-Mean"
    assert [line.split(",")[0] for line in per_sequence[1:]] == ["synth0000_1", "synth0000_2",
                                                                  "synth0001_1", "synth0001_2"]

    # Resume: complete sequences are left alone, an incomplete one is propagated again.
    kept = (out / "synth0000" / "00004.png").stat().st_mtime_ns
    (out / "synth0001" / "00004.png").unlink()
    assert main(args) == 0
    assert "propagated 1 sequences" in capsys.readouterr().out
    assert (out / "synth0000" / "00004.png").stat().st_mtime_ns == kept
    assert (out / "synth0001" / "00004.png").is_file()
    assert (out / "global_results-val.csv").read_text().splitlines()[1] == lines[1]


def test_evaluate_davis_results_dir_and_errors(synthetic_root, tmp_path, capsys):
    results = ground_truth_as_results(synthetic_root, tmp_path / "results")
    out = tmp_path / "scores"
    assert main(["evaluate", "davis", "--root", str(synthetic_root), "--results-dir", str(results),
                 "--out", str(out)]) == 0
    assert (out / "global_results-val.csv").read_text().splitlines()[1] == \
        "1.000,1.000,1.000,0.000,1.000,1.000,0.000"
    capsys.readouterr()

    assert main(["evaluate", "davis", "--root", str(synthetic_root), "--split", "train", "--out", str(out),
                 "--checkpoint", "pixels"]) == 1
    assert "ImageSets/2017/train.txt: missing" in capsys.readouterr().err
    assert main(["evaluate", "davis", "--root", str(synthetic_root), "--out", str(out)]) == 1
    assert "--checkpoint is needed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the sample data


def test_davis_2016_sample_scores_its_ground_truth_as_one(tmp_path):
    root = shared_data("davis-sample")
    sequences = davis_sequences(root, year="2016")
    assert [s.name for s in sequences] == ["blackswan", "bmx-trees", "car-shadow", "dance-twirl"]
    assert [len(s.frames) for s in sequences] == [50, 80, 40, 90] and sequences[0].size == (480, 854)
    results = ground_truth_as_results(root, tmp_path / "results")  # grey 0/255 PNGs, the 2016 convention
    row, per_object = davis_tables([score_sequence(seq, results, "2016") for seq in sequences])
    assert row == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert [name for name, *_ in per_object] == ["blackswan_1", "bmx-trees_1", "car-shadow_1", "dance-twirl_1"]


def test_davis_2016_sample_end_to_end(tmp_path, capsys):
    """Real frames through the whole command: the first 6 frames of blackswan, with the
    raw-pixel baseline, which follows a slow swan on a calm lake closely."""
    sample = shared_data("davis-sample")
    root = tmp_path / "DAVIS"
    for kind, suffix in (("JPEGImages", "jpg"), ("Annotations", "png")):
        folder = root / kind / "480p" / "blackswan"
        folder.mkdir(parents=True)
        for t in range(6):
            (folder / f"{t:05d}.{suffix}").symlink_to(sample / kind / "480p" / "blackswan" / f"{t:05d}.{suffix}")
    out = tmp_path / "out"
    assert main(["evaluate", "davis", "--root", str(root), "--year", "2016", "--sequences", "blackswan",
                 "--checkpoint", "pixels", "--out", str(out)]) == 0
    assert "blackswan_1" in capsys.readouterr().out
    j_and_f, j_mean = (float(v) for v in (out / "global_results-val.csv").read_text().splitlines()[1].split(",")[:2])
    assert j_mean > 0.8 and j_and_f > 0.8


def test_davis_2017_multiobject_sample_propagates(tmp_path, capsys):
    root = shared_data("davis2017-multiobject-sample")
    out = tmp_path / "out"
    assert main(["evaluate", "davis", "--root", str(root), "--checkpoint", "pixels", "--out", str(out)]) == 1
    assert "ImageSets/2017/val.txt: missing" in capsys.readouterr().err  # the sample has no ImageSets

    assert main(["evaluate", "davis", "--root", str(root), "--sequences", "bmx-trees", "--checkpoint", "pixels",
                 "--out", str(out)]) == 0
    assert "not scored" in capsys.readouterr().out  # ground truth for the first frame only
    masks = [read_mask(out / "bmx-trees" / f"{t:05d}.png") for t in range(4)]
    assert all(m.shape == (480, 854) for m in masks)
    np.testing.assert_array_equal(masks[0], read_mask(root / "Annotations" / "bmx-trees" / "00000.png"))
    assert {1, 2} <= set(np.unique(masks[3]))  # both objects carried to the last frame
