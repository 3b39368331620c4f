#!/usr/bin/env python3
"""Benchmark greedy decoding of GPT-2 small (124M, fp32, CPU): kiln vs PyTorch eager.

Weights
    A randomly initialised GPT-2 small (vocab 50257, n_positions 1024, n_embd 768,
    12 layers, 12 heads, gelu_new; ``torch.manual_seed(--weights-seed)``) is
    created once; its ``GPT2LMHeadModel.transformer`` parameters are saved to
    ``${KILN_CACHE}/bench/gpt2-small-random/model.safetensors`` (+ config.json),
    like scripts/make-references.py does (the LM head is tied to ``wte``), and
    reused afterwards, so both engines run the very same weights.

Cases (same prompt ids for both engines: uniform in [0, 50257), fixed seed)
    (a) prompt ``--prompt-len`` (128) tokens, ``--new-tokens`` (64) generated.
    (b) context sweep: for each C in ``--contexts`` (32,256,1024), a prompt of
        C - ``--sweep-new`` tokens and ``--sweep-new`` (16) generated, so the
        last decode step attends to C - 1 tokens (total length C <= 1024).
    Generating N tokens is one prefill (whose argmax is the first token; its
    time is the time to first token, TTFT) and N - 1 single-token decode steps.
    Decode speed is 1000 / (median per-step ms) tokens/s.  Every case is run
    ``--warmup`` (1) times untimed, then ``--reps`` (3) times; the tables show
    the median over reps of each rep's TTFT and of each rep's median step time.

    * PyTorch: ``GPT2LMHeadModel``, float32, ``eval()``, ``torch.inference_mode()``,
      ``torch.set_num_threads(T)``, attention ``--attn`` (default ``sdpa``, as in
      bench/compare.py; one quick check on the busy 2-core dev machine had it ~10%
      ahead of ``eager`` at both prefill 128 and decode).  Prefill = one forward
      over the prompt with ``use_cache=True`` and ``logits_to_keep=1`` (as
      ``generate()`` does: only the last position's logits), then argmax.
      Decode = one forward per token with the returned ``past_key_values`` (a
      DynamicCache), then argmax; each step is timed including the ``.item()``
      of the next token.  (Checked: the tokens equal ``model.generate``'s.)
    * kiln (optional, ``--kiln-bin``): compiled once with
      ``KILN compile specs/gpt2.ron --generate --weights W -O2 -o ${KILN_CACHE}/bench/gpt2-small.kiln``
      (skipped when that artifact is newer than the weights, the spec and the
      binary; ``--recompile`` forces it), then for every run
      ``KILN generate ARTIFACT --prompt-ids PROMPT.npy --max-new-tokens N --threads T
      --no-stop --timing-json OUT.json`` with PROMPT.npy an int64 [1, L] array.  OUT.json
      must be an object {"prefill_ms": float, "decode_ms": [N - 1 floats],
      "tokens": [N ids]}.  One process per run (warm-up runs included).  kiln's
      tokens are compared with PyTorch's (a mismatch is reported, not fatal:
      random weights give near-ties).  Per case kiln runs first, then PyTorch.

Roofline
    Memory read bandwidth: ``numpy.sum`` (one thread) and ``torch.sum`` (T
    threads) over a ``--bw-mib`` (1024) MiB float32 array, ``--bw-reps`` runs,
    best and median GB/s.  Bytes read per decoded token = every transformer
    parameter once (the 50257x768 ``wte`` once, as the tied head reads all of
    it; ``wpe`` one row) + the KV cache, 2 * layers * ctx * hidden * 4 bytes,
    at the mean context of the decode steps.  Roofline tokens/s = best
    measured bandwidth / bytes per token; each engine's share of it is shown.

Output: a markdown report on stdout (header: date, CPU, threads, versions,
load average), progress on stderr, and with ``--json-out FILE`` every raw
number (all per-step times).

Examples
    python3 bench/generate.py
    python3 bench/generate.py --reps 1 --new-tokens 16 --contexts 32,256
    python3 bench/generate.py --kiln-bin target/release/kiln --json-out /tmp/gen.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Offline only: the Hugging Face hub is not reachable.  Quiet logging so that
# stdout carries only the report.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

# Shared helpers of the side-by-side benchmarks (bench/ is on sys.path when run as a script).
from compare import cache_dir, cpu_model, load_average  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO / "specs" / "gpt2.ron"
GPT2_SMALL = dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    activation_function="gelu_new",
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=True,
)
KILN_KEYS = ("prefill_ms", "decode_ms", "tokens")
# Targets for case (a): kiln prefill time <= 0.5x PyTorch's, decode tokens/s >= 1.3x.
TARGET_PREFILL = 0.5
TARGET_DECODE = 1.3


class BenchError(RuntimeError):
    """A benchmark step failed; the message is shown to the user as is."""


# --------------------------------------------------------------------------
# helpers


def parse_contexts(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad context list {text!r}, expected e.g. 32,256,1024")
    if not vals:
        raise argparse.ArgumentTypeError("no contexts given")
    return vals


def median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def make_prompt(length: int, seed: int, vocab: int) -> np.ndarray:
    """int64 [1, length] token ids, uniform in [0, vocab)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(1, length), dtype=np.int64)


# --------------------------------------------------------------------------
# weights


def parameter_state_dict(module) -> dict:
    """state_dict() restricted to parameters (drops buffers such as attn.bias)."""
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in module.state_dict().items() if k in params}


def ensure_weights(weights_dir: Path, seed: int) -> Path:
    """Create the random GPT-2 small checkpoint once; return model.safetensors' path."""
    st = weights_dir / "model.safetensors"
    if st.is_file() and (weights_dir / "config.json").is_file():
        return st
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    print(f"creating random GPT-2 small (seed {seed}) in {weights_dir} ...", file=sys.stderr)
    weights_dir.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(**GPT2_SMALL)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    sd = {k: v.detach().clone().contiguous() for k, v in parameter_state_dict(model.transformer).items()}
    d = config.to_dict()
    for k in ("_attn_implementation", "_attn_implementation_internal"):
        d.pop(k, None)
    d["kiln_bench_seed"] = seed
    (weights_dir / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True, default=str) + "\n")
    tmp = st.with_name(f"{st.name}.tmp{os.getpid()}")
    try:
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, st)
    finally:
        tmp.unlink(missing_ok=True)
    return st


def load_torch_model(weights_dir: Path, attn: str):
    """GPT2LMHeadModel from config.json with the saved ``transformer`` parameters."""
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    d = json.loads((weights_dir / "config.json").read_text())
    for k in ("transformers_version", "kiln_bench_seed"):
        d.pop(k, None)
    config = GPT2Config.from_dict(d)
    config._attn_implementation = attn
    model = GPT2LMHeadModel(config).to(torch.float32)
    sd = load_file(str(weights_dir / "model.safetensors"))
    expected = set(model.transformer.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise BenchError(f"{weights_dir}/model.safetensors does not fit GPT-2 small: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}; delete it to recreate")
    model.transformer.load_state_dict(sd, strict=True)
    model.eval()
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise BenchError("lm_head is not tied to wte after loading")
    return model, config


def decode_bytes(model, config) -> dict:
    """Bytes one decode step must read: weights (wte once, one wpe row) + KV per context token."""
    t = model.transformer
    n_params = sum(p.numel() for p in t.parameters())  # wte counted once (tied head)
    weight_bytes = 4 * (n_params - t.wpe.weight.numel() + config.n_embd)
    return {
        "transformer_params": int(n_params),
        "weight_bytes": int(weight_bytes),
        "kv_bytes_per_ctx_token": int(2 * config.n_layer * config.n_embd * 4),
    }


# --------------------------------------------------------------------------
# bandwidth


def measure_bandwidth(mib: int, reps: int, threads: int) -> dict:
    """Read bandwidth (GB/s, 1e9 bytes) of numpy.sum (1 thread) and torch.sum (T threads)."""
    import torch

    n = mib * (1 << 20) // 4
    a = np.full(n, 1.0, dtype=np.float32)  # written, so every page is resident
    nbytes = a.nbytes
    res = {"bytes": int(nbytes)}
    for name, fn in (("numpy_sum_1t", lambda: float(a.sum())),
                     (f"torch_sum_{threads}t", lambda t=torch.from_numpy(a): float(t.sum()))):
        fn()  # warm-up
        gbs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            gbs.append(nbytes / (time.perf_counter() - t0) / 1e9)
        res[name] = {"best_gbs": max(gbs), "median_gbs": median(gbs), "samples_gbs": gbs}
    del a
    res["best_gbs"] = max(v["best_gbs"] for v in res.values() if isinstance(v, dict))
    return res


# --------------------------------------------------------------------------
# engines


def torch_generate(model, prompt: np.ndarray, n_new: int) -> dict:
    """Greedy: timed prefill (+argmax), then n_new - 1 timed single-token steps."""
    import torch

    ids = torch.from_numpy(prompt)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tok = int(nxt.item())
        prefill_ms = (time.perf_counter() - t0) * 1e3
        past = out.past_key_values
        tokens, decode_ms = [tok], []
        for _ in range(n_new - 1):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tok = int(nxt.item())
            decode_ms.append((time.perf_counter() - t0) * 1e3)
            past = out.past_key_values
            tokens.append(tok)
    return {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "tokens": tokens}


def kiln_compile(kiln_bin: str, spec: Path, weights: Path, artifact: Path, force: bool) -> None:
    if not force and artifact.is_file():
        newest_input = max(p.stat().st_mtime for p in (weights, spec, Path(kiln_bin)))
        if artifact.stat().st_mtime > newest_input:
            print(f"kiln: reusing {artifact}", file=sys.stderr)
            return
    artifact.parent.mkdir(parents=True, exist_ok=True)
    cmd = [kiln_bin, "compile", str(spec), "--generate", "--weights", str(weights), "-O2", "-o", str(artifact)]
    print(f"kiln: {' '.join(cmd)}", file=sys.stderr)
    t0 = time.perf_counter()
    run_checked(cmd, "compile")
    print(f"kiln: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def run_checked(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise BenchError(f"kiln {what}: could not run {shown}: {e}")
    if proc.returncode != 0:
        hint = ""
        if what == "generate" and ("unrecognized subcommand" in proc.stderr
                                   or "unexpected argument" in proc.stderr):
            hint = "\n(this kiln binary does not support `kiln generate ... --timing-json` yet)"
        raise BenchError(
            f"kiln {what}: `{shown}` exited with status {proc.returncode}{hint}\n"
            f"--- stderr (tail) ---\n{proc.stderr[-2000:]}"
            f"--- stdout (tail) ---\n{proc.stdout[-2000:]}"
        )
    return proc


def kiln_generate(kiln_bin: str, artifact: Path, prompt: np.ndarray, n_new: int,
                  threads: int, workdir: Path) -> dict:
    """One ``kiln generate`` process; returns its validated timing JSON (+ wall_ms)."""
    prompt_path = workdir / f"prompt_{prompt.shape[1]}.npy"
    np.save(prompt_path, np.ascontiguousarray(prompt, dtype=np.int64))
    out_path = workdir / "timing.json"
    out_path.unlink(missing_ok=True)
    cmd = [kiln_bin, "generate", str(artifact), "--prompt-ids", str(prompt_path),
           "--max-new-tokens", str(n_new), "--threads", str(threads),
           "--no-stop", "--timing-json", str(out_path)]
    shown = " ".join(cmd)
    t0 = time.perf_counter()
    run_checked(cmd, "generate")
    wall_ms = (time.perf_counter() - t0) * 1e3
    try:
        res = json.loads(out_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"kiln generate: `{shown}` succeeded but {out_path} is missing or not JSON: {e}")
    if not isinstance(res, dict) or any(k not in res for k in KILN_KEYS):
        raise BenchError(f"kiln generate: {out_path} must be an object with keys {KILN_KEYS}; got "
                         f"{str(res)[:300]}")
    ok = (isinstance(res["prefill_ms"], (int, float))
          and isinstance(res["decode_ms"], list) and len(res["decode_ms"]) == n_new - 1
          and all(isinstance(v, (int, float)) for v in res["decode_ms"])
          and isinstance(res["tokens"], list) and len(res["tokens"]) == n_new
          and all(isinstance(v, int) for v in res["tokens"]))
    if not ok:
        raise BenchError(
            f"kiln generate: {out_path} breaks the contract for --max-new-tokens {n_new}: need "
            f"prefill_ms number, decode_ms {n_new - 1} numbers, tokens {n_new} ints; got "
            f"prefill_ms={res['prefill_ms']!r}, len(decode_ms)={len(res['decode_ms'])}, "
            f"len(tokens)={len(res['tokens'])}")
    res["wall_ms"] = wall_ms
    return res


# --------------------------------------------------------------------------
# cases


def summarize(runs: list[dict]) -> dict:
    """Median over reps of TTFT and of each rep's median decode-step time."""
    ttft = [r["prefill_ms"] for r in runs]
    step = [median(r["decode_ms"]) for r in runs if r["decode_ms"]]
    s = {"ttft_ms": median(ttft), "ttft_ms_reps": ttft}
    if step:
        s["decode_step_ms"] = median(step)
        s["decode_step_ms_reps"] = step
        s["decode_tok_s"] = 1e3 / s["decode_step_ms"]
        all_steps = np.concatenate([np.asarray(r["decode_ms"]) for r in runs])
        s["decode_step_p10_ms"] = float(np.percentile(all_steps, 10))
        s["decode_step_p90_ms"] = float(np.percentile(all_steps, 90))
    return s


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_case(name: str, prompt_len: int, n_new: int, seed: int, args, model, vocab: int,
             kiln: dict | None, nbytes: dict, bw_gbs: float | None) -> dict:
    prompt = make_prompt(prompt_len, seed, vocab)
    row = {"case": name, "prompt_len": prompt_len, "new_tokens": n_new, "prompt_seed": seed,
           "prompt_ids": prompt[0].tolist()}
    # Decode step k (1..n_new-1) feeds position prompt_len+k-1 and attends to prompt_len+k tokens.
    ctx = [prompt_len + k for k in range(1, n_new)]
    mean_ctx = float(np.mean(ctx)) if ctx else float(prompt_len)
    row["decode_ctx_mean"] = mean_ctx
    row["bytes_per_token"] = nbytes["weight_bytes"] + nbytes["kv_bytes_per_ctx_token"] * mean_ctx
    if bw_gbs:
        row["roofline_tok_s"] = bw_gbs * 1e9 / row["bytes_per_token"]

    engines = [("torch", lambda: torch_generate(model, prompt, n_new))]
    if kiln:  # kiln first: a kiln that cannot run fails the script at once
        engines.insert(0, ("kiln", lambda: kiln_generate(kiln["bin"], kiln["artifact"], prompt, n_new,
                                                         args.threads, kiln["workdir"])))
    for eng, fn in engines:
        for _ in range(args.warmup):
            fn()
        runs = [fn() for _ in range(args.reps)]
        s = summarize(runs)
        if "roofline_tok_s" in row and "decode_tok_s" in s:
            s["roofline_fraction"] = s["decode_tok_s"] / row["roofline_tok_s"]
        row[eng] = {**s, "runs": runs}
        msg = f"{name}: {eng} TTFT {s['ttft_ms']:.1f} ms"
        if "decode_tok_s" in s:
            msg += f", decode {s['decode_step_ms']:.2f} ms/token = {s['decode_tok_s']:.1f} tok/s"
        print(msg, file=sys.stderr)

    torch_tokens = row["torch"]["runs"][0]["tokens"]
    row["torch_tokens"] = torch_tokens
    if kiln:
        mism = [first_mismatch(torch_tokens, r["tokens"]) for r in row["kiln"]["runs"]]
        row["kiln_first_token_mismatch"] = mism
        if any(m is not None for m in mism):
            print(f"warning: {name}: kiln's tokens differ from PyTorch's (first mismatch at step "
                  f"{mism}); near-ties are possible with random weights", file=sys.stderr)
        row["ttft_ratio_kiln_over_torch"] = row["kiln"]["ttft_ms"] / row["torch"]["ttft_ms"]
        if "decode_tok_s" in row["kiln"] and "decode_tok_s" in row["torch"]:
            row["decode_speedup_kiln_over_torch"] = row["kiln"]["decode_tok_s"] / row["torch"]["decode_tok_s"]
    return row


# --------------------------------------------------------------------------
# report


def f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def header_line(threads: int, attn: str) -> str:
    import torch
    import transformers

    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"{date} · CPU: {cpu_model()} ({os.cpu_count()} logical) · threads: {threads} · "
        f"torch {torch.__version__} · transformers {transformers.__version__} · "
        f"PyTorch attn: {attn} · load avg {load_average()}"
    )


def ratio_cell(ratio: float | None, ok: bool | None) -> str:
    """``0.42× ✓`` (target met) / ``0.61× ✗``, or ``—`` without kiln."""
    if ratio is None:
        return "—"
    return f"{ratio:.2f}× {'✓' if ok else '✗'}"


def step_cell(d: dict | None) -> str:
    if not d or "decode_step_ms" not in d:
        return "—"
    return f"{d['decode_step_ms']:.2f} [{d['decode_step_p10_ms']:.2f}–{d['decode_step_p90_ms']:.2f}]"


def report_case_a(row: dict) -> str:
    t, k = row["torch"], row.get("kiln")
    g = lambda d, key: None if d is None else d.get(key)  # noqa: E731
    pct_cell = lambda d: "—" if not d or "roofline_fraction" not in d else f"{100 * d['roofline_fraction']:.0f}%"  # noqa: E731
    ttft_ratio = row.get("ttft_ratio_kiln_over_torch")
    speedup = row.get("decode_speedup_kiln_over_torch")
    lines = [
        f"### (a) prompt {row['prompt_len']}, {row['new_tokens']} new tokens",
        "",
        "| metric | kiln | PyTorch | kiln vs PyTorch | target |",
        "|---|---:|---:|---:|---:|",
        f"| prefill = TTFT (ms) | {f(g(k, 'ttft_ms'), '.1f')} | {f(t['ttft_ms'], '.1f')} "
        f"| {ratio_cell(ttft_ratio, None if ttft_ratio is None else ttft_ratio <= TARGET_PREFILL)} "
        f"| ≤ {TARGET_PREFILL}× time |",
        f"| decode (tok/s) | {f(g(k, 'decode_tok_s'), '.1f')} | {f(g(t, 'decode_tok_s'), '.1f')} "
        f"| {ratio_cell(speedup, None if speedup is None else speedup >= TARGET_DECODE)} "
        f"| ≥ {TARGET_DECODE}× tok/s |",
        f"| decode step median [p10–p90] (ms) | {step_cell(k)} | {step_cell(t)} | | |",
        f"| share of roofline ({f(row.get('roofline_tok_s'), '.1f')} tok/s) | {pct_cell(k)} "
        f"| {pct_cell(t)} | | |",
    ]
    return "\n".join(lines)


def report_sweep(rows: list[dict], sweep_new: int) -> str:
    lines = [
        f"### (b) context sweep: prompt C − {sweep_new}, {sweep_new} new tokens",
        "",
        "| C | prompt | mean ctx | kiln TTFT ms | PyTorch TTFT ms | kiln tok/s | PyTorch tok/s "
        "| kiln/PyTorch tok/s | roofline tok/s | kiln % roof | PyTorch % roof |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, k = r["torch"], r.get("kiln") or {}
        pct = lambda d: 100 * d["roofline_fraction"] if "roofline_fraction" in d else None  # noqa: E731
        lines.append(
            f"| {r['context']} | {r['prompt_len']} | {r['decode_ctx_mean']:.1f} "
            f"| {f(k.get('ttft_ms'), '.1f')} | {t['ttft_ms']:.1f} "
            f"| {f(k.get('decode_tok_s'), '.1f')} | {f(t.get('decode_tok_s'), '.1f')} "
            f"| {f(r.get('decode_speedup_kiln_over_torch'), '.2f')} "
            f"| {f(r.get('roofline_tok_s'), '.1f')} | {f(pct(k), '.0f')} | {f(pct(t), '.0f')} |"
        )
    return "\n".join(lines)


def report_roofline(bw: dict | None, nbytes: dict, threads: int) -> str:
    lines = [f"Bytes per decoded token: weights {nbytes['weight_bytes'] / 1e6:.1f} MB "
             f"({nbytes['transformer_params']:,} transformer parameters; wte read once by the tied "
             f"head, one wpe row) + KV cache {nbytes['kv_bytes_per_ctx_token'] / 1e3:.1f} kB per "
             f"context token."]
    if bw:
        nt = bw["numpy_sum_1t"]
        tt = bw[f"torch_sum_{threads}t"]
        lines.append(
            f"Read bandwidth over {bw['bytes'] / 2**30:.2f} GiB: numpy.sum (1 thread) "
            f"{nt['best_gbs']:.1f} GB/s best, {nt['median_gbs']:.1f} median; torch.sum ({threads} "
            f"threads) {tt['best_gbs']:.1f} best, {tt['median_gbs']:.1f} median. Roofline uses "
            f"{bw['best_gbs']:.1f} GB/s.")
    else:
        lines.append("Bandwidth not measured (--bw-mib 0): no roofline.")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main


def run(args) -> dict:
    import torch

    max_pos = GPT2_SMALL["n_positions"]
    if args.prompt_len + args.new_tokens > max_pos:
        raise BenchError(f"--prompt-len + --new-tokens must be <= {max_pos}")
    for c in args.contexts:
        if not (args.sweep_new < c <= max_pos):
            raise BenchError(f"context {c}: need --sweep-new ({args.sweep_new}) < C <= {max_pos}")

    torch.set_num_threads(args.threads)
    weights = ensure_weights(args.weights_dir, args.weights_seed)

    kiln = None
    if args.kiln_bin:
        if not os.access(args.kiln_bin, os.X_OK):
            raise BenchError(f"--kiln-bin {args.kiln_bin}: not an executable file")
        if not args.spec.is_file():
            raise BenchError(f"--spec {args.spec}: no such file")
        kiln_compile(args.kiln_bin, args.spec, weights, args.artifact, args.recompile)
        kiln = {"bin": args.kiln_bin, "artifact": args.artifact}

    header = header_line(args.threads, args.attn)
    print(header, file=sys.stderr)

    bw = None
    if args.bw_mib > 0:
        bw = measure_bandwidth(args.bw_mib, args.bw_reps, args.threads)
        print(f"bandwidth: numpy.sum {bw['numpy_sum_1t']['best_gbs']:.1f} GB/s, torch.sum "
              f"{bw[f'torch_sum_{args.threads}t']['best_gbs']:.1f} GB/s (best)", file=sys.stderr)
    bw_gbs = bw["best_gbs"] if bw else None

    model, config = load_torch_model(args.weights_dir, args.attn)
    nbytes = decode_bytes(model, config)

    with tempfile.TemporaryDirectory(prefix="kiln-bench-gen-") as tmp:
        if kiln:
            kiln["workdir"] = Path(tmp)
        case_a = run_case("a", args.prompt_len, args.new_tokens, args.seed, args, model,
                          config.vocab_size, kiln, nbytes, bw_gbs)
        sweep = []
        if not args.no_sweep:
            for i, c in enumerate(args.contexts):
                r = run_case(f"ctx{c}", c - args.sweep_new, args.sweep_new, args.seed + 1 + i, args,
                             model, config.vocab_size, kiln, nbytes, bw_gbs)
                r["context"] = c
                sweep.append(r)

    print(header)
    print(f"GPT-2 small (random, {weights}), fp32, batch 1, greedy. Medians over {args.reps} reps "
          f"after {args.warmup} warm-up; TTFT = prefill + argmax; tok/s = 1000 / median step ms.")
    print()
    print(report_roofline(bw, nbytes, args.threads))
    print()
    print(report_case_a(case_a))
    if sweep:
        print()
        print(report_sweep(sweep, args.sweep_new))
    if kiln:
        bad = [r["case"] for r in [case_a, *sweep]
               if any(m is not None for m in r.get("kiln_first_token_mismatch", []))]
        print()
        print("kiln tokens == PyTorch tokens in every case" if not bad
              else f"kiln tokens differ from PyTorch's in case(s) {bad} (see JSON)")
    return {
        "header": header,
        "threads": args.threads,
        "reps": args.reps,
        "warmup": args.warmup,
        "torch_attn": args.attn,
        "weights": str(weights),
        "weights_seed": args.weights_seed,
        "kiln_bin": args.kiln_bin,
        "kiln_artifact": str(args.artifact) if args.kiln_bin else None,
        "bandwidth": bw,
        "bytes": nbytes,
        "targets": {"prefill_time_ratio_max": TARGET_PREFILL, "decode_speedup_min": TARGET_DECODE},
        "case_a": case_a,
        "sweep": sweep,
        "load_average_end": load_average(),
    }


def build_parser() -> argparse.ArgumentParser:
    bench = cache_dir() / "bench"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See bench/README.md.")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per case (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case (default 1)")
    p.add_argument("--prompt-len", type=int, default=128, help="case (a) prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="case (a) tokens generated (default 64)")
    p.add_argument("--contexts", type=parse_contexts, default=parse_contexts("32,256,1024"),
                   help="case (b) contexts C (default 32,256,1024)")
    p.add_argument("--sweep-new", type=int, default=16,
                   help="case (b) tokens generated; prompt = C - this (default 16)")
    p.add_argument("--no-sweep", action="store_true", help="run case (a) only")
    p.add_argument("--seed", type=int, default=0, help="seed for the prompt token ids")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                   help="PyTorch attention implementation (default sdpa)")
    p.add_argument("--weights-dir", type=Path, default=bench / "gpt2-small-random",
                   help="random GPT-2 small checkpoint, created if absent "
                        "(default $KILN_CACHE/bench/gpt2-small-random)")
    p.add_argument("--weights-seed", type=int, default=0,
                   help="torch seed when creating the checkpoint (default 0)")
    p.add_argument("--kiln-bin", help="kiln executable (enables kiln)")
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="kiln spec (default specs/gpt2.ron)")
    p.add_argument("--artifact", type=Path, default=bench / "gpt2-small.kiln",
                   help="compiled kiln model (default $KILN_CACHE/bench/gpt2-small.kiln)")
    p.add_argument("--recompile", action="store_true", help="compile the kiln artifact again")
    p.add_argument("--bw-mib", type=int, default=1024,
                   help="MiB read by the bandwidth test; 0 skips it and the roofline (default 1024)")
    p.add_argument("--bw-reps", type=int, default=5, help="bandwidth samples (default 5)")
    p.add_argument("--json-out", type=Path, help="write raw numbers to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.reps < 1 or args.warmup < 0 or args.threads < 1 or args.prompt_len < 1
            or args.new_tokens < 2 or args.sweep_new < 2 or args.bw_mib < 0 or args.bw_reps < 1):
        print("error: need --reps >= 1, --warmup >= 0, --threads >= 1, --prompt-len >= 1, "
              "--new-tokens >= 2, --sweep-new >= 2, --bw-mib >= 0, --bw-reps >= 1", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nraw numbers written to {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
