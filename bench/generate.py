#!/usr/bin/env python3
"""Benchmark greedy decoding of GPT-2 small (124M, CPU): kiln vs PyTorch eager vs llama.cpp.

Weights
    A randomly initialised GPT-2 small (vocab 50257, n_positions 1024, n_embd 768,
    12 layers, 12 heads, gelu_new; ``torch.manual_seed(--weights-seed)``) is
    created once; its ``GPT2LMHeadModel.transformer`` parameters are saved to
    ``${KILN_CACHE}/bench/gpt2-small-random/model.safetensors`` (+ config.json),
    like scripts/make-references.py does (the LM head is tied to ``wte``), and
    reused afterwards, so every engine runs the very same weights.

Weight formats (``--quant``, default f32,int8,int4; PyTorch runs f32 only)
    f32   kiln f32; llama.cpp F32.
    int8  kiln ``--quantize int8`` (symmetric, one scale per output channel);
          llama.cpp Q8_0 (blocks of 32, one f16 scale each).
    int4  kiln ``--quantize int4`` (group 128, f16 scale and minimum, round to nearest);
          llama.cpp Q4_0 (blocks of 32, one f16 scale, no minimum).

Cases (same prompt ids for every engine: uniform in [0, 50257), fixed seed)
    (a) prompt ``--prompt-len`` (128) tokens, ``--new-tokens`` (64) generated.
    (b) context sweep: for each C in ``--contexts`` (32,256,1024), a prompt of
        C - ``--sweep-new`` tokens and ``--sweep-new`` (16) generated, so the
        last decode step attends to C - 1 tokens (total length C <= 1024).
    Generating N tokens is one prefill (whose argmax is the first token; its
    time is the time to first token, TTFT) and N - 1 single-token decode steps.
    Every case is run ``--warmup`` (1) times untimed, then ``--reps`` (3) times.
    Cells are ``median [p10–p90]``: TTFT over the reps; decode step time as the
    median over reps of each rep's median step, with p10/p90 over all steps of
    all reps; decode tok/s = 1000 / step ms (its p10/p90 from the p90/p10 step).

    * PyTorch: ``GPT2LMHeadModel``, float32, ``eval()``, ``torch.inference_mode()``,
      ``torch.set_num_threads(T)``, attention ``--attn`` (default ``sdpa``, as in
      bench/compare.py; one quick check on the busy 2-core dev machine had it ~10%
      ahead of ``eager`` at both prefill 128 and decode).  Prefill = one forward
      over the prompt with ``use_cache=True`` and ``logits_to_keep=1`` (as
      ``generate()`` does: only the last position's logits), then argmax.
      Decode = one forward per token with the returned ``past_key_values`` (a
      DynamicCache), then argmax; each step is timed including the ``.item()``
      of the next token.  (Checked: the tokens equal ``model.generate``'s.)
    * kiln (optional, ``--kiln-bin``): per weight format compiled once with
      ``KILN compile specs/gpt2.ron --generate --weights W -O2 [--quantize int8|int4]
      [--cpu LEVEL] -o ${KILN_CACHE}/bench/gpt2-small[-int8|-int4][-LEVEL].kiln``
      (skipped when that artifact is newer than the weights, the spec and the
      binary; ``--recompile`` forces it), then for every run
      ``KILN generate ARTIFACT --prompt-ids PROMPT.npy --max-new-tokens N --threads T
      --no-stop --timing-json OUT.json`` with PROMPT.npy an int64 [1, L] array.  OUT.json
      must be an object {"prefill_ms": float, "decode_ms": [N - 1 floats],
      "tokens": [N ids]}.  One process per run (warm-up runs included).
      The CPU level the artifacts were compiled for comes from OUT.json's optional
      "level", else from a probe: specs/gemm.ron compiled with the same ``--cpu``
      and timed once by ``kiln bench --json`` (its "level"); ``unknown`` if neither says.
    * llama.cpp (when ``import llama_cpp`` works, i.e. ``pip install
      llama-cpp-python``; ``--no-llama-cpp`` skips it): the same weights converted
      to GGUF with the ``gguf`` package (arch ``gpt2``; llama.cpp's names, [out, in]
      matrices, so GPT-2's Conv1D [in, out] weights are transposed; ``output.weight``
      written as a copy of the tied ``token_embd.weight``, as llama.cpp's
      convert_hf_to_gguf.py does; norms, biases and ``position_embd`` stay F32;
      the GPT-2 vocabulary from ``--tokenizer`` (tokenizer.json) if present, else a
      synthetic byte-level one of the same size, since the prompts are token ids).
      Files: ``${KILN_CACHE}/bench/gguf/gpt2-small-{f32,q8_0,q4_0}.gguf``, redone when
      older than the weights (or ``--reconvert``); quantized with
      ``gguf.quants.quantize``, or, with a gguf package that lacks it, with
      llama.cpp's ``llama_model_quantize`` from the F32 file.
      ``Llama(path, n_ctx=1024, n_batch=512, n_threads=T, n_threads_batch=T)`` (the
      KV cache is llama.cpp's default f16; flash attention off unless
      ``--llama-flash-attn``), one model per format, loaded once; per run:
      ``reset()``, ``eval(prompt)`` then argmax of the last logits
      (``llama_get_logits_ith(ctx, -1)``) timed as the prefill, then per token
      ``eval([token])`` + argmax, timed one by one.
    Every engine's tokens are compared with PyTorch's (a mismatch is reported,
    not fatal: random weights give near-ties; quantized weights differ anyway).
    Per case the engines run one after another: kiln, llama.cpp, PyTorch.

Roofline
    Memory read bandwidth: ``numpy.sum`` (one thread) and ``torch.sum`` (T
    threads) over a ``--bw-mib`` (1024) MiB float32 array, ``--bw-reps`` runs,
    best and median GB/s.  Bytes read per decoded token (f32 weights) = every
    transformer parameter once (the 50257x768 ``wte`` once, as the tied head
    reads all of it; ``wpe`` one row) + the KV cache, 2 * layers * ctx * hidden * 4
    bytes, at the mean context of the decode steps.  Roofline tokens/s = best
    measured bandwidth / bytes per token; the share of it is shown for f32 rows.

Output: a markdown report on stdout (header: date, CPU model, kiln's CPU level,
threads, versions, load average), progress on stderr, and with ``--json-out FILE``
every raw number (all per-step times).

Examples
    python3 bench/generate.py
    python3 bench/generate.py --reps 1 --new-tokens 16 --contexts 32,256
    python3 bench/generate.py --kiln-bin target/release/kiln --json-out /tmp/gen.json
    python3 bench/generate.py --kiln-bin target/release/kiln --quant f32 --no-sweep
    python3 bench/generate.py --convert-only          # just write (and check) the GGUF files
"""

from __future__ import annotations

import argparse
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

# Shared helpers of the benchmarks (bench/ is on sys.path when run as a script).
from common import (  # noqa: E402
    run_and_report,
    UNKNOWN_LEVEL,
    BenchError,
    cache_dir,
    check_kiln_bin,
    cpu_args,
    cpu_model,
    load_average,
    now,
    probe_kiln_level,
    run_kiln,
)

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
# Targets for case (a) (issue 16): kiln f32 prefill time <= 0.7x PyTorch's and below llama.cpp's,
# decode >= 85% of the memory roofline and >= llama.cpp f32 tokens/s; int8 / int4 g128 decode and
# prefill at least as fast as llama.cpp's q8_0 / q4_0. PyTorch decode tokens/s >= 1.3x is kept
# from the first targets.
TARGET_PREFILL = 0.7
TARGET_DECODE = 1.3
TARGET_ROOFLINE = 0.85
# kiln engine key -> the llama.cpp engine it must match or beat.
TARGET_PAIRS = {"kiln": "llama_cpp", "kiln_int8": "llama_cpp_q8_0", "kiln_int4": "llama_cpp_q4_0"}

# Weight formats: kiln's --quantize value and llama.cpp's GGML type for each.
QUANTS = {
    "f32": {"kiln": "kiln", "kiln_flag": None, "kiln_label": "f32",
            "llama": "llama_cpp", "ggml": None, "llama_label": "f32"},
    "int8": {"kiln": "kiln_int8", "kiln_flag": "int8", "kiln_label": "int8 (per channel)",
             "llama": "llama_cpp_q8_0", "ggml": "Q8_0", "llama_label": "q8_0"},
    "int4": {"kiln": "kiln_int4", "kiln_flag": "int4", "kiln_label": "int4 g128",
             "llama": "llama_cpp_q4_0", "ggml": "Q4_0", "llama_label": "q4_0"},
}
# Engine key -> (engine, weights) for the tables.
LABELS = {"torch": ("PyTorch", "f32")}
for _q in QUANTS.values():
    LABELS[_q["kiln"]] = ("kiln", _q["kiln_label"])
    LABELS[_q["llama"]] = ("llama.cpp", _q["llama_label"])
F32_ENGINES = ("kiln", "llama_cpp", "torch")
LLAMA_SKIP_HINT = "skipped llama.cpp: pip install llama-cpp-python"


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


def parse_quants(text: str) -> list[str]:
    vals = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in QUANTS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"bad --quant {text!r}: a comma-separated subset of "
                                         f"{','.join(QUANTS)}")
    return list(dict.fromkeys(vals))


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
# GGUF (llama.cpp)


def gpt2_hparams(weights_dir: Path) -> dict:
    """The GGUF hyperparameters from the checkpoint's config.json."""
    d = json.loads((weights_dir / "config.json").read_text())
    n_embd = int(d["n_embd"])
    return {
        "vocab": int(d["vocab_size"]),
        "n_ctx": int(d["n_positions"]),
        "n_embd": n_embd,
        "n_ff": int(d.get("n_inner") or 4 * n_embd),
        "n_layer": int(d["n_layer"]),
        "n_head": int(d["n_head"]),
        "eps": float(d.get("layer_norm_epsilon", 1e-5)),
    }


def load_numpy_weights(weights_dir: Path) -> dict[str, np.ndarray]:
    """model.safetensors as float32 numpy arrays, names without a ``transformer.`` prefix."""
    from safetensors.numpy import load_file

    sd = load_file(str(weights_dir / "model.safetensors"))
    return {k.removeprefix("transformer."): v.astype(np.float32, copy=False) for k, v in sd.items()}


def gguf_tensors(sd: dict[str, np.ndarray], hp: dict) -> list[tuple[str, np.ndarray]]:
    """GPT-2 (Hugging Face names, Conv1D [in, out] weights) -> llama.cpp's gpt2 tensors.

    Matrices come out as C-contiguous numpy [out, in] (ggml's ne0 = in), the layout llama.cpp's
    gpt2 loader expects: token_embd [vocab, n_embd], position_embd [n_ctx, n_embd],
    attn_qkv [3 n_embd, n_embd], attn_output [n_embd, n_embd], ffn_up [n_ff, n_embd],
    ffn_down [n_embd, n_ff], output [vocab, n_embd] (the tied wte, written out as
    convert_hf_to_gguf.py does).
    """
    def get(name, shape):
        if name not in sd:
            raise BenchError(f"GGUF conversion: the checkpoint has no {name}")
        a = sd[name]
        if tuple(a.shape) != tuple(shape):
            raise BenchError(f"GGUF conversion: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        return a

    e, f, v, c = hp["n_embd"], hp["n_ff"], hp["vocab"], hp["n_ctx"]
    c32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    wte = c32(get("wte.weight", (v, e)))
    out = [("token_embd.weight", wte), ("position_embd.weight", c32(get("wpe.weight", (c, e))))]
    for i in range(hp["n_layer"]):
        h, b = f"h.{i}.", f"blk.{i}."
        out += [
            (b + "attn_norm.weight", c32(get(h + "ln_1.weight", (e,)))),
            (b + "attn_norm.bias", c32(get(h + "ln_1.bias", (e,)))),
            (b + "attn_qkv.weight", c32(get(h + "attn.c_attn.weight", (e, 3 * e)).T)),
            (b + "attn_qkv.bias", c32(get(h + "attn.c_attn.bias", (3 * e,)))),
            (b + "attn_output.weight", c32(get(h + "attn.c_proj.weight", (e, e)).T)),
            (b + "attn_output.bias", c32(get(h + "attn.c_proj.bias", (e,)))),
            (b + "ffn_norm.weight", c32(get(h + "ln_2.weight", (e,)))),
            (b + "ffn_norm.bias", c32(get(h + "ln_2.bias", (e,)))),
            (b + "ffn_up.weight", c32(get(h + "mlp.c_fc.weight", (e, f)).T)),
            (b + "ffn_up.bias", c32(get(h + "mlp.c_fc.bias", (f,)))),
            (b + "ffn_down.weight", c32(get(h + "mlp.c_proj.weight", (f, e)).T)),
            (b + "ffn_down.bias", c32(get(h + "mlp.c_proj.bias", (e,)))),
        ]
    out += [
        ("output_norm.weight", c32(get("ln_f.weight", (e,)))),
        ("output_norm.bias", c32(get("ln_f.bias", (e,)))),
        ("output.weight", wte),
    ]
    return out


def bytes_to_unicode() -> list[tuple[int, str]]:
    """GPT-2's byte -> printable character table, in GPT-2's vocabulary order (ids 0..255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [(b, chr(c)) for b, c in zip(bs, cs)]


def gguf_vocab(tokenizer: Path | None, n_vocab: int) -> dict:
    """Tokens, token types and merges for tokenizer.ggml.* (model "gpt2": byte-level BPE).

    From a Hugging Face GPT-2 tokenizer.json when given and of the right size; otherwise a
    synthetic byte-level vocabulary of n_vocab tokens: the 256 byte characters (GPT-2's ids
    0..255), then two-character tokens, each with its merge, and ``<|endoftext|>`` (a control
    token) last.  The benchmark feeds token ids, so only the vocabulary's validity matters:
    llama.cpp needs n_vocab distinct token texts, a merges list and every byte character.
    """
    from gguf import TokenType

    if tokenizer is not None and tokenizer.is_file():
        tj = json.loads(tokenizer.read_text(encoding="utf-8"))
        model = tj.get("model") or {}
        vocab = dict(model.get("vocab") or {})
        for t in tj.get("added_tokens") or []:
            vocab[t["content"]] = t["id"]
        special = {t["id"] for t in tj.get("added_tokens") or [] if t.get("special")}
        if model.get("type") == "BPE" and sorted(vocab.values()) == list(range(n_vocab)):
            tokens = [""] * n_vocab
            for text, i in vocab.items():
                tokens[i] = text
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
            types = [int(TokenType.CONTROL if i in special else TokenType.NORMAL) for i in range(n_vocab)]
            eos = vocab.get("<|endoftext|>", n_vocab - 1)
            return {"tokens": tokens, "types": types, "merges": merges, "eos": eos,
                    "source": str(tokenizer)}
        print(f"note: {tokenizer} is not a {n_vocab}-token BPE tokenizer.json; using a synthetic "
              "byte-level vocabulary", file=sys.stderr)
    chars = [c for _, c in bytes_to_unicode()]
    n_bytes = min(256, n_vocab - 1)
    tokens = chars[:n_bytes]
    merges = []
    need = n_vocab - 1 - n_bytes
    for a in chars:
        if len(merges) >= need:
            break
        for b in chars:
            if len(merges) >= need:
                break
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    tokens.append("<|endoftext|>")
    types = [int(TokenType.NORMAL)] * (n_vocab - 1) + [int(TokenType.CONTROL)]
    return {"tokens": tokens, "types": types, "merges": merges, "eos": n_vocab - 1,
            "source": "synthetic byte-level"}


def ggml_type(name: str | None):
    import gguf

    return None if name is None else getattr(gguf.GGMLQuantizationType, name)


def gguf_can_quantize(qname: str) -> bool:
    """Whether the installed gguf package can quantize to ``qname`` (gguf.quants.quantize)."""
    try:
        from gguf.quants import quantize

        quantize(np.zeros((1, 32), dtype=np.float32), ggml_type(qname))
        return True
    except (ImportError, AttributeError, NotImplementedError):
        return False


def gguf_type(name: str, shape: tuple, qname: str | None):
    """The GGML type a tensor is stored as: 2-D weights ``qname`` (when their rows fill whole
    blocks), everything else (norms, biases) F32 -- and position_embd stays F32 too, as
    llama.cpp's own quantizer leaves it (one row of it is read per token).  None means F32."""
    import gguf

    if qname is None or len(shape) != 2 or name == "position_embd.weight":
        return None
    qtype = ggml_type(qname)
    return None if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] else qtype


def quantized(name: str, a: np.ndarray, qname: str | None):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    from gguf.quants import quantize

    qtype = gguf_type(name, a.shape, qname)
    return (a, None) if qtype is None else (quantize(a, qtype), qtype)


def write_gguf(path: Path, hp: dict, tensors: list, quant: str, vocab: dict) -> None:
    """One GGUF file (atomic rename), tensors quantized per ``quant`` (f32, int8, int4)."""
    import gguf

    qname = QUANTS[quant]["ggml"]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "int8": gguf.LlamaFileType.MOSTLY_Q8_0,
             "int4": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        w = gguf.GGUFWriter(str(tmp), "gpt2")
        w.add_name("GPT-2 small (random weights, kiln bench)")
        w.add_context_length(hp["n_ctx"])
        w.add_embedding_length(hp["n_embd"])
        w.add_feed_forward_length(hp["n_ff"])
        w.add_block_count(hp["n_layer"])
        w.add_head_count(hp["n_head"])
        w.add_layer_norm_eps(hp["eps"])
        w.add_file_type(int(ftype))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(vocab["eos"])
        w.add_eos_token_id(vocab["eos"])
        for name, a in tensors:
            data, raw = quantized(name, a, qname)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def quantize_with_llama_cpp(llama_cpp, src: Path, dst: Path, quant: str, threads: int) -> None:
    """llama.cpp's own quantizer (``pure``: every matrix to one type) from the F32 file."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"int8": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                    "int4": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[quant]
    params.nthread = threads
    if hasattr(params, "pure"):
        params.pure = True
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise BenchError(f"llama_model_quantize({src} -> {dst}, {quant}) returned {rc}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def check_gguf(path: Path, hp: dict, quant: str, tensors: list) -> dict:
    """Read a written GGUF back (gguf.GGUFReader): arch, hyperparameters, every tensor's name,
    ggml shape [ne0, ne1] and type, and one quantized matrix dequantized against its source."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(path))

    def field(key):
        f = r.fields.get(key)
        if f is None:
            raise BenchError(f"{path}: no metadata key {key}")
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    if field("general.architecture") != "gpt2":
        raise BenchError(f"{path}: general.architecture is {field('general.architecture')!r}")
    for key, want in (("gpt2.context_length", hp["n_ctx"]), ("gpt2.embedding_length", hp["n_embd"]),
                      ("gpt2.feed_forward_length", hp["n_ff"]), ("gpt2.block_count", hp["n_layer"]),
                      ("gpt2.attention.head_count", hp["n_head"])):
        if field(key) != want:
            raise BenchError(f"{path}: {key} = {field(key)}, expected {want}")
    if abs(field("gpt2.attention.layer_norm_epsilon") - hp["eps"]) > 1e-9:
        raise BenchError(f"{path}: wrong gpt2.attention.layer_norm_epsilon")
    n_tok = len(r.fields["tokenizer.ggml.tokens"].data)
    if n_tok != hp["vocab"]:
        raise BenchError(f"{path}: {n_tok} tokens, expected {hp['vocab']}")
    src = dict(tensors)
    got = {t.name: t for t in r.tensors}
    if set(got) != set(src):
        raise BenchError(f"{path}: tensors differ: missing {sorted(set(src) - set(got))[:5]}, "
                         f"extra {sorted(set(got) - set(src))[:5]}")
    qname = QUANTS[quant]["ggml"]
    counts: dict[str, int] = {}
    for name, a in src.items():
        t = got[name]
        want_shape = list(reversed(a.shape))  # ggml order: ne0 (the input dim) first
        if [int(x) for x in t.shape] != want_shape:
            raise BenchError(f"{path}: {name} has ggml shape {list(t.shape)}, expected {want_shape}")
        qtype = gguf_type(name, a.shape, qname)
        want_type = "F32" if qtype is None else qtype.name
        if t.tensor_type.name != want_type:
            raise BenchError(f"{path}: {name} is {t.tensor_type.name}, expected {want_type}")
        counts[want_type] = counts.get(want_type, 0) + 1
    # One matrix back to f32: the error must be within the format's step.
    name = "blk.0.attn_qkv.weight"
    deq = dequantize(np.asarray(got[name].data), got[name].tensor_type).reshape(src[name].shape)
    err = float(np.max(np.abs(deq - src[name])))
    bound = {"f32": 0.0, "int8": 1 / 254, "int4": 1 / 8}[quant] * float(np.max(np.abs(src[name]))) * 1.01
    if err > bound + 1e-12:
        raise BenchError(f"{path}: {name} dequantizes with max error {err:.3g} > {bound:.3g}")
    return {"tensors": len(got), "types": counts, "tokens": n_tok, "qkv_max_abs_err": err}


def ensure_gguf(args, quants: list[str], llama_cpp=None) -> dict[str, Path]:
    """The GGUF file for every format in ``quants`` (converted when missing or stale)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise BenchError("the GGUF conversion needs the gguf package: pip install gguf")
    st = args.weights_dir / "model.safetensors"
    names = {"f32": "f32", "int8": "q8_0", "int4": "q4_0"}
    paths = {q: args.gguf_dir / f"gpt2-small-{names[q]}.gguf" for q in quants}
    todo = [q for q, p in paths.items()
            if args.reconvert or not p.is_file() or p.stat().st_mtime < st.stat().st_mtime]
    if not todo:
        for q, p in paths.items():
            print(f"llama.cpp: reusing {p}", file=sys.stderr)
        return paths
    hp = gpt2_hparams(args.weights_dir)
    tensors = gguf_tensors(load_numpy_weights(args.weights_dir), hp)
    vocab = gguf_vocab(args.tokenizer, hp["vocab"])
    args.gguf_info = {"vocab_source": vocab["source"]}
    f32_path = args.gguf_dir / "gpt2-small-f32.gguf"
    for q in todo:
        t0 = time.perf_counter()
        qname = QUANTS[q]["ggml"]
        if qname is None or gguf_can_quantize(qname):
            write_gguf(paths[q], hp, tensors, q, vocab)
            how = "gguf" if qname is None else "gguf.quants"
            info = check_gguf(paths[q], hp, q, tensors)
        else:
            if llama_cpp is None:
                raise BenchError(f"this gguf package cannot quantize to {qname}, and llama_cpp is "
                                 "not importable to do it: pip install -U gguf")
            if not f32_path.is_file() or f32_path.stat().st_mtime < st.stat().st_mtime or args.reconvert:
                write_gguf(f32_path, hp, tensors, "f32", vocab)
            quantize_with_llama_cpp(llama_cpp, f32_path, paths[q], q, args.threads)
            how, info = "llama_model_quantize", {}
        args.gguf_info[q] = {"path": str(paths[q]), "via": how, **info}
        print(f"llama.cpp: wrote {paths[q]} ({paths[q].stat().st_size / 2**20:.0f} MiB, {how}, "
              f"vocabulary: {vocab['source']}; {time.perf_counter() - t0:.1f} s)"
              + (f"; checked: {info['tensors']} tensors {info['types']}" if info else ""),
              file=sys.stderr)
    return paths


class LlamaCppRunner:
    """One llama.cpp model and context (llama-cpp-python's Llama), greedy over token ids."""

    def __init__(self, llama_cpp, path: Path, threads: int, n_ctx: int, flash_attn: bool, verbose: bool):
        from llama_cpp import Llama

        self.lib = llama_cpp
        self.path = path
        kw = dict(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                  n_threads_batch=threads, verbose=verbose)
        if flash_attn:
            kw["flash_attn"] = True
        try:
            self.llm = Llama(**kw)
        except Exception as e:
            raise BenchError(f"llama.cpp could not load {path}: {e}\n(--llama-verbose shows llama.cpp's "
                             "log; --reconvert rewrites the file; --no-llama-cpp skips llama.cpp)")
        self.n_vocab = int(self.llm.n_vocab())

    def _argmax(self) -> int:
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        if not ptr:
            raise BenchError("llama.cpp: llama_get_logits_ith(ctx, -1) gave no logits "
                             "(a llama-cpp-python too old for negative indices?)")
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, prompt: np.ndarray, n_new: int) -> dict:
        """Greedy: timed prefill (+argmax), then n_new - 1 timed single-token steps."""
        llm = self.llm
        ids = [int(t) for t in prompt[0]]
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(ids)
        tok = self._argmax()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        tokens, decode_ms = [tok], []
        for _ in range(n_new - 1):
            t0 = time.perf_counter()
            llm.eval([tok])
            tok = self._argmax()
            decode_ms.append((time.perf_counter() - t0) * 1e3)
            tokens.append(tok)
        return {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "tokens": tokens}


LLAMA_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False)
llm.eval([1, 2, 3, 4])
"""


def llama_cpp_crashes(path: Path, threads: int) -> str | None:
    """Loads and evaluates a few tokens of `path` in a child process: why llama.cpp dies on it, or
    None. A native llama.cpp build on a machine with AMX runs its AMX kernels for q8_0/q4_0, which
    die with SIGSEGV on some VMs; in this process that would end the whole benchmark."""
    r = subprocess.run([sys.executable, "-c", LLAMA_PROBE, str(path), str(threads)],
                       capture_output=True, text=True)
    if r.returncode == 0:
        return None
    how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
    return (f"llama.cpp dies evaluating {path.name} ({how}); skipped. If its build enables AMX "
            "(llama.cpp's log says AMX_INT8 = 1), rebuild llama-cpp-python with "
            "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF\"")


def import_llama_cpp():
    """(module, None) or (None, why it is skipped)."""
    try:
        import llama_cpp
    except ImportError:
        return None, LLAMA_SKIP_HINT
    except Exception as e:  # e.g. the shared library fails to load
        return None, f"skipped llama.cpp: `import llama_cpp` failed: {e}"
    return llama_cpp, None


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


def kiln_artifact(base: Path, quant: str, cpu: str | None) -> Path:
    """``gpt2-small.kiln`` -> ``gpt2-small[-int8|-int4][-LEVEL].kiln`` beside it."""
    suffix = ("" if quant == "f32" else f"-{quant}") + (f"-{cpu}" if cpu else "")
    return base.with_name(base.stem + suffix + base.suffix)


def kiln_compile(kiln_bin: str, spec: Path, weights: Path, artifact: Path, force: bool,
                 quant: str = "f32", cpu: str | None = None) -> None:
    if not force and artifact.is_file():
        newest_input = max(p.stat().st_mtime for p in (weights, spec, Path(kiln_bin)))
        if artifact.stat().st_mtime > newest_input:
            print(f"kiln: reusing {artifact}", file=sys.stderr)
            return
    artifact.parent.mkdir(parents=True, exist_ok=True)
    qflag = QUANTS[quant]["kiln_flag"]
    cmd = [kiln_bin, "compile", str(spec), "--generate", "--weights", str(weights), "-O2",
           *(["--quantize", qflag, "--quant-strict"] if qflag else []), *cpu_args(cpu), "-o", str(artifact)]
    print(f"kiln: {' '.join(cmd)}", file=sys.stderr)
    t0 = time.perf_counter()
    run_kiln(cmd, "compile")
    print(f"kiln: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


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
    run_kiln(cmd, "generate")
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
    """TTFT median/p10/p90 over reps; decode step: median over reps of each rep's median step,
    p10/p90 over all steps; tok/s from those (its p10 from the p90 step and vice versa)."""
    ttft = np.asarray([r["prefill_ms"] for r in runs], dtype=np.float64)
    s = {"ttft_ms": median(ttft), "ttft_ms_reps": ttft.tolist(),
         "ttft_p10_ms": float(np.percentile(ttft, 10)), "ttft_p90_ms": float(np.percentile(ttft, 90))}
    step = [median(r["decode_ms"]) for r in runs if r["decode_ms"]]
    if step:
        s["decode_step_ms"] = median(step)
        s["decode_step_ms_reps"] = step
        s["decode_tok_s"] = 1e3 / s["decode_step_ms"]
        all_steps = np.concatenate([np.asarray(r["decode_ms"]) for r in runs])
        s["decode_step_p10_ms"] = float(np.percentile(all_steps, 10))
        s["decode_step_p90_ms"] = float(np.percentile(all_steps, 90))
        s["decode_tok_s_p10"] = 1e3 / s["decode_step_p90_ms"]
        s["decode_tok_s_p90"] = 1e3 / s["decode_step_p10_ms"]
    return s


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_case(name: str, prompt_len: int, n_new: int, seed: int, args, model, vocab: int,
             engines: list[tuple[str, object]], nbytes: dict, bw_gbs: float | None) -> dict:
    """``engines``: (key, fn(prompt, n_new) -> {prefill_ms, decode_ms, tokens}), torch last."""
    prompt = make_prompt(prompt_len, seed, vocab)
    row = {"case": name, "prompt_len": prompt_len, "new_tokens": n_new, "prompt_seed": seed,
           "prompt_ids": prompt[0].tolist(), "engines": [k for k, _ in engines]}
    # Decode step k (1..n_new-1) feeds position prompt_len+k-1 and attends to prompt_len+k tokens.
    ctx = [prompt_len + k for k in range(1, n_new)]
    mean_ctx = float(np.mean(ctx)) if ctx else float(prompt_len)
    row["decode_ctx_mean"] = mean_ctx
    row["bytes_per_token"] = nbytes["weight_bytes"] + nbytes["kv_bytes_per_ctx_token"] * mean_ctx
    if bw_gbs:
        row["roofline_tok_s"] = bw_gbs * 1e9 / row["bytes_per_token"]

    for i, (eng, fn) in enumerate(engines):
        if i:
            time.sleep(0.2)  # let the previous engine's spinning thread pool go idle
        for _ in range(args.warmup):
            fn(prompt, n_new)
        runs = [fn(prompt, n_new) for _ in range(args.reps)]
        s = summarize(runs)
        if eng in F32_ENGINES and "roofline_tok_s" in row and "decode_tok_s" in s:
            s["roofline_fraction"] = s["decode_tok_s"] / row["roofline_tok_s"]
        row[eng] = {**s, "runs": runs}
        engine, weights = LABELS[eng]
        msg = f"{name}: {engine} {weights} TTFT {s['ttft_ms']:.1f} ms"
        if "decode_tok_s" in s:
            msg += f", decode {s['decode_step_ms']:.2f} ms/token = {s['decode_tok_s']:.1f} tok/s"
        print(msg, file=sys.stderr)

    torch_tokens = row["torch"]["runs"][0]["tokens"]
    row["torch_tokens"] = torch_tokens
    row["first_token_mismatch"] = {}
    row["decode_speedup_over_torch"] = {}
    for eng, _ in engines:
        if eng == "torch":
            continue
        mism = [first_mismatch(torch_tokens, r["tokens"]) for r in row[eng]["runs"]]
        row["first_token_mismatch"][eng] = mism
        if eng in F32_ENGINES and any(m is not None for m in mism):
            print(f"warning: {name}: {LABELS[eng][0]}'s tokens differ from PyTorch's (first mismatch "
                  f"at step {mism}); near-ties are possible with random weights", file=sys.stderr)
        if "decode_tok_s" in row[eng] and "decode_tok_s" in row["torch"]:
            row["decode_speedup_over_torch"][eng] = row[eng]["decode_tok_s"] / row["torch"]["decode_tok_s"]
    if "kiln" in row:  # the f32 kiln artifact against PyTorch: the targets
        row["kiln_first_token_mismatch"] = row["first_token_mismatch"]["kiln"]
        row["ttft_ratio_kiln_over_torch"] = row["kiln"]["ttft_ms"] / row["torch"]["ttft_ms"]
        if "kiln" in row["decode_speedup_over_torch"]:
            row["decode_speedup_kiln_over_torch"] = row["decode_speedup_over_torch"]["kiln"]
    return row


# --------------------------------------------------------------------------
# report


def f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def header_line(threads: int, attn: str, level: str | None, llama_version: str | None) -> str:
    import torch
    import transformers

    llama = f" · llama-cpp-python {llama_version}" if llama_version else ""
    return (
        f"{now()} · CPU: {cpu_model()} ({os.cpu_count()} logical) · "
        f"kiln level: {level if level else 'n/a'} · threads: {threads} · "
        f"torch {torch.__version__} · transformers {transformers.__version__}{llama} · "
        f"PyTorch attn: {attn} · load avg {load_average()}"
    )


def ratio_cell(ratio: float | None, ok: bool | None) -> str:
    """``0.42× ✓`` (target met) / ``0.61× ✗``, or ``—`` without kiln."""
    if ratio is None:
        return "—"
    return f"{ratio:.2f}× {'✓' if ok else '✗'}"


def range_cell(d: dict | None, key: str, lo: str, hi: str, fmt: str) -> str:
    """``median [p10–p90]`` of d[key], d[lo], d[hi], or ``—``."""
    if not d or key not in d:
        return "—"
    return f"{format(d[key], fmt)} [{format(d[lo], fmt)}–{format(d[hi], fmt)}]"


def ttft_cell(d: dict | None) -> str:
    return range_cell(d, "ttft_ms", "ttft_p10_ms", "ttft_p90_ms", ".1f")


def tok_s_cell(d: dict | None) -> str:
    return range_cell(d, "decode_tok_s", "decode_tok_s_p10", "decode_tok_s_p90", ".1f")


def step_cell(d: dict | None) -> str:
    return range_cell(d, "decode_step_ms", "decode_step_p10_ms", "decode_step_p90_ms", ".2f")


def pct_cell(d: dict | None) -> str:
    return "—" if not d or "roofline_fraction" not in d else f"{100 * d['roofline_fraction']:.0f}%"


def tokens_cell(row: dict, eng: str) -> str:
    if eng == "torch":
        return "(reference)"
    mism = row.get("first_token_mismatch", {}).get(eng)
    if not mism:
        return "—"
    if all(m is None for m in mism):
        return "same"
    first = min(m for m in mism if m is not None)
    return f"differ from step {first}"


def report_case_a(row: dict) -> str:
    t, k = row["torch"], row.get("kiln")
    ttft_ratio = row.get("ttft_ratio_kiln_over_torch")
    speedup = row.get("decode_speedup_kiln_over_torch")
    lines = [
        f"### (a) prompt {row['prompt_len']}, {row['new_tokens']} new tokens",
        "",
        "kiln f32 against PyTorch, with the targets:",
        "",
        "| metric | kiln | PyTorch | kiln vs PyTorch | target |",
        "|---|---:|---:|---:|---:|",
        f"| prefill = TTFT (ms) | {ttft_cell(k)} | {ttft_cell(t)} "
        f"| {ratio_cell(ttft_ratio, None if ttft_ratio is None else ttft_ratio <= TARGET_PREFILL)} "
        f"| ≤ {TARGET_PREFILL}× time |",
        f"| decode (tok/s) | {tok_s_cell(k)} | {tok_s_cell(t)} "
        f"| {ratio_cell(speedup, None if speedup is None else speedup >= TARGET_DECODE)} "
        f"| ≥ {TARGET_DECODE}× tok/s |",
        f"| decode step (ms) | {step_cell(k)} | {step_cell(t)} | | |",
        f"| share of roofline ({f(row.get('roofline_tok_s'), '.1f')} tok/s) | {pct_cell(k)} "
        f"| {pct_cell(t)} | | |",
        "",
        "Every engine and weight format:",
        "",
        "| engine | weights | TTFT ms | decode tok/s | decode step ms | % of roofline "
        "| tok/s vs PyTorch | tokens vs PyTorch |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for eng in row["engines"]:
        d = row[eng]
        engine, weights = LABELS[eng]
        sp = row["decode_speedup_over_torch"].get(eng)
        lines.append(f"| {engine} | {weights} | {ttft_cell(d)} | {tok_s_cell(d)} | {step_cell(d)} "
                     f"| {pct_cell(d)} | {f(sp, '.2f') + '×' if sp else '—'} | {tokens_cell(row, eng)} |")
    return "\n".join(lines + [""] + llama_targets(row))


def llama_targets(row: dict) -> list[str]:
    """One line per target against llama.cpp and the roofline (issue 16), where both ran."""
    mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
    out = ["Targets against llama.cpp and the roofline:", ""]
    k = row.get("kiln") or {}
    if "roofline_fraction" in k:
        frac = k["roofline_fraction"]
        out.append(f"- kiln f32 decode ≥ {TARGET_ROOFLINE:.0%} of the roofline: {frac:.0%} {mark(frac >= TARGET_ROOFLINE)}")
    for ke, le in TARGET_PAIRS.items():
        a, b = row.get(ke), row.get(le)
        if not a or not b or "decode_tok_s" not in a or "decode_tok_s" not in b:
            continue
        (_, kw), (_, lw) = LABELS[ke], LABELS[le]
        out.append(f"- kiln {kw} vs llama.cpp {lw}: decode {a['decode_tok_s']:.1f} vs {b['decode_tok_s']:.1f} tok/s "
                   f"{mark(a['decode_tok_s'] >= b['decode_tok_s'])}, prefill {a['ttft_ms']:.1f} vs "
                   f"{b['ttft_ms']:.1f} ms {mark(a['ttft_ms'] <= b['ttft_ms'])}")
    return out if len(out) > 2 else []


def report_sweep(rows: list[dict], sweep_new: int) -> str:
    lines = [
        f"### (b) context sweep: prompt C − {sweep_new}, {sweep_new} new tokens",
        "",
        "| C | prompt | mean ctx | engine | weights | TTFT ms | decode tok/s | roofline tok/s "
        "| % of roofline | tok/s vs PyTorch |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for eng in r["engines"]:
            d = r[eng]
            engine, weights = LABELS[eng]
            sp = r["decode_speedup_over_torch"].get(eng)
            lines.append(
                f"| {r['context']} | {r['prompt_len']} | {r['decode_ctx_mean']:.1f} | {engine} | {weights} "
                f"| {ttft_cell(d)} | {tok_s_cell(d)} | {f(r.get('roofline_tok_s'), '.1f')} "
                f"| {pct_cell(d)} | {f(sp, '.2f') + '×' if sp else '—'} |"
            )
    return "\n".join(lines)


def report_roofline(bw: dict | None, nbytes: dict, threads: int) -> str:
    lines = [f"Bytes per decoded token (f32 weights): weights {nbytes['weight_bytes'] / 1e6:.1f} MB "
             f"({nbytes['transformer_params']:,} transformer parameters; wte read once by the tied "
             f"head, one wpe row) + KV cache {nbytes['kv_bytes_per_ctx_token'] / 1e3:.1f} kB per "
             f"context token (f32; llama.cpp's cache is f16, half that)."]
    if bw:
        nt = bw["numpy_sum_1t"]
        tt = bw[f"torch_sum_{threads}t"]
        lines.append(
            f"Read bandwidth over {bw['bytes'] / 2**30:.2f} GiB: numpy.sum (1 thread) "
            f"{nt['best_gbs']:.1f} GB/s best, {nt['median_gbs']:.1f} median; torch.sum ({threads} "
            f"threads) {tt['best_gbs']:.1f} best, {tt['median_gbs']:.1f} median. Roofline uses "
            f"{bw['best_gbs']:.1f} GB/s; its share is shown for f32 weights only.")
    else:
        lines.append("Bandwidth not measured (--bw-mib 0): no roofline.")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main


def convert_only(args) -> dict:
    """--convert-only: write and check the GGUF files, nothing else."""
    weights = ensure_weights(args.weights_dir, args.weights_seed)
    llama_cpp, _ = import_llama_cpp()
    args.gguf_info = {}
    paths = ensure_gguf(args, args.quant, llama_cpp)
    hp = gpt2_hparams(args.weights_dir)
    checked = {}
    tensors = None
    for q, p in paths.items():
        if q in args.gguf_info and "tensors" in args.gguf_info[q]:
            checked[q] = args.gguf_info[q]
            continue
        if QUANTS[q]["ggml"] is not None and not gguf_can_quantize(QUANTS[q]["ggml"]):
            checked[q] = {"path": str(p), "checked": False}
            continue
        if tensors is None:
            tensors = gguf_tensors(load_numpy_weights(args.weights_dir), hp)
        checked[q] = {"path": str(p), **check_gguf(p, hp, q, tensors)}
    for q, info in checked.items():
        print(f"{q}: {info}")
    return {"mode": "convert-only", "weights": str(weights), "hparams": hp, "gguf": checked,
            "vocab_source": args.gguf_info.get("vocab_source")}


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

    # kiln: one artifact per weight format; its CPU level from a probe (or the timing JSON).
    kiln = None
    level_info = None
    if args.kiln_bin:
        kiln_bin = check_kiln_bin(args.kiln_bin)
        if not args.spec.is_file():
            raise BenchError(f"--spec {args.spec}: no such file")
        arts = {}
        for q in args.quant:
            arts[q] = kiln_artifact(args.artifact, q, args.cpu)
            kiln_compile(kiln_bin, args.spec, weights, arts[q], args.recompile, q, args.cpu)
        level_info = probe_kiln_level(kiln_bin, args.cpu, args.threads)
        if level_info.get("error"):
            print(f"note: kiln level probe failed: {level_info['error']}", file=sys.stderr)
        kiln = {"bin": kiln_bin, "artifacts": arts}

    # llama.cpp: optional (the Python package), GGUF files converted from the same weights.
    llama_cpp, llama_skip = (None, "skipped llama.cpp: --no-llama-cpp") if args.no_llama_cpp \
        else import_llama_cpp()
    llama_paths = {}
    args.gguf_info = {}
    if llama_cpp is not None:
        llama_paths = ensure_gguf(args, args.quant, llama_cpp)
    elif llama_skip:
        print(llama_skip, file=sys.stderr)
    llama_version = getattr(llama_cpp, "__version__", "?") if llama_cpp else None

    level = (level_info or {}).get("level") if kiln else None
    print(header_line(args.threads, args.attn, level, llama_version), file=sys.stderr)

    bw = None
    if args.bw_mib > 0:
        bw = measure_bandwidth(args.bw_mib, args.bw_reps, args.threads)
        print(f"bandwidth: numpy.sum {bw['numpy_sum_1t']['best_gbs']:.1f} GB/s, torch.sum "
              f"{bw[f'torch_sum_{args.threads}t']['best_gbs']:.1f} GB/s (best)", file=sys.stderr)
    bw_gbs = bw["best_gbs"] if bw else None

    model, config = load_torch_model(args.weights_dir, args.attn)
    nbytes = decode_bytes(model, config)

    runners: dict[str, LlamaCppRunner] = {}
    timing_levels = set()

    def llama_fn(q):
        def fn(prompt, n_new):
            if q not in runners:
                runners[q] = LlamaCppRunner(llama_cpp, llama_paths[q], args.threads, max_pos,
                                            args.llama_flash_attn, args.llama_verbose)
            return runners[q].generate(prompt, n_new)
        return fn

    with tempfile.TemporaryDirectory(prefix="kiln-bench-gen-") as tmp:
        def kiln_fn(q):
            def fn(prompt, n_new):
                res = kiln_generate(kiln["bin"], kiln["artifacts"][q], prompt, n_new, args.threads, Path(tmp))
                if isinstance(res.get("level"), str) and res["level"]:
                    timing_levels.add(res["level"])
                return res
            return fn

        engines = []
        if kiln:  # kiln first: a kiln that cannot run fails the script at once
            engines += [(QUANTS[q]["kiln"], kiln_fn(q)) for q in args.quant]
        if llama_cpp is not None:
            for q in args.quant:
                why = llama_cpp_crashes(llama_paths[q], args.threads)
                if why:
                    print(why, file=sys.stderr)
                else:
                    engines.append((QUANTS[q]["llama"], llama_fn(q)))
        engines.append(("torch", lambda prompt, n_new: torch_generate(model, prompt, n_new)))

        case_a = run_case("a", args.prompt_len, args.new_tokens, args.seed, args, model,
                          config.vocab_size, engines, nbytes, bw_gbs)
        sweep = []
        if not args.no_sweep:
            for i, c in enumerate(args.contexts):
                r = run_case(f"ctx{c}", c - args.sweep_new, args.sweep_new, args.seed + 1 + i, args,
                             model, config.vocab_size, engines, nbytes, bw_gbs)
                r["context"] = c
                sweep.append(r)

    level_source = None
    if kiln:
        if timing_levels:  # kiln generate said it itself
            level, level_source = ", ".join(sorted(timing_levels)), "kiln generate --timing-json"
        else:
            level = level_info.get("level") or UNKNOWN_LEVEL
            level_source = "probe (kiln bench --json of specs/gemm.ron compiled with the same --cpu)"
    header = header_line(args.threads, args.attn, level, llama_version)
    print(header)
    print(f"GPT-2 small (random, {weights}), batch 1, greedy. Cells: median [p10–p90]; TTFT over "
          f"{args.reps} reps after {args.warmup} warm-up (prefill + argmax); decode step: median of "
          f"the reps' medians, p10/p90 over all steps; tok/s = 1000 / step ms.")
    notes = []
    if kiln:
        notes.append(f"kiln level from the {level_source}"
                     + (f", compiled with --cpu {args.cpu}" if args.cpu else ""))
        if level_info and level_info.get("features"):
            notes.append(f"kiln CPU features: {', '.join(level_info['features'])}")
    if llama_cpp is not None:
        notes.append(f"llama.cpp: GGUF from the same weights ({args.gguf_dir}), KV cache f16, "
                     f"flash attention {'on' if args.llama_flash_attn else 'off'}")
    elif llama_skip:
        notes.append(llama_skip)
    for n in notes:
        print(n)
    print()
    print(report_roofline(bw, nbytes, args.threads))
    print()
    print(report_case_a(case_a))
    if sweep:
        print()
        print(report_sweep(sweep, args.sweep_new))
    f32_others = [e for e in ("kiln", "llama_cpp") if e in case_a["engines"]]
    if f32_others:
        print()
        for eng in f32_others:
            bad = [r["case"] for r in [case_a, *sweep]
                   if any(m is not None for m in r["first_token_mismatch"].get(eng, []))]
            who = LABELS[eng][0] + " f32"
            print(f"{who} tokens == PyTorch tokens in every case" if not bad
                  else f"{who} tokens differ from PyTorch's in case(s) {bad} (see JSON)")
    return {
        "header": header,
        "cpu": cpu_model(),
        "kiln_level": level,
        "kiln_level_source": level_source,
        "kiln_features": (level_info or {}).get("features", []),
        "kiln_cpu": (level_info or {}).get("cpu"),
        "kiln_cpu_arg": args.cpu,
        "threads": args.threads,
        "reps": args.reps,
        "warmup": args.warmup,
        "quant": args.quant,
        "torch_attn": args.attn,
        "weights": str(weights),
        "weights_seed": args.weights_seed,
        "kiln_bin": args.kiln_bin,
        "kiln_artifact": str(args.artifact) if args.kiln_bin else None,
        "kiln_artifacts": {q: str(p) for q, p in kiln["artifacts"].items()} if kiln else None,
        "llama_cpp": {"version": llama_version, "gguf": {q: str(p) for q, p in llama_paths.items()},
                      "conversion": args.gguf_info, "flash_attn": args.llama_flash_attn}
        if llama_cpp is not None else {"skipped": llama_skip},
        "bandwidth": bw,
        "bytes": nbytes,
        "targets": {"prefill_time_ratio_max": TARGET_PREFILL, "decode_speedup_min": TARGET_DECODE,
                    "roofline_fraction_min": TARGET_ROOFLINE, "at_least_llama_cpp": TARGET_PAIRS},
        "case_a": case_a,
        "sweep": sweep,
        "load_average_end": load_average(),
    }


def build_parser() -> argparse.ArgumentParser:
    bench = cache_dir() / "bench"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See bench/README.md.")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
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
    p.add_argument("--quant", type=parse_quants, default=parse_quants("f32,int8,int4"),
                   help="weight formats for kiln and llama.cpp: a subset of f32,int8,int4 "
                        "(default all three; PyTorch runs f32)")
    p.add_argument("--weights-dir", type=Path, default=bench / "gpt2-small-random",
                   help="random GPT-2 small checkpoint, created if absent "
                        "(default $KILN_CACHE/bench/gpt2-small-random)")
    p.add_argument("--weights-seed", type=int, default=0,
                   help="torch seed when creating the checkpoint (default 0)")
    p.add_argument("--kiln-bin", help="kiln executable (enables kiln)")
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="kiln spec (default specs/gpt2.ron)")
    p.add_argument("--artifact", type=Path, default=bench / "gpt2-small.kiln",
                   help="compiled f32 kiln model; the others get -int8 / -int4 (and -LEVEL with "
                        "--cpu) in the name (default $KILN_CACHE/bench/gpt2-small.kiln)")
    p.add_argument("--cpu", metavar="LEVEL",
                   help="passed to `kiln compile --cpu`: native, x86-64-v2, x86-64-v3, x86-64-v4 "
                        "(default: kiln's own, native)")
    p.add_argument("--recompile", action="store_true", help="compile the kiln artifacts again")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if installed")
    p.add_argument("--gguf-dir", type=Path, default=bench / "gguf",
                   help="where the GGUF files go (default $KILN_CACHE/bench/gguf)")
    p.add_argument("--reconvert", action="store_true", help="write the GGUF files again")
    p.add_argument("--tokenizer", type=Path,
                   default=cache_dir() / "tokenizers" / "gpt2" / "tokenizer.json",
                   help="GPT-2 tokenizer.json for the GGUF vocabulary (default: the one "
                        "scripts/fetch-tokenizers.sh fetches; a synthetic byte-level one if absent)")
    p.add_argument("--llama-flash-attn", action="store_true",
                   help="llama.cpp with flash attention (default off, llama-cpp-python's default)")
    p.add_argument("--llama-verbose", action="store_true", help="show llama.cpp's own log")
    p.add_argument("--convert-only", action="store_true",
                   help="only write the GGUF files (and check them by reading them back), then exit")
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
    return run_and_report(lambda: convert_only(args) if args.convert_only else run(args), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
