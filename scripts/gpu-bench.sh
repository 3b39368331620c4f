#!/usr/bin/env bash
# GPU benchmark in two halves, like gpu-check.sh (compiling needs MLIR, the GPU machine has no Rust):
#
#   bash scripts/gpu-bench.sh prepare DIR   # here, kiln built with --features cuda: compiles GEMM
#       4096^3, MiniLM and GPT-2 small (--generate) for --target cuda with random ternary weights
#       (so the artifacts xz-compress to fit a 64 MiB transfer) into DIR/*.kiln.xz
#   bash scripts/gpu-bench.sh run DIR       # on the GPU: KILN names a kiln built with
#       --features cuda-runtime; unpacks the artifacts and runs bench/gpu.py (PyTorch, cuBLAS).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: gpu-bench.sh prepare|run DIR}
dir=${2:?usage: gpu-bench.sh prepare|run DIR}
KILN=${KILN:-target/release/kiln}

# Ternary weights (0, ±s) with kiln's random-weight scales, for every parameter `kiln inspect` lists.
ternary() { # spec out.safetensors [--set ...]
  local spec=$1 out=$2; shift 2
  $KILN inspect "$spec" "$@" | python3 -c '
import json, re, sys, numpy as np
out = sys.argv[1]
rng = np.random.default_rng(0)
params = []
for line in sys.stdin:
    m = re.search(r"= param \"([^\"]+)\" : f32\[([0-9, ]*)\]", line)
    if m:
        params.append((m.group(1), [int(d) for d in m.group(2).split(",") if d.strip()]))
header, blobs, off = {}, [], 0
for name, shape in params:
    n = int(np.prod(shape)) if shape else 1
    if len(shape) >= 2:
        v = rng.integers(-1, 2, n).astype(np.float32) / np.float32(np.sqrt(shape[-1]))
    elif name.endswith("weight"):
        v = np.ones(n, np.float32)
    else:
        v = np.zeros(n, np.float32)
    b = v.tobytes()
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(out, "wb") as f:
    f.write(len(h).to_bytes(8, "little"))
    f.write(h)
    for b in blobs:
        f.write(b)
print(f"{out}: {len(params)} tensors, {off / 2**20:.1f} MiB")
' "$out"
}

case $mode in
prepare)
  mkdir -p "$dir"
  gemm_set=(--set k=4096 --set n=4096 --set rows=4096)
  ternary specs/gemm.ron "$dir/gemm.safetensors" "${gemm_set[@]}"
  $KILN compile specs/gemm.ron "${gemm_set[@]}" --weights "$dir/gemm.safetensors" --target cuda -o "$dir/gemm.kiln" >/dev/null
  ternary specs/minilm.ron "$dir/minilm.safetensors"
  $KILN compile specs/minilm.ron --weights "$dir/minilm.safetensors" --target cuda -o "$dir/minilm.kiln" >/dev/null
  ternary specs/gpt2.ron "$dir/gpt2.safetensors"
  $KILN compile specs/gpt2.ron --weights "$dir/gpt2.safetensors" --generate --target cuda -o "$dir/gpt2.kiln" >/dev/null
  rm -f "$dir"/*.safetensors
  xz -T0 -f "$dir"/*.kiln
  cp bench/gpu.py "$dir/"
  ls -l "$dir"
  ;;
run)
  for f in "$dir"/*.kiln.xz; do xz -dkf "$f"; done
  python3 "$dir/gpu.py" --kiln-bin "$KILN" --dir "$dir" --json-out "$dir/gpu-bench.json"
  ;;
*) echo "usage: gpu-bench.sh prepare|run DIR" >&2; exit 2 ;;
esac
