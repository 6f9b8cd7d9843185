"""FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer states sharded over ranks.

Each block is its own FSDP unit (all-gathered just before use, freed after), then the root; the frozen teacher
is sharded the same way and never gets gradients or optimizer state. With parallel.shard_size = S < world
size, a 2-D mesh shards within groups of S ranks and replicates across them (hybrid sharding: all-gathers stay
inside a node). Checkpoints go through torch.distributed.checkpoint, so they load on any number of ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from bigsid.parallel.base import Backend, BackendError, Trainable
from bigsid.parallel.dist import Collectives, init_process_group
from bigsid.parallel.local import _save_tensors


def blocks(net: nn.Module) -> list[nn.Module]:
    """The units to shard, innermost first: each resnet and attention module of a diffusers UNet, then its
    down/mid/up blocks (a whole SDXL up-block is ~1.2 B parameters, too large to gather at once); for the toy
    MLP, its layers."""
    unet = getattr(net, "unet", None)
    if unet is None:
        return [m for m in getattr(net, "body", []) if any(True for _ in m.parameters())]
    outer = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    inner = [m for block in outer for m in (*getattr(block, "resnets", []), *(getattr(block, "attentions", None) or []))]
    return inner + outer


class FSDP2Trainable(Trainable):
    def stored_params(self):
        # While a module is unsharded (a root can stay so after a no-grad forward), FSDP2 computes with the
        # gathered copies: reshard, so EMA weights swapped into the shards are what the next forward uses.
        for m in self.inner.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        return super().stored_params()


class FSDP2Backend(Collectives, Backend):
    checkpoint_group = None

    def __init__(self, cfg):
        super().__init__(cfg)
        self.rank, self.world_size, self.device = init_process_group(cfg.train.device)
        shard = cfg.parallel.shard_size or self.world_size
        if self.world_size % shard:
            raise BackendError(f"parallel.shard_size={shard} does not divide the world size {self.world_size}")
        if shard == self.world_size:
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        else:
            self.mesh = init_device_mesh(self.device.type, (self.world_size // shard, shard),
                                         mesh_dim_names=("replicate", "shard"))
        bf16 = cfg.train.precision == "bf16"
        # bf16 compute with fp32 gradient reduction; the sharded fp32 parameters are the master weights.
        self.mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                       reduce_dtype=torch.float32 if bf16 else None)

    def shard(self, module: nn.Module, net: nn.Module) -> nn.Module:
        for block in blocks(net):
            fully_shard(block, mesh=self.mesh, mp_policy=self.mp)
        return fully_shard(module, mesh=self.mesh, mp_policy=self.mp)

    def prepare(self, networks):
        self.place(networks)
        if any(True for _ in networks.teacher.parameters()):
            self.shard(networks.teacher, networks.teacher)
        self.shard(networks.generator, networks.generator.net)
        self.shard(networks.fake_score, networks.fake_score)
        o = self.cfg.optim
        return tuple(FSDP2Trainable(net, self.make_optimizer(net, lr), o.grad_clip)
                     for net, lr in ((networks.generator, o.lr_generator), (networks.fake_score, o.lr_fake_score)))

    def _state(self, trainables, ema):
        state = {"ema": ema}
        for name, tr in trainables.items():
            model, optim = get_state_dict(tr.inner, tr.optimizer)
            state[name] = {"model": model, "optim": optim}
        return state

    def save(self, folder, trainables, ema, rank_state, asynchronous=False):
        _save_tensors(rank_state, folder / f"rank{self.rank}.safetensors")
        if not asynchronous:
            dcp.save(self._state(trainables, ema), checkpoint_id=str(folder / "dcp"))
            return None
        if self.checkpoint_group is None:  # the background writer's collectives run on host memory: gloo
            self.checkpoint_group = dist.new_group(backend="gloo")
        # stages a host copy before it returns, then writes in a thread
        return dcp.async_save(self._state(trainables, ema), checkpoint_id=str(folder / "dcp"),
                              process_group=self.checkpoint_group)

    def load(self, folder, trainables, ema):
        state = self._state(trainables, ema)
        dcp.load(state, checkpoint_id=str(folder / "dcp"))  # in place, resharded to this world size
        for name, tr in trainables.items():
            set_state_dict(tr.inner, tr.optimizer, model_state_dict=state[name]["model"],
                           optim_state_dict=state[name]["optim"])
        own = folder / f"rank{self.rank}.safetensors"
        return load_file(own) if own.is_file() else None
