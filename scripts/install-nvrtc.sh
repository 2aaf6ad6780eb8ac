#!/usr/bin/env bash
# Installs NVRTC 13.0.88 and the CUDA runtime headers from PyPI wheels into a venv, so that
# every runtime/kernels/*.cu can be compiled through NVRTC on a machine with no GPU and no
# CUDA toolkit (CI). Prints the two variables to export:
#   LD_LIBRARY_PATH   must contain the wheel's lib dir (libnvrtc.so.13, libnvrtc-builtins)
#   STRATA_CUDA_INCLUDE  the wheel's include dir (cuda_bf16.h, cuda_fp16.h, ...)
# Usage: scripts/install-nvrtc.sh [VENV_DIR]        (default: <repo>/.venv-nvrtc)
#        eval "$(scripts/install-nvrtc.sh --env)"   (install if needed, then print exports only)
set -euo pipefail

NVRTC_VERSION=13.0.88
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_only=0
venv_dir="$repo_root/.venv-nvrtc"
for arg in "$@"; do
    case "$arg" in
        --env) env_only=1 ;;
        -h|--help) sed -n 2,9p "$0"; exit 0 ;;
        *) venv_dir="$arg" ;;
    esac
done

log() { if [ "$env_only" = 0 ]; then echo "$@"; else echo "$@" >&2; fi; }

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "install-nvrtc: $python not found; install Python 3 (with venv) first" >&2
    exit 1
fi

if [ ! -x "$venv_dir/bin/pip" ]; then
    log "install-nvrtc: creating venv $venv_dir"
    "$python" -m venv "$venv_dir" >&2
fi

site="$("$venv_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
lib_dir="$site/nvidia/cu13/lib"
include_dir="$site/nvidia/cu13/include"

if [ ! -e "$lib_dir/libnvrtc.so.13" ] || [ ! -e "$include_dir/cuda_bf16.h" ]; then
    log "install-nvrtc: pip install nvidia-cuda-nvrtc==$NVRTC_VERSION nvidia-cuda-runtime==$NVRTC_VERSION"
    "$venv_dir/bin/pip" install --quiet \
        "nvidia-cuda-nvrtc==$NVRTC_VERSION" "nvidia-cuda-runtime==$NVRTC_VERSION" >&2
fi

for f in "$lib_dir/libnvrtc.so.13" "$include_dir/cuda_bf16.h"; do
    if [ ! -e "$f" ]; then
        echo "install-nvrtc: expected $f after install; the wheel layout changed?" >&2
        exit 1
    fi
done

if [ "$env_only" = 0 ]; then
    echo "install-nvrtc: NVRTC $NVRTC_VERSION ready. Export:"
fi
echo "export LD_LIBRARY_PATH=\"$lib_dir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export STRATA_CUDA_INCLUDE=\"$include_dir\""
