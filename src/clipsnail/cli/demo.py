"""`clipsnail demo`: the whole CLIP pipeline on generated shapes data (`clipsnail.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipsnail.cli.common import Subcommands
from clipsnail.demo import DEMO_STEPS, run_demo


def register(sub: Subcommands) -> None:
    p = sub.add_parser("demo", help="generate shapes data, train a small CLIP, evaluate and search (~10 min on a CPU)")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--steps", type=int, help="training steps (default 1500: about 10 minutes on 2 CPU cores)")
    p.add_argument("--quick", action="store_true", help="600 images and 30 steps: a smoke test, not a model")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(Path(args.out), steps=args.steps or (30 if args.quick else DEMO_STEPS), quick=args.quick,
             progress=not args.no_progress)
