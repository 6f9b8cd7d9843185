"""torch.distributed set-up and collectives shared by the multi-process backends.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). NCCL on GPUs,
gloo on CPU."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from bigsid.parallel.base import BackendError
from bigsid.parallel.local import pick_device


def init_process_group(device_name: str) -> tuple[int, int, torch.device]:
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise BackendError("a multi-process backend needs torchrun's environment (RANK, WORLD_SIZE, "
                               "MASTER_ADDR, MASTER_PORT): launch with `torchrun --nproc_per_node=N -m bigsid.cli "
                               "train ...` (see slurm/), or use parallel.backend=local")
        device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, pick_device(device_name, int(os.environ.get("LOCAL_RANK", rank)))



def leave_process_group() -> None:
    """Every rank leaves the process group together, once all are done with it: a rank that exits while others
    still hold their connections to it can bring them down (gloo can abort a process whose peer closes a connection
    it still holds; NCCL warns of a group never destroyed), and rank 0 hosts the store the others still use. Not
    after an error: the ranks may not agree that there is one, and the barrier would hold the others until its
    timeout."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

class Collectives:
    """Backend methods over the default process group."""

    device: torch.device

    def mean(self, values):
        names = sorted(values)
        if not names:
            return {}
        stacked = torch.stack([values[k].detach().float().to(self.device).reshape(()) for k in names])
        dist.all_reduce(stacked)
        return dict(zip(names, (stacked / dist.get_world_size()).tolist()))

    def reduce(self, values, op):
        values = values.detach().clone()
        dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return values.tolist()

    def gather(self, obj) -> list:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()
