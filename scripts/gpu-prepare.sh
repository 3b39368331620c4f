#!/usr/bin/env bash
# Everything a session with a GPU needs, built here in one go (the GPU machine has CUDA, PyTorch
# and ONNX Runtime but no Rust and no MLIR):
#
#   bash scripts/gpu-prepare.sh [--debug]
#
# writes out/gpu/ (ignored by git; the device tool carries it: `carry: ["out/gpu"]`):
#   kiln.xz      kiln built with --features cuda-runtime (driver opened at run time), stripped
#   gc/          scripts/gpu-check.sh prepare: small artifacts of every spec + the interpreter's outputs
#   gb/          scripts/gpu-bench.sh prepare: GEMM 4096^3, MiniLM, GPT-2 small (xz)
# and prints the two device commands (the device machine has the working tree, so the scripts'
# GPU halves run from it). Needs MLIR 22 and the CUDA toolchain (bash scripts/setup-cuda.sh).
# --debug uses debug builds (quicker to build here, slower to compile the benchmark's models).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
flag=--release
if [[ ${1:-} == --debug ]]; then
  profile=debug
  flag=
fi
export MLIR_SYS_220_PREFIX=/usr/lib/llvm-22 TABLEGEN_220_PREFIX=/usr/lib/llvm-22 LIBCLANG_PATH=/usr/lib/llvm-22/lib
KILN_CUDA_TOOLKIT="${KILN_CUDA_TOOLKIT:-$(bash scripts/setup-cuda.sh)}"
export KILN_CUDA_TOOLKIT
out=out/gpu
rm -rf "$out"
mkdir -p "$out"
# The compiler (MLIR linked in) for this machine, and the runtime-only binary for the GPU machine
# in a target directory of its own (the two feature sets would otherwise rebuild each other).
# shellcheck disable=SC2086
cargo build $flag --features cuda --locked
# shellcheck disable=SC2086
cargo build $flag --features cuda-runtime --locked --target-dir target/gpu-runtime
cp "target/gpu-runtime/$profile/kiln" "$out/kiln"
strip "$out/kiln" 2>/dev/null || true
if ldd "$out/kiln" | grep -qi mlir; then
  echo "the runtime binary links MLIR; the GPU machine has none" >&2
  exit 1
fi
export KILN="target/$profile/kiln"
bash scripts/gpu-check.sh prepare "$out/gc"
bash scripts/gpu-bench.sh prepare "$out/gb"
# The device tool carries at most 64 MiB in all.
xz -T0 -f "$out/kiln"
du -sh "$out" "$out"/*
cat <<EOF

On the GPU machine (the device tool; carry ["$out"]):
  xz -dkf $out/kiln.xz && KILN=$out/kiln bash scripts/gpu-check.sh check $out/gc
  xz -dkf $out/kiln.xz && KILN=$out/kiln bash scripts/gpu-bench.sh run $out/gb && cp $out/gb/gpu-bench.json \$OUT/
EOF
