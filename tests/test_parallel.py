"""Backends against each other on 2 gloo ranks: same losses, sharded memory, resume on another world size."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import dist_worker
from dist_worker import free_port, start_ranks
from bigsid.checkpoint import latest_checkpoint
from bigsid.config import load_config
from bigsid.export import export, load_generator_state
from bigsid.trainer import Trainer
from conftest import TINY_TOY, assert_same_update

# Prompts and noise are drawn for the global batch and sliced per rank, so every backend and world size sees the
# same samples: three distinct prompts, so that a rank reading the wrong prompts changes the losses.
PARITY = [*TINY_TOY, "teacher.gmm.num_prompts=3", "train.batch_size=8", "train.total_nimg=32", "train.log_every=1",
          "train.checkpoint_every=2"]
LR = load_config(None, PARITY).optim.lr_generator


def launch(world: int, overrides: list[str], report: str | None = None, poison=None, host_reads=False) -> None:
    start_ranks(dist_worker.run, (world, free_port(), overrides, report, poison, host_reads), world)


# name -> overrides; DeepSpeed at both ZeRO stages
BACKENDS = {"ddp": ["parallel.backend=ddp"], "fsdp2": ["parallel.backend=fsdp2"],
            "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
            "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}
SHARDED = ["fsdp2", "zero3"]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")


def backend(name: str):
    return pytest.param(name, marks=[needs_deepspeed] if name.startswith("zero") else [])


def losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([[r["generator/loss"], r["fake_score/loss"]] for r in rows if "generator/loss" in r])


def assert_same_loss(actual, expected):
    # The same samples through weights that agree to rounding (see conftest.assert_same_update): each loss is a
    # mean of fp32 sums of n <= 10^4 terms about as large as the result, off by ~sqrt(n) u <= 1e-5 relative; a
    # weight whose update reversed had a gradient ~0, so it moves the loss only at second order. rtol leaves a
    # factor 10 over that; atol covers SiD's generator loss, a difference of terms, where it comes near zero.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def run_locally(args: list[str], run_dir) -> dict:
    """The one-process reference run; returns the generator's initial state, where every run of `args` starts."""
    trainer = Trainer(load_config(None, [*args, f"train.run_dir={run_dir}"]))
    initial = {k: v.clone() for k, v in trainer.networks.generator.state_dict().items()}
    trainer.run()
    return initial


def assert_same_generator(run_dir, reference, initial: dict, steps: int) -> None:
    """The final checkpoints of two runs hold the same generator update, raw and EMA (a convex mix of the raw
    weights along the way, so within the same bound)."""
    for ema in (True, False):
        trained, expected = (load_generator_state(latest_checkpoint(r), ema=ema) for r in (run_dir, reference))
        assert_same_update(trained, expected, initial, LR, steps)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local")
    return run_dir, run_locally(PARITY, run_dir)


def test_update_parity_fails_for_a_run_that_never_stepped(local_run):
    reference, initial = local_run
    final = load_generator_state(latest_checkpoint(reference), ema=False)
    assert_same_update(final, final, initial, LR, steps=4)
    for trained, expected in ((initial, final), (final, initial)):  # untrained either side
        with pytest.raises(AssertionError):
            assert_same_update(trained, expected, initial, LR, steps=4)


@pytest.mark.parametrize("name", [backend(n) for n in BACKENDS])
def test_backends_match_the_local_reference(name, local_run, tmp_path):
    reference, initial = local_run
    launch(2, [*PARITY, f"train.run_dir={tmp_path}", *BACKENDS[name]])
    expected = losses(reference)
    assert expected.shape == (4, 2)
    assert_same_loss(losses(tmp_path), expected)
    assert_same_generator(tmp_path, reference, initial, steps=4)


@pytest.mark.parametrize("name", [backend(n) for n in SHARDED])
def test_sharded_backends_shard_parameters_and_optimizer_states(name, tmp_path):
    sizes = {}
    for world in (1, 2):
        launch(world, [*PARITY, f"train.run_dir={tmp_path / str(world)}", *BACKENDS[name],
                       "train.total_nimg=8"], report=str(tmp_path / f"w{world}"))
        sizes[world] = [json.loads((tmp_path / f"w{world}.rank{r}.json").read_text()) for r in range(world)]
    for key in ("param_bytes", "optim_bytes"):
        full = sizes[1][0][key]
        assert full > 0
        for rank in sizes[2]:
            assert rank[key] <= full / 2 * 1.05, (key, rank[key], full)  # padding of uneven shards only


@pytest.mark.parametrize("name", [backend(n) for n in ("fsdp2", "zero2", "zero3")])
def test_planner_state_bytes_match_each_rank(name, tmp_path_factory, tmp_path):
    """What `bigsid plan` says a rank holds (teacher, weights with ZeRO's master partitions, Adam, EMA) against
    what each of 2 ranks holds after a step on a diffusers UNet."""
    from bigsid import plan
    from bigsid.config import GMMConfig
    from bigsid.toy import prepare_toy_teacher

    teacher = prepare_toy_teacher(tmp_path_factory.mktemp("t") / "teacher",
                                  GMMConfig(num_prompts=1, modes_per_prompt=2, latent_shape=[4, 8, 8]), fit_steps=1)
    args = [*PARITY, "teacher.kind=diffusers", f"teacher.path={teacher}", "train.total_nimg=8", "eval.num_samples=8",
            f"train.run_dir={tmp_path / 'run'}", *BACKENDS[name]]
    launch(2, args, report=str(tmp_path / "r"))
    model = plan.load_model(cfg=load_config(None, args))
    state = plan.state_bytes(plan.Backend(name, 2, 2), model, bf16=False)
    for rank in range(2):
        held = json.loads((tmp_path / f"r.rank{rank}.json").read_text())
        # per-parameter padding of uneven shards only
        for key in ("teacher", "weight", "optim", "ema"):
            planned = state[{"weight": "weights", "optim": "optimizer"}.get(key, key)]
            assert held[f"{key}_bytes"] == pytest.approx(planned, rel=0.05), (key, held, state)


@pytest.mark.parametrize("name", [backend(n) for n in BACKENDS])
def test_a_nan_on_one_rank_is_skipped_by_every_rank(name, tmp_path):
    """Rank 1's generator loss is NaN at step 1: both ranks skip that update and train on, in step."""
    run_dir = tmp_path / "run"
    launch(2, [*PARITY, f"train.run_dir={run_dir}", *BACKENDS[name]], report=str(tmp_path / "r"), poison=(1, 1))
    for rank in range(2):
        skipped = json.loads((tmp_path / f"r.rank{rank}.json").read_text())["skipped"]
        assert skipped["nonfinite_steps"] == 1, (rank, skipped)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    applied = [r["generator/applied"] for r in rows if "generator/applied" in r]
    assert applied == [1.0, 0.0, 1.0, 1.0]  # the mean over ranks: 0 means both skipped
    state = load_generator_state(latest_checkpoint(run_dir))
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("name", [backend(n) for n in ("zero2", "zero3")])
def test_deepspeed_checkpoint_resumes_on_any_world_size(name, tmp_path):
    """A four-step run stopped after steps 2 and 3, resumed on 2 ranks (DeepSpeed's own loader), then on 1 and
    on 2 again (bigsid reads the ZeRO partitions and repartitions them), at ZeRO-3 through a damaged partition on
    the way, equals the uninterrupted one-process run: these all compute the same sums, in other orders
    (assert_same_loss, assert_same_update)."""
    # odd widths: parameters that 2 ranks cannot share evenly, so ZeRO pads, and a layout a bug could misplace
    args = [*PARITY, "teacher.student_width=63", "train.checkpoint_every=1", "train.keep_checkpoints=4"]
    initial = run_locally(args, tmp_path / "local")
    reference = losses(tmp_path / "local")
    run_dir = tmp_path / "run"
    run = [*args, f"train.run_dir={run_dir}", *BACKENDS[name]]
    launch(2, [*run, "train.total_nimg=8"])
    launch(2, [*run, "train.total_nimg=16"])
    assert_same_loss(losses(run_dir), reference[:2])
    for ema in (True, False):  # the update of step 2, made on the state the 2-rank resume restored
        trained, expected = (load_generator_state(r / "checkpoints" / "step-000000002", ema=ema)
                             for r in (run_dir, tmp_path / "local"))
        assert_same_update(trained, expected, initial, LR, steps=2)
    if name == "zero3":  # the refusal and the damaged partition take the same path at either stage
        with pytest.raises(Exception, match="written by ZeRO stage 3; resume it with parallel.zero_stage=3"):
            launch(1, [*run, "train.total_nimg=24", "parallel.zero_stage=2"])
        # step 2's partition of rank 1 flipped: set aside, named, and the 1-rank run resumes from step 1
        damaged = Path("generator", "state", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        data = bytearray((run_dir / "checkpoints" / "step-000000002" / damaged).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (run_dir / "checkpoints" / "step-000000002" / damaged).write_bytes(bytes(data))
    launch(1, [*run, "train.total_nimg=24"])
    if name == "zero3":
        aside = run_dir / "checkpoints" / "step-000000002.damaged"
        assert f"{damaged} does not match its checksum" in (aside / "DAMAGED.txt").read_text()
    launch(2, run)  # from step 3, written by 1 rank
    assert_same_loss(losses(run_dir), reference)
    assert latest_checkpoint(run_dir).name == "step-000000004"
    assert_same_generator(run_dir, tmp_path / "local", initial, steps=4)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_fsdp2_checkpoint_resumes_on_another_world_size(asynchronous, tmp_path, local_run):
    run_dir = tmp_path / "run"
    launch(2, [*PARITY, f"train.run_dir={run_dir}", "parallel.backend=fsdp2", "train.total_nimg=16",
               f"train.async_checkpoint={str(asynchronous).lower()}"])
    assert latest_checkpoint(run_dir).name == "step-000000002"
    launch(1, [*PARITY, f"train.run_dir={run_dir}", "parallel.backend=fsdp2"])
    reference, initial = local_run
    assert_same_loss(losses(run_dir), losses(reference))
    final = latest_checkpoint(run_dir)
    assert final.name == "step-000000004" and (final / "dcp").is_dir()
    assert_same_generator(run_dir, reference, initial, steps=4)


@pytest.mark.parametrize("name", [backend(n) for n in SHARDED])
def test_sharded_backends_on_a_diffusers_unet_match_local_and_export(name, tmp_path_factory, tmp_path):
    """The UNet path with guidance, the teacher sharded too (fsdp2: per-resnet/attention units inside per-block
    units; ZeRO-3: the teacher in an engine of its own): the sharded checkpoint exports the weights the
    one-process run holds."""
    from bigsid.config import GMMConfig
    from bigsid.toy import prepare_toy_teacher

    teacher = prepare_toy_teacher(tmp_path_factory.mktemp("t") / "teacher",
                                  GMMConfig(num_prompts=1, modes_per_prompt=2, latent_shape=[4, 4, 4]), fit_steps=2)
    args = [*PARITY, "teacher.kind=diffusers", f"teacher.path={teacher}", "train.total_nimg=16",
            "eval.num_samples=8", "objective.kappa4=2"]
    initial = run_locally(args, tmp_path / "local")
    # activation checkpointing of all three networks on top of sharding changes no value
    launch(2, [*args, f"train.run_dir={tmp_path / 'sharded'}", *BACKENDS[name],
               "train.activation_checkpointing=[generator,fake_score,teacher]"])
    assert_same_loss(losses(tmp_path / "sharded"), losses(tmp_path / "local"))
    # The sharded checkpoint holds the update the one-process run made (same training, up to reduction order).
    assert_same_generator(tmp_path / "sharded", tmp_path / "local", initial, steps=2)
    out = export(tmp_path / "sharded", tmp_path / "export")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.fixture(scope="module")
def lora_local_run(tmp_path_factory):
    """(args, run folder, initial generator) of a one-process run whose fake score is a LoRA adapter on a tiny
    diffusers UNet teacher."""
    pytest.importorskip("peft")
    from bigsid.config import GMMConfig
    from bigsid.toy import prepare_toy_teacher

    teacher = prepare_toy_teacher(tmp_path_factory.mktemp("t") / "teacher",
                                  GMMConfig(num_prompts=1, modes_per_prompt=2, latent_shape=[4, 4, 4]), fit_steps=2)
    args = [*PARITY, "teacher.kind=diffusers", f"teacher.path={teacher}", "train.total_nimg=16",
            "eval.num_samples=8", "fake_score.lora_rank=4"]
    run_dir = tmp_path_factory.mktemp("lora_local")
    return args, run_dir, run_locally(args, run_dir)


@pytest.mark.parametrize("name", [backend(n) for n in SHARDED])
def test_a_lora_fake_score_matches_the_local_reference(name, lora_local_run, tmp_path):
    """fake_score.lora_rank: the teacher is the fake score's network with its adapter off, so the generator phase
    runs the one (sharded) network twice, frozen, and only the adapter trains in the fake-score phase. The sharded
    backends give the one-process run's losses and generator update (assert_same_loss, assert_same_update: the same
    sums, reduced in another order): FSDP2 swaps gathered parameters in for the adapter's shards during the call,
    and under ZeRO-3 the adapter's gradients were once queued twice in one reduction. ddp and ZeRO-2 hold the
    network whole, as the one-process run does, whose adapter test_families checks."""
    args, reference, initial = lora_local_run
    launch(2, [*args, f"train.run_dir={tmp_path}", *BACKENDS[name]])
    expected = losses(reference)
    assert expected.shape == (2, 2)
    assert_same_loss(losses(tmp_path), expected)
    assert_same_generator(tmp_path, reference, initial, steps=2)


@needs_deepspeed
def test_deepspeed_settings_that_contradict_bigsid_are_refused_before_training(tmp_path):
    from bigsid.config import ConfigError

    def config(user: dict, *extra):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        return load_config(None, [*PARITY, "parallel.backend=deepspeed", f"parallel.deepspeed_config={path}", *extra])

    merged = config({"zero_optimization": {"reduce_bucket_size": 5e7}, "gradient_clipping": 0.0})
    assert merged.parallel.zero_stage == 3
    with pytest.raises(ConfigError, match="gradient_clipping = 1.0.*from optim.grad_clip"):
        config({"gradient_clipping": 1.0})
    with pytest.raises(ConfigError, match="zero_optimization.stage = 2.*parallel.zero_stage"):
        config({"zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError, match="train_batch_size = 64.*train.batch_size"):
        config({"train_batch_size": 64})
    with pytest.raises(ConfigError, match="remove the 'optimizer' section; set optim"):
        config({"optimizer": {"type": "AdamW"}})
    with pytest.raises(ConfigError, match="remove the 'bf16' section; use train.precision=bf16"):
        config({"bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match="parallel.zero_stage"):
        config({}, "parallel.zero_stage=1")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(None, [*PARITY, "parallel.backend=deepspeed", f"parallel.deepspeed_config={tmp_path / 'bad.json'}"])


def train_as_the_cli(rank: int, port: int, overrides: list[str], out: str) -> None:
    """One rank of `bigsid train` under torchrun: the command's run, then whether this rank still holds the group."""
    import os

    import torch.distributed as dist

    from bigsid.cli import _run

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    _run(load_config(None, overrides))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"in_group": dist.is_initialized()}))


def test_the_ranks_of_a_finished_run_leave_the_process_group_together(tmp_path):
    start_ranks(train_as_the_cli, (free_port(), [*PARITY, "parallel.backend=ddp", f"train.run_dir={tmp_path / 'run'}",
                                                 "train.total_nimg=16"], str(tmp_path / "report")), 2)
    assert latest_checkpoint(tmp_path / "run").name == "step-000000002"
    for rank in range(2):
        assert json.loads((tmp_path / f"report.rank{rank}.json").read_text()) == {"in_group": False}, rank
