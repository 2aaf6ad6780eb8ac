#!/usr/bin/env bash
# One-command GPU check for a GPU machine WITHOUT a Rust toolchain.
#
#   1. build on the development machine:  cargo build --release -p strata -p strata-bench
#   2. copy beside this script:            target/release/strata  target/release/strata-bench
#                                          configs/gpt-1.3b-h100.toml
#   3. on the GPU machine:                 ./gpu_check.sh            (or: bash gpu_check.sh)
#
# It sets up the library path (CUDA 13 libs in /usr/local/cuda/targets/x86_64-linux/lib are not
# in the loader cache; cudarc wants libnccl.so, not libnccl.so.2), then runs
#   ./strata doctor
#   ./strata selftest --gpu            (every kernel vs the CPU reference, 20-step GPT-2 run vs CPU,
#                                       pinned H2D/D2H bandwidth, one-rank NCCL all_reduce)
#   ./strata-bench train --config gpt-1.3b-h100.toml --steps N --warmup 1 --profile --json
#                                      (GPT 1.3B, bf16, AdamW, everything on the GPU; then one
#                                       step with every kernel and GEMM timed)
# and prints a short table last. Exit status is non-zero if any step failed or throughput is
# below the target.
#
# Environment overrides:
#   STRATA_GPU_CHECK_OUT   output directory for logs            (default: ./gpu_check_out)
#   STRATA_BENCH_CONFIG    TOML config for the throughput run   (default: gpt-1.3b-h100.toml)
#   STRATA_BENCH_STEPS     measured steps                       (default: 20)
#   STRATA_TFLOPS_TARGET   throughput target in TFLOP/s         (default: 300)
#   STRATA_STEP_TIMEOUT_S  time limit per step in seconds       (default: 900)
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
export RUST_BACKTRACE=1       # backtraces for panics
export RUST_LIB_BACKTRACE=0   # not for errors (anyhow would print one with every error)

# --- throughput config (GPT 1.3B, configs/gpt-1.3b-h100.toml) -----------------------------
# Looked up beside this script first (copy it there), then in the repository.
config="${STRATA_BENCH_CONFIG:-}"
if [ -z "$config" ]; then
    for c in "$here/gpt-1.3b-h100.toml" "$here/../configs/gpt-1.3b-h100.toml"; do
        [ -f "$c" ] && config="$c" && break
    done
fi
if [ -z "$config" ] || [ ! -f "$config" ]; then
    echo "gpu_check: configs/gpt-1.3b-h100.toml not found: copy it beside this script or set STRATA_BENCH_CONFIG" >&2
    exit 2
fi
# Shape of the config, for the FLOPs column (the bench reports its own tflops too).
toml_int() { awk -F= -v k="$1" '$1 ~ "^[[:space:]]*"k"[[:space:]]*$" { gsub(/[^0-9]/, "", $2); print $2; exit }' "$config"; }
n_layer="$(toml_int n_layer)"; n_embd="$(toml_int n_embd)"; seq_len="$(toml_int seq_len)"; vocab="$(toml_int vocab_size)"

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
# strata-bench prints one JSON object on stdout (--json); progress lines go to stderr.
echo
echo "=== train: ./strata-bench train --config $config --steps $steps --warmup 1 --profile --json"
timeout "$step_timeout" ./strata-bench train --config "$config" --steps "$steps" --warmup 1 --profile --json \
    > "$out/train.json" 2> >(tee "$out/train.log" >&2)
rc=$?
if [ "$rc" = 124 ]; then status[train]="TIMEOUT (${step_timeout}s)"
elif [ "$rc" = 0 ]; then status[train]="ok"
else status[train]="FAILED (exit $rc)"; fi
cat "$out/train.json"

# --- throughput from the bench's JSON -----------------------------------------------------
# FLOPs per token = 6·params + 12·n_layer·n_embd·seq_len (weights of GPT-2 with tied head).
read -r params flops_per_token < <(awk -v L=$n_layer -v C=$n_embd -v T=$seq_len -v V=$vocab 'BEGIN {
    p = V*C + T*C + L*(12*C*C + 13*C) + 2*C;
    printf "%.0f %.0f\n", p, 6*p + 12*L*C*T }')
tokens_per_s=""; bench_tflops=""
json_field() { grep -o "\"$1\"[[:space:]]*:[[:space:]]*[0-9.eE+-]*" "$out/train.json" | tail -1 | sed 's/.*://; s/[[:space:]]//g'; }
if [ -s "$out/train.json" ]; then
    tokens_per_s="$(json_field tokens_per_s)"
    bench_tflops="$(json_field tflops)"
    bench_params="$(json_field params)"
    [ -n "$bench_params" ] && params="$bench_params"
fi
tflops="-"; verdict="no result"
if [ -n "$tokens_per_s" ]; then
    tflops="$(awk -v t="$tokens_per_s" -v f="$flops_per_token" 'BEGIN { printf "%.1f", t*f/1e12 }')"
    if awk -v x="$tflops" -v y="$target" 'BEGIN { exit !(x >= y) }'; then verdict="PASS"; else verdict="BELOW TARGET"; fi
fi

# --- where the step's time goes (one profiled step after the timed ones) --------------------
if [ -s "$out/train.json" ] && command -v python3 >/dev/null 2>&1; then
    python3 - "$out/train.json" <<'PY'
import json, sys
row = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
ops = row.get("profile") or []
total = sum(o["ms"] for o in ops) or 1.0
print(f"\nprofile of one step: {total:.1f} ms on the compute queue")
for o in ops[:15]:
    print(f"  {o['ms']:8.2f} ms {100 * o['ms'] / total:5.1f}% {o['calls']:6d}x  {o['op']}")
PY
fi

# --- table ----------------------------------------------------------------------------------
echo
echo "gpu_check summary (logs in $out)"
printf '  %-34s %s\n' "strata doctor" "${status[doctor]}"
printf '  %-34s %s\n' "strata selftest --gpu" "${status[selftest]}"
printf '  %-34s %s\n' "strata-bench train (GPT 1.3B bf16)" "${status[train]}"
printf '  %-34s %s\n' "  params / FLOPs per token" "$params / $flops_per_token"
printf '  %-34s %s\n' "  tokens/s" "${tokens_per_s:--}"
printf '  %-34s %s TFLOP/s (bench: %s; target >= %s): %s\n' "  throughput" "$tflops" "${bench_tflops:--}" "$target" "$verdict"

[ "${status[doctor]}" = ok ] && [ "${status[selftest]}" = ok ] && [ "${status[train]}" = ok ] && [ "$verdict" = PASS ]
