#!/usr/bin/env bash
# Offload overlap: the same ZeRO-3 step with every state in (device) memory and with parameters and
# optimizer states on NVMe, alternated in one run, on a model where the disk keeps up (the step's
# compute at least twice the step's NVMe bytes over the disk's measured rate). Prints the disk rate,
# the NVMe bytes per step, each round's median step time and the ratio NVMe / in memory.
#
#   bench/overlap.sh [NVME_DIR] [ROUNDS]        (defaults: /tmp/strata-overlap, 3)
#
# Needs target/release/strata-bench (cargo build --release; or the binary in $STRATA_BENCH) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/strata-overlap}
rounds=${2:-3}
bench=${STRATA_BENCH:-target/release/strata-bench}
mkdir -p "$dir"
# 8 layers of width 512 (29.5M parameters), 8 x 256 tokens per step, stage 3 on the CPU backend.
model=(--set model.n_layer=8 --set model.n_embd=512 --set model.n_head=8 --set model.vocab_size=8192
  --set model.seq_len=256 --set data.micro_batch_size=8 --set zero.stage=3 --set 'train.device="cpu"'
  --set "offload_param.nvme_path=\"$dir\"" --set "offload_optimizer.nvme_path=\"$dir\"")
tier() { echo --set "offload_param.device=\"$1\"" --set "offload_optimizer.device=\"$1\""; }

# The disk's rate at the engine's request size (4 MiB, queue depth 32), write then read.
io=$("$bench" io --path "$dir" --size 1GiB --block-size 4MiB --queue-depth 32 --json 2>/dev/null | tail -1)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for r in $(seq "$rounds"); do
  for t in none nvme; do
    # shellcheck disable=SC2046
    "$bench" train "${model[@]}" $(tier "$t") --steps 4 --warmup 1 --json 2>/dev/null |
      python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["round"]=int(sys.argv[1]); print(json.dumps(r))' "$r" >>"$out"
  done
done
python3 - "$out" "$io" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
io = json.loads(sys.argv[2])
write, read = io["write_gbps"], io["read_gbps"]
print(f"disk (strata-bench io, 4 MiB x QD 32): write {write:.2f} GB/s, read {read:.2f} GB/s")
nv = [r for r in rows if r["offload_optimizer"] == "nvme"]
mem = [r for r in rows if r["offload_optimizer"] == "device"]
rb = statistics.median(r["nvme_read_bytes_per_step"] for r in nv)
wb = statistics.median(r["nvme_write_bytes_per_step"] for r in nv)
disk_s = rb / 1e9 / read + wb / 1e9 / write
compute_s = statistics.median(r["step_ms_median"] for r in mem) / 1e3
print(f"NVMe per step: read {rb/1e6:.0f} MB, write {wb/1e6:.0f} MB = {disk_s*1e3:.0f} ms at the disk's rates; "
      f"in-memory step {compute_s*1e3:.0f} ms = {compute_s/disk_s:.2f} x the disk time")
ratios = []
for a, b in zip(mem, nv):
    ratios.append(b["step_ms_median"] / a["step_ms_median"])
    print(f"round {a['round']}: in memory {a['step_ms_median']:.0f} ms, NVMe {b['step_ms_median']:.0f} ms "
          f"(compute waited {100*(b['compute_wait_fraction'] or 0):.0f}%), ratio {ratios[-1]:.2f}")
print(f"ratio NVMe / in memory: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
EOF
