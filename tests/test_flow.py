"""Optical flow: the Sintel-style reader, end-point error over all / valid / non-occluded
pixels, nearest-neighbour flow from features, and ``timecycle evaluate flow`` end to end."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import shared_data
from PIL import Image

from timecycle.cli import main
from timecycle.data.datasets import (
    FLO_MAGIC,
    read_flo,
    read_rgb,
    sintel_pairs,
    write_flo,
)
from timecycle.data.synthetic import SyntheticConfig, generate_clip, write_sintel
from timecycle.evaluate.flow import epe_totals, mean_epe, predict_flow
from timecycle.model.checkpoints import load_model


def _writable_copy(source, target):
    """The shared sample is read-only, and a plain copy keeps it so."""
    shutil.copytree(source, target, copy_function=shutil.copyfile)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def test_epe_by_hand():
    gt = np.zeros((1, 3, 2))
    pred = np.array([[[0, 0], [3, 4], [1, 0]]], dtype=np.float32)  # errors 0, 5, 1
    invalid = np.array([[False, True, False]])
    occluded = np.array([[False, False, True]])
    totals = epe_totals(pred, gt, invalid, occluded)
    assert totals == {"all": (6.0, 3), "valid": (1.0, 2), "noc": (0.0, 1)}
    assert mean_epe(totals) == {"all": 2.0, "valid": 0.5, "noc": 0.0}
    assert mean_epe(epe_totals(pred, gt)) == pytest.approx({"all": 2.0, "valid": 2.0, "noc": np.nan}, nan_ok=True)


def test_every_pixel_occluded_leaves_noc_undefined_not_zero():
    gt = np.ones((2, 2, 2))
    totals = epe_totals(gt + 1, gt, occluded=np.ones((2, 2), dtype=bool))
    assert totals["noc"] == (0.0, 0)
    assert np.isnan(mean_epe(totals)["noc"]) and mean_epe(totals)["valid"] == pytest.approx(np.sqrt(2))


def test_truth_against_itself_and_size_mismatch():
    flow = read_flo(shared_data("sintel-sample", "flow", "alley_1", "frame_0002.flo"))
    assert flow.shape == (436, 1024, 2)
    masks = np.zeros(flow.shape[:2], dtype=bool), np.ones(flow.shape[:2], dtype=bool)
    assert mean_epe(epe_totals(flow, flow, *masks)) == pytest.approx(
        {"all": 0.0, "valid": 0.0, "noc": np.nan}, nan_ok=True)
    with pytest.raises(ValueError, match="differ in size"):
        epe_totals(flow[1:], flow)


def test_flo_files_with_a_wrong_magic_number_or_size_are_named(tmp_path):
    flow = np.arange(24, dtype=np.float32).reshape(3, 4, 2)
    write_flo(tmp_path / "a.flo", flow)
    assert np.array_equal(read_flo(tmp_path / "a.flo"), flow)
    data = bytearray((tmp_path / "a.flo").read_bytes())
    assert np.frombuffer(bytes(data[:4]), "<f4")[0] == np.float32(FLO_MAGIC)
    (tmp_path / "magic.flo").write_bytes(np.float32(1.0).tobytes() + bytes(data[4:]))
    with pytest.raises(ValueError, match=r"magic\.flo: not a \.flo file \(magic number"):
        read_flo(tmp_path / "magic.flo")
    (tmp_path / "short.flo").write_bytes(bytes(data[:-4]))
    with pytest.raises(ValueError, match=r"short\.flo: \.flo file truncated"):
        read_flo(tmp_path / "short.flo")


def test_sample_pairs_and_missing_frames(tmp_path):
    root = shared_data("sintel-sample")
    pair, = sintel_pairs(root, "final")
    assert (pair.scene, pair.name) == ("alley_1", "frame_0002")
    assert [p.name for p in pair.frames] == ["frame_0002.png", "frame_0003.png"]
    assert pair.frames[0].parent.parent.name == "final"
    assert pair.occlusions is not None and pair.invalid is not None

    clip = generate_clip(SyntheticConfig(height=24, width=32, frames=3, num_objects=1), seed=0, name="s")
    write_sintel([clip], tmp_path / "training")
    pairs = sintel_pairs(tmp_path)  # finds training/ inside
    assert [p.name for p in pairs] == ["frame_0001", "frame_0002"]
    assert pairs[0].invalid is None and pairs[0].occlusions is not None
    (tmp_path / "training" / "clean" / "s" / "frame_0003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"clean/s/frame_0003\.png: missing frame of the pair"):
        sintel_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="no <scene>/frame_NNNN.flo ground truth"):
        sintel_pairs(tmp_path / "training" / "clean")


def test_features_give_zero_flow_on_a_still_pair_and_the_shift_of_a_moved_one():
    frame = read_rgb(shared_data("sintel-sample", "clean", "alley_1", "frame_0002.png"))[:160, :256]
    model = load_model("random-resnet18")
    still = predict_flow(frame, frame, model)
    assert still.shape == (160, 256, 2)
    assert np.abs(still[4:-4, 4:-4]).max() == 0  # within half a cell of the edge a pixel takes the edge cell's match
    moved = predict_flow(frame, np.roll(frame, 16, axis=1), model)
    assert np.median(moved[..., 0]) == 16 and np.median(moved[..., 1]) == 0
    # Another protocol (a larger input, nearest-neighbour label resizing, a window on the
    # first frame) matches the same way: the coordinates are carried through unchanged.
    assert np.abs(predict_flow(frame, frame, model, "dino")[4:-4, 4:-4]).max() < 1e-3


def test_command_on_the_sample_with_resume_and_scoring_of_given_results(tmp_path, capsys):
    root, out = shared_data("sintel-sample"), tmp_path / "run"
    args = ["evaluate", "flow", "--root", str(root), "--out", str(out)]
    assert main([*args, "--checkpoint", "pixels"]) == 0
    assert read_flo(out / "alley_1" / "frame_0002.flo").shape == (436, 1024, 2)
    table = (out / "flow_epe.csv").read_text().splitlines()
    assert table[0] == "scene,frame,EPE all,EPE valid,EPE noc"
    assert table[1].startswith("alley_1,frame_0002,") and table[2].startswith("all,1 pairs,")
    assert all(float(v) > 0 for v in table[2].split(",")[2:])

    assert main(args) == 0  # resumed: no model needed
    assert "resuming: 1 of 1 pairs" in capsys.readouterr().out

    given = _writable_copy(root / "flow", tmp_path / "given")
    assert main([*args, "--results-dir", str(given)]) == 0
    assert (out / "flow_epe.csv").read_text().splitlines()[2] == "all,1 pairs,0.000,0.000,0.000"

    write_flo(given / "alley_1" / "frame_0002.flo", np.zeros((436, 1000, 2), np.float32))
    assert main([*args, "--results-dir", str(given)]) == 1
    assert "frame_0002.flo: is 1000x436, the ground truth" in capsys.readouterr().err

    Image.new("L", (10, 10)).save(tmp_path / "occ.png")
    masks = _writable_copy(root, tmp_path / "masks")
    shutil.copy(tmp_path / "occ.png", masks / "occlusions" / "alley_1" / "frame_0002.png")
    assert main(["evaluate", "flow", "--root", str(masks), "--out", str(out), "--results-dir", str(out)]) == 1
    assert "occlusions/alley_1/frame_0002.png: is 10x10, the flow is 1024x436" in capsys.readouterr().err
