"""The ground-truth family: a run whose teacher has an analytic Gaussian-mixture truth, scored against exact
samples (Frechet distance, mode coverage, off-mode fraction) without building a Trainer: the run's networks are
rebuilt from its config as training built them, the generator's EMA weights are read from the checkpoint, and the
run directory is only read, except for RUN_DIR/eval/."""

from __future__ import annotations

from pathlib import Path

import torch

from bigsid import checkpoint, toy
from bigsid.config import load_config
from bigsid.export import find_checkpoint, load_generator_state
from bigsid.models import build_networks
from bigsid.parallel.local import LocalBackend
from evaluation.settings import EvalError

CONVENTION = {"space": "latent", "reference": "the analytic Gaussian mixture's exact mean and covariance",
              "statistic": "mean over prompts", "weights": "EMA"}


def has_truth(config: dict) -> bool:
    return config["teacher"]["kind"] == "toy_gmm" or toy.GMM.load(config["teacher"]["path"] or ".") is not None


def evaluate(source: str | Path, overrides: list[str]) -> tuple[Path, dict]:
    """(run directory, toy metrics) of the newest complete checkpoint of `source` (or `source` itself).
    `overrides` are the run's eval.* keys, e.g. eval.num_samples=16000."""
    folder = find_checkpoint(source)
    run_dir = folder.parent.parent
    state = checkpoint.read_state(folder)
    cfg = load_config(run_dir / "config.yaml", ["train.progress=false", *overrides])
    # The Trainer seeds torch with train.seed before building the networks: the same seed refits the same teacher.
    torch.manual_seed(cfg.train.seed)
    networks = build_networks(cfg)
    if networks.truth is None:
        raise EvalError(f"{run_dir}: its teacher has no analytic ground truth; choose metrics from fid, clip, "
                        "aesthetic, imagereward, pickscore, hpsv2")
    # the trained networks of a diffusers teacher are built empty: placed as the local backend places them
    LocalBackend(cfg).place(networks)
    networks.generator.load_state_dict(load_generator_state(folder, ema=True))
    networks.generator.eval()
    # the same reference and teacher-sampler seeds as the Trainer's evaluation
    ground_truth = toy.GroundTruth(networks, cfg.eval, guidance=cfg.objective.kappa4)
    metrics = ground_truth.score(networks.generator, networks.encoder)
    metrics |= {"step": state["step"], "nimg": state["nimg"]}
    return run_dir, metrics


def as_report(metrics: dict, run_dir: Path) -> dict:
    """metrics.json's form: each scalar with the convention it was measured in."""
    reference = CONVENTION["reference"] if metrics["guidance"] == 1.0 else (
        f"the mean and covariance of the exact denoiser's DDIM sampler at guidance {metrics['guidance']} (a guided "
        "mixture has no closed form)")
    convention = {**CONVENTION, "reference": reference, "samples_per_prompt": metrics["num_samples"],
                  "teacher_sampler": f"DDIM, {metrics['teacher_sampler_steps']} steps"}
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    return {"source": {"kind": "generator", "run": str(run_dir), "step": metrics["step"], "nimg": metrics["nimg"],
                       "ema": True},
            "generation": {"num_images": metrics["num_samples"]},
            "metrics": {k: {"value": v, "convention": convention} for k, v in scalars.items()}}
