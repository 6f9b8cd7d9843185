"""The FSDP2 layout on 2 gloo ranks: how many all-gathers one generator step issues, against the plan."""

import contextlib
import json

import pytest

from dist_worker import free_port, start_ranks
from test_parallel import PARITY


@contextlib.contextmanager
def counted_all_gathers():
    """A list that gets one entry per FSDP2 all-gather issued inside the block (any unit, any rank's own)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    gathers, original = [], _fsdp_param_group.foreach_all_gather

    def counted(*args, **kwargs):
        gathers.append(1)
        return original(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather = counted
    try:
        yield gathers
    finally:
        _fsdp_param_group.foreach_all_gather = original


def count_worker(rank: int, world: int, port: int, overrides: list[str], report: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch
    from torch.distributed.fsdp import FSDPModule

    from bigsid.config import load_config
    from bigsid.parallel.dist import leave_process_group
    from bigsid.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(load_config(None, overrides))
    trainer.train_step()  # FSDP2 initialises lazily on the first forward

    def units(net):
        """(units that hold parameters of their own, whether the root is one of them)."""
        fsdp = [m for m in net.modules() if isinstance(m, FSDPModule)]
        inner = {id(p) for m in fsdp if m is not net for p in m.parameters()}
        own = [m for m in fsdp if m is not net and {id(p) for p in m.parameters()}
               - {id(p) for c in m.modules() if c is not m and isinstance(c, FSDPModule) for p in c.parameters()}]
        root_own = any(id(p) not in inner for p in net.parameters())
        return len(own) + root_own, root_own

    with counted_all_gathers() as gathers:
        trainer.generator_phase()
    with open(f"{report}.rank{rank}.json", "w") as f:
        json.dump({"gathers": len(gathers), "generator": units(trainer.generator.inner),
                   "teacher": units(trainer.teacher), "fake_score": units(trainer.fake_score.inner)}, f)
    leave_process_group()


@pytest.mark.parametrize("once", [True, False])
def test_one_generator_step_gathers_each_frozen_unit_once(tmp_path, once):
    """Generator: every unit gathered for its forward, and again for its backward, except the root, which FSDP2
    keeps gathered in between. Teacher and fake score (frozen, parallel.gather_frozen_once): gathered once and
    kept through the backward through their input; otherwise, like the generator's units, twice."""
    report = str(tmp_path / "r")
    overrides = [*PARITY, f"train.run_dir={tmp_path / 'run'}", "parallel.backend=fsdp2",
                 f"parallel.gather_frozen_once={str(once).lower()}"]
    start_ranks(count_worker, (2, free_port(), overrides, report), 2)
    for rank in range(2):
        r = json.loads((tmp_path / f"r.rank{rank}.json").read_text())
        (n_gen, gen_root), (n_teacher, teacher_root), (n_fake, fake_root) = r["generator"], r["teacher"], r["fake_score"]
        assert min(n_gen, n_teacher, n_fake) > 1
        twice = 2 * n_gen - gen_root
        if once:
            planned = twice + n_teacher + n_fake
        else:
            planned = twice + (2 * n_teacher - teacher_root) + (2 * n_fake - fake_root)
        assert r["gathers"] == planned, r
