#!/usr/bin/env python3
"""Accuracy of int8 MiniLM against f32: kiln's report beside ONNX Runtime's dynamic int8.

Both are measured the way ``kiln compile --calib`` reports kiln's: the held-out quarter of
``specs/data/calibration.txt`` (each non-empty line one sample, tokenized with special tokens, batch
1, no padding), cosine between the quantized and the f32 model's ``last_hidden_state`` per token,
mean and min over all tokens. The f32 reference for ORT is PyTorch (transformers, eager); kiln's is
its own f32 artifact. ORT's int8 model is the one ``bench/compare.py --ort-int8`` writes (dynamic
quantization, QInt8 weights), made here if missing.

    python3 bench/int8_accuracy.py --kiln-bin target/release/kiln [--cpu native]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_dir, cpu_model  # noqa: E402
import compare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def heldout(tokenizer, path: Path) -> list[list[int]]:
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    held = lines[len(lines) - len(lines) // 4:] if len(lines) >= 4 else lines
    return [tokenizer(l)["input_ids"] for l in held]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, np.finfo(np.float64).tiny)


def ort_int8(model_dir: Path, samples: list[list[int]]):
    import onnxruntime  # noqa: F401
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path = cache_dir() / "bench" / "minilm.onnx"
    if not onnx_path.is_file():
        compare.export_onnx(model_dir, onnx_path)
    q_path = onnx_path.with_name(onnx_path.stem + ".int8.onnx")
    if not q_path.is_file() or q_path.stat().st_mtime < onnx_path.stat().st_mtime:
        quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8)
    sess = compare.make_ort_session(q_path, 2)
    model = compare.load_torch_model(model_dir, "eager")
    all_cos, sent = [], []
    for ids in samples:
        x = np.array([ids], dtype=np.int64)
        feed = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
        with torch.inference_mode():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
        names = {i.name for i in sess.get_inputs()}
        got = sess.run(None, {k: v for k, v in feed.items() if k in names})[0]
        got, ref = got[0].astype(np.float64), ref[0].astype(np.float64)
        all_cos.append(cosines(got, ref))
        # Mean pooling over the tokens (all unmasked), as the sentence embedding.
        sent.append(cosines(got.mean(0), ref.mean(0)))
    c, e = np.concatenate(all_cos), np.array(sent)
    return (float(c.mean()), float(c.min())), (float(e.mean()), float(e.min()))


def kiln_report(kiln: str, model_dir: Path, cpu: str, int8_prefill: bool) -> list[str]:
    out = ROOT / "out" / "minilm-int8-accuracy.kiln"
    out.parent.mkdir(exist_ok=True)
    cmd = [kiln, "compile", str(ROOT / "specs/minilm.ron"), "--weights", str(model_dir / "model.safetensors"),
           "-O2", "--cpu", cpu, "--quantize", "int8", "--quant-strict", "--calib", str(ROOT / "specs/data/calibration.txt"),
           "--tokenizer", str(model_dir / "tokenizer.json"), "-o", str(out)]
    if int8_prefill:
        cmd.append("--int8-prefill")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"kiln compile failed:\n{p.stderr}")
    text = p.stdout + p.stderr
    return [l for l in text.splitlines() if "cosine" in l or "accuracy against" in l]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kiln-bin", required=True)
    p.add_argument("--cpu", default="native", help="kiln's --cpu")
    p.add_argument("--int8-prefill", action="store_true", help="kiln's --int8-prefill")
    p.add_argument("--model-dir", type=Path, default=cache_dir() / "all-MiniLM-L6-v2")
    a = p.parse_args()
    from transformers import AutoTokenizer
    samples = heldout(AutoTokenizer.from_pretrained(a.model_dir), ROOT / "specs/data/calibration.txt")
    print(f"CPU: {cpu_model()}; {len(samples)} held-out samples, {sum(map(len, samples))} tokens")
    print(f"kiln int8 (--cpu {a.cpu}{' --int8-prefill' if a.int8_prefill else ''}), against kiln f32:")
    for line in kiln_report(a.kiln_bin, a.model_dir, a.cpu, a.int8_prefill):
        print("  " + line.strip())
    (mean, low), (smean, slow) = ort_int8(a.model_dir, samples)
    print("ONNX Runtime dynamic int8, against PyTorch f32:")
    print(f"  last_hidden_state: cosine mean {mean:.6f}, min {low:.6f}")
    print(f"  sentence_embedding (mean pooling): cosine mean {smean:.6f}, min {slow:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
