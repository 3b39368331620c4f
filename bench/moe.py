#!/usr/bin/env python3
"""What a mixture of experts costs per decoded token (issue 18, part 4): kiln and PyTorch.

Three decoders of one attention shape (hidden 512, 8 heads, 4 key/value heads, 4 layers, vocab
4096), random weights (``torch.manual_seed(--seed)``), saved as Hugging Face folders under
``${KILN_CACHE}/bench/moe/`` and compiled by kiln from the folder (``kiln compile DIR --generate``,
so the import is exercised too):

    moe           MixtralForCausalLM: 8 experts of width 1024, top 2
    dense-active  LlamaForCausalLM, MLP width 2048 = top_k x expert width: the same parameters
                  per token as the mixture (what it should cost if routing is free)
    dense-total   LlamaForCausalLM, MLP width 8192 = experts x expert width: the same stored
                  parameters as the mixture (what it would cost if every expert were read)

For each: a prompt of ``--prompt-len`` (32) ids, ``--new-tokens`` (64) greedy tokens, ``--reps``
(3) runs after one warm-up; decode step time as the median over reps of each rep's median step,
p10/p90 over all steps; tok/s = 1000 / step ms. kiln's "weights read per step" is its runtime's
count (``--timing-json`` ``weight_bytes_per_step``: every weight operand a step reads, a table
lookup counting the rows it gathers, the mixture only the experts its token was routed to).
PyTorch runs eager float32 with ``torch.set_num_threads(--threads)``, a DynamicCache, one forward
per token (transformers' Mixtral loops over the experts that were hit).

Usage: python3 bench/moe.py --kiln-bin target/release/kiln [--threads 2] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BenchError, cache_dir, check_kiln_bin, cpu_model, load_average, now,  # noqa: E402
                    run_kiln)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHAPE = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
             tie_word_embeddings=False)
EXPERTS, TOP_K, EXPERT_FFN = 8, 2, 1024
MODELS = {
    "moe": ("MixtralConfig", "MixtralForCausalLM",
            dict(SHAPE, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)),
    "dense-active": ("LlamaConfig", "LlamaForCausalLM", dict(SHAPE, intermediate_size=TOP_K * EXPERT_FFN)),
    "dense-total": ("LlamaConfig", "LlamaForCausalLM", dict(SHAPE, intermediate_size=EXPERTS * EXPERT_FFN)),
}


def folder(name: str, seed: int):
    """The model's Hugging Face folder (made once) and the model itself, for PyTorch."""
    import torch
    import transformers

    cfg_cls, model_cls, kw = MODELS[name]
    config = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    d = cache_dir() / "bench" / "moe" / f"{name}-seed{seed}"
    if not (d / "model.safetensors").is_file():
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d)
    return d, model


def torch_decode(model, prompt, n_new: int) -> dict:
    import torch

    ids = torch.from_numpy(prompt)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens, prefill_ms, steps = [int(nxt.item())], (time.perf_counter() - t0) * 1e3, []
        past = out.past_key_values
        for _ in range(n_new - 1):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt.item()))
            steps.append((time.perf_counter() - t0) * 1e3)
            past = out.past_key_values
    return {"prefill_ms": prefill_ms, "decode_ms": steps, "tokens": tokens}


def kiln_decode(kiln: str, artifact: Path, prompt, n_new: int, threads: int, work: Path) -> dict:
    import numpy as np

    p, out = work / "prompt.npy", work / "timing.json"
    np.save(p, prompt)
    run_kiln([kiln, "generate", str(artifact), "--prompt-ids", str(p), "--max-new-tokens", str(n_new),
              "--threads", str(threads), "--no-stop", "--timing-json", str(out)], "generate")
    res = json.loads(out.read_text())
    if len(res.get("decode_ms", [])) != n_new - 1 or "weight_bytes_per_step" not in res:
        raise BenchError(f"kiln generate: {out} lacks decode_ms or weight_bytes_per_step: {str(res)[:300]}")
    return res


def summary(runs: list[dict]) -> dict:
    import numpy as np

    step = float(np.median([np.median(r["decode_ms"]) for r in runs]))
    every = np.concatenate([r["decode_ms"] for r in runs])
    lo, hi = float(np.percentile(every, 10)), float(np.percentile(every, 90))
    return {"step_ms": step, "tok_s": 1e3 / step, "tok_s_p10": 1e3 / hi, "tok_s_p90": 1e3 / lo}


def cell(s: dict) -> str:
    return f"{s['tok_s']:.1f} [{s['tok_s_p10']:.1f}–{s['tok_s_p90']:.1f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln-bin", default="target/release/kiln")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    kiln = check_kiln_bin(args.kiln_bin)
    prompt = np.random.default_rng(7).integers(0, SHAPE["vocab_size"], (1, args.prompt_len), dtype=np.int64)
    rows, level = {}, "unknown"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in MODELS:
            d, model = folder(name, args.seed)
            artifact = d / "model.kiln"
            run_kiln([kiln, "compile", str(d), "--generate", "-O2", "-o", str(artifact)], "compile")
            k_runs = [kiln_decode(kiln, artifact, prompt, args.new_tokens, args.threads, work)
                      for _ in range(args.reps + 1)][1:]
            t_runs = [torch_decode(model, prompt, args.new_tokens) for _ in range(args.reps + 1)][1:]
            level = k_runs[0].get("level", level)
            same = k_runs[0]["tokens"] == t_runs[0]["tokens"]
            rows[name] = {
                "stored_mib": k_runs[0]["weight_bytes_stored"] / 2**20,
                "read_mib": float(np.mean([r["weight_bytes_per_step"] for r in k_runs])) / 2**20,
                "kiln": summary(k_runs), "torch": summary(t_runs), "same_tokens": same,
            }
            print(f"{name}: done", file=sys.stderr)
    print(f"# Mixture of experts, decode — {now()}, {cpu_model()}, {args.threads} threads, "
          f"kiln level {level}, load {load_average()}, torch {torch.__version__}\n")
    print("| model | weights stored (MiB) | kiln: read per decode step (MiB) | kiln tok/s | PyTorch tok/s | kiln/PyTorch | same greedy tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        ratio = r["kiln"]["tok_s"] / r["torch"]["tok_s"]
        print(f"| {name} | {r['stored_mib']:.1f} | {r['read_mib']:.1f} | {cell(r['kiln'])} | {cell(r['torch'])} "
              f"| {ratio:.2f}x | {'yes' if r['same_tokens'] else 'no'} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"cpu": cpu_model(), "kiln_level": level, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
