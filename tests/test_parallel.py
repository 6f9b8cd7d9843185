"""Backends against each other on 2 gloo ranks: same losses, sharded memory, resume on another world size."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
from bigsid.checkpoint import latest_checkpoint
from bigsid.config import load_config
from bigsid.trainer import Trainer
from conftest import TINY_TOY

# One prompt, so each rank's prompt stream is the same whatever the world size; noise is drawn for the global
# batch and sliced per rank, so every backend sees the same samples.
PARITY = [*TINY_TOY, "teacher.gmm.num_prompts=1", "train.batch_size=8", "train.total_nimg=32", "train.log_every=1",
          "train.checkpoint_every=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, overrides: list[str], report: str | None = None) -> None:
    mp.start_processes(dist_worker.run, args=(world, free_port(), overrides, report), nprocs=world,
                       start_method="spawn")


def losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([[r["generator/loss"], r["fake_score/loss"]] for r in rows if "generator/loss" in r])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local")
    Trainer(load_config(None, [*PARITY, f"train.run_dir={run_dir}"])).run()
    return run_dir


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_backends_match_the_local_reference(backend, local_run, tmp_path):
    launch(2, [*PARITY, f"train.run_dir={tmp_path}", f"parallel.backend={backend}"])
    expected = losses(local_run)
    assert expected.shape == (4, 2)
    # fp32 on CPU; only the order of the gradient reduction differs
    torch.testing.assert_close(losses(tmp_path), expected, rtol=1e-4, atol=1e-5)


def test_fsdp2_shards_parameters_and_optimizer_states(tmp_path):
    sizes = {}
    for world in (1, 2):
        launch(world, [*PARITY, f"train.run_dir={tmp_path / str(world)}", "parallel.backend=fsdp2",
                       "train.total_nimg=8"], report=str(tmp_path / f"w{world}"))
        sizes[world] = [json.loads((tmp_path / f"w{world}.rank{r}.json").read_text()) for r in range(world)]
    for key in ("param_bytes", "optim_bytes"):
        full = sizes[1][0][key]
        for rank in sizes[2]:
            assert rank[key] <= full / 2 * 1.05, (key, rank[key], full)  # padding of uneven shards only


def test_fsdp2_checkpoint_resumes_on_another_world_size(tmp_path, local_run):
    run_dir = tmp_path / "run"
    launch(2, [*PARITY, f"train.run_dir={run_dir}", "parallel.backend=fsdp2", "train.total_nimg=16"])
    assert latest_checkpoint(run_dir).name == "step-000000002"
    launch(1, [*PARITY, f"train.run_dir={run_dir}", "parallel.backend=fsdp2"])
    torch.testing.assert_close(losses(run_dir), losses(local_run), rtol=1e-4, atol=1e-5)
    final = latest_checkpoint(run_dir)
    assert final.name == "step-000000004" and (final / "dcp").is_dir()


def test_fsdp2_on_a_diffusers_unet_matches_local_and_exports(tmp_path_factory, tmp_path):
    """The UNet path: per-resnet/attention units inside per-block units, teacher sharded too; its DCP checkpoint
    exports the weights the one-process run holds."""
    from bigsid.config import GMMConfig
    from bigsid.toy import prepare_toy_teacher

    teacher = prepare_toy_teacher(tmp_path_factory.mktemp("t") / "teacher",
                                  GMMConfig(num_prompts=1, modes_per_prompt=2, latent_shape=[4, 4, 4]), fit_steps=2)
    args = [*PARITY, "teacher.kind=diffusers", f"teacher.path={teacher}", "train.total_nimg=16",
            "eval.num_samples=8", "objective.kappa4=2"]
    Trainer(load_config(None, [*args, f"train.run_dir={tmp_path / 'local'}"])).run()
    launch(2, [*args, f"train.run_dir={tmp_path / 'fsdp2'}", "parallel.backend=fsdp2"])
    torch.testing.assert_close(losses(tmp_path / "fsdp2"), losses(tmp_path / "local"), rtol=1e-4, atol=1e-4)
    # The sharded checkpoint exports what the one-process run holds (same training, up to reduction order).
    from bigsid.export import export, load_generator_state

    for ema in (True, False):
        sharded = load_generator_state(latest_checkpoint(tmp_path / "fsdp2"), ema=ema)
        full = load_generator_state(latest_checkpoint(tmp_path / "local"), ema=ema)
        assert sharded.keys() == full.keys()
        for k in full:
            # Adam's first steps move a weight by ~lr * sign(grad): where a gradient is ~0, reduction order can
            # flip the sign, so a weight may differ by up to 2 * lr * steps = 4e-4.
            torch.testing.assert_close(sharded[k], full[k], rtol=1e-4, atol=4e-4)
    out = export(tmp_path / "fsdp2", tmp_path / "export")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
