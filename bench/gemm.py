#!/usr/bin/env python3
"""GEMM throughput: kiln's compiled matrix product against numpy's BLAS, at MiniLM's shapes.

For every shape M x K x N (default: MiniLM's products at 1 x 128 -- 128x384x1152 (fused QKV),
128x384x1536 (FFN up), 128x1536x384 (FFN down) -- and 1024^3), float32, y = x @ w^T with
x [M, K] and w [N, K] (weights stored output channels first, as kiln stores them):

* kiln: ``specs/gemm.ron`` compiled once per shape,
  ``KILN compile specs/gemm.ron --random-weights 1 --set k=K --set n=N --set rows=M -O2
  [--cpu LEVEL] -o DIR/gemm_MxKxN.kiln``, then timed by
  ``KILN bench ART --shape x=MxK --iters I --warmup W --threads T --json`` (the last stdout
  line: median_ms, p10_ms, p90_ms and, from newer binaries, level / features / cpu).
* numpy: ``np.matmul(x, w.T, out=y)`` with w a C-contiguous float32 [N, K] array (so BLAS
  runs sgemm with B transposed) and y preallocated, ``--warmup`` untimed then ``--iters``
  timed calls, each timed on its own with time.perf_counter.  Threads: OPENBLAS_NUM_THREADS,
  OMP_NUM_THREADS, MKL_NUM_THREADS and BLIS_NUM_THREADS are set to T before numpy is
  imported, and threadpoolctl (if installed) limits the BLAS pool to T as well and reports it.

GFLOP/s = 2 * M * K * N / time.  Cells are ``median [p10–p90]`` GFLOP/s: the median, and the
throughputs at the p90 and p10 per-iteration times.  kiln/numpy is the ratio of the medians
(> 1: kiln faster).  All artifacts are compiled first; then, per shape, kiln runs and then numpy
(with a short pause before each kiln run so numpy's BLAS threads stop spinning).

Examples
    python3 bench/gemm.py                                   # target/release/kiln, 2 threads
    python3 bench/gemm.py --no-kiln                         # numpy only
    python3 bench/gemm.py --cpu x86-64-v3 --iters 200 --json-out /tmp/gemm.json
    python3 bench/gemm.py --shapes 128x384x1536,1024x1024x1024 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

# numpy is imported in main(), after the BLAS thread variables are set: keep it that way.
from common import (
    run_and_report,
    REPO,
    BenchError,
    check_kiln_bin,
    cpu_args,
    cpu_model,
    kiln_bench,
    kiln_features,
    kiln_level,
    load_average,
    now,
    run_kiln,
    stats_ms,
)

SPEC = REPO / "specs" / "gemm.ron"
DEFAULT_SHAPES = "128x384x1152,128x384x1536,128x1536x384,1024x1024x1024"
DEFAULT_KILN = REPO / "target" / "release" / "kiln"
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# Seconds to wait before a kiln run: OpenBLAS's idle threads spin for a while after a call.
SETTLE_S = 0.3


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"128x384x1536,1024x1024x1024"`` -> ``[(128, 384, 1536), (1024, 1024, 1024)]``."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower().replace("×", "x")
        if not item:
            continue
        try:
            m, k, n = (int(v) for v in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}, expected MxKxN like 128x384x1536")
        if min(m, k, n) < 1:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: every dimension must be >= 1")
        shapes.append((m, k, n))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def shape_name(m: int, k: int, n: int) -> str:
    return f"{m}x{k}x{n}"


def gflops(flop: float, s: dict) -> dict:
    """GFLOP/s at the median, p10 and p90 times (p10 GFLOP/s comes from the p90 time)."""
    return {
        "median_gflops": flop / s["median_ms"] / 1e6,
        "p10_gflops": flop / s["p90_ms"] / 1e6,
        "p90_gflops": flop / s["p10_ms"] / 1e6,
    }


# --------------------------------------------------------------------------
# numpy


def set_blas_threads(threads: int) -> dict:
    """Set the BLAS thread variables to ``threads`` (before numpy is imported); return the old values."""
    if "numpy" in sys.modules:  # pragma: no cover - a programming error, not a user one
        raise BenchError("internal: numpy was imported before the BLAS thread variables were set")
    old = {v: os.environ.get(v) for v in THREAD_VARS}
    for v in THREAD_VARS:
        os.environ[v] = str(threads)
    return old


def blas_info() -> tuple[str, list[dict]]:
    """One line naming numpy's BLAS (threadpoolctl if installed, else numpy's build config)."""
    import numpy as np

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        try:
            cfg = np.show_config(mode="dicts")  # numpy >= 1.25
            b = cfg["Build Dependencies"]["blas"]
            desc = f"{b.get('name')} {b.get('version')} (numpy's build config)"
        except Exception:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                np.show_config()
            desc = "numpy.show_config():\n" + buf.getvalue()
        return desc, []
    info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not info:
        return "no BLAS found by threadpoolctl", []
    parts = [f"{i.get('internal_api')} {i.get('version')} core={i.get('architecture')} "
             f"threads={i.get('num_threads')}" for i in info]
    return "; ".join(parts), info


def numpy_gemm(m: int, k: int, n: int, iters: int, warmup: int, seed: int = 0) -> list[float]:
    """Per-call ms of ``np.matmul(x, w.T, out=y)``, x [m, k], w [n, k] float32 C-contiguous."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(rng.standard_normal((m, k), dtype=np.float32))
    w = np.ascontiguousarray(rng.standard_normal((n, k), dtype=np.float32))
    wt = w.T  # a view: [k, n], Fortran order
    y = np.empty((m, n), dtype=np.float32)
    for _ in range(warmup):
        np.matmul(x, wt, out=y)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        np.matmul(x, wt, out=y)
        times.append((time.perf_counter() - t0) * 1e3)
    # Check the product once (on a few rows, in float64), so a broken call cannot pass as fast.
    rows = slice(0, min(m, 4))
    ref = x[rows].astype(np.float64) @ w.T.astype(np.float64)
    err = float(np.max(np.abs(ref - y[rows]))) / max(1.0, float(np.max(np.abs(ref))))
    if err > 1e-3:
        raise BenchError(f"numpy {shape_name(m, k, n)}: product off by {err:.2e} (relative)")
    return times


# --------------------------------------------------------------------------
# kiln


def compile_gemm(kiln_bin: str, m: int, k: int, n: int, cpu: str | None, out_dir: Path) -> Path:
    art = out_dir / f"gemm_{shape_name(m, k, n)}.kiln"
    cmd = [kiln_bin, "compile", str(SPEC), "--random-weights", "1",
           "--set", f"k={k}", "--set", f"n={n}", "--set", f"rows={m}", "-O2",
           *cpu_args(cpu), "-o", str(art)]
    print(f"kiln: {' '.join(cmd)}", file=sys.stderr)
    run_kiln(cmd, "compile")
    if not art.is_file():
        raise BenchError(f"kiln compile: `{' '.join(cmd)}` succeeded but wrote no {art}")
    return art


# --------------------------------------------------------------------------
# report


def cell(g: dict | None) -> str:
    if not g:
        return "—"
    return f"{g['median_gflops']:.1f} [{g['p10_gflops']:.1f}–{g['p90_gflops']:.1f}]"


def markdown_table(rows: list[dict]) -> str:
    out = [
        "| M×K×N | kiln GFLOP/s median [p10–p90] | numpy GFLOP/s median [p10–p90] | kiln/numpy |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        k, n = r.get("kiln"), r["numpy"]
        ratio = "—" if not k else f"{k['median_gflops'] / n['median_gflops']:.2f}×"
        out.append(f"| {r['m']}×{r['k']}×{r['n']} | {cell(k)} | {cell(n)} | {ratio} |")
    return "\n".join(out)


# --------------------------------------------------------------------------
# main


def run(args) -> dict:
    kiln_bin = None
    if not args.no_kiln:
        try:
            kiln_bin = check_kiln_bin(args.kiln_bin)
        except BenchError as e:
            raise BenchError(f"{e}; or pass --no-kiln to time numpy only")
        if not SPEC.is_file():
            raise BenchError(f"{SPEC}: no such file")

    old_env = set_blas_threads(args.threads)
    import numpy as np

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None

    rows = []
    with contextlib.ExitStack() as stack:
        arts = {}
        if kiln_bin:
            if args.artifact_dir:
                out_dir = args.artifact_dir
                out_dir.mkdir(parents=True, exist_ok=True)
            else:
                out_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-bench-gemm-")))
            for m, k, n in args.shapes:
                arts[(m, k, n)] = compile_gemm(kiln_bin, m, k, n, args.cpu, out_dir)

        if threadpool_limits is not None:
            stack.enter_context(threadpool_limits(limits=args.threads, user_api="blas"))
        blas_text, blas = blas_info()

        # Every kiln shape first, then numpy: OpenBLAS's threads keep spinning for a while after
        # each call, and would compete with a kiln process started right after.
        kiln_rows = {}
        for m, k, n in args.shapes if kiln_bin else []:
            time.sleep(SETTLE_S)
            res = kiln_bench(kiln_bin, arts[(m, k, n)], [f"x={m}x{k}"],
                             args.iters, args.warmup, args.threads)
            kiln_rows[(m, k, n)] = {**res, **gflops(2.0 * m * k * n, res)}
        for m, k, n in args.shapes:
            flop = 2.0 * m * k * n
            row = {"m": m, "k": k, "n": n, "flop": flop}
            if kiln_bin:
                row["kiln"] = kiln_rows[(m, k, n)]
            t_np = numpy_gemm(m, k, n, args.iters, args.warmup)
            s = stats_ms(t_np)
            row["numpy"] = {**s, **gflops(flop, s), "times_ms": t_np}
            msg = f"{shape_name(m, k, n)}: numpy {row['numpy']['median_gflops']:.1f} GFLOP/s"
            if kiln_bin:
                msg = (f"{shape_name(m, k, n)}: kiln {row['kiln']['median_gflops']:.1f} GFLOP/s "
                       f"({row['kiln']['median_ms']:.3f} ms), numpy "
                       f"{row['numpy']['median_gflops']:.1f} GFLOP/s")
            print(msg, file=sys.stderr)
            rows.append(row)

    kiln_first = rows[0].get("kiln") if (kiln_bin and rows) else None
    levels = sorted({kiln_level(r.get("kiln")) for r in rows if r.get("kiln")})
    level = ", ".join(levels) if kiln_bin else "n/a (--no-kiln)"
    features = kiln_features(kiln_first)
    cpu_note = f" (compiled with --cpu {args.cpu})" if (kiln_bin and args.cpu) else ""
    threads_note = ("threadpoolctl limit" if threadpool_limits is not None
                    else "threadpoolctl not installed: " + "/".join(THREAD_VARS) + " only")
    header = (f"{now()} · CPU: {cpu_model()} ({os.cpu_count()} logical) · threads: {args.threads} · "
              f"kiln level: {level}{cpu_note} · numpy {np.__version__} · load avg {load_average()}")
    print(header)
    print(f"numpy BLAS: {blas_text} ({threads_note})")
    openblas = {v: os.environ.get(v) for v in OPENBLAS_VARS}
    if any(openblas.values()):
        print("note: " + ", ".join(f"{k}={v}" for k, v in openblas.items() if v)
              + " is set; it can slow a current numpy (see bench/README.md)")
    if features:
        print(f"kiln CPU features: {', '.join(features)}")
    print(f"float32 y = x @ wᵀ (x [M, K], w [N, K]); cells: GFLOP/s median [p10–p90] over "
          f"{args.iters} iterations after {args.warmup} warm-up; kiln/numpy: ratio of medians "
          f"(> 1: kiln faster)")
    print()
    print(markdown_table(rows))
    return {
        "mode": "gemm",
        "header": header,
        "date": now(),
        "cpu": cpu_model(),
        "kiln_bin": kiln_bin,
        "kiln_cpu_arg": args.cpu,
        "kiln_level": level if kiln_bin else None,
        "kiln_features": features,
        "kiln_cpu": kiln_first.get("cpu") if kiln_first else None,
        "threads": args.threads,
        "iters": args.iters,
        "warmup": args.warmup,
        "numpy": np.__version__,
        "blas": blas,
        "blas_text": blas_text,
        "thread_env_before": old_env,
        "openblas_env": openblas,
        "load_average_end": load_average(),
        "rows": rows,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See bench/README.md.")
    p.add_argument("--kiln-bin", default=str(DEFAULT_KILN),
                   help="kiln executable (default target/release/kiln)")
    p.add_argument("--no-kiln", action="store_true", help="time numpy only")
    p.add_argument("--threads", type=int, default=2, help="threads for kiln and numpy (default 2)")
    p.add_argument("--iters", type=int, default=100, help="timed iterations per shape (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations per shape (default 10)")
    p.add_argument("--cpu", metavar="LEVEL",
                   help="passed to `kiln compile --cpu`: native, x86-64-v2, x86-64-v3, x86-64-v4 "
                        "(default: kiln's own, native)")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                   help=f"comma-separated MxKxN list (default {DEFAULT_SHAPES})")
    p.add_argument("--artifact-dir", type=Path,
                   help="keep the compiled gemm_MxKxN.kiln files here (default: a temporary directory)")
    p.add_argument("--json-out", type=Path, help="write every raw number to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        print("error: need --iters >= 1, --warmup >= 0, --threads >= 1", file=sys.stderr)
        return 2
    return run_and_report(lambda: run(args), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
