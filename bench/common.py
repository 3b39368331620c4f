"""Helpers shared by the benchmark scripts in bench/ (compare.py, generate.py, gemm.py).

Standard library only at import time (numpy is imported inside the functions that need it), so
gemm.py can set the BLAS thread variables before numpy is first imported.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# `kiln bench --json`: keys every script needs (numbers).
KILN_BENCH_KEYS = ("median_ms", "p10_ms", "p90_ms")
# CPU levels `kiln compile --cpu` accepts (kiln checks the value; the scripts pass it through).
CPU_LEVELS = ("native", "x86-64-v2", "x86-64-v3", "x86-64-v4", "portable")
UNKNOWN_LEVEL = "unknown"


class BenchError(RuntimeError):
    """A benchmark step failed; the message is shown to the user as is."""


def cache_dir() -> Path:
    """``$KILN_CACHE`` or ``~/.cache/kiln``."""
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform as a fallback)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """1/5/15-minute load average: other work on the machine skews timings."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def stats_ms(times_ms) -> dict:
    """Median / p10 / p90 (linear interpolation) / min of per-iteration times in ms."""
    import numpy as np

    a = np.asarray(times_ms, dtype=np.float64)
    return {
        "median_ms": float(np.median(a)),
        "p10_ms": float(np.percentile(a, 10)),
        "p90_ms": float(np.percentile(a, 90)),
        "min_ms": float(a.min()),
        "iters": int(a.size),
    }


# --------------------------------------------------------------------------
# kiln


def check_kiln_bin(path: str | os.PathLike | None, flag: str = "--kiln-bin") -> str:
    """``path`` as a string if it is an executable file, else a BenchError that says what to do."""
    if not path:
        raise BenchError(f"no kiln binary given ({flag})")
    p = Path(path)
    if not p.exists():
        hint = ""
        if p.resolve() == (REPO / "target" / "release" / "kiln").resolve():
            hint = " (build it with `cargo build --release`)"
        raise BenchError(f"{flag} {path}: no such file{hint}")
    if not p.is_file() or not os.access(p, os.X_OK):
        raise BenchError(f"{flag} {path}: not an executable file")
    return str(p)


def run_kiln(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    """Run a kiln command; a start failure or a non-zero exit is a BenchError with its output."""
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise BenchError(f"kiln {what}: could not run {shown}: {e}")
    if proc.returncode != 0:
        hint = ""
        err = proc.stderr
        if "--cpu" in cmd and "unexpected argument '--cpu'" in err:
            hint = "\n(this kiln binary has no `compile --cpu` yet: rebuild kiln, or leave out --cpu)"
        elif what == "generate" and ("unrecognized subcommand" in err or "unexpected argument" in err):
            hint = "\n(this kiln binary does not support `kiln generate ... --timing-json` yet)"
        raise BenchError(
            f"kiln {what}: `{shown}` exited with status {proc.returncode}{hint}\n"
            f"--- stderr (tail) ---\n{err[-2000:]}"
            f"--- stdout (tail) ---\n{proc.stdout[-2000:]}"
        )
    return proc


def parse_kiln_json(stdout: str, shown: str) -> dict:
    """The last non-empty stdout line of ``kiln bench --json`` as a validated object."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise BenchError(f"kiln: `{shown}` printed nothing on stdout (expected a JSON line)")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise BenchError(f"kiln: last stdout line of `{shown}` is not JSON ({e}):\n  {lines[-1][:500]}")
    if not isinstance(result, dict):
        raise BenchError(f"kiln: last stdout line of `{shown}` is JSON but not an object")
    missing = [k for k in KILN_BENCH_KEYS if not isinstance(result.get(k), (int, float))]
    if missing:
        raise BenchError(f"kiln: JSON from `{shown}` lacks numeric key(s) {missing}: {lines[-1][:500]}")
    return result


def kiln_bench(kiln_bin: str, model: str | os.PathLike, shapes: list[str], iters: int,
               warmup: int, threads: int) -> dict:
    """``KILN bench MODEL --shape S ... --iters I --warmup W --threads T --json``, parsed.

    The result keeps every key kiln printed; ``level``, ``features`` and ``cpu`` are optional
    (older binaries do not print them): read them with :func:`kiln_level` / ``.get``.
    """
    cmd = [kiln_bin, "bench", str(model)]
    for s in shapes:
        cmd += ["--shape", s]
    cmd += ["--iters", str(iters), "--warmup", str(warmup), "--threads", str(threads), "--json"]
    proc = run_kiln(cmd, "bench")
    return parse_kiln_json(proc.stdout, " ".join(cmd))


def kiln_level(result: dict | None) -> str:
    """The CPU level an artifact was compiled for, from kiln's JSON, or ``unknown``."""
    if isinstance(result, dict):
        level = result.get("level")
        if isinstance(level, str) and level:
            return level
    return UNKNOWN_LEVEL


def kiln_features(result: dict | None) -> list[str]:
    """The CPU features kiln's JSON names (empty when absent)."""
    if isinstance(result, dict):
        f = result.get("features")
        if isinstance(f, list):
            return [str(x) for x in f]
    return []


def cpu_args(cpu: str | None) -> list[str]:
    """``["--cpu", LEVEL]`` for `kiln compile`, or nothing (kiln's default, native)."""
    return ["--cpu", cpu] if cpu else []


def probe_kiln_level(kiln_bin: str, cpu: str | None, threads: int = 1) -> dict:
    """The level (and features, cpu) kiln compiles for with ``--cpu``: a tiny specs/gemm.ron
    artifact compiled the same way and timed once with ``kiln bench --json``.

    For scripts whose kiln command (``kiln generate``) prints no level itself.  Returns
    ``{"level": ..., "features": [...], "cpu": ..., "source": "probe"}``; never raises (a
    failure gives level ``unknown`` and the reason in ``error``).
    """
    spec = REPO / "specs" / "gemm.ron"
    out = {"level": UNKNOWN_LEVEL, "features": [], "cpu": None, "source": "probe"}
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-bench-probe-") as tmp:
            art = Path(tmp) / "probe.kiln"
            run_kiln([kiln_bin, "compile", str(spec), "--random-weights", "1",
                      "--set", "k=32", "--set", "n=32", "--set", "rows=8", "-O2",
                      *cpu_args(cpu), "-o", str(art)], "compile (level probe)")
            res = kiln_bench(kiln_bin, art, ["x=8x32"], iters=1, warmup=0, threads=threads)
    except BenchError as e:
        out["error"] = str(e).splitlines()[0]
        return out
    out.update(level=kiln_level(res), features=kiln_features(res), cpu=res.get("cpu"))
    return out


def run_and_report(run, json_out: Path | None) -> int:
    """Runs ``run()`` (a bench's main job); a BenchError is printed as one line (exit 1); the
    result goes to ``json_out`` when given. Returns the process exit code."""
    try:
        result = run()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nraw numbers written to {json_out}", file=sys.stderr)
    return 0
