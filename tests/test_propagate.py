"""Label propagation: the engine against a plain dense implementation, on videos whose
correct answer is known, and the public entry point end to end."""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from timecycle.model.encoder import Encoder
from timecycle.propagate import (
    _RUN,
    PRESETS,
    InputSize,
    PropagationConfig,
    _code_dims,
    _Coder,
    _Geometry,
    _Propagator,
    one_hot,
    preset,
    propagate,
    propagate_features,
    resolve_config,
    to_mask,
    to_points,
)
from timecycle.video import VideoError

propagate_module = importlib.import_module("timecycle.propagate")  # the package's `propagate` is the function


def dense_reference(feats: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig) -> list[torch.Tensor]:
    """Propagation as the protocol states it, in float64: the full affinity of each frame
    against its whole context, masked, top-k, softmax. (T, C, h, w) -> T-1 maps (K, h, w)."""
    frames, _, h, w = feats.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy = ys.flatten()[:, None] - ys.flatten()[None, :]  # (hw queries, hw keys)
    dx = xs.flatten()[:, None] - xs.flatten()[None, :]
    everywhere = torch.ones(h * w, h * w, dtype=torch.bool)
    if cfg.radius is None:
        near = everywhere
    elif cfg.radius_shape == "circle":
        near = dy ** 2 + dx ** 2 <= cfg.radius ** 2
    else:
        near = torch.maximum(dy.abs(), dx.abs()) <= cfg.radius

    labels = [first_labels.double()]
    for t in range(1, frames):
        context = [0] + list(range(max(1, t - cfg.context), t))
        query = feats[t].flatten(1).T.double()  # (hw, C)
        keys = torch.stack([feats[c].flatten(1).T for c in context]).double()  # (F, hw, C)
        key_labels = torch.stack([labels[c].flatten(1).T for c in context])  # (F, hw, K)
        scores = torch.einsum("qc,fkc->qfk", query, keys) / cfg.temperature  # (hw, F, hw)
        usable = torch.stack([everywhere if c == 0 and not cfg.radius_on_first else near for c in context], 1)
        scores = scores.masked_fill(~usable, -math.inf)
        if cfg.softmax == "frame":
            scores = scores.log_softmax(dim=2)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        if cfg.top_k_per_frame:
            keep.scatter_(2, scores.topk(min(cfg.top_k, h * w), dim=2).indices, True)
        else:
            flat = scores.reshape(h * w, -1)
            keep.view(h * w, -1).scatter_(1, flat.topk(min(cfg.top_k, flat.shape[1]), dim=1).indices, True)
        kept = scores.masked_fill(~keep, -math.inf)
        if cfg.softmax == "kept":
            weights = kept.reshape(h * w, -1).softmax(dim=1).view_as(kept)
        else:
            weights = kept.exp() / len(context)
        pred = torch.einsum("qfk,fkl->lq", weights, key_labels).reshape(-1, h, w)
        if cfg.minmax:
            low, high = pred.amin((1, 2), keepdim=True), pred.amax((1, 2), keepdim=True)
            pred = torch.where(high > low, (pred - low) / (high - low), 0.0)
        labels.append(pred)
    return labels[1:]


def random_features(frames: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Signed random unit features: their scores are spread out, so no two keys tie for
    the k-th place within float32 rounding. (With all-positive features, as post-ReLU
    encoders give, near-ties are common and float32 and float64 may keep different keys.)"""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(frames, channels, h, w, generator=g), dim=1)


def run(feats: torch.Tensor, labels: torch.Tensor, cfg: PropagationConfig) -> list[torch.Tensor]:
    return list(propagate_features(feats, labels, cfg))


# ----------------------------------------------------------------------------- engine vs. dense reference

# (radius, shape, on first frame): none, circles and squares of integer and fractional
# radius, on and off the first frame, and one reaching past the whole grid.
WINDOWS = [(None, "circle", False), (2.5, "circle", False), (2.5, "circle", True),
           (3.0, "square", False), (1.0, "square", True), (20.0, "circle", False)]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"r{w[0]}-{w[1]}-{'first' if w[2] else 'nofirst'}")
@pytest.mark.parametrize("per_frame", [False, True], ids=["joint", "perframe"])
@pytest.mark.parametrize("softmax", ["kept", "frame"])
@pytest.mark.parametrize("context", [0, 3])
def test_engine_equals_dense_reference(window, per_frame, softmax, context):
    radius, shape, on_first = window
    # 11 x 13 cells: four tiles, three of them partial; 8 frames: the ring of 3 wraps.
    feats = random_features(8, 8, 11, 13, seed=context)
    first = torch.rand(3, 11, 13, generator=torch.Generator().manual_seed(1))
    for minmax in (False, True):
        cfg = PropagationConfig(context=context, temperature=0.1, top_k=4, top_k_per_frame=per_frame,
                                softmax=softmax, radius=radius, radius_shape=shape,
                                radius_on_first=on_first, minmax=minmax)
        got, want = run(feats, first, cfg), dense_reference(feats, first, cfg)
        assert len(got) == len(want) == 7
        for t, (g, r) in enumerate(zip(got, want), start=1):
            assert g.shape == (3, 11, 13)
            torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=0, msg=f"frame {t}, {cfg}")


def preset_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Features and first labels on a 20 x 26 grid over 24 frames: with each protocol's
    own settings (radius 12, contexts of 7 and 20), the radius cuts, the contexts fill
    and the ring wraps."""
    feats = random_features(24, 6, 20, 26, seed=3)
    return feats, torch.from_numpy(one_hot(np.random.default_rng(0).integers(0, 3, (20, 26)))[0])


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_equal_dense_reference(name, device):
    feats, first = preset_case()
    cfg = preset(name)
    got = propagate_features(feats.to(device), first.to(device), cfg)
    for t, (g, r) in enumerate(zip(got, dense_reference(feats, first, cfg)), start=1):
        assert g.device.type == device
        torch.testing.assert_close(g.cpu().double(), r, atol=1e-5, rtol=0, msg=f"frame {t}")


@pytest.mark.parametrize("budget", [1, 2 ** 40], ids=["tile-by-tile", "all-tiles"])
def test_the_float32_path_equals_dense_reference(monkeypatch, budget):
    """What a GPU runs for every preset, and the CPU for TimeCycle's: every key scored
    in float32, the tiles in batches of one and all in one batch."""
    monkeypatch.setattr(propagate_module, "_shortlists", lambda cfg, device: False)
    monkeypatch.setattr(propagate_module, "_BATCH_BYTES", {"cpu": budget, "accelerator": budget})
    feats, first = preset_case()
    for name in PRESETS:
        cfg = preset(name)
        engine = _Propagator(feats[0], first, cfg)
        assert not engine.shortlist and len(engine.origins) == 8  # 2 x 4 tiles
        assert engine.batch == 1 if budget == 1 else engine.batch >= 8
        for t, (g, r) in enumerate(zip(run(feats, first, cfg), dense_reference(feats, first, cfg)), start=1):
            torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=0, msg=f"{name}, frame {t}")


def test_more_kept_keys_than_the_window_holds():
    """top-k beyond the usable keys: the unusable ones weigh nothing."""
    feats = random_features(4, 8, 9, 10)
    first = torch.rand(2, 9, 10)
    for per_frame in (False, True):
        cfg = PropagationConfig(context=2, top_k=50, top_k_per_frame=per_frame, radius=1.0, radius_on_first=True)
        for g, r in zip(run(feats, first, cfg), dense_reference(feats, first, cfg)):
            torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the bfloat16 shortlist


def test_the_presets_run_the_shortlist_and_it_is_short(monkeypatch):
    """CRW, DINO and VFS shortlist keys on the CPU (TimeCycle's per-frame softmax needs
    every score); on smooth features, where neighbouring queries match neighbouring
    keys as in real videos, few keys are scored exactly."""
    for name in PRESETS:
        engine = _Propagator(random_features(1, 8, 9, 10)[0], torch.rand(2, 9, 10), preset(name))
        assert engine.shortlist == (name != "timecycle"), name
    kernels = importlib.import_module("timecycle.kernels")  # numba: only the CPU's tests need it
    scored = []
    shortlist = kernels.shortlist

    def counting(*args):
        scored.append(shortlist(*args))  # the (key, query) pairs scored exactly
        return scored[-1]

    monkeypatch.setattr(kernels, "shortlist", counting)
    g = torch.Generator().manual_seed(4)
    smooth = F.interpolate(torch.randn(6, 32, 4, 5, generator=g), size=(32, 40), mode="bilinear", align_corners=False)
    feats = F.normalize(smooth + 0.01 * torch.randn(smooth.shape, generator=g), dim=1)  # no two cells alike
    first = torch.rand(2, 32, 40, generator=torch.Generator().manual_seed(0))
    cfg = dataclasses.replace(preset("crw"), context=3)
    for got, want in zip(run(feats, first, cfg), dense_reference(feats, first, cfg)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # A query meets the first frame's 32 * 40 keys and 3 * 441 within reach in the ring
    # (fewer near the edges): 2603 at most. About 51 are scored.
    frames, queries = 5, 32 * 40
    per_query = sum(scored) / (frames * queries)
    assert 10 <= per_query < 0.05 * 2603, per_query


def test_the_shortlist_is_the_same_on_any_number_of_threads():
    """Tiles are shared out among torch's threads, each scored whole, in the same order
    on any number of them: the results are equal bit for bit, on post-ReLU features,
    whose near-ties would show any difference in what is kept; and torch's thread count
    is the caller's again afterwards."""
    g = torch.Generator().manual_seed(7)
    feats = F.normalize(torch.randn(5, 32, 20, 27, generator=g).relu() + 0.01, dim=1)
    first = torch.rand(3, 20, 27, generator=g)
    cfg = dataclasses.replace(preset("crw"), context=2, radius=4.0)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            outs.append(torch.stack(run(feats, first, cfg)))
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_propagations_on_two_threads_at_once():
    """Two propagations scoring their tiles at the same time, each on its own thread
    with two torch threads, give what one alone gives, and leave each thread the
    torch thread count it had."""
    g = torch.Generator().manual_seed(8)
    feats = F.normalize(torch.randn(4, 32, 20, 27, generator=g).relu() + 0.01, dim=1)
    first = torch.rand(2, 20, 27, generator=g)
    cfg = dataclasses.replace(preset("crw"), context=2, radius=4.0)
    alone = torch.stack(run(feats, first, cfg))
    start = threading.Barrier(2)

    def one(_) -> tuple[Tensor, int]:
        torch.set_num_threads(2)
        start.wait()
        out = torch.stack(run(feats, first, cfg))
        return out, torch.get_num_threads()

    threads = torch.get_num_threads()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(2)))
    assert torch.get_num_threads() == threads
    for out, count in results:
        assert torch.equal(out, alone) and count == 2


def test_an_error_in_a_tile_reaches_the_caller(monkeypatch):
    """A tile that fails, on whichever thread scored it, fails the frame in the caller,
    and the caller's torch thread count comes back."""
    kernels = importlib.import_module("timecycle.kernels")
    shortlist, calls = kernels.shortlist, []

    def failing(*args):
        calls.append(None)
        if len(calls) == 5:
            raise RuntimeError("tile failed")
        return shortlist(*args)

    monkeypatch.setattr(kernels, "shortlist", failing)
    g = torch.Generator().manual_seed(9)
    feats = F.normalize(torch.randn(3, 32, 20, 27, generator=g), dim=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="tile failed"):
            run(feats, torch.rand(2, 20, 27, generator=g), dataclasses.replace(preset("crw"), context=2, radius=4.0))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_select_keeps_the_best_of_what_the_bounds_let_through():
    """The compiled selection on a hand-made block of 2 runs of 2 keys (one row, one
    slot, no error terms): a run whose bound ties theta is searched, one at -inf is not
    even where its keys would win; a key whose bound falls short of theta is not
    scored; a query past the grid (theta inf) keeps nothing; a key not there scores
    -inf; the best come first, and of two equal scores the key met first stays."""
    kernels = importlib.import_module("timecycle.kernels")  # numba: only the CPU's tests need it
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (Q, C)
    feats = np.array([[1, 0], [0, 1], [1, 1], [0.5, 0]], dtype=np.float32)  # keys 0..3, two runs
    absent = np.array([0, 0, 0, -math.inf], dtype=np.float32)  # key 3 is not there
    approx = torch.tensor([[1.0, 0, 0], [0.0, 0, 0], [9.0, 0, 9], [9.0, 0, 9]]).bfloat16()  # (keys, Q)
    approx = approx.T[:, :, None].contiguous().view(torch.int16).numpy().view(np.uint16)  # a query at a time
    run_best = np.array([[0.5, 0, 0], [-math.inf, 0, 9]], dtype=np.float32)  # (runs, Q): the bounds, with no errors
    theta = np.array([0.5, math.inf, -3.0], dtype=np.float32)
    errors, weights = np.zeros((4, 3), np.float32), np.zeros((3, 3), np.float32)
    values, keys = np.full((3, 2), -math.inf), np.zeros((3, 2), np.int64)
    scored = kernels.select(q, feats, absent, approx, np.zeros((0, 3), np.float32), run_best,
                            errors[:2].reshape(2, 1, 1, 3), errors, weights, theta, 2, 1, 4, 1, 0, 0, 4, values, keys,
                            np.zeros((3, 3)), 0.0, 0.0)
    # Query 0: key 0 (bound 1 >= 0.5) only; key 1's bound 0 < 0.5, run 1 is out of reach.
    # Query 2: every key, scores 1, 1, 2 and -inf; keys 0 and 1 tie, and 0 came first.
    assert scored == 1 + 0 + 4
    np.testing.assert_array_equal(values, [[1, -math.inf], [-math.inf, -math.inf], [2, 1]])
    np.testing.assert_array_equal(keys[[0, 2]], [[0, 0], [2, 0]])
    # With no error terms a threshold is the k-th best score itself: query 2's rose to 1
    # once it had two; query 0's, with one, stays.
    np.testing.assert_array_equal(theta, [0.5, math.inf, 1.0])


def test_a_first_frame_key_wins_a_tie_with_a_ring_key():
    """Of two keys with equal scores, one in the first frame and one in the ring, the
    first frame's is kept, though the ring's frames are searched first (their best
    keys raise the threshold that rules out the first frame's)."""
    e = torch.eye(8)
    feats = torch.zeros(3, 8, 3, 4)
    feats[0] = ((e[2] + e[3]) / math.sqrt(2))[:, None, None]  # frame 0: every cell (e2 + e3) / sqrt 2 ...
    feats[0, :, 1, 1] = e[1]  # ... but A = (1, 1): e1, labelled 1
    feats[1] = e[4][:, None, None]
    feats[1, :, 1, 2] = e[2]  # frame 1, B = (1, 2): e2, whose best match in frame 0 is labelled 0
    feats[2] = e[4][:, None, None]
    feats[2, :, 1, 1] = (e[1] + e[2]) / math.sqrt(2)  # frame 2 at (1, 1): equal scores with A and with B
    labels = torch.zeros(2, 3, 4)
    labels[0] = 1
    labels[:, 1, 1] = torch.tensor([0.0, 1.0])
    cfg = dataclasses.replace(preset("crw"), context=1, top_k=1)
    first, second = run(feats, labels, cfg)
    assert first[0, 1, 2] == 1  # B took label 0, from frame 0's other cells
    assert second[:, 1, 1].tolist() == [0, 1]  # A's label: the first frame's key was kept


def test_the_threshold_by_hand():
    """y = v - (q . c + t) - e64 - e, theta = y - u |y| less slack (|theta| + 1), in
    float32; -inf for no k-th score becomes float32's lowest, and a query past the grid
    gets inf."""
    kernels = importlib.import_module("timecycle.kernels")
    terms = np.array([[0.25, 0.0], [0.125, 0.0], [0.5, 0.0]])  # e, e64, q . c + t for 2 queries
    # Query 0: y = 1 - 0.5 - 0.125 - 0.25 = 0.125; 0.125 - 0.5 * 0.125 = 0.0625; less 0.5 * 1.0625.
    assert kernels.threshold(1.0, terms, 0, 0.5, 0.5) == np.float32(0.0625 - 0.53125)
    assert kernels.threshold(-math.inf, terms, 1, 0.5, 0.5) == np.finfo(np.float32).min
    theta = np.zeros(2, np.float32)
    kernels.thresholds(np.array([1.0, 3.0]), terms, np.array([False, True]), 0.5, 0.5, theta)
    np.testing.assert_array_equal(theta, [np.float32(-0.46875), math.inf])


def test_select_raises_the_threshold_with_the_kth_best_score():
    """One query, k = 1, one run of 3 keys met in order: key 0 scores 0.5 exactly, which
    raises theta from -1 to 0.5 - 0.2 - 0.1 = 0.2 (q . c + t = 0.2, e = 0.1); key 1,
    whose bound 0.1875 falls short of that, is not scored, though it would score 2;
    key 2, whose bound is 0.25, is, and wins."""
    kernels = importlib.import_module("timecycle.kernels")
    q = np.array([[1.0, 0.0]])
    feats = np.array([[0.5, 0], [2, 0], [1, 0]], dtype=np.float32)
    absent = np.zeros(3, np.float32)
    approx = torch.tensor([[[1.0], [0.1875], [0.25]]]).bfloat16().view(torch.int16).numpy().view(np.uint16)
    run_best, theta = np.array([[1.0]], np.float32), np.array([-1.0], np.float32)
    errors, weights = np.zeros((3, 3), np.float32), np.zeros((3, 1), np.float32)
    values, keys = np.full((1, 1), -math.inf), np.zeros((1, 1), np.int64)
    terms = np.array([[0.1], [0.0], [0.2]])
    scored = kernels.select(q, feats, absent, approx, np.zeros((0, 1), np.float32), run_best,
                            errors[:1].reshape(1, 1, 1, 3), errors, weights, theta, 3, 1, 3, 1, 0, 0, 3, values, keys,
                            terms, 0.0, 0.0)
    assert scored == 2 and values[0, 0] == 1.0 and keys[0, 0] == 2
    assert theta[0] == np.float32(1.0 - 0.2 - 0.1)


def test_select_bounds_a_run_by_its_best_score_plus_its_weighted_errors():
    """One query, one run of one key whose best approximate score, 0.5, falls short of
    theta = 1: the run's errors (0.25, 0.5, 1) weighted by (1, 0.25, 0.125) lift its
    bound to 0.5 + 0.25 + 0.125 + 0.125 = 1, which reaches theta, and the key is scored;
    with the last weight halved the bound falls short and nothing is. The block is cell
    (1, 1) of 2 x 2 buffers, whose other runs' errors are 0: the run's are read where
    the block lies."""
    kernels = importlib.import_module("timecycle.kernels")
    approx = torch.tensor([[[0.5]]]).bfloat16().view(torch.int16).numpy().view(np.uint16)
    run_errors = np.zeros((2, 2, 1, 3), np.float32)  # (buffer columns, buffer rows, slots, 3)
    run_errors[1, 1, 0] = 0.25, 0.5, 1.0
    key_errors = run_errors.transpose(1, 0, 2, 3).reshape(4, 3).copy()  # the one key's are its run's
    feats = np.zeros((4, 1), np.float32)
    feats[3] = 3.0  # the key at (1, 1)
    for last, expected in [(0.125, 1), (0.0625, 0)]:
        weights = np.array([[1.0], [0.25], [last]], np.float32)
        values, keys = np.full((1, 1), -math.inf), np.zeros((1, 1), np.int64)
        scored = kernels.select(np.ones((1, 1)), feats, np.zeros(4, np.float32), approx,
                                np.zeros((0, 1), np.float32), np.array([[0.5]], np.float32), run_errors, key_errors,
                                weights, np.array([1.0], np.float32), 1, 1, 1, 1, 1, 1, 2, values, keys,
                                np.zeros((3, 1)), 0.0, 0.0)
        assert scored == expected
        assert values[0, 0] == (3.0 if expected else -math.inf) and keys[0, 0] == (3 if expected else 0)


def test_slab_maxima_by_hand():
    """Of a slab row's runs the highest best is kept, with the first run that holds it
    (of two equal, the earlier slab's); runs past the last whole slab are in none."""
    kernels = importlib.import_module("timecycle.kernels")  # numba: only the CPU's tests need it
    best = np.array([[1, 0], [0, 2], [5, 0], [0, 9], [99, 99]], dtype=np.float32)  # (runs, Q): slabs 0 | 1 of 2 rows
    maxima, which = np.full((2, 2), np.nan, np.float32), np.full((2, 2), -9, np.int64)
    kernels.slab_maxima(best, 2, maxima, which)
    # Row 0: runs 0 and 2; row 1: runs 1 and 3; run 4 is in no slab.
    np.testing.assert_array_equal(maxima, [[5, 0], [0, 9]])
    np.testing.assert_array_equal(which, [[2, 0], [1, 3]])


def test_seed_scores_the_best_key_of_a_chosen_run():
    """The compiled seeding on a hand-made block of 4 runs of 2 keys (one row, one
    slot): in a query's chosen run, the key with the best approximate score among those
    there and within reach is scored exactly; a run with none, or run -1, leaves -inf."""
    kernels = importlib.import_module("timecycle.kernels")  # numba: only the CPU's tests need it
    q = np.array([[1.0, 2.0], [3.0, 1.0]])  # (Q, C)
    feats = np.arange(16, dtype=np.float32).reshape(8, 2)  # keys 0..7: runs (0, 1), (2, 3), (4, 5), (6, 7)
    absent = np.zeros(8, np.float32)
    absent[6] = -math.inf  # key 6 is not there
    approx = torch.zeros(8, 2)
    approx[4:6, 0] = torch.tensor([3.0, 7.0])
    approx[6:, 1] = torch.tensor([9.0, 1.0])
    approx = approx.T[:, :, None].bfloat16().contiguous().view(torch.int16).numpy().view(np.uint16)  # by query
    reach = np.zeros((8, 2), np.float32)
    reach[[2, 3, 5], 0] = -math.inf  # out of query 0's reach: run 1 and key 5
    chosen = np.array([[2, -1], [1, 3]])  # (j, Q)
    values = np.full((2, 2), -math.inf)
    kernels.seed(q, feats, absent, approx, reach, chosen, 2, 1, 8, 1, 0, 0, 8, values)
    # Query 0, run 2: key 5 is out of reach, key 4: (8, 9) . (1, 2) = 26. Run 1: no key within reach.
    # Query 1, run 3: key 6 is not there, key 7: (14, 15) . (3, 1) = 57.
    np.testing.assert_array_equal(values, [[26, -math.inf], [-math.inf, 57]])


def approximate_scores(group, codes: torch.Tensor, y0: int, x0: int, worker: int) -> torch.Tensor:
    """The bfloat16 pass of the tile at (y0, x0) for every one of its queries, ``codes``
    (Q, C'), run as the engine runs it: its scores (Q / W, keys, W)."""
    for keys, queries, out in group.products(codes, y0, x0, worker, len(codes)):
        torch.mm(keys, queries, out=out)
    return group.scores(worker)


def low_rank_features(frames: int, channels: int, h: int, w: int, rank: int = 48, seed: int = 0,
                      relu: bool = False) -> torch.Tensor:
    """Unit features that vary mostly in ``rank`` directions, as a deep encoder's do, and
    a little in every other: with more channels than a code keeps (:func:`_code_dims`),
    the code's coordinates hold most of each vector and its residual is small."""
    g = torch.Generator().manual_seed(seed)
    latent, mixing = torch.randn(frames, rank, h, w, generator=g), torch.randn(rank, channels, generator=g)
    noise = 0.3 * torch.randn(frames, channels, h, w, generator=g)
    if relu:  # all positive, as after a ReLU
        latent, mixing, noise = latent.relu(), mixing.abs(), noise.abs()
    return F.normalize(torch.einsum("trhw,rc->tchw", latent, mixing) + noise, dim=1)


def test_codes_keep_every_channel_up_to_125_and_fewer_beyond():
    assert [_code_dims(c) for c in (16, 125, 126, 256, 257, 512, 1024, 2048)] == [16, 125, 125, 125, 189, 189, 189, 189]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "post-relu"])
@pytest.mark.parametrize("channels", [16, 256, 512])
def test_the_bfloat16_error_bound_holds(signed, channels):
    """Every approximate score is within its bound of q . k - q . c - t (the exact score
    less the query's constants), as the bfloat16 matmul computes it on this machine, and
    the bound is a few units in bfloat16's last place where the kept keys are. At 256
    and 512 channels the codes keep 125 and 189 coordinates, and the residuals' product
    is in the bound."""
    feats = low_rank_features(4, channels, 16, 24, seed=channels, relu=not signed)
    engine = _Propagator(feats[0], torch.rand(2, 16, 24), PropagationConfig(context=2, radius=None))
    coder = engine.groups[0].coder
    assert (coder.basis is None) == (channels == 16) and coder.dims == {16: 16, 256: 125, 512: 189}[channels]
    for t in (1, 2):
        engine.step(feats[t])
    cells = feats[3].permute(1, 2, 0).contiguous()
    engine._code_queries(cells, coder(cells))
    group = engine.groups[0]
    c = coder.centre.double()
    th, tw = engine.tile
    for y0, x0 in [(0, 0), (8, 16)]:
        tile = (slice(y0, y0 + th), slice(x0, x0 + tw))
        codes = engine.codes[y0 // th * engine.tiles[1] + x0 // tw]  # (Q, C'), the tile's queries row by row
        approximate = approximate_scores(group, codes, y0, x0, 0)[0].double()  # (N, Q), by band, run-innermost
        rows, cols, slots = group.feats.shape[:3]
        approximate = approximate.view(cols // _RUN, rows, slots, _RUN, -1).permute(1, 0, 3, 2, 4)
        approximate = approximate.reshape(-1, len(codes))  # as the buffers: (rows, cols, slots)
        q = feats[3].permute(1, 2, 0)[tile].flatten(0, 1).double()  # (Q, C), cells past the grid are 0
        keys = group.feats.flatten(0, 2).double()  # (N, C)
        shift = codes[:, coder.dims + 2].double()  # -t
        exact = (keys @ q.T - q @ c + shift).double()
        bound = (approximate.abs() * 2.0 ** -8 / (1 - 2.0 ** -8) + engine.bounds[0][tile].flatten()
                 + group.key_errors.flatten(0, 2).double() @ engine.weights[tile].flatten(0, 1).T.double())
        real = (group.absent.flatten() == 0)[:, None] & (q.norm(dim=1) > 0)
        assert ((approximate - exact).abs() <= bound)[real].all()
        best = exact.masked_fill(~real, -math.inf).argmax(0)  # where the kept keys are
        assert bound.gather(0, best[None]).max() < 0.01  # a few units in bfloat16's last place


def test_a_code_bounds_what_it_leaves_out():
    """The coder's bounds on hand-checkable vectors: features in a 2-d plane coded in 189
    of 512 coordinates leave (nearly) nothing out; a vector off the first frame's
    directions leaves out exactly its part off them, and its bounds hold in float64."""
    g = torch.Generator().manual_seed(0)
    plane = torch.linalg.qr(torch.randn(512, 2, generator=g, dtype=torch.float64)).Q.float()  # (C, 2) orthonormal
    first = F.normalize(torch.randn(6, 7, 2, generator=g) @ plane.T + 1.0, dim=-1)  # (h, w, C)
    coder = _Coder(first)
    assert coder.dims == 189 and coder.basis.shape == (512, 189) and coder.defect < 1e-10
    code, bounds, beta = coder(first)
    residual = bounds[..., 2]
    diff = first.double() - coder.centre.double()
    assert residual.max() < 2e-6  # the first frame lies in the basis' span, but for float32's rounding
    torch.testing.assert_close(beta, diff @ coder.centre.double())
    x = torch.randn(5, 512, generator=g)
    code, bounds, _ = coder(x)
    off, size, residual = bounds.double().unbind(-1)
    diff = x.double() - coder.centre.double()
    coords = diff @ coder.basis
    assert torch.all(residual >= (diff - coords @ coder.basis.T).norm(dim=-1))
    assert torch.all(residual <= (diff - coords @ coder.basis.T).norm(dim=-1) * (1 + 1e-5))
    assert torch.all(off >= (code.double() - coords).norm(dim=-1)) and torch.all(off <= 2.0 ** -8 * size)
    assert torch.all(size >= coords.norm(dim=-1)) and torch.all(size >= code.double().norm(dim=-1))


@pytest.mark.parametrize("piece", [None, 2], ids=["tile-a-piece", "pieces-of-2-rows"])
@pytest.mark.parametrize("shape", ["circle", "square"])
def test_the_bfloat16_pass_scores_every_pair_within_reach(monkeypatch, shape, piece):
    """A tile's queries are scored a piece (a few of its rows) at a time, against the
    key rows of each band that some query of the piece reaches, and only where the
    block holds keys of the grid: every (key, query) pair within reach of a key of the
    grid gets the score a matmul of the whole block gives, and exactly the pairs of
    those rows are computed, the others stay -inf: a disk's corners, and a small
    piece's, leave rows out. With the whole tile as one piece, as the engine runs, and
    in pieces of 2 rows. Each run's best is the maximum of its keys' scores, -inf where
    none is within reach or the run lies in the buffers' padding, in the ring and in
    the first frame's dense group alike."""
    kernels = importlib.import_module("timecycle.kernels")
    if piece is not None:
        monkeypatch.setattr(propagate_module, "_PIECE", piece)
    feats = low_rank_features(3, 256, 40, 24, seed=3)
    cfg = dataclasses.replace(preset("crw"), context=2, radius=5.0, radius_shape=shape)
    engine = _Propagator(feats[0], torch.rand(2, 40, 24), cfg)
    th, tw = engine.tile
    engine.step(feats[1])
    cells = feats[2].permute(1, 2, 0).contiguous()
    engine._code_queries(cells, engine.groups[0].coder(cells))
    ring = engine.groups[1]
    (rows, cols), slots, margin = ring.span, ring.slots, ring.margin
    reach = (ring.reach.view(rows, cols // _RUN, _RUN, -1) == 0).permute(1, 0, 2, 3)  # (B / _RUN, R, _RUN, Q)
    # Per piece of queries and band, the rows from the first to the last that some query reaches.
    width = propagate_module._PIECE * tw
    scored = torch.zeros(reach.shape[:2] + reach.shape[3:], dtype=torch.bool)  # (B / _RUN, R, Q)
    for q0 in range(0, th * tw, width):
        for band, hit in enumerate(reach[:, :, :, q0:q0 + width].any(3).any(2)):
            reached = hit.nonzero().flatten()
            scored[band, reached.min():reached.max() + 1, q0:q0 + width] = True
    assert width < th * tw or piece is None
    assert not scored.all() or (shape == "square" and piece is None)  # a square's tile reaches every row
    reach = reach[:, :, None].expand(-1, -1, slots, -1, -1)  # as the scores: (B / _RUN, R, S, _RUN, Q)
    for worker, (y0, x0) in enumerate([(0, 0), (16, 8)]):  # a fresh worker's scores: -inf wherever not computed
        codes = engine.codes[y0 // th * engine.tiles[1] + x0 // tw]  # (Q, C')
        scores = approximate_scores(ring, codes, y0, x0, worker)  # (Q / W, keys, W)
        best = np.full((scores.shape[1] // _RUN, len(codes)), -np.inf, np.float32)  # as a worker's buffer
        pieces = ring.tile_pieces(y0, x0, len(codes))
        kernels.run_maxima(scores.view(torch.int16).numpy(), pieces, ring.run_reach.numpy(), _RUN, rows, slots, best)
        scores = scores.movedim(0, -2).reshape(reach.shape).float()
        # Where the block holds keys of the grid: its rows, and its bands with a column, in it.
        grid_rows = (torch.arange(rows) + y0 - margin).clamp(0, 39) == torch.arange(rows) + y0 - margin
        band_cols = torch.arange(cols).view(-1, _RUN) + x0 - margin
        grid_bands = ((band_cols >= 0) & (band_cols < 24)).any(1)
        held = (grid_bands[:, None] & grid_rows)[:, :, None, None, None]
        assert held.all() == (y0 > 0)  # the first tile's block reaches into the padding above and left of it
        block = ring.codes[x0 // _RUN:(x0 + cols) // _RUN, y0:y0 + rows]  # (B / _RUN, R, S, _RUN, C')
        whole = (block.float() @ codes.float().T)  # exact products of the bfloat16 codes, summed in float32
        torch.testing.assert_close(scores[reach & held], whole[reach & held], rtol=2.0 ** -8, atol=1e-6)
        assert torch.equal(scores.isfinite(), (scored[:, :, None, None] & held).expand_as(scores))
        in_reach = reach.any(3) & held[..., 0, :]  # (B / _RUN, R, S, Q): some key of the run is, in the grid
        want = scores.amax(3).masked_fill(~in_reach, -math.inf)
        assert torch.equal(torch.from_numpy(best).view(want.shape), want)
        first = engine.groups[0]
        first_scores = approximate_scores(first, codes, y0, x0, worker)
        first_best = np.full((first_scores.shape[1] // _RUN, len(codes)), np.nan, np.float32)  # all written
        kernels.run_maxima(first_scores.view(torch.int16).numpy(), first.tile_pieces(y0, x0, len(codes)),
                           first.run_reach.numpy(), _RUN, *first.span[:1], 1, first_best)
        assert torch.equal(torch.from_numpy(first_best), first_scores.float().view(len(first_best), _RUN, -1).amax(1))


def test_a_tile_at_the_grids_edge_skips_the_padding_and_the_rows_past_it():
    """The rows each piece scores, by hand, on a 20 x 27 grid at radius 8 (tiles of 8 x 8
    queries, each one piece, bands of 8 columns): the ring's buffers have 8 cells of
    padding each side, and a block is 24 rows by 3 bands. The block of the tile at (16,
    24) is grid rows 8..31 and columns 16..39: its rows past block row 11 hold no grid
    row and its last band no grid column (0..26), and only its first 4 rows of queries
    (grid rows 16..19, 32 queries) are live, to which its pieces are cut. The top-left
    tile's block is grid rows -8..15 and columns -8..15: its first 8 rows and its first
    band are padding."""
    feats = random_features(1, 8, 20, 27)
    cfg = dataclasses.replace(preset("crw"), context=2, radius=8.0)
    engine = _Propagator(feats[0], torch.rand(2, 20, 27), cfg)
    ring = engine.groups[1]
    assert engine.tile == (8, 8) and ring.span == (24, 24) and ring.margin == 8
    corner = ring.tile_pieces(16, 24, 32)
    assert len(corner) == 3 and (corner[:, 3] == 0).all() and (corner[:, 4] == 32).all()  # three bands, cut
    for band, lo, hi, q0, q1, held, end in corner.tolist():
        assert lo < hi and (end - held) == (min(hi, 12) - max(lo, 0) if band < 2 else 0), band
    top_left = ring.tile_pieces(0, 0, 64)
    assert len(top_left) == len(ring.pieces) == 3 and (top_left[:, 4] == 64).all()
    for band, lo, hi, q0, q1, held, end in top_left.tolist():
        assert (end - held) == (hi - max(lo, 8) if band > 0 else 0), band
        assert held >= 8 or held == end


@pytest.mark.parametrize("relu", [False, True], ids=["signed", "post-relu"])
def test_projected_codes_equal_dense_reference(monkeypatch, relu):
    """With 512 channels the codes keep 189 coordinates of each vector: what they leave
    out widens the bounds but rules out no key that the dense reference keeps."""
    kernels = importlib.import_module("timecycle.kernels")  # numba: only the CPU's tests need it
    scored = []
    shortlist = kernels.shortlist
    monkeypatch.setattr(kernels, "shortlist", lambda *args: scored.append(shortlist(*args)) or scored[-1])
    feats = low_rank_features(8, 512, 20, 26, seed=5, relu=relu)
    first = torch.rand(3, 20, 26, generator=torch.Generator().manual_seed(1))
    for name in ("crw", "dino"):
        cfg = dataclasses.replace(preset(name), context=3)
        engine = _Propagator(feats[0], first, cfg)
        assert engine.groups[0].coder.dims == 189
        for t, (got, want) in enumerate(zip(run(feats, first, cfg), dense_reference(feats, first, cfg)), start=1):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0, msg=f"{name}, frame {t}")
        if name == "crw":  # a query meets 520 keys of the first frame and up to 3 * 441 in the ring; 16 are scored
            assert sum(scored) / (7 * 520) < 0.05 * (520 + 3 * 441)


@pytest.mark.parametrize("spread", [1e-3, 3e-2])
def test_near_ties_keep_the_exact_top_k(spread):
    """Keys whose scores differ by less than bfloat16 can tell apart all stay on the
    shortlist and float64 ranks them: still the dense reference's result."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(16, 1, 1, generator=g)
    feats = F.normalize(base + spread * torch.randn(12, 16, 14, 18, generator=g), dim=1)
    first = torch.rand(3, 14, 18, generator=g)
    for name in ("crw", "dino"):
        cfg = preset(name)
        for t, (got, want) in enumerate(zip(run(feats, first, cfg), dense_reference(feats, first, cfg)), start=1):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0, msg=f"{name}, frame {t}")


@pytest.mark.parametrize("h, w, context", [(2, 2, 1), (3, 3, 2), (1, 5, 3), (3, 4, 0)])
def test_fewer_keys_than_top_k_keep_every_key(h, w, context):
    """With fewer keys within reach than top_k, no bound can rule any out: every key
    there is kept and weighted, and none out of reach or not there yet."""
    g = torch.Generator().manual_seed(h * w + context)
    feats = F.normalize(torch.randn(5, 16, h, w, generator=g).relu() + 0.01, dim=1)
    first = torch.rand(2, h, w, generator=g)
    for name in ("crw", "dino"):
        cfg = dataclasses.replace(preset(name), context=context, radius=1.0)
        for t, (got, want) in enumerate(zip(run(feats, first, cfg), dense_reference(feats, first, cfg)), start=1):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0, msg=f"{name}, frame {t}")


# ----------------------------------------------------------------------------- known answers


def position_features(frames: int, h: int, w: int) -> torch.Tensor:
    """Every cell's feature is one-hot of its position: a cell matches only itself."""
    eye = torch.eye(h * w).T.reshape(h * w, h, w)
    return eye.expand(frames, -1, -1, -1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_static_video_propagates_exactly(name):
    """Exact up to what the softmax leaves on the other kept keys: exp(-1 / tau) each,
    at most 4.5e-5 (DINO's tau = 0.1)."""
    h, w = 10, 12
    mask = np.zeros((h, w), np.uint8)
    mask[2:6, 3:9] = 1
    mask[6:, 8:] = 2
    labels = torch.from_numpy(one_hot(mask)[0])
    cfg = preset(name)
    leak = cfg.top_k * (cfg.context + 1) * math.exp(-1 / cfg.temperature)
    for t, pred in enumerate(run(position_features(25, h, w), labels, cfg), start=1):
        torch.testing.assert_close(pred, labels, atol=leak, rtol=0, msg=f"frame {t}")
        np.testing.assert_array_equal(pred.argmax(0).numpy(), mask)


def moving_scene(frames: int, h: int, w: int, channels: int = 32, seed: int = 0):
    """Two textured rectangles moving past each other on the feature grid.

    Each object carries a random code field in its own coordinates, so a point keeps
    its feature as it moves: corresponding cells are identical and all others differ.
    The background is one code, so background uncovered behind an object, which no
    earlier frame shows, still has its matches. Returns features (T, C, h, w) and masks
    (T, h, w) with ids 0 (background), 1 and 2 (in front)."""
    rng = np.random.default_rng(seed)
    objects = [  # (top, left, height, width, velocity y, velocity x)
        (3, 4, 12, 14, 1, 1),
        (16, 24, 10, 10, -1, -2),
    ]
    codes = [rng.normal(size=(oh, ow, channels)) for _, _, oh, ow, _, _ in objects]
    feats = np.broadcast_to(rng.normal(size=channels), (frames, h, w, channels)).copy()
    masks = np.zeros((frames, h, w), np.uint8)
    ys, xs = np.mgrid[0:h, 0:w]
    for t in range(frames):
        for k, (top, left, oh, ow, vy, vx) in enumerate(objects, start=1):
            ly, lx = ys - (top + vy * t), xs - (left + vx * t)
            inside = (ly >= 0) & (ly < oh) & (lx >= 0) & (lx < ow)
            feats[t][inside] = codes[k - 1][ly[inside], lx[inside]]
            masks[t][inside] = k
    feats = F.normalize(torch.from_numpy(feats).float().permute(0, 3, 1, 2), dim=1)
    return feats, masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_propagation_follows_the_motion(name):
    feats, masks = moving_scene(12, 32, 40)
    labels = torch.from_numpy(one_hot(masks[0])[0])
    for t, pred in enumerate(run(feats, labels, preset(name)), start=1):
        got = pred.argmax(0).numpy()
        for k in (1, 2):
            assert iou(got == k, masks[t] == k) > 0.9, f"frame {t}, object {k}"


def test_radius_is_inclusive_at_its_boundary():
    """All features equal and top-k beyond the window: each query averages the labels of
    exactly the keys within reach, so one labelled key shows which queries reach it."""
    h, w = 13, 17  # partial tiles on both axes
    key = (6, 9)
    labels = torch.zeros(1, h, w)
    labels[0, key[0], key[1]] = 1
    feats = F.normalize(torch.ones(2, 4, h, w), dim=1)
    ys, xs = np.mgrid[0:h, 0:w]
    results = {}
    cases = [("circle", 5.0), ("circle", 5.0 - 1e-6), ("circle", math.sqrt(32)), ("circle", 0.0),
             ("square", 3.0), ("square", 3.0 - 1e-6), ("square", 7.5)]
    for shape, radius in cases:
        def reach(qy, qx, ky, kx):
            if shape == "circle":
                return (qy - ky) ** 2 + (qx - kx) ** 2 <= radius ** 2
            return np.maximum(abs(qy - ky), abs(qx - kx)) <= radius

        cfg = PropagationConfig(context=0, top_k=h * w, radius=radius, radius_shape=shape, radius_on_first=True)
        (pred,) = run(feats, labels, cfg)
        window = np.array([[reach(qy, qx, ys, xs).sum() for qx in range(w)] for qy in range(h)])
        want = reach(ys, xs, *key) / window
        np.testing.assert_allclose(pred[0].numpy(), want, atol=1e-6, err_msg=f"{shape} radius {radius}")
        results[shape, radius] = pred[0]

    def reached(shape, radius, dy, dx):
        return results[shape, radius][key[0] + dy, key[1] + dx].item() > 0

    assert reached("circle", 5.0, 3, 4) and not reached("circle", 5.0 - 1e-6, 3, 4)  # exactly r: in
    assert not reached("circle", 5.0, 1, 5)  # sqrt(26), just past r: out
    assert reached("circle", math.sqrt(32), -4, 4) and not reached("circle", 5.0, -4, 4)
    assert reached("circle", 0.0, 0, 0) and not reached("circle", 0.0, 0, 1)
    assert reached("square", 3.0, 3, -3) and not reached("square", 3.0 - 1e-6, 3, -3)
    assert not reached("square", 3.0, 4, 0) and reached("square", 7.5, -6, 7)


def test_features_are_consumed_one_frame_at_a_time():
    feats = random_features(30, 4, 6, 7)
    pulled = []

    def stream():
        for f in feats:
            pulled.append(1)
            yield f

    for t, _ in enumerate(propagate_features(stream(), torch.rand(2, 6, 7), preset("crw")), start=1):
        assert len(pulled) == t + 1  # frame t's prediction needs frames 0..t and nothing beyond


@pytest.mark.parametrize("name", ["crw", "timecycle"])
def test_memory_stays_flat_at_full_width(name):
    """A 1152-wide DAVIS frame at stride 8 (60 x 144 cells): the dense affinity of one
    frame against CRW's 21 context frames would take 6.3 GB; propagation stays far below
    it, with the bfloat16 shortlist (CRW) and with every key scored in float32
    (TimeCycle's per-frame softmax)."""
    code = textwrap.dedent(f"""
        import resource, torch
        import torch.nn.functional as F
        from timecycle.propagate import preset, propagate_features
        torch.set_num_threads(1)
        feats = F.normalize(torch.rand(6, 8, 60, 144), dim=1)
        cfg = preset("{name}")
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = list(propagate_features(feats, torch.rand(3, 60, 144), cfg))
        assert len(out) == 5 and out[0].shape == (3, 60, 144)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    # glibc raises its mmap threshold as blocks are freed (up to 32 MB), and the freed
    # blocks below it can stay in the heap: the same run grew anywhere from 55 MiB to
    # 1.6 GiB. A fixed threshold measures what propagation holds, not the heap's luck.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 100, f"grew by {result.stdout.strip()} MiB"


# ----------------------------------------------------------------------------- configuration


def test_presets_hold_the_published_protocols():
    tc, crw, dino, vfs = (PRESETS[n] for n in ("timecycle", "crw", "dino", "vfs"))
    assert tc.input_size == InputSize("square", 320) and tc.context == 7
    assert tc.temperature == pytest.approx(512 ** -0.5) and tc.softmax == "frame"
    assert (tc.top_k, tc.top_k_per_frame, tc.radius, tc.minmax) == (5, True, None, True)

    assert crw.input_size == InputSize("native") and crw.context == 20 and crw.temperature == 0.05
    assert (crw.top_k, crw.top_k_per_frame, crw.softmax) == (10, False, "kept")
    assert (crw.radius, crw.radius_shape, crw.radius_on_first) == (12, "circle", False)

    assert dino.input_size == InputSize("short", 480) and dino.context == 7 and dino.temperature == 0.1
    assert (dino.top_k, dino.top_k_per_frame) == (5, False)
    assert (dino.radius, dino.radius_shape, dino.radius_on_first) == (12, "square", True)  # 25 x 25

    assert vfs.input_size == InputSize("short", 480) and vfs.context == 20 and vfs.temperature == 0.07
    assert (vfs.top_k, vfs.top_k_per_frame, vfs.radius) == (10, False, 12)
    assert preset("vfs", arch="resnet18").radius == 12 and preset("vfs", arch="resnet50").radius == 18
    assert PropagationConfig() == crw


def test_config_checks_and_overrides():
    assert resolve_config("crw", top_k=5, input_size=("short", 360)).input_size == InputSize("short", 360)
    assert InputSize("short", 480).resolve(480, 854) == (480, 854)
    assert InputSize("short", 240).resolve(480, 854) == (240, 427)
    assert InputSize("square", 320).resolve(480, 854) == (320, 320)
    with pytest.raises(TypeError, match="topk"):
        resolve_config("crw", topk=5)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("uvc")
    for bad in ({"radius_shape": "diamond"}, {"softmax": "all"}, {"label_downsample": "cubic"},
                {"top_k": 0}, {"temperature": 0.0}, {"context": -1}, {"input_size": ("short", None)}):
        with pytest.raises((ValueError, TypeError)):
            dataclasses.replace(PRESETS["crw"], **bad)


# ----------------------------------------------------------------------------- frames <-> grid


def test_geometry_matches_torch_resizing_on_aligned_frames():
    labels = torch.rand(3, 48, 64)
    geometry = _Geometry((48, 64), (48, 64), (6, 8), torch.device("cpu"))
    torch.testing.assert_close(geometry.to_grid(labels, "bilinear"),
                               F.interpolate(labels[None], size=(6, 8), mode="bilinear")[0])
    torch.testing.assert_close(geometry.to_grid(labels, "area"), F.avg_pool2d(labels[None], 8)[0])
    torch.testing.assert_close(geometry.to_grid(labels, "nearest"),
                               F.interpolate(labels[None], size=(6, 8), mode="nearest-exact")[0])
    grid = torch.rand(3, 6, 8)
    torch.testing.assert_close(geometry.to_frame(grid), F.interpolate(grid[None], scale_factor=8, mode="bilinear")[0])


def test_geometry_with_a_rounded_up_grid_and_resizing():
    """854 wide at stride 8 gives 107 cells that reach 2 pixels past the frame; a frame
    shown to the model at half size maps each cell to 16 frame pixels."""
    geometry = _Geometry((60, 854), (60, 854), (8, 107), torch.device("cpu"))
    ramp = torch.arange(854, dtype=torch.float32).expand(1, 60, 854)
    cells = geometry.to_grid(ramp, "area")[0, 0]
    assert cells[0] == pytest.approx(3.5) and cells[-1] == pytest.approx((848 + 853) / 2)  # clipped to the frame
    half = _Geometry((64, 96), (32, 48), (4, 6), torch.device("cpu"))
    torch.testing.assert_close(half.to_grid(torch.ones(1, 64, 96), "bilinear"), torch.ones(1, 4, 6))
    up = half.to_frame(torch.arange(6.0).expand(1, 4, 6))[0, 0]
    assert up[:8].tolist() == [0.0] * 8  # clamped before the first cell's centre
    assert (up[23] + up[24]).item() / 2 == pytest.approx(1.0)  # cell 1's centre is between pixels 23 and 24


def test_mask_helpers():
    mask = np.array([[0, 3], [7, 3]], np.uint8)
    channels, ids = one_hot(mask)
    assert ids.tolist() == [0, 3, 7] and channels.shape == (3, 2, 2) and channels.dtype == np.float32
    np.testing.assert_array_equal(to_mask(channels, ids), mask)
    np.testing.assert_array_equal(to_mask(torch.from_numpy(channels)), [[0, 1], [2, 1]])
    assert one_hot(np.ones((2, 2), bool))[1].tolist() == [0, 1]
    # The strongest channel as argmax finds it, the first of equals (quantised values tie often).
    for k in (1, 5, 300):
        soft = torch.randint(0, 4, (k, 9, 11), generator=torch.Generator().manual_seed(k)).float() / 4
        got = to_mask(soft.numpy())
        assert got.dtype == (np.uint8 if k <= 256 else np.int64)
        np.testing.assert_array_equal(got, soft.argmax(0).numpy())


def test_points_from_heatmaps():
    maps = np.zeros((2, 20, 30), np.float32)
    maps[0, 5, 10] = maps[0, 5, 12] = 1.0  # a flat peak between x = 10 and 12
    maps[1, 15, 3] = 2.0
    maps[1, 16, 3] = 1.0
    np.testing.assert_allclose(to_points(maps, top_k=2), [[11, 5], [3, 15 + 1 / 3]])


# ----------------------------------------------------------------------------- the public entry point


def position_model(stride: int = 8):
    """A model whose features are one-hot cell positions: on a still video every cell matches only itself."""
    def model(x: torch.Tensor) -> torch.Tensor:
        h, w = -(-x.shape[2] // stride), -(-x.shape[3] // stride)
        return position_features(x.shape[0], h, w).clone()
    return model


def still_video(frames: int = 5, h: int = 32, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.repeat(rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8), frames, axis=0)


@pytest.mark.parametrize("input_size", ["native", ("square", 64)])
def test_masks_come_back_unchanged_on_a_still_video(input_size):
    """Bands whose edges fall on cell edges survive the grid exactly; a corner would
    not, as bilinear upsampling rounds it."""
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24] = 2
    mask[:8] = 5
    out = list(propagate(still_video(), mask, position_model(), "crw", progress=False, input_size=input_size))
    assert len(out) == 5
    for pred in out:
        assert pred.dtype == np.uint8
        np.testing.assert_array_equal(pred, mask)


def test_soft_labels_come_back_as_soft_labels():
    labels = np.zeros((2, 32, 48), np.float32)
    labels[0, :16] = 1
    labels[1] = np.linspace(0, 1, 48)
    out = list(propagate(still_video(3), labels, position_model(), "crw", progress=False))
    assert all(p.shape == (2, 32, 48) and p.dtype == np.float32 for p in out)
    np.testing.assert_array_equal(out[0], labels)
    # On a still video propagation is the identity on the grid: what comes back is the
    # labels brought to the grid and upsampled.
    geometry = _Geometry((32, 48), (32, 48), (4, 6), torch.device("cpu"))
    expected = geometry.to_frame(geometry.to_grid(torch.from_numpy(labels), "bilinear")).numpy()
    for pred in out[1:]:
        np.testing.assert_allclose(pred, expected, atol=1e-6)


def test_an_encoder_on_a_frame_folder(tmp_path):
    frames = still_video(3, 40, 56)
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:05d}.png")
    encoder = Encoder("resnet18", dim=16).eval()
    mask = np.zeros((40, 56), np.uint8)
    mask[10:30, 20:40] = 1
    out = list(propagate(folder, mask, encoder, "vfs", progress=False))
    assert len(out) == 3 and all(p.shape == (40, 56) and p.dtype == np.uint8 for p in out)
    assert set(np.unique(out[2])) <= {0, 1}


def test_a_model_in_training_mode_is_flagged():
    with pytest.warns(UserWarning, match="training mode"):
        propagate(still_video(2), np.ones((32, 48), np.uint8), Encoder("resnet18", dim=8), progress=False)


def test_errors_name_the_problem(tmp_path):
    video, model = still_video(2), position_model()
    with pytest.raises(ValueError, match=r"16x48.*32x48"):
        propagate(video, np.ones((16, 48), np.uint8), model)
    with pytest.raises(ValueError, match="empty"):
        propagate(video, np.zeros((32, 48), np.uint8), model)
    with pytest.raises(ValueError, match="all zero"):
        propagate(video, np.zeros((2, 32, 48), np.float32), model)
    with pytest.raises(ValueError, match="integer"):
        propagate(video, np.ones((32, 48), np.float32), model)
    with pytest.raises(ValueError, match="uint8"):
        propagate(video.astype(np.float32), np.ones((32, 48), np.uint8), model)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(VideoError, match="broken.mp4"):
        propagate(broken, np.ones((32, 48), np.uint8), model)
    with pytest.raises(VideoError, match="no such file"):
        propagate(tmp_path / "missing.mp4", np.ones((32, 48), np.uint8), model)
