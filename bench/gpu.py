#!/usr/bin/env python3
"""GPU benchmark: kiln's CUDA artifacts against PyTorch (eager and torch.compile) and cuBLAS.

Runs on the GPU machine (python3, numpy, torch; transformers optional) with the artifacts that
``scripts/gpu-bench.sh prepare DIR`` compiled elsewhere (compiling needs MLIR, running does not):

    python3 bench/gpu.py --kiln-bin ./kiln --dir DIR [--iters 50] [--json-out F]

Rows (medians of --iters timed runs after warm-up, milliseconds; CUDA-synchronised):

* GEMM 4096^3: kiln's ``gemm.kiln`` (f32 in and out, bf16 tensor cores inside, ``kiln bench``
  wall time of whole runs: input upload + conversion to bf16 + product + output download) and its
  product kernel alone (``kiln bench --profile``: host-timed around a synchronised launch), and,
  from PyTorch, cuBLAS at bf16 and at f32 (device-resident tensors, the product only), as TFLOP/s.
  Per-kernel times are printed for every kiln row.
* MiniLM (BERT, 6 layers, hidden 384) at batch x seq 1x128, 8x128, 32x128: kiln (whole runs, and
  runs leaving the outputs on the GPU as PyTorch's stay) vs PyTorch eager
  and torch.compile, f32 (``torch.backends.cuda.matmul.allow_tf32 = False``) and bf16, with random
  weights built from transformers' BertConfig when transformers is installed.
* GPT-2 small decode: kiln ``generate`` (128-token prompt, 64 new tokens, greedy) ms/token vs a
  PyTorch eager greedy loop with the HF KV cache.

Weights are random (ternary on kiln's side, so the artifacts compress): timings only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def timed(fn, iters, warmup):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def kiln_bench(bin_, model, shapes, iters, warmup, profile=False):
    """Median wall ms of whole runs; with `profile`, also {kernel: {"ms", "launches"}} per run."""
    cmd = [bin_, "bench", model, "--iters", str(iters), "--warmup", str(warmup), "--json"]
    if profile:
        cmd.append("--profile")
    for s in shapes:
        cmd += ["--shape", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    j = json.loads(out[-1])
    kiln_bench.resident = j.get("device_resident_median_ms")
    return (j["median_ms"], j.get("kernels", {})) if profile else j["median_ms"]


def print_kernels(label, kernels, top=12):
    total = sum(k["ms"] for k in kernels.values()) or 1e-12
    print(f"  {label}: kernels by time (mean per run, synchronised after each launch; {total:.3f} ms)", flush=True)
    for name, k in sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])[:top]:
        print(f"    {name:24} {k['ms']:9.4f} ms {100 * k['ms'] / total:5.1f}%  {k['launches']:g} launches", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln-bin", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    import torch

    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    # GEMM 4096^3.
    n = 4096
    flop = 2 * n**3
    for env, wg in (("on", "on"), ("on", "off"), ("off", "off")):
        os.environ["KILN_CUDA_MMA"], os.environ["KILN_CUDA_WGMMA"] = env, wg
        ms, kernels = kiln_bench(a.kiln_bin, f"{a.dir}/gemm.kiln", [f"x={n}x{n}"], a.iters, a.warmup, profile=True)
        label = {"on": "bf16 wgmma", "off": "bf16 mma.sync"}[wg] if env == "on" else "f32 SIMT"
        rows.append(("gemm 4096^3", f"kiln ({label}), whole run", ms, flop / ms / 1e9))
        # The product kernel alone (host-timed around a synchronised launch).
        for name in ("gemm_wgmma", "gemm_bf16", "gemm_tc_f32", "gemm_f32"):
            if name in kernels:
                kms = kernels[name]["ms"]
                rows.append(("gemm 4096^3", f"kiln {name} kernel", kms, flop / kms / 1e9))
        print_kernels(f"gemm {label}", kernels)
    os.environ.pop("KILN_CUDA_MMA")
    os.environ.pop("KILN_CUDA_WGMMA")
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(n, n, device=dev, dtype=dt)
        w = torch.randn(n, n, device=dev, dtype=dt)
        ms = timed(lambda: x @ w.t(), a.iters, a.warmup)
        rows.append(("gemm 4096^3", f"cuBLAS {str(dt).split('.')[-1]}", ms, flop / ms / 1e9))
    for r in rows:
        print(f"{r[0]:14} {r[1]:28} {r[2]:9.3f} ms {r[3]:8.1f} TFLOP/s", flush=True)

    try:
        import transformers
    except ImportError:
        transformers = None
        print("transformers is not installed: no PyTorch rows for MiniLM and GPT-2", flush=True)

    # MiniLM.
    for b, s in ((1, 128), (8, 128), (32, 128)):
        shapes = [f"input_ids={b}x{s}", f"attention_mask={b}x{s}", f"token_type_ids={b}x{s}"]
        # Fused attention (the default) and the three-launch form (scores GEMM, softmax, GEMM).
        for flash in ("on", "off"):
            os.environ["KILN_CUDA_FLASH"] = flash
            ms, kernels = kiln_bench(a.kiln_bin, f"{a.dir}/minilm.kiln", shapes, a.iters, a.warmup, profile=True)
            label = "kiln" if flash == "on" else "kiln (attention unfused)"
            rows.append((f"minilm {b}x{s}", label, ms, None))
            # Outputs left on the GPU, as PyTorch's are.
            rows.append((f"minilm {b}x{s}", label + ", outputs on the GPU", kiln_bench.resident, None))
            print(f"minilm {b}x{s} {label}, outputs on the GPU {kiln_bench.resident:.3f} ms", flush=True)
            print(f"minilm {b}x{s} {label} {ms:.3f} ms", flush=True)
            print_kernels(f"minilm {b}x{s} {label}", kernels, top=8)
        os.environ.pop("KILN_CUDA_FLASH")
        # The alternatives a later session picks defaults from: attention on CUDA cores; products
        # by weights below 512 rows register-staged (no bf16 conversion launch).
        for env, val, label in (("KILN_CUDA_TC_ATTENTION", "off", "kiln (attention on CUDA cores)"),
                                ("KILN_CUDA_BF16_MIN_ROWS", "512", "kiln (gemm_tc_f32 below 512 rows)")):
            if env == "KILN_CUDA_BF16_MIN_ROWS" and b * s >= 512:
                continue
            os.environ[env] = val
            ms = kiln_bench(a.kiln_bin, f"{a.dir}/minilm.kiln", shapes, a.iters, a.warmup)
            os.environ.pop(env)
            rows.append((f"minilm {b}x{s}", label, ms, None))
            rows.append((f"minilm {b}x{s}", label + ", outputs on the GPU", kiln_bench.resident, None))
            print(f"minilm {b}x{s} {label} {ms:.3f} ms (outputs on the GPU {kiln_bench.resident:.3f})", flush=True)
        # Products by weights on Hopper's wgmma (opt-in).
        os.environ["KILN_CUDA_WGMMA"] = "on"
        ms, kernels = kiln_bench(a.kiln_bin, f"{a.dir}/minilm.kiln", shapes, a.iters, a.warmup, profile=True)
        os.environ.pop("KILN_CUDA_WGMMA")
        rows.append((f"minilm {b}x{s}", "kiln (wgmma)", ms, None))
        print(f"minilm {b}x{s} kiln (wgmma) {ms:.3f} ms", flush=True)
        print_kernels(f"minilm {b}x{s} kiln (wgmma)", kernels, top=8)
    if transformers is not None:
        cfg = transformers.BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        )
        for dt in (torch.float32, torch.bfloat16):
            m = transformers.BertModel(cfg).to(dev, dt).eval()
            mc = torch.compile(m)
            for b, s in ((1, 128), (8, 128), (32, 128)):
                ids = torch.randint(1000, 30000, (b, s), device=dev)
                mask = torch.ones(b, s, dtype=torch.long, device=dev)
                tt = torch.zeros(b, s, dtype=torch.long, device=dev)
                for name, mod in (("eager", m), ("torch.compile", mc)):
                    with torch.inference_mode():
                        ms = timed(lambda: mod(input_ids=ids, attention_mask=mask, token_type_ids=tt), a.iters, a.warmup)
                    label = f"PyTorch {name} {str(dt).split('.')[-1]}"
                    rows.append((f"minilm {b}x{s}", label, ms, None))
                    print(f"minilm {b}x{s} {label} {ms:.3f} ms", flush=True)

    # GPT-2 small decode.
    import numpy as np

    np.save(f"{a.dir}/prompt.npy", np.random.default_rng(0).integers(0, 50257, (1, 128)).astype(np.int64))
    t = f"{a.dir}/timing.json"
    subprocess.run(
        [a.kiln_bin, "generate", f"{a.dir}/gpt2.kiln", "--prompt-ids", f"{a.dir}/prompt.npy",
         "--max-new-tokens", "64", "--no-stop", "--timing-json", t],
        check=True, capture_output=True,
    )
    j = json.load(open(t))
    step = statistics.median(j["decode_ms"])
    rows.append(("gpt2 decode", "kiln ms/token", step, None))
    print(f"gpt2 decode kiln {step:.3f} ms/token ({1e3 / step:.1f} tok/s)", flush=True)
    if transformers is not None:
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config()).to(dev).eval()
        ids = torch.tensor(np.load(f"{a.dir}/prompt.npy"), device=dev)
        with torch.inference_mode():
            for _ in range(2):
                out = m(ids, use_cache=True)
            torch.cuda.synchronize()
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            ts = []
            for _ in range(64):
                t0 = time.perf_counter()
                out = m(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1e3)
        step = statistics.median(ts)
        rows.append(("gpt2 decode", "PyTorch eager ms/token", step, None))
        print(f"gpt2 decode PyTorch eager {step:.3f} ms/token ({1e3 / step:.1f} tok/s)", flush=True)

    if a.json_out:
        json.dump([{"case": r[0], "engine": r[1], "ms": r[2], "tflops": r[3]} for r in rows], open(a.json_out, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
