"""Ground truth per teacher family: a tiny pipeline of each family (SD, SDXL, PixArt, SD3 flow) fitted to one
analytic GMM, then distilled with SiD under one set of settings, scored against the exact truth.

The same mixture, fit, objective and optimiser settings for every family (the demo's: SiD with the EDM-form
fake-score loss, generator lr 3e-5, fake score 1e-4, batch 32); only the generator's start follows the family's
convention (t_init 625, VE sigma 2.5, on VP teachers; 999, pure noise, on the flow). The VP teachers are fitted
as v-prediction networks (EDM's preconditioning, as bigsid.toy.MLPDenoiser argues): an eps-prediction network's x0
error at the last timestep is its eps error over a_t, 1/0.0064 on PixArt's linear betas, which 1,500 fitting steps
do not bring down (its 25-step sampler was at FD 81 from the truth, the exact denoiser's at 0.19). Each family's result goes to
benchmarks/results/families_<family>.json with the machine it ran on; families.md is rebuilt from all of them.

    OMP_NUM_THREADS=1 python benchmarks/bench_families.py --families sd3 pixart
    python benchmarks/bench_families.py --fit-steps 300 --iterations 100   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

from bench_toy import machine

RESULTS = Path(__file__).resolve().parent / "results"
GMM = {"num_prompts": 2, "modes_per_prompt": 2, "latent_shape": [4, 4, 4], "mode_std": 0.1}
SETTINGS = ["objective.name=sid", "objective.fake_score_weighting=edm", "objective.sigma_data=1.0",
            "optim.lr_generator=3e-5", "optim.lr_fake_score=1e-4", "train.batch_size=32",
            "train.ema_halflife_nimg=2000", "train.ema_rampup=0.0", "eval.num_samples=500",
            "eval.teacher_sampler_steps=25", "data.source=vocab"]


def run(family: str, fit_steps: int, iterations: int, seed: int) -> dict:
    from bigsid.config import GMMConfig, load_config
    from bigsid.toy import prepare_family_teacher
    from bigsid.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        teacher_overrides = prepare_family_teacher(Path(tmp) / "teacher", GMMConfig(**GMM, seed=seed), family,
                                                   fit_steps, seed=seed)
        fitted = time.perf_counter()
        run_dir = Path(tmp) / "run"
        overrides = [*SETTINGS, *teacher_overrides, f"train.run_dir={run_dir}", f"train.total_nimg={32 * iterations}",
                     f"train.eval_every={max(1, iterations // 6)}", "train.progress=false", "train.sample_every=0",
                     "train.checkpoint_every=0", f"train.seed={seed}"]
        final = Trainer(load_config(None, overrides)).run()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curve = [(r["step"], r["eval/fd_generator"]) for r in rows if "eval/fd_generator" in r]
    keys = ("fd_generator", "fd_teacher_sampler", "fd_exact_sampler", "fd_reference", "mode_coverage_tv",
            "mode_coverage_tv_teacher_sampler", "spread_ratio", "spread_ratio_teacher_sampler", "teacher_fit_ok")
    return {"family": family, "fit_steps": fit_steps, "iterations": iterations, "seed": seed, "curve": curve,
            "fd_init": curve[0][1], "fit_seconds": round(fitted - start, 1),
            "train_seconds": round(time.perf_counter() - fitted, 1), **{k: final[k] for k in keys}}


def write() -> None:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("families_*.json"))]
    lines = ["# Ground truth per teacher family\n",
             f"Machine: {'; '.join(sorted({r['machine'] for r in results}))}.\n",
             f"`benchmarks/bench_families.py`: a tiny random pipeline of each family (bigsid.tiny; SD's is the toy "
             f"teacher's) fitted to the exact denoiser of one GMM ({GMM}), then distilled with SiD, the same "
             "settings for all (the script's SETTINGS). FD: Frechet distance of one-step samples to exact samples "
             "(mean over prompts); the teacher's own 25-step sampler (DDIM on VP, Euler on the flow) and the exact "
             "denoiser through that sampler beside it, and two exact sample sets (noise floor).\n",
             "| family | fit steps | iterations | FD init -> final | teacher sampler FD | exact sampler FD "
             "| noise floor | TV final (teacher) | spread final (teacher) | teacher fit ok | fit s | train s |",
             "|" + " --- |" * 12]
    for r in (x["result"] for x in results):
        lines.append(f"| {r['family']} | {r['fit_steps']} | {r['iterations']} | {r['fd_init']:.3f} -> "
                     f"{r['fd_generator']:.3f} | {r['fd_teacher_sampler']:.3f} | {r['fd_exact_sampler']:.3f} "
                     f"| {r['fd_reference']:.3f} | {r['mode_coverage_tv']:.3f} "
                     f"({r['mode_coverage_tv_teacher_sampler']:.3f}) | {r['spread_ratio']:.2f} "
                     f"({r['spread_ratio_teacher_sampler']:.2f}) | {r['teacher_fit_ok']} | {r['fit_seconds']} "
                     f"| {r['train_seconds']} |")
    (RESULTS / "families.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["sd", "sdxl", "pixart", "sd3"])
    p.add_argument("--fit-steps", type=int, default=1500)
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for family in args.families:
        result = run(family, args.fit_steps, args.iterations, args.seed)
        (RESULTS / f"families_{family}.json").write_text(json.dumps(
            {"machine": machine(), "date": datetime.date.today().isoformat(), "result": result}, indent=1))
        write()
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


if __name__ == "__main__":
    main()
