#!/usr/bin/env bash
# Puts everything bench/gpu_check.sh needs on a GPU machine (no Rust toolchain there) into one folder:
#   bench/gpu_bundle.sh [DEST]          (default DEST: target/gpu_bundle)
# builds the release binaries (skip with STRATA_BUNDLE_NO_BUILD=1), copies them without debug info (≈ 18 MB
# instead of ≈ 120 MB; symbols stay, for backtraces), gpu_check.sh, the two PyTorch reference scripts and the
# configs of its rows (gpt-10b-h100-nvme.toml only if it exists: its row is skipped without it), and writes
# BUNDLE_COMMIT (the commit, "-dirty" with uncommitted changes), which the summary names. Then, there:
#   bash DEST/gpu_check.sh              (STRATA_GPU_CHECK_OUT=... for the output folder)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dest="${1:-target/gpu_bundle}"

if [ -z "${STRATA_BUNDLE_NO_BUILD:-}" ]; then
    cargo build --release -p strata -p strata-bench
fi
rm -rf "$dest"
mkdir -p "$dest"
for b in strata strata-bench; do
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug -o "$dest/$b" "target/release/$b"
    else
        cp "target/release/$b" "$dest/$b"
    fi
done
cp bench/gpu_check.sh bench/torch_gpt_ref.py bench/torch_llama_ref.py bench/torch_fsdp2_ref.py "$dest/"
for c in gpt-1.3b-h100 gpt-1.3b-offload-cpu gpt-6.7b-offload-cpu gpt-10b-h100-nvme llama-3.2-1b-h100 \
    llama-3.1-8b-offload-cpu; do
    if [ -f "configs/$c.toml" ]; then
        cp "configs/$c.toml" "$dest/"
    else
        echo "gpu_bundle: configs/$c.toml not found: gpu_check.sh skips its row" >&2
    fi
done
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD 2>/dev/null || commit="$commit-dirty"
echo "$commit" > "$dest/BUNDLE_COMMIT"
echo "gpu_bundle: $dest ($(du -sh "$dest" | cut -f1), commit $commit): run 'bash $dest/gpu_check.sh' on the GPU machine"
