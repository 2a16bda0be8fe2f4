"""Synthetic clips: their ground truth must agree with their pixels, and the writers
must produce files that read back like the official datasets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from timecycle.data.datasets import davis_palette, read_flo, save_indexed_png, write_flo
from timecycle.data.synthetic import (
    SyntheticClip,
    SyntheticConfig,
    generate_clip,
    generate_set,
    write_davis,
    write_jhmdb,
    write_sintel,
    write_videos,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Fast objects in a small frame, so that short clips show entering, leaving and occlusion.
CFG = SyntheticConfig(height=80, width=96, frames=48, num_objects=4, speed=3.0)
SMALL = SyntheticConfig(height=32, width=48, frames=6)


@pytest.fixture(scope="module")
def clips() -> list[SyntheticClip]:
    return list(generate_set(CFG, 3, seed=0))


@pytest.fixture(scope="module")
def clip(clips: list[SyntheticClip]) -> SyntheticClip:
    return clips[0]


def bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample (H, W, C) at real coordinates, clamped to the border: (N,) -> (N, C)."""
    h, w = image.shape[:2]
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(int), w - 2)
    y0 = np.minimum(np.floor(y).astype(int), h - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx
    bottom = image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def flow_targets(clip: SyntheticClip, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel of frame t goes in t+1, (H, W, 2) x, y, and whether it is visible there."""
    h, w = clip.masks.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs, ys], -1) + clip.flow[t], ~clip.occlusion[t]


def test_same_seed_same_clip_other_seed_other_clip() -> None:
    a, b, c = generate_clip(SMALL, 7), generate_clip(SMALL, 7), generate_clip(SMALL, 8)
    for field in ("frames", "masks", "keypoints", "visible", "flow", "occlusion"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert not np.array_equal(a.frames, c.frames)
    assert not np.array_equal(a.flow, c.flow)
    short, long = list(generate_set(SMALL, 2, seed=1)), list(generate_set(SMALL, 3, seed=1))
    assert [s.name for s in long] == ["synth0000", "synth0001", "synth0002"]
    assert np.array_equal(short[1].frames, long[1].frames)
    assert not np.array_equal(long[0].frames, long[1].frames)


def test_shapes_and_types(clip: SyntheticClip) -> None:
    T, H, W, J = CFG.frames, CFG.height, CFG.width, CFG.num_objects * CFG.keypoints_per_object
    assert clip.frames.shape == (T, H, W, 3) and clip.frames.dtype == np.uint8
    assert clip.masks.shape == (T, H, W) and clip.masks.dtype == np.uint8
    assert clip.keypoints.shape == (T, J, 2) and clip.keypoints.dtype == np.float32
    assert clip.visible.shape == (T, J) and clip.visible.dtype == bool
    assert clip.flow.shape == (T - 1, H, W, 2) and clip.flow.dtype == np.float32
    assert clip.occlusion.shape == (T - 1, H, W) and clip.occlusion.dtype == bool
    assert set(np.unique(clip.masks)) <= set(range(CFG.num_objects + 1))


def test_warping_next_frame_by_flow_reproduces_frame(clip: SyntheticClip) -> None:
    def warp_error(t: int, dx: float) -> float:
        target, visible = flow_targets(clip, t)
        x, y = target[visible].T
        warped = bilinear(clip.frames[t + 1].astype(np.float64), x + dx, y)
        return float(np.abs(warped - clip.frames[t][visible]).mean())

    exact = np.mean([warp_error(t, 0.0) for t in range(CFG.frames - 1)])
    # Measured 0.65 to 0.87 grey levels over 8 seeds: bilinear error on the finest octave,
    # uint8 rounding, and pixels next to object edges.
    assert exact < 1.2
    # The texture must be rich enough that a flow one pixel off is clearly worse.
    assert warp_error(0, 1.0) > 3 * exact


def test_masks_move_with_the_flow(clip: SyntheticClip) -> None:
    agree = total = 0
    for t in range(CFG.frames - 1):
        target, visible = flow_targets(clip, t)
        nearest = np.rint(target[visible]).astype(int)  # visible targets are inside the frame
        agree += np.count_nonzero(clip.masks[t + 1][nearest[:, 1], nearest[:, 0]] == clip.masks[t][visible])
        total += np.count_nonzero(visible)
    assert agree / total > 0.99


def test_occlusion_marks_covered_and_departing_pixels(clip: SyntheticClip) -> None:
    h, w = clip.masks.shape[1:]
    for t in range(CFG.frames - 1):
        target, visible = flow_targets(clip, t)
        outside = (target[..., 0] < -0.5) | (target[..., 0] >= w - 0.5)
        outside |= (target[..., 1] < -0.5) | (target[..., 1] >= h - 0.5)
        assert not (visible & outside).any()
    assert 0 < clip.occlusion.mean() < 0.2


def test_objects_enter_leave_and_occlude_each_other(clips: list[SyntheticClip]) -> None:
    entered = left = hidden = False
    for clip in clips:
        ids = np.arange(1, CFG.num_objects + 1)
        present = (clip.masks[..., None] == ids).any(axis=(1, 2))  # (T, K)
        entered |= (present[1:] & ~present[:-1]).any()
        left |= (present[:-1] & ~present[1:]).any()
        x, y = clip.keypoints[..., 0], clip.keypoints[..., 1]
        inside = (x >= -0.5) & (x < CFG.width - 0.5) & (y >= -0.5) & (y < CFG.height - 0.5)
        hidden |= (inside & ~clip.visible).any()  # covered by a nearer object while in the frame
        assert not (clip.visible & ~inside).any()
    assert entered and left and hidden


def test_visible_keypoints_sit_on_their_object(clip: SyntheticClip) -> None:
    P = CFG.keypoints_per_object
    owner = np.repeat(np.arange(1, CFG.num_objects + 1), P)
    t, j = np.nonzero(clip.visible)
    x, y = np.rint(clip.keypoints[t, j]).astype(int).T
    # Visibility is exact at the point while the mask samples pixel centres, so a keypoint
    # just beside a nearer object's edge may round onto that object; it stays within a pixel.
    assert (clip.masks[t, y, x] == owner[j]).mean() > 0.95
    padded = np.pad(clip.masks, ((0, 0), (1, 1), (1, 1)))
    near = np.zeros(len(t), dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= padded[t, y + dy, x + dx] == owner[j]
    assert near.all()


def test_keypoints_move_by_the_flow_of_their_object(clip: SyntheticClip) -> None:
    # An object's flow is affine in the pixel position, so bilinear interpolation between
    # four pixels of the same object gives the flow at the keypoint exactly.
    owner = np.repeat(np.arange(1, CFG.num_objects + 1), CFG.keypoints_per_object)
    t, j = np.nonzero(clip.visible[:-1])
    x, y = clip.keypoints[t, j].T.astype(np.float64)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    inner = (x0 >= 0) & (x0 < CFG.width - 1) & (y0 >= 0) & (y0 < CFG.height - 1)
    t, j, x, y, x0, y0 = (a[inner] for a in (t, j, x, y, x0, y0))
    fx, fy = x - x0, y - y0
    same = np.ones(len(t), dtype=bool)
    flow = np.zeros((len(t), 2))
    for dy in (0, 1):
        for dx in (0, 1):
            same &= clip.masks[t, y0 + dy, x0 + dx] == owner[j]
            weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            flow += weight[:, None] * clip.flow[t, y0 + dy, x0 + dx]
    assert same.sum() > 100
    moved = clip.keypoints[t + 1, j] - clip.keypoints[t, j]
    assert np.abs(flow - moved)[same].max() < 1e-3


def test_davis_palette_matches_the_released_annotations() -> None:
    palette = davis_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    released = Image.open(SHARED_DATA / "davis2017-multiobject-sample/Annotations/bmx-trees/00000.png")
    assert np.array_equal(np.array(released.getpalette(), dtype=np.uint8).reshape(-1, 3), palette)


def test_write_davis_reads_back(tmp_path: Path) -> None:
    clips = list(generate_set(SMALL, 2, seed=3))
    assert write_davis(clips, tmp_path) == ["synth0000", "synth0001"]
    assert (tmp_path / "ImageSets/2017/val.txt").read_text().split() == ["synth0000", "synth0001"]
    for clip in clips:
        for t in range(SMALL.frames):
            annotation = Image.open(tmp_path / f"Annotations/480p/{clip.name}/{t:05d}.png")
            assert annotation.mode == "P"
            assert np.array_equal(np.array(annotation), clip.masks[t])
            assert annotation.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
            frame = np.array(Image.open(tmp_path / f"JPEGImages/480p/{clip.name}/{t:05d}.jpg"))
            assert frame.shape == clip.frames[t].shape
            assert np.abs(frame.astype(int) - clip.frames[t]).mean() < 3


def test_save_indexed_png_rejects_non_uint8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        save_indexed_png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.int32))


def test_flo_round_trip_and_bad_files(tmp_path: Path) -> None:
    flow = np.random.default_rng(0).normal(size=(5, 7, 2)).astype(np.float32)
    path = tmp_path / "a.flo"
    write_flo(path, flow)
    assert path.stat().st_size == 12 + 5 * 7 * 8
    back = read_flo(path)
    assert back.dtype == np.float32 and np.array_equal(back, flow)

    bad = tmp_path / "bad_magic.flo"
    bad.write_bytes(np.float32(1.0).tobytes() + path.read_bytes()[4:])
    with pytest.raises(ValueError, match="bad_magic.flo"):
        read_flo(bad)
    short = tmp_path / "short.flo"
    short.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="short.flo.*truncated"):
        read_flo(short)


def test_sintel_flow_reads_with_the_shared_reader() -> None:
    flow = read_flo(SHARED_DATA / "sintel-sample/flow/alley_1/frame_0002.flo")
    assert flow.shape == (436, 1024, 2) and np.isfinite(flow).all()


def test_write_jhmdb_positions_are_one_based(tmp_path: Path) -> None:
    clip = generate_clip(SMALL, 5, name="video")
    write_jhmdb([clip], tmp_path, action="wave")
    names = sorted(p.name for p in (tmp_path / "Rename_Images/wave/video").iterdir())
    assert names == [f"{t:05d}.png" for t in range(1, SMALL.frames + 1)]
    first = np.array(Image.open(tmp_path / "Rename_Images/wave/video/00001.png"))
    assert np.array_equal(first, clip.frames[0])
    pos = scipy.io.loadmat(tmp_path / "joint_positions/wave/video/joint_positions.mat")["pos_img"]
    assert pos.shape == (2, 15, SMALL.frames)
    assert np.allclose(pos, clip.keypoints[:, :15].transpose(2, 1, 0).astype(np.float64) + 1)
    with pytest.raises(ValueError, match="keypoints"):
        write_jhmdb([generate_clip(SyntheticConfig(height=8, width=8, frames=2, num_objects=1), 0)], tmp_path)


def test_write_sintel_layout(tmp_path: Path) -> None:
    clip = generate_clip(SMALL, 6, name="seq")
    write_sintel([clip], tmp_path)
    assert len(list((tmp_path / "clean/seq").iterdir())) == SMALL.frames
    assert len(list((tmp_path / "flow/seq").iterdir())) == SMALL.frames - 1
    assert np.array_equal(np.array(Image.open(tmp_path / "clean/seq/frame_0001.png")), clip.frames[0])
    assert np.array_equal(read_flo(tmp_path / "flow/seq/frame_0002.flo"), clip.flow[1])
    occlusion = np.array(Image.open(tmp_path / "occlusions/seq/frame_0002.png"))
    assert np.array_equal(occlusion, clip.occlusion[1].astype(np.uint8) * 255)


def test_write_videos(tmp_path: Path) -> None:
    import av

    clip = generate_clip(SMALL, 9, name="v")
    (path,) = write_videos([clip], tmp_path / "mp4")
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == clip.frames.shape
    error = np.abs(decoded.astype(int) - clip.frames).mean(axis=(1, 2, 3))  # (T,)
    # yuv420p halves the colour resolution of a colourful texture: about 5 grey levels.
    assert error.max() < 8
    other = generate_clip(SMALL, 10).frames
    assert np.abs(decoded.astype(int) - other).mean() > 3 * error.mean()
    (folder,) = write_videos([clip], tmp_path / "png", format="frames")
    assert np.array_equal(np.array(Image.open(folder / f"{SMALL.frames - 1:05d}.png")), clip.frames[-1])
    with pytest.raises(ValueError, match="format"):
        write_videos([clip], tmp_path, format="gif")
