"""ZeRO-3 with DeepSpeed's default stage3_param_persistence_threshold (1e5 elements): the toy MLP's weights are all
below it, so every one stays whole on each rank, and the EMA swap must reach those whole copies and leave them."""

import importlib.util

import pytest
import torch

from bigsid.checkpoint import latest_checkpoint
from bigsid.config import load_config
from bigsid.export import load_generator_state
from bigsid.parallel.dist import leave_process_group
from bigsid.trainer import Trainer
from dist_worker import free_port, start_ranks
from test_parallel import PARITY

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")

# An EMA far from the raw weights: no ramp-up, and a half-life long against the 16 images trained on.
ARGS = [*PARITY, "train.total_nimg=16", "train.ema_rampup=0", "train.ema_halflife_nimg=500"]


def inputs(trainer):
    z = torch.randn(4, *trainer.networks.latent_shape, generator=torch.Generator().manual_seed(3))
    vocabulary = trainer.networks.vocabulary
    return z, trainer.networks.encoder([vocabulary[i % len(vocabulary)] for i in range(len(z))])


def swap_worker(rank: int, world: int, port: int, overrides: list[str], report: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")

    torch.set_num_threads(1)
    trainer = Trainer(load_config(None, overrides))
    trainer.run()  # two steps and a checkpoint
    z, cond = inputs(trainer)
    generator = trainer.generator
    with torch.no_grad():
        raw = generator.inner(z, cond)
        with trainer.ema.applied(generator) as g:
            ema = g(z, cond)
        raw_again = generator.inner(z, cond)
    persistent = sum(p.numel() for p in generator.persistent)
    torch.save({"raw": raw, "ema": ema, "raw_again": raw_again, "persistent": persistent,
                "all": sum(p.numel() for p in generator.params)}, f"{report}.rank{rank}.pt")
    leave_process_group()


def test_ema_swap_reaches_persistent_parameters_and_the_checkpoint_holds_them(tmp_path):
    report = str(tmp_path / "r")
    args = [*ARGS, f"train.run_dir={tmp_path / 'zero3'}", "parallel.backend=deepspeed", "parallel.zero_stage=3"]
    start_ranks(swap_worker, (2, free_port(), args, report), 2)
    out = torch.load(f"{report}.rank0.pt", weights_only=True)
    assert out["persistent"] == out["all"] > 0  # the default threshold is in force: every toy weight stays whole

    # The reference: one process holding the checkpoint's EMA (read back as export reads it) in plain tensors.
    reference = Trainer(load_config(None, [*ARGS, f"train.run_dir={tmp_path / 'local'}"]))
    generator = reference.networks.generator
    with torch.no_grad():
        generator.load_state_dict(load_generator_state(latest_checkpoint(tmp_path / "zero3"), ema=True))
        expected = generator(*inputs(reference))
    # The same weights and inputs; only the matmul kernels' blocking may differ between 1 and 2 threads, which for
    # these widths (<= 64 terms a sum) moves an output by at most ~64 u of the sum of its terms' magnitudes.
    torch.testing.assert_close(out["ema"], expected, rtol=1e-5, atol=1e-5)
    # ...which the raw weights, the whole copies a missing rebuild would have used, are far from
    assert (out["raw"] - expected).abs().max() > 100 * 1e-5
    assert torch.equal(out["raw_again"], out["raw"])  # swapped back: the whole copies are the raw weights again
