#!/usr/bin/env python3
"""Padded-batch references for the tiny decoders the other scripts wrote (tests/data/<name>/):
the model loaded back from its folder by transformers, run on the folder's input_ids.npy with an
attention mask, as a caller with a left-padded batch runs it (plain forward, no cache):

  attention_mask.npy   int64 [2, 10]: row 0 all ones, row 1 zeros before its last 7 tokens
  masked_logits.npy    float32 [2, 10, 256]: model(input_ids, attention_mask).logits

Positions are not shifted for the padding (transformers' forward counts them from 0 when no
position_ids are given); the mask hides padded keys. Rows of padding queries are left in the file
but mean nothing (every key of theirs is masked); tests compare real tokens only. The script
checks that the mask changes the real tokens' logits, and that the folder still reproduces its
own logits.npy (so the model loaded is the one the references were made from).

Usage: python3 scripts/make-masked-references.py [name ...]   (default: every decoder below)
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import transformers

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
DECODERS = ["gpt2_tiny", "llama_tiny", "mistral_tiny", "qwen2_tiny", "phi3_tiny", "mixtral_tiny", "gpt_neox_tiny",
            "gpt_neox_sequential_tiny"]
PAD = 3


@torch.no_grad()
def make(name: str) -> None:
    folder = DATA / name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model = model.to(torch.float32).eval()
    ids = torch.from_numpy(np.load(folder / "input_ids.npy"))
    plain = model(input_ids=ids, use_cache=False).logits
    stored = torch.from_numpy(np.load(folder / "logits.npy"))
    drift = float((plain - stored).abs().max())
    assert drift < 1e-5, f"{name}: the folder gives logits {drift:.1e} away from its logits.npy"
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    masked = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    moved = float((masked - plain)[1, PAD:].abs().max())
    assert moved > 1e-2, f"{name}: the mask changes nothing ({moved:.1e})"
    np.save(folder / "attention_mask.npy", mask.numpy().astype(np.int64))
    np.save(folder / "masked_logits.npy", np.ascontiguousarray(masked.numpy().astype(np.float32)))
    print(f"{name}: masked_logits {list(masked.shape)}; the mask moves row 1's real tokens by {moved:.3f}")


def main(argv) -> int:
    torch.set_num_threads(2)
    for name in argv or DECODERS:
        if name not in DECODERS:
            raise SystemExit(f"error: unknown decoder {name!r} (known: {', '.join(DECODERS)})")
        make(name)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
