"""Ground-truth benchmark: SiD, SIM and DMD on the analytic GMM teacher.

For each objective, runs configs/toy_<objective>.yaml (plus overrides), and records fd_generator and
mode_coverage_tv against training images, the teacher's own 25-step sampler FD, and the images needed to
reach it. Each objective's result goes to benchmarks/results/toy_<objective>.json with the machine it ran on;
toy.md and toy.png are then rebuilt from every toy_*.json there, so objectives can run separately.

    python benchmarks/bench_toy.py                       # all three, 2,000 iterations each
    OMP_NUM_THREADS=1 python benchmarks/bench_toy.py --objectives dmd   # one, beside others
    python benchmarks/bench_toy.py --objectives sid --set train.total_nimg=128000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(objective: str, overrides: list[str], run_dir: Path) -> dict:
    import shutil

    from bigsid.config import load_config
    from bigsid.trainer import Trainer

    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's scratch: never resume an earlier measurement
    cfg = load_config(ROOT / "configs" / f"toy_{objective}.yaml",
                      [f"train.run_dir={run_dir}", "train.progress=false", "train.sample_every=0",
                       "train.checkpoint_every=0", *overrides])
    start = time.perf_counter()
    final = Trainer(cfg).run()  # evaluates at step 0 too
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["nimg"], r["eval/fd_generator"], r["eval/mode_coverage_tv"]) for r in rows if "eval/fd_generator" in r]
    target = final["fd_teacher_sampler"]
    reached = next((n for n, fd, tv in curve if fd <= target and tv <= 0.02), None)
    return {"objective": objective, "overrides": overrides, "batch_size": cfg.train.batch_size,
            "iterations": curve[-1][0] // cfg.train.batch_size, "seconds": round(seconds, 1), "fd_init": curve[0][1],
            "fd_final": final["fd_generator"], "fd_best": min(fd for _, fd, _ in curve),
            "mode_coverage_tv_final": final["mode_coverage_tv"], "fd_teacher_sampler": target,
            "mode_coverage_tv_teacher_sampler": final["mode_coverage_tv_teacher_sampler"],
            "fd_reference": final["fd_reference"], "nimg_to_teacher_fd": reached,
            "iterations_to_teacher_fd": None if reached is None else reached // cfg.train.batch_size,
            "curve": curve}


def early_decay(result: dict) -> tuple[float, float, int]:
    """How exponential the early FD curve is: a least-squares line through log FD against iterations over its
    first descent (from initialisation until FD first rises). (R^2, iterations per e-fold, last iteration)."""
    curve, batch = result["curve"], result["batch_size"]
    end = next((i for i in range(1, len(curve)) if curve[i][1] > curve[i - 1][1]), len(curve)) - 1
    its = np.array([c[0] / batch for c in curve[:end + 1]])
    log_fd = np.log([c[1] for c in curve[:end + 1]])
    if len(its) < 3:
        return float("nan"), float("nan"), int(its[-1])
    slope, intercept = np.polyfit(its, log_fd, 1)
    residual = log_fd - (slope * its + intercept)
    r2 = 1 - residual.var() / log_fd.var()
    return float(r2), float(-1 / slope), int(its[-1])


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metas = [json.loads(p.read_text()) for p in sorted(out.glob("toy_*.json"))]
    results = [m["result"] for m in metas]
    machines = sorted({f"{m['machine']} ({m['date']})" for m in metas})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], "o-", ms=3, label=r["objective"])
    ax.axhline(results[0]["fd_teacher_sampler"], ls="--", c="gray", label="teacher, 25 DDIM steps")
    ax.axhline(results[0]["fd_reference"], ls=":", c="gray", label="exact vs exact")
    ax.set(yscale="log", xlabel="training images", ylabel="Frechet distance to exact samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "toy.png", dpi=100)
    lines = ["# Toy ground-truth benchmark\n", f"Machine: {'; '.join(machines)}.\n",
             "Analytic GMM teacher (configs/toy_*.yaml): FD of one-step samples to exact samples, mean over prompts. "
             "Target: fd_generator <= the teacher's 25-step FD with mode_coverage_tv <= 0.02.\n",
             "Early decay: a line through log FD against iterations over the first descent (initialisation until FD "
             "first rises); R^2 near 1 means the early curve is exponential (straight on the log plot).\n",
             "| objective | overrides | iterations | FD init | FD final | FD best | TV final | teacher FD (TV) | "
             "exact-vs-exact FD | iterations to teacher FD | early decay R^2 (iterations) | iterations per e-fold "
             "| wall s |", "|" + " --- |" * 13]
    for r in results:
        r2, efold, last = early_decay(r)
        lines.append(f"| {r['objective']} | {' '.join(r['overrides']) or '-'} | {r['iterations']} | {r['fd_init']:.3f} "
                     f"| {r['fd_final']:.3f} | {r['fd_best']:.3f} | {r['mode_coverage_tv_final']:.3f} | "
                     f"{r['fd_teacher_sampler']:.3f} ({r['mode_coverage_tv_teacher_sampler']:.3f}) | "
                     f"{r['fd_reference']:.3f} | {r['iterations_to_teacher_fd'] or 'not reached'} | "
                     f"{r2:.3f} (0-{last}) | {efold:.0f} | {r['seconds']} |")
    lines.append("\n![FD against images](toy.png)\n")
    (out / "toy.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=["sid", "sim", "dmd"])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every objective")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work", default="runs/bench_toy")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for objective in args.objectives:
        result = run(objective, args.set, Path(args.work) / objective)
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
        meta = {"machine": machine(), "date": datetime.date.today().isoformat(), "result": result}
        (out / f"toy_{objective}.json").write_text(json.dumps(meta, indent=1))
    write(out)


if __name__ == "__main__":
    main()
