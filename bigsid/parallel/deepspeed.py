"""DeepSpeed ZeRO stage 2 or 3: one engine per trained network, the frozen teacher held by ZeRO-3 too.

Stage 2 partitions gradients and optimizer states over ranks; stage 3 partitions the parameters as well and
gathers each module's just before it runs. bigsid keeps its own mixed-precision recipe on every backend: fp32
parameters and optimizer states (the master weights), bf16 compute under the trainer's autocast, so losses
and checkpoints mean the same thing whichever backend wrote them. The optimizer is bigsid's torch Adam handed
to the engine (DeepSpeed's own would compile FusedAdam and take its betas from elsewhere).

Each engine checkpoints into its own folder (two engines in one folder overwrite each other's files). Beside
them, every rank writes the generator's weights and EMA it holds (its partitions under stage 3) as
safetensors, so `bigsid export` reads a DeepSpeed run without DeepSpeed or unpickling. DeepSpeed's own files
are read back with weights_only loading.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from bigsid.checkpoint import read_rank_state, reading
from bigsid.parallel.base import Backend, BackendError, Trainable
from bigsid.parallel.dist import Collectives, init_process_group
from bigsid.parallel.local import _save_tensors

TAG = "state"  # one tag per checkpoint folder; bigsid's step-N folders do the versioning
WEIGHTS = "weights.rank{rank}.safetensors"

# Keys bigsid sets from its own config; a user DeepSpeed file may repeat them only with the same value.
OWNED = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.batch_size / (train.micro_batch x world size)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
}
# Sections whose job bigsid does itself; naming them in the user file would silently train something else.
REFUSED = {
    "optimizer": "set optim.* (bigsid builds Adam with the papers' betas)",
    "scheduler": "set optim.lr_schedule",
    "fp16": "use train.precision=bf16 (fp16 loss scaling is not supported)",
    "bf16": "use train.precision=bf16 (compute in bf16, fp32 master weights)",
    "torch_autocast": "use train.precision=bf16",
}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_user_config(path: str) -> dict:
    """The user's DeepSpeed JSON file (communication buckets, offload, ...), checked against what bigsid owns."""
    if not path:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackendError(f"parallel.deepspeed_config = {path!r}: no such file")
    try:
        user = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise BackendError(f"parallel.deepspeed_config = {path!r} is not valid JSON: {err}") from None
    if not isinstance(user, dict):
        raise BackendError(f"parallel.deepspeed_config = {path!r} must hold a JSON object")
    for key, fix in REFUSED.items():
        if key in user:
            raise BackendError(f"parallel.deepspeed_config: remove the '{key}' section; {fix}")
    return user


def engine_config(cfg, world_size: int, user: dict) -> dict:
    """bigsid's DeepSpeed config, with the user's extra keys merged in; a contradiction is refused."""
    stage = cfg.parallel.zero_stage
    local = cfg.train.batch_size // world_size
    micro = cfg.train.micro_batch or local
    ours = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": local // micro,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # bigsid's torch.optim.Adam, partitioned by ZeRO
        "steps_per_print": 2**62,  # bigsid logs its own metrics
    }
    flat_ours, flat_user = _flatten(ours), _flatten(user)
    for key, value in flat_user.items():
        if key in flat_ours and flat_ours[key] != value:
            owner = OWNED.get(key, "bigsid")
            raise BackendError(f"parallel.deepspeed_config sets {key} = {value!r}, but bigsid sets it to "
                               f"{flat_ours[key]!r} from {owner}: remove the key or change {owner}")
    merged = json.loads(json.dumps(user))
    for key, value in flat_ours.items():
        node = merged
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return merged


def _safe_checkpoint_engine(config):
    """DeepSpeed's torch checkpoint engine, reading with weights_only=True: a checkpoint cannot run code. Its
    optimizer files hold three plain-data DeepSpeed types besides tensors; exactly those are allowed."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            with reading(path), torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(config)


def _partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


class DeepSpeedTrainable(Trainable):
    """A trained network inside its engine: the engine does backward, reduction, clipping and the step, and
    skips a step whose global gradient norm is not finite (on every rank alike).

    Under ZeRO-3, parameters of at most stage3_param_persistence_threshold elements (DeepSpeed's default, 1e5:
    biases, norms, small convolutions) stay whole on every rank between steps, so they are not gathered at each use.
    Their partitions remain what is stored (the EMA, checkpoints), and DeepSpeed rebuilds the whole copies from them
    after each step; a write into the partitions at any other time (the EMA swapped in for sampling and swapped back)
    leaves the whole copies stale until they are rebuilt here, before the next forward."""

    def __init__(self, engine, grad_clip: float):
        super().__init__(engine, engine.optimizer, grad_clip, inner=engine.module)
        self.engine = engine
        self.persistent = [p for p in self.params if getattr(p, "ds_persist", False)]
        self.rebuilt_from = self._partition_versions()
        if self.persistent:
            # before the engine's own hooks fetch anything for this forward
            self.inner.register_forward_pre_hook(lambda module, args: self._rebuild_persistent(), prepend=True)

    def _partition_versions(self) -> list[int]:
        """In-place writes into the persistent parameters' partitions, counted by autograd's version counters."""
        return [p.ds_tensor._version for p in self.persistent]

    def _rebuild_persistent(self) -> None:
        # Every rank swaps and steps alike, so every rank sees the same versions and joins the same all-gather.
        if self._partition_versions() != self.rebuilt_from:
            # every parameter back to its partition (gathers in flight finished first), then the persistent ones
            # gathered whole again: what the engine itself does around loading a checkpoint
            self.engine.empty_partition_cache()
            self.persistent[0].all_gather(self.persistent)
            self.rebuilt_from = self._partition_versions()

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # the trainer already divides each micro-batch's loss by the whole batch
        self.engine.backward(loss, scale_wrt_gas=False)
        if not sync:
            self.engine.step()  # a micro-step inside the accumulation: DeepSpeed only counts it

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        # ZeRO decides the skip on the host itself (its overflow check reads the norm), so this step synchronises
        self.engine.step()
        self.rebuilt_from = self._partition_versions()  # the engine rebuilt the whole copies after its update
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
        return norm, torch.isfinite(norm).float()

    def stored_params(self) -> list[torch.Tensor]:
        # stage 3: each parameter's own partition (flat, padded); stage 2: the whole parameter
        return [p.ds_tensor if _partitioned(p) else p.detach() for p in self.params]


class DeepSpeedBackend(Collectives, Backend):
    def __init__(self, cfg):
        super().__init__(cfg)
        try:
            import deepspeed
        except ImportError:
            raise BackendError("parallel.backend=deepspeed needs DeepSpeed: pip install 'bigsid[deepspeed]'") \
                from None
        self.deepspeed = deepspeed
        self.rank, self.world_size, self.device = init_process_group(cfg.train.device)
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group made above
        self.config = engine_config(cfg, self.world_size, read_user_config(cfg.parallel.deepspeed_config))
        self.stage = cfg.parallel.zero_stage

    def _engine(self, module: nn.Module, optimizer: torch.optim.Optimizer | None):
        engine, *_ = self.deepspeed.initialize(model=module, optimizer=optimizer, config=self.config)
        engine.checkpoint_engine = _safe_checkpoint_engine(engine._config)
        return engine

    def prepare(self, networks):
        self.place(networks)
        if self.stage == 3 and any(True for _ in networks.teacher.parameters()):
            # an engine without optimizer: partitioned and gathered per module, never updated
            self.teacher_engine = self._engine(networks.teacher, None)
        o = self.cfg.optim
        trainables = []
        for net, lr in ((networks.generator, o.lr_generator), (networks.fake_score, o.lr_fake_score)):
            engine = self._engine(net, self.make_optimizer(net, lr))
            trainables.append(DeepSpeedTrainable(engine, o.grad_clip))
        return tuple(trainables)

    def _weights(self, tr: Trainable, ema: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
        """The generator's parameters, buffers and EMA as this rank holds them, and the layout to reassemble
        them: stage 3 partitions are flat slices, padded at the end, of rank-ordered parameters."""
        tensors, shapes = {}, {}
        for name, p in tr.inner.named_parameters():
            tensors[f"model.{name}"] = p.ds_tensor if _partitioned(p) else p
            shapes[f"model.{name}"] = list(p.ds_shape if _partitioned(p) else p.shape)
        saved = tr.inner.state_dict().keys()  # the persistent buffers: what a one-process checkpoint holds
        for name, b in tr.inner.named_buffers():
            if name in saved:
                tensors[f"model.{name}"], shapes[f"model.{name}"] = b, list(b.shape)
        for name, v in ema.items():
            tensors[f"ema.{name}"], shapes[f"ema.{name}"] = v, shapes[f"model.{name}"]
        meta = {"world_size": str(self.world_size), "partitioned": str(self.stage == 3), "shapes": json.dumps(shapes)}
        return tensors, meta

    def save(self, folder, trainables, ema, rank_state, asynchronous=False):  # config refuses asynchronous
        for name, tr in trainables.items():
            tr.engine.save_checkpoint(str(folder / name), tag=TAG, save_latest=False)
        if self.stage == 3 or self.is_main:  # stage 2 holds whole weights, the same on every rank
            tensors, meta = self._weights(trainables["generator"], ema)
            _save_tensors(tensors, folder / WEIGHTS.format(rank=self.rank), meta)
        _save_tensors(rank_state, folder / f"rank{self.rank}.safetensors")

    def load(self, folder, trainables, ema):
        written = read_world_size(folder)
        if written != self.world_size:
            raise BackendError(f"{folder} was written by {written} DeepSpeed ranks; ZeRO checkpoints resume on the "
                               f"same number of ranks: relaunch with {written}")
        for name, tr in trainables.items():
            tr.engine.load_checkpoint(str(folder / name), tag=TAG, load_optimizer_states=True,
                                      load_lr_scheduler_states=False)
        # the EMA only: the engines restored the weights
        path = folder / WEIGHTS.format(rank=self.rank if self.stage == 3 else 0)
        with reading(path), safe_open(path, framework="pt") as f, torch.no_grad():
            for k, v in ema.items():
                v.copy_(f.get_tensor(f"ema.{k}"))
        return read_rank_state(folder, self.rank)


def _layout(folder: Path) -> tuple[int, dict[str, list[int]], bool]:
    """(world size, shapes, partitioned) as rank 0's weights file records them."""
    path = folder / WEIGHTS.format(rank=0)
    with reading(path), safe_open(path, framework="pt") as f:
        meta = f.metadata()
        return int(meta["world_size"]), json.loads(meta["shapes"]), meta["partitioned"] == "True"


def read_world_size(folder: Path) -> int:
    return _layout(folder)[0]


def _read(path: Path) -> dict[str, torch.Tensor]:
    with reading(path):
        return load_file(path)


def read_weights(folder: Path) -> tuple[dict, dict]:
    """Whole (state, EMA) dicts on the CPU from a DeepSpeed checkpoint folder, for export."""
    world, shapes, partitioned = _layout(folder)
    if partitioned:
        parts = [_read(folder / WEIGHTS.format(rank=r)) for r in range(world)]
        whole = {}
        for key, shape in shapes.items():
            if parts[0][key].shape != torch.Size(shape):  # a flat partition: join ranks, drop the padding
                whole[key] = torch.cat([p[key] for p in parts])[:math.prod(shape)].reshape(shape)
            else:
                whole[key] = parts[0][key]
    else:
        whole = _read(folder / WEIGHTS.format(rank=0))
    return tuple({k.removeprefix(p): v for k, v in whole.items() if k.startswith(p)} for p in ("model.", "ema."))
