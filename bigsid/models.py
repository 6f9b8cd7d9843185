"""The three networks.

A denoiser is any module `net(x_t, timestep, cond) -> prediction` with a `prediction_type` attribute (epsilon,
v_prediction, flow or sample), called at the time its schedule says (`Schedule.timestep`); bigsid.families adapts
each diffusers family to it. `predict` turns it into the x0- or eps-prediction the objectives need, with
classifier-free guidance done in eps space on one batched call. The generator and the fake score start as copies
of the teacher's network. All three are built empty (on the meta device) from its config and get their weights
from the backend, which shards them first where it shards (fsdp2) or partitions them as it fills them (ZeRO-3)
(`Networks.initial_state`), so a rank that shards holds no whole network on the host but the weights it reads:
from the teacher's safetensors files (`Networks.stored_weights`), with FSDP2 its own rows of each tensor, with ZeRO-3
each module's tensors as it fills that module.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from bigsid.config import Config
from bigsid.diffusion import SD_SCHEDULER_CONFIG, Schedule, VPSchedule
from bigsid.families import Family, StoredTensor, TeacherError, load_network, load_teacher, stored_weights
from bigsid.text import Cond

log = logging.getLogger("bigsid.models")


def predict(net: nn.Module, schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
            guidance: float = 1.0, out: str = "sample") -> torch.Tensor:
    """x0- (out='sample') or eps-prediction of `net` at grid times t, with classifier-free guidance `guidance`
    (both halves in one call).

    Guidance is eps_u + w (eps_c - eps_u), as the papers write it. Every parameterisation is an affine function of
    eps with coefficients of (x_t, t) alone, and weights 1 - w and w sum to one, so the same combination of the
    network's own outputs is exactly that, converted: done there, it never divides by a_t, which is 0 where a
    flow teacher's noise is pure."""
    if guidance == 1.0:
        return schedule.convert(net(x_t, schedule.timestep(t), cond), x_t, t, net.prediction_type, out)
    t2 = torch.cat([t, t])
    uncond, conditional = net(torch.cat([x_t, x_t]), schedule.timestep(t2), cond.with_uncond()).chunk(2)
    return schedule.convert(uncond + guidance * (conditional - uncond), x_t, t, net.prediction_type, out)


def stock_trailing_timesteps(t_init: int, chain: int) -> list[int]:
    """The timesteps EulerDiscreteScheduler's "trailing" spacing runs for `chain` steps over the grid cut at t_init
    (num_train_timesteps = t_init + 1), by its own numpy expression: np.arange's float arithmetic decides which way
    a point near .5 rounds (t_init=500, 14 steps: 250.50000000000006, not 250.5). Where it leaves the last point a
    hair above 0 (t_init=761, 11 steps: 2.3e-13), np.arange keeps it: a last timestep -1, which is on no grid, and
    a step the chain does not have."""
    n = t_init + 1
    return (np.arange(n, 0, -n / chain).round() - 1).astype(int).tolist()


def clean_step_counts(t_init: int, steps: int) -> list[int]:
    """The step counts nearest `steps` (one below, one above, within 1..t_init) whose stock trailing spacing over
    [0, t_init] has no extra step: what to ask for instead of one that has."""
    below = (k for k in range(steps - 1, 0, -1) if len(stock_trailing_timesteps(t_init, k)) == k)
    above = (k for k in range(steps + 1, t_init + 1) if len(stock_trailing_timesteps(t_init, k)) == k)
    return [k for k in (next(below, None), next(above, None)) if k is not None]


def trailing_timesteps(t_init: int, chain: int) -> list[int]:
    """diffusers' "trailing" spacing of `chain` steps over the grid cut at t_init; t_init first. Where the stock
    spacing adds its -1 (see stock_trailing_timesteps), a chain of this length has no stock scheduler's twin."""
    return stock_trailing_timesteps(t_init, chain)[:chain]


class OneStepGenerator(nn.Module):
    """G(z, c): the denoiser's x0-prediction from s_t_init * z at t_init, i.e. from pure noise (VP: sqrt(1 -
    abar_t_init) z; flow at t_init = N - 1: z itself).

    A few-step generator (`steps` = K > 1) chains K such predictions at the trailing timesteps t_init > t_1 > ...
    of [0, t_init], re-noising each x0 with the noise it implies, eps = (x_t - a_t x0) / s_t (DDIM, eta = 0): the
    chain stays a function of z, and the exported scheduler reproduces it exactly."""

    def __init__(self, net: nn.Module, schedule: Schedule, t_init: int, steps: int = 1):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.t_init = t_init
        self.steps = steps

    def timesteps(self, chain: int) -> list[int]:
        return trailing_timesteps(self.t_init, chain)

    def forward(self, z: torch.Tensor, cond: Cond, k: int | None = None, chain: int | None = None):
        """x0 after the first k steps (default all) of a `chain`-step chain (default self.steps). Only the last
        step keeps the graph: training a few-step generator at a random k trains every step of the chain."""
        timesteps = self.timesteps(chain or self.steps)[:k]
        x_t = self.schedule.s[self.t_init] * z
        for i, step_t in enumerate(timesteps):
            t = torch.full((z.shape[0],), step_t, device=z.device, dtype=torch.long)
            last = i == len(timesteps) - 1
            with torch.set_grad_enabled(torch.is_grad_enabled() and last):
                x0 = predict(self.net, self.schedule, x_t, t, cond)
            if not last:
                eps = self.schedule.convert(x0, x_t, t, "sample", "epsilon")
                x_t = self.schedule.add_noise(x0, eps, torch.full_like(t, timesteps[i + 1]))
        return x0


@dataclass
class Networks:
    """Everything a run builds from the teacher before the parallel backend wraps it."""

    teacher: nn.Module
    generator: OneStepGenerator
    fake_score: nn.Module
    schedule: Schedule
    encoder: nn.Module  # prompts -> Cond
    latent_shape: tuple[int, ...]
    scheduler_config: dict  # the teacher's, for its own multi-step sampler
    vae: nn.Module | None = None  # latents -> images, for sample grids
    truth: object | None = None  # toy.GMM when the teacher has an analytic ground truth
    vocabulary: list[str] | None = None  # the toy prompts
    family: Family | None = None  # a diffusers teacher's (bigsid.families); None for the toy MLP
    # The teacher network's fp32 state dict (its denoiser's names), for the networks built on the meta device (all
    # three from a diffusers teacher); called once, by the ranks that read weights (Backend.place). None: nothing is
    # on meta.
    initial_state: Callable[[], dict[str, torch.Tensor]] | None = None
    # The same weights as the teacher's files store them, read tensor by tensor where a rank asks (FSDP2: the rows
    # it holds; ZeRO-3: a module's tensors); the callable returns None where the files do not store them so
    # (families.stored_weights).
    stored_weights: Callable[[], dict[str, StoredTensor] | None] | None = None


class AdapterOff(nn.Module):
    """The teacher of a run whose fake score is the teacher's network plus a LoRA adapter (fake_score.lora_rank):
    that network with the adapter switched off. It holds no weights of its own: the fake score is not registered as
    a submodule, so the backends place, shard and checkpoint it once, as the fake score, and the teacher's calls go
    through the same (possibly sharded) module."""

    def __init__(self, fake_score: nn.Module):
        super().__init__()
        self.shared = [fake_score]  # a list: not a submodule
        self.prediction_type = fake_score.prediction_type

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        net = self.shared[0]
        # peft's switches also set requires_grad on the adapter (False off, True on). The generator's loss calls the
        # teacher while the fake score is frozen (Trainable.frozen); switched back on, the adapter would train in the
        # generator's backward, leaving that loss's gradients in the fake score's next update (and, under ZeRO-3,
        # its parameters queued twice in one gradient reduction, which DeepSpeed asserts against). Restored by name:
        # FSDP2 registers its gathered parameters in place of the shards for the call, and may keep them there.
        trained = {name: p.requires_grad for name, p in net.named_parameters()}
        net.network.disable_adapters()
        try:
            return net(x_t, t, cond)
        finally:
            net.network.enable_adapters()
            for name, p in net.named_parameters():
                p.requires_grad_(trained[name])


def lora_config(config: dict, network: str = "generator"):
    """The run's LoRA adapter of `network` (generator or fake_score) as a peft LoraConfig, or None when it trains in
    full.

    The contract between training and export: generator.lora_rank > 0 means the generator's UNet carries a peft
    LoRA adapter named "default" (what unet.add_adapter makes) of that rank, with lora_alpha = generator.lora_alpha
    (the rank when unset) on the modules listed in generator.lora_target_modules."""
    g = config[network]
    if not g.get("lora_rank"):
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise TeacherError(f"the {network} is a LoRA adapter and needs peft: pip install 'bigsid[lora]'") from None
    return LoraConfig(r=g["lora_rank"], lora_alpha=g.get("lora_alpha") or g["lora_rank"],
                      target_modules=list(g["lora_target_modules"]))


def empty_copy(denoiser: nn.Module) -> nn.Module:
    """A denoiser of the same architecture with its parameters on the meta device: no memory, no initialisation.
    Buffers are built for real (they are small, and a non-persistent one is in no state dict to load it from)."""
    from accelerate import init_empty_weights

    network = denoiser.network
    with init_empty_weights(include_buffers=False):
        empty = type(network).from_config(network.config)
    return type(denoiser)(empty, denoiser.prediction_type)


def add_adapter(network: nn.Module, adapter) -> None:
    """A peft adapter on `network`, initialised as peft initialises it even where the network is on the meta device
    (peft then moves the adapter there too): the adapter weights are small, and they are then real on every rank
    alike (torch is seeded), ready for the backend to load beside the teacher's weights."""
    from peft.tuners.lora import LoraLayer

    network.add_adapter(adapter)
    for layer in network.modules():
        if isinstance(layer, LoraLayer) and any(p.is_meta for p in layer.lora_A.parameters()):
            for name in layer.adapter_layer_names:
                getattr(layer, name).to_empty(device="cpu")
            layer.reset_lora_parameters("default", adapter.init_lora_weights)


def build_networks(cfg: Config) -> Networks:
    """Teacher, generator and fake score (both copies of the teacher's network), schedule and prompt encoder."""
    from bigsid import toy

    if cfg.teacher.kind == "toy_gmm":
        truth = toy.GMM.from_config(cfg.teacher.gmm)
        schedule = VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG)
        encoder = toy.VocabEncoder(truth.prompts)
        # The analytic teacher has no weights to copy: fit a small student network to it once, and start both
        # trained networks from that fit, as they would start from a pretrained teacher's weights. The Trainer
        # seeds torch with train.seed first, so `bigsid eval` rebuilds the same fitted teacher the run trained with.
        width = cfg.teacher.student_width or max(512, 4 * truth.dim)
        steps = cfg.teacher.student_fit_steps or round(1500 * math.sqrt(max(truth.dim, 16) / 16))
        student = toy.MLPDenoiser(truth.dim, len(truth.prompts) + 1, width, cfg.teacher.student_depth)
        fit = toy.fit_denoiser(student, encoder, truth, schedule, steps=steps, seed=cfg.train.seed)
        # the fit's own loss; how far its sampler is from the exact denoiser's is checked at the first evaluation
        log.info("toy teacher (MLP %d wide) fitted to the exact denoiser: final v mse %.4g after %d steps", width,
                 fit, steps)
        teacher = toy.GMMDenoiser(truth, schedule) if cfg.teacher.gmm_teacher == "exact" else student
        vae, shape, vocabulary, family = None, tuple(truth.latent_shape), truth.prompts, None
        scheduler_config = dict(SD_SCHEDULER_CONFIG)
        copy_of, initial_state, stored = copy.deepcopy, None, None  # fitted here, in memory, and tiny: plain copies
    else:
        # Frozen and computed in bf16 anyway: stored in bf16 it takes half the memory and autocast has no copies
        # of it to cast and keep for the backward through its input. A LoRA fake score's base network is the
        # teacher's, and keeps the fp32 it trains its adapter around. Like the trained networks, the teacher is
        # built empty, in that dtype, and filled by the backend (sharded first where it shards), tensor by tensor.
        bf16 = cfg.train.precision == "bf16" and not cfg.fake_score.lora_rank
        cached = bool(cfg.data.text_cache)
        loaded = load_teacher(cfg.teacher.path, cfg.teacher.revision, cfg.teacher.prediction_type,
                              cfg.teacher.text_max_length, torch.bfloat16 if bf16 else None, text_encoders=not cached,
                              weights=False)
        student = teacher = loaded.denoiser
        schedule, encoder, vae, scheduler_config = loaded.schedule, loaded.encoder, loaded.vae, loaded.scheduler_config
        shape, family = loaded.latent_shape, loaded.family
        truth = toy.GMM.load(cfg.teacher.path)  # None unless the folder is a toy teacher with a ground truth
        vocabulary = truth.prompts if truth is not None else None
        vae.requires_grad_(False).eval()
        if cached:
            from bigsid.text_cache import TextCache, identity

            encoder = TextCache(cfg.data.text_cache, identity(cfg))
        elif cfg.train.precision == "bf16":
            encoder.to(torch.bfloat16)  # T5 included: bf16 has fp32's range, where fp16 overflows T5's activations
        copy_of = empty_copy

        def initial_state(path=cfg.teacher.path, revision=cfg.teacher.revision, like=teacher):
            return type(like)(load_network(family, path, revision), like.prediction_type).state_dict()

        def stored(path=cfg.teacher.path, revision=cfg.teacher.revision, like=teacher):
            empty = {name: t for name, t in like.state_dict(keep_vars=True).items() if t.is_meta}
            return stored_weights(family, path, revision, empty)
    generator_net = copy_of(student)
    fake_score = student if cfg.fake_score.lora_rank else copy_of(student)
    if cfg.fake_score.lora_rank:
        teacher = AdapterOff(fake_score)
    teacher.requires_grad_(False).eval()
    for net in (generator_net, fake_score):
        net.requires_grad_(True).train()
    for name, net in (("generator", generator_net), ("fake_score", fake_score)):
        adapter = lora_config(asdict(cfg), name)
        if adapter is not None:
            if not hasattr(net.network, "add_adapter"):
                raise TeacherError(f"{name}.lora_rank={adapter.r}: diffusers' {type(net.network).__name__} takes no "
                                   f"LoRA adapter; train the {name} in full ({name}.lora_rank=0)")
            net.network.requires_grad_(False)
            add_adapter(net.network, adapter)  # only the adapter's weights train
    for name, net in (("generator", generator_net), ("fake_score", fake_score), ("teacher", teacher)):
        network = getattr(net, "network", None)
        if network is None:  # the toy networks are too small to need either
            continue
        if name in cfg.train.activation_checkpointing:
            network.enable_gradient_checkpointing()
        # diffusers' default attention processors already call torch's SDPA
        if cfg.train.attention == "xformers":
            network.enable_xformers_memory_efficient_attention()
    for key, t in (("generator.t_init", cfg.generator.t_init), ("objective.t_max", cfg.objective.t_max)):
        if t >= schedule.num_timesteps:
            raise TeacherError(f"{key}={t} is past the teacher's last timestep {schedule.num_timesteps - 1}")
    t_init, steps = cfg.generator.t_init, cfg.generator.steps
    # A VP export's scheduler runs the chain by its own trailing spacing (bigsid.export): refused here, not after
    # the run, where that spacing has another step than the chain.
    stock = stock_trailing_timesteps(t_init, steps)
    if cfg.teacher.kind == "diffusers" and isinstance(schedule, VPSchedule) and len(stock) != steps:
        raise TeacherError(f"generator.steps={steps} with generator.t_init={t_init}: the exported scheduler would "
                           f"run {len(stock)} steps, at timesteps {stock}, so no export could reproduce this chain; "
                           f"choose generator.steps={' or '.join(map(str, clean_step_counts(t_init, steps)))}")
    generator = OneStepGenerator(generator_net, schedule, t_init, steps)
    return Networks(teacher, generator, fake_score, schedule, encoder, shape, scheduler_config, vae, truth, vocabulary,
                    family, initial_state, stored)
