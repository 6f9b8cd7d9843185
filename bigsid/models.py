"""The three networks and their conditioning.

A denoiser is any module `net(x_t, t, emb) -> prediction` with a `prediction_type` attribute (epsilon,
v_prediction or sample). `predict` turns it into the x0- or eps-prediction the objectives need, with
classifier-free guidance done in eps space on one batched call. The generator and the fake score start as copies
of the teacher's network.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from bigsid.config import Config
from bigsid.diffusion import SD_SCHEDULER_CONFIG, VPSchedule

log = logging.getLogger("bigsid.models")


class TeacherError(ValueError):
    """The teacher cannot be loaded as configured; the message says what to change."""


@dataclass
class Cond:
    """Prompt conditioning for one batch: per-sample embeddings and the empty-prompt embedding [1, ...]."""

    emb: torch.Tensor
    uncond: torch.Tensor

    def __getitem__(self, index: slice) -> "Cond":
        """The conditioning of a slice of the batch (a micro-batch)."""
        return Cond(self.emb[index], self.uncond)

    def drop(self, dropped: torch.Tensor) -> "Cond":
        """Replace the prompts where `dropped` [B] is true by the empty prompt (guided fake-score training)."""
        keep = ~dropped.to(self.emb.device).view((-1,) + (1,) * (self.emb.ndim - 1))
        return Cond(torch.where(keep, self.emb, self.uncond.to(self.emb.dtype)), self.uncond)


def predict(net: nn.Module, schedule: VPSchedule, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
            guidance: float = 1.0, out: str = "sample") -> torch.Tensor:
    """x0- (out='sample') or eps-prediction of `net`, with classifier-free guidance `guidance` in eps space."""
    if guidance == 1.0:
        return schedule.convert(net(x_t, t, cond.emb), x_t, t, net.prediction_type, out)
    x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
    emb2 = torch.cat([cond.uncond.expand_as(cond.emb).to(cond.emb.dtype), cond.emb])
    eps_uncond, eps_cond = schedule.convert(net(x2, t2, emb2), x2, t2, net.prediction_type, "epsilon").chunk(2)
    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
    return schedule.convert(eps, x_t, t, "epsilon", out)


class UNetDenoiser(nn.Module):
    """A diffusers UNet2DConditionModel as a denoiser (SD 1.x/2.x: eps- or v-prediction)."""

    def __init__(self, unet: nn.Module, prediction_type: str):
        super().__init__()
        self.unet = unet
        self.prediction_type = prediction_type

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # a teacher stored in bf16 is also called outside autocast (its evaluation sampler): inputs follow it
        dtype = self.unet.dtype
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=emb.to(dtype), return_dict=False)[0]


class OneStepGenerator(nn.Module):
    """G(z, c): the denoiser's x0-prediction from sqrt(1 - abar_t_init) * z at t_init, i.e. from pure noise.

    A few-step generator (`steps` = K > 1) chains K such predictions at the trailing timesteps t_init > t_1 > ...
    of [0, t_init], re-noising each x0 with the noise it implies, eps = (x_t - a_t x0) / s_t (DDIM, eta = 0): the
    chain stays a function of z, and the exported scheduler reproduces it exactly."""

    def __init__(self, net: nn.Module, schedule: VPSchedule, t_init: int, steps: int = 1):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.t_init = t_init
        self.steps = steps

    def timesteps(self, chain: int) -> list[int]:
        """diffusers' "trailing" spacing of `chain` steps over the schedule cut at t_init; t_init first."""
        n = self.t_init + 1
        return [round(n - i * n / chain) - 1 for i in range(chain)]

    def forward(self, z: torch.Tensor, emb: torch.Tensor, k: int | None = None, chain: int | None = None):
        """x0 after the first k steps (default all) of a `chain`-step chain (default self.steps). Only the last
        step keeps the graph: training a few-step generator at a random k trains every step of the chain."""
        timesteps = self.timesteps(chain or self.steps)[:k]
        x_t = self.schedule.s[self.t_init] * z
        for i, step_t in enumerate(timesteps):
            t = torch.full((z.shape[0],), step_t, device=z.device, dtype=torch.long)
            last = i == len(timesteps) - 1
            with torch.set_grad_enabled(torch.is_grad_enabled() and last):
                x0 = self.schedule.convert(self.net(x_t, t, emb), x_t, t, self.net.prediction_type, "sample")
            if not last:
                eps = self.schedule.convert(x0, x_t, t, "sample", "epsilon")
                x_t = self.schedule.add_noise(x0, eps, torch.full_like(t, timesteps[i + 1]))
        return x0


class CLIPPromptEncoder(nn.Module):
    """Frozen CLIP text encoder; prompts longer than the tokenizer's limit are truncated (said once)."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.max_length = tokenizer.model_max_length
        self.warned_truncation = False
        self.register_buffer("uncond", self._encode([""]), persistent=False)

    def token_count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_overflowing_tokens=False, return_tensors="pt").input_ids
        # Byte-level BPE spends at least one byte per token, so only prompts with more UTF-8 bytes than the
        # limit (less the two special tokens) can be too long: tokenize again just those, until said once.
        maybe_long = [p for p in prompts if len(p.encode()) + 2 > self.max_length]
        if not self.warned_truncation and any(self.token_count(p) > self.max_length for p in maybe_long):
            log.warning("prompts longer than %d tokens are truncated to the text encoder's limit", self.max_length)
            self.warned_truncation = True
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0]

    def forward(self, prompts: list[str]) -> Cond:
        return Cond(self._encode(prompts), self.uncond)


@dataclass
class Networks:
    """Everything a run builds from the teacher before the parallel backend wraps it."""

    teacher: nn.Module
    generator: OneStepGenerator
    fake_score: nn.Module
    schedule: VPSchedule
    encoder: nn.Module  # prompts -> Cond
    latent_shape: tuple[int, ...]
    scheduler_config: dict  # the teacher's, for its own multi-step sampler
    vae: nn.Module | None = None  # latents -> images, for sample grids
    truth: object | None = None  # toy.GMM when the teacher has an analytic ground truth
    vocabulary: list[str] | None = None  # the toy prompts


def lora_config(config: dict):
    """The run's LoRA adapter as a peft LoraConfig, or None for a generator trained in full.

    The contract between training and export: generator.lora_rank > 0 means the generator's UNet carries a peft
    LoRA adapter named "default" (what unet.add_adapter makes) of that rank, with lora_alpha = generator.lora_alpha
    (the rank when unset) on the modules listed in generator.lora_target_modules."""
    g = config["generator"]
    if not g.get("lora_rank"):
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise TeacherError("this generator is a LoRA adapter and needs peft: pip install 'bigsid[lora]'") from None
    return LoraConfig(r=g["lora_rank"], lora_alpha=g.get("lora_alpha") or g["lora_rank"],
                      target_modules=list(g["lora_target_modules"]))


def _load(load, path: str, subfolder: str, revision: str, what: str):
    try:
        return load(path, subfolder=subfolder, revision=revision or None)
    except (OSError, ValueError) as err:
        raise TeacherError(f"cannot load the teacher's {what} from {path!r} ({subfolder}/): {err}. teacher.path must "
                           "be a diffusers Stable Diffusion pipeline folder (model_index.json, unet/, text_encoder/, "
                           "tokenizer/, vae/, scheduler/) or a hub id reachable from this machine") from None


def load_diffusers_teacher(path: str, revision: str = "", prediction_type: str = ""):
    """(UNetDenoiser, schedule, CLIPPromptEncoder, vae, scheduler config) from a pipeline folder or hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler_config = _load(DDPMScheduler.load_config, path, "scheduler", revision, "scheduler config")
    schedule = VPSchedule.from_scheduler_config(scheduler_config, prediction_type)
    unet = _load(UNet2DConditionModel.from_pretrained, path, "unet", revision, "UNet")
    encoder = CLIPPromptEncoder(_load(CLIPTokenizer.from_pretrained, path, "tokenizer", revision, "tokenizer"),
                                _load(CLIPTextModel.from_pretrained, path, "text_encoder", revision, "text encoder"))
    vae = _load(AutoencoderKL.from_pretrained, path, "vae", revision, "VAE")
    return UNetDenoiser(unet, schedule.prediction_type), schedule, encoder, vae, dict(scheduler_config)


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
        student = toy.MLPDenoiser(truth.dim, len(truth.prompts) + 1, cfg.teacher.student_width,
                                  cfg.teacher.student_depth)
        fit = toy.fit_denoiser(student, encoder, truth, schedule, steps=cfg.teacher.student_fit_steps,
                               seed=cfg.train.seed)
        # the fit's own loss; how far its sampler is from the exact denoiser's is checked at the first evaluation
        log.info("toy teacher fitted to the exact denoiser: final v mse %.4g after %d steps", fit,
                 cfg.teacher.student_fit_steps)
        teacher = toy.GMMDenoiser(truth, schedule) if cfg.teacher.gmm_teacher == "exact" else student
        vae, shape, vocabulary = None, tuple(truth.latent_shape), truth.prompts
        scheduler_config = dict(SD_SCHEDULER_CONFIG)
    else:
        student, schedule, encoder, vae, scheduler_config = load_diffusers_teacher(cfg.teacher.path, cfg.teacher.revision,
                                                                    cfg.teacher.prediction_type)
        teacher = student
        unet = student.unet.config
        shape = (unet.in_channels, unet.sample_size, unet.sample_size)
        truth = toy.GMM.load(cfg.teacher.path)  # None unless the folder is a toy teacher with a ground truth
        vocabulary = truth.prompts if truth is not None else None
        vae.requires_grad_(False).eval()
    generator_net = copy.deepcopy(student)
    fake_score = copy.deepcopy(student)
    teacher.requires_grad_(False).eval()
    if cfg.train.precision == "bf16" and cfg.teacher.kind == "diffusers":
        # Frozen and computed in bf16 anyway: stored in bf16 it takes half the memory and autocast has no copies
        # of it to cast and keep for the backward through its input. (Toy teachers are tiny.)
        teacher.to(torch.bfloat16)
    for net in (generator_net, fake_score):
        net.requires_grad_(True).train()
    if cfg.generator.lora_rank:
        from dataclasses import asdict

        generator_net.unet.requires_grad_(False)
        generator_net.unet.add_adapter(lora_config(asdict(cfg)))  # only the adapter's weights train
    for name, net in (("generator", generator_net), ("fake_score", fake_score), ("teacher", teacher)):
        unet = getattr(net, "unet", None)
        if unet is None:  # the toy networks are too small to need either
            continue
        if name in cfg.train.activation_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.train.attention == "xformers":
            unet.enable_xformers_memory_efficient_attention()
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            unet.set_attn_processor(AttnProcessor2_0())
    generator = OneStepGenerator(generator_net, schedule, cfg.generator.t_init, cfg.generator.steps)
    return Networks(teacher, generator, fake_score, schedule, encoder, shape, scheduler_config, vae, truth, vocabulary)
