"""timecycle: learn correspondence from the cycle-consistency of time, and track anything through video.

The public API is kept small and grows as the library does; every CLI command uses it.
"""
from timecycle.video import VideoError, VideoIndex, VideoInfo, open_video, probe

__version__ = "0.1.0"

__all__ = ["VideoError", "VideoIndex", "VideoInfo", "__version__", "open_video", "probe"]
