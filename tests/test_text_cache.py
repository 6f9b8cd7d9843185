"""Text caches (bigsid/text_cache.py) on tiny pipelines: the cached Cond is the live encoder's bit for bit (PixArt: T5
with mask and size conditioning; SD3: three encoders, pooled), a run reads it without loading any text encoder and
takes exactly the steps it takes without it, and a cache that does not fit the run is refused with what to do."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from bigsid.cli import main
from bigsid.config import ConfigError, load_config
from bigsid.families import load_teacher
from bigsid.text_cache import TextCache, TextCacheError, encode_prompts, identity
from bigsid.tiny import build_pipeline
from bigsid.trainer import Trainer
from test_families import overrides
from test_parallel import assert_same_loss, launch, losses

PROMPTS = ["a red cube", "two cats on a sofa", "A Blue Ball", "x"]
FIELDS = ("emb", "pooled", "mask", "size")


@pytest.fixture(scope="module", params=["pixart", "sd3"])
def family_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    build_pipeline(request.param).save_pretrained(folder)
    return request.param, folder


def run_config(name, folder, tmp_path, *extra, prompts=PROMPTS):
    return load_config(None, overrides(name, folder, tmp_path, *extra, prompts=prompts))


def assert_same_cond(cached, live):
    for field in FIELDS:
        for a, b in ((getattr(cached, field), getattr(live, field)),
                     (getattr(cached.uncond, field), getattr(live.uncond, field))):
            assert (a is None) == (b is None), field
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), field


@torch.no_grad()
def test_cached_cond_is_the_live_encoders_bit_for_bit(family_dir, tmp_path):
    """Rows read back from shards (three prompts a shard, so a batch spans two) in any order and with repeats are
    the live encoder's output for the same batch. The batch size is the one encoded with: some of the encoders'
    kernels choose their blocking by it (CLIP's pooled projection rounds differently for 1-3 rows than for 4 on
    this CPU), and each row of a batch of that size is computed alike whatever the other rows."""
    name, folder = family_dir
    cfg = run_config(name, folder, tmp_path, "eval.sample_prompts=[hello world]")
    out = encode_prompts(cfg, tmp_path / "cache", batch_size=4, shard_size=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == 5 and [s["prompts"] for s in manifest["shards"]] == [3, 2]
    assert manifest["family"] == name and not (tmp_path / "cache.partial").exists()
    cache = TextCache(out, identity(cfg))
    live = load_teacher(str(folder)).encoder
    for batch in (PROMPTS, [PROMPTS[3], PROMPTS[0], PROMPTS[3], PROMPTS[1]]):
        assert_same_cond(cache(batch), live(batch))
    assert cache.missing(["hello world", *PROMPTS]) == []
    assert cache.max_length == live.max_length
    assert [cache.token_count(p) for p in PROMPTS] == [live.token_count(p) for p in PROMPTS]
    assert list(cache.parameters()) == []


def test_training_reads_the_cache_loads_no_text_encoder_and_takes_the_same_steps(family_dir, tmp_path, monkeypatch):
    """Two steps on batches of 4, encoded in batches of 4 (see above): the same losses exactly. With the cache no
    text encoder is loaded at all: loading one raises here."""
    import transformers

    name, folder = family_dir
    Trainer(run_config(name, folder, tmp_path / "live")).run()
    cfg = run_config(name, folder, tmp_path / "cached")
    encode_prompts(cfg, tmp_path / "cache", batch_size=4)

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__} loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    trainer = Trainer(run_config(name, folder, tmp_path / "cached", f"data.text_cache={tmp_path / 'cache'}"))
    assert isinstance(trainer.networks.encoder, TextCache)
    trainer.run()
    expected = losses(tmp_path / "live" / "run")
    assert expected.shape == (2, 2) and torch.equal(losses(tmp_path / "cached" / "run"), expected)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """A tiny PixArt pipeline and the cache of PROMPTS made for it."""
    tmp = tmp_path_factory.mktemp("pixart_cache")
    build_pipeline("pixart").save_pretrained(tmp / "pipe")
    cfg = run_config("pixart", tmp / "pipe", tmp / "made")
    return tmp / "pipe", encode_prompts(cfg, tmp / "cache", shard_size=2)


def test_two_ranks_read_their_share_of_each_batch_from_the_cache(pixart, tmp_path):
    """The prompt order is global: 2 ddp ranks, each reading its half of every batch from the cache, take the steps
    of one process that encodes as it goes (test_parallel.assert_same_loss argues the tolerance)."""
    folder, cache = pixart
    Trainer(run_config("pixart", folder, tmp_path / "live")).run()
    launch(2, overrides("pixart", folder, tmp_path / "ddp", "parallel.backend=ddp", f"data.text_cache={cache}",
                        prompts=PROMPTS))
    expected = losses(tmp_path / "live" / "run")
    assert expected.shape == (2, 2)
    assert_same_loss(losses(tmp_path / "ddp" / "run"), expected)


def test_the_cache_holds_every_prompt_the_run_can_encode_once(teacher_dir, tmp_path):
    """Every caption of every shard (a webdataset source), the sample-grid prompts, the toy truth's prompts and the
    --extra lists, each once."""
    from bigsid.data import pack
    from bigsid.toy import GMM

    captions = [f"caption {i}" for i in range(5)]
    (tmp_path / "captions.txt").write_text("\n".join([*captions, captions[0]]))
    pack(tmp_path / "captions.txt", tmp_path / "shards", shard_size=2)
    (tmp_path / "extra.txt").write_text("an eval prompt\ncaption 1\n")
    cfg = load_config(None, ["teacher.kind=diffusers", f"teacher.path={teacher_dir}", "data.source=webdataset",
                             f"data.path={tmp_path / 'shards'}/shard-{{000000..000002}}.tar",
                             "eval.sample_prompts=[a sample prompt, caption 2]"])
    out = encode_prompts(cfg, tmp_path / "cache", extra=[str(tmp_path / "extra.txt")])
    expected = {*captions, "a sample prompt", "an eval prompt", *GMM.load(teacher_dir).prompts}
    cache = TextCache(out, identity(cfg))
    assert len(cache.rows) == len(expected) and cache.missing(expected) == []


def test_a_cache_of_another_teacher_configuration_is_refused(pixart, teacher_dir, tmp_path):
    folder, cache = pixart
    for extra, what in ((["teacher.text_max_length=16"], "T5 length"),
                        (["train.precision=bf16"], "train.precision")):
        with pytest.raises(TextCacheError, match=f"another teacher configuration: its {what}.*encode-prompts"):
            TextCache(cache, identity(run_config("pixart", folder, tmp_path, *extra)))
    # the toy SD teacher (one CLIP): a cache made for it, given to the PixArt run
    sd = run_config("sd", teacher_dir, tmp_path / "sd", "data.source=vocab")
    assert main(["encode-prompts", "-", str(tmp_path / "sd_cache"), *overrides("sd", teacher_dir, tmp_path / "sd"),
                 "data.source=vocab"]) == 0
    TextCache(tmp_path / "sd_cache", identity(sd))
    with pytest.raises(TextCacheError, match="teacher family is 'sd', this run's 'pixart'"):
        TextCache(tmp_path / "sd_cache", identity(run_config("pixart", folder, tmp_path)))


def test_prompts_missing_from_the_cache_are_refused_before_the_first_step(pixart, tmp_path):
    folder, cache = pixart
    cfg = run_config("pixart", folder, tmp_path)
    with pytest.raises(TextCacheError, match="this batch's prompts: 1 not in the text cache.*'never encoded'"
                                             ".*encode-prompts"):
        TextCache(cache, identity(cfg))(["a red cube", "never encoded"])
    for extra, prompts, what in (([], [*PROMPTS, "a new line"], "the prompts of data.source = text"),
                                 (["eval.sample_prompts=[a new one]"], PROMPTS, "the sample-grid prompts")):
        with pytest.raises(TextCacheError, match=f"{what}.*: 1 not in the text cache"):
            Trainer(run_config("pixart", folder, tmp_path, f"data.text_cache={cache}", *extra, prompts=prompts))
    # the prompts of `train --eval` (evaluation.periodic.TrainingEval)
    image_eval = SimpleNamespace(prompts=lambda: [PROMPTS[0], "an eval prompt"])
    with pytest.raises(TextCacheError, match="the --eval prompts: 1 not in .*'an eval prompt'.*--extra FILE"):
        Trainer(run_config("pixart", folder, tmp_path, f"data.text_cache={cache}"), image_eval=image_eval)


def test_a_damaged_or_half_written_cache_is_refused(pixart, tmp_path, monkeypatch):
    from bigsid import text_cache

    folder, cache = pixart
    run = identity(run_config("pixart", folder, tmp_path))
    first, second = "shard-000000.safetensors", "shard-000001.safetensors"

    def zeroed(c):  # the recorded size, but no header
        (c / first).write_bytes(bytes((c / first).stat().st_size))

    for damage, problem in ((lambda c: (c / second).unlink(), f"{second} is missing"),
                            (lambda c: (c / first).write_bytes(bytes(64)), f"{first} has 64 bytes"),
                            (zeroed, f"{first} cannot be read"),
                            (lambda c: (c / "manifest.json").write_text("{"), "manifest.json does not parse")):
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(cache, copy)
        damage(copy)
        with pytest.raises(TextCacheError, match=f"is damaged: .*{problem}.*encode-prompts"):
            TextCache(copy, run)
    # an encoding that stops half way leaves OUT.partial, never OUT; the next one starts afresh
    cfg = run_config("pixart", folder, tmp_path)
    real = text_cache._sha256

    def fail_after_first(path):
        if path.name != "shard-000000.safetensors":
            raise OSError("disk full")
        return real(path)

    monkeypatch.setattr(text_cache, "_sha256", fail_after_first)
    with pytest.raises(OSError, match="disk full"):
        encode_prompts(cfg, tmp_path / "out", shard_size=2)
    assert (tmp_path / "out.partial" / "shard-000000.safetensors").is_file() and not (tmp_path / "out").exists()
    with pytest.raises(TextCacheError, match="no manifest.json.*did not complete"):
        TextCache(tmp_path / "out", run)
    with pytest.raises(ConfigError, match="no text cache"):
        run_config("pixart", folder, tmp_path, f"data.text_cache={tmp_path / 'out'}")
    monkeypatch.setattr(text_cache, "_sha256", real)
    encode_prompts(cfg, tmp_path / "out", shard_size=2)
    assert not (tmp_path / "out.partial").exists()
    TextCache(tmp_path / "out", run)
    # an existing cache is replaced only when asked
    with pytest.raises(TextCacheError, match="exists: choose another folder, or pass --force"):
        encode_prompts(cfg, tmp_path / "out")
    encode_prompts(cfg, tmp_path / "out", force=True)
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"]) == 1


def test_a_text_cache_needs_a_diffusers_teacher_and_leaves_no_encoder_to_shard(pixart):
    with pytest.raises(ConfigError, match="toy teacher.*leave data.text_cache empty"):
        load_config(None, ["data.text_cache=/nowhere"])
    folder, cache = pixart
    with pytest.raises(ConfigError, match="none to shard; leave text_encoder.shard false"):
        load_config(None, ["teacher.kind=diffusers", f"teacher.path={folder}", f"data.text_cache={cache}",
                           "text_encoder.shard=true", "parallel.backend=fsdp2"])


def test_the_planner_counts_no_text_encoder_beside_a_cache():
    from bigsid.plan import load_model

    args = ["teacher.kind=diffusers", "teacher.path=PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"]
    live = load_model(None, load_config(None, args, check_data=False))
    cached = load_model(None, load_config(None, [*args, "data.text_cache=cache"], check_data=False))
    assert live.text_params > 4e9 and cached.text_params == 0 and cached.text_units == (0, 0)
    assert cached.params == live.params and cached.vae_params == live.vae_params
