"""The ``timecycle`` command: argument parsing only; the work is done by the library."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

NOT_BUILT = {
    "train": "self-supervised training (the model and training issue)",
    "propagate": "label propagation (the propagation issue)",
    "evaluate": "the DAVIS / JHMDB / VIP / flow suites (the evaluation issue)",
    "demo": "the offline demo (the demo issue)",
}


def _parser() -> argparse.ArgumentParser:
    from timecycle import __version__

    parser = argparse.ArgumentParser(
        prog="timecycle",
        description="Learn visual correspondence from the cycle-consistency of time, "
        "and track masks, keypoints and textures through video.",
    )
    parser.add_argument("--version", action="version", version=f"timecycle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser("info", help="versions, device and threads; probe a video or index a folder of videos")
    info.add_argument("--video", type=Path, help="a video file or frame folder: frames, fps, size, decode speed")
    info.add_argument("--fps", type=float, default=None, help="rate to read --video at (native when unset)")
    info.add_argument("--short-side", type=int, default=None, help="resize --video's short side to this")
    info.add_argument("--index", type=Path, metavar="ROOT",
                      help="scan a folder tree of videos (cached) and list the unreadable ones")
    info.add_argument("--cache", type=Path, default=None, help="index cache file (default: user cache folder)")

    synth = sub.add_parser("synth", help="generate synthetic videos with exact masks, keypoints and flow")
    synth.add_argument("--out", type=Path, required=True, help="folder to write into")
    synth.add_argument("--clips", type=int, default=4)
    synth.add_argument("--layout", choices=["mp4", "frames", "davis", "jhmdb", "sintel"], default="mp4",
                       help="unlabeled videos (mp4 or frame folders) or a benchmark's official layout")
    synth.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("W", "H"))
    synth.add_argument("--frames", type=int, default=64)
    synth.add_argument("--objects", type=int, default=3)
    synth.add_argument("--seed", type=int, default=0)

    for name, what in NOT_BUILT.items():
        sub.add_parser(name, help=f"{what}: not built yet", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args, rest = _parser().parse_known_args(argv)
    if args.command in NOT_BUILT:
        print(f"timecycle {args.command}: not built yet ({NOT_BUILT[args.command]}).", file=sys.stderr)
        return 2
    if rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")

    if args.command == "synth":
        return _synth(args)

    from timecycle.info import describe_environment, describe_index, describe_video
    from timecycle.video import VideoError

    print(describe_environment())
    try:
        if args.video is not None:
            print(describe_video(args.video, fps=args.fps, short_side=args.short_side))
        if args.index is not None:
            print(describe_index(args.index, cache=args.cache))
    except VideoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _synth(args: argparse.Namespace) -> int:
    from timecycle.data import synthetic

    width, height = args.size
    cfg = synthetic.SyntheticConfig(height=height, width=width, frames=args.frames, num_objects=args.objects,
                                    first_frame_objects=args.layout in ("davis", "jhmdb"))
    clips = synthetic.generate_set(cfg, args.clips, args.seed)
    if args.layout in ("mp4", "frames"):
        written = synthetic.write_videos(clips, args.out, format=args.layout)
    else:
        written = getattr(synthetic, f"write_{args.layout}")(clips, args.out)
    print(f"wrote {len(written)} synthetic clips ({args.layout}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
