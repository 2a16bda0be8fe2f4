"""One way to open any video, and a cached index of a folder tree of videos.

A video is either a file that PyAV decodes (mp4, avi, mkv, webm, gif, ...) or a
folder of frames (jpg/png, natural sort order). Both are read the same way: frame
``i`` of a video opened at ``fps`` is the native frame on screen at time ``i / fps``,
so resampling (the method trains at 12 fps) is a matter of timestamps, not of
decoding everything. Reads seek to the keyframe before the first wanted frame and
decode forward only as far as the last one.

Training at scale opens the same 100,000 videos every epoch, so everything learnt
by probing a file (frame count, rate, size) is cached in an index keyed by path,
size and modification time. A file that cannot be read is recorded with the reason
and skipped; it never stops a scan.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import av
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".avi", ".mkv", ".webm", ".gif", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ogv", ".ts"}
)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# Frame folders carry no rate; DAVIS and JHMDB were shot at 24-30 fps.
DEFAULT_FOLDER_FPS = 30.0
INDEX_VERSION = 1


class VideoError(Exception):
    """A video that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def natural_key(name: str) -> list:
    """Sort key under which frame2 comes before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _frame_files(folder: Path) -> list[Path]:
    """The frames of a frame folder in natural order; anything else in it is an error,
    because a stray file in a frame sequence usually means a broken export."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    strays = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if strays:
        raise VideoError(folder, f"frame folder holds a non-image file: {sorted(strays)[0]!r}")
    if not files:
        raise VideoError(folder, "empty folder: no frames (jpg/png) in it")
    return sorted(files, key=lambda p: natural_key(p.name))


@dataclass(frozen=True)
class VideoInfo:
    """What probing a video found, at its native rate and size."""

    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    kind: str = "file"  # "file" or "frames"

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def frames_at(self, fps: float | None) -> int:
        """Frame count after resampling to ``fps`` (the native count when None)."""
        if fps is None or fps == self.fps:
            return self.num_frames
        return max(1, int(math.floor(self.duration * fps + 1e-6)))


def resized_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``short_side``, aspect kept."""
    if short_side is None:
        return width, height
    scale = short_side / min(width, height)
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


# ----------------------------------------------------------------------------- probing


def _probe_frames(folder: Path, fps: float) -> VideoInfo:
    files = _frame_files(folder)
    sizes = {}
    for f in files:
        try:
            with Image.open(f) as im:  # reads the header only
                sizes.setdefault(im.size, f.name)
        except Exception as exc:  # PIL raises several unrelated types for bad images
            raise VideoError(f, f"not a readable image ({exc.__class__.__name__}: {exc})") from None
    if len(sizes) > 1:
        (s0, f0), (s1, f1) = list(sizes.items())[:2]
        raise VideoError(folder, f"frames of different sizes: {f0} is {s0[0]}x{s0[1]}, {f1} is {s1[0]}x{s1[1]}")
    (width, height), = sizes
    return VideoInfo(str(folder), len(files), float(fps), width, height, kind="frames")


def _stream_fps(stream: av.video.stream.VideoStream, num_frames: int) -> float:
    """The native rate. Animated GIFs declare one rate and show frames at another, so
    when the declared and guessed rates disagree the measured one (frames / duration) wins."""
    avg = float(stream.average_rate) if stream.average_rate else 0.0
    guessed = float(stream.guessed_rate) if stream.guessed_rate else 0.0
    duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    if avg > 0 and (guessed == 0 or abs(avg - guessed) / avg < 0.01):
        return avg
    if duration > 0:
        return num_frames / duration
    return avg or guessed or DEFAULT_FOLDER_FPS


def _probe_file(path: Path) -> VideoInfo:
    if path.stat().st_size == 0:
        raise VideoError(path, "zero-byte file")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise VideoError(path, f"not a readable video ({exc.strerror or exc})") from None
    with container:
        if not container.streams.video:
            raise VideoError(path, "no video stream in the file")
        stream = container.streams.video[0]
        declared = stream.frames
        packets, decoded_one = 0, False
        try:
            # Counting packets needs no decoding, and is exact for the gesture clips
            # and GIFs whose headers report no frame count; one decode proves the codec.
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                packets += 1
                if not decoded_one:
                    decoded_one = bool(packet.decode()) or decoded_one
        except av.error.FFmpegError as exc:
            raise VideoError(path, f"truncated or corrupt after {packets} frames ({exc.strerror or exc})") from None
        if packets == 0:
            raise VideoError(path, "no frames in the video stream")
        if not decoded_one:
            raise VideoError(path, "no frame could be decoded")
        fps = _stream_fps(stream, packets)
        if not declared and container.duration:
            # Matroska and GIF headers give no frame count, but a duration, which
            # betrays a file cut short just as well.
            declared = int(container.duration / av.time_base * fps)
        if declared and packets < 0.9 * declared:
            raise VideoError(path, f"truncated: the header declares {declared} frames but only {packets} are present")
        return VideoInfo(str(path), packets, fps, stream.width, stream.height)


def probe(path: str | Path, folder_fps: float = DEFAULT_FOLDER_FPS) -> VideoInfo:
    """Frames, rate and size of a video file or frame folder; VideoError when unusable."""
    path = Path(path)
    if not path.exists():
        raise VideoError(path, "no such file or folder")
    if path.is_dir():
        return _probe_frames(path, folder_fps)
    return _probe_file(path)


# ----------------------------------------------------------------------------- reading


class Video:
    """An opened video, read at ``fps`` (native when None) with the short side resized.

    Frame ``i`` is the native frame on screen at time ``i / fps``: the same rule
    serves constant-rate files, GIFs with irregular frame times and frame folders.
    """

    def __init__(self, info: VideoInfo, fps: float | None = None, short_side: int | None = None):
        self.info = info
        self.fps = float(fps) if fps else info.fps
        self.size = resized_size(info.width, info.height, short_side)  # (W, H)
        self._container: av.container.InputContainer | None = None
        self._files = _frame_files(Path(info.path)) if info.kind == "frames" else None

    def __len__(self) -> int:
        return self.info.frames_at(self.fps)

    def __enter__(self) -> "Video":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def native_index(self, i: int) -> int:
        """The native frame shown at output frame ``i``."""
        if self.fps == self.info.fps:
            return i
        return min(self.info.num_frames - 1, int(math.floor(i * self.info.fps / self.fps + 1e-6)))

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at output indices ``indices`` (any order, repeats allowed) as
        (T, H, W, 3) uint8 RGB."""
        indices = [int(i) for i in indices]
        n = len(self)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"{self.info.path}: frame {bad[0]} out of range (0..{n - 1} at {self.fps:g} fps)")
        native = [self.native_index(i) for i in indices]
        wanted = sorted(set(native))
        if self._files is not None:
            got = {k: self._load_image(self._files[k]) for k in wanted}
        else:
            got = self._decode(wanted)
        return np.stack([got[k] for k in native])  # (T, H, W, 3)

    def read_window(self, start: int, count: int, step: int = 1) -> np.ndarray:
        return self.read(range(start, start + count * step, step))

    def __iter__(self) -> Iterator[np.ndarray]:
        """Every frame in order, decoding the stream once (for propagation over whole videos)."""
        if self._files is not None:
            for i in range(len(self)):
                yield self._load_image(self._files[self.native_index(i)])
            return
        wanted = [self.native_index(i) for i in range(len(self))]
        j = 0
        for k, frame in self._frames_from(0):
            if j < len(wanted) and wanted[j] <= k:
                rgb = self._rgb(frame)
            while j < len(wanted) and wanted[j] <= k:
                j += 1
                yield rgb
            if j == len(wanted):
                return
        raise VideoError(self.info.path, f"ended before frame {wanted[j]} of {self.info.num_frames}: truncated?")

    # -- frame folders

    def _load_image(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (self.info.width, self.info.height):
                    raise VideoError(path, f"is {im.size[0]}x{im.size[1]}, the folder's frames are "
                                           f"{self.info.width}x{self.info.height}")
                if im.size != self.size:
                    im = im.resize(self.size, Image.BILINEAR)
                return np.asarray(im)
        except VideoError:
            raise
        except Exception as exc:
            raise VideoError(path, f"not a readable image ({exc})") from None

    # -- video files

    def _open(self) -> av.container.InputContainer:
        if self._container is None:
            try:
                self._container = av.open(self.info.path)
            except av.error.FFmpegError as exc:
                raise VideoError(self.info.path, f"cannot be opened ({exc.strerror or exc})") from None
        return self._container

    def _frames_from(self, first: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """(native index, decoded frame) from at or before native frame ``first`` onwards.

        Index k is given to a frame by its presentation time, so a seek lands on
        known indices without decoding from the start. Where a demuxer seeks past
        the wanted frame, decoding starts over from the beginning."""
        container = self._open()
        stream = container.streams.video[0]
        if first > 0:
            period = 1.0 / self.info.fps
            time = (first - 0.5) * period + self._start_time(stream)
            container.seek(max(0, int(time / float(stream.time_base))), stream=stream, backward=True)
            frames = self._decode_stream(container, stream)
            head = next(frames, None)
            if head is not None and head[0] <= first:
                yield head
                yield from frames
                return
        container.seek(0, stream=stream, backward=True)
        yield from self._decode_stream(container, stream)

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = self.size
        return frame.to_ndarray(format="rgb24", width=width, height=height)  # (H, W, 3)

    @staticmethod
    def _start_time(stream) -> float:
        return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0

    def _decode_stream(self, container, stream) -> Iterator[tuple[int, av.VideoFrame]]:
        start, period = self._start_time(stream), 1.0 / self.info.fps
        last_k = -1
        try:
            for frame in container.decode(stream):
                k = last_k + 1 if frame.time is None else int(round((frame.time - start) / period))
                k = max(k, last_k + 1)  # irregular timing (GIF): keep indices strictly increasing
                last_k = k
                yield k, frame
        except av.error.FFmpegError as exc:
            raise VideoError(self.info.path, f"decoding failed after frame {last_k} ({exc.strerror or exc})") from None

    def _decode(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decode the sorted native indices ``wanted``, seeking again across long gaps."""
        got: dict[int, np.ndarray] = {}
        pending = list(wanted)
        while pending:
            for k, frame in self._frames_from(pending[0]):
                if k < pending[0]:
                    continue  # decoding forward from the keyframe
                rgb = self._rgb(frame)  # converted only when wanted: most decoded frames are not
                while pending and pending[0] <= k:
                    got[pending.pop(0)] = rgb
                if not pending or pending[0] - k > 2 * self.info.fps:
                    break  # far apart: seeking again is cheaper than decoding the gap
            else:
                if pending:
                    raise VideoError(self.info.path, f"ended before frame {pending[0]} of "
                                                     f"{self.info.num_frames}: truncated?")
        return got


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Write (H, W, 3) uint8 RGB frames, from any iterable (frames are encoded as they
    come, so a long video never sits in memory), as an mp4: H.264 where this PyAV build
    has it (near-lossless, crf 16), else MPEG-4 part 2 at about 8 bits a pixel. Both need
    even sizes (4:2:0 colour)."""
    from fractions import Fraction

    path = Path(path)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    height, width = np.asarray(first).shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: mp4 needs even frame sizes for yuv420p, got {width}x{height}")
    path.parent.mkdir(parents=True, exist_ok=True)
    h264 = "libx264" in av.codecs_available
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if h264 else "mpeg4", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if h264:
            stream.options = {"crf": "16"}
        else:
            stream.bit_rate = 8 * width * height * math.ceil(fps)
        for frame in itertools.chain([first], frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def open_video(
    path: str | Path | VideoInfo,
    fps: float | None = None,
    short_side: int | None = None,
    folder_fps: float = DEFAULT_FOLDER_FPS,
) -> Video:
    """Open a video file or frame folder (or an already probed :class:`VideoInfo`)."""
    info = path if isinstance(path, VideoInfo) else probe(path, folder_fps)
    return Video(info, fps=fps, short_side=short_side)


# ----------------------------------------------------------------------------- the index


def default_cache_dir() -> Path:
    """Where indexes are cached: never beside the data, which may be read-only or shared."""
    root = os.environ.get("TIMECYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "timecycle"
    )
    return Path(root)


def _signature(path: Path) -> list[int]:
    """What must stay the same for a cached probe to still hold: size and mtime of a
    file; for a frame folder, the same of the folder and of every frame in it."""
    st = path.stat()
    if not path.is_dir():
        return [st.st_size, st.st_mtime_ns]
    total, newest, count = 0, st.st_mtime_ns, 0
    for entry in os.scandir(path):
        if entry.is_file():
            est = entry.stat()
            total, newest, count = total + est.st_size, max(newest, est.st_mtime_ns), count + 1
    return [total, newest, count]


def find_videos(root: Path) -> list[Path]:
    """Video files and frame folders under ``root``: a folder holding images is one
    video (its sub-folders are searched on their own)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=natural_key)
        visible = [f for f in files if not f.startswith(".")]
        if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in visible):
            found.append(Path(folder))
        found.extend(Path(folder) / f for f in sorted(visible, key=natural_key) if is_video_file(Path(f)))
    return found


@dataclass
class VideoIndex:
    """The probed videos under a root, and the ones that could not be read and why."""

    root: str
    entries: list[VideoInfo] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    probed: int = 0  # how many were probed this time rather than taken from the cache

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self) -> str:
        hours = sum(e.duration for e in self.entries) / 3600
        text = (f"{len(self.entries)} videos ({hours:.2f} h) under {self.root}; "
                f"{len(self.failures)} unreadable, skipped; {self.probed} probed, "
                f"{len(self.entries) + len(self.failures) - self.probed} from the cache")
        return text

    @classmethod
    def scan(
        cls,
        root: str | Path,
        cache: str | Path | None = None,
        folder_fps: float = DEFAULT_FOLDER_FPS,
        workers: int = 4,
        progress: bool = True,
    ) -> "VideoIndex":
        """Index every video under ``root``, probing only what the cache does not hold.

        ``cache`` is a JSON file (default: one per root in the user cache folder); it is
        rewritten atomically, so an interrupted scan leaves the previous one intact."""
        from tqdm import tqdm

        root = Path(root).resolve()
        if not root.exists():
            raise VideoError(root, "no such file or folder")
        if root.is_file() or (root.is_dir() and _holds_images(root) and not _has_subfolders(root)):
            paths = [root]  # a single video
        else:
            paths = find_videos(root)
            if not paths:
                raise VideoError(root, "no videos found (video files or folders of jpg/png frames)")
        cache_path = Path(cache) if cache else default_cache_dir() / "index" / (
            hashlib.sha1(str(root).encode()).hexdigest()[:16] + ".json")
        cached = _read_cache(cache_path, folder_fps)
        records: dict[str, dict] = {}
        todo = []
        for p in paths:
            key = str(p)
            try:
                sig = _signature(p)
            except OSError as exc:
                records[key] = {"sig": None, "error": f"cannot be read ({exc.strerror})"}
                continue
            hit = cached.get(key)
            if hit is not None and hit.get("sig") == sig:
                records[key] = hit
            else:
                todo.append((p, sig))

        def run(item: tuple[Path, list[int]]) -> tuple[str, dict]:
            p, sig = item
            try:
                return str(p), {"sig": sig, "info": asdict(probe(p, folder_fps))}
            except VideoError as exc:
                return str(p), {"sig": sig, "error": exc.problem}
            except Exception as exc:  # never let one odd file stop a scan of 100,000
                return str(p), {"sig": sig, "error": f"{exc.__class__.__name__}: {exc}"}

        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = pool.map(run, todo)
            for key, record in tqdm(results, total=len(todo), desc="probing videos", unit="video",
                                    disable=not progress or not todo):
                records[key] = record
        if todo:
            _write_cache(cache_path, folder_fps, records)

        index = cls(str(root), probed=len(todo))
        for p in paths:
            record = records[str(p)]
            if "info" in record:
                index.entries.append(VideoInfo(**record["info"]))
            else:
                index.failures.append((str(p), record["error"]))
        for path, reason in index.failures:
            log.warning("skipping %s: %s", path, reason)
        return index


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file())


def _has_subfolders(folder: Path) -> bool:
    return any(p.is_dir() for p in folder.iterdir())


def _read_cache(path: Path, folder_fps: float) -> dict[str, dict]:
    """The cached records, or none when the file is missing, stale or damaged: a cache
    is only ever a shortcut, so a bad one costs a re-probe and nothing else."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != INDEX_VERSION or data.get("folder_fps") != folder_fps:
        return {}
    return data.get("videos", {})


def _write_cache(path: Path, folder_fps: float, records: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": INDEX_VERSION, "folder_fps": folder_fps, "videos": records}))
    os.replace(tmp, path)
