"""Checkpoints that are complete or absent, and verified before they are used.

A checkpoint is written into `step-N.partial/`, then a manifest of every file's size and SHA-256, then a
COMPLETE marker, then renamed to `step-N/`: a killed writer leaves only a `.partial` folder, which resume
ignores (and the next save of that step replaces). A complete checkpoint whose files no longer match its
manifest (a truncated or replaced file on shared storage) is named and set aside as `step-N.damaged/`, and the
previous one is used. Checksums are computed and verified in shares, one per rank, so a large sharded
checkpoint costs each rank only its share of reading.

What a manifest cannot stop is a file written on purpose together with a matching manifest: every reader of a
checkpoint therefore parses (safetensors, JSON, weights_only torch files, an allow-listed DCP metadata
unpickler) and never runs what it reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
STATE = "train_state.json"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d+)(\.replaced)?$")
_CHUNK = 1 << 24

log = logging.getLogger("bigsid.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used by this run; the message says why and what to do."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:09d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        if (m := _NAME.match(p.name)) and (p / MARKER).is_file():
            # step-N.replaced is the old copy of a step written again (commit): used only if step-N is not in place
            step = int(m.group(1))
            if m.group(2) is None or step not in found:
                found[step] = p
    return [found[step] for step in sorted(found)]


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


def files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder the manifest covers, as sorted relative paths."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MARKER, MANIFEST))


def digest(folder: Path, names: list[str]) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of the named files."""
    out = {}
    for name in names:
        h, size = hashlib.sha256(), 0
        with open(Path(folder) / name, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        out[name] = {"size": size, "sha256": h.hexdigest()}
    return out


def commit(partial: Path, state: dict, keep: int, digests: dict[str, dict] | None = None) -> Path:
    """Write the train state and the manifest, mark complete, rename into place, drop the oldest beyond `keep`.

    digests: the already computed checksums of the backend's files (by every rank, each its share); any file not
    in it is hashed here."""
    (partial / STATE).write_text(json.dumps(state, indent=1))
    digests = dict(digests or {})
    digests |= digest(partial, [n for n in files(partial) if n not in digests])
    (partial / MANIFEST).write_text(json.dumps(digests, indent=1, sort_keys=True))
    (partial / MARKER).write_text("")
    final = partial.with_suffix("")
    # A step written again (a finished run restarted): the old copy stays complete, set aside, until the new one is
    # in place, so a crash in between leaves one of them where resume looks (complete_checkpoints).
    replaced = final.with_suffix(".replaced")
    if final.exists():
        if replaced.exists():
            shutil.rmtree(replaced)
        final.rename(replaced)
    partial.rename(final)
    if replaced.exists():
        shutil.rmtree(replaced)
    for old in complete_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old)
    return final


def verify(folder: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with this rank's share of a complete checkpoint's files ([] when they match the manifest).

    A checkpoint from before manifests were written has none: it is used unverified, with a warning."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        if rank == 0:
            log.warning("%s has no %s (written before checkpoints carried one): its files are not verified",
                        folder, MANIFEST)
        return []
    except (OSError, ValueError) as err:  # ValueError: not JSON, not even text
        return [f"{MANIFEST} is unreadable ({type(err).__name__})"]
    if not isinstance(manifest, dict):
        return [f"{MANIFEST} is not a JSON object"]
    problems = []
    for name in sorted(manifest)[rank::world_size]:
        expected, path = manifest[name], folder / name
        if not isinstance(expected, dict) or not path.resolve().is_relative_to(folder.resolve()):
            problems.append(f"{MANIFEST} lists {name!r}, which is no file of this checkpoint")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected.get("size"):
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {expected.get('size')}")
        elif digest(folder, [name])[name]["sha256"] != expected.get("sha256"):
            problems.append(f"{name} does not match its checksum (changed after it was written)")
    return problems


def set_aside(folder: Path, problems: list[str]) -> Path:
    """Rename a damaged checkpoint out of resume's sight (never delete what a person may want to inspect)."""
    folder = Path(folder)
    target = folder.with_name(folder.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged{n}")
    folder.rename(target)
    (target / "DAMAGED.txt").write_text("".join(p + "\n" for p in problems))
    return target


def newest_usable(path: Path, problems_of=verify, on_damaged=None) -> Path | None:
    """`path` if it is a complete checkpoint, else the newest complete checkpoint of a run directory, whose files
    match its manifest; None when there is no complete checkpoint at all.

    problems_of(folder) -> what is wrong with it ([] if nothing); on_damaged(folder, problems) -> where the damaged
    checkpoint now is (set aside, or left in place by readers that must not change a run). Raises when every
    complete checkpoint is damaged: starting over would silently throw the run away."""
    path = Path(path)
    candidates = [path] if (path / MARKER).is_file() else complete_checkpoints(path)[::-1]
    damaged = []
    for folder in candidates:
        problems = problems_of(folder)
        if not problems:
            if damaged:
                log.warning("using %s, the newest intact checkpoint", folder)
            return folder
        log.warning("checkpoint %s is damaged: %s", folder, "; ".join(problems))
        damaged.append((on_damaged(folder, problems) if on_damaged else folder, problems))
    if damaged:
        listing = "; ".join(f"{f}: {', '.join(p)}" for f, p in damaged)
        raise CheckpointError(f"no usable checkpoint in {path}, every complete one is damaged ({listing}). Restore "
                              "the files from a copy, or start anew with another train.run_dir")
    return None


@contextlib.contextmanager
def reading(path: Path):
    """Any failure to parse a checkpoint file becomes a CheckpointError that names the file."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - a parser's own exception types vary; the file is what matters
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(err).__name__}: {first[:300]}. The file is "
                              "damaged or was not written by bigsid; move its checkpoint folder away to resume "
                              "from an older one") from None


def read_rank_state(folder: Path, rank: int) -> dict | None:
    """A rank's own saved tensors (its RNG state), or None if that rank wrote none."""
    from safetensors.torch import load_file

    own = Path(folder) / f"rank{rank}.safetensors"
    if not own.is_file():
        return None
    with reading(own):
        return load_file(own)


def read_state(folder: Path) -> dict:
    path = Path(folder) / STATE
    with reading(path):
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not {"step", "nimg", "skipped", "data", "config"} <= state.keys():
            raise CheckpointError(f"{path} is not a bigsid train state")
    return state
