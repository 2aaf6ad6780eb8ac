#!/usr/bin/env python3
"""Reads a strata run's `train.tensorboard_dir` with TensorBoard's own loader (EventAccumulator) and prints
every scalar it finds; fails unless the tags strata writes are there with steps 1..N.

    python3 -m venv .venv-tb && .venv-tb/bin/pip install tensorboard
    strata train --steps 20 --set data.val=synthetic --set train.eval_every=10 --set train.tensorboard_dir=runs/tb
    .venv-tb/bin/python scripts/check_tensorboard.py runs/tb --steps 20

CI does not need this: tests/tensorboard.rs checks the same file in Rust.
"""
import argparse
import sys

import tensorboard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TRAIN_TAGS = ["train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tflops", "perf/step_ms"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir")
    parser.add_argument("--steps", type=int, required=True, help="train.steps of the run")
    args = parser.parse_args()

    acc = EventAccumulator(args.logdir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in sorted(tags):
        events = acc.Scalars(tag)
        shown = ", ".join(f"{e.step}: {e.value:.6g}" for e in events[:3])
        print(f"{tag:20} {len(events):4} points  {shown}{', ...' if len(events) > 3 else ''}")

    problems = []
    for tag in TRAIN_TAGS:
        steps = [e.step for e in acc.Scalars(tag)] if tag in tags else []
        if steps != list(range(1, args.steps + 1)):
            problems.append(f"{tag}: steps {steps[:5]}... expected 1..{args.steps}")
    if "val/loss" not in tags:
        problems.append("val/loss missing (was data.val set?)")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        print(f"TensorBoard {tensorboard.__version__} read every scalar of {args.steps} steps")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
