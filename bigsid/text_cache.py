"""Text-encoder outputs computed once for a prompt set, read back in training instead of holding the encoders.

T5-XXL (PixArt, SD3) has 4.7 B parameters, 8.9 GiB in bf16, held on every GPU of a run only to turn prompts into
`Cond`. `bigsid encode-prompts CONFIG OUT` encodes every prompt the run can use, once, with the teacher family's own
PromptEncoder in the run's precision, and a run with data.text_cache=OUT loads no text encoder at all: a TextCache
stands where the PromptEncoder was and returns the Cond it returns, read from disk (bit for bit where the encoders'
kernels round a row alike at the batch size it was encoded in and the run's: on CPU, CLIP's pooled projection rounds
differently, by about an ulp, for 1-3 rows than for more).

The prompt set: every prompt of the data source (a text file's lines, every caption of every shard, the toy
vocabulary), eval.sample_prompts, a toy truth's prompts, and any `--extra` lists (the prompts of `--eval`).

OUT holds
  manifest.json              what made it (identity(): family, pipeline, T5 length, resolution, precision, the text
                             encoders' and tokenizers' configurations), the Cond fields, the shards and their sha256
  uncond.safetensors         the empty prompt's Cond (batch 1): guidance and the prompt drop
  shard-NNNNNN.safetensors   per prompt: the Cond fields as the encoder returns them (emb, and pooled, mask, size where
                             the family has them), `key` (the sha256 of the prompt's exact text) and `tokens` (its
                             token count, for the data stream's truncation count)
It is written to OUT.partial and renamed when complete, so a folder named OUT is always whole.

Lookup is by the prompt's text, never by position: the prompt stream, its order on any number of ranks and resume
work as without the cache. The cache's size is what the encoder returns, padding included (SD3's transformer attends
to T5's padding; PixArt's mask hides it but it is part of the Cond): PixArt-Sigma's 300 x 4096 bf16 tokens are
2.4 MiB a prompt, so a cache suits prompt sets up to some 10^5 - 10^6 prompts; rows are read from memory-mapped
shards as batches need them.

A run refuses a cache made for another teacher configuration, and before its first step any prompt it already
knows of (a text file's or a vocabulary's prompts, eval.sample_prompts, the --eval prompts) that the cache lacks; a
shard's prompt is checked when drawn. Checked at opening: every shard is there, of its recorded size, with a header
that parses and the recorded shapes; the sha256 in the manifest is for a full check by hand (sha256sum).
Export, `bigsid sample` and `bigsid eval` load the teacher's text encoders as before, so they take any prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bigsid.config import Config, load_config
from bigsid.text import Cond, _upload

log = logging.getLogger("bigsid.text_cache")

FORMAT = 1
MANIFEST, UNCOND = "manifest.json", "uncond.safetensors"
SHARD_BYTES = 1 << 30  # a shard's rows of Cond fields, by default
FIELDS = ("emb", "pooled", "mask", "size")  # Cond's tensor fields
# What a configuration file holds that does not change what the component computes: where it was read from and with
# which library version.
_VOLATILE = {"_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "tokenizer_file"}


class TextCacheError(ValueError):
    """A text cache the run cannot use, or cannot write; the message says what to do."""


def prompt_key(prompt: str) -> bytes:
    return hashlib.sha256(prompt.encode("utf-8")).digest()


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def _digest(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(cfg: Config) -> dict:
    """What fixes the Cond of a prompt, read from the teacher's configuration files alone (no weights): the family
    and pipeline, the T5 length, the resolution of the size conditioning, the precision the encoders run in, and a
    digest of each text encoder's and tokenizer's configuration. Weights of the same architecture retrained are not
    told apart; the manifest names the teacher's path and revision for that."""
    import diffusers
    from transformers import PretrainedConfig
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    from bigsid.families import _load, detect, pipeline_config, t5_length

    t = cfg.teacher
    index = pipeline_config(t.path, t.revision)
    family = detect(index, t.path)
    network = _load(getattr(diffusers, family.network_class).load_config, t.path, family.network, t.revision,
                    family.network)
    components = {}
    for name in family.encoders:
        tokenizer = "tokenizer" + name[len("text_encoder"):]
        config = _load(PretrainedConfig.get_config_dict, t.path, name, t.revision, f"text encoder {name}")[0]
        components[name] = _digest(config)
        components[tokenizer] = _digest(_load(get_tokenizer_config, t.path, tokenizer, t.revision, tokenizer))
    return {"family": family.name, "pipeline": index["_class_name"],
            "text_max_length": t5_length(family, index, t.text_max_length),
            "sample_size": int(network["sample_size"]),
            "precision": cfg.train.precision, "components": components}


def _mismatch(made: dict, run: dict) -> str | None:
    """What differs between the identity a cache was made with and this run's, in words; None if nothing."""
    what = {"family": "teacher family", "pipeline": "pipeline",
            "text_max_length": "T5 length (teacher.text_max_length)",
            "sample_size": "network sample_size (the size conditioning)",
            "precision": "train.precision (the encoders' dtype)"}
    for key, name in what.items():
        if made.get(key) != run[key]:
            return f"its {name} is {made.get(key)!r}, this run's {run[key]!r}"
    components = made.get("components", {})
    changed = sorted(set(components) ^ set(run["components"]) |
                     {k for k in run["components"] if components.get(k) != run["components"][k]})
    if changed:
        return f"the configurations of {', '.join(changed)} differ from this run's teacher's"
    return None


# ---- writing ----

def run_prompts(cfg: Config, extra: Sequence[str] = ()) -> list[str]:
    """Every prompt the run can encode, each once, in order of first appearance: the data source's, the sample grid's,
    a toy truth's, then those of the `extra` prompt lists (.txt one a line, .jsonl / .parquet with a `caption`)."""
    from bigsid import data, toy

    d, found, truth = cfg.data, [], toy.GMM.load(cfg.teacher.path)
    if d.source == "vocab" and truth is None:
        raise TextCacheError("data.source = 'vocab' draws from a toy teacher's prompt list, and this teacher has "
                             "none: set data.source to 'text' or 'webdataset' and data.path")
    if d.source == "text":
        found += data._TextSource(d.path, cfg.train.seed, 1).prompts
    elif d.source == "webdataset":
        member, field = data._parse_caption_key(d.caption_key)
        for url in data._expand_shards(d.path):
            samples, error = data._read_shard(url, member, field)
            if error is not None:  # the stream counts such a shard as bad and goes on: so does the cache
                log.warning("%s: %s; encoding the %d prompts read before it", url, error, len(samples))
            found += [s.prompt for s in samples if s.prompt is not None]
    found += [*cfg.eval.sample_prompts, *(truth.prompts if truth is not None else ())]
    for path in extra:
        try:
            found += data._prompt_list(Path(path), "caption", Counter())
        except data.DataError as err:
            raise TextCacheError(f"--extra {path}: {err}") from None
    return list(dict.fromkeys(found))


def _row_bytes(cond: Cond) -> int:
    return sum(x[0].numel() * x.element_size() for x in (getattr(cond, f) for f in FIELDS) if x is not None)


def _fields(cond: Cond) -> dict[str, torch.Tensor]:
    return {f: getattr(cond, f).contiguous().cpu() for f in FIELDS if getattr(cond, f) is not None}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def encode_prompts(cfg: Config, out: str | os.PathLike, *, extra: Sequence[str] = (), batch_size: int = 64,
                   shard_size: int = 0, device: str | None = None, force: bool = False) -> Path:
    """Encode the prompts of `cfg`'s run (run_prompts) with its teacher's PromptEncoder into the text cache `out`;
    `shard_size` prompts a shard (0: about SHARD_BYTES). Returns `out`."""
    from safetensors.torch import save_file

    from bigsid.families import detect, load_encoder, pipeline_config
    from bigsid.parallel.local import pick_device

    if cfg.teacher.kind != "diffusers":
        raise TextCacheError("the toy teacher (teacher.kind=toy_gmm) encodes prompts by a table lookup: there is "
                             "nothing to cache; text caches are for diffusers teachers")
    if batch_size < 1 or shard_size < 0:
        raise TextCacheError(f"batch size {batch_size} and shard size {shard_size}: expected >= 1 and >= 0")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TextCacheError(f"{out} is a file: give a folder for the text cache")
    if out.exists() and not force:
        raise TextCacheError(f"{out} exists: choose another folder, or pass --force to replace it once the new "
                             "cache is complete")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # a run that stopped before completing it: what it wrote is never used
        shutil.rmtree(partial)
    made = identity(cfg)
    prompts = run_prompts(cfg, extra)
    if not prompts:
        raise TextCacheError("the run has no prompt to encode: check data.source and data.path")
    t = cfg.teacher
    index = pipeline_config(t.path, t.revision)
    encoder = load_encoder(detect(index, t.path), index, t.path, t.revision, made["sample_size"], t.text_max_length)
    encoder.to(pick_device(device or cfg.train.device))
    if cfg.train.precision == "bf16":  # as models.build_networks casts the encoders of a bf16 run
        encoder.to(torch.bfloat16)
    log.info("encoding %d prompts with the %s text encoders into %s", len(prompts), made["pipeline"], out)
    partial.mkdir(parents=True)
    save_file(_fields(encoder.empty()), str(partial / UNCOND))
    shards, rows, shapes = [], [], {}

    def write():
        name = _shard_name(len(shards))
        tensors = {f: torch.cat([r[f] for r in rows]) for f in rows[0]}
        save_file(tensors, str(partial / name))
        shards.append({"file": name, "prompts": len(tensors["key"]), "bytes": (partial / name).stat().st_size,
                       "sha256": _sha256(partial / name)})
        log.info("wrote %s: %d of %d prompts encoded", name, count, len(prompts))
        rows.clear()

    count = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        cond = encoder(batch)
        fields = _fields(cond)
        shapes = {f: [list(x.shape[1:]), str(x.dtype).removeprefix("torch.")] for f, x in fields.items()}
        per_shard = shard_size or max(1, SHARD_BYTES // _row_bytes(cond))
        for i, prompt in enumerate(batch):
            rows.append({**{f: x[i:i + 1] for f, x in fields.items()},
                         "key": torch.frombuffer(bytearray(prompt_key(prompt)), dtype=torch.uint8)[None],
                         "tokens": torch.tensor([encoder.token_count(prompt)])})
            count += 1
            if len(rows) == per_shard:
                write()
    if rows:
        write()
    manifest = {"format": FORMAT, **made, "teacher": {"path": t.path, "revision": t.revision},
                "max_length": encoder.max_length, "prompts": len(prompts), "fields": shapes, "shards": shards}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


# ---- reading ----

class TextCache(nn.Module):
    """prompts -> Cond from a text cache, in place of the PromptEncoder (see the module docstring). Opening checks the
    cache against `run` (identity() of the run) and every shard's presence, size and header; it then holds an index
    of the prompts (their keys and token counts, ~200 bytes a prompt) and reads rows as batches need them."""

    def __init__(self, path: str | os.PathLike, run: dict):
        from safetensors import SafetensorError, safe_open

        super().__init__()
        self.path = Path(path)
        manifest = self._manifest()
        wrong = _mismatch(manifest, run)
        if wrong is not None:
            raise TextCacheError(f"the text cache {self.path} was made for another teacher configuration: {wrong}. "
                                 "Encode this run's prompts with `bigsid encode-prompts CONFIG OUT` (the run's own "
                                 "config and overrides), or set data.text_cache to the cache made for this teacher")
        self.fields = {f: shape for f, (shape, _) in manifest["fields"].items()}
        self.max_length = manifest["max_length"]
        self.shards = [self.path / s["file"] for s in manifest["shards"]]
        self.rows: dict[bytes, tuple[int, int, int]] = {}  # key -> (shard, row, tokens)
        self._open: dict[int, object] = {}
        for number, (shard, entry) in enumerate(zip(self.shards, manifest["shards"])):
            size = shard.stat().st_size if shard.is_file() else None
            if size != entry["bytes"]:
                self._damaged(shard, "is missing" if size is None else f"has {size} bytes, not {entry['bytes']}")
            try:
                with safe_open(str(shard), "pt") as file:
                    expected = {**{f: [entry["prompts"], *shape] for f, shape in self.fields.items()},
                                "key": [entry["prompts"], 32], "tokens": [entry["prompts"]]}
                    found = {name: file.get_slice(name).get_shape() for name in file.keys()}
                    if found != expected:
                        self._damaged(shard, f"holds tensors {found}, not {expected}")
                    keys, tokens = file.get_tensor("key"), file.get_tensor("tokens").tolist()
            except (SafetensorError, OSError) as err:
                self._damaged(shard, f"cannot be read ({err})")
            for row, (key, count) in enumerate(zip(keys.numpy(), tokens)):
                self.rows[key.tobytes()] = (number, row, count)
        if len(self.rows) != manifest["prompts"]:
            self._damaged(self.path, f"holds {len(self.rows)} distinct prompts, its manifest {manifest['prompts']}")
        try:
            with safe_open(str(self.path / UNCOND), "pt") as file:
                uncond = {name: file.get_tensor(name) for name in file.keys()}
        except (SafetensorError, OSError) as err:
            self._damaged(self.path / UNCOND, f"cannot be read ({err})")
        if set(uncond) != set(self.fields):
            self._damaged(self.path / UNCOND, f"holds {sorted(uncond)}, not {sorted(self.fields)}")
        for name, x in uncond.items():  # buffers: they follow the module to the run's device
            self.register_buffer(f"uncond_{name}", x, persistent=False)

    def _manifest(self) -> dict:
        file = self.path / MANIFEST
        if not file.is_file():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f" ({partial} is an encoding that did not complete)" if partial.exists() else ""
            raise TextCacheError(f"data.text_cache = {str(self.path)!r} is no text cache: it has no {MANIFEST}{hint}."
                                 " Make one with `bigsid encode-prompts CONFIG OUT`")
        try:
            manifest = json.loads(file.read_text())
        except (ValueError, OSError) as err:
            self._damaged(file, f"does not parse ({err})")
        if manifest.get("format") != FORMAT:
            raise TextCacheError(f"the text cache {self.path} has format {manifest.get('format')!r}; this bigsid "
                                 f"reads format {FORMAT}: encode the prompts again with `bigsid encode-prompts`")
        return manifest

    def _damaged(self, what: Path, problem: str):
        raise TextCacheError(f"the text cache {self.path} is damaged: {what} {problem}. Encode the prompts again "
                             "with `bigsid encode-prompts CONFIG OUT` (the run's config and overrides)")

    @property
    def device(self) -> torch.device:
        return self.uncond_emb.device

    def token_count(self, prompt: str) -> int:
        """Tokens of `prompt` as the teacher's first tokenizer counts them (0 for a prompt not in the cache, which
        the encoding then refuses)."""
        return self.rows.get(prompt_key(prompt), (0, 0, 0))[2]

    def missing(self, prompts) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if prompt_key(p) not in self.rows]

    def require(self, prompts, what: str) -> None:
        """Refuse now, naming a few, if any of `prompts` (`what` they are) is not in the cache."""
        missing = self.missing(prompts)
        if missing:
            raise TextCacheError(f"{what}: {len(missing)} not in the text cache {self.path}, e.g. "
                                 f"{', '.join(repr(p[:80]) for p in missing[:3])}. {self._advice}")

    _advice = ("The prompt set changed since the cache was made: encode it again with `bigsid encode-prompts CONFIG "
               "OUT` (--extra FILE for prompts outside the data source, such as those of --eval), or train without "
               "data.text_cache")

    def _shard(self, number: int):
        from safetensors import safe_open

        if number not in self._open:
            self._open[number] = safe_open(str(self.shards[number]), "pt")
        return self._open[number]

    def forward(self, prompts: list[str]) -> Cond:
        from safetensors import SafetensorError

        self.require(prompts, "this batch's prompts")
        rows = [self.rows[prompt_key(p)] for p in prompts]
        out = {}
        for name in self.fields:
            try:
                parts = [self._shard(shard).get_slice(name)[row:row + 1] for shard, row, _ in rows]
            except (SafetensorError, OSError) as err:
                self._damaged(self.path, f"could not be read ({err})")
            out[name] = _upload(torch.cat(parts), self.device)
        uncond = Cond(**{f: getattr(self, f"uncond_{f}") for f in self.fields})
        return Cond(**out, uncond=uncond)


# ---- command line ----

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("encode-prompts", help="encode a run's prompts once into a text cache "
                              "(data.text_cache), so that training loads no text encoder")
    p.add_argument("config", help="the run's YAML config, or - for the defaults")
    p.add_argument("out", help="the cache folder to write (refused if it exists, unless --force)")
    p.add_argument("overrides", nargs="*", help="the run's section.key=value overrides (not after --extra, "
                   "which takes every word after it)")
    p.add_argument("--extra", nargs="+", default=[], metavar="FILE", help="more prompt lists to include (.txt one "
                   "prompt a line, .jsonl / .parquet with a caption field): e.g. the prompts of train --eval")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per encoder call (default 64)")
    p.add_argument("--shard-size", type=int, default=0, help="prompts per shard (default: about 1 GiB of rows)")
    p.add_argument("--device", default=None, help="where to encode (default: the config's train.device)")
    p.add_argument("--force", action="store_true", help="replace OUT once the new cache is complete")
    p.set_defaults(func=_encode_command)


def _encode_command(args: argparse.Namespace) -> int:
    # the run's config may already name the cache it is about to get: it is written, not read, here
    cfg = load_config(None if args.config == "-" else args.config, [*args.overrides, "data.text_cache="])
    out = encode_prompts(cfg, args.out, extra=args.extra, batch_size=args.batch_size, shard_size=args.shard_size,
                         device=args.device, force=args.force)
    manifest = json.loads((out / MANIFEST).read_text())
    print(f"wrote {manifest['prompts']} prompts in {len(manifest['shards'])} shards to {out}")
    print(f"use: data.text_cache={out}")
    return 0
