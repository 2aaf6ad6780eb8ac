#!/usr/bin/env bash
# Peak resident memory of loading a Hugging Face model directory and of exporting it back, per
# rank, with /usr/bin/time -v (its "Maximum resident set size" is the largest process's peak: with
# `strata launch`, the largest rank's).
#
#   bench/memory.sh [MODEL_DIR] [WORK_DIR]
#
# MODEL_DIR defaults to a Qwen2.5-1.5B-shaped random bf16 directory that bench/make_hf_model.py
# writes (3.1 GB, four shards; $PYTHON, default python3, with numpy) when it is absent; WORK_DIR (default /tmp/strata-memory) holds the
# NVMe swap files, the checkpoint and the export: about 25 GB per rank count run, removed between
# runs. The run: ZeRO stage 3 on the CPU backend, parameters and optimizer states on NVMe, one step
# of 64 tokens, a checkpoint, at 1 and 2 ranks; then `strata export --dtype bf16` of the 2-rank
# checkpoint. strata's own log lines (weights read, peak resident memory, device memory by purpose)
# are kept in WORK_DIR/*.log.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-/tmp/strata-memory-model}
work=${2:-/tmp/strata-memory}
strata=$root/target/release/strata
[[ -x $strata ]] || { echo "build first: cargo build --release -p strata" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "needs GNU time at /usr/bin/time" >&2; exit 1; }
if [[ ! -f $model/config.json ]]; then
  "${PYTHON:-python3}" "$root/bench/make_hf_model.py" "$model"  # needs numpy
fi
mkdir -p "$work"
bf16_bytes=$(du -cb "$model"/*.safetensors | tail -1 | cut -f1)

config=$work/memory.toml
cat > "$config" <<EOF
[model]
init_from = "$model"
seq_len = 64

[data]
train = "synthetic"
micro_batch_size = 1

[train]
steps = 1
log_every = 1
device = "cpu"
checkpoint_dir = "$work/ckpt"

[zero]
stage = 3

[offload_param]
device = "nvme"
nvme_path = "$work/nvme"

[offload_optimizer]
device = "nvme"
nvme_path = "$work/nvme"
sub_group_size = 4000000
EOF

# timed NAME CMD...: runs CMD under /usr/bin/time -v; prints its peak and wall time.
timed() {
  local name=$1; shift
  /usr/bin/time -v -o "$work/$name.time" "$@" > "$work/$name.log" 2>&1 || {
    tail -20 "$work/$name.log" >&2; exit 1; }
  local kb wall
  kb=$(awk -F': ' '/Maximum resident set size/{print $2}' "$work/$name.time")
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/{print $2}' "$work/$name.time")
  awk -v n="$name" -v kb="$kb" -v b="$bf16_bytes" -v w="$wall" \
    'BEGIN{printf "%-16s peak RSS %6.2f GiB (%4.1f%% of the bf16 weights), wall %s\n", n, kb/1048576, 100*kb*1024/b, w}'
  grep -h "weights read\|peak resident memory" "$work/$name.log" | sed 's/^.*rank/    rank/' || true
}

awk -v b="$bf16_bytes" -v m="$model" -v c="$(nproc)" 'BEGIN{printf "model: %s, %.2f GB of bf16 weights; %d cores\n", m, b/1e9, c}'
for ranks in 1 2; do
  rm -rf "$work/nvme" "$work/ckpt"
  mkdir "$work/nvme"
  if [[ $ranks == 1 ]]; then
    timed "train-1-rank" "$strata" train "$config"
  else
    timed "train-$ranks-ranks" "$strata" launch --nproc-per-node "$ranks" -- "$strata" train "$config"
  fi
done
rm -rf "$work/nvme" "$work/export"
timed "export-bf16" "$strata" export "$work/ckpt" -o "$work/export" --dtype bf16 --max-shard-size 1GB
du -sh "$work/export"
rm -rf "$work/nvme" "$work/ckpt" "$work/export"
