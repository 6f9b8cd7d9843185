"""text_encoder.shard: the text encoders of a tiny PixArt (T5), SD3 (two CLIPs with projections and T5) and SDXL
(CLIP without and with a projection) sharded by FSDP2 over 2 gloo ranks, against the whole encoders: the same Cond,
half the bytes on each rank (as the planner says), every unit freed after its forward, and training steps that give
the same losses."""

import dataclasses
import json

import pytest
import torch

from bigsid.config import ConfigError, load_config
from bigsid.tiny import build_pipeline
from test_families import overrides
from test_fsdp2_layout import counted_all_gathers
from dist_worker import free_port, start_ranks
from test_parallel import launch, losses

PROMPTS = ["a red cube", "two cats on a sofa", "", "a lighthouse at dusk, oil on canvas"]


@pytest.fixture(scope="module", params=["pixart", "sd3", "sdxl"])
def family_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    build_pipeline(request.param).save_pretrained(folder)
    return request.param, folder


def encode_worker(rank: int, world: int, port: int, folder: str, report: str) -> None:
    import copy
    import os
    from dataclasses import fields

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")

    from bigsid.families import load_teacher
    from bigsid.parallel.dist import leave_process_group
    from bigsid.parallel.fsdp2 import FSDP2Backend

    torch.set_num_threads(1)
    encoder = load_teacher(folder).encoder
    prompts = PROMPTS[rank::world]  # each rank its own prompts, as the trainer gives each its slice
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, ["teacher.kind=diffusers", f"teacher.path={folder}", "parallel.backend=fsdp2",
                                 "text_encoder.shard=true", f"train.precision={precision}", "train.device=cpu"])
        backend = FSDP2Backend(cfg)
        # as models.build_networks stores them: in bf16 on bf16 runs
        whole = copy.deepcopy(encoder).to(torch.bfloat16 if precision == "bf16" else torch.float32)
        sharded = copy.deepcopy(whole)
        expected = whole(prompts)
        backend.shard_encoder(sharded)
        with counted_all_gathers() as gathers:
            sharded(prompts)  # the first call also encodes the empty prompt
            first = len(gathers)
            cond = sharded(prompts)
        same = {}
        for c, e, prefix in ((cond, expected, ""), (cond.uncond, expected.uncond, "uncond.")):
            for f in fields(e):
                if f.name != "uncond" and getattr(e, f.name) is not None:
                    same[prefix + f.name] = torch.equal(getattr(c, f.name), getattr(e, f.name))
        local = [p.to_local() if hasattr(p, "to_local") else p for p in sharded.parameters()]
        out[precision] = {
            "same": same, "gathers": [first, len(gathers) - first],
            "units": len(sharded.blocks()) + len(sharded.stages()),
            "bytes": sum(t.numel() * t.element_size() for t in local),
            "whole_bytes": sum(p.numel() * p.element_size() for p in whole.parameters())}
    with open(f"{report}.rank{rank}.json", "w") as f:
        json.dump(out, f)
    leave_process_group()


def test_sharded_text_encoders_give_the_same_cond_on_half_the_bytes(family_dir, tmp_path):
    """Bit for bit in fp32 and bf16 (FSDP2Backend.shard_encoder says why): each rank's prompts and the empty prompt
    encoded by the sharded encoders equal the whole encoders' encoding. Each unit is all-gathered once per call, on
    every call (twice on the first, which encodes the empty prompt too): freed after its forward, never kept. Each
    rank holds half of the encoders' bytes, the planner's `encoders` term at 2 ranks, up to FSDP2's padding of
    uneven shards (5%, as tests/test_parallel.py allows), and the whole encoders' bytes without the option."""
    from bigsid import plan
    from bigsid.families import load_teacher

    name, folder = family_dir
    report = str(tmp_path / "r")
    start_ranks(encode_worker, (2, free_port(), str(folder), report), 2)
    model = plan.load_model(str(folder))
    # the planner's unit sizes, read from the weight files' tensor names, are those of the plan FSDP2 shards by
    encoder = load_teacher(str(folder)).encoder
    layers = {id(p): p.numel() for b in encoder.blocks() for p in b.parameters()}
    own = [sum(p.numel() for p in m.parameters() if id(p) not in layers) for m in encoder.stages()]
    assert model.text_params == sum(layers.values()) + sum(own) > 0
    assert model.text_units == (max(sum(p.numel() for p in b.parameters()) for b in encoder.blocks()), max(own))
    for rank in range(2):
        r = json.loads((tmp_path / f"r.rank{rank}.json").read_text())
        for precision, got in r.items():
            assert got["same"] and all(got["same"].values()), (name, precision, got["same"])
            assert "uncond.emb" in got["same"] and ("mask" in got["same"]) == (name == "pixart")
            assert got["gathers"] == [2 * got["units"], got["units"]], got
            bf16 = precision == "bf16"
            spec = dataclasses.replace(model, vae_params=0)  # rank 0's VAE is none of the encoders
            whole = plan.state_bytes(plan.Backend("fsdp2", 2, 2), spec, bf16)["encoders"]
            shards = plan.state_bytes(plan.Backend("fsdp2", 2, 2), spec, bf16, shard_text=True)["encoders"]
            assert whole == got["whole_bytes"]
            assert shards == whole / 2 and got["bytes"] <= shards * 1.05, got


def test_training_with_sharded_text_encoders_gives_the_same_losses(tmp_path):
    """SD3 (two CLIPs and T5) in bf16, its encoders stored in bf16, on fsdp2 over 2 ranks: with the encoders sharded
    (each rank holds half their bytes, up to padding) the Cond is the same bit for bit (above), and nothing else
    differs, so the losses are equal, not merely close."""
    folder = tmp_path / "sd3"
    build_pipeline("sd3").save_pretrained(folder)
    runs, held = {}, {}
    for shard in ("false", "true"):
        report = str(tmp_path / shard / "r")
        launch(2, overrides("sd3", folder, tmp_path / shard, "parallel.backend=fsdp2", "train.precision=bf16",
                            f"text_encoder.shard={shard}", prompts=PROMPTS), report=report)
        runs[shard] = losses(tmp_path / shard / "run")
        held[shard] = [json.loads(open(f"{report}.rank{r}.json").read())["encoder_bytes"] for r in range(2)]
    whole = held["false"][0]
    assert held["false"] == [whole, whole] and all(b <= whole / 2 * 1.05 for b in held["true"]), held
    assert runs["true"].shape == (2, 2) and runs["true"].isfinite().all()
    assert torch.equal(runs["true"], runs["false"])


@pytest.mark.parametrize("backend, expected", [
    ("local", "needs parallel.backend=fsdp2: local holds every network whole"),
    ("ddp", "needs parallel.backend=fsdp2: ddp holds every network whole"),
    ("deepspeed", "DeepSpeed partitions only the networks it wraps.*use parallel.backend=fsdp2")])
def test_sharding_text_encoders_is_refused_where_it_cannot_be_done(backend, expected, teacher_dir):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["teacher.kind=diffusers", f"teacher.path={teacher_dir}", f"parallel.backend={backend}",
                           "text_encoder.shard=true"])
    with pytest.raises(ConfigError, match="the toy teacher has no text encoders"):
        load_config(None, ["parallel.backend=fsdp2", "text_encoder.shard=true"])
