"""Images for evaluation, sharded over ranks and resumable.

Image i shows prompt i // images_per_prompt from noise seed `seed + i`: a function of the index alone, so any
subset, order or number of ranks gives the same image for the same index. Rank r of W makes the indices with
i % W == r that are not on disk yet. Each image is written to a temporary name and renamed into place, then its
record (index, prompt, seed, source, step) the same way: an index is done once its record exists, so a killed
evaluation leaves nothing half-written and the next one continues where it stopped. Ranks need no process group:
rank 0 scores once every record is on disk, whoever wrote it (torchrun, srun, or separate jobs)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from evaluation.settings import EvalError

log = logging.getLogger("evaluation.generate")
IMAGES = "images"
MANIFEST = "manifest.jsonl"
SPEC = "generation.json"


@dataclass(frozen=True)
class Item:
    index: int
    prompt: str
    seed: int


def plan(prompts: list[str], num_images: int, images_per_prompt: int, seed: int) -> list[Item]:
    """num_images (0: every prompt images_per_prompt times) items; prompts repeat if there are fewer."""
    total = num_images or len(prompts) * images_per_prompt
    return [Item(i, prompts[(i // images_per_prompt) % len(prompts)], seed + i) for i in range(total)]


def rank_and_world() -> tuple[int, int]:
    """From torchrun's environment, else srun's, else one process."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    tasks = int(os.environ.get("SLURM_NTASKS", 1))
    if tasks == 1:
        return 0, 1
    # sbatch --ntasks=N and salloc export SLURM_NTASKS to the one process of their script too; only srun starts the
    # N tasks, each in a job step. Taken as rank 0 of N, that process would wait forever for the others' images.
    if "SLURM_STEP_ID" not in os.environ:
        raise EvalError(f"SLURM_NTASKS={tasks} but this process is no task of an srun job step (no SLURM_STEP_ID), "
                        "so no other task makes its share of the images: start it as `srun bigsid eval ...` (as "
                        "slurm/eval.sbatch does), or under torchrun, or give the job --ntasks=1")
    return int(os.environ.get("SLURM_PROCID", 0)), tasks


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` then rename: readers see the whole file or none. The name is unique per process."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _record_path(out: Path, index: int) -> Path:
    return out / IMAGES / f"{index:06d}.json"


def image_path(out: Path, index: int) -> Path:
    return out / IMAGES / f"{index:06d}.png"


def check_spec(out: Path, spec: dict) -> None:
    """Record what the images are made of; refuse to add to a folder made of something else."""
    path = out / SPEC
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} there, {spec.get(k)!r} now" for k in sorted(set(old) | set(spec))
                   if old.get(k) != spec.get(k)]
        if changed:
            raise EvalError(f"{out} holds images made with other settings ({'; '.join(changed[:3])}); choose another "
                            "name= or out=. Nothing there was changed")
        return
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(spec, indent=1)))


def generate(load, items: list[Item], out: Path, record: dict, batch_size: int, rank: int, world: int) -> int:
    """Make this rank's missing images (loading the networks only if some are missing); returns how many."""
    todo = [it for it in items if it.index % world == rank and not _record_path(out, it.index).is_file()]
    generate_fn = load() if todo else None
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        images = generate_fn([it.prompt for it in batch], [it.seed for it in batch])
        for it, image in zip(batch, images):
            write_atomic(image_path(out, it.index), lambda tmp: image.save(tmp, format="PNG"))
            row = {"index": it.index, "prompt": it.prompt, "seed": it.seed, "source": record.get("kind"),
                   "step": record.get("step")}
            write_atomic(_record_path(out, it.index), lambda tmp: tmp.write_text(json.dumps(row)))
        log.info("rank %d: %d of its %d missing images written", rank, start + len(batch), len(todo))
    return len(todo)


def wait_for_all(out: Path, items: list[Item], poll_s: float = 10.0) -> None:
    """Until every item's record exists: the other ranks' shares."""
    missing = [it.index for it in items]
    while True:
        missing = [i for i in missing if not _record_path(out, i).is_file()]
        if not missing:
            return
        log.info("waiting for %d images from other ranks (first missing: %d)", len(missing), missing[0])
        time.sleep(poll_s)


def write_manifest(out: Path, items: list[Item]) -> Path:
    """manifest.jsonl, one record a line in index order, from the per-image records; stray temporaries go."""
    lines = [_record_path(out, it.index).read_text() for it in items]
    path = out / MANIFEST
    write_atomic(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    for tmp in (out / IMAGES).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    return path


def load_images(out: Path, items: list[Item]) -> list[Image.Image]:
    return [Image.open(image_path(out, it.index)).convert("RGB") for it in items]
