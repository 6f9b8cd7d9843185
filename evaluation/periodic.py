"""A small evaluation during training, for teachers without an analytic truth: how a user sees a collapse early.

`bigsid train CONFIG ... --eval key=value ...` builds a TrainingEval from the same keys as `bigsid eval` and hands it
to the Trainer, which calls it at every train.eval_every steps (and at the start and end): every rank runs the EMA
generator on the same fixed prompts and noise (image i from seed `seed + i`, as `bigsid eval` makes it), rank 0
scores, and the Trainer logs eval/NAME to metrics.jsonl and TensorBoard. Each call also redraws
RUN_DIR/eval/training_curves.png, every metric against images seen (the SiD paper's falling FID curve), and records
the conventions in RUN_DIR/eval/training_eval.json. bigsid's training code never imports this module: it only
calls the object it is given."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from PIL import Image

from bigsid.parallel.local import pick_device
from evaluation import generate
from evaluation.prompts import load_prompts
from evaluation.settings import load_settings
from evaluation.sources import noise

DEFAULT_IMAGES = 2000


class TrainingEval:
    def __init__(self, cfg, overrides: list[str]):
        from evaluation.cli import _metric

        self.settings = load_settings(overrides)
        s = self.settings
        prompts = load_prompts(s.prompts, s.caption_key, list(cfg.eval.sample_prompts)).prompts
        self.items = generate.plan(prompts, s.num_images or DEFAULT_IMAGES, s.images_per_prompt, s.seed)
        self.scorers = []
        if generate.rank_and_world()[0] == 0:  # weights are checked and reference statistics cached before training
            device = pick_device(s.device, 0)
            self.scorers = [_metric(name, s, device) for name in s.metrics or ["fid", "clip", "aesthetic"]]

    def prompts(self) -> list[str]:
        """The prompts of the fixed image set, one per image."""
        return [it.prompt for it in self.items]

    def batches(self, latent_shape: tuple[int, ...]):
        """(prompts, noise) per batch of the fixed image set, the same on every rank and at every call."""
        for start in range(0, len(self.items), self.settings.batch_size):
            batch = self.items[start:start + self.settings.batch_size]
            yield [it.prompt for it in batch], noise(tuple(latent_shape), [it.seed for it in batch])

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        """uint8 images [N, H, W, 3] as the Trainer decodes them."""
        pil = [Image.fromarray(x) for x in images.numpy()]
        for scorer in self.scorers:
            scorer.update(pil, prompts)

    def result(self, run_dir: Path, nimg: int) -> dict[str, float]:
        reports = {}
        for scorer in self.scorers:
            reports |= scorer.result()
        values = {k: r["value"] for k, r in reports.items()}
        out = Path(run_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        conventions = {"images": len(self.items), "settings": dataclasses.asdict(self.settings),
                       "metrics": {k: r["convention"] for k, r in reports.items()}}
        generate.write_atomic(out / "training_eval.json", lambda tmp: tmp.write_text(json.dumps(conventions, indent=1)))
        plot(Path(run_dir), nimg, values, out / "training_curves.png")
        return values


def plot(run_dir: Path, nimg: int, values: dict[str, float], path: Path) -> None:
    """Each metric against images seen, from metrics.jsonl's eval/ rows and this call's values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history: dict[str, dict[int, float]] = {k: {} for k in values}
    log = run_dir / "metrics.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:  # a torn last line while training writes
            continue
        for k in values:
            if f"eval/{k}" in row:
                history[k][row["nimg"]] = row[f"eval/{k}"]
    fig, axes = plt.subplots(1, len(values), figsize=(4.5 * len(values), 3.5), squeeze=False)
    for ax, (k, v) in zip(axes[0], values.items()):
        points = sorted((history[k] | {nimg: v}).items())
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        if k in ("fid", "kid") and all(p[1] > 0 for p in points):
            ax.set_yscale("log")
        ax.set_xlabel("training images (nimg)")
        ax.set_title(k)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)

