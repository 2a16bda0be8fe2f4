"""Benchmark suites (``timecycle evaluate <suite>``) and what they share.

Each suite is a module ``timecycle.evaluate.<suite>`` exposing
``add_arguments(parser)`` and ``run(args) -> int`` (an exit status). The command line
imports every suite to build its parser, so a suite module imports heavy libraries
(torch, the model) inside ``run``, not at its top.

Every suite propagates labels over a benchmark, writes its predictions where the
official tools expect them, scores them and writes the result tables. The helpers
here keep the common options spelled alike in every suite, make an interrupted run
resumable (outputs are written atomically, so a file present is a whole file), and
write tables in one format.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

SUITES = ("davis", "jhmdb", "vip", "flow")


def available_suites() -> dict[str, ModuleType]:
    """The suite modules that exist, by name; one not written yet is left out rather
    than breaking the command line."""
    modules = {}
    for name in SUITES:
        try:
            modules[name] = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the suite exists but needs something missing: that is a real error
    return modules


def add_common_arguments(parser: argparse.ArgumentParser, preset: str = "crw") -> None:
    """--checkpoint, --trust-checkpoint, --preset, --out, --results-dir and --device, with one
    meaning in every suite. ``preset`` is the suite's default propagation protocol."""
    from timecycle.cli import CHECKPOINT_HELP, TRUST_HELP

    parser.add_argument("--checkpoint", default=None,
                        help=f"{CHECKPOINT_HELP}, or a baseline (random-resnet18, imagenet-resnet18, pixels, ...); "
                             "needed unless --results-dir is given")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    parser.add_argument("--preset", default=preset,
                        help=f"propagation protocol: timecycle, crw, dino, vfs (default {preset})")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the predictions (official results layout) and the result tables")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="score this existing results folder instead of propagating")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def load_eval_model(args: argparse.Namespace):
    """The model named by --checkpoint on --device; a clear error when there is none,
    since without --results-dir there is nothing to score otherwise."""
    if args.checkpoint is None:
        raise ValueError("--checkpoint is needed to propagate (or give --results-dir to score existing results)")
    from timecycle.model.checkpoints import load_model

    return load_model(args.checkpoint, device=args.device, trust=args.trust_checkpoint)


def cli_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Decorate a suite's ``run`` so that a bad dataset, checkpoint or video ends in one
    line on stderr and exit status 1, not a traceback: their messages name the file."""

    @functools.wraps(run)
    def guarded(args: argparse.Namespace) -> int:
        from timecycle.video import VideoError

        try:
            return run(args)
        except (ValueError, FileNotFoundError, VideoError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return guarded


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that go by the
    extension work) and move it onto ``path`` only when the block succeeds: an
    interrupted run never leaves a truncated file that resume would take as done."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_complete(folder: str | Path, names: Iterable[str]) -> bool:
    """Whether every expected output file of a sequence is in ``folder``: resume skips
    such a sequence. Sound only for files written through :func:`atomic_write`."""
    folder = Path(folder)
    return folder.is_dir() and all((folder / name).is_file() for name in names)


def format_table(header: Sequence[str], rows: Iterable[Sequence], digits: int = 3) -> str:
    """A plain-text table with right-aligned columns, floats to ``digits`` decimals."""
    cells = [list(header)] + [[_cell(v, digits) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence], digits: int = 3) -> Path:
    """A comma-separated table with floats to ``digits`` decimals, as the official
    evaluators write them (davis2017-evaluation uses "%.3f"), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(_cell(v, digits) for v in row) for row in rows]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def _cell(value, digits: int) -> str:
    real = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)  # numpy floats too
    return f"{value:.{digits}f}" if real else str(value)


__all__ = ["SUITES", "add_common_arguments", "atomic_write", "available_suites", "cli_errors", "format_table",
           "is_complete", "load_eval_model", "write_csv"]
