#!/usr/bin/env python3
"""What calling kiln from Python costs: ``Model.run`` of the Python package against ``kiln bench``
on the same artifact and shape (MiniLM 1x128 by default), in alternating rounds so that both see
the same machine. Prints the CPU, the artifact's level, every round's medians [p10–p90] and the
ratio of the medians of all runs. Needs the package installed (``pip install ./python``).

    python bench/python_overhead.py --kiln-bin target/release/kiln --kiln-model minilm.kiln
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BenchError, check_kiln_bin, cpu_model, kiln_bench, kiln_level, now, run_and_report, stats_ms,
)


def python_times(model, feed: dict, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        model.run(["last_hidden_state"], feed)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model.run(["last_hidden_state"], feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(args) -> dict:
    import numpy as np
    import kiln

    check_kiln_bin(args.kiln_bin)
    m = kiln.Model(args.kiln_model, threads=args.threads)
    b, s = args.batch, args.seq
    # The inputs `kiln bench` makes (kiln's bench_input), so that both time the same work.
    ids = (np.arange(b * s, dtype=np.int64).reshape(b, s) * 31) % 100 + 1
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    shapes = [f"{n}={b}x{s}" for n in feed]
    rounds, py_all, cli_all, level = [], [], [], None
    for r in range(args.rounds):
        cli = kiln_bench(args.kiln_bin, args.kiln_model, shapes, args.iters, args.warmup, args.threads)
        level = kiln_level(cli)
        py = python_times(m, feed, args.warmup, args.iters)
        py_all += py
        cli_all.append(cli["median_ms"])
        rounds.append({"kiln_bench": {k: cli[k] for k in ("median_ms", "p10_ms", "p90_ms")},
                       "python": stats_ms(py)})
        p = rounds[-1]["python"]
        print(f"round {r + 1}: kiln bench {cli['median_ms']:.2f} [{cli['p10_ms']:.2f}–{cli['p90_ms']:.2f}] ms, "
              f"Model.run {p['median_ms']:.2f} [{p['p10_ms']:.2f}–{p['p90_ms']:.2f}] ms")
    py_med = stats_ms(py_all)["median_ms"]
    cli_med = sorted(cli_all)[len(cli_all) // 2]
    print(f"{now()} · CPU: {cpu_model()} · kiln level: {level} · threads: {args.threads} · {b}x{s}")
    print(f"Model.run / kiln bench (medians over {args.rounds} rounds of {args.iters}): "
          f"{py_med:.3f} / {cli_med:.3f} ms = {py_med / cli_med:.3f}")
    return {"cpu": cpu_model(), "level": level, "threads": args.threads, "shape": [b, s],
            "rounds": rounds, "ratio": py_med / cli_med}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kiln-bin", required=True)
    p.add_argument("--kiln-model", required=True, help="a MiniLM-style encoder artifact")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    return run_and_report(lambda: run(args), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
