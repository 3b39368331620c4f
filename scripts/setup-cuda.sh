#!/usr/bin/env bash
# What the CUDA backend needs to build and to check its PTX, without a GPU:
#   - MLIR/LLVM 22 from Debian (bookworm-security carries it): melior links libMLIR statically;
#   - libdevice and ptxas from the PyPI package nvidia-cuda-nvcc-cu12 (pinned), installed into
#     ${KILN_CACHE:-~/.cache/kiln}/cuda-tools.
# Idempotent. Prints the toolkit directory (for KILN_CUDA_TOOLKIT) on success.
set -euo pipefail
NVCC_VERSION="12.9.86"
PKGS=(libmlir-22-dev mlir-22-tools llvm-22-dev libpolly-22-dev libclang-22-dev libzstd-dev)

if [[ ! -f /usr/lib/llvm-22/lib/libMLIR.so && ! -d /usr/lib/llvm-22/lib/cmake/mlir ]] || ! dpkg -s "${PKGS[@]}" >/dev/null 2>&1; then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "installing ${PKGS[*]} ..." >&2
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${PKGS[@]}" >&2
fi

DEST="${KILN_CACHE:-$HOME/.cache/kiln}/cuda-tools"
TK="$DEST/nvidia/cuda_nvcc"
if [[ ! -x "$TK/bin/ptxas" || ! -f "$TK/nvvm/libdevice/libdevice.10.bc" ]]; then
    echo "installing nvidia-cuda-nvcc-cu12==$NVCC_VERSION into $DEST ..." >&2
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST" \
        "nvidia-cuda-nvcc-cu12==$NVCC_VERSION" >&2
fi
"$TK/bin/ptxas" --version >/dev/null
echo "$TK"
