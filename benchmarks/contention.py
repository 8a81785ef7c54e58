"""What other processes do to CPU timings, and what the contention check reads (scoring/cost.py).

Two measurements behind the figures in `Contention`'s docstrings, on this machine:

neighbours   1-thread timings of a SmolLM2-sized SwiGLU stack (hidden 576, FFN 1536, 30 layers'
             weights: decode on B=4 rows through all 30, prefill of 1024 tokens through 4) with the
             other CPUs idle, running a busy loop, or running a memory-streaming loop (numpy copy of
             512 MiB); each condition twice, in the order idle, memory, busy, memory, idle. Median ms
             of 40 decode / 15 prefill steps, and the `Contention` reading over them.
windows      `Contention` readings over windows of 0.02-0.5 s of 2-thread matrix products, idle and
             next to a busy loop, against the tick-noise allowance (`Contention.tick_noise`).
fingerprint  what the guard cannot see and the machine's fingerprint can (scoring/machine.py): this
             process pinned to the first CPU, the neighbour pinned to the last one, outside the
             process's affinity; per condition (none, busy loop, memory stream, none) the 1-thread
             decode of the SwiGLU stack (median of 40), the `Contention` reading over it, and the
             median of 20 `ReferenceProbe` samples; `*_vs_idle` divide by the first idle row.
speedups     (needs --run DIR, a finished `puzzle run`) how far whole-model speed-ups move, pinned as in
             `fingerprint`, 1 thread: the parent and the run's front children measured interleaved
             (`measure_models`, --repeats rounds, the run's workload) twice back to back per condition
             (none, memory stream, busy loop, none); per child and measurement the speed-up, the
             model's own runtime against the first idle one, and the fingerprint of the measurement.
             Tells apart the noise of a few rounds (spread within a condition) from a change of the
             machine's state (spread between conditions).
             Measured on the 2-core VM (demo run, 2 rounds): speed-ups of the 1.25 / 1.5 / 2 / 3x
             children ranged 1.21-1.37 / 1.48-1.66 / 1.94-2.38 / 3.03-3.48 over the 8 measurements;
             the two idle pairs alone 1.21-1.29 / 1.48-1.59 / 2.10-2.38 / 3.32-3.41. The memory
             stream slowed the parent 1.15x once (memory probe 1.39x) without moving the speed-ups
             beyond that spread: their session-to-session noise is the few rounds', not a neighbour's.
interleave   (needs --run DIR) the two schedules of `measure_models` side by side, on the idle machine at
             the run's workload: --sessions pairs of sessions (--repeats rounds each), "model" then
             "step" interleaving, alternating so that the machine's state falls on both alike. Per
             session and child the speed-up, the spread (SD of log) of its per-round speed-ups and
             of the parent's and the child's per-round runtimes; the summary rows ("session": "all")
             give each schedule's mean, range and SD of log across sessions, and the two runtimes'
             spreads in quadrature (what an unpaired noise estimate of the speed-up would assume). Measured on the 2-core VM (demo run, 5 rounds, 8 + 8 sessions in two
             runs of --sessions 4): per-round spread 5.3-7.6 % by model, 2.8-3.3 % by step; across
             sessions 4.7-6.4 % vs 1.4-2.3 %; mean speed-ups by step 1.29 / 1.52 / 2.03 / 3.05 for
             children the cost table predicted at 1.25 / 1.50 / 2.00 / 3.01.

Writes OUT/<name>.csv for each measurement run (all three by default, `--only` picks) and prints
them. Needs Linux and at least 2 CPUs; run it on an otherwise idle machine (it starts its own
neighbours and stops them).

    python benchmarks/contention.py --out /tmp/contention [--only fingerprint]
    python benchmarks/contention.py --out /tmp/contention --only speedups --run runs/demo [--repeats 3]
    python benchmarks/contention.py --out /tmp/contention --only interleave --run runs/demo --repeats 5 --sessions 4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_text
from puzzle.scoring.cost import Contention, last_level_cache_bytes
from puzzle.scoring.machine import ReferenceProbe

NEIGHBOURS = {
    "busy loop": "while True: pass",
    "memory stream": "import numpy as np\na = np.ones(64 << 20)\nb = np.empty_like(a)\nwhile True: np.copyto(b, a)",
}


def neighbour(kind: str | None, cpu: int | None = None):
    """A started neighbour process (None for none), pinned to `cpu` when given; the caller kills it."""
    if not kind:
        return None
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return subprocess.Popen([*pin, sys.executable, "-c", NEIGHBOURS[kind]])


def swiglu_stack(layers: int = 30, hidden: int = 576, ffn: int = 1536):
    """Random SwiGLU weights of `layers` layers: [(gate (F, C), up (F, C), down (C, F))] fp32."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(ffn, hidden, generator=g), torch.randn(ffn, hidden, generator=g),
             torch.randn(hidden, ffn, generator=g)) for _ in range(layers)]


def run_stack(weights, x: torch.Tensor) -> torch.Tensor:
    for gate, up, down in weights:
        x = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T  # (N, C) -> (N, F) -> (N, C)
    return x


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def neighbours() -> pd.DataFrame:
    torch.set_num_threads(1)
    weights = swiglu_stack()
    decode = lambda: run_stack(weights, torch.randn(4, 576))  # noqa: E731
    prefill = lambda: run_stack(weights[:4], torch.randn(1024, 576))  # noqa: E731
    rows = []
    with torch.no_grad():
        for kind in (None, "memory stream", "busy loop", "memory stream", None):
            proc = neighbour(kind)
            try:
                time.sleep(1.0)
                guard = Contention()
                guard.start()
                d, p = median_ms(decode, 40), median_ms(prefill, 15)
                _, cores = guard.stop()
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
            rows.append({"neighbour": kind or "none", "decode_ms": d, "prefill_ms": p, "contention_cores": cores})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def windows(seconds=(0.02, 0.05, 0.1, 0.2, 0.5)) -> pd.DataFrame:
    torch.set_num_threads(2)
    a = torch.randn(256, 256)
    rows = []
    for kind in (None, "busy loop"):
        proc = neighbour(kind)
        try:
            time.sleep(1.0)
            for w in seconds:
                guard, readings = Contention(), []
                for _ in range(max(8, int(4 / w))):
                    guard.start()
                    t = time.perf_counter()
                    while time.perf_counter() - t < w:
                        a @ a
                    readings.append(guard.stop()[1])
                r = np.asarray(readings)
                rows.append({"neighbour": kind or "none", "window_s": w, "windows": len(r),
                             "median_cores": float(np.median(r)), "max_cores": float(r.max()),
                             "tick_noise_cores": guard.tick_noise(w)})
                print(rows[-1], flush=True)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    return pd.DataFrame(rows)


def fingerprint() -> pd.DataFrame:
    import os

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("fingerprint needs 2 CPUs: one for the measurement, one for the neighbour")
    os.sched_setaffinity(0, {cpus[0]})
    torch.set_num_threads(1)
    weights = swiglu_stack()
    decode = lambda: run_stack(weights, torch.randn(4, 576))  # noqa: E731
    probe = ReferenceProbe(last_level_cache_bytes("cpu"))
    rows = []
    with torch.no_grad():
        for kind in (None, "busy loop", "memory stream", None):
            proc = neighbour(kind, cpus[-1])
            try:
                time.sleep(1.0)
                guard = Contention()
                guard.start()
                d = median_ms(decode, 40)
                _, cores = guard.stop()
                ref = np.median([probe.sample() for _ in range(20)], axis=0)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
            rows.append({"neighbour": kind or "none", "decode_ms": d, "contention_cores": cores,
                         "reference_compute_ms": float(ref[0]), "reference_memory_ms": float(ref[1])})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    for col in ("decode_ms", "reference_compute_ms", "reference_memory_ms"):
        df[col.replace("_ms", "_vs_idle")] = df[col] / df.loc[0, col]
    return df


def _front_models(run_dir: Path):
    from puzzle.baselines import open_run
    from puzzle.pipeline import build_child, read_architecture

    run = open_run(run_dir, progress=False)
    front = pd.read_csv(run_dir / "front.csv")
    names = [n for n in front["name"] if n != "parent"]
    if not names:
        raise SystemExit(f"{run_dir / 'front.csv'} lists no children: run `puzzle run` to the end first")
    return run, {"parent": run.parent.model, **{n: build_child(run, read_architecture(run, n)).eval() for n in names}}


def speedups(run_dir: Path, repeats: int = 3) -> pd.DataFrame:
    import dataclasses
    import os

    from puzzle.scoring.cost import measure_models

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("speedups needs 2 CPUs: one for the measurement, one for the neighbour")
    run, models = _front_models(run_dir)
    os.sched_setaffinity(0, {cpus[0]})
    workload = dataclasses.replace(run.workload(), num_threads=1)
    rows = []
    for step, kind in enumerate((None, "memory stream", "busy loop", None)):
        proc = neighbour(kind, cpus[-1])
        try:
            time.sleep(1.0)
            for again in range(2):
                df = measure_models(models, workload, repeats=repeats, seed=10 * step + again).set_index("name")
                parent_ms = float(df.loc["parent", "runtime_ms"])
                for name in models:
                    rows.append({"step": step, "neighbour": kind or "none", "measurement": again, "model": name,
                                 "runtime_ms": float(df.loc[name, "runtime_ms"]),
                                 "speedup": parent_ms / float(df.loc[name, "runtime_ms"]),
                                 "contention_cores": df.attrs.get("contention_cores"),
                                 "reference_compute_ms": df.attrs.get("reference_compute_ms"),
                                 "reference_memory_ms": df.attrs.get("reference_memory_ms")})
                print(f"{kind or 'none'} #{again}: " + ", ".join(
                    f"{r['model']} {r['speedup']:.2f}x" for r in rows[-len(models):]), flush=True)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    df = pd.DataFrame(rows)
    first = df[(df["step"] == 0) & (df["measurement"] == 0)].set_index("model")["runtime_ms"]
    df["runtime_vs_idle"] = df["runtime_ms"] / df["model"].map(first)
    return df


def interleave(run_dir: Path, repeats: int = 5, sessions: int = 4) -> pd.DataFrame:
    from puzzle.scoring.cost import measure_models

    if repeats < 2:
        raise SystemExit("interleave needs --repeats >= 2 (a spread of per-round speed-ups)")
    run, models = _front_models(run_dir)
    rows = []
    for session in range(sessions):
        for mode in ("model", "step"):
            t0 = time.perf_counter()
            df = measure_models(models, run.workload(), repeats=repeats, interleave=mode, seed=session).set_index("name")
            rounds = {n: np.asarray(v) for n, v in df.attrs["runtime_rounds_ms"].items()}
            for name in models:
                if name == "parent":
                    continue
                rows.append({"session": str(session), "interleave": mode, "model": name,
                             "speedup": float(df.loc["parent", "runtime_ms"] / df.loc[name, "runtime_ms"]),
                             "per_round_sd_log": float(np.std(np.log(rounds["parent"] / rounds[name]), ddof=1)),
                             "parent_sd_log": float(np.std(np.log(rounds["parent"]), ddof=1)),
                             "child_sd_log": float(np.std(np.log(rounds[name]), ddof=1)),
                             "parent_ms": float(df.loc["parent", "runtime_ms"]), "seconds": time.perf_counter() - t0})
            print(f"session {session} {mode}: " + ", ".join(f"{r['model']} {r['speedup']:.3f}x"
                                                           for r in rows[-(len(models) - 1):]), flush=True)
    df = pd.DataFrame(rows)
    summary = []
    for (mode, name), g in df.groupby(["interleave", "model"], sort=False):
        summary.append({"session": "all", "interleave": mode, "model": name, "speedup": g["speedup"].mean(),
                        "speedup_min": g["speedup"].min(), "speedup_max": g["speedup"].max(),
                        "between_sessions_sd_log": float(np.std(np.log(g["speedup"]), ddof=1)) if len(g) > 1 else np.nan,
                        "per_round_sd_log": g["per_round_sd_log"].mean(),
                        "quadrature_sd_log": float(np.hypot(g["parent_sd_log"], g["child_sd_log"]).mean())})
    return pd.concat([df, pd.DataFrame(summary)], ignore_index=True)


MEASUREMENTS = {"neighbours": neighbours, "windows": windows, "fingerprint": fingerprint, "speedups": speedups,
                "interleave": interleave}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the <measurement>.csv files")
    p.add_argument("--only", choices=sorted(MEASUREMENTS), action="append",
                   help="run only this measurement (repeatable; default: all)")
    p.add_argument("--run", type=Path, help="a finished run directory (for --only speedups)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per whole-model measurement (speedups, interleave)")
    p.add_argument("--sessions", type=int, default=4, help="pairs of sessions (interleave)")
    args = p.parse_args(argv)
    needs_run = ("speedups", "interleave")
    chosen = args.only or [m for m in MEASUREMENTS if m not in needs_run or args.run]
    for name in needs_run:
        if name in chosen and args.run is None:
            p.error(f"--only {name} needs --run DIR, a finished `puzzle run` directory")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.sessions < 2:
        p.error(f"--sessions must be >= 2 (a spread across sessions), got {args.sessions}")
    problem = None
    if args.out.exists() and not args.out.is_dir():
        problem = f"--out {args.out} is a file; give a folder"
    elif args.run is not None and any(name in chosen for name in needs_run):
        missing = [f for f in ("config.json", "front.csv") if not (args.run / f).is_file()]
        if missing:
            problem = (f"--run {args.run} is no finished run directory ({' and '.join(missing)} missing): give one "
                       f"after `puzzle run`")
    if problem:
        print(f"contention: error: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        try:
            if name == "speedups":
                df = speedups(args.run, args.repeats)
            elif name == "interleave":
                df = interleave(args.run, args.repeats, args.sessions)
            else:
                df = MEASUREMENTS[name]()
        except PuzzleError as e:
            raise SystemExit(f"contention.py: error: {e}") from None
        atomic_write_text(args.out / f"{name}.csv", df.to_csv(index=False))
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
