"""bigsid command line: train, eval, demo, toy-teacher, data, encode-prompts, export, sample, plan."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources
from pathlib import Path

from bigsid.config import ConfigError, load_config

# package data, so that an installed bigsid runs the demos from any directory; configs/toy_sid.yaml links to the first
DEMO_CONFIG = resources.files("bigsid") / "configs" / "toy_sid.yaml"
DEMO_SD_CONFIG = resources.files("bigsid") / "configs" / "demo_sd.yaml"


def _run(cfg, image_eval=None) -> dict | int:
    """Train; a preemption signal ends in a complete checkpoint and the requeue exit status."""
    from bigsid.parallel.dist import leave_process_group
    from bigsid.trainer import PREEMPTED_EXIT, Preempted, Trainer

    try:
        result = Trainer(cfg, image_eval=image_eval).run()
    except Preempted:
        result = PREEMPTED_EXIT
    leave_process_group()  # a finished or preempted run's ranks agree on it
    return result


def cmd_train(args) -> int:
    cfg = load_config(None if args.config == "-" else args.config, args.overrides)
    image_eval = None
    if args.eval:
        from evaluation.periodic import TrainingEval

        image_eval = TrainingEval(cfg, args.eval)
    result = _run(cfg, image_eval)
    if isinstance(result, int):
        return result
    _report(cfg.train.run_dir, result)
    return 0


def _report(run_dir, metrics: dict) -> None:
    from bigsid.toy import held_since, summary, write_report

    if metrics:
        paths = write_report(Path(run_dir), metrics)
        print(summary(metrics))
        if (held := held_since(run_dir)) is not None:
            print(f"met at each of the last {held[1]} evaluations, from step {held[0]} to the end")
        print("wrote " + ", ".join(str(p) for p in paths))


def cmd_eval(args) -> int:
    from evaluation.cli import main as evaluate

    return evaluate(args)


def cmd_toy_teacher(args) -> int:
    from bigsid.toy import prepare_toy_teacher

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} exists; remove it or choose another folder")
    cfg = load_config(args.config, args.overrides)
    prepare_toy_teacher(out, cfg.teacher.gmm, fit_steps=args.fit_steps, seed=cfg.train.seed,
                        prediction_type=cfg.teacher.prediction_type or "epsilon")
    return 0


def cmd_demo(args) -> int:
    out = Path(args.out)
    overrides = [f"train.run_dir={out / 'run'}", *args.overrides]
    if args.sd:
        cfg = _prepare_sd_demo(out / "teacher", args.fit_steps, overrides)
    else:
        with resources.as_file(DEMO_CONFIG) as demo_config:  # a real file even where the package is zipped
            cfg = load_config(demo_config, overrides)
        print(f"[1/2] distilling an MLP teacher, fitted to the analytic GMM, with {cfg.objective.name} into a one-step "
              f"generator -> {cfg.train.run_dir}")
    result = _run(cfg)
    if isinstance(result, int):
        return result
    print(f"{'[3/3]' if args.sd else '[2/2]'} against the exact ground truth (Frechet distance, lower is better):")
    _report(cfg.train.run_dir, result)
    print(f"samples: {Path(cfg.train.run_dir) / 'samples'}   logs: {Path(cfg.train.run_dir) / 'metrics.jsonl'}")
    return 0


def _prepare_sd_demo(teacher: Path, fit_steps: int, overrides: list[str]):
    """The demo on a small diffusers Stable Diffusion pipeline: its UNet teacher is fitted once and saved."""
    from bigsid.toy import prepare_toy_teacher

    with resources.as_file(DEMO_SD_CONFIG) as demo_config:
        # The teacher folder may not exist yet, so read the GMM spec without validating teacher.path.
        spec = load_config(demo_config, [*overrides, "teacher.kind=toy_gmm"])
        if not (teacher / "model_index.json").is_file():
            print(f"[1/3] fitting a small diffusers UNet teacher to the analytic GMM -> {teacher}")
            prepare_toy_teacher(teacher, spec.teacher.gmm, fit_steps=fit_steps, seed=spec.train.seed,
                                prediction_type=spec.teacher.prediction_type or "epsilon")
        else:
            print(f"[1/3] using the teacher in {teacher}")
        cfg = load_config(demo_config, [f"teacher.path={teacher}", *overrides])
    print(f"[2/3] distilling with {cfg.objective.name} into a one-step generator -> {cfg.train.run_dir}")
    return cfg


def cmd_export(args) -> int:
    from bigsid.export import export

    out = export(args.source, args.out, ema=not args.raw, teacher=args.teacher, steps=args.steps,
                 fuse_lora=args.fuse_lora, force=args.force)
    print(f"exported to {out}; the model card {out / 'README.md'} gives the call")
    return 0


def cmd_sample(args) -> int:
    from bigsid.export import sample

    paths = sample(args.model, args.prompts, args.out, seeds=args.seeds, seed=args.seed, steps=args.steps,
                   ema=not args.raw, teacher=args.teacher, device=args.device, force=args.force)
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")
    return 0


def cmd_plan(args) -> int:
    from bigsid.plan import format_plan, load_model, plan

    # planning reads the teacher's network config, never the prompts: the shipped configs' shard paths need not exist
    cfg = load_config(None if args.config == "-" else args.config, args.overrides, check_data=False)
    model = load_model(args.network, cfg, args.resolution)
    rows = plan(model, cfg, args.gpus, args.gpu_mem, shard_size=args.shard_size, batch=args.batch)
    print(format_plan(model, cfg, args.gpus, args.gpu_mem, rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigsid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="distill a teacher into a one-step generator")
    p.add_argument("config", help="YAML config (see configs/), or - for the defaults")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--eval", nargs="+", metavar="KEY=VALUE", help="score images at every train.eval_every steps "
                   "(teachers without an analytic truth): `bigsid eval` keys, e.g. prompts=FILE num_images=2000 "
                   "metrics=[fid,clip] fid.reference_stats=FILE ...; logged as eval/NAME, plotted in "
                   "RUN_DIR/eval/training_curves.png")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run, checkpoint, export or the teacher's sampler (FID, CLIP score, "
                       "aesthetic, rewards; ground truth for toy runs); compare evaluations")
    p.add_argument("source", nargs="?", help="run directory, checkpoints/step-N or exported folder")
    p.add_argument("overrides", nargs="*", help="key=value: prompts=FILE, metrics=[fid,clip,aesthetic], "
                   "fid.inception=FILE, fid.reference=DIR, clip.weights=FILE, aesthetic.head=FILE, sampler=teacher, "
                   "name=NAME (see evaluation/settings.py); toy runs: eval.num_samples=16000")
    p.add_argument("--compare", nargs="+", metavar="EVAL", help="print a Markdown table of these evaluations "
                   "(eval/NAME folders, metrics.json files, or run directories for all their evaluations)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("toy-teacher", help="fit a small diffusers SD teacher to an analytic GMM and save it")
    p.add_argument("out")
    p.add_argument("--config", default=None)
    p.add_argument("--fit-steps", type=int, default=2000)
    p.add_argument("overrides", nargs="*", help="e.g. teacher.gmm.num_prompts=4")
    p.set_defaults(func=cmd_toy_teacher)

    p = sub.add_parser("demo", help="toy teacher -> SiD distillation -> ground-truth evaluation, offline on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--sd", action="store_true", help="on a small diffusers Stable Diffusion pipeline (CLIP text "
                   "encoder, UNet, VAE) fitted to the GMM, instead of an MLP")
    p.add_argument("--fit-steps", type=int, default=2000, help="the --sd teacher's fit steps")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write a run's generator as a diffusers pipeline folder with a model card")
    p.add_argument("source", help="run directory (its newest complete checkpoint) or checkpoints/step-N")
    p.add_argument("out", help="output folder; refused if it exists, unless --force")
    p.add_argument("--raw", action="store_true", help="the raw generator weights instead of their EMA")
    p.add_argument("--teacher", default=None, help="the teacher pipeline, if not at the run's teacher.path")
    p.add_argument("--steps", type=int, default=None, help="steps in the model card's call (default: the run's "
                   "generator.steps)")
    p.add_argument("--fuse-lora", action="store_true", help="a LoRA generator as a full pipeline, adapter fused")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="images and a grid from an export, a run directory or a checkpoint")
    p.add_argument("model", help="an export folder, a run directory or checkpoints/step-N")
    p.add_argument("--prompts", nargs="+", required=True)
    p.add_argument("--out", default="samples")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (noise seeds seed..seed+seeds-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="generator steps (default: the export's model card "
                   "call, a run's generator.steps)")
    p.add_argument("--raw", action="store_true", help="checkpoints: the raw weights instead of their EMA")
    p.add_argument("--teacher", default=None, help="checkpoints: the teacher, if not at the run's teacher.path")
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("plan", help="memory per GPU for each backend and checkpointing setting; the batch that fits")
    p.add_argument("config", help="YAML config, or - for the defaults")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the run uses")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--network", "--unet", dest="network", default=None, help="a preset (sd15 | sd21 | sdxl | "
                   "pixart_alpha_512 | pixart_alpha_1024 | pixart_sigma_1024 | sd35_medium | tiny | tiny_pixart), a "
                   "UNet, PixArt or SD3 transformer config.json, or a network or pipeline folder (default: the "
                   "config's teacher)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the network's)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default: train.batch_size / GPUs)")
    p.add_argument("--shard-size", type=int, default=None, help="also plan fsdp2 sharded within groups of this "
                   "many GPUs (default: parallel.shard_size)")
    p.set_defaults(func=cmd_plan)

    from bigsid import data, text_cache

    data.add_cli(sub)
    text_cache.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional vision back-ends bigsid never uses; keep bigsid's own log readable
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=os.environ.get("BIGSID_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # argparse ends a positional list at the first option, so `train CONFIG --flag key=value` would leave key=value
    # behind: overrides may stand after the options as well as before them
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"bigsid: config error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # TeacherError, CheckpointError, DataError, ScheduleError: bad input, said plainly
        print(f"bigsid: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # TrainingError: the run stopped itself after checkpointing its last good state
        print(f"bigsid: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
