#!/usr/bin/env python3
"""Generate greedy-decoding references for the tiny GPT-2 and Llama models under tests/data/.

The models are NOT re-created: each one is rebuilt from tests/data/<m>/config.json and the
weights in tests/data/<m>/model.safetensors (written by scripts/make-references.py) are loaded
with strict checking (GPT-2: into `GPT2LMHeadModel.transformer`, the LM head being tied to
`wte`; Llama: into the whole `LlamaForCausalLM`). As a sanity check the loaded model must
reproduce tests/data/<m>/logits.npy for tests/data/<m>/input_ids.npy.

Per model it writes:
  tests/data/<m>/generate.json          {"prompts": [[ids]] (lengths 1, 5, 11; ids drawn from
                                         [0, 256) with a fixed torch.Generator seed per model),
                                         "max_new_tokens": 24, "greedy": [[24 new ids] per prompt],
                                         "torch": version, "transformers": version}
  tests/data/<m>/generate_sequence.npy  int64 [1, 35]: longest prompt + its 24 greedy tokens
  tests/data/<m>/generate_logits.npy    float32 [1, 35, 256]: full-sequence logits of the model
                                         on generate_sequence (position t predicts token t+1)

Each prompt is decoded on its own (batch 1, no padding, no EOS stop). The greedy tokens come
from `model.generate(do_sample=False)`, and must equal both a hand-written greedy loop with the
KV cache (use_cache=True, past_key_values) and a no-cache loop that recomputes the whole
sequence each step (argmax of the last position's logits); the script fails otherwise.
EOS is never a stop: Llama's config has eos_token_id=2 (token 2 does come out of greedy decoding
for some prompts). generate() gets eos_token_id=None (enough with transformers 5.23), and, in case
another version reads None as "use the default", the generation_config's EOS is cleared as well
and min_new_tokens=max_new_tokens; the output length is asserted.

The random tiny GPT-2 decodes almost constant sequences (one to four distinct tokens per prompt,
whatever the prompt); its generate_logits.npy, which differ at every step, is the stronger check.

Everything is float32, eager attention, CPU, 2 threads, offline.

Usage: python3 scripts/make-decode-references.py
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import transformers
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"

VOCAB = 256
PROMPT_LENGTHS = (1, 5, 11)
# Prompt seeds, picked among 0..11 for the most varied greedy decodings with every top-1/top-2
# logit gap along the greedy paths >= 1e-3 (robust to float32 summation order).
PROMPT_SEEDS = {"gpt2_tiny": 2, "llama_tiny": 9}
# Warn when the winning logit beats the runner-up by less than this somewhere.
MIN_SAFE_GAP = 1e-4
MAX_NEW_TOKENS = 24
# make-references.py: the tiny models' logits.npy must be reproduced within this.
REFERENCE_ATOL = 1e-5


def save_npy(path: Path, arr: np.ndarray, dtype) -> None:
    np.save(path, np.ascontiguousarray(np.asarray(arr, dtype=dtype)))


def save_json(path: Path, obj: dict) -> None:
    """One key per line, and each list of ids on one line."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], list):
            rows = ",\n".join(f"    {json.dumps(r)}" for r in v)
            lines.append(f"  {json.dumps(k)}: [\n{rows}\n  ]")
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v)}")
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")


def checksum(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().sum())


def load_strict(module: torch.nn.Module, path: Path, what: str) -> int:
    """Load a safetensors file into ``module``; fail on any missing or unexpected key.

    Non-persistent buffers (GPT-2's causal mask, Llama's rotary inv_freq) are not part of
    ``state_dict()`` and so are neither expected nor allowed in the checkpoint.
    """
    sd = load_file(str(path))
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise SystemExit(
            f"error: {what}: {path} does not match the model\n"
            f"  missing keys:    {missing}\n  unexpected keys: {unexpected}"
        )
    for k, v in sd.items():
        if v.dtype != torch.float32:
            raise SystemExit(f"error: {what}: {path}: {k} is {v.dtype}, expected float32")
    module.load_state_dict(sd, strict=True)
    return len(sd)


def config_from_json(cls, path: Path):
    with open(path) as f:
        d = json.load(f)
    d.pop("transformers_version", None)
    config = cls.from_dict(d)
    config._attn_implementation = "eager"
    return config


# --------------------------------------------------------------------------- models


def load_gpt2_tiny():
    src = DATA / "gpt2_tiny"
    config = config_from_json(GPT2Config, src / "config.json")
    model = GPT2LMHeadModel(config).to(torch.float32)
    n = load_strict(model.transformer, src / "model.safetensors", "gpt2_tiny")
    model.eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    assert config.n_positions == 64, config.n_positions
    return model, n, config.n_positions


def load_llama_tiny():
    src = DATA / "llama_tiny"
    config = config_from_json(LlamaConfig, src / "config.json")
    model = LlamaForCausalLM(config).to(torch.float32)
    n = load_strict(model, src / "model.safetensors", "llama_tiny")
    model.eval()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(), "lm_head tied"
    assert config.max_position_embeddings == 128, config.max_position_embeddings
    return model, n, config.max_position_embeddings


# --------------------------------------------------------------------------- decoding


@torch.no_grad()
def greedy_no_cache(model, prompt: torch.Tensor, n: int) -> list:
    """Recompute the full sequence every step; argmax of the last position's logits."""
    seq = prompt.clone()
    out = []
    for _ in range(n):
        logits = model(input_ids=seq, use_cache=False).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]], dtype=seq.dtype)], dim=1)
    return out


@torch.no_grad()
def greedy_kv_cache(model, prompt: torch.Tensor, n: int) -> list:
    """Prefill once, then feed one token at a time with past_key_values."""
    res = model(input_ids=prompt, use_cache=True)
    past = res.past_key_values
    nxt = int(res.logits[0, -1].argmax())
    out = [nxt]
    for _ in range(n - 1):
        res = model(input_ids=torch.tensor([[nxt]], dtype=prompt.dtype), past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        out.append(nxt)
    return out


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, n: int) -> list:
    """HF generate, greedy, never stopping at EOS (Llama's default EOS, 2, is a token that
    greedy decoding does emit; the generation_config's EOS is cleared besides the argument)."""
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
    )
    assert out.shape == (1, prompt.shape[1] + n), out.shape
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    return out[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def min_top2_gap(model, prompt: torch.Tensor, greedy: list) -> float:
    """Smallest (top-1 - top-2) logit gap over the positions that chose ``greedy``."""
    seq = torch.cat([prompt, torch.tensor([greedy], dtype=prompt.dtype)], dim=1)
    logits = model(input_ids=seq, use_cache=False).logits[0, prompt.shape[1] - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def make_prompts(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, n), generator=g, dtype=torch.int64) for n in PROMPT_LENGTHS]


@torch.no_grad()
def make_decode_reference(name: str, loader) -> None:
    out_dir = DATA / name
    model, n_tensors, max_pos = loader()
    assert max(PROMPT_LENGTHS) + MAX_NEW_TOKENS <= max_pos, "sequence would exceed the position limit"

    # The loaded weights must reproduce make-references.py's logits.
    ids = torch.from_numpy(np.load(out_dir / "input_ids.npy"))
    ref = torch.from_numpy(np.load(out_dir / "logits.npy"))
    got = model(input_ids=ids, use_cache=False).logits
    diff = float((got - ref).abs().max())
    if diff > REFERENCE_ATOL:
        raise SystemExit(f"error: {name}: logits.npy not reproduced (max|diff| {diff:.3g})")

    prompts = make_prompts(PROMPT_SEEDS[name])
    greedy = []
    for p in prompts:
        gen = greedy_generate(model, p, MAX_NEW_TOKENS)
        kv = greedy_kv_cache(model, p, MAX_NEW_TOKENS)
        full = greedy_no_cache(model, p, MAX_NEW_TOKENS)
        if not (gen == kv == full):
            raise SystemExit(
                f"error: {name}: greedy decodings disagree for prompt {p[0].tolist()}\n"
                f"  generate: {gen}\n  kv-cache: {kv}\n  no-cache: {full}"
            )
        greedy.append(full)

    longest = int(np.argmax(PROMPT_LENGTHS))
    seq = torch.cat([prompts[longest], torch.tensor([greedy[longest]], dtype=torch.int64)], dim=1)
    logits = model(input_ids=seq, use_cache=False).logits.float()
    # The stored logits agree with the greedy tokens (position t predicts token t+1).
    plen = prompts[longest].shape[1]
    assert logits[0, plen - 1:-1].argmax(-1).tolist() == greedy[longest]

    # Closest top-1/top-2 logit gap along all greedy paths: how robust the tokens are.
    min_gap = min(min_top2_gap(model, p, g) for p, g in zip(prompts, greedy))
    if min_gap < MIN_SAFE_GAP:
        print(f"warning: {name}: a greedy step wins by only {min_gap:.2e} in logit; an exact "
              f"token match may then depend on float32 summation order", file=sys.stderr)

    save_json(out_dir / "generate.json", {
        "prompts": [p[0].tolist() for p in prompts],
        "max_new_tokens": MAX_NEW_TOKENS,
        "greedy": greedy,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    })
    with open(out_dir / "generate.json") as f:
        assert json.load(f)["greedy"] == greedy
    save_npy(out_dir / "generate_sequence.npy", seq.numpy(), np.int64)
    save_npy(out_dir / "generate_logits.npy", logits.numpy(), np.float32)
    print(
        f"{name}: {n_tensors} tensors, logits.npy max|diff| {diff:.1e}; prompts {list(PROMPT_LENGTHS)} "
        f"+ {MAX_NEW_TOKENS} greedy (generate == kv-cache == no-cache); "
        f"generate_logits {list(logits.shape)} sum|x|={checksum(logits):.6f} min top-2 gap {min_gap:.1e}"
    )


def main() -> int:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    make_decode_reference("gpt2_tiny", load_gpt2_tiny)
    make_decode_reference("llama_tiny", load_llama_tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
