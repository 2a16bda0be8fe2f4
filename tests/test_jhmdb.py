"""JHMDB: the reader of the official layout, PCK as the standard evaluation defines it,
and the ``timecycle evaluate jhmdb`` command end to end on the sample video."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import shared_data
from scipy.io import savemat

from timecycle.cli import main
from timecycle.data.datasets import (
    jhmdb_frames,
    jhmdb_split,
    read_jhmdb_joints,
    read_rgb,
)
from timecycle.data.synthetic import SyntheticConfig, generate_clip, write_jhmdb
from timecycle.evaluate.jhmdb import joint_heatmaps, pck_hits, pck_table, predict_video
from timecycle.model.checkpoints import load_model

SAMPLE = "catch/Goal_Keeping_Tips_catch_f_cm_np1_fr_med_2"


def test_pck_by_hand():
    # Frame 1's joints span a 3x4 box: diagonal 5, reference 0.6 * 5 = 3 px, so the
    # thresholds 0.1..0.5 admit 0.3, 0.6, 0.9, 1.2 and 1.5 px.
    gt = np.array([[[9, 9], [9, 9], [9, 9]], [[0, 0], [3, 0], [0, 4]]], dtype=float)  # (T=2, J=3, 2)
    pred = np.array([[[50, 50]] * 3, [[0, 0], [3, 1], [np.nan, 4]]], dtype=float)  # frame 0 is never scored
    hits = pck_hits(pred, gt)
    assert hits.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    table = pck_table(hits, frames=1)
    assert table[:, :3].tolist() == (100.0 * hits).tolist()
    assert np.allclose(table[:, 3], [100 / 3, 100 / 3, 100 / 3, 200 / 3, 200 / 3])  # mean over joints


def test_pck_pools_frames_per_joint_before_averaging_joints():
    gt = np.zeros((3, 2, 2))
    gt[:, 1] = [10, 0]  # diagonal 10: reference 6 px, thresholds 0.6 .. 3 px
    pred = gt.copy()
    pred[1, 0] += [2, 0]  # joint 0 misses at 0.1..0.3 in frame 1, hits in frame 2
    table = pck_table(pck_hits(pred, gt), frames=2)
    assert table[0].tolist() == [50.0, 100.0, 75.0]


def test_a_zero_size_box_admits_exact_hits_only():
    gt = np.full((2, 15, 2), 7.0)
    pred = gt.copy()
    assert pck_hits(pred, gt).min() == 1
    pred[1, 0, 0] += 0.01
    assert pck_hits(pred, gt)[:, 0].max() == 0
    assert pck_hits(pred, gt)[:, 1:].min() == 1


def test_pck_needs_scored_frames_and_matching_shapes():
    with pytest.raises(ValueError, match="no frames to score"):
        pck_table(np.zeros((5, 15)), frames=0)
    with pytest.raises(ValueError, match=r"must both be \(T, J, 2\)"):
        pck_hits(np.zeros((3, 15, 2)), np.zeros((4, 15, 2)))


def test_sample_ground_truth_is_0_based_and_scores_perfectly_against_itself():
    gt = read_jhmdb_joints(shared_data("jhmdb-sample", "joint_positions", SAMPLE, "joint_positions.mat"))
    assert gt.shape == (40, 15, 2)
    assert gt[0, 0].tolist() == [285.5, 105.5]  # pos_img holds 286.5, 106.5 (MATLAB, 1-based)
    assert pck_table(pck_hits(gt, gt), len(gt) - 1).min() == 100.0
    still = np.repeat(gt[:1], len(gt), axis=0)  # the person moves: standing still must not score
    assert pck_table(pck_hits(still, gt), len(gt) - 1)[:, -1].max() < 10


def test_one_frame_mat_and_bad_mat_files(tmp_path):
    savemat(tmp_path / "one.mat", {"pos_img": np.ones((2, 15))})  # MATLAB drops the trailing 1
    assert read_jhmdb_joints(tmp_path / "one.mat").shape == (1, 15, 2)
    assert read_jhmdb_joints(tmp_path / "one.mat").max() == 0
    savemat(tmp_path / "short.mat", {"pos_img": np.ones((2, 14, 3))})
    with pytest.raises(ValueError, match=r"short\.mat: pos_img must be \(2, 15, T\)"):
        read_jhmdb_joints(tmp_path / "short.mat")
    savemat(tmp_path / "other.mat", {"pos_world": np.ones((2, 15, 3))})
    with pytest.raises(ValueError, match=r"other\.mat: no 'pos_img' entry \(keys: pos_world\)"):
        read_jhmdb_joints(tmp_path / "other.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.mat: not a readable \.mat file"):
        read_jhmdb_joints(tmp_path / "junk.mat")
    with pytest.raises(FileNotFoundError, match=r"gone\.mat: missing joint positions"):
        read_jhmdb_joints(tmp_path / "gone.mat")


def test_official_split_files(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "catch_test_split1.txt").write_text("a_catch_f.avi 1 \nb_catch_f.avi 2 \n\n")
    (splits / "kick_ball_test_split1.txt").write_text("c.avi 2\nd.avi 1\n")
    (splits / "catch_test_split2.txt").write_text("a_catch_f.avi 2\n")
    assert jhmdb_split(tmp_path, 1) == ["catch/b_catch_f", "kick_ball/c"]
    assert jhmdb_split(tmp_path, 2) == ["catch/a_catch_f"]
    with pytest.raises(FileNotFoundError, match=r"splits: no <class>_test_split3\.txt files"):
        jhmdb_split(tmp_path, 3)
    (splits / "catch_test_split2.txt").write_text("a_catch_f.avi test\n")
    with pytest.raises(ValueError, match=r"catch_test_split2\.txt:1: expected"):
        jhmdb_split(tmp_path, 2)


def test_missing_frames_are_named(tmp_path):
    clip = generate_clip(SyntheticConfig(height=32, width=40, frames=4, num_objects=3), seed=1, name="v")
    write_jhmdb([clip], tmp_path, action="wave")
    assert len(jhmdb_frames(tmp_path, "wave/v", 4)) == 4
    assert len(jhmdb_frames(tmp_path, "wave/v", 3)) == 3  # frames past the annotation are left out
    (tmp_path / "Rename_Images" / "wave" / "v" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"v/00003\.png: missing frame"):
        jhmdb_frames(tmp_path, "wave/v", 4)
    with pytest.raises(FileNotFoundError, match=r"Rename_Images/wave/w: no frame folder"):
        jhmdb_frames(tmp_path, "wave/w", 4)


def test_heatmaps_are_round_on_the_feature_grid():
    maps = joint_heatmaps(np.array([[10.0, 5.0]]), 12, 20, sigma=(4.0, 3.0))
    assert maps.shape == (2, 12, 20)
    assert maps[0, 5, 10] == 1.0 and maps[1, 5, 10] == 0.0
    assert np.isclose(maps[0, 5, 14], np.exp(-0.5)) and np.isclose(maps[0, 8, 10], np.exp(-0.5))
    assert np.allclose(maps.sum(0)[maps[0] < 0.5], 1.0)  # background takes the rest


def test_joints_stay_put_in_a_still_video():
    root = shared_data("jhmdb-sample")
    gt = read_jhmdb_joints(root / "joint_positions" / SAMPLE / "joint_positions.mat")
    frame = read_rgb(jhmdb_frames(root, SAMPLE, 1)[0])
    predicted = predict_video(np.stack([frame] * 3), gt[0], load_model("random-resnet18"))
    assert predicted.shape == (3, 15, 2)
    assert np.array_equal(predicted[0], gt[0])
    assert np.abs(predicted[1:] - gt[0]).max() < 4  # half a cell, at stride 8 on the 320x320 input


def test_command_on_the_sample_with_resume_and_scoring_of_given_results(tmp_path, capsys):
    root = shared_data("jhmdb-sample")
    out = tmp_path / "run"
    args = ["evaluate", "jhmdb", "--root", str(root), "--list", str(root / "testlist.txt"), "--out", str(out)]
    assert main([*args, "--checkpoint", "pixels"]) == 0
    predicted = np.load(out / f"{SAMPLE}.npy")
    assert predicted.shape == (40, 15, 2)
    table = (out / "jhmdb_pck.csv").read_text().splitlines()
    assert table[0] == "joint,PCK@0.1,PCK@0.2,PCK@0.3,PCK@0.4,PCK@0.5"
    assert len(table) == 17 and table[-1].startswith("mean,")
    assert "39 scored frames" in capsys.readouterr().out

    # Resume: nothing left to predict, so no model is needed, and the figures repeat.
    first = table
    assert main(args) == 0
    assert "resuming: 1 of 1 videos" in capsys.readouterr().out
    assert (out / "jhmdb_pck.csv").read_text().splitlines() == first

    # The ground truth given as results scores 100 everywhere.
    given = tmp_path / "given"
    (given / "catch").mkdir(parents=True)
    np.save(given / f"{SAMPLE}.npy", read_jhmdb_joints(root / "joint_positions" / SAMPLE / "joint_positions.mat"))
    assert main([*args, "--results-dir", str(given)]) == 0
    rows = [line.split(",") for line in (out / "jhmdb_pck.csv").read_text().splitlines()[1:]]
    assert {value for row in rows for value in row[1:]} == {"100.000"}

    np.save(given / f"{SAMPLE}.npy", np.zeros((39, 15, 2)))
    assert main([*args, "--results-dir", str(given)]) == 1
    assert "predictions are (39, 15, 2), the ground truth" in capsys.readouterr().err
    (given / f"{SAMPLE}.npy").write_bytes(b"not an array")
    assert main([*args, "--results-dir", str(given)]) == 1
    assert f"{SAMPLE}.npy: not a readable .npy file" in capsys.readouterr().err


def test_command_names_a_missing_mat_file(tmp_path, capsys):
    root = tmp_path / "JHMDB"
    shutil.copytree(shared_data("jhmdb-sample", "Rename_Images"), root / "Rename_Images")
    (root / "list.txt").write_text(f"{SAMPLE}\n")
    code = main(["evaluate", "jhmdb", "--root", str(root), "--list", str(root / "list.txt"),
                 "--out", str(tmp_path / "out"), "--checkpoint", "pixels"])
    assert code == 1
    assert "joint_positions.mat: missing joint positions" in capsys.readouterr().err
