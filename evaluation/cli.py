"""`bigsid eval`: one command for every kind of evaluation.

    bigsid eval RUN_DIR                                   # a toy run: ground-truth metrics (eval.* keys of the run)
    bigsid eval RUN_DIR prompts=coco30k.txt fid.reference=val2014/ fid.inception=inception-2015-12-05.pt \\
        clip.weights=vit-g-14.bin aesthetic.head=sac+logos+ava1-l14-linearMSE.pth aesthetic.weights=vit-l-14.pt
    bigsid eval RUN_DIR sampler=teacher teacher_steps=25 guidance=7.5 ...   # the teacher's sampler, same prompts
    bigsid eval --compare RUN_DIR OTHER_RUN/eval/step-000010000
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from evaluation import generate, report
from evaluation.settings import EvalError, load_settings

log = logging.getLogger("evaluation")
RESULT_KEY = {"clip": "clip_score"}  # a metric's name in metrics.json, where it differs from its name in metrics=
SECTION = {"fid": "fid", "clip": "clip", "aesthetic": "aesthetic"}  # its settings; the reward models': "rewards"


def _metric(name: str, settings, device):
    """The metric object; it checks its weights files and packages when built, before any image is made."""
    from evaluation import clip, rewards

    if name == "fid":
        from evaluation.fid import FID

        return FID(settings.fid, device, settings.batch_size)
    cls = {"clip": clip.CLIPScore, "aesthetic": clip.AestheticScore, "imagereward": rewards.ImageReward,
           "pickscore": rewards.PickScore, "hpsv2": rewards.HPSv2}[name]
    return cls(settings, device, settings.allow_download)


def _toy(source: str, overrides: list[str], name: str) -> None:
    """eval/toy_metrics.json and its plot as training writes them, and eval/NAME/metrics.json."""
    from bigsid.cli import _report
    from evaluation import toy

    run_dir, metrics = toy.evaluate(source, overrides)
    _report(run_dir, metrics)
    path = report.write(run_dir / "eval" / (name or f"step-{metrics['step']:09d}"), toy.as_report(metrics, run_dir))
    print(f"wrote {path}")


def _default_metrics(source: str) -> list[str]:
    from bigsid import checkpoint, export
    from evaluation import toy

    path = Path(source)
    if export.is_export(path) or not path.is_dir():
        return ["fid", "clip", "aesthetic"]
    folder = export.find_checkpoint(path)
    return ["toy"] if toy.has_truth(checkpoint.read_state(folder)["config"]) else ["fid", "clip", "aesthetic"]


def evaluate(source: str, overrides: list[str]) -> Path | None:
    """Generate what is missing, score what is not scored yet with these settings; returns metrics.json (None on
    ranks other than 0)."""
    from bigsid.parallel.local import pick_device
    from evaluation.prompts import load_prompts
    from evaluation.rewards import Unavailable
    from evaluation.sources import load_source

    settings = load_settings([o for o in overrides if not o.startswith("eval.")])
    metrics = settings.metrics or _default_metrics(source)
    rank, world = generate.rank_and_world()
    if "toy" in metrics:
        if rank == 0:
            _toy(source, [o for o in overrides if o.startswith("eval.")], settings.name)
        metrics = [m for m in metrics if m != "toy"]
        if not metrics:
            return None
    src = load_source(source, settings)
    prompt_set = load_prompts(settings.prompts, settings.caption_key, src.sample_prompts)
    items = generate.plan(prompt_set.prompts, settings.num_images, settings.images_per_prompt, settings.seed)
    out = Path(settings.out) if settings.out else src.root / "eval" / (settings.name or src.default_name)
    spec = {"source": src.record, "prompts": prompt_set.origin, "prompts_sha256": prompt_set.sha256,
            "prompts_skipped": prompt_set.skipped, "num_images": len(items),
            "images_per_prompt": settings.images_per_prompt, "seeds": f"image i: noise seed {settings.seed} + i"}
    generate.check_spec(out, spec)
    done = report.read(out)
    scorers, skipped = {}, dict(done.get("skipped", {}))
    if rank == 0:
        device = pick_device(settings.device)
        for name in metrics:
            section = SECTION.get(name, "rewards")
            if (RESULT_KEY.get(name, name) in done.get("metrics", {})
                    and done["settings"][section] == dataclasses.asdict(settings)[section]):
                continue  # scored before with the same settings: a finished evaluation is not redone
            try:
                scorers[name] = _metric(name, settings, device)
                skipped.pop(name, None)
            except Unavailable as err:
                skipped[name] = str(err)
                log.warning("%s skipped: %s", name, err)
    made = generate.generate(src.load, items, out, src.record, settings.batch_size, rank, world)
    log.info("rank %d of %d: made %d images in %s", rank, world, made, out)
    if rank != 0:
        return None
    generate.wait_for_all(out, items)
    if made or not (out / generate.MANIFEST).is_file():
        generate.write_manifest(out, items)
    if done and not scorers and skipped == done.get("skipped", {}):
        return out / report.METRICS_FILE
    for start in range(0, len(items), settings.batch_size):
        batch = items[start:start + settings.batch_size]
        images = generate.load_images(out, batch)
        for scorer in scorers.values():
            scorer.update(images, [it.prompt for it in batch])
    results = dict(done.get("metrics", {}))
    for scorer in scorers.values():
        results |= scorer.result()
    generation = {k: v for k, v in spec.items() if k != "source"}
    return report.write(out, {"name": out.name, "source": src.record, "generation": generation, "metrics": results,
                              "skipped": skipped, "settings": dataclasses.asdict(settings)})


def main(args) -> int:
    if args.compare:
        print(report.compare(args.compare))
        return 0
    if args.source is None:
        raise EvalError("give a run directory, a checkpoint or an exported folder to evaluate, or --compare DIRS")
    path = evaluate(args.source, args.overrides)
    if path is not None:
        print(report.compare([str(path)]))
        print(f"wrote {path}")
    return 0
