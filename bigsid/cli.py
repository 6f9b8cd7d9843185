"""bigsid command line: train, eval, demo, toy-teacher, data."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bigsid.config import ConfigError, load_config

DEMO_CONFIG = Path("configs/demo.yaml")


def _run(cfg) -> dict | int:
    """Train; a preemption signal ends in a complete checkpoint and the requeue exit status."""
    from bigsid.trainer import PREEMPTED_EXIT, Preempted, Trainer

    try:
        return Trainer(cfg).run()
    except Preempted:
        return PREEMPTED_EXIT


def cmd_train(args) -> int:
    cfg = load_config(None if args.config == "-" else args.config, args.overrides)
    result = _run(cfg)
    if isinstance(result, int):
        return result
    _report(cfg.train.run_dir, result)
    return 0


def _report(run_dir, metrics: dict) -> None:
    from bigsid.toy import write_report

    if metrics:
        paths = write_report(Path(run_dir), metrics)
        keys = ("fd_generator", "fd_teacher_sampler", "fd_reference", "mode_coverage_tv")
        print("  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics))
        print("wrote " + ", ".join(str(p) for p in paths))


def cmd_eval(args) -> int:
    import dataclasses

    from bigsid.models import build_networks
    from bigsid.trainer import Trainer

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a bigsid run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", [f"train.run_dir={run_dir}", "train.progress=false", *args.overrides])
    # The generator's weights come from the checkpoint: skip refitting the toy student they started from.
    networks = build_networks(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, student_fit_steps=0)))
    trainer = Trainer(cfg, networks=networks)
    if trainer.step == 0:
        raise ConfigError(f"{run_dir} has no complete checkpoint to evaluate")
    metrics = trainer.evaluate()
    if not metrics:
        print("this teacher has no analytic ground truth: use the evaluation/ package for CLIP, aesthetic and FID")
        return 0
    _report(run_dir, metrics)
    return 0


def cmd_toy_teacher(args) -> int:
    from bigsid.toy import prepare_toy_teacher

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} exists; remove it or choose another folder")
    cfg = load_config(args.config, args.overrides)
    prepare_toy_teacher(out, cfg.teacher.gmm, fit_steps=args.fit_steps, seed=cfg.train.seed)
    return 0


def cmd_demo(args) -> int:
    from bigsid.toy import prepare_toy_teacher

    if not DEMO_CONFIG.is_file():
        raise ConfigError(f"{DEMO_CONFIG} not found: run the demo from the repository root")
    out = Path(args.out)
    teacher = out / "teacher"
    # The teacher folder may not exist yet, so read the GMM spec without validating teacher.path.
    spec = load_config(DEMO_CONFIG, [*args.overrides, "teacher.kind=toy_gmm"])
    if not (teacher / "model_index.json").is_file():
        print(f"[1/3] fitting a small diffusers UNet teacher to the analytic GMM -> {teacher}")
        prepare_toy_teacher(teacher, spec.teacher.gmm, fit_steps=args.fit_steps, seed=spec.train.seed)
    else:
        print(f"[1/3] using the teacher in {teacher}")
    cfg = load_config(DEMO_CONFIG, [f"teacher.path={teacher}", f"train.run_dir={out / 'run'}", *args.overrides])
    print(f"[2/3] distilling with {cfg.objective.name} into a one-step generator -> {cfg.train.run_dir}")
    result = _run(cfg)
    if isinstance(result, int):
        return result
    print("[3/3] against the exact ground truth (Frechet distance, lower is better):")
    _report(cfg.train.run_dir, result)
    print(f"samples: {Path(cfg.train.run_dir) / 'samples'}   logs: {Path(cfg.train.run_dir) / 'metrics.jsonl'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigsid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="distill a teacher into a one-step generator")
    p.add_argument("config", help="YAML config (see configs/), or - for the defaults")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="ground-truth metrics of a toy run's latest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="e.g. eval.num_samples=4000")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("toy-teacher", help="fit a small diffusers SD teacher to an analytic GMM and save it")
    p.add_argument("out")
    p.add_argument("--config", default=None)
    p.add_argument("--fit-steps", type=int, default=2000)
    p.add_argument("overrides", nargs="*", help="e.g. teacher.gmm.num_prompts=4")
    p.set_defaults(func=cmd_toy_teacher)

    p = sub.add_parser("demo", help="toy teacher -> SiD distillation -> ground-truth evaluation, offline on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fit-steps", type=int, default=2000)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)

    from bigsid import data

    data.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("BIGSID_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"bigsid: config error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # TeacherError, CheckpointError, DataError, ScheduleError: bad input, said plainly
        print(f"bigsid: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
