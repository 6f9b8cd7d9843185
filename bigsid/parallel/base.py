"""The interface between the training loop and a parallel backend.

The trainer only ever calls what is here: wrap the three networks, backward/step/freeze a trained network,
reduce metrics, gather per-rank state, save and load checkpoints. Sharding, mixed-precision policy and
collectives stay inside the backend module that implements them.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn

from bigsid.config import Config


class BackendError(ValueError):
    """A parallel set-up that cannot run as configured; the message says what to change."""


def start_state(module: nn.Module, prefix: str, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole state dict a network built on the meta device starts from: for each tensor still on meta, the
    teacher's (`source`, named as the teacher's denoiser names it; `prefix` is where the denoiser sits in `module`,
    and a peft adapter's `base_layer` holds what the teacher's layer held) in the dtype the network stores it (a
    bf16 teacher's tensors are rounded once, as from_pretrained rounds them, and broadcast at half the bytes), and
    what the module already holds (adapter weights, buffers) for the rest."""
    state = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if not t.is_meta:
            state[name] = t.detach()
            continue
        key = name.removeprefix(prefix).replace(".base_layer.", ".")
        if key not in source:
            raise BackendError(f"the teacher's weights have no {key!r} for the network's {name!r}: the networks "
                               "were not built from this teacher (models.build_networks)")
        state[name] = source[key].to(t.dtype)
    return state


def local_shards(tensors):
    """The local shards of (possibly sharded) tensors: foreach kernels then run on plain tensors in place."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


class Trainable:
    """One trained network with its optimizer.

    `module` is what the trained phase calls (a DDP wrapper, say); `inner` is the bare network, used without
    gradients or while frozen, so no wrapper's gradient hooks run for the other network's phase."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 inner: nn.Module | None = None):
        self.module = module
        self.inner = inner if inner is not None else module
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.params = [p for p in self.inner.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def micro_step(self, sync: bool):
        """Around one micro-batch's forward and backward; `sync`: the last before step(), where a multi-process
        backend reduces the accumulated gradients across ranks (one process has nothing to reduce)."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def stored_params(self) -> list[torch.Tensor]:
        """The trained parameters as the backend stores them (sharded tensors where sharded), in `params` order,
        detached: the EMA is kept in the same form and swapped into them in place."""
        return [p.detach() for p in self.params]

    def grad_norm(self) -> torch.Tensor:
        norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded: the global norm

    def weights_finite(self) -> torch.Tensor:
        """Whether this rank's part of the trained weights is all finite, as a bool on the device (the caller
        combines ranks and reads it when it must): a finite gradient can still step to inf or NaN (an overflowing
        learning rate). One fused pass: the max-abs norm, NaN if any element is, and unlike a sum of squares it
        cannot overflow on finite weights."""
        norms = torch._foreach_norm(local_shards(self.stored_params()), float("inf"))
        return torch.isfinite(torch.stack(norms)).all()

    def moments_finite(self) -> torch.Tensor:
        """Whether this rank's optimizer state (Adam's moments) is all finite, as a bool on the first weight's
        device. A finite gradient whose square overflows float32 (|g| > ~1.8e19) makes exp_avg_sq inf while the
        weights stay finite, and every later update of those elements is m / inf = 0: the network silently stops
        learning. beta2 * inf stays inf, so a check now and then (the trainer's polls) sees it whenever it came."""
        state = getattr(self.optimizer, "state", {})
        tensors = [v for s in state.values() for v in s.values()
                   if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
        device = self.params[0].device if self.params else torch.device("cpu")
        if not tensors:
            return torch.ones((), dtype=torch.bool, device=device)
        norms = torch._foreach_norm(local_shards(tensors), float("inf"))  # max-abs: NaN or inf if any element is
        return torch.stack([n.to(device) for n in norms]).isfinite().all()

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient norm, 1.0 if the update was applied else 0.0), both on the device. The norm is global, so
        every rank decides alike, and a non-finite one never reaches the weights. The decision stays on the device:
        the fused Adam kernel takes it as `found_inf` (GradScaler's protocol) and then leaves weights, moments and
        step count as they were, which is what not calling step() would do, without the host reading the norm."""
        norm = self.grad_norm()
        skip = (~torch.isfinite(norm)).float()
        self.optimizer.found_inf = skip
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        return norm, 1.0 - skip

    @contextlib.contextmanager
    def frozen(self):
        """No parameter gradients while the other network trains; inputs still carry the graph."""
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield self.inner
        finally:
            for p in self.params:
                p.requires_grad_(True)


class Backend:
    """Single-process defaults for everything but wrapping and checkpoint format."""

    rank: int = 0
    world_size: int = 1
    device: torch.device

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # whether this rank reads the teacher's weights for the networks built empty (Networks.initial_state)
    reads_weights = True
    # whether every rank reads the tensors it fills from the teacher's files where they allow (Networks.stored_weights)
    reads_stored = False

    def place(self, networks, shard=None) -> None:
        """Every network on this rank's device, before any wrapping. The VAE only on rank 0, the one rank that decodes
        (sample grids, evaluation images): the others drop it rather than hold it idle beside the three networks.

        A backend that shards passes `shard(module, denoiser)`, applied to each of the three networks that holds
        parameters before it holds any memory: one built on the meta device (models.build_networks) is sharded,
        then materialised on the device, then loaded (`fill`) with the teacher's weights and the adapter
        weights and buffers it was built with: a rank holds its shards of it, and only the ranks that read
        (`reads_weights`) hold the teacher's fp32 weights whole, once, for all three; where the teacher's files
        allow, every rank reads what it fills from them instead (`reads_stored`: FSDP2 its rows of each tensor,
        ZeRO-3 each module's tensors) and none holds them whole. A backend that can only
        partition tensors that hold values (ZeRO-3) fills instead, partitioning each piece as it is filled. The
        teacher goes first: its state, cast to its dtype, is let go before the trained networks take memory."""
        if not self.is_main:
            networks.vae = None
        for net in (networks.encoder, networks.vae):
            if net is not None:
                net.to(self.device)
        denoisers = ((networks.teacher, networks.teacher, ""), (networks.generator, networks.generator.net, "net."),
                     (networks.fake_score, networks.fake_score, ""))
        empty = [module for module, _, _ in denoisers if any(p.is_meta for p in module.parameters())]
        source = self.weights(networks) if empty else {}
        for module, denoiser, prefix in denoisers:
            if module not in empty:
                module.to(self.device)
                # the teacher of a LoRA fake score (models.AdapterOff) is the fake score: nothing of its own
                if shard is not None and any(True for _ in module.parameters()):
                    shard(module, denoiser)
                continue
            state = start_state(module, prefix, source) if source else {}
            if shard is not None:
                shard(module, denoiser)
            self.fill(module, state)
        # read once; what they hold on to (the host tensors of the teacher) goes
        networks.initial_state = networks.stored_weights = None

    def weights(self, networks) -> dict:
        """What this rank fills the networks built empty from (start_state's source). Where the backend
        `reads_stored` and every rank can read the teacher's safetensors files tensor by tensor: those, from which
        each rank reads what it fills, so that none holds the fp32 weights whole. Else the teacher's fp32 state dict
        where this rank reads weights, and nothing where it does not (load_state gives it the reading rank's)."""
        stored = networks.stored_weights() if self.reads_stored and networks.stored_weights is not None else None
        if self.reads_stored and self.reduce(torch.tensor([float(stored is not None)], device=self.device), "min")[0]:
            return stored
        return networks.initial_state() if self.reads_weights else {}

    def fill(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Materialise a network built on the meta device (sharded already, where `shard` did) on this rank's
        device, then load `state` (start_state's; empty on a rank that does not read), keeping the buffers it was
        built with."""
        buffers = {name: b.detach() for name, b in module.named_buffers() if not b.is_meta}
        module.to_empty(device=self.device)
        with torch.no_grad():
            for name, b in buffers.items():  # non-persistent ones are in no state dict
                module.get_buffer(name).copy_(b)
        self.load_state(module, state)

    def load_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a whole state dict into `module` as this backend holds it (every name must be there)."""
        module.load_state_dict(state)

    def prepare(self, networks) -> tuple[Trainable, Trainable]:
        """Place and wrap teacher, generator and fake score; return (generator, fake_score) trainables.
        Optimizers are built after wrapping, over the parameters the wrapper will update."""
        raise NotImplementedError

    def make_optimizer(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = [p for p in module.parameters() if p.requires_grad]
        # fused: one kernel per step, and the one Adam implementation that skips a non-finite step on the device
        return torch.optim.Adam(params, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                fused=True)

    def autocast(self):
        enabled = self.cfg.train.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean of each scalar over ranks, read to the host (a synchronisation: for log steps)."""
        return {k: float(v) for k, v in values.items()}

    def reduce(self, values: torch.Tensor, op: str) -> list:
        """A 1-D tensor reduced elementwise over ranks ("sum", "min" or "max") and read to the host, one
        synchronisation for everything the loop must know at a step boundary."""
        return values.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (on every rank)."""
        return [obj]

    def barrier(self) -> None:
        pass

    def save(self, folder: Path, trainables: dict[str, Trainable], ema: dict[str, torch.Tensor],
             rank_state: dict[str, torch.Tensor], asynchronous: bool = False) -> Future | None:
        """Write weights, optimizer states and EMA (however sharded) and this rank's own tensors.

        asynchronous: copy the state to host memory now and return a Future of the writes, so training goes on
        while they run; the caller commits the checkpoint once every rank's Future is done."""
        raise NotImplementedError

    def load(self, folder: Path, trainables: dict[str, Trainable], ema: dict[str, torch.Tensor]) \
            -> dict[str, torch.Tensor] | None:
        """Load into the trainables and the `ema` tensors in place; return this rank's own tensors if saved."""
        raise NotImplementedError
