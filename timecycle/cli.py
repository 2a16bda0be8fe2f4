"""The ``timecycle`` command: argument parsing only; the work is done by the library."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

NOT_BUILT: dict[str, str] = {}
CHECKPOINT_HELP = ("a checkpoint: ours, the TimeCycle release (checkpoint_14.pth.tar), CRW's release "
                   "(pretrained.pth) or a torchvision ResNet-18/50 state dict")
TRUST_HELP = ("unpickle classes beyond tensors and plain values from the checkpoint; this can run any code "
              "it names: only for files from a source you trust")


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

    train = sub.add_parser("train", help="self-supervised training on a folder of videos (torchrun for several GPUs)")
    train.add_argument("--config", default="cpu-small",
                       help="a preset (timecycle-r50, crw-r18, cpu-small) or a YAML file naming one and "
                            "overriding fields")
    train.add_argument("--objective", choices=["timecycle", "crw"],
                       help="TimeCycle's tracked cycles or the contrastive random walk (default: the config's)")
    train.add_argument("--data", type=Path, required=True, help="a folder of videos and/or frame folders")
    train.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, TensorBoard logs, summary")
    train.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                       help="continue from a checkpoint (default: the run folder's last one)")
    train.add_argument("--init", metavar="CHECKPOINT",
                       help=f"start a new run from the weights of {CHECKPOINT_HELP} (fine-tuning)")
    train.add_argument("--max-steps", type=int, help="stop after this many steps in all")
    train.add_argument("--minutes", type=float, help="stop after this much training time")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="clips per step over all processes")
    train.add_argument("--workers", type=int, help="data-loader processes per training process")
    train.add_argument("--freeze-encoder-steps", type=int,
                       help="warm-up steps in which only the tracker learns (the remedy when training stalls)")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the GPU of this process if any)")

    demo = sub.add_parser("demo", help="the offline demo: generate videos, train for minutes, score, make pictures",
                          description="Generate synthetic videos, train cpu-small on them (CRW by default), compare J&F of the "
                                      "trained model with its initialisation and raw pixels on held-out clips, "
                                      "propagate a logo through a real video, and write pictures. About 10 "
                                      "minutes on 2 CPU cores; no data, no internet.")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="folder to write everything into (default demo-output)")
    demo.add_argument("--minutes", type=float, default=5.0, help="training budget (default 5)")
    demo.add_argument("--video", type=Path,
                      help="a video (file or frame folder) to propagate the logo through, instead of the sample")
    demo.add_argument("--seconds", type=float, help="how much of the video to propagate through (default 3)")
    demo.add_argument("--clips", type=int, default=64, help="synthetic training videos (default 64)")
    demo.add_argument("--objective", choices=("crw", "timecycle"), default="crw",
                      help="what cpu-small learns from: the contrastive random walk (default, learns within "
                           "the demo's minutes) or the paper's TimeCycle tracker")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--tiny", action="store_true",
                      help="toy sizes and two training steps: checks the pipeline in under a minute")

    prop = sub.add_parser("propagate", help="carry a first-frame mask or points through a video")
    prop.add_argument("--video", type=Path, required=True, help="a video file or frame folder")
    what = prop.add_mutually_exclusive_group(required=True)
    what.add_argument("--mask", type=Path, help="first-frame mask: palette PNG of object ids, or 0/255 grey PNG")
    what.add_argument("--points", type=Path, help="JSON list of [x, y] points on the first frame")
    prop.add_argument("--checkpoint", default="random-resnet18",
                      help=f"{CHECKPOINT_HELP}, or a baseline: random-resnet18, random-resnet50, "
                           "imagenet-resnet18, imagenet-resnet50 (downloads), pixels")
    prop.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    prop.add_argument("--out", type=Path, required=True, help="folder for masks/ or points.json, and overlay.mp4")
    prop.add_argument("--preset", default="crw", help="propagation protocol: timecycle, crw, dino, vfs")
    prop.add_argument("--no-overlay", action="store_true", help="skip the overlay video")
    prop.add_argument("--device", default="cpu")

    convert = sub.add_parser("convert", help="write a checkpoint of any recognised format as ours")
    convert.add_argument("src", type=Path, metavar="IN", help=CHECKPOINT_HELP)
    convert.add_argument("dst", type=Path, metavar="OUT", help="the timecycle checkpoint to write")
    convert.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)

    from timecycle.evaluate import available_suites

    evaluate = sub.add_parser("evaluate", help="propagate over a benchmark, write official-layout results, score them")
    suites = evaluate.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, module in available_suites().items():
        suite = suites.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        module.add_arguments(suite)
        suite.set_defaults(run_suite=module.run)

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

    if args.command == "evaluate":
        return args.run_suite(args)
    if args.command == "synth":
        return _synth(args)
    if args.command == "train":
        return _train(args)
    if args.command == "propagate":
        return _propagate(args)
    if args.command == "convert":
        return _convert(args)
    if args.command == "demo":
        return _demo(args)

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


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from timecycle.config import load_train_config
    from timecycle.train import LAST, train
    from timecycle.video import VideoError

    cfg = load_train_config(args.config)
    flags = {"objective": args.objective, "max_steps": args.max_steps, "minutes": args.minutes, "epochs": args.epochs,
             "batch_size": args.batch_size, "workers": args.workers,
             "freeze_encoder_steps": args.freeze_encoder_steps, "seed": args.seed}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    resume = args.out / LAST if args.resume == "last" else args.resume
    try:
        summary = train(cfg, args.data, args.out, resume=resume, device=args.device, init=args.init)
    except (VideoError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    losses = ", ".join(f"{k} {v:.4f}" for k, v in summary["losses"].items())
    print(f"trained {summary['steps']} steps ({losses}); checkpoint {summary['checkpoint']}")
    return 0


def _propagate(args: argparse.Namespace) -> int:
    from timecycle import load_model
    from timecycle.track import read_points, track_mask, track_points
    from timecycle.video import VideoError

    try:
        model = load_model(args.checkpoint, device=args.device, trust=args.trust_checkpoint)
        if args.mask is not None:
            summary = track_mask(args.video, args.mask, model, args.out, args.preset, overlay=not args.no_overlay,
                                 device=args.device)
        else:
            summary = track_points(args.video, read_points(args.points), model, args.out, args.preset,
                                   overlay=not args.no_overlay, device=args.device)
    except (VideoError, ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(", ".join(f"{k}: {v}" for k, v in summary.items() if v is not None))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from timecycle.demo import DemoConfig, run_demo
    from timecycle.video import VideoError

    changes = {"video": args.video, "seed": args.seed, "objective": args.objective}
    if args.seconds is not None:
        changes["video_seconds"] = args.seconds
    cfg = DemoConfig.tiny(**changes) if args.tiny else DemoConfig(
        minutes=args.minutes, train_clips=args.clips, **changes)
    try:
        run_demo(args.out, cfg)
    except (VideoError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _convert(args: argparse.Namespace) -> int:
    from timecycle.model.checkpoints import convert_checkpoint
    from timecycle.model.formats import FORMAT_NAMES

    try:
        fmt = convert_checkpoint(args.src, args.dst, trust=args.trust_checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"converted {args.src} ({FORMAT_NAMES[fmt]}) to {args.dst}")
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
