#!/usr/bin/env bash
# One-command GPU check for a GPU machine WITHOUT a Rust toolchain.
#
#   1. build on the development machine:  cargo build --release -p strata -p strata-bench
#   2. copy beside this script:            target/release/strata  target/release/strata-bench
#   3. on the GPU machine:                 ./gpu_check.sh            (or: bash gpu_check.sh)
#
# It sets up the library path (CUDA 13 libs in /usr/local/cuda/targets/x86_64-linux/lib are not
# in the loader cache; cudarc wants libnccl.so, not libnccl.so.2), then runs
#   ./strata doctor
#   ./strata selftest --gpu            (every kernel vs the CPU reference, 20-step GPT-2 run vs CPU,
#                                       pinned H2D/D2H bandwidth, one-rank NCCL all_reduce)
#   ./strata-bench train --config <GPT 1.3B, bf16, AdamW, all on GPU> --json <file>
# and prints a short table last. Exit status is non-zero if any step failed or throughput is
# below the target.
#
# Environment overrides:
#   STRATA_GPU_CHECK_OUT   output directory for logs            (default: ./gpu_check_out)
#   STRATA_BENCH_CONFIG    TOML config for the throughput run   (default: written below)
#   STRATA_BENCH_STEPS     measured steps                       (default: 20)
#   STRATA_TFLOPS_TARGET   throughput target in TFLOP/s         (default: 300)
#   STRATA_STEP_TIMEOUT_S  time limit per step in seconds       (default: 900)
# NOTE: the CLI names (`doctor`, `selftest --gpu`, `strata-bench train --config --steps --json`)
# and the JSON field `tokens_per_s` follow the lead's CLI; adjust here if they change.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
out="${STRATA_GPU_CHECK_OUT:-$here/gpu_check_out}"
steps="${STRATA_BENCH_STEPS:-20}"
target="${STRATA_TFLOPS_TARGET:-300}"
step_timeout="${STRATA_STEP_TIMEOUT_S:-900}"
mkdir -p "$out"

for bin in strata strata-bench; do
    if [ ! -x "$here/$bin" ]; then
        echo "gpu_check: $here/$bin not found: build it with 'cargo build --release -p strata -p strata-bench'" >&2
        echo "           on the development machine and copy target/release/$bin beside this script" >&2
        exit 2
    fi
done

# --- library path -------------------------------------------------------------------------
libdirs=()
for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    [ -n "$root" ] || continue
    for sub in targets/x86_64-linux/lib lib64; do
        [ -d "$root/$sub" ] && libdirs+=("$root/$sub")
    done
done
# cudarc loads libnccl.so (unversioned); give it a symlink where only libnccl.so.2 exists.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
    nccl2="$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF; exit}')"
    if [ -z "$nccl2" ]; then
        for d in "${libdirs[@]}"; do [ -e "$d/libnccl.so.2" ] && nccl2="$d/libnccl.so.2" && break; done
    fi
    if [ -n "$nccl2" ]; then
        mkdir -p "$out/lib"
        ln -sf "$nccl2" "$out/lib/libnccl.so"
        libdirs=("$out/lib" "${libdirs[@]}")
    fi
fi
joined="$(IFS=:; echo "${libdirs[*]:-}")"
export LD_LIBRARY_PATH="${joined}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu_check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
export RUST_BACKTRACE=1

# --- throughput config (GPT 1.3B) ---------------------------------------------------------
n_layer=24; n_embd=2048; n_head=16; seq_len=1024; vocab=50304; batch=8
config="${STRATA_BENCH_CONFIG:-}"
if [ -z "$config" ]; then
    config="$out/gpt-1.3b-gpu.toml"
    cat > "$config" <<TOML
# GPT 1.3B throughput run written by bench/gpu_check.sh: bf16, AdamW, everything on the GPU.
[model]
n_layer = $n_layer
n_head = $n_head
n_embd = $n_embd
vocab_size = $vocab
seq_len = $seq_len

[data]
synthetic = true
micro_batch_size = $batch
grad_accum_steps = 1

[optim]
lr = 3e-4
weight_decay = 0.1
grad_clip = 1.0

[train]
steps = $steps
log_every = 1
device = "cuda"
precision = "bf16"
TOML
fi

# --- run the three steps --------------------------------------------------------------------
declare -A status
run_step() { # name, log file, command...
    local name="$1" log="$2"; shift 2
    echo
    echo "=== $name: $*"
    timeout "$step_timeout" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ]; then status[$name]="TIMEOUT (${step_timeout}s)"
    elif [ "$rc" = 0 ]; then status[$name]="ok"
    else status[$name]="FAILED (exit $rc)"; fi
}

run_step doctor "$out/doctor.log" ./strata doctor
run_step selftest "$out/selftest.log" ./strata selftest --gpu
run_step train "$out/train.log" ./strata-bench train --config "$config" --steps "$steps" --json "$out/train.json"

# --- throughput from the bench's JSON -----------------------------------------------------
# FLOPs per token = 6·params + 12·n_layer·n_embd·seq_len (weights of GPT-2 with tied head).
read -r params flops_per_token < <(awk -v L=$n_layer -v C=$n_embd -v T=$seq_len -v V=$vocab 'BEGIN {
    p = V*C + T*C + L*(12*C*C + 13*C) + 2*C;
    printf "%.0f %.0f\n", p, 6*p + 12*L*C*T }')
tokens_per_s=""
if [ -s "$out/train.json" ]; then
    tokens_per_s="$(grep -o '"tokens_per_s"[[:space:]]*:[[:space:]]*[0-9.eE+-]*' "$out/train.json" | tail -1 | sed 's/.*://; s/[[:space:]]//g')"
fi
tflops="-"; verdict="no result"
if [ -n "$tokens_per_s" ]; then
    tflops="$(awk -v t="$tokens_per_s" -v f="$flops_per_token" 'BEGIN { printf "%.1f", t*f/1e12 }')"
    if awk -v x="$tflops" -v y="$target" 'BEGIN { exit !(x >= y) }'; then verdict="PASS"; else verdict="BELOW TARGET"; fi
fi

# --- table ----------------------------------------------------------------------------------
echo
echo "gpu_check summary (logs in $out)"
printf '  %-34s %s\n' "strata doctor" "${status[doctor]}"
printf '  %-34s %s\n' "strata selftest --gpu" "${status[selftest]}"
printf '  %-34s %s\n' "strata-bench train (GPT 1.3B bf16)" "${status[train]}"
printf '  %-34s %s\n' "  params / FLOPs per token" "$params / $flops_per_token"
printf '  %-34s %s\n' "  tokens/s" "${tokens_per_s:--}"
printf '  %-34s %s TFLOP/s (target >= %s): %s\n' "  throughput" "$tflops" "$target" "$verdict"

[ "${status[doctor]}" = ok ] && [ "${status[selftest]}" = ok ] && [ "${status[train]}" = ok ] && [ "$verdict" = PASS ]
