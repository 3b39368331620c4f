#!/usr/bin/env python3
"""References for kiln's encoders: convolutions against torch, tiny ViTs and DistilBERT against
transformers.

tests/data/conv/<case>.safetensors   one case per file: `x`, `weight`, `bias` (input and the
                                     layer's parameters) and `y = torch.nn.functional.convNd(...)`;
                                     metadata "conv" holds the Conv layer's fields as RON
                                     ("in_channels: 4, out_channels: 6, kernel: [3, 3], ...")

tests/data/vit_tiny/                 a Hugging Face folder written by `save_pretrained` (config.json,
                                     model.safetensors with the hub's tensor names: what
                                     `kiln import` reads) plus
  pixel_values.npy                   float32 [2, 3, 32, 32], N(0, 1) from a fixed generator
  last_hidden_state.npy              float32 [2, 17, 64]
  pooler_output.npy                  float32 [2, 64]

tests/data/vit_classifier_tiny/      ViTForImageClassification (one layer, three labels: tensors
                                     under `vit.`, no pooler, a `classifier`) plus
  pixel_values.npy, logits.npy       float32 [2, 3, 32, 32] and [2, 3]

tests/data/distilbert_tiny/          DistilBertModel (save_pretrained) plus
  input_ids.npy, attention_mask.npy  int64 [2, 10]; the second row is padding after 6 tokens
  last_hidden_state.npy              float32 [2, 10, 64]

tests/data/bert_tiny/                BertModel with its pooler (save_pretrained, type_vocab_size 2) plus
  input_ids.npy, attention_mask.npy  int64 [3, 10]: a full row, a row padded after 6 tokens and a
  token_type_ids.npy                 row padded before its last 7; types 0 then 1 (two segments)
  last_hidden_state.npy              float32 [3, 10, 64]
  pooler_output.npy                  float32 [3, 64]
  defaults_last_hidden_state.npy     the same model given input_ids only (transformers' defaults:
  defaults_pooler_output.npy         a mask of ones, token types of zeros)

tests/data/roberta_tiny/             RobertaModel with its pooler (save_pretrained, type_vocab_size 1
                                     as RoBERTa's checkpoints) plus
  input_ids.npy, attention_mask.npy  int64 [3, 10]: a full row, a row padded after 6 tokens and a
                                     row padded before its last 7 (padding id 1: positions count
                                     only real tokens, from padding_idx + 1)
  token_type_ids.npy                 int64 [3, 10] of zeros
  last_hidden_state.npy              float32 [3, 10, 64]
  pooler_output.npy                  float32 [3, 64]

Every tensor is float32; CPU, 2 threads, offline, fixed seeds; parameters are perturbed by N(0, 0.02²)
after initialisation so that no weight is left at an exact 0 or 1 (LayerNorm, biases).

Usage: python3 scripts/make-encoder-references.py [conv|vit|vit_classifier|distilbert|bert|roberta ...]
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
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
PERTURB_STD = 0.02

# name: (x shape, out channels, kernel, stride, padding, groups). Spatial rank = len(x shape) - 2.
CONV_CASES = {
    # ViT's patch embedding: stride = kernel, no padding.
    "patch2d": ((2, 3, 8, 8), 5, [4, 4], [4, 4], [0, 0], 1),
    # Strided, padded, grouped, uneven extents (9 and 7 do not divide by the stride).
    "grouped2d": ((2, 4, 9, 7), 6, [3, 3], [2, 2], [1, 1], 2),
    # A rectangular kernel with a different stride and padding per axis.
    "rect2d": ((1, 3, 6, 8), 4, [2, 3], [1, 2], [0, 1], 1),
    # Depthwise 1-D with same padding (audio front ends).
    "depthwise1d": ((2, 4, 10), 4, [3], [1], [1], 4),
    # Strided 1-D whose last window does not reach the end.
    "strided1d": ((1, 2, 11), 3, [4], [2], [0], 1),
}

VIT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    num_channels=3,
    layer_norm_eps=1e-12,
)


def save_npy(path: Path, arr) -> None:
    np.save(path, np.ascontiguousarray(np.asarray(arr, dtype=np.float32)))


@torch.no_grad()
def conv_cases() -> None:
    out = DATA / "conv"
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    for name, (shape, o, kernel, stride, padding, groups) in CONV_CASES.items():
        c = shape[1]
        x = torch.randn(shape, generator=g)
        w = torch.randn((o, c // groups, *kernel), generator=g) * 0.3
        b = torch.randn((o,), generator=g) * 0.1
        conv = F.conv2d if len(kernel) == 2 else F.conv1d
        y = conv(x, w, b, stride=stride, padding=padding, groups=groups)
        fields = dict(in_channels=c, out_channels=o, kernel=kernel, stride=stride, padding=padding,
                      groups=groups)
        save_file({"x": x, "weight": w, "bias": b, "y": y.contiguous()}, str(out / f"{name}.safetensors"),
                  metadata={"conv": ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())})
        os.chmod(out / f"{name}.safetensors", 0o644)
        print(f"conv {name}: x {list(shape)} -> y {list(y.shape)}")


def perturbed(model_cls, config, **init):
    """A random-init model in eval mode, perturbed, eager attention."""
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config, **init)
    torch.manual_seed(1)
    for _, p in model.named_parameters():
        p.add_(torch.randn_like(p) * PERTURB_STD)
    return model.to(torch.float32).eval()


def tiny(model_cls, **kwargs):
    """A perturbed tiny ViT (with the pooler for ViTModel)."""
    init = {"add_pooling_layer": True} if model_cls is transformers.ViTModel else {}
    return perturbed(model_cls, transformers.ViTConfig(**kwargs), **init)


def save_folder(model, name: str, first_tensor: str) -> Path:
    """`save_pretrained` into tests/data/<name>, checking the hub's tensor names came out."""
    out = DATA / name
    model.save_pretrained(out)
    os.chmod(out / "model.safetensors", 0o644)
    (out / "generation_config.json").unlink(missing_ok=True)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert first_tensor in names, sorted(names)[:8]
    return out


def pixels() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn((2, 3, 32, 32), generator=g)


@torch.no_grad()
def vit() -> None:
    model = tiny(transformers.ViTModel, **VIT)
    px = pixels()
    res = model(pixel_values=px)
    out = save_folder(model, "vit_tiny", "encoder.layer.0.attention.attention.query.weight")
    save_npy(out / "pixel_values.npy", px.numpy())
    save_npy(out / "last_hidden_state.npy", res.last_hidden_state.numpy())
    save_npy(out / "pooler_output.npy", res.pooler_output.numpy())
    print(f"vit_tiny: last_hidden_state {list(res.last_hidden_state.shape)}, "
          f"pooler_output {list(res.pooler_output.shape)}")


@torch.no_grad()
def vit_classifier() -> None:
    kwargs = dict(VIT, num_hidden_layers=1, num_labels=3)
    model = tiny(transformers.ViTForImageClassification, **kwargs)
    px = pixels()
    logits = model(pixel_values=px).logits
    out = save_folder(model, "vit_classifier_tiny", "vit.encoder.layer.0.attention.attention.query.weight")
    save_npy(out / "pixel_values.npy", px.numpy())
    save_npy(out / "logits.npy", logits.numpy())
    print(f"vit_classifier_tiny: logits {list(logits.shape)}")


@torch.no_grad()
def distilbert() -> None:
    config = transformers.DistilBertConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                           max_position_embeddings=64)
    model = perturbed(transformers.DistilBertModel, config)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 256, (2, 10), generator=g)
    mask = torch.ones((2, 10), dtype=torch.int64)
    mask[1, 6:] = 0
    ids[1, 6:] = 0  # the pad token
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = save_folder(model, "distilbert_tiny", "transformer.layer.0.attention.q_lin.weight")
    np.save(out / "input_ids.npy", ids.numpy())
    np.save(out / "attention_mask.npy", mask.numpy())
    save_npy(out / "last_hidden_state.npy", hidden.numpy())
    print(f"distilbert_tiny: last_hidden_state {list(hidden.shape)}")


def padded_rows(g, vocab: int, pad: int):
    """Token ids [3, 10] from `g` with a full row, a row padded after 6 tokens and one padded before
    its last 7; and their attention mask."""
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones((3, 10), dtype=torch.int64)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    ids[mask == 0] = pad
    return ids, mask


def save_encoder_io(out: Path, ids, mask, types, res, prefix: str = "") -> None:
    """The int64 inputs given (None: not saved) and the float32 outputs, as <prefix><name>.npy."""
    for name, t in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types)):
        if t is not None:
            np.save(out / f"{name}.npy", t.numpy())
    save_npy(out / f"{prefix}last_hidden_state.npy", res.last_hidden_state.numpy())
    save_npy(out / f"{prefix}pooler_output.npy", res.pooler_output.numpy())


@torch.no_grad()
def bert() -> None:
    config = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
    model = perturbed(transformers.BertModel, config, add_pooling_layer=True)
    ids, mask = padded_rows(torch.Generator().manual_seed(3), 256, config.pad_token_id)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    res = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    bare = model(input_ids=ids)
    out = save_folder(model, "bert_tiny", "encoder.layer.0.attention.self.query.weight")
    save_encoder_io(out, ids, mask, types, res)
    save_encoder_io(out, None, None, None, bare, prefix="defaults_")
    print(f"bert_tiny: last_hidden_state {list(res.last_hidden_state.shape)}; given input_ids only, "
          f"{(res.last_hidden_state - bare.last_hidden_state).abs().max().item():.3f} away")


@torch.no_grad()
def roberta() -> None:
    config = transformers.RobertaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=66, type_vocab_size=1)
    model = perturbed(transformers.RobertaModel, config, add_pooling_layer=True)
    ids, mask = padded_rows(torch.Generator().manual_seed(3), 256, config.pad_token_id)
    types = torch.zeros_like(ids)
    res = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = save_folder(model, "roberta_tiny", "encoder.layer.0.attention.self.query.weight")
    save_encoder_io(out, ids, mask, types, res)
    print(f"roberta_tiny: last_hidden_state {list(res.last_hidden_state.shape)}")


def main(argv) -> int:
    torch.set_num_threads(2)
    makers = {"conv": conv_cases, "vit": vit, "vit_classifier": vit_classifier, "distilbert": distilbert,
              "bert": bert, "roberta": roberta}
    for name in argv or list(makers):
        if name not in makers:
            raise SystemExit(f"error: unknown reference {name!r} (known: {', '.join(makers)})")
        makers[name]()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
