"""Gradient accumulation: micro-batches whose gradients add up to the whole batch's, one optimizer step.

A micro-batched run draws the same prompts and noise as the big-batch run and its micro-batch losses sum to the
batch loss, so its gradients differ only in the order of their fp32 sums: the parity bounds of the backends
(conftest.assert_same_update, test_parallel.assert_same_loss) hold for it too."""

import pytest

from bigsid.config import ConfigError, load_config
from bigsid.trainer import Trainer
from test_parallel import (BACKENDS, PARITY, assert_same_generator, assert_same_loss, backend, launch, losses,
                           run_locally)


def grad_norms(run_dir):
    """Both networks' gradient norms per step: Adam would hide a gradient off by a constant factor (a micro-batch
    loss divided by the wrong count), the norm (and so clipping) does not. The same fp32-sum argument as the
    losses' bounds them."""
    import json

    import torch

    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([[r["generator/grad_norm"], r["fake_score/grad_norm"]] for r in rows if "generator/loss" in r])


@pytest.fixture(scope="module")
def big_batch(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("big")
    return run_dir, run_locally(PARITY, run_dir)


def test_micro_batches_on_one_process_give_the_big_batch_update(big_batch, tmp_path):
    reference, initial = big_batch
    run_locally([*PARITY, "train.micro_batch=2"], tmp_path)  # 4 micro-batches of 2
    assert_same_loss(losses(tmp_path), losses(reference))
    assert_same_loss(grad_norms(tmp_path), grad_norms(reference))
    assert_same_generator(tmp_path, reference, initial, steps=4)


@pytest.mark.parametrize("name", [backend(n) for n in ("ddp", "fsdp2", "zero3")])
def test_micro_batches_on_two_ranks_give_the_big_batch_update(name, big_batch, tmp_path):
    """2 ranks x 2 micro-batches of 2: gradients reduced across ranks once, after the last micro-batch."""
    reference, initial = big_batch
    launch(2, [*PARITY, f"train.run_dir={tmp_path}", "train.micro_batch=2", *BACKENDS[name]])
    assert_same_loss(losses(tmp_path), losses(reference))
    assert_same_loss(grad_norms(tmp_path), grad_norms(reference))
    assert_same_generator(tmp_path, reference, initial, steps=4)


def test_a_micro_batch_that_does_not_divide_the_batch_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.micro_batch"):
        load_config(None, [*PARITY, "train.micro_batch=3"])
    # 8 images over 4 ranks leaves 2 per rank, which 4 does not divide: refused before any network is built
    from unittest import mock

    from bigsid.parallel.local import LocalBackend

    cfg = load_config(None, [*PARITY, "train.micro_batch=4", f"train.run_dir={tmp_path}"])
    with mock.patch.object(LocalBackend, "world_size", 4), mock.patch("bigsid.trainer.build_networks") as build, \
            pytest.raises(ValueError, match="per-rank batch 2"):
        Trainer(cfg)
    build.assert_not_called()


def allreduce_worker(rank: int, world: int, port: int, report: str) -> None:
    """One DDP step with the whole per-rank batch in one micro-batch, then one in two: the all-reduces each issues."""
    import json
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.set_num_threads(1)
    trainer = Trainer(load_config(None, [*PARITY, *BACKENDS["ddp"], f"train.run_dir={report}.run"]))
    reduces = []

    def counted(state, bucket):
        reduces.append(1)
        return allreduce_hook(state, bucket)

    for trainable in (trainer.generator, trainer.fake_score):
        trainable.module.register_comm_hook(None, counted)
    counts = []
    for micro_batch in (trainer.local_batch, trainer.local_batch // 2):
        trainer.micro_batch = micro_batch
        reduces.clear()
        trainer.train_step()
        counts.append(len(reduces))
    with open(f"{report}.rank{rank}.json", "w") as f:
        json.dump(counts, f)


def test_ddp_reduces_once_per_step_however_many_micro_batches(tmp_path):
    """DDP decides in forward whether the coming backward all-reduces: a micro-batch's forward outside no_sync
    would reduce after every micro-batch, twice the buckets here."""
    import json

    from dist_worker import free_port, start_ranks

    report = str(tmp_path / "reduces")
    start_ranks(allreduce_worker, (2, free_port(), report), 2)
    for rank in range(2):
        whole, halves = json.loads(open(f"{report}.rank{rank}.json").read())
        assert whole > 0 and halves == whole, (whole, halves)
