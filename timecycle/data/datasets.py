"""File formats of the official benchmark layouts (DAVIS-2017, JHMDB, MPI-Sintel).

The helpers are shared by the writers of synthetic data and the readers of real
data, so that both sides agree on one definition of each format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FLO_MAGIC = 202021.25  # Middlebury .flo tag; it reads as "PIEH" in ASCII
_FLO_HEADER = 12  # bytes: float32 magic, int32 width, int32 height


def davis_palette() -> np.ndarray:
    """The palette of the DAVIS-2017 annotation PNGs, (256, 3) uint8.

    DAVIS took the PASCAL VOC colour map (bits of the index interleaved into the
    high bits of r, g, b) but writes 191 where VOC has 192, and replaces every entry
    from 22 on by the grey (i, i, i); the released annotation files carry exactly
    this table, so writing it makes synthetic annotations indistinguishable.
    """
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    palette[palette == 192] = 191
    palette[22:] = index[22:, None]
    return palette.astype(np.uint8)


def save_indexed_png(path: str | Path, labels: np.ndarray) -> None:
    """Write object ids as a palette PNG: the pixel values are the ids, the palette only
    makes them viewable, as in the DAVIS-2017 annotations."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"{path}: labels must be a (H, W) uint8 array, got {labels.shape} {labels.dtype}")
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(labels).tobytes())
    image.putpalette(davis_palette().tobytes())
    image.save(path)


def read_mask(path: str | Path) -> np.ndarray:
    """Object ids (H, W) uint8 from an annotation PNG of either DAVIS convention: a
    palette PNG whose values are ids (2017), or a grey PNG of 0 and 255 for one object
    (2016), read as 0 and 1."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            labels = np.asarray(image if mode in ("P", "L") else image.convert("L"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable mask image ({exc})") from None
    if mode not in ("P", "L"):
        raise ValueError(f"{path}: a mask must be a palette or grey PNG of object ids, not mode {mode}")
    if mode == "L" and set(np.unique(labels).tolist()) <= {0, 255}:
        return (labels == 255).astype(np.uint8)
    return labels.astype(np.uint8)


def write_flo(path: str | Path, flow: np.ndarray) -> None:
    """Write forward flow (H, W, 2) (u along x, v along y, in pixels) as Middlebury .flo."""
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"{path}: flow must be (H, W, 2), got {flow.shape}")
    height, width = flow.shape[:2]
    with open(path, "wb") as fh:
        fh.write(np.float32(FLO_MAGIC).astype("<f4").tobytes())
        fh.write(np.array([width, height], dtype="<i4").tobytes())
        fh.write(np.ascontiguousarray(flow, dtype="<f4").tobytes())


def read_flo(path: str | Path) -> np.ndarray:
    """Read a Middlebury .flo file into (H, W, 2) float32.

    A wrong tag or a size that disagrees with the header raises ValueError naming the
    file: a silently misread flow field would only show up as a bad end-point error.
    """
    data = Path(path).read_bytes()
    if len(data) < _FLO_HEADER:
        raise ValueError(f"{path}: truncated .flo file ({len(data)} bytes, no complete header)")
    magic = np.frombuffer(data, dtype="<f4", count=1)[0]
    if magic != np.float32(FLO_MAGIC):
        raise ValueError(f"{path}: not a .flo file (magic number {magic!r}, expected {FLO_MAGIC})")
    width, height = (int(v) for v in np.frombuffer(data, dtype="<i4", count=2, offset=4))
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: invalid .flo size {width}x{height}")
    expected = _FLO_HEADER + 8 * width * height
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{path}: .flo file {what}: {len(data)} bytes, {width}x{height} needs {expected}")
    flow = np.frombuffer(data, dtype="<f4", offset=_FLO_HEADER).reshape(height, width, 2)
    return flow.astype(np.float32)  # native-endian, writable copy


__all__ = ["FLO_MAGIC", "davis_palette", "read_flo", "save_indexed_png", "write_flo"]
