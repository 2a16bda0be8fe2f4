"""The TimeCycle model: stride-8 encoders, the differentiable tracker and the cycle losses."""
from timecycle.model.cycle import (
    TimeCycle,
    feature_similarity,
    inlier_score,
    long_cycle_frames,
    tracking_distance,
)
from timecycle.model.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    build_encoder,
    feature_size,
    l2_normalize,
    normalize_frames,
    torchvision_weights,
)
from timecycle.model.tracker import (
    Hop,
    Localiser,
    Tracker,
    affinity,
    sample_patch,
    theta_from_params,
)

__all__ = [
    "Encoder",
    "Hop",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Localiser",
    "TimeCycle",
    "Tracker",
    "affinity",
    "build_encoder",
    "feature_similarity",
    "feature_size",
    "inlier_score",
    "l2_normalize",
    "long_cycle_frames",
    "normalize_frames",
    "sample_patch",
    "theta_from_params",
    "torchvision_weights",
    "tracking_distance",
]
