"""File formats of the official benchmark layouts (DAVIS-2017, JHMDB, VIP, MPI-Sintel).

The helpers are shared by the writers of synthetic data and the readers of real
data, so that both sides agree on one definition of each format.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

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
    labels, mode = _read_index_png(path)
    if mode == "L" and set(np.unique(labels).tolist()) <= {0, 255}:
        return (labels == 255).astype(np.uint8)
    return labels


def read_ids(path: str | Path) -> np.ndarray:
    """The values (H, W) uint8 of a palette or grey PNG exactly as stored: class ids of a
    part map (VIP), or 0/255 flags (Sintel's occlusion masks). Unlike :func:`read_mask`
    it never reads 255 as object 1, which would turn a part map's void into a class."""
    return _read_index_png(path)[0]


def _read_index_png(path: str | Path) -> tuple[np.ndarray, str]:
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            labels = np.asarray(image if mode in ("P", "L") else image.convert("L"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable mask image ({exc})") from None
    if mode not in ("P", "L"):
        raise ValueError(f"{path}: a mask must be a palette or grey PNG of ids, not mode {mode}")
    return labels.astype(np.uint8), mode


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


def read_rgb(path: str | Path) -> np.ndarray:
    """One frame as (H, W, 3) uint8 RGB; a missing or unreadable file is an error naming it."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing frame") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def read_name_list(path: str | Path) -> list[str]:
    """The first word of every non-blank line: video lists put one video on a line,
    some with more columns after it (a label path, a split flag)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video list")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- DAVIS

DAVIS_VOID = 255  # annotation value of pixels that are not scored (object borders, in DAVIS-2017)
DAVIS_RESOLUTIONS = ("480p", "Full-Resolution")


class DavisSequence(NamedTuple):
    """A sequence's frames and the ground truth it has: every frame in train and val, the
    first frame only in test-dev and in some subsets."""

    name: str
    frames: tuple[Path, ...]  # NNNNN.jpg, frame t at index t
    annotations: tuple[Path, ...]  # NNNNN.png present, in frame order; the first is frame 0's
    size: tuple[int, int]  # (H, W) of the frames, and of every mask


def davis_sequences(root: str | Path, year: str | int = "2017", split: str = "val", resolution: str = "480p",
                    sequences: list[str] | None = None) -> list[DavisSequence]:
    """The sequences of a DAVIS root: those of ImageSets/<year>/<split>.txt, or the
    ``sequences`` named. Frames come from JPEGImages/<resolution>/<seq>/ and ground truth
    from Annotations/<resolution>/<seq>/; a root whose JPEGImages/ and Annotations/ hold
    the sequence folders directly (no resolution level, as some subsets ship) is read too.

    The layout is checked before anything is propagated, since a problem found after
    hours of propagation costs those hours: a gap in the frame numbers, an annotation of
    a frame that is not there, a missing first-frame annotation, or a mask whose size
    differs from its frames is an error naming the file.
    """
    root = Path(root)
    year = str(year)
    if year not in ("2016", "2017"):
        raise ValueError(f"DAVIS year must be 2016 or 2017, got {year}")
    if resolution not in DAVIS_RESOLUTIONS:
        raise ValueError(f"DAVIS resolution must be one of {', '.join(DAVIS_RESOLUTIONS)}, got {resolution!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such DAVIS folder")
    images, annotations = (_davis_folder(root, kind, resolution) for kind in ("JPEGImages", "Annotations"))
    if sequences is None:
        sequences = _davis_split(root, year, split, resolution)
    return [_davis_sequence(images / name, annotations / name) for name in sequences]


def read_davis_annotation(path: str | Path, year: str | int = "2017") -> np.ndarray:
    """Object ids (H, W) uint8 of a ground-truth PNG, 255 void. DAVIS-2016 scores one
    foreground object, so for 2016 every object id becomes 1: the 2017 release's
    annotations of the 2016 sequences split some of them into several objects."""
    labels = read_mask(path)
    if str(year) == "2016":
        labels = np.where((labels > 0) & (labels != DAVIS_VOID), 1, labels).astype(np.uint8)
    return labels


def _davis_folder(root: Path, kind: str, resolution: str) -> Path:
    nested = root / kind / resolution
    if nested.is_dir():
        return nested
    flat = root / kind
    if flat.is_dir() and not any((flat / r).is_dir() for r in DAVIS_RESOLUTIONS):
        return flat
    raise FileNotFoundError(f"{nested}: missing; a DAVIS root holds JPEGImages/<resolution>/<sequence>/ "
                            f"and Annotations/<resolution>/<sequence>/")


def _davis_split(root: Path, year: str, split: str, resolution: str) -> list[str]:
    """Sequence names from ImageSets/<year>/<split>.txt (the DAVIS-2017 release, which
    lists the 2016 sets too), or from the DAVIS-2016 release's ImageSets/<resolution>/,
    whose lines are frame paths (/JPEGImages/480p/bear/00000.jpg ...)."""
    listing = root / "ImageSets" / year / f"{split}.txt"
    legacy = root / "ImageSets" / resolution / f"{split}.txt"
    if not listing.is_file() and year == "2016" and legacy.is_file():
        listing = legacy
    if not listing.is_file():
        raise FileNotFoundError(f"{listing}: missing; DAVIS lists the sequences of a split in "
                                f"ImageSets/<year>/<split>.txt (or name the sequences to read: --sequences)")
    names = [Path(word).parent.name if "/" in word else word for word in read_name_list(listing)]
    if not names:
        raise ValueError(f"{listing}: lists no sequences")
    return list(dict.fromkeys(names))  # a frame-path listing names each sequence once per frame


def _davis_sequence(frame_folder: Path, annotation_folder: Path) -> DavisSequence:
    name = frame_folder.name
    if not frame_folder.is_dir():
        raise FileNotFoundError(f"{frame_folder}: missing frame folder of sequence {name}")
    frames = _numbered_files(frame_folder, ".jpg")
    if not frames:
        raise FileNotFoundError(f"{frame_folder}: no NNNNN.jpg frames in it")
    last = max(frames)
    gaps = sorted(set(range(last + 1)) - set(frames))
    if gaps:
        raise FileNotFoundError(f"{frame_folder / f'{gaps[0]:05d}.jpg'}: missing frame "
                                f"(the sequence's frames run to {frames[last].name})")
    masks = _numbered_files(annotation_folder, ".png") if annotation_folder.is_dir() else {}
    if 0 not in masks:
        raise FileNotFoundError(f"{annotation_folder / '00000.png'}: missing first-frame annotation "
                                f"of sequence {name}: it names the objects to propagate")
    beyond = sorted(set(masks) - set(frames))
    if beyond:
        raise FileNotFoundError(f"{frame_folder / f'{beyond[0]:05d}.jpg'}: missing frame "
                                f"({masks[beyond[0]]} annotates it)")
    with Image.open(frames[0]) as image:  # reads the header only
        width, height = image.size
    for path in masks.values():
        with Image.open(path) as image:
            if image.size != (width, height):
                raise ValueError(f"{path}: mask is {image.size[0]}x{image.size[1]} but the frames of "
                                 f"{name} are {width}x{height} ({frames[0]})")
    return DavisSequence(name, tuple(frames[t] for t in range(last + 1)),
                         tuple(masks[t] for t in sorted(masks)), (height, width))


def _numbered_files(folder: Path, suffix: str) -> dict[int, Path]:
    """{frame number: path} of the NNNNN<suffix> files of a folder; hidden files are skipped."""
    files = {}
    for path in folder.iterdir():
        if path.suffix.lower() != suffix or path.name.startswith("."):
            continue
        if not path.stem.isdigit():
            raise ValueError(f"{path}: not a DAVIS frame name (NNNNN{suffix})")
        files[int(path.stem)] = path
    return files


# ----------------------------------------------------------------------------- JHMDB

# The order of pos_img's second axis.
JHMDB_JOINTS = ("neck", "belly", "face", "right shoulder", "left shoulder", "right hip", "left hip",
                "right elbow", "left elbow", "right knee", "left knee", "right wrist", "left wrist",
                "right ankle", "left ankle")


def jhmdb_split(root: str | Path, split: int = 1) -> list[str]:
    """``<class>/<video>`` of the test videos of JHMDB's official split 1, 2 or 3, from
    splits/<class>_test_split<N>.txt, whose lines read ``<video>.avi <flag>`` with flag
    1 for training and 2 for testing (0, unused, appears in the HMDB51 files)."""
    folder = Path(root) / "splits"
    suffix = f"_test_split{split}.txt"
    files = sorted(folder.glob(f"*{suffix}"))
    if not files:
        raise FileNotFoundError(f"{folder}: no <class>{suffix} files (JHMDB's split lists); "
                                "download them, or give a list of <class>/<video> names")
    names = []
    for file in files:
        action = file.name.removesuffix(suffix)
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            words = line.split()
            if not words:
                continue
            if len(words) != 2 or words[1] not in ("0", "1", "2"):
                raise ValueError(f"{file}:{number}: expected '<video>.avi <1|2>', got {line!r}")
            if words[1] == "2":
                names.append(f"{action}/{words[0].removesuffix('.avi')}")
    return names


def read_jhmdb_joints(path: str | Path) -> np.ndarray:
    """(T, 15, 2) joint x, y in 0-based pixel coordinates (pixel centres at integers) from a
    joint_positions.mat, whose ``pos_img`` (2, 15, T) is 1-based, as MATLAB counts."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing joint positions")
    try:
        mat = loadmat(path)
    except (MatReadError, OSError, ValueError, IndexError) as exc:  # truncated files raise IndexError
        raise ValueError(f"{path}: not a readable .mat file ({exc.__class__.__name__}: {exc})") from None
    if "pos_img" not in mat:
        raise ValueError(f"{path}: no 'pos_img' entry (keys: {', '.join(k for k in mat if not k.startswith('__'))})")
    pos = np.asarray(mat["pos_img"], dtype=np.float64)
    if pos.ndim == 2:  # MATLAB drops a trailing axis of length 1: a one-frame video
        pos = pos[..., None]
    if pos.ndim != 3 or pos.shape[:2] != (2, len(JHMDB_JOINTS)) or pos.shape[2] == 0:
        raise ValueError(f"{path}: pos_img must be (2, {len(JHMDB_JOINTS)}, T), got {pos.shape}")
    if not np.isfinite(pos).all():
        raise ValueError(f"{path}: pos_img holds NaN or infinite coordinates")
    return pos.transpose(2, 1, 0) - 1


def jhmdb_frames(root: str | Path, name: str, count: int) -> list[Path]:
    """Rename_Images/<class>/<video>/00001.png .. for the ``count`` annotated frames. Frames
    past the annotation are left out, as the published evaluations leave them; a missing
    one is an error, since the frames after it would be matched to the wrong joints."""
    folder = Path(root) / "Rename_Images" / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no frame folder for JHMDB video {name}")
    paths = [folder / f"{t:05d}.png" for t in range(1, count + 1)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing frame ({count} frames have joint positions)")
    return paths


# ----------------------------------------------------------------------------- VIP

# The part classes of VIP's Category_ids maps, by id.
VIP_CLASSES = ("background", "hat", "hair", "sun-glasses", "upper-clothes", "dress", "coat", "socks", "pants",
               "gloves", "scarf", "skirt", "torso-skin", "face", "right-arm", "left-arm", "right-leg", "left-leg",
               "right-shoe", "left-shoe")


def vip_frames(root: str | Path, video: str) -> list[tuple[Path, Path | None]]:
    """The frames of VIP_Fine/Images/<video> in natural order (the order propagation reads
    a frame folder in), each with its Annotations/Category_ids/<video>/<frame>.png or None:
    VIP annotates one frame in 25, and a layout with every frame leaves the rest bare."""
    from timecycle.video import IMAGE_EXTENSIONS, natural_key

    root = Path(root)
    folder = root / "Images" / video
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no frame folder for VIP video {video}")
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")),
                    key=lambda p: natural_key(p.name))
    if not frames:
        raise FileNotFoundError(f"{folder}: no frames in it")
    annotations = root / "Annotations" / "Category_ids" / video
    pairs = [(frame, annotations / f"{frame.stem}.png") for frame in frames]
    return [(frame, label if label.is_file() else None) for frame, label in pairs]


# ----------------------------------------------------------------------------- MPI-Sintel


class FlowPair(NamedTuple):
    """Two consecutive frames and the ground truth of the flow from the first to the second."""

    scene: str
    name: str  # the first frame's stem, frame_NNNN, which names the flow files too
    frames: tuple[Path, Path]
    flow: Path
    occlusions: Path | None  # 255 where the first frame's pixel is hidden in the second
    invalid: Path | None  # 255 where the ground truth is not to be scored


def sintel_pairs(root: str | Path, pass_name: str = "clean") -> list[FlowPair]:
    """Every frame pair of a Sintel-style folder (``root`` or its training/ subfolder)
    that has a flow/<scene>/frame_NNNN.flo, with the frames from <pass>/<scene>/ and the
    occlusions/ and invalid/ masks where present."""
    import re

    root = Path(root)
    if not (root / "flow").is_dir() and (root / "training" / "flow").is_dir():
        root = root / "training"
    flows = sorted((root / "flow").glob("*/*.flo"))
    if not flows:
        raise FileNotFoundError(f"{root / 'flow'}: no <scene>/frame_NNNN.flo ground truth")
    pairs = []
    for flow in flows:
        match = re.fullmatch(r"(.*?)(\d+)", flow.stem)
        if match is None:
            raise ValueError(f"{flow}: a flow file is named after its first frame, frame_NNNN.flo")
        prefix, digits = match.groups()
        following = f"{prefix}{int(digits) + 1:0{len(digits)}d}"
        scene = flow.parent.name
        frames = (root / pass_name / scene / f"{flow.stem}.png", root / pass_name / scene / f"{following}.png")
        for frame in frames:
            if not frame.is_file():
                raise FileNotFoundError(f"{frame}: missing frame of the pair that {flow} describes")
        masks = [root / kind / scene / f"{flow.stem}.png" for kind in ("occlusions", "invalid")]
        pairs.append(FlowPair(scene, flow.stem, frames, flow, *(m if m.is_file() else None for m in masks)))
    return pairs


__all__ = ["DAVIS_RESOLUTIONS", "DAVIS_VOID", "FLO_MAGIC", "JHMDB_JOINTS", "VIP_CLASSES", "DavisSequence",
           "FlowPair", "davis_palette", "davis_sequences", "jhmdb_frames", "jhmdb_split", "read_davis_annotation",
           "read_flo", "read_ids", "read_jhmdb_joints", "read_name_list", "read_rgb", "save_indexed_png",
           "sintel_pairs", "vip_frames", "write_flo"]
