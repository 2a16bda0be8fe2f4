"""timecycle: learn correspondence from the cycle-consistency of time, and track anything through video.

The public API is kept small and grows as the library does; every CLI command uses it.
``timecycle.propagate`` is the function (its module stays importable as
``timecycle.propagate`` through ``import timecycle.propagate as ...`` or ``from``-imports).
"""
from timecycle.video import VideoError, VideoIndex, VideoInfo, open_video, probe

__version__ = "0.1.0"

from timecycle.model.checkpoints import load_model  # noqa: E402  (after __version__, which they read)
from timecycle.propagate import propagate  # noqa: E402

__all__ = ["VideoError", "VideoIndex", "VideoInfo", "__version__", "load_model", "open_video", "probe", "propagate"]
