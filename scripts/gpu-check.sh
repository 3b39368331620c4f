#!/usr/bin/env bash
# Differential test of the CUDA backend against the reference interpreter, in two halves, so the
# GPU machine needs neither Rust nor MLIR:
#
#   bash scripts/gpu-check.sh prepare DIR   # here: kiln built with --features cuda (MLIR + ptxas)
#       compiles small versions of the bundled specs (random weights; f32, int8 and int4) for
#       --target cuda, and writes their inputs and the interpreter's outputs as .npy files.
#   bash scripts/gpu-check.sh check DIR     # on the GPU: kiln built with --features cuda-runtime
#       runs every artifact on the GPU and compares each output with the interpreter's
#       (python3 + numpy), and greedy decoding with the cache on the GPU against the CPU; exits
#       non-zero on any mismatch.
#
# KILN (default target/release/kiln) names the binary. DIR holds everything `check` needs.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: gpu-check.sh prepare|check DIR}
dir=${2:?usage: gpu-check.sh prepare|check DIR}
KILN=${KILN:-target/release/kiln}

# name | spec | --set overrides | extra compile flags | inputs (name:dtype:shape[:kind])
cases=(
  "mlp|specs/mlp.ron||--random-weights 1|x:f32:3x16"
  "minilm|specs/minilm.ron|layers=2 vocab=500 hidden=64 heads=4 ffn=128|--random-weights 1|input_ids:i64:2x9 attention_mask:i64:2x9:mask token_type_ids:i64:2x9:zeros"
  "gpt2|specs/gpt2.ron|layers=2 vocab=500 hidden=64 heads=4 max_pos=64|--random-weights 1|input_ids:i64:2x7"
  "llama|specs/llama.ron|layers=2 vocab=500 hidden=64 heads=4 kv_heads=2 ffn=128 max_pos=64 eps=1e-6|--random-weights 1|input_ids:i64:2x7"
  "llama-tc|specs/llama.ron|layers=2 vocab=500 hidden=64 heads=4 kv_heads=2 ffn=136 max_pos=64 eps=1e-6|--random-weights 1|input_ids:i64:3x40"
  "gpt2-int8|specs/gpt2.ron|layers=2 vocab=500 hidden=64 heads=4 max_pos=64|--random-weights 1 --quantize int8|input_ids:i64:2x7"
  "gpt2-int4|specs/gpt2.ron|layers=2 vocab=500 hidden=64 heads=4 max_pos=64|--random-weights 1 --quantize int4:32|input_ids:i64:2x7"
  "minilm-o0|specs/minilm.ron|layers=1 vocab=500 hidden=64 heads=4 ffn=128|--random-weights 1 -O0|input_ids:i64:2x9 attention_mask:i64:2x9:mask token_type_ids:i64:2x9:zeros"
  # Enough rows (>= 32) for the tensor-core GEMMs, with partial tiles in every direction and an odd
  # inner dimension (ffn=201).
  "minilm-tc|specs/minilm.ron|layers=2 vocab=500 hidden=96 heads=4 ffn=201|--random-weights 1|input_ids:i64:4x40 attention_mask:i64:4x40:mask token_type_ids:i64:4x40:zeros"
  # One product with many k-tiles (the copy pipeline wraps its 3 stages 6 times) and 3 x 3 tiles of
  # 128, partial at the edges: gemm_bf16 on its own.
  "gemm-tc|specs/gemm.ron|k=584 n=300 rows=260|--random-weights 1|x:f32:260x584"
  # Head dimensions 32, 64 and 128 with >= 32 query rows: the tensor-core attention kernels (with
  # a padded row, causal, grouped-query; several 64-key steps and 64-row blocks).
  "minilm-att32|specs/minilm.ron|layers=2 vocab=500 hidden=128 heads=4 ffn=256|--random-weights 1|input_ids:i64:3x70 attention_mask:i64:3x70:mask token_type_ids:i64:3x70:zeros"
  "gpt2-att64|specs/gpt2.ron|layers=2 vocab=500 hidden=128 heads=2 max_pos=160|--random-weights 1|input_ids:i64:2x150"
  "llama-att128|specs/llama.ron|layers=1 vocab=500 hidden=256 heads=2 kv_heads=1 ffn=256 max_pos=128 eps=1e-6|--random-weights 1|input_ids:i64:1x100"
  "gpt2-tc-int8|specs/gpt2.ron|layers=2 vocab=500 hidden=64 heads=4 max_pos=64|--random-weights 1 --quantize int8|input_ids:i64:3x40"
  "gpt2-tc-int4|specs/gpt2.ron|layers=2 vocab=500 hidden=64 heads=4 max_pos=64|--random-weights 1 --quantize int4:32|input_ids:i64:3x40"
)

sets() { for s in $1; do printf -- '--set %s ' "$s"; done; }

case $mode in
prepare)
  mkdir -p "$dir"
  for c in "${cases[@]}"; do
    IFS='|' read -r name spec set flags ins <<<"$c"
    mkdir -p "$dir/$name"
    args=()
    for i in $ins; do
      IFS=':' read -r iname dt shape kind <<<"$i"
      python3 - "$dir/$name/in.$iname.npy" "$dt" "$shape" "${kind:-}" <<'PY'
import sys, numpy as np
path, dt, shape, kind = sys.argv[1], sys.argv[2], [int(d) for d in sys.argv[3].split("x")], sys.argv[4]
rng = np.random.default_rng(7)
if dt == "f32":
    a = rng.standard_normal(shape).astype(np.float32)
elif kind == "mask":
    a = np.ones(shape, np.int64); a[-1, shape[-1] // 2:] = 0   # the last row is padded
elif kind == "zeros":
    a = np.zeros(shape, np.int64)
else:
    a = rng.integers(0, 500, shape).astype(np.int64)
np.save(path, a)
PY
      args+=(--input "$iname=$dir/$name/in.$iname.npy")
    done
    # shellcheck disable=SC2046,SC2086
    $KILN compile "$spec" $(sets "$set") $flags --target cuda -o "$dir/$name/model.kiln" >"$dir/$name/compile.txt"
    # The reference: the interpreter on the same (quantized) graph is the artifact's own plan run on
    # the CPU target, compiled identically.
    # shellcheck disable=SC2046,SC2086
    $KILN compile "$spec" $(sets "$set") $flags -o "$dir/$name/cpu.kiln" >/dev/null
    # shellcheck disable=SC2046,SC2086
    $KILN run "$spec" $(sets "$set") --random-weights 1 "${args[@]}" >"$dir/$name/interp.txt"
    outs=$(sed -n 's/^\([A-Za-z_0-9.]*\): .*/\1/p' "$dir/$name/interp.txt")
    oargs=(); for o in $outs; do oargs+=(--output "$o=$dir/$name/want.$o.npy"); done
    if [[ $flags == *--quantize* ]]; then
      # Quantized graphs: the reference is the CPU backend on the same quantized artifact (itself
      # checked against the interpreter by tests/quant.rs).
      $KILN run "$dir/$name/cpu.kiln" "${args[@]}" "${oargs[@]}" >/dev/null 2>&1
    else
      # shellcheck disable=SC2046,SC2086
      $KILN run "$spec" $(sets "$set") --random-weights 1 "${args[@]}" "${oargs[@]}" >/dev/null 2>&1
    fi
    rm -f "$dir/$name/cpu.kiln"
    printf '%s\n' "${args[@]}" >"$dir/$name/args.txt"
    echo "prepared $name: $(grep -c . "$dir/$name/args.txt") input args, outputs: $outs"
  done
  # Decoding: greedy tokens of a GPT-2-style decoder with its key/value cache on the GPU, against
  # the CPU backend's (itself checked against transformers by tests/decode.rs).
  mkdir -p "$dir/decode"
  set_dec="layers=2 vocab=500 hidden=64 heads=4 max_pos=64"
  # shellcheck disable=SC2046
  $KILN compile specs/gpt2.ron $(sets "$set_dec") --random-weights 3 --generate --target cuda -o "$dir/decode/model.kiln" >/dev/null
  # shellcheck disable=SC2046
  $KILN compile specs/gpt2.ron $(sets "$set_dec") --random-weights 3 --generate -o "$dir/decode/cpu.kiln" >/dev/null
  python3 -c "import numpy as np; np.save('$dir/decode/prompt.npy', np.array([[5, 17, 99, 3, 250, 41, 7]], np.int64))"
  $KILN generate "$dir/decode/cpu.kiln" --prompt-ids "$dir/decode/prompt.npy" --max-new-tokens 16 --no-stop \
      --timing-json "$dir/decode/want.json" >/dev/null 2>&1
  rm -f "$dir/decode/cpu.kiln"
  echo "prepared decode: $(python3 -c "import json; print(json.load(open('$dir/decode/want.json'))['tokens'])")"
  # The same for a Llama-style decoder (grouped-query attention, rotary tables computed on the GPU).
  mkdir -p "$dir/decode-llama"
  set_llama="layers=2 vocab=500 hidden=64 heads=4 kv_heads=2 ffn=128 max_pos=64 eps=1e-6"
  # shellcheck disable=SC2046
  $KILN compile specs/llama.ron $(sets "$set_llama") --random-weights 3 --generate --target cuda -o "$dir/decode-llama/model.kiln" >/dev/null
  # shellcheck disable=SC2046
  $KILN compile specs/llama.ron $(sets "$set_llama") --random-weights 3 --generate -o "$dir/decode-llama/cpu.kiln" >/dev/null
  cp "$dir/decode/prompt.npy" "$dir/decode-llama/prompt.npy"
  $KILN generate "$dir/decode-llama/cpu.kiln" --prompt-ids "$dir/decode-llama/prompt.npy" --max-new-tokens 16 --no-stop \
      --timing-json "$dir/decode-llama/want.json" >/dev/null 2>&1
  rm -f "$dir/decode-llama/cpu.kiln"
  echo "prepared decode-llama: $(python3 -c "import json; print(json.load(open('$dir/decode-llama/want.json'))['tokens'])")"
  # The artifacts are mostly PTX text: compressed, DIR fits the device machine's transfer limit
  # beside a kiln binary.
  xz -T0 -f "$dir"/*/model.kiln
  du -sh "$dir"
  ;;
check)
  for f in "$dir"/*/model.kiln.xz; do xz -dkf "$f"; done
  # Five times: KILN_CUDA_MMA=off (every product in f32: tight tolerance, and the decoded tokens
  # must match the CPU's) with fused attention and without it (KILN_CUDA_FLASH=off: scores GEMM,
  # softmax kernel, GEMM), then tensor cores (bf16 operands: relative L2 error <= 2e-2): the
  # defaults (gemm_bf16, tensor-core attention), attention on CUDA cores (so a failure points at
  # one kernel family), and Hopper's wgmma (gemm_wgmma, opt-in until this passes; on a GPU other
  # than compute capability 9.0 that pass repeats the defaults).
  fail=0
  for mode in off:on:off:on off:off:off:on on:on:off:on on:on:off:off on:on:on:on; do
  IFS=':' read -r KILN_CUDA_MMA KILN_CUDA_FLASH KILN_CUDA_WGMMA KILN_CUDA_TC_ATTENTION <<<"$mode"
  export KILN_CUDA_MMA KILN_CUDA_FLASH KILN_CUDA_WGMMA KILN_CUDA_TC_ATTENTION
  echo "== KILN_CUDA_MMA=$KILN_CUDA_MMA KILN_CUDA_FLASH=$KILN_CUDA_FLASH KILN_CUDA_WGMMA=$KILN_CUDA_WGMMA KILN_CUDA_TC_ATTENTION=$KILN_CUDA_TC_ATTENTION"
  for c in "${cases[@]}"; do
    IFS='|' read -r name _ <<<"$c"
    mapfile -t args <"$dir/$name/args.txt"
    oargs=(); for w in "$dir/$name"/want.*.npy; do o=${w##*/want.}; o=${o%.npy}; oargs+=(--output "$o=$dir/$name/got.$o.npy"); done
    if ! $KILN run "$dir/$name/model.kiln" "${args[@]}" "${oargs[@]}" >"$dir/$name/run.txt" 2>&1; then
      echo "FAIL $name: $(tail -1 "$dir/$name/run.txt")"; fail=1; continue
    fi
    python3 - "$dir/$name" "$name" <<'PY' || fail=1
import os, sys, glob, numpy as np
d, name = sys.argv[1], sys.argv[2]
bad = False
for w in sorted(glob.glob(f"{d}/want.*.npy")):
    o = w[len(d) + 6:-4]
    want, got = np.load(w), np.load(f"{d}/got.{o}.npy")
    if want.shape != got.shape:
        print(f"FAIL {name}/{o}: shape {got.shape}, want {want.shape}"); bad = True; continue
    diff = want.astype(np.float64) - got
    err = float(np.max(np.abs(diff))) if want.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(want.astype(np.float64)), 1e-30)) if want.size else 0.0
    if os.environ.get("KILN_CUDA_MMA") == "off" or not np.issubdtype(want.dtype, np.floating):
        ok = err <= 1e-4 + 1e-3 * scale
    else:
        ok = rel <= 2e-2
    print(f"{'ok  ' if ok else 'FAIL'} {name}/{o}: max |diff| {err:.3e} (max |want| {scale:.3e}), relative L2 {rel:.2e}")
    bad |= not ok
sys.exit(1 if bad else 0)
PY
  done
  for dec in decode decode-llama; do
  if $KILN generate "$dir/$dec/model.kiln" --prompt-ids "$dir/$dec/prompt.npy" --max-new-tokens 16 --no-stop \
      --timing-json "$dir/$dec/got.json" >"$dir/$dec/run.txt" 2>&1; then
    python3 - "$dir/$dec" <<'PY' || fail=1
import json, sys
d = sys.argv[1]
want, got = json.load(open(f"{d}/want.json")), json.load(open(f"{d}/got.json"))
ok = want["tokens"] == got["tokens"]
print(f"{'ok  ' if ok else 'FAIL'} {d.rsplit('/', 1)[-1]}: GPU tokens {got['tokens']}" + ("" if ok else f", CPU {want['tokens']}"))
print(f"     decode median {sorted(got['decode_ms'])[len(got['decode_ms']) // 2]:.3f} ms/step on the GPU")
sys.exit(0 if ok else 1)
PY
  else
    echo "FAIL $dec: $(tail -1 "$dir/$dec/run.txt")"; fail=1
  fi
  done
  done
  exit $fail
  ;;
*) echo "usage: gpu-check.sh prepare|check DIR" >&2; exit 2 ;;
esac
