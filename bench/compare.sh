#!/usr/bin/env bash
# Old code against new on one machine, alternated run by run so that drift (other load, the VM's CPU)
# falls on both alike: strata-bench train on GPT-2 124M (synthetic data, 3 timed steps after 1
# warm-up) with and without activation checkpointing, and bench/overlap.sh (NVMe step against the
# in-memory step). Prints each run as it ends, then the medians per side and the ratio new / old.
#
#   bench/compare.sh [OLD_REV] [ROUNDS]          (defaults: main, 2)
#
# OLD_REV is checked out with `git worktree` under $COMPARE_DIR (default $TMPDIR/strata-compare) and
# built into this checkout's target/ (the dependencies are shared; only the workspace crates build
# twice); each side's strata-bench is copied out after its build. The working tree is the new side.
# Everything under $COMPARE_DIR is removed at the end. Needs cargo, git and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
old_rev=${1:-main}
rounds=${2:-2}
work=${COMPARE_DIR:-${TMPDIR:-/tmp}/strata-compare}
rm -rf "$work"
mkdir -p "$work/bin"
cleanup() {
  git worktree remove --force "$work/old" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
git worktree add --detach "$work/old" "$old_rev" >/dev/null
target=$PWD/target
echo "building $old_rev ($(git -C "$work/old" rev-parse --short HEAD)) and the working tree ($(git rev-parse --short HEAD)$(git diff --quiet || echo ', modified'))" >&2
(cd "$work/old" && cargo build --release -q -p strata-bench --target-dir "$target")
cp "$target/release/strata-bench" "$work/bin/strata-bench-old"
cargo build --release -q -p strata-bench
cp "$target/release/strata-bench" "$work/bin/strata-bench-new"

echo "machine: $(nproc) cores, $(grep -o -w 'avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
out=$work/runs.jsonl
train() { # side label ckpt
  "$work/bin/strata-bench-$1" train --config configs/gpt2-124m.toml --set data.train=synthetic \
    --set "train.activation_checkpointing=$3" --steps 3 --warmup 1 --json 2>/dev/null |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print(json.dumps({"side":sys.argv[1],"run":sys.argv[2],"ms":r["step_ms_median"],"tokens_per_s":r["tokens_per_s"]}))' "$1" "$2"
}
overlap() { # side
  STRATA_BENCH=$work/bin/strata-bench-$1 bench/overlap.sh "$work/nvme" 1 |
    python3 -c '
import json, re, sys
text = sys.stdin.read()
sys.stderr.write(text)
mem = re.search(r"in memory (\d+) ms, NVMe (\d+) ms", text)
print(json.dumps({"side": sys.argv[1], "run": "overlap in memory", "ms": float(mem.group(1))}))
print(json.dumps({"side": sys.argv[1], "run": "overlap nvme", "ms": float(mem.group(2))}))' "$1"
}
for r in $(seq "$rounds"); do
  # Alternate which side goes first, round by round.
  sides=(old new)
  if ((r % 2 == 0)); then sides=(new old); fi
  for side in "${sides[@]}"; do
    for ckpt in false true; do
      train "$side" "gpt2-124m checkpointing=$ckpt" "$ckpt" | tee -a "$out"
    done
    overlap "$side" | tee -a "$out"
  done
done
python3 - "$out" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
runs = sorted({r["run"] for r in rows})
print(f"{'run':<34} {'old ms':>10} {'new ms':>10} {'new/old':>8}   (medians of the rounds' medians)")
for run in runs:
    med = {s: statistics.median(r["ms"] for r in rows if r["run"] == run and r["side"] == s) for s in ("old", "new")}
    print(f"{run:<34} {med['old']:>10.0f} {med['new']:>10.0f} {med['new'] / med['old']:>8.3f}")
EOF
