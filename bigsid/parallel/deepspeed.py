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

DeepSpeed loads a ZeRO checkpoint only on the number of ranks that wrote it, and its universal checkpoint (the
ds_to_universal conversion and the engine's load_universal) unpickles every file it reads. On another number of
ranks bigsid therefore reads the per-rank ZeRO files itself, weights_only and memory-mapped: each parameter's fp32
master weights and Adam moments lie in runs of its flattened elements across those files, and every rank copies,
of each run, what overlaps the elements its engine now holds (`_repartition`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from bigsid.checkpoint import CheckpointError, read_rank_state, reading
from bigsid.families import StoredTensor
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


def _read_ds(path: Path, map_location=None, mmap: bool = False):
    """A file DeepSpeed wrote, read with weights_only=True: a checkpoint cannot run code. Its optimizer files hold
    three plain-data DeepSpeed types besides tensors; exactly those are allowed. mmap: a tensor's bytes are read
    from disk only where it is used."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with reading(path), torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _safe_checkpoint_engine(config):
    """DeepSpeed's torch checkpoint engine, reading as _read_ds does."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            return _read_ds(path, map_location)

    return SafeTorchCheckpointEngine(config)


def _tensor(value: torch.Tensor | StoredTensor) -> torch.Tensor:
    """A tensor of start_state's state: read from the teacher's files where it is stored there."""
    return value.read() if isinstance(value, StoredTensor) else value


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

    @contextlib.contextmanager
    def micro_step(self, sync):
        yield
        if not sync:
            self.engine.step()  # a micro-step inside the accumulation: DeepSpeed only counts it

    def backward(self, loss: torch.Tensor) -> None:
        # the trainer already divides each micro-batch's loss by the whole batch
        self.engine.backward(loss, scale_wrt_gas=False)

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

    @property
    def reads_weights(self) -> bool:
        return self.stage == 2 or self.is_main  # ZeRO-3: fill() broadcasts rank 0's values

    @property
    def reads_stored(self) -> bool:
        return self.stage == 3  # each rank each module's own tensors as it fills that module

    def fill(self, module, state):
        """ZeRO-3 partitions a network as it fills it, module by module, each after the modules inside it: the
        module's own parameters are materialised whole on the device and filled (from `state`: every rank's read of
        the files where it has one, else rank 0's), then deepspeed.zero.Init(module=...) partitions them,
        broadcasting rank 0's values first, in the parameter's dtype (a bf16 teacher's at half the bytes), and skips
        the parameters of the modules inside, partitioned already. Buffers stay whole; those read from the file are
        broadcast from rank 0. A rank so holds its partitions and one module whole, and the engine, whose own Init
        finds every parameter partitioned, converts nothing again. ZeRO-2 keeps whole weights on every rank by
        design: filled whole."""
        if self.stage != 3:
            return super().fill(module, state)

        from deepspeed.utils.groups import _get_zero_param_intra_parallel_group as hpz_group

        def span(p):  # bytes a parameter takes in `whole`, rounded up so that every dtype's view is aligned
            return -(-p.numel() * p.element_size() // 64) * 64

        modules = list(reversed(list(module.named_modules())))
        # Every module's parameters materialised in turn in one buffer: allocated and freed module after module
        # between the partitions, they would leave the host's heap full of holes (half a network more at the peak).
        whole = torch.empty(max(sum(map(span, m.parameters(recurse=False))) for _, m in modules), dtype=torch.uint8,
                            device=self.device)
        with torch.no_grad():
            for name, leaf in modules:
                prefix = f"{name}." if name else ""
                offset = 0
                for n, p in list(leaf.named_parameters(recurse=False)):
                    t = whole[offset:offset + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
                    offset += span(p)
                    if not p.is_meta:  # built real: an adapter's weights
                        t.copy_(p)
                    elif state:
                        t.copy_(_tensor(state[prefix + n]))
                    setattr(leaf, n, nn.Parameter(t, requires_grad=p.requires_grad))
                for n, b in list(leaf.named_buffers(recurse=False)):
                    if b.is_meta:  # read from the file
                        b = _tensor(state[prefix + n]).to(self.device) if state else \
                            torch.empty_like(b, device=self.device)
                        dist.broadcast(b, 0)
                    setattr(leaf, n, b.to(self.device))
                if offset:
                    # hpZ's group (zero_hpz_partition_size): made by the first Init, then passed (Init makes it once)
                    self.deepspeed.zero.Init(module=leaf, config_dict_or_path=self.config,
                                             zero_param_parallel_group=hpz_group())

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
        written, _, partitioned = _layout(folder)
        if partitioned != (self.stage == 3):
            stage = 3 if partitioned else 2
            raise BackendError(f"{folder} was written by ZeRO stage {stage}; resume it with "
                               f"parallel.zero_stage={stage}")
        for name, tr in trainables.items():
            if written == self.world_size:
                tr.engine.load_checkpoint(str(folder / name), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
            else:
                self._repartition(folder / name / TAG, written, tr)
        _load_ema(folder, ema, self.rank)
        return read_rank_state(folder, self.rank)

    def _repartition(self, ckpt: Path, written: int, tr: DeepSpeedTrainable) -> None:
        """An engine's state from its ZeRO checkpoint written by `written` ranks, another number than now."""
        optimizer = tr.engine.optimizer
        if getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "params_in_nvme_and_cpu", False):
            raise BackendError(f"{ckpt} was written by {written} ranks, and ZeRO states offloaded to NVMe are not in "
                               f"memory to repartition: resume on {written} ranks, or without NVMe offload")
        runs, scalars, counters = _saved_runs(ckpt, written, self.stage == 3)
        flats = (optimizer.fp32_partitioned_groups_flat if self.stage == 3 else
                 optimizer.single_partition_of_fp32_groups)
        moments = {key for pieces in runs.values() for key in pieces} - {MASTER}
        for flat in flats:  # Adam's state, which it would otherwise create at its first step
            optimizer.optimizer.state[flat] = {k: v.to(flat.device) for k, v in scalars.items()} | \
                {k: torch.zeros_like(flat) for k in moments}
        with torch.no_grad():
            for name, p in tr.inner.named_parameters():
                if not p.requires_grad:
                    continue  # frozen (a LoRA generator's base layers): the network was built with them
                if name not in runs:
                    raise CheckpointError(f"{ckpt} holds no parameter {name}: it is not a checkpoint of this network")
                for flat, offset, count, first in self._held(optimizer, p):
                    for key, pieces in runs[name].items():
                        into = flat if key == MASTER else optimizer.optimizer.state[flat][key]
                        _fill(into[offset:offset + count], first, pieces)
                # the weights the network computes with, fp32 as the masters: this rank's partition, or whole
                weights, first = (p.ds_tensor, self.rank * p.ds_tensor.numel()) if _partitioned(p) else \
                    (p.data.view(-1), 0)
                _fill(weights, first, runs[name][MASTER])
        tr.engine.global_steps, tr.engine.global_samples, tr.engine.skipped_steps = counters

    def _held(self, optimizer, p: torch.Tensor) -> list[tuple[torch.Tensor, int, int, int]]:
        """Where this rank's ZeRO optimizer holds elements of a trained parameter: (the flat fp32 partition it steps,
        offset in it, element count, index of the first among the parameter's flattened elements)."""
        if _partitioned(p):  # stage 3: the rank's share of every parameter, in turn within a sub-group's partition
            group, offset, count = optimizer.grad_position[optimizer.get_param_id(p)]
            return [(optimizer.fp32_partitioned_groups_flat[group], offset, count, self.rank * count)]
        held = p._hp_mapping  # stage 2: the part of the parameter inside this rank's slice of the flat group
        if held is None:
            return []
        return [(optimizer.single_partition_of_fp32_groups[held.param_group_index], held.hp_fragment_address.start,
                 held.hp_fragment_address.numel, held.lp_fragment_address.start)]


# ---- reading ZeRO partitions written by another number of ranks ----

MASTER = "fp32"  # the master weights' runs, beside those of each optimizer state key
# DeepSpeed's file names in an engine's tag folder (model-parallel rank 00: bigsid has no model parallelism)
OPTIM_FILE = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
MODEL_FILE = {False: "mp_rank_00_model_states.pt", True: "zero_pp_rank_0_mp_rank_00_model_states.pt"}


def _share(rank: int, size: int, numel: int) -> tuple[int, int]:
    """(first element, count) of a rank's ZeRO-3 share of a parameter: `size` = ceil(numel / world) elements each,
    the last rank's padded past the parameter's end."""
    return rank * size, max(0, min(size, numel - rank * size))


def _fill(into: torch.Tensor, first: int, runs: list) -> None:
    """Write into `into`, elements [first, first + its numel) of a flattened tensor, what the runs hold of them:
    (first element, count, a 1-D tensor or safetensors slice of them, the file it is read from)."""
    end = first + into.numel()
    for start, count, source, path in runs:
        lo, hi = max(start, first), min(start + count, end)
        if lo < hi:
            with reading(path):  # memory-mapped: the bytes are read here
                into[lo - first:hi - first] = source[lo - start:hi - start]


def _saved_runs(ckpt: Path, world: int, partitioned: bool) -> tuple[dict, dict, tuple]:
    """Where an engine's ZeRO checkpoint of `world` ranks holds each trained parameter: {name: {MASTER or an
    optimizer state key: runs (see _fill)}}; the optimizer's scalar state (Adam's step); the engine's counters."""
    model = _read_ds(ckpt / MODEL_FILE[partitioned], mmap=True)
    numels = {name: math.prod(shape) for group in model["param_shapes"] for name, shape in group.items()}
    runs = defaultdict(lambda: defaultdict(list))
    done = defaultdict(int)  # stage 2: elements of each parameter in the ranks read so far
    for rank in range(world):
        path = ckpt / OPTIM_FILE.format(rank=rank)
        state = _read_ds(path, mmap=True)["optimizer_state_dict"]
        with reading(path):
            placed = []  # (name, group, offset in the group's partition, first element, count)
            if partitioned:  # every parameter's share in turn, each sub-group's in its own partition
                flats, adam = state["fp32_flat_groups"], state["optimizer_state_dict"]["state"]
                group, offset = 0, 0
                for name, numel in numels.items():
                    size = -(-numel // world)
                    if offset == flats[group].numel():
                        group, offset = group + 1, 0
                    placed.append((name, group, offset, *_share(rank, size, numel)))
                    offset += size
                if (group, offset) != (len(flats) - 1, flats[-1].numel()):
                    raise ValueError(f"its partitions do not add up to the parameters {MODEL_FILE[partitioned]} lists")
            else:  # the rank's slice of each group's flattened parameters, as DeepSpeed records it
                flats, adam = state["single_partition_of_fp32_groups"], state["base_optimizer_state"]["state"]
                for group, fragments in enumerate(state["param_slice_mappings"]):
                    for name, at in fragments.items():
                        placed.append((name, group, at.start, done[name], at.numel))
                        done[name] += at.numel
            for name, group, offset, first, count in placed:
                # the per-element states (Adam's moments) are laid out as the master weights: DeepSpeed saves these
                # without the padding at the end of the last rank's partition, the moments with it
                for key, t in {MASTER: flats[group], **adam[group]}.items():
                    if t.dim() == 1:
                        runs[name][key].append((first, count, t[offset:offset + count], path))
    for name, numel in numels.items():
        held = {key: sum(count for _, count, _, _ in pieces) for key, pieces in runs[name].items()}
        if held.get(MASTER) != numel or any(n != numel for n in held.values()):
            raise CheckpointError(f"{ckpt} holds {held} of the {numel} elements of {name}: its ZeRO files are "
                                  "damaged or were written by another DeepSpeed version; move the checkpoint away "
                                  "to resume from an older one")
    scalars = {k: v for k, v in adam[0].items() if v.dim() == 0}
    return runs, scalars, (model["global_steps"], model["global_samples"], model["skipped_steps"])


def _load_ema(folder: Path, ema: dict[str, torch.Tensor], rank: int) -> None:
    """The EMA as this rank holds it (whole under stage 2, its shares under stage 3) from the weights files of a
    checkpoint written by any number of ranks."""
    world, shapes, partitioned = _layout(folder)
    paths = [folder / WEIGHTS.format(rank=r) for r in range(world if partitioned else 1)]
    files = []
    for path in paths:
        with reading(path):
            files.append(safe_open(path, framework="pt"))
    with torch.no_grad():
        for name, v in ema.items():
            key = f"ema.{name}"
            if not partitioned:
                with reading(paths[0]):
                    v.copy_(files[0].get_tensor(key))
                continue
            runs = []
            for r, (path, f) in enumerate(zip(paths, files)):
                with reading(path):
                    piece = f.get_slice(key)
                    runs.append((*_share(r, piece.get_shape()[0], math.prod(shapes[key])), piece, path))
            _fill(v, rank * v.numel(), runs)


def _layout(folder: Path) -> tuple[int, dict[str, list[int]], bool]:
    """(world size, shapes, partitioned) as rank 0's weights file records them."""
    path = folder / WEIGHTS.format(rank=0)
    with reading(path), safe_open(path, framework="pt") as f:
        meta = f.metadata()
        return int(meta["world_size"]), json.loads(meta["shapes"]), meta["partitioned"] == "True"


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
