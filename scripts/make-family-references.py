#!/usr/bin/env python3
"""Tiny random-init decoders of the model families kiln imports, with transformers' outputs.

Each family gets a folder tests/data/<family>_tiny/ laid out as a Hugging Face model folder
(config.json, model.safetensors: what `kiln import` and `kiln compile DIR` read) plus the
references the tests compare against:

  input_ids.npy   int64 [2, 10], ids in [0, 256) from a fixed torch.Generator
  logits.npy      float32 [2, 10, 256]: the model's logits on them (eager attention)
  generate.json   {"prompts": [[ids]] (lengths 1, 5, 11), "max_new_tokens": 24,
                   "greedy": [[24 ids] per prompt], "torch", "transformers"}

Families (each exercises what it adds over Llama):
  mistral_tiny   sliding-window attention (sliding_window = 4, shorter than every sequence
                 past the first prompt, so the window changes the logits; checked)
  qwen2_tiny     q/k/v biases, LM head tied to the embedding (no lm_head.weight in the file,
                 as Qwen2's small checkpoints ship)
  phi3_tiny      fused projections: qkv_proj [q + k + v rows] and gate_up_proj [gate; up]
  mixtral_tiny   mixture of experts: 8 experts, top 2, softmax router renormalized over the chosen
                 two; saved as the hub names them (block_sparse_moe.experts.{e}.w1/w2/w3, what
                 `save_pretrained` writes; transformers 5 fuses them only in memory). The smallest gap
                 between a token's 2nd and 3rd router probability is printed and must exceed 1e-4,
                 so that a 1e-6 difference cannot change which experts a token uses
  gpt_neox_tiny  parallel residual (x + attn(ln1 x) + mlp(ln2 x)), query_key_value interleaved
                 per head ([heads, 3, head_dim] rows), rotary on a quarter of each head,
                 LayerNorm with biases, GELU, untied embed_out
  gpt_neox_sequential_tiny  the same with use_parallel_residual = false (a sequential residual)

Greedy tokens come from `generate(do_sample=False)` and must equal a loop that recomputes the
whole sequence at every step; EOS never stops (cleared, min_new_tokens = max_new_tokens). Every
tensor is float32; CPU, 2 threads, offline, fixed seeds; parameters are perturbed by N(0, 0.02²)
after initialisation so that no weight is left at an exact 0 or 1.

Usage: python3 scripts/make-family-references.py [family ...]
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
VOCAB = 256
PROMPT_LENGTHS = (1, 5, 11)
MAX_NEW_TOKENS = 24
PERTURB_STD = 0.02
MIN_SAFE_GAP = 1e-4

# The Llama-like shape every family shares; each adds its own fields.
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)

FAMILIES = {
    "mistral_tiny": ("MistralConfig", "MistralForCausalLM",
                     dict(SHAPE, sliding_window=4, tie_word_embeddings=False)),
    "qwen2_tiny": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(SHAPE, tie_word_embeddings=True, use_sliding_window=False)),
    "phi3_tiny": ("Phi3Config", "Phi3ForCausalLM",
                  dict(SHAPE, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mixtral_tiny": ("MixtralConfig", "MixtralForCausalLM",
                     dict(SHAPE, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                          tie_word_embeddings=False, initializer_range=0.1)),
    # GPT-NeoX has its own field names (no key/value heads, LayerNorm epsilon, rotary_pct).
    "gpt_neox_tiny": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                      dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False,
                           initializer_range=0.1)),  # wider logits: greedy steps win clearly
    # The sequential residual (x + attn(ln1 x), then + mlp(ln2 ·)), as Pythia's successors use.
    "gpt_neox_sequential_tiny": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                                 dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25,
                                      use_parallel_residual=False, tie_word_embeddings=False,
                                      initializer_range=0.1)),
}


def save_npy(path: Path, arr, dtype) -> None:
    np.save(path, np.ascontiguousarray(np.asarray(arr, dtype=dtype)))


def save_json(path: Path, obj: dict) -> None:
    """One key per line, each list of ids on one line."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], list):
            rows = ",\n".join(f"    {json.dumps(r)}" for r in v)
            lines.append(f"  {json.dumps(k)}: [\n{rows}\n  ]")
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v)}")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def save_config(path: Path, config) -> None:
    d = config.to_dict()
    for k in ("_attn_implementation", "_attn_implementation_internal"):
        d.pop(k, None)
    path.write_text(json.dumps(d, indent=2, sort_keys=True, default=str) + "\n")


# Parameters transformers 5 renames in memory but `save_pretrained` (and the hub) name the old way.
SAVED_NAMES = {"gpt_neox_tiny": {"lm_head.weight": "embed_out.weight"}}


# Families whose in-memory parameters differ from the hub layout: their file is save_pretrained's.
SAVE_PRETRAINED = {"mixtral_tiny"}


def checkpoint(model, family: str) -> dict:
    """The parameters by the names `save_pretrained` writes, a tied LM head left out."""
    if family in SAVE_PRETRAINED:
        import tempfile
        from safetensors.torch import load_file
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            return {k: v.to(torch.float32).contiguous() for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    tied = model.config.tie_word_embeddings
    rename = SAVED_NAMES.get(family, {})
    out = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        out[rename.get(name, name)] = p.detach().to(torch.float32).clone().contiguous()
    if tied:
        out.pop("lm_head.weight", None)
    return out


@torch.no_grad()
def greedy_generate(model, prompt, n: int) -> list:
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=None,
                         pad_token_id=0, use_cache=True)
    assert out.shape == (1, prompt.shape[1] + n), out.shape
    return out[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def greedy_no_cache(model, prompt, n: int) -> tuple:
    """Greedy tokens recomputing the whole sequence each step, and the smallest top-1/top-2 gap."""
    seq, out, gap = prompt.clone(), [], float("inf")
    for _ in range(n):
        last = model(input_ids=seq, use_cache=False).logits[0, -1]
        top2 = last.topk(2).values
        gap = min(gap, float(top2[0] - top2[1]))
        nxt = int(last.argmax())
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out, gap


@torch.no_grad()
def check_routing_margin(model, ids, k: int) -> None:
    """Every token's k-th router probability must beat its (k+1)-th by a margin."""
    out = model(input_ids=ids, use_cache=False, output_router_logits=True)
    gap = float("inf")
    for logits in out.router_logits:
        probs = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
        gap = min(gap, float((probs[:, k - 1] - probs[:, k]).min()))
    print(f"routing: smallest gap between the top {k} experts and the next {gap:.1e}")
    if gap < 1e-4:
        raise SystemExit(f"error: a token's routing is decided by {gap:.1e}; change the seed")


@torch.no_grad()
def make(name: str) -> None:
    config_cls, model_cls, kwargs = FAMILIES[name]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(torch.float32)
    torch.manual_seed(1)
    for _, p in model.named_parameters():
        p.add_(torch.randn_like(p) * PERTURB_STD)
    model.eval()

    out = DATA / name
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 10), generator=g, dtype=torch.int64)
    logits = model(input_ids=ids, use_cache=False).logits.float()
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        # The window must matter at these lengths, or the test would not test it.
        w = config.sliding_window
        config.sliding_window = None
        full = model(input_ids=ids, use_cache=False).logits
        config.sliding_window = w
        assert float((full - logits).abs().max()) > 1e-3, f"{name}: the window changes nothing"

    if hasattr(config, "num_experts_per_tok"):
        check_routing_margin(model, ids, config.num_experts_per_tok)

    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=g, dtype=torch.int64) for n in PROMPT_LENGTHS]
    greedy, gap = [], float("inf")
    for p in prompts:
        gen = greedy_generate(model, p, MAX_NEW_TOKENS)
        full, pg = greedy_no_cache(model, p, MAX_NEW_TOKENS)
        if gen != full:
            raise SystemExit(f"error: {name}: generate {gen} != no-cache loop {full} for {p[0].tolist()}")
        greedy.append(gen)
        gap = min(gap, pg)
    if gap < MIN_SAFE_GAP:
        print(f"warning: {name}: a greedy step wins by {gap:.2e} only", file=sys.stderr)

    sd = checkpoint(model, name)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    save_config(out / "config.json", config)
    save_npy(out / "input_ids.npy", ids.numpy(), np.int64)
    save_npy(out / "logits.npy", logits.numpy(), np.float32)
    save_json(out / "generate.json", {
        "prompts": [p[0].tolist() for p in prompts],
        "max_new_tokens": MAX_NEW_TOKENS,
        "greedy": greedy,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    })
    print(f"{name}: {len(sd)} tensors, logits {list(logits.shape)} "
          f"sum|x|={float(logits.double().abs().sum()):.6f}, greedy min top-2 gap {gap:.1e}")


def main(argv) -> int:
    torch.set_num_threads(2)
    names = argv or list(FAMILIES)
    for n in names:
        if n not in FAMILIES:
            raise SystemExit(f"error: unknown family {n!r} (known: {', '.join(FAMILIES)})")
        make(n)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
