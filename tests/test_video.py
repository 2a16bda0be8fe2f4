"""Opening videos and frame folders, resampling, seeking, the cached index, and bad input."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import frame_index, index_frame, shared_data, write_index_video
from timecycle.video import VideoError, VideoIndex, VideoInfo, natural_key, open_video, probe, resized_size


def write_frames(folder: Path, n: int, names=None, size=(64, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = names[i] if names else f"{i:05d}.png"
        Image.fromarray(index_frame(i, size[1], size[0])).save(folder / name)
    return folder


# ----------------------------------------------------------------------------- reading


def test_probe_and_read_every_frame_of_a_file(tmp_path):
    path = write_index_video(tmp_path / "v.mp4", 30)
    info = probe(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (30, 30.0, 64, 48)
    with open_video(info) as video:
        assert len(video) == 30
        assert [frame_index(f) for f in video] == list(range(30))


def test_random_access_seeks_to_the_right_frame(tmp_path):
    """Reads after a seek (keyframes every 10) and in any order give the frames asked for."""
    video = open_video(write_index_video(tmp_path / "v.mp4", 32, gop=10))
    for indices in ([17], [29, 3, 11], [25, 26, 27], [5, 5, 31], [0]):
        frames = video.read(indices)
        assert frames.shape == (len(indices), 48, 64, 3)
        assert [frame_index(f) for f in frames] == indices


@pytest.mark.parametrize("name,codec", [("v.webm", "libvpx"), ("v.mkv", "libx264"), ("v.avi", "mpeg4"),
                                        ("v.gif", "gif")])
def test_every_container_reads_the_same_way(tmp_path, name, codec):
    video = open_video(write_index_video(tmp_path / name, 24, fps=12, gop=6, codec=codec))
    assert len(video) == 24 and video.info.fps == pytest.approx(12, rel=0.01)
    assert [frame_index(f) for f in video.read([19, 2, 11])] == [19, 2, 11]
    assert [frame_index(f) for f in video] == list(range(24))


def test_window_and_out_of_range(tmp_path):
    video = open_video(write_index_video(tmp_path / "v.mp4", 20))
    assert [frame_index(f) for f in video.read_window(4, 5, step=3)] == [4, 7, 10, 13, 16]
    with pytest.raises(IndexError, match="frame 20 out of range"):
        video.read([20])


def test_resampling_to_a_lower_rate_picks_the_frame_on_screen(tmp_path):
    """At 12 fps from 30, output frame i shows native frame floor(i * 30 / 12)."""
    video = open_video(write_index_video(tmp_path / "v.mp4", 30, fps=30), fps=12)
    assert len(video) == 12  # 1 s of video
    assert [frame_index(f) for f in video.read(range(12))] == [int(i * 2.5) for i in range(12)]
    assert [frame_index(f) for f in video] == [int(i * 2.5) for i in range(12)]


def test_short_side_resize_keeps_aspect(tmp_path):
    video = open_video(write_index_video(tmp_path / "v.mp4", 3), short_side=24)
    assert video.read([0]).shape == (1, 24, 32, 3)
    assert resized_size(854, 480, 256) == (455, 256)
    assert resized_size(480, 854, 256) == (256, 455)


def test_frame_folder_natural_order_and_resampling(tmp_path):
    names = [f"frame{i}.png" for i in range(12)]  # frame10 after frame9, not after frame1
    folder = write_frames(tmp_path / "clip", 12, names=names)
    assert sorted(names, key=natural_key) == names
    info = probe(folder, folder_fps=24)
    assert (info.kind, info.num_frames, info.fps) == ("frames", 12, 24.0)
    assert [frame_index(f) for f in open_video(info)] == list(range(12))
    assert [frame_index(f) for f in open_video(info, fps=12)] == [0, 2, 4, 6, 8, 10]
    assert open_video(info, short_side=24).read([11]).shape == (1, 24, 32, 3)


def test_frames_at():
    info = VideoInfo("x", num_frames=300, fps=30.0, width=4, height=4)
    assert info.duration == 10.0
    assert info.frames_at(None) == 300
    assert info.frames_at(12) == 120


def test_every_sample_video_opens_and_random_access_matches_sequential():
    """The real containers users bring: mp4 (h264), avi (mpeg4), mkv (no frame count), gif."""
    root = shared_data("videos")
    paths = sorted(p for p in root.rglob("*") if p.suffix in {".mp4", ".avi", ".mkv", ".gif"})
    assert {p.suffix for p in paths} == {".mp4", ".avi", ".mkv", ".gif"}
    for path in paths[::3]:
        video = open_video(path, fps=12, short_side=64)
        n = min(len(video), 30)
        sequential = [f for _, f in zip(range(n), video)]
        picks = [n - 1, n // 2, 1]
        assert np.array_equal(video.read(picks), np.stack([sequential[i] for i in picks])), path


def test_frame_counts_of_containers_without_one_in_the_header():
    """mkv and gif count by demuxing; the count must equal a full decode's."""
    import av

    for path in (shared_data("videos", "asl_gestures", "book.mkv"),
                 shared_data("videos", "preview", "people-detection.gif")):
        with av.open(str(path)) as container:
            decoded = sum(1 for _ in container.decode(video=0))
        assert probe(path).num_frames == decoded


# ----------------------------------------------------------------------------- bad input


def test_truncated_video_is_named_and_explained(tmp_path):
    for name in ("car-detection.mp4", "asl_gestures/book.mkv"):
        cut = tmp_path / Path(name).name
        cut.write_bytes(shared_data("videos", name).read_bytes()[:100_000])
        with pytest.raises(VideoError, match="truncated|not a readable video") as err:
            probe(cut)
        assert str(cut) in str(err.value)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.mp4").touch()
    with pytest.raises(VideoError, match=r"empty\.mp4: zero-byte file"):
        open_video(tmp_path / "empty.mp4")


def test_non_video_file_with_a_video_extension(tmp_path):
    (tmp_path / "notes.mp4").write_text("these are my notes, not a video\n" * 100)
    with pytest.raises(VideoError, match=r"notes\.mp4: not a readable video"):
        probe(tmp_path / "notes.mp4")


def test_missing_path(tmp_path):
    with pytest.raises(VideoError, match="no such file or folder"):
        probe(tmp_path / "nope.mp4")


def test_empty_folder(tmp_path):
    (tmp_path / "clip").mkdir()
    with pytest.raises(VideoError, match=r"clip: empty folder"):
        open_video(tmp_path / "clip")
    with pytest.raises(VideoError, match="no videos found"):
        VideoIndex.scan(tmp_path, progress=False)


def test_frame_folder_with_a_non_image_file(tmp_path):
    folder = write_frames(tmp_path / "clip", 3)
    (folder / "readme.txt").write_text("hi")
    with pytest.raises(VideoError, match=r"non-image file: 'readme\.txt'"):
        probe(folder)


def test_frame_folder_with_an_image_that_is_not_one(tmp_path):
    folder = write_frames(tmp_path / "clip", 3)
    (folder / "00003.png").write_text("not a png")
    with pytest.raises(VideoError, match=r"00003\.png: not a readable image"):
        probe(folder)


def test_frames_of_different_sizes(tmp_path):
    folder = write_frames(tmp_path / "clip", 3)
    Image.fromarray(index_frame(3, 40, 40)).save(folder / "00003.png")
    with pytest.raises(VideoError, match=r"frames of different sizes: 00000\.png is 64x48, 00003\.png is 40x40"):
        probe(folder)


def test_a_file_truncated_after_probing_fails_on_read_with_its_name(tmp_path):
    path = write_index_video(tmp_path / "v.mp4", 30, gop=5)
    info = probe(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoError, match=r"v\.mp4"):
        open_video(info).read([29])


# ----------------------------------------------------------------------------- the index


def make_tree(root: Path) -> Path:
    write_index_video(root / "a" / "one.mp4", 30)
    write_index_video(root / "a" / "two.mp4", 20)
    write_frames(root / "b" / "frames", 6)
    (root / "c").mkdir(parents=True)
    (root / "c" / "broken.mp4").write_bytes(b"\x00" * 1000)
    (root / "c" / "empty.mkv").touch()
    (root / "c" / "readme.txt").write_text("not a video, not listed")
    return root


def test_scan_lists_videos_and_skips_broken_ones_with_reasons(tmp_path, caplog):
    root = make_tree(tmp_path / "data")
    index = VideoIndex.scan(root, cache=tmp_path / "index.json", progress=False)
    assert sorted(Path(e.path).name for e in index.entries) == ["frames", "one.mp4", "two.mp4"]
    reasons = dict(index.failures)
    assert set(map(lambda p: Path(p).name, reasons)) == {"broken.mp4", "empty.mkv"}
    assert "zero-byte file" in reasons[str(root / "c" / "empty.mkv")]
    assert "2 unreadable, skipped" in index.summary()
    assert "broken.mp4" in caplog.text


def test_second_scan_uses_the_cache_and_reprobes_only_changed_files(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "data")
    cache = tmp_path / "index.json"
    first = VideoIndex.scan(root, cache=cache, progress=False)
    assert first.probed == 5

    import timecycle.video as video_module

    calls = []
    real_probe = video_module.probe
    monkeypatch.setattr(video_module, "probe", lambda p, fps: calls.append(Path(p).name) or real_probe(p, fps))
    second = VideoIndex.scan(root, cache=cache, progress=False)
    assert calls == [] and second.probed == 0
    assert second.entries == first.entries and second.failures == first.failures

    write_index_video(root / "a" / "two.mp4", 25)  # changed size and mtime
    os.utime(root / "a" / "two.mp4", ns=(1, 1))
    third = VideoIndex.scan(root, cache=cache, progress=False)
    assert calls == ["two.mp4"]
    assert {Path(e.path).name: e.num_frames for e in third.entries}["two.mp4"] == 25


def test_a_damaged_cache_costs_a_reprobe_not_a_crash(tmp_path):
    root = make_tree(tmp_path / "data")
    cache = tmp_path / "index.json"
    cache.write_text("{ not json")
    index = VideoIndex.scan(root, cache=cache, progress=False)
    assert index.probed == 5 and len(index.entries) == 3


def test_default_cache_lives_in_the_user_cache_not_beside_the_data(tmp_path):
    root = make_tree(tmp_path / "data")
    before = sorted(p for p in root.rglob("*"))
    VideoIndex.scan(root, progress=False)
    assert sorted(p for p in root.rglob("*")) == before
    assert list((Path(os.environ["TIMECYCLE_CACHE"]) / "index").glob("*.json"))


def test_scan_of_the_shared_videos():
    index = VideoIndex.scan(shared_data("videos"), progress=False)
    assert len(index.entries) == 31 and not index.failures


def test_a_single_video_or_frame_folder_is_an_index_of_one(tmp_path):
    folder = write_frames(tmp_path / "clip", 4)
    assert [e.path for e in VideoIndex.scan(folder, progress=False).entries] == [str(folder.resolve())]
    path = write_index_video(tmp_path / "v.mp4", 5)
    assert len(VideoIndex.scan(path, progress=False)) == 1

