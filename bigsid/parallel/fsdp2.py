"""FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer states sharded over ranks.

Each block is its own FSDP unit (all-gathered just before use, freed after), then the root; the frozen teacher
is sharded the same way and never gets gradients or optimizer state. With parallel.shard_size = S < world
size, a 2-D mesh shards within groups of S ranks and replicates across them (hybrid sharding: all-gathers stay
inside a node). Each rank fills its shards from its own rows of the teacher's safetensors files, so no rank
reads or holds the weights whole (rank 0 reads and broadcasts them where the files cannot be read so: .bin files).
Checkpoints go through torch.distributed.checkpoint, so they load on any number of ranks.

DCP's own reader runs code from the checkpoint: it unpickles `.metadata`, and its default planner reads
non-tensor items (optimizer hyper-parameters) with torch.load(weights_only=False). Checkpoints sit on shared
cluster storage, so bigsid reads them with `load_dcp` only: the metadata through an unpickler that admits the
plain-data classes DCP writes and nothing else, non-tensor items with weights_only loading."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from bigsid.checkpoint import CheckpointError, read_rank_state, reading
from bigsid.families import StoredTensor
from bigsid.parallel.base import Backend, BackendError, Trainable
from bigsid.parallel.dist import Collectives, init_process_group
from bigsid.parallel.local import _save_tensors


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the plain-data types a DCP `.metadata` file is built from; any other global (os.system, a
    builtin, a class with side effects) is refused before it can be called."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # maps a name such as "torch.strided" to the layout object
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a type DCP metadata is made of; refusing to load it")


class _SafeReader(dcp.FileSystemReader):
    """A FileSystemReader whose metadata is parsed (once, here) by the allow-listing unpickler."""

    def __init__(self, path: Path):
        super().__init__(path)
        meta = Path(path) / ".metadata"
        with reading(meta), open(meta, "rb") as f:
            self.metadata = _MetadataUnpickler(f).load()
            if not isinstance(self.metadata, dcp_metadata.Metadata):
                raise CheckpointError(f"{meta} holds a {type(self.metadata).__name__}, not DCP metadata")

    def read_metadata(self, *args, **kwargs):
        return self.metadata

    def read_data(self, plan, planner):
        paths = sorted({str(Path(self.path) / self.storage_data[item.storage_index].relative_path)
                        for item in plan.items})
        with reading(" or ".join(paths)):
            return super().read_data(plan, planner)


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor items (optimizer hyper-parameters) read with weights_only loading."""

    def load_bytes(self, read_item, value):
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_dcp_metadata(path: Path) -> dcp_metadata.Metadata:
    return _SafeReader(path).metadata


def load_dcp(state: dict, path: Path, **kwargs) -> None:
    """dcp.load into `state` in place, never running code from the checkpoint; a file that cannot be read
    raises CheckpointError naming it (on every rank: DCP shares each rank's failure)."""
    try:
        dcp.load(state, storage_reader=_SafeReader(path), planner=_SafePlanner(), **kwargs)
    except CheckpointException as err:
        causes = [failure[0] for failure in err.failures.values()]
        ours = [c for c in causes if isinstance(c, CheckpointError)]
        raise (ours[0] if ours else CheckpointError(f"cannot read the checkpoint {path}: {causes[0]!r}")) from None


def units(net: nn.Module) -> list[nn.Module]:
    """The units to shard, innermost first: the network's repeated blocks, then its stages, as its architecture's
    plan says (bigsid.families: a UNet's resnets and attentions, then its down/mid/up blocks; a transformer's
    blocks; the toy MLP's layers). train.compile compiles the repeated ones, each inside its own unit. A network
    with no plan is refused: one unit holding the whole network would gather all of it on every rank at once."""
    if not hasattr(net, "blocks"):
        raise BackendError(f"FSDP2 has no sharding plan for a {type(net).__name__}: bigsid shards the networks of "
                           "bigsid.families (UNets, PixArt and SD3 transformers) and the toy MLP; use "
                           "parallel.backend=deepspeed (ZeRO partitions any module) or ddp")
    return net.blocks() + net.stages()


def first_row(t: torch.Tensor) -> int:
    """The first dim-0 row of the whole tensor that this rank's shard of `t` holds: FSDP2 splits dim 0 as
    torch.chunk does (ceil(rows / ranks) each, the last ones shorter or empty) along the mesh dimension that shards;
    0 for a tensor that is not sharded."""
    if not isinstance(t, DTensor):
        return 0
    start = 0
    for dim, placement in enumerate(t.placements):
        if placement.is_shard(0):
            start += t.device_mesh.get_local_rank(dim) * -(-t.shape[0] // t.device_mesh.size(dim))
    return start


def reshard(net: nn.Module) -> None:
    """Free every gathered unit of `net` (a no-op for those already sharded)."""
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def keep_gathered(net: nn.Module) -> None:
    """Layout of a frozen network: its units stay gathered from forward to the end of the backward through its
    input (FSDP2 reshards each after its backward), so each is all-gathered once per iteration, not twice. A call
    without grad has no backward to wait for: the whole network is resharded as the call returns."""
    net.set_reshard_after_forward(False)
    net.register_forward_hook(lambda module, args, out: None if torch.is_grad_enabled() else reshard(module))


class FSDP2Trainable(Trainable):
    gather_frozen_once = False

    @contextlib.contextmanager
    def micro_step(self, sync):
        # earlier micro-batches keep unsharded gradients; the last reduce-scatters their sum
        self.inner.set_requires_gradient_sync(sync)
        yield

    def stored_params(self):
        # While a module is unsharded (a root can stay so after a no-grad forward), FSDP2 computes with the
        # gathered copies: reshard, so EMA weights swapped into the shards are what the next forward uses.
        reshard(self.inner)
        return super().stored_params()

    @contextlib.contextmanager
    def frozen(self):
        """The fake score in the generator phase: frozen, so laid out as the teacher is (keep_gathered); trained
        again afterwards, so resharded after each forward, which frees its units for its own activations."""
        if not self.gather_frozen_once:
            with super().frozen() as net:
                yield net
            return
        self.inner.set_reshard_after_forward(False)
        try:
            with super().frozen() as net:
                yield net
        finally:
            self.inner.set_reshard_after_forward(True)
            reshard(self.inner)


class FSDP2Backend(Collectives, Backend):
    checkpoint_group = None
    reads_stored = True  # each rank the rows of its shards (load_state): nothing is broadcast

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

    def shard(self, module: nn.Module, net: nn.Module, mp: MixedPrecisionPolicy | None = None) -> nn.Module:
        mp = self.mp if mp is None else mp
        for block in units(net):
            fully_shard(block, mesh=self.mesh, mp_policy=mp)
        # FSDP2 keeps a root gathered from its forward to its backward (the backward starts there at once)
        return fully_shard(module, mesh=self.mesh, mp_policy=mp)

    def shard_encoder(self, encoder: nn.Module) -> None:
        """text_encoder.shard: the prompt encoder's text encoders, one unit per transformer layer (PromptEncoder's
        plan). fully_shard moves one unit at a time to the device, so the whole encoders never are there at once.
        They are stored in their compute dtype already (models.build_networks), hence no policy: gathered as
        stored, the same operations run on the same values, and the Cond is the unsharded one bit for bit. Called
        forward-only, every unit is resharded as its forward returns (the root, which FSDP2 would keep gathered for
        a backward, holds no parameters)."""
        self.shard(encoder, encoder, MixedPrecisionPolicy())

    @property
    def reads_weights(self) -> bool:
        return self.is_main  # where the files cannot be read by rows: load_state broadcasts rank 0's tensors

    def load_state(self, module, state):
        if not any(isinstance(value, StoredTensor) for value in state.values()):
            set_model_state_dict(module, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            return
        with torch.no_grad():
            for name, target in module.state_dict().items():
                local = target.to_local() if isinstance(target, DTensor) else target
                start = first_row(target)
                value = state[name]
                if isinstance(value, StoredTensor):
                    value = value.read(start, start + len(local)) if local.dim() else value.read()
                else:  # built on every rank (adapter weights, buffers): rank 0's, as the whole read gives them
                    value = value.to(self.device).contiguous()
                    dist.broadcast(value, 0)
                    value = value[start:start + len(local)] if local.dim() else value
                local.copy_(value)

    def prepare(self, networks):
        if self.cfg.text_encoder.shard:
            self.shard_encoder(networks.encoder)  # before place(), which would move it whole to the device
        self.place(networks, shard=self.shard)
        once = self.cfg.parallel.gather_frozen_once
        if once and any(True for _ in networks.teacher.parameters()):
            keep_gathered(networks.teacher)
        o = self.cfg.optim
        generator, fake_score = (FSDP2Trainable(net, self.make_optimizer(net, lr), o.grad_clip) for net, lr in
                                 ((networks.generator, o.lr_generator), (networks.fake_score, o.lr_fake_score)))
        fake_score.gather_frozen_once = once
        return generator, fake_score

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
        load_dcp(state, folder / "dcp")  # in place, resharded to this world size
        for name, tr in trainables.items():
            set_state_dict(tr.inner, tr.optimizer, model_state_dict=state[name]["model"],
                           optim_state_dict=state[name]["optim"])
        return read_rank_state(folder, self.rank)
