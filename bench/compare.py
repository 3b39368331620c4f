#!/usr/bin/env python3
"""Benchmark all-MiniLM-L6-v2 inference: kiln vs ONNX Runtime vs PyTorch (CPU).

Default mode
    For each shape (batch x seq) the engines run interleaved -- ONNX Runtime,
    PyTorch eager, then kiln (if given) -- each with the same thread count T,
    the same warm-up count and the same number of timed iterations.  Every
    timed iteration is one full forward pass (input_ids, attention_mask,
    token_type_ids -> last_hidden_state).  The table reports the median, with
    the p10-p90 range, in milliseconds.

    * PyTorch: transformers ``AutoModel`` in float32, ``eval()``,
      ``torch.inference_mode()``, ``torch.set_num_threads(T)``; attention
      implementation ``--attn`` (default ``sdpa``, the faster of the two for
      PyTorch eager on CPU at these shapes).
    * ONNX Runtime: the model is exported once (torch.onnx dynamo exporter,
      eager attention, dynamic batch and sequence axes) into
      ``${KILN_CACHE}/bench/minilm.onnx`` and reused afterwards
      (``--reexport`` forces a new export).  CPUExecutionProvider,
      ``ORT_ENABLE_ALL``, ``intra_op_num_threads=T``, ``inter_op_num_threads=1``.
      Its output is checked against PyTorch's on every shape.
    * kiln through the Python package (``--kiln-python`` and ``--kiln-model``):
      ``kiln.Model(MODEL, threads=T).run`` in this process on the same feeds,
      its output checked against PyTorch's.
    * kiln (optional, ``--kiln-bin`` and ``--kiln-model``): one subprocess per
      shape, ``KILN bench MODEL --shape input_ids=BxS ... --iters N --warmup W
      --threads T --json``; the last line of its stdout must be a JSON object
      with at least ``median_ms``, ``p10_ms`` and ``p90_ms``.  Its optional
      ``level`` (the CPU level the artifact was compiled for), ``features`` and
      ``cpu`` go into the report header (``unknown`` when absent) and the JSON.

    Inputs: token ids drawn uniformly from [1000, 30000) with a fixed seed,
    an all-ones attention mask and all-zero token types.

    The report header names the date, the CPU model (/proc/cpuinfo), kiln's
    CPU level, the thread count, the library versions and the load average.

``--gemm`` mode
    Measures numpy float32 matmul GFLOP/s at 128x384x1536 and 1024^3 and shows
    which BLAS numpy uses.  OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are printed,
    never changed; run with ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE``
    for a fair number.  (bench/gemm.py times kiln's GEMM against numpy's.)

Examples
    python3 bench/compare.py --iters 10
    python3 bench/compare.py --shapes 1x128,8x128 --kiln-bin target/release/kiln \\
        --kiln-model minilm.kiln --json-out /tmp/bench.json
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 bench/compare.py --gemm
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import warnings
from pathlib import Path

# Offline only: the Hugging Face hub is not reachable.  Quiet progress bars so
# that stdout carries only the report.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

# Shared helpers (bench/ is on sys.path when run as a script).
from common import (  # noqa: E402
    run_and_report,
    BenchError,
    cache_dir,
    check_kiln_bin,
    cpu_model,
    kiln_bench,
    kiln_features,
    kiln_level,
    load_average,
    now,
    stats_ms,
)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
DEFAULT_SHAPES = "1x128,8x128,1x512"
TOKEN_LOW, TOKEN_HIGH = 1000, 30000
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# ORT vs PyTorch max |diff| above this is reported as a mismatch.
ORT_TOLERANCE = 1e-3


# --------------------------------------------------------------------------
# helpers


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """Parse ``"1x128,8x128"`` into ``[(1, 128), (8, 128)]``."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            b, s = (int(v) for v in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}, expected BxS like 8x128")
        if b < 1 or s < 1 or s > 512:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: need B >= 1 and 1 <= S <= 512")
        shapes.append((b, s))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def time_calls(fn, warmup: int, iters: int) -> tuple[list[float], object]:
    """Call ``fn`` ``warmup`` times untimed, then ``iters`` times timed.

    Returns the per-iteration wall times in ms and the last warm-up result
    (or the first timed one when ``warmup`` is 0).
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if result is None:
            result = out
    return times, result


def make_inputs(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids in [1000, 30000), all-ones mask, zero token types."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(TOKEN_LOW, TOKEN_HIGH, size=(batch, seq), dtype=np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }


def openblas_env() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in OPENBLAS_VARS}


# --------------------------------------------------------------------------
# engines


def load_torch_model(model_dir: Path, attn: str):
    """transformers AutoModel, float32, eval mode."""
    import torch
    from transformers import AutoModel

    if not (model_dir / "config.json").is_file():
        raise BenchError(
            f"no MiniLM checkpoint in {model_dir} (run scripts/fetch-minilm.sh, "
            "or pass --model-dir)"
        )
    model = AutoModel.from_pretrained(
        str(model_dir), attn_implementation=attn, dtype=torch.float32
    )
    return model.eval()


def _export_wrapper(model):
    """``model`` with positional inputs and ``last_hidden_state`` as sole output."""
    import torch

    class HiddenState(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=False,
            )[0]

    return HiddenState(model)


def export_onnx(model_dir: Path, onnx_path: Path) -> None:
    """Export MiniLM to ONNX with dynamic batch/seq axes (atomic write).

    Uses the dynamo exporter on an eager-attention model: the legacy
    TorchScript exporter gives wrong numbers for this model under
    transformers 5, and the eager attention graph is the one ORT runs fastest.
    """
    import torch

    model = load_torch_model(model_dir, "eager")
    sample = {k: torch.from_numpy(v) for k, v in make_inputs(2, 16, 0).items()}
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=512)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_name(f"{onnx_path.name}.tmp{os.getpid()}")
    print(f"exporting ONNX model to {onnx_path} ...", file=sys.stderr)
    try:
        # The exporter prints progress on stdout; keep stdout for the report.
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _export_wrapper(model),
                tuple(sample[n] for n in INPUT_NAMES),
                str(tmp),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes={n: {0: batch, 1: seq} for n in INPUT_NAMES},
                dynamo=True,
                external_data=False,
            )
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)


def make_ort_session(onnx_path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    if names != set(INPUT_NAMES):
        raise BenchError(f"{onnx_path}: unexpected inputs {sorted(names)}; re-run with --reexport")
    return sess


def bench_ort(sess, feed: dict, warmup: int, iters: int):
    return time_calls(lambda: sess.run([OUTPUT_NAME], feed)[0], warmup, iters)


def bench_torch(model, feed: dict, warmup: int, iters: int):
    import torch

    tfeed = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.inference_mode():
        times, out = time_calls(lambda: model(**tfeed).last_hidden_state, warmup, iters)
    return times, out.numpy()


def bench_kiln(kiln_bin: str, kiln_model: str, batch: int, seq: int,
               warmup: int, iters: int, threads: int) -> dict:
    """Run ``kiln bench`` for one shape; return the parsed JSON (last stdout line)."""
    shapes = [f"{name}={batch}x{seq}" for name in INPUT_NAMES]
    return kiln_bench(kiln_bin, kiln_model, shapes, iters, warmup, threads)


def load_kiln_package(kiln_model: str, threads: int):
    """The artifact loaded through the Python package (``pip install ./python``)."""
    try:
        import kiln
    except ImportError as e:
        raise BenchError(f"--kiln-python: cannot import the kiln package ({e}); pip install ./python")
    return kiln.Model(kiln_model, threads=threads)


def bench_kiln_python(model, feed: dict, warmup: int, iters: int, out_torch) -> dict:
    """kiln in process through the package's ``Model.run``, on the same feeds as the others;
    its output is compared with PyTorch's."""
    times, out = time_calls(lambda: model.run([OUTPUT_NAME], feed)[0], warmup, iters)
    diff = float(np.max(np.abs(out - out_torch)))
    return {**stats_ms(times), "times_ms": times, "level": model.level, "via": "python package",
            "vs_torch_max_abs_diff": diff}


# --------------------------------------------------------------------------
# report


def fmt_cell(s: dict | None) -> str:
    if s is None:
        return "—"
    return f"{s['median_ms']:.2f} [{s['p10_ms']:.2f}–{s['p90_ms']:.2f}]"


def fmt_ratio(a: dict | None, b: dict | None) -> str:
    if a is None or b is None:
        return "—"
    return f"{a['median_ms'] / b['median_ms']:.2f}×"


def header_line(threads: int, extra: str = "", level: str | None = "") -> str:
    """Date, CPU model, kiln's CPU level (None: kiln not run, shown as n/a; "": left out, as
    before the kiln runs), threads, versions, load average."""
    import onnxruntime
    import torch
    import transformers

    kiln = "" if level == "" else f" · kiln level: {level if level is not None else 'n/a'}"
    return (
        f"{now()} · CPU: {cpu_model()} ({os.cpu_count()} logical){kiln} · threads: {threads} · "
        f"onnxruntime {onnxruntime.__version__} · torch {torch.__version__} · "
        f"transformers {transformers.__version__}{extra} · load avg {load_average()}"
    )


def markdown_table(rows: list[dict]) -> str:
    out = [
        "| shape | kiln ms | ORT ms | PyTorch ms | kiln/ORT | kiln/PyTorch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        k, o, t = r.get("kiln"), r["ort"], r["torch"]
        out.append(
            f"| {r['batch']}x{r['seq']} | {fmt_cell(k)} | {fmt_cell(o)} | {fmt_cell(t)} "
            f"| {fmt_ratio(k, o)} | {fmt_ratio(k, t)} |"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------
# modes


def run_compare(args) -> dict:
    import torch

    use_kiln = bool(args.kiln_bin or args.kiln_model or args.kiln_python)
    kiln_py = None
    if use_kiln:
        if not args.kiln_model or not (args.kiln_bin or args.kiln_python):
            raise BenchError("kiln needs --kiln-model and --kiln-bin (or --kiln-python)")
        if not os.path.isfile(args.kiln_model):
            raise BenchError(f"--kiln-model {args.kiln_model}: no such file")
        if args.kiln_python:
            kiln_py = load_kiln_package(args.kiln_model, args.threads)
        else:
            check_kiln_bin(args.kiln_bin)

    threads = args.threads
    torch.set_num_threads(threads)

    onnx_path = args.onnx
    if args.reexport or not onnx_path.is_file():
        export_onnx(args.model_dir, onnx_path)
    if args.ort_int8:
        # ONNX Runtime's dynamic int8 quantization: int8 weights, activations quantized per call.
        from onnxruntime.quantization import QuantType, quantize_dynamic
        q_path = onnx_path.with_name(onnx_path.stem + ".int8.onnx")
        if args.reexport or not q_path.is_file() or q_path.stat().st_mtime < onnx_path.stat().st_mtime:
            quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8)
        onnx_path = q_path
    sess = make_ort_session(onnx_path, threads)
    model = load_torch_model(args.model_dir, args.attn)

    extra = f" · PyTorch attn: {args.attn}" + (" · ORT: dynamic int8" if args.ort_int8 else "")
    extra += " · kiln: Python package" if kiln_py is not None else ""
    print(header_line(threads, extra), file=sys.stderr)
    rows = []
    for batch, seq in args.shapes:
        feed = make_inputs(batch, seq, args.seed)
        row = {"batch": batch, "seq": seq}

        t_ort, out_ort = bench_ort(sess, feed, args.warmup, args.iters)
        row["ort"] = {**stats_ms(t_ort), "times_ms": t_ort}
        t_torch, out_torch = bench_torch(model, feed, args.warmup, args.iters)
        row["torch"] = {**stats_ms(t_torch), "times_ms": t_torch}
        diff = float(np.max(np.abs(out_ort - out_torch)))
        row["ort_vs_torch_max_abs_diff"] = diff
        if kiln_py is not None:
            row["kiln"] = bench_kiln_python(kiln_py, feed, args.warmup, args.iters, out_torch)
        elif use_kiln:
            row["kiln"] = bench_kiln(args.kiln_bin, args.kiln_model, batch, seq,
                                     args.warmup, args.iters, threads)

        msg = (f"{batch}x{seq}: ORT {row['ort']['median_ms']:.2f} ms, "
               f"PyTorch {row['torch']['median_ms']:.2f} ms")
        if use_kiln:
            msg += f", kiln {row['kiln']['median_ms']:.2f} ms"
        print(msg + f" (ORT vs PyTorch max|diff| {diff:.2e})", file=sys.stderr)
        if diff > ORT_TOLERANCE and not args.ort_int8:
            print(f"warning: ORT and PyTorch outputs differ by {diff:.3g} at {batch}x{seq} "
                  f"(> {ORT_TOLERANCE}); stale {onnx_path}? try --reexport", file=sys.stderr)
        rows.append(row)

    # kiln's CPU level and features: from its bench JSON (the same artifact for every shape).
    kiln_first = rows[0].get("kiln") if (use_kiln and rows) else None
    level = kiln_level(kiln_first) if use_kiln else None
    features = kiln_features(kiln_first)
    header = header_line(threads, extra, level)
    print(header)
    if features:
        print(f"kiln CPU features: {', '.join(features)}")
    print(f"cells: median [p10–p90] ms over {args.iters} iterations after {args.warmup} "
          f"warm-up; ratios of medians (< 1 means kiln is faster)")
    print()
    print(markdown_table(rows))
    return {
        "mode": "compare",
        "header": header,
        "cpu": cpu_model(),
        "kiln_level": level,
        "kiln_features": features,
        "kiln_cpu": kiln_first.get("cpu") if kiln_first else None,
        "threads": threads,
        "iters": args.iters,
        "warmup": args.warmup,
        "seed": args.seed,
        "torch_attn": args.attn,
        "onnx_model": str(onnx_path),
        "kiln_bin": args.kiln_bin,
        "kiln_model": args.kiln_model,
        "openblas_env": openblas_env(),
        "load_average_end": load_average(),
        "rows": rows,
    }


def blas_info() -> tuple[str, list[dict]]:
    """Describe numpy's BLAS: threadpoolctl's view if installed, else show_config."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            np.show_config()
        return "threadpoolctl not installed; numpy.show_config():\n" + buf.getvalue(), []
    info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    lines = [
        f"  {i.get('internal_api')} {i.get('version')} core={i.get('architecture')} "
        f"threads={i.get('num_threads')} ({i.get('filepath')})"
        for i in info
    ]
    return "BLAS (threadpoolctl):\n" + "\n".join(lines or ["  none found"]), info


def gemm_gflops(m: int, k: int, n: int, runs: int, min_time_s: float = 0.05) -> dict:
    """GFLOP/s of float32 ``(m,k) @ (k,n)``: median over ``runs`` samples.

    Each sample repeats the product enough times to take >= ``min_time_s``.
    """
    rng = np.random.default_rng(0)
    a = np.ascontiguousarray(rng.standard_normal((m, k), dtype=np.float32))
    b = np.ascontiguousarray(rng.standard_normal((k, n), dtype=np.float32))
    c = np.empty((m, n), dtype=np.float32)
    np.matmul(a, b, out=c)  # warm up (thread pool, page faults)
    t0 = time.perf_counter()
    np.matmul(a, b, out=c)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(min_time_s / one))
    flop = 2.0 * m * n * k * reps
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(reps):
            np.matmul(a, b, out=c)
        samples.append(flop / (time.perf_counter() - t0) / 1e9)
    return {
        "m": m, "k": k, "n": n, "reps_per_sample": reps,
        "median_gflops": float(np.median(samples)),
        "max_gflops": float(np.max(samples)),
        "samples_gflops": samples,
    }


def run_gemm(args) -> dict:
    sizes = [(128, 384, 1536), (1024, 1024, 1024)]
    env = openblas_env()
    print(f"{now()} · CPU: {cpu_model()} ({os.cpu_count()} logical) · numpy {np.__version__}"
          f" · load avg {load_average()}")
    print("env: " + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in env.items()))
    text, info = blas_info()
    print(text)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    thread_counts = sorted({1, args.threads}) if threadpool_limits else [None]

    print()
    print(f"float32 C-contiguous matmul, median [max] GFLOP/s over {args.gemm_runs} samples")
    print()
    print("| M×K×N | threads | GFLOP/s |")
    print("|---|---:|---:|")
    results = []
    for t in thread_counts:
        ctx = threadpool_limits(limits=t, user_api="blas") if t else contextlib.nullcontext()
        with ctx:
            for m, k, n in sizes:
                r = gemm_gflops(m, k, n, args.gemm_runs)
                r["threads"] = t
                results.append(r)
                print(f"| {m}×{k}×{n} | {t if t else 'default'} | "
                      f"{r['median_gflops']:.1f} [{r['max_gflops']:.1f}] |")
    return {"mode": "gemm", "numpy": np.__version__, "cpu": cpu_model(),
            "load_average_end": load_average(),
            "openblas_env": env, "blas": info, "results": results}


# --------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="See bench/README.md.",
    )
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                   help=f"comma-separated BxS list (default {DEFAULT_SHAPES})")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for every engine (default: os.cpu_count())")
    p.add_argument("--seed", type=int, default=0, help="seed for the random token ids")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                   help="PyTorch attention implementation (default sdpa)")
    p.add_argument("--model-dir", type=Path, default=cache_dir() / "all-MiniLM-L6-v2",
                   help="MiniLM checkpoint directory (default $KILN_CACHE/all-MiniLM-L6-v2)")
    p.add_argument("--onnx", type=Path, default=cache_dir() / "bench" / "minilm.onnx",
                   help="cached ONNX export (default $KILN_CACHE/bench/minilm.onnx)")
    p.add_argument("--reexport", action="store_true", help="export the ONNX model again")
    p.add_argument("--ort-int8", action="store_true",
                   help="benchmark ONNX Runtime's dynamic int8 quantization of the export "
                        "(onnxruntime.quantization.quantize_dynamic, QInt8 weights)")
    p.add_argument("--kiln-bin", help="kiln executable (enables kiln)")
    p.add_argument("--kiln-model", help="compiled .kiln model (enables kiln)")
    p.add_argument("--kiln-python", action="store_true",
                   help="time kiln in process through the Python package's Model.run "
                        "(pip install ./python) instead of `kiln bench`")
    p.add_argument("--json-out", type=Path, help="write raw numbers to this JSON file")
    p.add_argument("--gemm", action="store_true",
                   help="instead: numpy sgemm GFLOP/s at 128x384x1536 and 1024^3")
    p.add_argument("--gemm-runs", type=int, default=7,
                   help="samples per GEMM size in --gemm mode (default 7)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.threads < 1 or args.gemm_runs < 1:
        print("error: need --iters >= 1, --warmup >= 0, --threads >= 1, --gemm-runs >= 1",
              file=sys.stderr)
        return 2
    return run_and_report(lambda: run_gemm(args) if args.gemm else run_compare(args), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
