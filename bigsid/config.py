"""Typed configuration: dataclass defaults < YAML file < `a.b=c` command-line overrides.

Every value is checked before anything heavy starts. A bad key, type or range raises ConfigError with the
dotted key and what was expected; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value the run cannot start with. The message names the key and what to change."""


@dataclass
class GMMConfig:
    """Analytic ground truth: per prompt, an equal-weight mixture of isotropic Gaussians in latent shape."""

    num_prompts: int = 2
    modes_per_prompt: int = 3
    latent_shape: list[int] = field(default_factory=lambda: [4, 2, 2])
    mode_std: float = 0.1
    seed: int = 0


@dataclass
class TeacherConfig:
    kind: str = "toy_gmm"  # toy_gmm: an analytic GMM ground truth; diffusers: a pipeline folder or hub id
    path: str = ""
    revision: str = ""
    gmm: GMMConfig = field(default_factory=GMMConfig)
    # toy_gmm has no weights to copy, so generator and fake score start from a small MLP fitted to the exact
    # denoiser (the role the teacher's weights play for a real model). The teacher is that fitted MLP, frozen
    # (fitted: all three networks start from one set of weights, as in real distillation), or the exact
    # denoiser itself (exact). SiD and SIM differentiate through the teacher and the fake score at x_t: with the
    # exact teacher, J_teacher - J_fake_score is the MLP's Jacobian error, not a difference of distributions,
    # and SiD multiplies it by f_psi - x_gen (DMD differentiates through neither). benchmarks/results/toy.md,
    # three seeds: median final FD exact -> fitted 0.069 -> 0.019 (SiD), 0.056 -> 0.016 (SIM), and the teacher
    # sampler's FD reached in 0 -> 3 of 3 seeds. Metrics are against the exact GMM either way.
    gmm_teacher: str = "fitted"
    # The MLP maps D latent values to D, so its size follows D; 0 sizes it so: width max(512, 4 D), 1500 sqrt(D / 16)
    # fit steps. At a fixed 512 wide a 256-dimensional mixture's teacher was broken (25-step FD 39-85 against the
    # exact denoiser's 1.6) and 1,024 = 4 D fits it (0.55); at D = 16 the rule gives the tuned 512 and 1,500
    # (benchmarks/results/toy_suite_diagnosis.md).
    student_width: int = 0
    student_depth: int = 3
    student_fit_steps: int = 0
    prediction_type: str = ""  # override the scheduler config's prediction_type; "" keeps it
    # T5 tokens per prompt (pixart, sd3); 0: the stock pipeline's (PixArt-alpha 120, PixArt-Sigma 300, SD3 256)
    text_max_length: int = 0


@dataclass
class TextEncoderConfig:
    # fsdp2: shard each text encoder over the ranks as the denoisers are, one unit per transformer layer (CLIP's
    # encoder layers, T5's blocks), gathered for its forward and resharded after it: T5-XXL's 4.7 B parameters
    # (8.9 GiB in bf16) would otherwise sit whole on every GPU. The same Cond bit for bit; it costs one all-gather
    # of each encoder's weights per batch.
    shard: bool = False


@dataclass
class GeneratorConfig:
    # The generator sees s_t_init * z at grid time t_init and returns its x0-prediction (bigsid/diffusion.py). On a
    # VP teacher s = sqrt(1 - abar): SiD-LSG's 625 is where SD's schedule has VE sigma s/a = 2.5 (EDM's sigma_init;
    # SIM's "2.5 z at sigma 2.5"); other beta schedules reach 2.5 elsewhere (PixArt's linear betas: 440). A flow
    # teacher starts from pure noise at 999 (x_t = z), where its own sampler starts.
    t_init: int = 625
    steps: int = 1  # > 1: a few-step generator (see models.OneStepGenerator); each iteration trains a random prefix
    # LoRA: train a peft adapter of this rank on the generator's UNet instead of all its weights (0: full).
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: the rank
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class FakeScoreConfig:
    # LoRA: the fake score is the teacher's network plus a peft adapter of this rank (0: a full copy of the teacher,
    # as in the papers). The teacher is then that same network with the adapter switched off, so one network's
    # weights, gradients and Adam states fewer are held: what makes SDXL- and SD3-size teachers fit. The shared
    # weights stay in the trained networks' dtype (fp32 master weights) rather than the bf16 a separate teacher uses.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: the rank
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ObjectiveConfig:
    name: str = "sid"  # sid | sim | dmd
    alpha: float = 1.0  # SiD: 1.0 for text-to-image (SiD-LSG), 1.2 for EDM pixel models
    t_min: int = 20
    t_max: int = 979
    # The generator loss's t has density ~ (t - t_min)^(p - 1): 1 is the papers' uniform. p > 1 draws large t more
    # often, where the modes' noised distributions overlap and the score difference carries the mode weights; with
    # few samples per step the small-t pull that sharpens the modes otherwise drifts the weights
    # (benchmarks/results/demo_diagnosis.md). The fake score keeps the uniform: it must track every t.
    generator_t_power: float = 1.0
    # Long-short guidance (SiD-LSG). kappa1: fake score inside its own training; kappa2/kappa3: fake score in
    # the generator loss (in delta and in the alpha term); kappa4: teacher in the generator loss.
    kappa1: float = 1.0
    kappa2: float = 1.0
    kappa3: float = 1.0
    kappa4: float = 1.0
    # empty-prompt rate in the fake-score phase, used only when the fake score is guided (kappa1, kappa2 or
    # kappa3 != 1): guidance needs its unconditional output
    prompt_drop: float = 0.1
    sim_distance: str = "pseudo_huber"  # pseudo_huber | l2
    sim_c: float = 1.0
    sim_c_units: str = "x0"  # x0: c per element of f_psi - f_phi (scale-free over t); score: the paper's raw c
    sim_weighting: str = "adaptive"  # adaptive: SiD's 1/mean|x_gen - f_phi| over d's curvature; uniform: w(t)=1
    # Fake-score loss weight. uniform: SiD-LSG's plain || eps_hat - eps ||^2. edm: SiD's EDM form,
    # lambda(sigma) || f_psi - x_gen ||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
    fake_score_weighting: str = "uniform"
    sigma_data: float = 0.5


@dataclass
class OptimConfig:
    lr_generator: float = 1e-6
    lr_fake_score: float = 1e-6
    beta1: float = 0.0  # SiD: Adam betas (0, 0.999), eps 1e-8
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    # constant (the papers), or cosine decay of both learning rates to lr_min_ratio * lr over train.total_nimg
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    batch_size: int = 8  # global batch per phase
    # images per forward and backward on one rank (0: the whole per-rank batch). Smaller, the per-rank batch is
    # run in micro-batches whose gradients add up before the one optimizer step: the published recipes'
    # global batch (SiD-LSG: 512) on fewer GPUs. Global batch = micro_batch x accumulation x world size.
    micro_batch: int = 0
    total_nimg: int = 1_000_000
    fake_steps: int = 1  # fake-score steps per generator step
    ema_halflife_nimg: int = 500_000
    ema_rampup: float = 0.05  # half-life <= ema_rampup * nimg early on (EDM); 0 disables
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    eval_every: int = 0  # toy ground-truth metrics during training; 0: only at the end
    keep_checkpoints: int = 3
    # Periodic checkpoints copied to host memory at the step, written while training goes on, and made visible
    # once every rank's writes are done (local, ddp, fsdp2; preemption and final checkpoints are synchronous).
    async_checkpoint: bool = False
    max_consecutive_skips: int = 20  # non-finite steps in a row before the run stops on its last good state
    # The run stops on its last good state when a network's gradient norm exceeds this many times its median over
    # the previous 64 steps (0 disables). Adam (beta1 0) turns a gradient 1,000 times its history into a step ~30
    # times the usual (1 / sqrt(1 - beta2)). 1,000 stopped neither demo (the MLP's 4,000 steps, the SD pipeline's
    # 600) and stops the 256-dimensional toy divergence at step 181, after a healthy log at step 150 and before the
    # 1e7-fold norm logged at 200.
    divergence_factor: float = 1000.0
    # Steps between polls, where the host reads what the device recorded (non-finite weights, too many skipped
    # steps) and, over all ranks, the preemption signal: the one all-reduce and device round trip of a step that
    # neither logs, samples, evaluates nor checkpoints (those steps poll too). At 10, nine steps in ten queue work
    # without waiting for the device, and a stop or requeue comes at most 10 steps late: at seconds per step, well
    # inside the 300 s of warning slurm/ asks SLURM for (--signal=B:USR1@300).
    poll_every: int = 10
    # Recompute activations in the backward pass of these networks (any of generator, fake_score, teacher):
    # the generator phase keeps activations of all three, so the teacher's count as much as the others'.
    activation_checkpointing: list[str] = field(default_factory=list)
    attention: str = "sdpa"  # sdpa (torch scaled_dot_product_attention) | xformers
    # torch.compile each repeated block of the three networks (bigsid/compile.py); the first steps take longer
    compile: bool = False
    channels_last: bool = False  # the UNets' weights and input in NHWC, the layout GPU convolutions run fastest in
    progress: bool = True
    # Also log to this Weights & Biases project (pip install 'bigsid[wandb]'); empty: metrics.jsonl and TensorBoard
    wandb_project: str = ""


@dataclass
class DataConfig:
    source: str = "vocab"  # vocab: the teacher's toy prompt list; text: one prompt per line; webdataset: shards
    # text: a prompt file. webdataset: tar shards as local paths, brace ranges (/data/shard-{000000..000099}.tar),
    # pipe: commands or URLs webdataset's gopen opens; join several patterns with "::".
    path: str = ""
    # The caption in each webdataset sample: a member extension ("txt" reads KEY.txt as UTF-8) or "json:FIELD"
    # (the string under FIELD in KEY.json). No other member is read, so pickles and images are never decoded.
    caption_key: str = "txt"
    # Reader processes per rank (DataLoader workers) that prefetch in the background; 0 reads in the trainer's
    # process. Every rank reads the whole prompt sequence and each of its workers its own shards (text: lines), so
    # num_workers must not exceed the shard count; the number of ranks does not enter.
    num_workers: int = 0
    # A text cache written by `bigsid encode-prompts` (bigsid/text_cache.py): the run reads each prompt's
    # conditioning from it and loads no text encoder. Empty: encode prompts with the teacher's encoders as drawn.
    text_cache: str = ""


@dataclass
class EvalConfig:
    # per prompt; a toy run's FD at fewer reads a generator with samples between modes high and scattered, so that
    # the verdict against its teacher is the estimate's noise (benchmarks/results/demo_diagnosis.md, fourth round)
    num_samples: int = 16000
    teacher_sampler_steps: int = 25
    # a guided toy run (objective.kappa4 != 1) is measured against the exact denoiser's guided sampler with this
    # many steps, since a guided mixture has no closed-form distribution
    reference_steps: int = 250
    sample_prompts: list[str] = field(default_factory=list)  # empty: the toy vocabulary, else required
    sample_seeds: int = 4  # images per prompt in the sample grid


@dataclass
class ParallelConfig:
    backend: str = "local"  # local | ddp | fsdp2 | deepspeed (all but local under torchrun)
    shard_size: int = 0  # fsdp2: shard within groups of this many ranks, replicate across (0: all ranks)
    zero_stage: int = 3  # deepspeed: 2 partitions gradients and optimizer states, 3 parameters too
    deepspeed_config: str = ""  # deepspeed: a JSON file of extra DeepSpeed settings (buckets, offload, ...)
    # fsdp2: frozen networks (the teacher; the fake score in the generator phase) stay gathered from their forward
    # to the end of the backward through their input, so each unit is all-gathered once per phase instead of
    # twice, at the price of one whole copy of each in the compute dtype during the generator phase (bigsid plan
    # counts it). false: reshard after forward, the least memory.
    gather_frozen_once: bool = True


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    fake_score: FakeScoreConfig = field(default_factory=FakeScoreConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


CHOICES = {
    "teacher.kind": ("toy_gmm", "diffusers"),
    "teacher.gmm_teacher": ("fitted", "exact"),
    "teacher.prediction_type": ("", "epsilon", "v_prediction", "sample", "flow"),
    "objective.name": ("sid", "sim", "dmd"),
    "objective.sim_distance": ("pseudo_huber", "l2"),
    "objective.sim_c_units": ("x0", "score"),
    "objective.sim_weighting": ("adaptive", "uniform"),
    "objective.fake_score_weighting": ("uniform", "edm"),
    "optim.lr_schedule": ("constant", "cosine"),
    "train.precision": ("fp32", "bf16"),
    "train.attention": ("sdpa", "xformers"),
    "data.source": ("vocab", "text", "webdataset"),
    "parallel.backend": ("local", "ddp", "fsdp2", "deepspeed"),
}


def _coerce(key: str, value, hint):
    """Check `value` against the type hint `hint`; YAML and `a.b=c` strings are parsed by the caller."""
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported union type")  # pragma: no cover - config schema invariant
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _merge(obj, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            valid = ", ".join(f"{prefix}{n}" for n in hints)
            raise ConfigError(f"unknown key '{key}'; valid keys here: {valid}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
            _merge(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, hint))


def _set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        # YAML parsing gives `1e-6`, `true`, `[4, 8, 8]` their natural types, as in a config file.
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _check(cond: bool, key: str, expected: str, value):
    if not cond:
        raise ConfigError(f"{key} = {value!r} is out of range: expected {expected}")


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every setting in the dataclass tree."""
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{key}.")
        else:
            yield key, value


def validate(cfg: Config, check_data: bool = True) -> Config:
    flat = dict(_leaves(cfg))
    for key, value in flat.items():
        # An inf or NaN passes every `>` check below (or fails it with a misleading message) and trains garbage.
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{key} = {value!r} is not a finite number: give a finite value")
        if key.rpartition(".")[2] == "seed":
            # numpy's generators, which draw the prompt order, refuse negatives, and seed a key of 32-bit words
            # padded with zeros: seed 2^32 in epoch 0 would draw as seed 0 in epoch 1
            _check(0 <= value < 2**32, key, "an integer in [0, 2^32)", value)
    for key, choices in CHOICES.items():
        _check(flat[key] in choices, key, "one of " + ", ".join(repr(c) for c in choices), flat[key])
    o, t, tr, g = cfg.objective, cfg.teacher, cfg.train, cfg.teacher.gmm
    _check(cfg.teacher.text_max_length >= 0, "teacher.text_max_length", ">= 0 (0: the pipeline's own)",
           cfg.teacher.text_max_length)
    _check(0 <= o.t_min < o.t_max <= 999, "objective.t_min/t_max", "0 <= t_min < t_max <= 999",
           (o.t_min, o.t_max))
    _check(o.generator_t_power > 0, "objective.generator_t_power", "> 0 (1: uniform t)", o.generator_t_power)
    for name, section in (("generator", cfg.generator), ("fake_score", cfg.fake_score)):
        _check(section.lora_rank >= 0 and section.lora_alpha >= 0, f"{name}.lora_rank/lora_alpha",
               f">= 0 (rank 0: train the full {name})", (section.lora_rank, section.lora_alpha))
        if section.lora_rank and cfg.teacher.kind != "diffusers":
            raise ConfigError(f"{name}.lora_rank > 0 needs a diffusers teacher (teacher.kind=diffusers)")
    _check(0 < cfg.generator.t_init <= 999, "generator.t_init", "1..999", cfg.generator.t_init)
    _check(1 <= cfg.generator.steps <= cfg.generator.t_init, "generator.steps", "1..generator.t_init",
           cfg.generator.steps)
    for k in ("kappa1", "kappa2", "kappa3", "kappa4"):
        _check(getattr(o, k) >= 1.0, f"objective.{k}", ">= 1 (1 disables guidance)", getattr(o, k))
    _check(0.0 <= o.prompt_drop < 1.0, "objective.prompt_drop", "a rate in [0, 1)", o.prompt_drop)
    _check(o.alpha > 0, "objective.alpha", "> 0", o.alpha)
    _check(o.sim_c > 0, "objective.sim_c", "> 0", o.sim_c)
    _check(o.sigma_data > 0, "objective.sigma_data", "> 0 (the data's standard deviation)", o.sigma_data)
    for k in ("lr_generator", "lr_fake_score"):
        _check(getattr(cfg.optim, k) > 0, f"optim.{k}", "> 0", getattr(cfg.optim, k))
    _check(0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1, "optim.beta1/beta2", "in [0, 1)",
           (cfg.optim.beta1, cfg.optim.beta2))
    _check(0 <= cfg.optim.lr_min_ratio <= 1, "optim.lr_min_ratio", "in [0, 1]", cfg.optim.lr_min_ratio)
    _check(cfg.optim.grad_clip >= 0, "optim.grad_clip", ">= 0 (0 disables)", cfg.optim.grad_clip)
    _check(cfg.optim.eps > 0, "optim.eps", "> 0 (Adam divides by sqrt(v) + eps)", cfg.optim.eps)
    _check(cfg.optim.weight_decay >= 0, "optim.weight_decay", ">= 0", cfg.optim.weight_decay)
    _check(tr.batch_size >= 1, "train.batch_size", ">= 1", tr.batch_size)
    _check(tr.micro_batch >= 0 and (tr.micro_batch == 0 or tr.batch_size % tr.micro_batch == 0), "train.micro_batch",
           f"0 or a divisor of train.batch_size={tr.batch_size}", tr.micro_batch)
    _check(tr.total_nimg >= tr.batch_size, "train.total_nimg", ">= train.batch_size", tr.total_nimg)
    _check(tr.fake_steps >= 1, "train.fake_steps", ">= 1", tr.fake_steps)
    _check(tr.ema_halflife_nimg > 0, "train.ema_halflife_nimg", "> 0", tr.ema_halflife_nimg)
    _check(tr.ema_rampup >= 0, "train.ema_rampup", ">= 0", tr.ema_rampup)
    for k in ("log_every", "sample_every", "checkpoint_every", "eval_every"):
        _check(getattr(tr, k) >= 0, f"train.{k}", ">= 0 (0 disables)", getattr(tr, k))
    _check(set(tr.activation_checkpointing) <= {"generator", "fake_score", "teacher"},
           "train.activation_checkpointing", "a list of generator, fake_score, teacher", tr.activation_checkpointing)
    _check(tr.max_consecutive_skips >= 1, "train.max_consecutive_skips", ">= 1", tr.max_consecutive_skips)
    _check(tr.poll_every >= 1, "train.poll_every", ">= 1", tr.poll_every)
    _check(tr.divergence_factor == 0 or tr.divergence_factor > 1, "train.divergence_factor", "0 (off) or > 1",
           tr.divergence_factor)
    if tr.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project = {tr.wandb_project!r} but wandb is not installed: pip install "
                          "'bigsid[wandb]', or leave train.wandb_project empty")
    if tr.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("train.attention = 'xformers' but xformers is not installed: "
                              "pip install 'bigsid[xformers]', or use train.attention=sdpa")
    _check(tr.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", tr.keep_checkpoints)
    _check_device(tr.device)
    if tr.compile:
        from bigsid.compile import compile_unavailable

        problem = compile_unavailable(_device_type(tr.device))
        if problem:
            raise ConfigError(problem)
    _check(bool(tr.run_dir), "train.run_dir", "a directory path", tr.run_dir)
    _check(g.num_prompts >= 1 and g.modes_per_prompt >= 1, "teacher.gmm.num_prompts/modes_per_prompt", ">= 1",
           (g.num_prompts, g.modes_per_prompt))
    _check(len(g.latent_shape) == 3 and all(d >= 1 for d in g.latent_shape), "teacher.gmm.latent_shape",
           "[channels, height, width], each >= 1", g.latent_shape)
    _check(g.mode_std > 0, "teacher.gmm.mode_std", "> 0", g.mode_std)
    _check((t.student_width == 0 or t.student_width >= 8) and t.student_depth >= 1, "teacher.student_width/depth",
           "width 0 (sized by the latent size) or >= 8, depth >= 1", (t.student_width, t.student_depth))
    _check(t.student_fit_steps >= 0, "teacher.student_fit_steps", ">= 0 (0: sized by the latent size)",
           t.student_fit_steps)
    _check(cfg.parallel.shard_size >= 0, "parallel.shard_size", ">= 0 (0: shard over all ranks)",
           cfg.parallel.shard_size)
    if cfg.text_encoder.shard:
        _check_text_encoder_shard(cfg)
    if cfg.parallel.backend == "deepspeed":
        _check_deepspeed(cfg)
    _check(cfg.eval.num_samples >= 2, "eval.num_samples", ">= 2", cfg.eval.num_samples)
    _check(cfg.eval.teacher_sampler_steps >= 1, "eval.teacher_sampler_steps", ">= 1", cfg.eval.teacher_sampler_steps)
    _check(cfg.eval.reference_steps >= 1, "eval.reference_steps", ">= 1", cfg.eval.reference_steps)
    _check(cfg.eval.sample_seeds >= 1, "eval.sample_seeds", ">= 1 (images per prompt)", cfg.eval.sample_seeds)
    if t.kind == "diffusers":
        _check(bool(t.path), "teacher.path", "a diffusers pipeline folder or hub id when teacher.kind=diffusers",
               t.path)
        # A hub id is "owner/name"; anything else names a folder, which must exist now, not hours later.
        looks_local = t.path.startswith(("/", ".", "~")) or t.path.count("/") != 1
        if looks_local and not Path(t.path).expanduser().is_dir():
            raise ConfigError(f"teacher.path = {t.path!r}: no such folder; point it at a diffusers pipeline folder "
                              "(with model_index.json) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    if cfg.data.source in ("text", "webdataset"):
        _check(bool(cfg.data.path), "data.path", f"the prompt source for data.source={cfg.data.source}",
               cfg.data.path)
    _check(cfg.data.num_workers >= 0, "data.num_workers", ">= 0 (0 reads in the trainer's process)",
           cfg.data.num_workers)
    if cfg.data.text_cache:
        _check_text_cache(cfg, check_data)
    if check_data:
        _check_data(cfg.data)
    return cfg


def _check_text_cache(cfg: Config, check_folder: bool) -> None:
    if cfg.teacher.kind != "diffusers":
        raise ConfigError("data.text_cache is set, but the toy teacher (teacher.kind=toy_gmm) has no text encoders "
                          "to replace: leave data.text_cache empty")
    if cfg.text_encoder.shard:
        raise ConfigError("data.text_cache and text_encoder.shard are both set: a run that reads a text cache loads "
                          "no text encoder, so there is none to shard; leave text_encoder.shard false")
    if check_folder and not (Path(cfg.data.text_cache).expanduser() / "manifest.json").is_file():
        raise ConfigError(f"data.text_cache = {cfg.data.text_cache!r} is no text cache (no manifest.json in it): "
                          "make one with `bigsid encode-prompts CONFIG OUT`, or leave data.text_cache empty")


def _check_device(name: str) -> None:
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise ConfigError(f"train.device = {name!r}: expected auto, cpu, cuda or cuda:N")


def _device_type(name: str) -> str:
    """cpu or cuda: what train.device (already checked) resolves to on this machine."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _check_data(d: DataConfig) -> None:
    """The prompt source's checks that need no reading, with the stream's own code: a wrong caption key or a
    missing file is refused now, not after the networks are built."""
    from bigsid import data  # imports this module

    try:
        data._parse_caption_key(d.caption_key)
    except data.DataError as err:
        raise ConfigError(f"data.caption_key: {err}") from None
    try:
        if d.source == "text":
            data._check_prompt_file(d.path)
        elif d.source == "webdataset":
            shards = len(data._expand_shards(d.path))
            if shards < max(1, d.num_workers):
                raise ConfigError(f"data.num_workers = {d.num_workers}: data.path has {shards} shards, and each "
                                  "worker reads its own; lower data.num_workers or write smaller shards (bigsid data "
                                  "pack --shard-size)")
    except data.DataError as err:
        raise ConfigError(f"data.path: {err}") from None


def _check_text_encoder_shard(cfg: Config) -> None:
    backend = cfg.parallel.backend
    if cfg.teacher.kind != "diffusers":
        raise ConfigError("text_encoder.shard = true, but the toy teacher has no text encoders to shard: leave it "
                          "false, or distill a diffusers teacher (teacher.kind=diffusers)")
    if backend == "deepspeed":
        raise ConfigError("text_encoder.shard = true: DeepSpeed partitions only the networks it wraps in engines, "
                          "and the text encoders are none of them; use parallel.backend=fsdp2 to shard them, or "
                          "leave text_encoder.shard false")
    if backend != "fsdp2":
        raise ConfigError(f"text_encoder.shard = true needs parallel.backend=fsdp2: {backend} holds every network "
                          "whole on each device; set parallel.backend=fsdp2 (under torchrun) or leave "
                          "text_encoder.shard false")


def _check_deepspeed(cfg: Config) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel.backend = 'deepspeed' but DeepSpeed is not installed: "
                          "pip install 'bigsid[deepspeed]', or use parallel.backend=fsdp2")
    _check(not cfg.train.async_checkpoint, "train.async_checkpoint",
           "false with parallel.backend=deepspeed (its engines write synchronously)", cfg.train.async_checkpoint)
    _check(cfg.parallel.zero_stage in (2, 3), "parallel.zero_stage", "2 or 3", cfg.parallel.zero_stage)
    from bigsid.parallel.deepspeed import engine_config, read_user_config

    # contradictions that do not depend on the world size, before anything starts
    try:
        engine_config(cfg, 1, read_user_config(cfg.parallel.deepspeed_config))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                check_data: bool = True) -> Config:
    """check_data=False skips the checks that the prompt source exists, for commands that never read it."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        _merge(cfg, data)
    _merge(cfg, parse_overrides(overrides or []))
    return validate(cfg, check_data)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
