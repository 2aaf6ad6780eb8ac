#!/usr/bin/env python3
"""Draws a strata `--trace` timeline as a PNG: one row per queue per rank, slices coloured by kind.

A picture for the README; to explore a trace, open it in ui.perfetto.dev instead.

    python3 -m venv .venv-plot && .venv-plot/bin/pip install matplotlib
    strata train --nproc 2 --steps 4 --trace trace.json
    .venv-plot/bin/python scripts/draw_trace.py trace.json -o timeline.png --first-step 3 --steps 1
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

TRACK_ORDER = ["host", "compute", "h2d", "d2h", "comm", "fetch", "io", "optimizer", "gpu compute"]
KINDS = [  # (label, colour, test on the slice name)
    ("wait for an event", "#d9d9d9", lambda n: n == "wait for event"),
    ("optimizer", "#9467bd", lambda n: n in ("adamw", "grad_norm_squared", "host adamw", "gradient intake")),
    ("NVMe", "#17becf", lambda n: n.startswith("nvme")),
    ("backward", "#d62728", lambda n: "backward" in n),
    ("forward", "#1f77b4", lambda n: "forward" in n),
    ("copy / memset", "#2ca02c", lambda n: n.startswith("copy") or n == "memset"),
    ("collective", "#ff7f0e", lambda n: n.startswith("all_") or n.startswith("reduce") or n == "broadcast"),
    ("host: step and its phases", "#8c8c8c", lambda n: True),
]


def kind(name):
    for label, colour, test in KINDS:
        if test(name):
            return label, colour
    raise AssertionError(name)


def load(path):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    slices = {}
    for e in events:
        if e.get("ph") == "X":
            track = names.get((e["pid"], e["tid"]), str(e["tid"]))
            slices.setdefault((e["pid"], track), []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    return slices


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--first-step", type=int, default=1, help="first step drawn (rank 0's host 'step' spans)")
    parser.add_argument("--steps", type=int, default=1, help="steps drawn")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()

    slices = load(args.trace)
    steps = sorted(s for s in slices.get((0, "host"), []) if s[2] == "step")
    window = steps[args.first_step - 1 : args.first_step - 1 + args.steps]
    if not window:
        sys.exit(f"{args.trace}: no step {args.first_step} on rank 0's host track")
    lo, hi = window[0][0], window[-1][1]
    pad = 0.02 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    rows = sorted(slices, key=lambda k: (k[0], TRACK_ORDER.index(k[1]) if k[1] in TRACK_ORDER else 99, k[1]))
    fig, ax = plt.subplots(figsize=(13, 0.42 * len(rows) + 1.6), dpi=110)
    labels = []
    for row, key in enumerate(rows):
        y = len(rows) - 1 - row
        labels.append((y, f"rank {key[0]}  {key[1]}"))
        # Nested host spans: depth d is drawn thinner, inside its parent's band.
        open_ends = []
        for start, end, name in sorted(slices[key], key=lambda s: (s[0], -s[1])):
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            depth = len(open_ends)
            open_ends.append(end)
            if end < lo or start > hi:
                continue
            height = 0.8 * (0.55 ** depth)
            _, colour = kind(name)
            ax.broken_barh([(start / 1e3, (end - start) / 1e3)], (y - height / 2, height),
                           facecolors=colour, edgecolors="white", linewidth=0.2)
            if depth == 1 and (end - start) > 0.06 * (hi - lo):
                ax.text((start + end) / 2e3, y, name, ha="center", va="center", fontsize=7, color="white")
        if key[0] != rows[0][0] and row > 0 and rows[row - 1][0] != key[0]:
            ax.axhline(y + 0.5, color="black", linewidth=0.6)
    ax.set_yticks([y for y, _ in labels], [label for _, label in labels], fontsize=8)
    ax.set_xlim(lo / 1e3, hi / 1e3)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", linewidth=0.3)
    ax.set_title(args.title or args.trace, fontsize=10)
    fig.legend(handles=[Patch(color=c, label=l) for l, c, _ in KINDS], loc="lower center",
               ncol=len(KINDS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(args.output)


if __name__ == "__main__":
    main()
