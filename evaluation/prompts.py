"""Prompt sets for evaluation: an ordered list whose index, not its position in a stream, names each image."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bigsid import data
from evaluation.settings import EvalError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class PromptSet:
    prompts: list[str]
    origin: str  # the file, the shard pattern, or the run's sample prompts
    skipped: dict  # problem kind -> count (empty lines, bad captions)

    @property
    def sha256(self) -> str:
        """Of the prompts themselves, so that two copies of the same caption list compare equal."""
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()


def _text_file(path: Path, caption_key: str) -> PromptSet:
    issues: Counter[str] = Counter()
    field = caption_key.partition(":")[2] or "caption"
    try:
        prompts = list(data._prompt_list(path, field, issues))
    except data.DataError as err:
        raise EvalError(f"prompts={path}: {err}") from None
    return PromptSet(prompts, str(path.resolve()), dict(issues))


def _shards(pattern: str, caption_key: str) -> PromptSet:
    """Every caption of every shard, in shard order and file order within a shard."""
    try:
        member, field = data._parse_caption_key(caption_key)
        shards = data._expand_shards(pattern)
    except data.DataError as err:
        raise EvalError(f"prompts={pattern}: {err}") from None
    prompts, issues = [], Counter()
    for url in shards:
        samples, error = data._read_shard(url, member, field)
        if error is not None:
            issues["bad_shard"] += 1
        for sample in samples:
            if sample.issue is None:
                prompts.append(sample.prompt)
            else:
                issues[sample.issue] += 1
    return PromptSet(prompts, pattern, dict(issues))


def load_prompts(spec: str, caption_key: str, run_prompts: list[str] | None) -> PromptSet:
    """`spec`: a text file (.txt one prompt a line; .jsonl / .parquet with caption_key json:FIELD), webdataset
    shards ('.tar' paths, brace ranges), or empty for `run_prompts` (the run's eval.sample_prompts)."""
    if not spec:
        if not run_prompts:
            raise EvalError("prompts is not set and the run has no sample prompts (eval.sample_prompts): pass "
                            "prompts=FILE, e.g. the 30k COCO-2014 caption list, one caption a line")
        found = PromptSet(list(run_prompts), "the run's sample prompts", {})
    elif Path(spec).suffix.lower() in TEXT_SUFFIXES:
        found = _text_file(Path(spec), caption_key)
    else:
        found = _shards(spec, caption_key)
    if not found.prompts:
        raise EvalError(f"prompts={spec or found.origin}: the prompt set is empty (problems: {found.skipped or 'none'})"
                        "; give a file with one prompt a line or shards with captions")
    return found
