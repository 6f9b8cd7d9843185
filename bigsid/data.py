"""Prompt streams: the teacher's toy vocabulary, a text file with one prompt per line, or webdataset tar shards.

Order. One global sequence of prompts, whatever the number of ranks: every rank reads all of it and the trainer
keeps its rank's slice of each global batch (prompts are a few bytes each; a shard that also holds images is read
whole by every rank, so pack caption-only shards with `bigsid data pack`). The same config thus gives the same
prompts on any number of ranks, and a checkpoint's position continues on any other. The sequence is read by one
stream per DataLoader worker (one stream when data.num_workers is 0). Each epoch, the streams draw one permutation
of the shards (text: of the lines) from (seed, epoch) and stream w of W takes every W-th entry, so no two streams
read the same prompt within an epoch, and each epoch reshuffles. Samples within a shard are shuffled too, from
(seed, epoch, shard). Prompts are taken from the streams round-robin, one at a time, so the sequence is a function
of (seed, num_workers, position), never of which worker is faster. A stream that ends its share of an epoch
waits for the others to end theirs (streams hold unequal shares where shards differ in size): every epoch passes
each prompt exactly once before the next begins.

Position. Per stream, the next item to read: shards (epoch, slot in the stream's shard list, sample in the
shard's shuffled order); text (epoch, index); vocab (draws). state_dict() holds the position after the last
prompt the trainer took from each worker, the round-robin pointer and the streams waiting at an epoch's end: what
workers prefetched does not count, and a restored stream restarts its workers from there.

Bad data is skipped (or, for over-long prompts, passed on and counted), counted per kind and per shard, and logged
once per kind and shard. Each problem travels with a prompt (the one before it in the same epoch, else the one
after), so stats() counts exactly the problems the trainer's prompts have passed, whatever workers read ahead.
The counts are part of state_dict(), so they run on across resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import lzma
import os
import tarfile
import time
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext
from webdataset.writer import ShardWriter

from bigsid.config import DataConfig

logger = logging.getLogger("bigsid.data")

# Every kind but "truncated" drops the item; the text encoder truncates over-long prompts itself.
ISSUES = {
    "bad_shard": "unreadable shard, or its tar data is corrupt or cut short; read what came before",
    "missing_caption": "skipped a sample without the caption field",
    "invalid_json": "skipped a sample whose JSON member does not parse",
    "invalid_utf8": "skipped a caption that is not valid UTF-8",
    "empty_caption": "skipped an empty or whitespace-only caption",
    "truncated": "passed on a prompt longer than the tokenizer's limit (the text encoder truncates it)",
}
REPAIRED = ("truncated",)

# What reading a shard can raise: I/O and pipe failures, cut-short compressed streams, bad tar data.
_READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error, lzma.LZMAError)
_SHARD_READS = 3  # tries at a pipe or remote shard whose read stops early (_read_shard)
_CHUNK = 256  # prompts per message from a loader worker: one inter-process hop per chunk, not per prompt
_VOCAB_BLOCK = 4096  # vocab draws come in seeded blocks, so any position is recomputed from its block alone
_PROBE_SHARDS, _PROBE_SAMPLES = 3, 16
# Tags keep the random streams apart: numpy pads short seed lists with zeros, so [s, e] equals [s, e, 0].
_SHARD_ORDER, _SAMPLE_ORDER, _LINE_ORDER, _VOCAB_DRAWS = range(1, 5)

_Issue = tuple[str, str, int, str]  # (kind, shard, count, the first one's detail)


class DataError(ValueError):
    """A prompt source the run cannot use. The message says what to change."""


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng([seed, *path])


def _fingerprint(items: Iterable[str]) -> str:
    digest = hashlib.sha1()
    for item in items:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:16]


class _Issues:
    """Problems met since the last prompt handed on, merged per (kind, shard): a shard of bad samples costs one
    entry, not one per sample."""

    def __init__(self):
        self._found: dict[tuple[str, str], list] = {}

    def add(self, kind: str, shard: str, detail: str) -> None:
        self._found.setdefault((kind, shard), [0, detail])[0] += 1

    def take(self) -> tuple[_Issue, ...]:
        found = tuple((kind, shard, count, detail) for (kind, shard), (count, detail) in self._found.items())
        self._found.clear()
        return found

    def summary(self) -> str:
        totals = Counter()
        for (kind, _), (count, _) in self._found.items():
            totals[kind] += count
        return ", ".join(f"{kind} {count}" for kind, count in totals.items()) or "none"


class _Record(NamedTuple):
    prompt: str
    shard: str  # where the prompt came from
    position: tuple[int, ...]  # the stream's position after this prompt and the problems it carries
    issues: tuple[_Issue, ...]
    last: bool = False  # the stream's last prompt of an epoch


# ---- captions ----

def _parse_caption_key(spec: str) -> tuple[str, str | None]:
    """"txt" -> ("txt", None); "json:caption" -> ("json", "caption")."""
    member, colon, field = spec.partition(":")
    if not member or (colon and (member.lower() != "json" or not field)):
        raise DataError(f"caption key {spec!r}: expected a member extension such as 'txt', or 'json:FIELD' for "
                        "the string under FIELD in each sample's .json member")
    return member.lower(), field or None


def _clean(text: object) -> tuple[str | None, str | None]:
    """(prompt, None), or (None, the problem's kind)."""
    if not isinstance(text, str):
        return None, "missing_caption"
    text = text.strip()
    return (text, None) if text else (None, "empty_caption")


def _caption(raw: bytes | None, field: str | None) -> tuple[str | None, str | None]:
    if raw is None:
        return None, "missing_caption"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if field is None:
        return _clean(text)
    try:
        value = json.loads(text)
    except ValueError:
        return None, "invalid_json"
    caption = value.get(field) if isinstance(value, dict) else None
    if isinstance(caption, str) and not caption.isascii():
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:  # a JSON escape such as \ud800 spells a lone surrogate, which tokenizers reject
            return None, "invalid_utf8"
    return _clean(caption)


# ---- shards ----

class _Sample(NamedTuple):
    key: str
    members: tuple[str, ...]  # the extensions present, for diagnostics
    prompt: str | None
    issue: str | None


class _StrictTarInfo(tarfile.TarInfo):
    """Python's tarfile ends an archive silently at a missing, cut or garbled header after the first; a shard cut
    short at a member boundary must count as bad, not pass for a smaller one. A whole one ends in zero blocks."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as err:
            raise tarfile.ReadError(f"corrupt or cut-short archive ({err})") from None


def _samples(url: str, member: str, field: str | None) -> Iterator[_Sample]:
    """The samples of one shard in file order. Members are grouped into samples by key as webdataset does; only
    the caption member's bytes are read, so images and pickles are never loaded, let alone decoded."""
    with contextlib.closing(gopen(url)) as stream, \
            tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as archive:
        key, members, raw = None, [], None
        try:
            for info in archive:
                archive.members = []  # stream mode keeps every header it reads otherwise
                name, ext = base_plus_ext(info.name)
                if not info.isreg() or name is None:
                    continue
                if name != key:
                    if key is not None:
                        yield _Sample(key, tuple(members), *_caption(raw, field))
                    key, members, raw = name, [], None
                members.append(ext := ext.lower())
                if ext == member:
                    raw = archive.extractfile(info).read()
        except _READ_ERRORS:
            # The sample in hand when the archive breaks off may miss members, but a caption read whole is a
            # prompt: a shard cut right after its last member keeps that member.
            if raw is not None:
                yield _Sample(key, tuple(members), *_caption(raw, field))
            raise
        if key is not None:
            yield _Sample(key, tuple(members), *_caption(raw, field))


def _read_shard(url: str, member: str, field: str | None) -> tuple[list[_Sample], str | None]:
    """The samples that could be read, and why reading stopped early (None if it did not).

    A pipe or remote shard whose read stops early is read again (after 1 s, then 2 s): a shard's order is drawn
    over the samples read, so a transient failure kept would change the sequence and the positions saved in it. A
    local file that stops early is damaged the same way each time."""
    attempts = 1 if _local_path(url) is not None else _SHARD_READS
    for attempt in range(attempts):
        samples = []
        try:
            for sample in _samples(url, member, field):
                samples.append(sample)
            return samples, None
        except _READ_ERRORS as err:
            error = f"{type(err).__name__}: {err}"
        if attempt + 1 < attempts:
            time.sleep(2 ** attempt)
    return samples, error


def _local_path(url: str) -> str | None:
    """The file a local shard URL names; None for pipes and remote URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    return url2pathname(parsed.path) if parsed.scheme == "file" else None


def _expand_shards(pattern: str) -> list[str]:
    shards = [url for url in expand_urls(pattern) if url]
    if not shards:
        raise DataError(f"shard pattern {pattern!r} names no shards: give tar shards as paths, brace ranges such "
                        "as /data/shard-{000000..000099}.tar, pipe: commands or URLs, joined with '::'")
    missing = [url for url in shards
               if (path := _local_path(url)) is not None and not (os.path.isfile(path) and os.access(path, os.R_OK))]
    if missing:
        raise DataError(f"shard pattern {pattern!r}: {len(missing)} of {len(shards)} shards are missing or "
                        f"unreadable, the first {missing[0]!r}; fix the path or the brace range")
    return shards


def _check_prompt_file(path: str) -> None:
    local = _local_path(path)
    if local is not None and not os.path.isfile(local):
        raise DataError(f"no such prompt file {path!r}: give a text file with one prompt per line")


def _describe(seen: list[_Sample], member: str) -> str:
    if not seen:
        return "no samples"
    kinds = Counter(sample.issue for sample in seen)
    found = sorted({ext for sample in seen for ext in sample.members})
    return (f"the first {len(seen)} samples have no usable caption ({', '.join(f'{k} {n}' for k, n in kinds.items())});"
            f" members found: {', '.join(found)}; the caption key reads '{member}'")


def _probe(shards: list[str], member: str, field: str | None) -> None:
    """Refuse shards whose first samples give no prompt at all: a wrong caption_key, a broken pipe: command or a
    wrong URL then fails at build time, not after a pass over every shard. One bad shard passes if another
    of the first few gives a prompt."""
    problems = []
    for url in shards[:_PROBE_SHARDS]:
        samples, seen = _samples(url, member, field), []
        try:
            for sample in islice(samples, _PROBE_SAMPLES):
                if sample.prompt is not None:
                    return
                seen.append(sample)
            problems.append(f"{url}: {_describe(seen, member)}")
        except _READ_ERRORS as err:
            problems.append(f"{url}: {type(err).__name__}: {err}")
        finally:
            with contextlib.suppress(*_READ_ERRORS):  # a pipe cut short may exit non-zero
                samples.close()
    raise DataError("no prompt in the first shards of data.path: " + "; ".join(problems) +
                    ". Check the shards and data.caption_key with `bigsid data inspect PATTERN --caption-key KEY`")


# ---- sources: picklable, each runs in the trainer's process or in a loader worker ----

class _ShardSource:
    kind, position_size = "webdataset", 3

    def __init__(self, pattern: str, caption_key: str, seed: int, num_streams: int):
        self.member, self.field = _parse_caption_key(caption_key)
        self.shards = _expand_shards(pattern)
        if len(self.shards) < num_streams:
            raise DataError(f"data.path = {pattern!r} has {len(self.shards)} shards for {num_streams} streams "
                            "(max(1, data.num_workers)), and each stream needs its own: lower "
                            "data.num_workers or write smaller shards (bigsid data pack --shard-size)")
        _probe(self.shards, self.member, self.field)
        self.seed, self.issues = seed, ()
        self.fingerprint = _fingerprint([caption_key, *self.shards])

    def records(self, stream: int, num_streams: int, position: tuple[int, ...]) -> Iterator[_Record]:
        epoch, slot, skip = position
        issues, held, fruitless = _Issues(), None, 0
        while True:
            mine = _rng(self.seed, _SHARD_ORDER, epoch).permutation(len(self.shards))[stream::num_streams]
            for slot in range(slot, len(mine)):
                url = self.shards[mine[slot]]
                samples, error = _read_shard(url, self.member, self.field)
                order = _rng(self.seed, _SAMPLE_ORDER, epoch, mine[slot]).permutation(len(samples))
                found = False
                for index in range(skip, len(order)):
                    sample = samples[order[index]]
                    if sample.prompt is None:
                        issues.add(sample.issue, url, f"sample {sample.key!r}")
                        continue
                    # A prompt is handed on once the next one is found, carrying the problems in between.
                    if held is not None:
                        yield held._replace(position=(epoch, slot, index), issues=held.issues + issues.take())
                    held, found = _Record(sample.prompt, url, (), issues.take()), True
                if error is not None:
                    issues.add("bad_shard", url, error)
                skip = 0
                fruitless = 0 if found else fruitless + 1
                if fruitless >= len(self.shards):
                    raise DataError(f"stream {stream} of {num_streams} read {fruitless} shards in a row without a "
                                    f"prompt ({issues.summary()}): the shards are bad or lack the caption; check them "
                                    "with `bigsid data inspect PATTERN --caption-key KEY`")
            if held is not None:
                yield held._replace(position=(epoch + 1, 0, 0), issues=held.issues + issues.take(), last=True)
                held = None
            epoch, slot = epoch + 1, 0


class _TextSource:
    kind, position_size = "text", 2

    def __init__(self, path: str, seed: int, num_streams: int):
        _check_prompt_file(path)
        try:
            with contextlib.closing(gopen(path)) as stream:
                lines = stream.read().splitlines()
        except _READ_ERRORS as err:
            raise DataError(f"data.path = {path!r} cannot be read: {err}") from None
        self.prompts, found = [], _Issues()
        for number, line in enumerate(lines, start=1):
            prompt, issue = _caption(line, None)
            if issue is None:
                self.prompts.append(prompt)
            else:
                found.add(issue, path, f"line {number}")
        if len(self.prompts) < num_streams:
            raise DataError(f"data.path = {path!r} has {len(self.prompts)} usable prompts for {num_streams} streams "
                            f"(max(1, data.num_workers)); problems: {found.summary()}")
        self.path, self.seed, self.issues = path, seed, found.take()
        self.fingerprint = _fingerprint(self.prompts)

    def records(self, stream: int, num_streams: int, position: tuple[int, ...]) -> Iterator[_Record]:
        epoch, index = position
        while True:
            mine = _rng(self.seed, _LINE_ORDER, epoch).permutation(len(self.prompts))[stream::num_streams]
            for index in range(index, len(mine)):
                yield _Record(self.prompts[mine[index]], self.path, (epoch, index + 1), (), index == len(mine) - 1)
            epoch, index = epoch + 1, 0


class _VocabSource:
    kind, position_size = "vocab", 1

    def __init__(self, vocabulary: list[str] | None, seed: int):
        if not vocabulary:
            raise DataError("data.source = 'vocab' draws from the teacher's toy prompt list, and this teacher has "
                            "none: set data.source to 'text' or 'webdataset' and data.path")
        self.prompts, self.seed, self.issues = list(vocabulary), seed, ()
        self.fingerprint = _fingerprint(self.prompts)

    def records(self, stream: int, num_streams: int, position: tuple[int, ...]) -> Iterator[_Record]:
        (drawn,) = position
        while True:
            block, offset = divmod(drawn, _VOCAB_BLOCK)
            choices = _rng(self.seed, _VOCAB_DRAWS, stream, block).integers(len(self.prompts), size=_VOCAB_BLOCK)
            for choice in choices[offset:]:
                drawn += 1
                yield _Record(self.prompts[choice], "vocabulary", (drawn,), ())


class _TokenLimit(NamedTuple):
    count: Callable[[str], int]
    max_tokens: int

    def check(self, records: Iterator[_Record]) -> Iterator[_Record]:
        for record in records:
            tokens = self.count(record.prompt)
            if tokens > self.max_tokens:
                truncated = ("truncated", record.shard, 1, f"{tokens} tokens > {self.max_tokens}")
                record = record._replace(issues=record.issues + (truncated,))
            yield record


def _as_is(chunk):
    return chunk


class _Streams(IterableDataset):
    """The streams of the sequence; in a DataLoader, each worker process iterates its own."""

    def __init__(self, source, limit: _TokenLimit | None, positions: list[tuple[int, ...]]):
        self.source, self.limit, self.positions = source, limit, positions

    def chunks(self, worker: int) -> Iterator[tuple[int, list[_Record]]]:
        records = self.source.records(worker, len(self.positions), self.positions[worker])
        if self.limit is not None:
            records = self.limit.check(records)
        while True:
            yield worker, list(islice(records, _CHUNK))

    def __iter__(self):
        return self.chunks(get_worker_info().id)


class PromptStream:
    """The global prompt sequence (see the module docstring for the order, the position and the counters).

    log_problems: log each kind of problem once per shard (one rank does; every rank counts)."""

    def __init__(self, source, limit: _TokenLimit | None, *, num_workers: int, log_problems: bool = True):
        self._source, self._limit, self._num_workers = source, limit, num_workers
        self._log_problems = log_problems
        # Resuming needs the same sequence: these must match between state_dict() and load_state_dict(). "order"
        # marks a position in the global sequence (states without it hold positions of per-rank streams).
        self._identity = {"order": "global", "source": source.kind, "fingerprint": source.fingerprint,
                          "seed": source.seed, "num_workers": num_workers}
        self._positions = [(0,) * source.position_size for _ in range(max(1, num_workers))]
        self._next_worker = 0
        self._waiting: set[int] = set()  # streams at the end of their share of the epoch, until all are
        self._chunks: Iterator[tuple[int, list[_Record]]] | None = None  # started on the first next_batch
        self._buffers: list[deque[_Record]] = []
        self._prompts = 0
        self._by_shard: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._logged: set[tuple[str, str]] = set()
        self._tally(source.issues)  # a text file's bad lines, found as it was loaded

    @property
    def prompts(self) -> list[str] | None:
        """Every prompt the sequence draws from, where the source holds them in a list (text, vocab); None for
        shards, which are read as they stream."""
        return getattr(self._source, "prompts", None)

    def next_batch(self, n: int) -> list[str]:
        if self._chunks is None:
            self._start()
        prompts = []
        for _ in range(n):
            worker = self._next_worker
            record = self._take(worker)
            self._positions[worker] = record.position
            if record.last:
                self._waiting.add(worker)
                if len(self._waiting) == len(self._positions):
                    self._waiting.clear()
            n = len(self._positions)
            self._next_worker = next(w % n for w in range(worker + 1, worker + 1 + n) if w % n not in self._waiting)
            self._tally(record.issues)
            prompts.append(record.prompt)
        self._prompts += len(prompts)
        return prompts

    def state_dict(self) -> dict:
        counts = {"prompts": self._prompts, "by_shard": {shard: dict(kinds) for shard, kinds in self._by_shard.items()}}
        return {**self._identity, "positions": [list(p) for p in self._positions], "next_worker": self._next_worker,
                "waiting": sorted(self._waiting), "counts": counts}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._identity.items():
            if state.get(key) != value:
                raise DataError(f"the saved prompt-stream position has {key} = {state.get(key)!r} and this stream "
                                f"{value!r}: an exact resume needs the same data source, seed and data.num_workers; "
                                "resume with the run's own config.yaml, or choose a new train.run_dir")
        # "waiting": absent from states saved before streams waited at an epoch's end
        positions, next_worker, waiting = state.get("positions"), state.get("next_worker"), state.get("waiting", [])
        well_formed = (isinstance(positions, list) and len(positions) == len(self._positions)
                       and all(isinstance(p, list) and len(p) == self._source.position_size
                               and all(type(i) is int and i >= 0 for i in p) for p in positions)
                       and type(next_worker) is int and 0 <= next_worker < len(positions)
                       and isinstance(waiting, list) and all(type(w) is int and 0 <= w < len(positions)
                                                             for w in waiting)
                       and next_worker not in waiting and len(set(waiting)) < len(positions))
        if not well_formed:
            raise DataError(f"malformed prompt-stream state: positions {positions!r}, next_worker {next_worker!r}, "
                            f"waiting {waiting!r}")
        self.load_counts([state])
        self.close()  # workers have read ahead of the old position
        self._positions, self._next_worker = [tuple(p) for p in positions], next_worker
        self._waiting = set(waiting)

    def load_counts(self, states: Iterable[dict]) -> None:
        """Take the summed bad-data counts of saved states as this stream's: the per-rank states of a checkpoint
        written before the order was global cannot be continued, but their counts, summed, run on."""
        counts = [_saved_counts(state) for state in states if "counts" in state]
        if not counts:  # states saved before counts were kept: counting goes on from here
            return
        self._prompts, self._by_shard = sum(prompts for prompts, _ in counts), defaultdict(Counter)
        for _, by_shard in counts:
            for shard, kinds in by_shard.items():
                self._by_shard[shard].update(kinds)

    def stats(self) -> dict:
        """{"prompts", "skipped": {kind: n}, "repaired": {kind: n}, "by_shard": {shard: {kind: n}}}, counted since
        the run began (a restored state brings its counts along)."""
        return _stats(self._prompts, self._by_shard)

    def close(self) -> None:
        """Stop the loader workers (dropping the DataLoader iterator shuts them down) and close open shards."""
        self._chunks, self._buffers = None, []

    def _start(self) -> None:
        streams = _Streams(self._source, self._limit, list(self._positions))
        self._buffers = [deque() for _ in self._positions]
        if self._num_workers == 0:
            self._chunks = streams.chunks(0)
        else:
            self._chunks = iter(DataLoader(streams, batch_size=None, num_workers=self._num_workers,
                                           collate_fn=_as_is))

    def _take(self, worker: int) -> _Record:
        buffer = self._buffers[worker]
        while not buffer:
            sender, records = next(self._chunks)
            self._buffers[sender].extend(records)
        return buffer.popleft()

    def _tally(self, issues: Iterable[_Issue]) -> None:
        for kind, shard, count, detail in issues:
            self._by_shard[shard][kind] += count
            if self._log_problems and (shard, kind) not in self._logged:
                self._logged.add((shard, kind))
                logger.warning("%s: %s (first: %s); further ones from this shard are counted in stats() only",
                               shard, ISSUES[kind], detail)


def _saved_counts(state: dict) -> tuple[int, dict[str, dict[str, int]]]:
    counts = state["counts"]
    by_shard = counts.get("by_shard") if isinstance(counts, dict) else None
    if not (isinstance(by_shard, dict) and type(counts.get("prompts")) is int and counts["prompts"] >= 0
            and all(isinstance(kinds, dict) and all(kind in ISSUES and type(n) is int and n >= 0
                                                    for kind, n in kinds.items()) for kinds in by_shard.values())):
        raise DataError(f"malformed prompt-stream state: counts should be {{'prompts': N, 'by_shard': {{shard: "
                        f"{{kind: N}}}}}} with kinds from {', '.join(ISSUES)}; got {str(counts)[:200]}")
    return counts["prompts"], by_shard


def _stats(prompts: int, by_shard: dict[str, Counter[str]]) -> dict:
    totals = sum(by_shard.values(), Counter())
    return {"prompts": prompts,
            "skipped": {kind: n for kind, n in totals.items() if kind not in REPAIRED},
            "repaired": {kind: n for kind, n in totals.items() if kind in REPAIRED},
            "by_shard": {shard: dict(kinds) for shard, kinds in by_shard.items()}}


def build_prompt_stream(cfg: DataConfig, *, seed: int, vocabulary: list[str] | None = None,
                        token_count: Callable[[str], int] | None = None, max_tokens: int | None = None,
                        log_problems: bool = True) -> PromptStream:
    """The global prompt sequence of (cfg, seed): the same on every rank, each keeping its slice of a batch.

    With token_count and max_tokens, prompts longer than max_tokens are counted as "truncated" (and passed on).
    With data.num_workers > 0, token_count runs in the workers (forked, so it needs no pickling on Linux).
    """
    num_streams = max(1, cfg.num_workers)
    if cfg.source == "vocab":
        source = _VocabSource(vocabulary, seed)
    elif cfg.source == "text":
        source = _TextSource(cfg.path, seed, num_streams)
    elif cfg.source == "webdataset":
        source = _ShardSource(cfg.path, cfg.caption_key, seed, num_streams)
    else:
        raise DataError(f"data.source = {cfg.source!r}: expected 'vocab', 'text' or 'webdataset'")
    limit = _TokenLimit(token_count, max_tokens) if token_count is not None and max_tokens is not None else None
    return PromptStream(source, limit, num_workers=cfg.num_workers, log_problems=log_problems)


# ---- pack and inspect ----

def _prompt_list(path: Path, field: str, issues: Counter[str]) -> Iterator[str]:
    """The prompts of a .txt (one per line), .jsonl (key `field`) or .parquet (column `field`) file; problems
    are counted into `issues`."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".parquet"):
        raise DataError(f"{path}: unknown prompt list format; use .txt (one prompt per line), .jsonl or .parquet")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as file:
        if suffix == ".parquet":
            found = (_clean(value) for value in _parquet_column(file, field))
        else:
            found = (_caption(line, field if suffix == ".jsonl" else None) for line in file)
        for prompt, issue in found:
            if issue is None:
                yield prompt
            else:
                issues[issue] += 1


def _parquet_column(file, column: str) -> Iterator[object]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading a .parquet prompt list needs pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(file)
    names = table.schema_arrow.names
    if column not in names:
        raise DataError(f"{file.name} has no column {column!r}; its columns: {', '.join(names)}")
    for batch in table.iter_batches(columns=[column]):
        yield from batch.column(0).to_pylist()


def pack(input_path: str | os.PathLike, out_dir: str | os.PathLike, *, caption_field: str = "txt",
         shard_size: int = 10000, input_field: str = "caption", force: bool = False) -> list[str]:
    """Write a prompt list as tar shards out_dir/shard-000000.tar, ... of `shard_size` samples each; the caption
    goes into the member `caption_field` (data.caption_key syntax: "txt" or "json:FIELD"). Empty and undecodable
    entries are skipped, counted and logged. An out_dir that is not empty is refused unless `force`, which replaces
    the shard-*.tar files of an earlier pack. Returns the shard paths."""
    member, field = _parse_caption_key(caption_field)
    if shard_size < 1:
        raise DataError(f"shard size {shard_size}: expected >= 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; give a folder for the shards")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"{out} is not empty: choose a new folder, or pass force=True (--force) to replace its shards")
    issues: Counter[str] = Counter()
    prompts = _prompt_list(Path(input_path), input_field, issues)
    first = next(prompts, None)
    if first is None:
        raise DataError(f"{input_path}: no prompts found ({dict(issues) or 'empty'})")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    shards: list[str] = []
    # encoder=False writes the bytes given and nothing else; mtime=0 makes the same input give the same shards.
    with ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, post=shards.append, verbose=0,
                     encoder=False, mtime=0) as writer:
        for index, prompt in enumerate(chain([first], prompts)):
            caption = json.dumps({field: prompt}) if field else prompt
            writer.write({"__key__": f"{index:09d}", member: caption.encode("utf-8")})
    if issues:
        logger.warning("%s: skipped %d entries (%s)", input_path, sum(issues.values()),
                       ", ".join(f"{kind} {n}" for kind, n in issues.items()))
    return shards


def inspect(pattern: str, caption_key: str = "txt", n: int = 5) -> dict:
    """Read every shard of `pattern`: counts of shards, samples, prompts, problems per kind (and per shard) and
    samples per member extension (to choose the caption key), why bad shards failed, and the first `n` prompts."""
    member, field = _parse_caption_key(caption_key)
    shards = _expand_shards(pattern)
    report = {"shards": len(shards), "samples": 0, "prompts": 0, "skipped": Counter(), "by_shard": {},
              "errors": {}, "members": Counter(), "examples": []}
    for url in shards:
        samples, error = _read_shard(url, member, field)
        kinds = Counter(sample.issue for sample in samples if sample.issue is not None)
        if error is not None:
            kinds["bad_shard"] += 1
            report["errors"][url] = error
        if kinds:
            report["by_shard"][url] = dict(kinds)
        report["skipped"].update(kinds)
        report["members"].update(ext for sample in samples for ext in set(sample.members))
        prompts = [sample.prompt for sample in samples if sample.prompt is not None]
        report["samples"] += len(samples)
        report["prompts"] += len(prompts)
        report["examples"].extend(prompts[:n - len(report["examples"])])
    report["skipped"], report["members"] = dict(report["skipped"]), dict(report["members"])
    return report


def add_cli(subparsers) -> None:
    """Register `data pack` and `data inspect`; each leaf sets func(args) -> exit status."""
    parser = subparsers.add_parser("data", help="pack prompt lists into shards; inspect shards")
    commands = parser.add_subparsers(dest="data_command", required=True)

    p = commands.add_parser("pack", help="write a .txt / .jsonl / .parquet prompt list as webdataset tar shards")
    p.add_argument("input", help=".txt (one prompt per line), .jsonl or .parquet")
    p.add_argument("out_dir", help="folder for shard-000000.tar, ... (must be new or empty unless --force)")
    p.add_argument("--shard-size", type=int, default=10000, help="prompts per shard (default 10000)")
    p.add_argument("--field", default="caption", help="the .jsonl key or .parquet column with the prompt")
    p.add_argument("--caption-key", default="txt", help="member to write: an extension such as txt, or json:FIELD")
    p.add_argument("--force", action="store_true", help="replace the shards of an earlier pack in OUT_DIR")
    p.set_defaults(func=_pack_command)

    p = commands.add_parser("inspect", help="count samples, prompts and bad items in shards; show a few prompts")
    p.add_argument("pattern", help="shards: paths, brace ranges, pipe: commands or URLs, joined with '::'")
    p.add_argument("--caption-key", default="txt", help="txt, or json:FIELD (as data.caption_key)")
    p.add_argument("-n", type=int, default=5, help="prompts to show (default 5)")
    p.set_defaults(func=_inspect_command)


def _pack_command(args: argparse.Namespace) -> int:
    shards = pack(args.input, args.out_dir, caption_field=args.caption_key, shard_size=args.shard_size,
                  input_field=args.field, force=args.force)
    pattern = shards[0] if len(shards) == 1 else str(Path(shards[0]).with_name(
        f"shard-{{000000..{len(shards) - 1:06d}}}.tar"))
    print(f"wrote {len(shards)} shards of up to {args.shard_size} prompts to {args.out_dir}")
    print(f"use: data.source=webdataset data.path='{pattern}' data.caption_key={args.caption_key}")
    return 0


def _inspect_command(args: argparse.Namespace) -> int:
    report = inspect(args.pattern, args.caption_key, args.n)
    print(f"{report['shards']} shards, {report['samples']} samples, {report['prompts']} prompts")
    print("samples per member: " + ", ".join(f"{ext} {n}" for ext, n in sorted(report["members"].items())))
    skipped = report["skipped"]
    print("problems: " + (", ".join(f"{kind} {n}" for kind, n in skipped.items()) if skipped else "none"))
    for url, kinds in report["by_shard"].items():
        print(f"  {url}: {', '.join(f'{kind} {n}' for kind, n in kinds.items())}")
        if url in report["errors"]:
            print(f"    {report['errors'][url]}")
    print("first prompts:")
    for prompt in report["examples"]:
        print(f"  {prompt}")
    return 0 if report["prompts"] else 1
