"""DAVIS-style scores on synthetic clips, whose masks are exact: how the demo and the
learning tests compare a trained model with its initialisation and with raw pixels,
without any dataset on disk."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from timecycle.data.synthetic import SyntheticClip
from timecycle.evaluate.davis import score_labels
from timecycle.propagate import propagate


def score_clips(model, clips: Iterable[SyntheticClip], preset: str = "crw", device: str = "cpu",
                **overrides) -> dict[str, float]:
    """J&F-Mean, J-Mean and F-Mean of first-frame mask propagation over ``clips``.

    As on DAVIS: the objects of the first frame are propagated through the clip, the
    first and last frames are left out of the scores, and every object weighs the same.
    ``overrides`` change fields of the propagation preset (e.g. ``context=3``).
    """
    j_means, f_means = [], []
    for clip in clips:
        num_objects = int(clip.masks[0].max())
        if num_objects == 0 or len(clip.masks) < 3:
            raise ValueError(f"{clip.name}: needs objects on its first frame and at least 3 frames to be scored")
        pred = np.stack(list(propagate(clip.frames, clip.masks[0], model, preset, device=device, progress=False,
                                       **overrides)))  # (T, H, W) uint8
        j, f = score_labels(clip.masks[1:-1], pred[1:-1], num_objects)  # each (K, T-2)
        j_means.extend(j.mean(1))
        f_means.extend(f.mean(1))
    j_mean, f_mean = float(np.mean(j_means)), float(np.mean(f_means))
    return {"J&F-Mean": (j_mean + f_mean) / 2, "J-Mean": j_mean, "F-Mean": f_mean}
