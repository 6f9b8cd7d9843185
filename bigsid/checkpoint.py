"""Checkpoints that are complete or absent.

A checkpoint is written into `step-N.partial/`, then a COMPLETE marker, then renamed to `step-N/`: a killed
writer leaves only a `.partial` folder, which resume ignores (and the next save of that step replaces).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
STATE = "train_state.json"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used by this run; the message says why and what to do."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:09d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or `path` itself if it is a complete checkpoint."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    found = complete_checkpoints(path)
    return found[-1] if found else None


def begin(run_dir: Path, step: int) -> Path:
    partial = checkpoint_dir(run_dir, step).with_suffix(".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit(partial: Path, state: dict, keep: int) -> Path:
    (partial / STATE).write_text(json.dumps(state, indent=1))
    (partial / MARKER).write_text("")
    final = partial.with_suffix("")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    for old in complete_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old)
    return final


def read_state(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {folder} has no readable {STATE}: {err}") from None
