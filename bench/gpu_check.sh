#!/usr/bin/env bash
# One-command GPU check for a GPU machine WITHOUT a Rust toolchain: strata and PyTorch side by side in one call
# of under 10 minutes, one table at the end.
#
#   1. on the development machine:  bench/gpu_bundle.sh            (cargo build --release, then copies into
#                                   target/gpu_bundle/ everything below; or copy it by hand:)
#        target/release/strata  target/release/strata-bench        (the release binaries)
#        bench/gpu_check.sh  bench/torch_gpt_ref.py  bench/torch_fsdp2_ref.py
#        configs/gpt-1.3b-h100.toml  configs/gpt-1.3b-offload-cpu.toml  configs/gpt-6.7b-offload-cpu.toml
#        configs/gpt-10b-h100-nvme.toml                              (optional: its row is skipped without it)
#      all in one folder (configs may also sit in configs/ beside the script, or in ../configs as in the
#      repository; the binaries in ../target/release as in the repository).
#   2. on the GPU machine:          bash gpu_check.sh
#
# It sets up the library path (CUDA 13 libs in /usr/local/cuda/targets/x86_64-linux/lib are not in the loader
# cache; cudarc wants libnccl.so, not libnccl.so.2), then runs, each with its own time limit under one overall
# deadline (a phase that no longer fits is "skipped (time)" instead of the whole call being killed):
#   strata doctor
#   strata selftest --gpu                               kernels vs the CPU, a GPT-2 run, pinned H2D/D2H, NCCL
#   gpu-1.3b     strata-bench train gpt-1.3b-h100.toml  GPT 1.3B everything on the GPU, with --profile
#   offload-1.3b strata-bench train gpt-1.3b-offload-cpu.toml      ZeRO-3, params + optimizer on pinned host
#                python3 torch_fsdp2_ref.py --config the same      FSDP2 + CPUOffloadPolicy, fused CPU AdamW
#   offload-6.7b the same two for gpt-6.7b-offload-cpu.toml (6.65 B parameters; warm-up 1 + 3 steps)
#   nvme-10b     strata-bench train gpt-10b-h100-nvme.toml, nvme_path set to $out/nvme (warm-up 1 + 1 step)
#   trace-1.3b   strata-bench train gpt-1.3b-offload-cpu.toml --trace: a timeline of the copy streams and kernels
#                (gpu compute / gpu h2d / gpu d2h tracks, CUDA events) beside the host queues, for ui.perfetto.dev
#   torch-1.3b   python3 torch_gpt_ref.py                  plain PyTorch on the GPU: gpu-1.3b's reference
#   llama-1b     strata-bench train llama-3.2-1b-h100.toml Llama 3.2 1B everything on the GPU (GQA, tied head)
#                python3 torch_llama_ref.py --config the same  transformers' LlamaForCausalLM, bf16 autocast, SDPA
#   llama-8b     strata-bench train llama-3.1-8b-offload-cpu.toml  Llama 3.1 8B, ZeRO-3, states on pinned host memory
#                (and what does not fit there on NVMe in $out/nvme); FSDP2 with CPU offload needs 16 B/param of host
#                memory (128 GB) for it and is not run
# PyTorch rows are skipped when `import torch` fails. TFLOP/s are at the median step for both sides, with
# FLOPs/token = 6·params + 12·n_layer·n_embd·seq_len. Targets: gpu-1.3b ≥ $STRATA_TFLOPS_TARGET TFLOP/s; the
# offload rows ≥ 1.5× FSDP2 in the same call (without a PyTorch row: ≥ 1.5× the reference figure measured on the
# H100, 100 TFLOP/s for 1.3B, 106 for 6.65B); nvme-10b: runs a ≥ 10 B model.
#
# Output folder ($out): one log per phase, the JSON rows (rows.jsonl, each with "row" and "tool" added) and
# summary.md (the table and every phase's status), to copy to bench/results/. Exit status: 0 when every phase
# that ran succeeded and every row with a result met its target; 1 otherwise; 2 when a binary is missing.
#
# Environment overrides:
#   STRATA_GPU_CHECK_OUT         output folder                          (default: ./gpu_check_out beside this script)
#   STRATA_GPU_CHECK_DEADLINE_S  the whole call's time                  (default: 560; the device call limit is 600)
#   STRATA_GPU_CHECK_RESERVE_S   kept back at the end for the table     (default: 10)
#   STRATA_GPU_CHECK_MIN_S       a phase starts only with this much time (default: 20)
#   STRATA_GPU_CHECK_ONLY        phases to run, space-separated names   (default: all; e.g. "doctor offload-6.7b")
#   STRATA_BENCH_STEPS           measured steps of gpu-1.3b             (default: 10)
#   STRATA_TFLOPS_TARGET         gpu-1.3b's target in TFLOP/s           (default: 300)
#   STRATA_OFFLOAD_RATIO_TARGET  offload rows: strata / FSDP2           (default: 1.5)
#   STRATA_NVME_DIR              swap folder of nvme-10b and llama-8b (removed after) (default: $out/nvme)
#   PYTHON                       the Python with torch                  (default: python3)
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here" || exit 2
out="${STRATA_GPU_CHECK_OUT:-$here/gpu_check_out}"
deadline="${STRATA_GPU_CHECK_DEADLINE_S:-560}"
reserve="${STRATA_GPU_CHECK_RESERVE_S:-10}"
min_start="${STRATA_GPU_CHECK_MIN_S:-20}"
only="${STRATA_GPU_CHECK_ONLY:-}"
steps="${STRATA_BENCH_STEPS:-10}"
target="${STRATA_TFLOPS_TARGET:-300}"
ratio_target="${STRATA_OFFLOAD_RATIO_TARGET:-1.5}"
python="${PYTHON:-python3}"
mkdir -p "$out"
: > "$out/rows.jsonl"
started_at=$SECONDS

# --- binaries ---------------------------------------------------------------------------------------------------
find_bin() {
    local b
    for b in "$here/$1" "$here/../target/release/$1"; do
        [ -x "$b" ] && { echo "$b"; return 0; }
    done
    return 1
}
if ! strata="$(find_bin strata)" || ! strata_bench="$(find_bin strata-bench)"; then
    echo "gpu_check: strata / strata-bench not found beside $here: build them with" >&2
    echo "           'cargo build --release -p strata -p strata-bench' (or run bench/gpu_bundle.sh) on the" >&2
    echo "           development machine and copy target/release/strata and strata-bench beside this script" >&2
    exit 2
fi
find_file() { # the first of NAME beside this script, in configs/ beside it, in ../configs
    local f
    for f in "$here/$1" "$here/configs/$1" "$here/../configs/$1"; do
        [ -f "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

# --- library path -----------------------------------------------------------------------------------------------
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

# --- phases -----------------------------------------------------------------------------------------------------
declare -A status
phases=()
left() { echo $(( started_at + deadline - SECONDS )); }
# phase_time NAME BUDGET [EXTRA_RESERVE]: sets T to the phase's time limit (its budget, cut to what the deadline
# leaves after the reserve), or sets its status and returns 1 when it is not selected or fewer than $min_start
# seconds are left. Phase names are ROW_TOOL.
T=0
phase_time() {
    local name="$1" budget="$2" avail
    phases+=("$name")
    if [ -n "$only" ] && [[ " $only " != *" $name "* ]] && [[ " $only " != *" ${name%_*} "* ]]; then
        status[$name]="skipped (not selected)"; return 1
    fi
    avail=$(( $(left) - reserve - ${3:-0} - 5 ))   # 5: timeout's grace before SIGKILL
    [ "$avail" -lt "$budget" ] && budget=$avail
    if [ "$budget" -lt "$min_start" ]; then
        status[$name]="skipped (time)"; echo; echo "=== $name: skipped (time: $(left) s left)"; return 1
    fi
    T=$budget
}
skip() { phases+=("$1"); status[$1]="skipped ($2)"; }
# A time limit for the program itself, so that it reports what it measured before the phase's timeout.
soft_limit() { local t="$1" m=$(( $1 / 4 )); [ "$m" -lt 5 ] && m=5; echo $(( t - m > 1 ? t - m : 1 )); }
set_status() { # name rc limit
    if [ "$2" = 124 ] || [ "$2" = 137 ]; then status[$1]="TIMEOUT (${3}s)"
    elif [ "$2" = 0 ]; then status[$1]="ok"
    else status[$1]="FAILED (exit $2)"; fi
}
# run_log NAME LIMIT CMD...: output to NAME.log (and the terminal's last lines).
run_log() {
    local name="$1" t="$2" rc; shift 2
    echo; echo "=== $name (limit ${t}s): $*"
    timeout -k 5 "$t" "$@" > "$out/$name.log" 2>&1
    rc=$?
    tail -n 25 "$out/$name.log"
    set_status "$name" "$rc" "$t"
}
# run_json NAME LIMIT CMD...: stdout (one JSON object) to NAME.json, stderr to NAME.log and the terminal.
run_json() {
    local name="$1" t="$2" rc; shift 2
    echo; echo "=== $name (limit ${t}s): $*"
    timeout -k 5 "$t" "$@" > "$out/$name.json" 2> >(tee "$out/$name.log" >&2)
    rc=$?
    wait 2>/dev/null   # the tee
    set_status "$name" "$rc" "$t"
    if [ -s "$out/$name.json" ] && tail -n 1 "$out/$name.json" | grep -q '^{'; then
        tail -n 1 "$out/$name.json" | sed "s/^{/{\"row\":\"${name%_*}\",\"tool\":\"${name##*_}\",/" >> "$out/rows.jsonl"
    fi
}

torch_ok=""
if "$python" -c 'import torch' >/dev/null 2>&1; then
    torch_ok=1
    "$python" -c 'import torch; print("gpu_check: torch", torch.__version__, "cuda", torch.cuda.is_available())'
else
    echo "gpu_check: '$python -c \"import torch\"' failed: the PyTorch rows are skipped"
fi

if phase_time doctor 30; then run_log doctor "$T" "$strata" doctor; fi
if phase_time selftest 90; then run_log selftest "$T" "$strata" selftest --gpu; fi
# The fused attention kernels have a check of their own in the selftest: where it failed, the training rows
# run with the materialized attention, so one broken kernel does not cost every row of the call.
attn=()
attention="fused"
if grep -q "flash_attention.*FAIL" "$out/selftest.log" 2>/dev/null; then
    attn=(--set 'train.attention="materialized"')
    attention="materialized (the selftest's fused attention check failed)"
    echo "gpu_check: fused attention failed its selftest check: training rows use train.attention = \"materialized\""
fi

# gpu-1.3b: everything on the GPU, then one profiled step.
if ! cfg_gpu="$(find_file gpt-1.3b-h100.toml)"; then skip gpu-1.3b_strata "no config gpt-1.3b-h100.toml"
elif phase_time gpu-1.3b_strata 90; then
    run_json gpu-1.3b_strata "$T" "$strata_bench" train --config "$cfg_gpu" "${attn[@]}" --steps "$steps" --warmup 1 --profile \
        --json --time-limit "$(soft_limit "$T")"
    if [ -s "$out/gpu-1.3b_strata.json" ] && command -v python3 >/dev/null 2>&1; then
        python3 - "$out/gpu-1.3b_strata.json" <<'PY'
import json, sys
try:
    row = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except (ValueError, IndexError):
    sys.exit(0)
ops = row.get("profile") or []
total = sum(o["ms"] for o in ops) or 1.0
print(f"\nprofile of one step: {total:.1f} ms on the compute queue")
for o in ops[:15]:
    print(f"  {o['ms']:8.2f} ms {100 * o['ms'] / total:5.1f}% {o['calls']:6d}x  {o['op']}")
PY
    fi
fi

# offload-*: strata ZeRO-3 with params and optimizer on pinned host memory, then FSDP2 with CPU offload.
offload_pair() { # ROW CONFIG STEPS BUDGET (each side)
    local row="$1" name="$2" n="$3" budget="$4" cfg
    if ! cfg="$(find_file "$name")"; then
        skip "${row}_strata" "no config $name"; skip "${row}_torch" "no config $name"
        return
    fi
    if phase_time "${row}_strata" "$budget"; then
        # --profile: one more step with the copy streams timed by CUDA events (their GB/s and busy time;
        # the host cannot time them, so h2d_gbps / d2h_gbps come from it).
        run_json "${row}_strata" "$T" "$strata_bench" train --config "$cfg" "${attn[@]}" --steps "$n" --warmup 1 --json \
            --time-limit "$(soft_limit "$T")" --profile
    fi
    if [ -z "$torch_ok" ]; then skip "${row}_torch" "no torch"
    elif phase_time "${row}_torch" "$budget"; then
        run_json "${row}_torch" "$T" "$python" "$here/torch_fsdp2_ref.py" --config "$cfg" --steps "$n" --warmup 1 \
            --time-limit "$(soft_limit "$T")"
    fi
}
offload_pair offload-1.3b gpt-1.3b-offload-cpu.toml 5 100
offload_pair offload-6.7b gpt-6.7b-offload-cpu.toml 3 170

# nvme-10b: optimizer states (and whatever else the config puts there) on NVMe, in a folder on this machine's
# disk, removed afterwards. It leaves 40 s for the plain PyTorch reference after it.
if ! cfg_nvme="$(find_file gpt-10b-h100-nvme.toml)"; then skip nvme-10b_strata "no config gpt-10b-h100-nvme.toml"
elif phase_time nvme-10b_strata 300 40; then
    nvme_dir="${STRATA_NVME_DIR:-$out/nvme}"
    mkdir -p "$nvme_dir"
    df -h "$nvme_dir" 2>/dev/null | tail -n 1 | sed 's/^/gpu_check: nvme folder: /'
    run_json nvme-10b_strata "$T" "$strata_bench" train --config "$cfg_nvme" "${attn[@]}" --steps 1 --warmup 1 --json \
        --set "offload_param.nvme_path=\"$nvme_dir\"" --set "offload_optimizer.nvme_path=\"$nvme_dir\"" \
        --time-limit "$(soft_limit "$T")"
    rm -rf "$nvme_dir"
fi

# trace-1.3b: a timeline of two CPU-offload steps (copy streams and kernels timed by CUDA events on the
# gpu compute / gpu h2d / gpu d2h tracks, the host queues beside them) for ui.perfetto.dev; only with time left.
if cfg_trace="$(find_file gpt-1.3b-offload-cpu.toml)" && phase_time trace-1.3b_strata 60 40; then
    run_json trace-1.3b_strata "$T" "$strata_bench" train --config "$cfg_trace" "${attn[@]}" --steps 2 --warmup 1 --json \
        --trace "$out/offload-1.3b.trace.json" --time-limit "$(soft_limit "$T")"
fi

if [ -z "$torch_ok" ]; then skip torch-1.3b_torch "no torch"
elif phase_time torch-1.3b_torch 60; then
    run_json torch-1.3b_torch "$T" "$python" "$here/torch_gpt_ref.py" --steps 10 --warmup 3
fi

# llama-1b: Llama 3.2 1B everything on the GPU, beside transformers' LlamaForCausalLM on the same shape.
if ! cfg_llama="$(find_file llama-3.2-1b-h100.toml)"; then
    skip llama-1b_strata "no config llama-3.2-1b-h100.toml"; skip llama-1b_torch "no config"
else
    if phase_time llama-1b_strata 90; then
        run_json llama-1b_strata "$T" "$strata_bench" train --config "$cfg_llama" "${attn[@]}" --steps "$steps" \
            --warmup 1 --json --time-limit "$(soft_limit "$T")"
    fi
    if [ -z "$torch_ok" ]; then skip llama-1b_torch "no torch"
    elif phase_time llama-1b_torch 60; then
        run_json llama-1b_torch "$T" "$python" "$here/torch_llama_ref.py" --config "$cfg_llama" --device cuda \
            --steps 10 --warmup 3
    fi
fi

# llama-8b: Llama 3.1 8B with ZeRO-3, parameters on pinned host memory, the optimizer where the plan puts it.
if ! cfg_llama8="$(find_file llama-3.1-8b-offload-cpu.toml)"; then skip llama-8b_strata "no config llama-3.1-8b-offload-cpu.toml"
elif phase_time llama-8b_strata 200; then
    nvme_dir="${STRATA_NVME_DIR:-$out/nvme}"
    mkdir -p "$nvme_dir"
    run_json llama-8b_strata "$T" "$strata_bench" train --config "$cfg_llama8" "${attn[@]}" --steps 2 --warmup 1 --json \
        --set "offload_optimizer.nvme_path=\"$nvme_dir\"" --time-limit "$(soft_limit "$T")" --profile
    rm -rf "$nvme_dir"
fi
skip llama-8b_torch "FSDP2 CPU offload needs 16 B/param of host memory: 128 GB for 8B"

# --- the table --------------------------------------------------------------------------------------------------
# jget FILE KEY: a top-level scalar of the JSON object on the file's last line ("" when absent or null).
jget() {
    [ -s "$1" ] || return 0
    tail -n 1 "$1" | grep -o "\"$2\"[[:space:]]*:[[:space:]]*[^,}]*" | head -n 1 \
        | sed 's/^[^:]*:[[:space:]]*//; s/"//g; s/^null$//'
}
num() { [ -n "$1" ] && awk -v x="$1" -v f="$2" 'BEGIN { printf f, x }' || echo "-"; }
# TFLOP/s at the median step: strata-bench's "tflops" is the mean over the timed steps; scale it to the median.
strata_tflops() {
    local f="$1" tf mean med
    tf="$(jget "$f" tflops)"; mean="$(jget "$f" ms_per_step)"; med="$(jget "$f" step_ms_median)"
    [ -n "$tf" ] || return 0
    if [ -n "$mean" ] && [ -n "$med" ]; then awk -v t="$tf" -v a="$mean" -v m="$med" 'BEGIN { printf "%.1f", t * a / m }'
    else num "$tf" %.1f; fi
}
table=()
failed=""
add_row() { # label strata_json torch_json target_kind target
    local label="$1" sj="$2" tj="$3" kind="$4" tgt="$5"
    local st pt ratio verdict h2d d2h io wait nv nr nw sms pms params target_txt
    st="$(strata_tflops "$sj")"
    pt="$(jget "$tj" tflops)"; [ -n "$pt" ] && pt="$(num "$pt" %.1f)"
    ratio="-"; [ -n "$st" ] && [ -n "$pt" ] && ratio="$(awk -v a="$st" -v b="$pt" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')"
    h2d="$(jget "$sj" h2d_gbps)"; d2h="$(jget "$sj" d2h_gbps)"
    io="$(num "$h2d" %.1f) / $(num "$d2h" %.1f)"; [ -z "$h2d$d2h" ] && io="-"
    wait="$(jget "$sj" compute_wait_fraction)"; [ -n "$wait" ] && wait="$(awk -v w="$wait" 'BEGIN { printf "%.0f%%", 100 * w }')"
    nr="$(jget "$sj" nvme_read_gbps)"; nw="$(jget "$sj" nvme_write_gbps)"
    nv="$(num "$nr" %.2f) / $(num "$nw" %.2f)"; [ -z "$nr$nw" ] && nv="-"
    sms="$(jget "$sj" step_ms_median)"; pms="$(jget "$tj" ms_per_step)"
    params="$(jget "$sj" params)"; [ -n "$params" ] || params="$(jget "$tj" params)"
    case "$kind" in
        tflops)
            target_txt=">= $tgt TFLOP/s"
            if [ -z "$st" ]; then verdict="no result"
            elif awk -v x="$st" -v y="$tgt" 'BEGIN { exit !(x >= y) }'; then verdict="PASS"
            else verdict="BELOW"; fi ;;
        ratio) # tgt = "RATIO REFERENCE_TFLOPS"
            local r="${tgt% *}" ref="${tgt#* }"
            target_txt=">= ${r}x FSDP2"
            if [ -z "$st" ]; then verdict="no result"
            elif [ -n "$pt" ]; then
                if awk -v a="$st" -v b="$pt" -v r="$r" 'BEGIN { exit !(a >= r * b) }'; then verdict="PASS"; else verdict="BELOW"; fi
            elif awk -v a="$st" -v b="$ref" -v r="$r" 'BEGIN { exit !(a >= r * b) }'; then verdict="PASS (vs ref $ref)"
            else verdict="BELOW (vs ref $ref)"; fi ;;
        torch) # tgt = RATIO: strata's TFLOP/s at least RATIO times PyTorch's in this call (0: it runs)
            target_txt=">= ${tgt}x torch"; [ "$tgt" = 0 ] && target_txt="runs"
            if [ -z "$st" ]; then verdict="no result"
            elif [ "$tgt" = 0 ]; then verdict="PASS"
            elif [ -z "$pt" ]; then verdict="no torch row (ran)"
            elif awk -v a="$st" -v b="$pt" -v r="$tgt" 'BEGIN { exit !(a >= r * b) }'; then verdict="PASS"
            else verdict="BELOW"; fi ;;
        runs)
            target_txt="runs, >= 10B params"
            if [ -z "$st" ]; then verdict="no result"
            elif awk -v p="${params:-0}" 'BEGIN { exit !(p >= 1e10) }'; then verdict="PASS"
            else verdict="ran, < 10B params"; fi ;;
    esac
    # No result: say why (the phase's status) where it was skipped.
    [ "$verdict" = "no result" ] && [[ "${status[${label}_strata]:-}" == skipped* ]] && verdict="${status[${label}_strata]}"
    case "$verdict" in BELOW*|ran*) failed=1 ;; esac
    table+=("$(printf '| %-14s | %8s | %8s | %6s | %-18s | %-18s | %13s | %7s | %13s | %9s | %9s | %7s |' \
        "$label" "${st:--}" "${pt:--}" "$ratio" "$target_txt" "$verdict" "$io" "${wait:--}" "$nv" \
        "$(num "$sms" %.0f)" "$(num "$pms" %.0f)" "$(num "$params" %.3g)")")
}
add_row gpu-1.3b "$out/gpu-1.3b_strata.json" "$out/torch-1.3b_torch.json" tflops "$target"
add_row offload-1.3b "$out/offload-1.3b_strata.json" "$out/offload-1.3b_torch.json" ratio "$ratio_target 100"
add_row offload-6.7b "$out/offload-6.7b_strata.json" "$out/offload-6.7b_torch.json" ratio "$ratio_target 106"
add_row nvme-10b "$out/nvme-10b_strata.json" /dev/null runs ""
add_row llama-1b "$out/llama-1b_strata.json" "$out/llama-1b_torch.json" torch 1.0
add_row llama-8b "$out/llama-8b_strata.json" /dev/null torch 0

for p in "${phases[@]}"; do
    case "${status[$p]}" in ok|skipped*) ;; *) failed=1 ;; esac
done
gpu="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
h2d_pinned="$(grep -o 'pinned/h2d[^G]*GB/s' "$out/selftest.log" 2>/dev/null | awk '{print $(NF-1)}' | head -n 1)"
d2h_pinned="$(grep -o 'pinned/d2h[^G]*GB/s' "$out/selftest.log" 2>/dev/null | awk '{print $(NF-1)}' | head -n 1)"
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "GPU: ${gpu:-none found}; $(nproc 2>/dev/null) cores; $(awk '/MemTotal/ { printf "%.1f GiB RAM", $2 / 2^20 }' /proc/meminfo 2>/dev/null)"
    [ -f "$here/BUNDLE_COMMIT" ] && echo "strata: $(cat "$here/BUNDLE_COMMIT")"
    echo "torch: $([ -n "$torch_ok" ] && "$python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
    echo "pinned copies (selftest): H2D ${h2d_pinned:--} GB/s, D2H ${d2h_pinned:--} GB/s"
    echo "attention in the training rows: $attention"
    echo "wall time: $(( SECONDS - started_at )) s of a ${deadline} s deadline"
    echo
    echo "| phase | status |"
    echo "|---|---|"
    for p in "${phases[@]}"; do echo "| $p | ${status[$p]} |"; done
    echo
    echo "TFLOP/s at the median step (FLOPs/token = 6·params + 12·L·C·T); strata's H2D/D2H GB/s and compute wait"
    echo "(fraction of the step the compute queue waited for copies) are \"-\" where the bench reports null."
    echo
    printf '| %-14s | %8s | %8s | %6s | %-18s | %-18s | %13s | %7s | %13s | %9s | %9s | %7s |\n' \
        row strata "PyTorch" ratio target verdict "H2D/D2H GB/s" "wait" "NVMe R/W GB/s" "strata ms" "torch ms" params
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${table[@]}"
} > "$out/summary.md"
echo
echo "gpu_check summary ($out/summary.md, rows in $out/rows.jsonl)"
cat "$out/summary.md"
[ -z "$failed" ]
