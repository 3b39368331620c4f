#!/usr/bin/env python3
"""Generate the reference inputs/outputs under tests/data/ with PyTorch + transformers.

Cases:
  tests/data/minilm/     real sentence-transformers/all-MiniLM-L6-v2 (BertModel), taken
                         from ${KILN_CACHE:-~/.cache/kiln}/all-MiniLM-L6-v2 (run
                         scripts/fetch-minilm.sh first). The checkpoint is NOT copied here.
  tests/data/gpt2_tiny/  randomly initialised + perturbed 2-layer GPT-2 (GPT2LMHeadModel)
  tests/data/llama_tiny/ randomly initialised + perturbed 2-layer Llama (GQA, RoPE)

Everything is float32, eager attention, CPU, fixed seeds. Only this script needs torch;
the tests read the .npy/.safetensors/.json files it writes.

Usage: bash scripts/fetch-minilm.sh && python3 scripts/make-references.py
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
CACHE = Path(os.environ.get("KILN_CACHE") or (Path.home() / ".cache" / "kiln"))
MINILM_DIR = CACHE / "all-MiniLM-L6-v2"

SINGLE_SENTENCE = "kiln compiles transformer models into fast native code."
PADDED_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "Rust is a systems programming language.",
]
MAX_TOKENS = 16
PERTURB_STD = 0.02


def save_npy(path: Path, arr: np.ndarray, dtype) -> None:
    np.save(path, np.ascontiguousarray(np.asarray(arr, dtype=dtype)))


def save_checkpoint(path: Path, tensors: dict) -> None:
    tensors = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)


def save_config(path: Path, config) -> None:
    d = config.to_dict()
    d.pop("_attn_implementation", None)
    d.pop("_attn_implementation_internal", None)
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def checksum(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().sum())


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Add N(0, 0.02^2) noise to every parameter (tied parameters are visited once)."""
    torch.manual_seed(seed)
    for _, p in model.named_parameters():
        p.add_(torch.randn_like(p) * PERTURB_STD)


def parameter_state_dict(module: torch.nn.Module) -> dict:
    """state_dict() restricted to parameters (drops buffers such as attn.bias / inv_freq)."""
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in module.state_dict().items() if k in params}


# --------------------------------------------------------------------------- MiniLM


def tokenize(tok: Tokenizer, sentences):
    encs = [tok.encode(s) for s in sentences]
    seq = max(len(e.ids) for e in encs)
    if seq > MAX_TOKENS:
        raise SystemExit(f"sentence too long: {seq} tokens > {MAX_TOKENS}")
    ids = np.zeros((len(encs), seq), dtype=np.int64)  # [PAD] = 0
    mask = np.zeros((len(encs), seq), dtype=np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    types = np.zeros_like(ids)
    return ids, mask, types


@torch.no_grad()
def make_minilm() -> None:
    if not (MINILM_DIR / "model.safetensors").is_file():
        raise SystemExit(
            f"error: {MINILM_DIR}/model.safetensors not found; run `bash scripts/fetch-minilm.sh` first"
        )
    out = DATA / "minilm"
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    tok.no_padding()  # tokenizer.json ships with fixed padding to 128
    tok.no_truncation()

    model, info = BertModel.from_pretrained(
        str(MINILM_DIR),
        attn_implementation="eager",
        dtype=torch.float32,
        output_loading_info=True,
    )
    if info.get("missing_keys"):
        raise SystemExit(f"error: MiniLM weights missing from checkpoint: {info['missing_keys']}")
    model.eval()

    cases = {"single": [SINGLE_SENTENCE], "padded": PADDED_SENTENCES}
    for prefix, sentences in cases.items():
        ids, mask, types = tokenize(tok, sentences)
        res = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
        )
        hidden = res.last_hidden_state.float()
        save_npy(out / f"{prefix}_input_ids.npy", ids, np.int64)
        save_npy(out / f"{prefix}_attention_mask.npy", mask, np.int64)
        save_npy(out / f"{prefix}_token_type_ids.npy", types, np.int64)
        save_npy(out / f"{prefix}_last_hidden_state.npy", hidden.numpy(), np.float32)
        # BertModel's pooler: dense + tanh over the first ([CLS]) token.
        save_npy(out / f"{prefix}_pooler_output.npy", res.pooler_output.float().numpy(), np.float32)
        line = (
            f"minilm/{prefix}: input_ids {list(ids.shape)} tokens/row {mask.sum(1).tolist()} "
            f"last_hidden_state {list(hidden.shape)} sum|x|={checksum(hidden):.6f}"
        )
        if prefix == "padded":
            # sentence-transformers: Pooling(mean over attention_mask) -> Normalize(L2)
            m = torch.from_numpy(mask).unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * m).sum(dim=1)
            counts = torch.clamp(m.sum(dim=1), min=1e-9)
            emb = F.normalize(summed / counts, p=2, dim=1)
            save_npy(out / "padded_sentence_embedding.npy", emb.numpy(), np.float32)
            line += f" sentence_embedding {list(emb.shape)} sum|x|={checksum(emb):.6f}"
        print(line)

    with open(out / "sentences.json", "w") as f:
        json.dump(cases, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------- GPT-2


@torch.no_grad()
def make_gpt2_tiny() -> None:
    out = DATA / "gpt2_tiny"
    out.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(
        vocab_size=256,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,  # defaults (50256) are outside the tiny vocab; unused here
        eos_token_id=None,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(torch.float32)
    perturb_(model, seed=1)
    model.eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    assert model.config.scale_attn_weights and not model.config.scale_attn_by_inverse_layer_idx
    assert not model.config.reorder_and_upcast_attn

    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 256, (2, 10), generator=g, dtype=torch.int64)
    logits = model(input_ids=input_ids).logits.float()

    sd = parameter_state_dict(model.transformer)
    save_checkpoint(out / "model.safetensors", sd)
    save_npy(out / "input_ids.npy", input_ids.numpy(), np.int64)
    save_npy(out / "logits.npy", logits.numpy(), np.float32)
    save_config(out / "config.json", config)
    print(
        f"gpt2_tiny: {len(sd)} tensors input_ids {list(input_ids.shape)} "
        f"logits {list(logits.shape)} sum|x|={checksum(logits):.6f}"
    )


# --------------------------------------------------------------------------- Llama


@torch.no_grad()
def make_llama_tiny() -> None:
    out = DATA / "llama_tiny"
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    config._attn_implementation = "eager"
    rp = getattr(config, "rope_parameters", None)
    if rp is not None:
        assert rp.get("rope_type", "default") == "default", rp
        assert float(rp["rope_theta"]) == 10000.0, rp
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    perturb_(model, seed=1)
    model.eval()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(), "lm_head tied"

    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 256, (2, 10), generator=g, dtype=torch.int64)
    logits = model(input_ids=input_ids).logits.float()

    sd = parameter_state_dict(model)
    save_checkpoint(out / "model.safetensors", sd)
    save_npy(out / "input_ids.npy", input_ids.numpy(), np.int64)
    save_npy(out / "logits.npy", logits.numpy(), np.float32)
    save_config(out / "config.json", config)
    print(
        f"llama_tiny: {len(sd)} tensors input_ids {list(input_ids.shape)} "
        f"logits {list(logits.shape)} sum|x|={checksum(logits):.6f}"
    )


def main() -> int:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, minilm dir {MINILM_DIR}")
    make_minilm()
    make_gpt2_tiny()
    make_llama_tiny()
    return 0


if __name__ == "__main__":
    sys.exit(main())
