"""Export a distilled generator as a diffusers pipeline that stock diffusers runs in one step, and sample from it.

The generator is trained on sqrt(1 - abar_t0) * z at t0 = generator.t_init and returns its x0-prediction. A stock
pipeline feeds init_noise_sigma * z, so the export carries a scheduler that makes the stock call compute exactly
that: EulerDiscreteScheduler on the teacher's schedule cut at t0 (num_train_timesteps = t0 + 1, trained_betas = the
teacher's first t0 + 1 betas, timestep_spacing "trailing"). One step then runs the UNet once at t0 on
sigma_t0 * z / sqrt(sigma_t0^2 + 1) = sqrt(1 - abar_t0) * z and returns its x0-prediction, with the UNet's weights
unchanged. With k steps the same scheduler re-noises x0 at trailing timesteps t0 > t_1 > ... with the noise the
generator's own prediction implies (DDIM, eta = 0); `sample_latents` is that sampler in bigsid's terms.

Weights come from any backend's checkpoint through `load_generator_state`, which returns the full generator state on
the CPU whatever the layout on disk.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from bigsid import checkpoint
from bigsid.families import load_teacher
from bigsid.models import OneStepGenerator, lora_config
from bigsid.text import Cond, PromptEncoder
from bigsid.parallel import deepspeed as deepspeed_layout

STOCK_PIPELINES = ("StableDiffusionPipeline",)  # SD 1.x / 2.x: the teachers bigsid distills
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for
CARD = "README.md"


class ExportError(ValueError):
    """A source, teacher or output folder the export cannot use; the message says what to change."""


# ---- reading a checkpoint ----

def _read_local(folder: Path) -> tuple[dict, dict]:
    """The local backend's layout: the whole generator in generator.safetensors, its EMA in ema.safetensors."""
    weights, ema = folder / "generator.safetensors", folder / "ema.safetensors"
    with checkpoint.reading(weights):
        state = load_file(weights)
    with checkpoint.reading(ema):
        return state, (load_file(ema) if ema.is_file() else {})


def _read_dcp(folder: Path) -> tuple[dict, dict]:
    """The FSDP2 backend's torch.distributed.checkpoint folder, {"generator": {"model": ...}, "ema": ...} flattened
    to dotted keys: only the generator's weights and EMA are read, each tensor whole, on one process."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from bigsid.parallel.fsdp2 import load_dcp, read_dcp_metadata

    prefixes = ("generator.model.", "ema.")
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype)
              for k, m in read_dcp_metadata(folder / "dcp").state_dict_metadata.items()
              if isinstance(m, TensorStorageMetadata) and k.startswith(prefixes)}
    with warnings.catch_warnings():  # reading on one process is the intent, not a mistake to warn about
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_dcp(wanted, folder / "dcp", no_dist=True)
    return tuple({k.removeprefix(p): v for k, v in wanted.items() if k.startswith(p)} for p in prefixes)


# Checkpoint layouts by the file that marks them, each read into full (state, EMA) dicts on the CPU: a sharded
# backend adds its marker and a reader that gathers its shards.
CHECKPOINT_READERS = {"generator.safetensors": _read_local, "dcp": _read_dcp,
                      deepspeed_layout.WEIGHTS.format(rank=0): deepspeed_layout.read_weights}


def load_generator_state(checkpoint_dir: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The generator's full state dict (OneStepGenerator keys, e.g. net.unet.conv_in.weight) on the CPU, with the
    EMA of its trained parameters in place of the raw ones unless ema=False."""
    folder = Path(checkpoint_dir)
    reader = next((read for marker, read in CHECKPOINT_READERS.items() if (folder / marker).exists()), None)
    if reader is None:
        raise ExportError(f"{folder} holds no generator weights bigsid can read (looked for "
                          f"{', '.join(CHECKPOINT_READERS)})")
    state, averaged = reader(folder)
    if ema:
        if not averaged:
            raise ExportError(f"{folder} has no EMA weights; export the raw generator with --raw")
        stray = sorted(set(averaged) - set(state))
        if stray:
            raise ExportError(f"{folder}: EMA entries {stray[:3]} are not generator parameters; the checkpoint is "
                              "inconsistent")
        state |= averaged
    return state


def find_checkpoint(source: str | Path) -> Path:
    """`source` itself if it is a complete checkpoint, else the newest complete checkpoint of a run directory."""
    source = Path(source)
    if not source.exists():
        raise ExportError(f"{source}: no such run directory or checkpoint")
    # verified against its manifest; a damaged newest checkpoint is skipped (left in place: reading a run never
    # changes it) and the previous intact one is used
    try:
        folder = checkpoint.newest_usable(source)
    except checkpoint.CheckpointError as err:
        raise ExportError(str(err)) from None
    if folder is None:
        raise ExportError(f"{source} has no complete checkpoint (step-N/ with a {checkpoint.MARKER} marker; "
                          "step-N.partial/ folders are interrupted saves): train until one is written, or point "
                          "at RUN_DIR/checkpoints/step-N")
    return folder


# ---- the generator as trained, and the scheduler that reproduces it ----

def one_step_scheduler(teacher_scheduler_config: dict, t_init: int, prediction_type: str):
    """EulerDiscreteScheduler on the teacher's schedule cut at t_init: num_inference_steps=k reproduces
    `sample_latents` at `sampling_timesteps(scheduler, k)` (see the module docstring)."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    betas = DDPMScheduler.from_config(teacher_scheduler_config).betas[: t_init + 1]
    # steps_offset only shifts "leading" spacing; 1 keeps StableDiffusionPipeline from rewriting the config.
    return EulerDiscreteScheduler(num_train_timesteps=t_init + 1, trained_betas=betas.tolist(),
                                  prediction_type=prediction_type, timestep_spacing="trailing", steps_offset=1)


def sampling_timesteps(scheduler, steps: int) -> list[int]:
    """The timesteps the exported scheduler runs the generator at for `steps` steps, t_init first."""
    most = scheduler.config.num_train_timesteps - 1
    if not 1 <= steps <= most:
        raise ExportError(f"steps={steps}: expected 1..{most} (the generator's t_init)")
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


@torch.no_grad()
def sample_latents(generator: OneStepGenerator, z: torch.Tensor, cond: Cond,
                   timesteps: list[int]) -> torch.Tensor:
    """bigsid's sampler at the exported scheduler's timesteps: the generator's own chain (OneStepGenerator)."""
    if timesteps != generator.timesteps(len(timesteps)):
        raise ExportError(f"timesteps {timesteps} are not the generator's chain {generator.timesteps(len(timesteps))}")
    return generator(z, cond, chain=len(timesteps))


@dataclass
class Distilled:
    """A checkpoint's generator ready to sample, with what the export and its model card need."""

    generator: OneStepGenerator
    encoder: PromptEncoder
    vae: torch.nn.Module
    scheduler: object  # one_step_scheduler: the stock pipeline's convention for this generator
    teacher: str
    revision: str
    lora: object  # peft LoraConfig, or None
    lora_on_teacher: bool  # every weight outside the LoRA adapter is the teacher's
    folder: Path
    state: dict  # train_state.json
    ema: bool


def _check_teacher_family(teacher: str, revision: str) -> None:
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(teacher, revision=revision or None).get("_class_name")
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read the teacher pipeline {teacher!r} (model_index.json): {err}. The export copies "
                          "the teacher's VAE, text encoder and tokenizer: pass --teacher with the pipeline folder or "
                          "hub id the run was trained from") from None
    if name not in STOCK_PIPELINES:
        raise ExportError(f"the teacher {teacher!r} is a {name}; bigsid exports generators distilled from "
                          f"{', '.join(STOCK_PIPELINES)} teachers (Stable Diffusion 1.x/2.x)")


def _check_fit(weights: dict, expected: dict, teacher: str) -> None:
    """Refuse weights that do not fit the teacher's network, naming the first differences."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k}: {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        found = "; ".join(f"{what} {items[:3]}" for what, items in
                          (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs teacher)", shapes))
                          if items)
        raise ExportError(f"the checkpoint's generator does not fit the teacher {teacher!r} ({found}). It was trained "
                          "from another teacher (or with another LoRA setting): pass --teacher with the run's teacher")


def load_distilled(source: str | Path, ema: bool = True, teacher: str | None = None) -> Distilled:
    """The generator of `source` (a run directory or a checkpoint), built on its teacher with the checkpoint's
    weights (EMA unless ema=False). `teacher` replaces the run's teacher.path, e.g. on another machine."""
    folder = find_checkpoint(source)
    state = checkpoint.read_state(folder)
    config = state["config"]
    if config["teacher"]["kind"] != "diffusers":
        raise ExportError(f"{folder} was trained from the teacher kind {config['teacher']['kind']!r}, which has no "
                          "diffusers pipeline to export into; only teacher.kind=diffusers runs export")
    path = teacher or config["teacher"]["path"]
    revision = "" if teacher else config["teacher"]["revision"]
    _check_teacher_family(path, revision)
    weights = load_generator_state(folder, ema)
    loaded = load_teacher(path, revision, config["teacher"]["prediction_type"],
                          config["teacher"].get("text_max_length", 0))
    net, schedule, encoder, vae = loaded.denoiser, loaded.schedule, loaded.encoder, loaded.vae
    lora = lora_config(config)
    if lora is not None:
        net.network.add_adapter(lora)
    generator = OneStepGenerator(net, schedule, config["generator"]["t_init"], config["generator"].get("steps", 1))
    expected = generator.state_dict()
    _check_fit(weights, expected, path)
    # Compared before loading, while the network still holds the teacher's weights.
    lora_on_teacher = lora is not None and all(torch.equal(weights[k], v) for k, v in expected.items()
                                               if "lora_" not in k)
    generator.load_state_dict(weights)
    generator.requires_grad_(False).eval()
    scheduler = one_step_scheduler(loaded.scheduler_config, generator.t_init, schedule.prediction_type)
    return Distilled(generator, encoder, vae.eval(), scheduler, path, revision, lora, lora_on_teacher, folder, state,
                     ema)


# ---- export ----

def _output_folder(out: Path, force: bool, keep: list[Path]) -> Path:
    """OUT.partial, absent, after refusing an OUT that exists (without force) or that holds an input."""
    for path in keep:
        if path.resolve().is_relative_to(out.resolve()):
            raise ExportError(f"{out} holds {path}, an input: choose an output folder outside it")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; choose another output folder or pass --force to replace it")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # left by an interrupted export
        shutil.rmtree(partial)
    return partial


def _replace(partial: Path, out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    partial.rename(out)


def export(source: str | Path, out: str | Path, ema: bool = True, teacher: str | None = None, steps: int | None = None,
           fuse_lora: bool = False, force: bool = False) -> Path:
    """Write `source`'s generator as a diffusers pipeline folder (safetensors) with a model card; a LoRA generator
    as pytorch_lora_weights.safetensors over its teacher, or fused into a full pipeline with fuse_lora=True.

    `steps` is the step count the model card's call uses; by default the run's generator.steps."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    out = Path(out)
    d = load_distilled(source, ema, teacher)
    timesteps = sampling_timesteps(d.scheduler, d.generator.steps if steps is None else steps)
    as_lora = d.lora is not None and not fuse_lora
    if as_lora and not d.lora_on_teacher:
        raise ExportError(f"{d.folder}: weights outside the LoRA adapter differ from the teacher's, so the adapter "
                          "alone would not reproduce the generator; export with --fuse-lora")
    partial = _output_folder(out, force, [d.folder] + ([Path(d.teacher)] if Path(d.teacher).exists() else []))
    unet = d.generator.net.network
    if as_lora:
        from peft.utils import get_peft_model_state_dict

        # A LoRA file without adapter metadata loads with lora_alpha = rank in every diffusers version: carry
        # alpha / rank in the up-projection instead of in metadata that older versions ignore.
        scale = d.lora.lora_alpha / d.lora.r
        layers = {k: v * scale if ".lora_B." in k else v for k, v in get_peft_model_state_dict(unet).items()}
        StableDiffusionPipeline.save_lora_weights(partial, unet_lora_layers=convert_state_dict_to_diffusers(layers))
        d.scheduler.save_pretrained(partial / "scheduler")
    else:
        if d.lora is not None:
            unet.fuse_lora()
            unet.unload_lora()
        pipe = StableDiffusionPipeline.from_pretrained(
            d.teacher, revision=d.revision or None, unet=unet, scheduler=d.scheduler, vae=d.vae)
        pipe.save_pretrained(partial, safe_serialization=True)
    model_card(d, out, timesteps, as_lora).save(partial / CARD)
    _replace(partial, out)
    return out


# ---- the model card ----

METHODS = {"sid": "SiD (Score identity Distillation)", "sim": "SIM (Score Implicit Matching)",
           "dmd": "DMD (Distribution Matching Distillation)"}
OBJECTIVE_KEYS = {
    "sid": ("alpha", "t_min", "t_max", "kappa1", "kappa2", "kappa3", "kappa4", "prompt_drop"),
    "sim": ("sim_distance", "sim_c", "sim_c_units", "sim_weighting", "t_min", "t_max", "kappa1", "kappa2", "kappa3",
            "kappa4", "prompt_drop"),
    "dmd": ("t_min", "t_max", "kappa4"),
}


def _method(objective: dict) -> str:
    if objective["name"] == "sid" and any(objective[f"kappa{i}"] != 1 for i in range(1, 5)):
        return "SiD-LSG (Score identity Distillation with Long and Short Guidance)"
    return METHODS[objective["name"]]


def _usage(d: Distilled, out: Path, steps: int, as_lora: bool) -> str:
    """The Python that runs the export with stock diffusers."""
    call = f'image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=0).images[0]'
    if as_lora:
        return "\n".join([
            "from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline",
            "",
            f'pipe = StableDiffusionPipeline.from_pretrained("{d.teacher}")',
            f'pipe.scheduler = EulerDiscreteScheduler.from_pretrained("{out}", subfolder="scheduler")',
            f'pipe.load_lora_weights("{out}")',
            call])
    return "\n".join(["from diffusers import DiffusionPipeline", "",
                      f'pipe = DiffusionPipeline.from_pretrained("{out}")', call])


def _image_evaluation(d: Distilled) -> str:
    """The newest `bigsid eval` of these weights (RUN_DIR/eval/NAME/metrics.json, not the toy family's), each number
    with the convention it was measured in; empty if there is none."""
    found = []
    for path in (d.folder.parent.parent / "eval").glob("*/metrics.json"):
        report = json.loads(path.read_text())
        source = report.get("source", {})
        if (source.get("kind") == "generator" and source.get("step") == d.state["step"] and source.get("ema") == d.ema
                and "fd_generator" not in report.get("metrics", {})):
            found.append((report.get("written", ""), path.parent.name, report))
    if not found:
        return ""
    _, name, report = max(found)
    generation = report.get("generation", {})
    lines = [f"`bigsid eval` ({name}): {generation.get('num_images')} images ({generation.get('seeds')}), prompts "
             f"{generation.get('prompts')} (sha256 {str(generation.get('prompts_sha256'))[:12]}), step "
             f"{d.state['step']}.", "", "| metric | value | convention |", "| --- | --- | --- |"]
    lines += [f"| {key} | {m['value']:.4f} | " + ", ".join(f"{k}={v}" for k, v in m.get("convention", {}).items())
              + " |" for key, m in report["metrics"].items()]
    return "\n".join(lines)


def _evaluation(d: Distilled) -> str:
    """The run's evaluations of this checkpoint with their conventions, or a line saying there is none."""
    images = _image_evaluation(d)
    path = d.folder.parent.parent / "eval" / "toy_metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    if metrics.get("step") != d.state["step"]:
        return images or "No evaluation of this checkpoint was recorded with the run."
    rows = [("fd_generator", "this generator"), ("fd_teacher_sampler",
                                                 f"the teacher, {metrics.get('teacher_sampler_steps')} DDIM steps"),
            ("fd_reference", "two exact sample sets (noise floor)")]
    lines = [f"Frechet distance in latent space to exact samples of the teacher's analytic Gaussian-mixture truth, "
             f"{metrics['num_samples']} samples per prompt, mean over prompts (lower is better); EMA weights, "
             f"step {metrics['step']}.", "", "| samples from | Frechet distance |", "| --- | --- |"]
    lines += [f"| {label} | {metrics[key]:.4f} |" for key, label in rows if key in metrics]
    lines += ["", f"Mode coverage (total variation between nearest-mode frequencies and the true weights): "
                  f"{metrics['mode_coverage_tv']:.4f}."]
    return "\n".join(lines + (["", images] if images else []))


def model_card(d: Distilled, out: Path, timesteps: list[int], as_lora: bool):
    from huggingface_hub import ModelCard, ModelCardData

    steps = len(timesteps)
    config, state = d.state["config"], d.state
    objective = config["objective"]
    name = objective["name"]
    settings = ", ".join(f"{k}={objective[k]}" for k in OBJECTIVE_KEYS[name])
    t0 = d.generator.t_init
    s = float(d.generator.schedule.s[t0])
    sigma = float(d.scheduler.init_noise_sigma)
    teacher = f"`{d.teacher}`" + (f" (revision {d.revision})" if d.revision else "")
    train = config["train"]
    seen = f'{state["nimg"]:,} (step {state["step"]}, batch {train["batch_size"]}, seed {train["seed"]})'
    weights = "EMA" if d.ema else "raw (not the EMA)"
    if d.lora is not None:
        weights += f", LoRA rank {d.lora.r} alpha {d.lora.lora_alpha}" + (" (fused)" if not as_lora else "")
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image",
        tags=["text-to-image", "stable-diffusion", "distillation", "one-step", "bigsid", name]
        + (["lora"] if as_lora else []),
        bigsid={"teacher": d.teacher, "teacher_revision": d.revision, "objective": name, "t_init": t0,
                "timesteps": timesteps, "nimg": state["nimg"], "step": state["step"], "ema": d.ema, "lora": as_lora})
    body = f"""
# {out.name}

A {"one" if steps == 1 else steps}-step text-to-image generator distilled by bigsid from `{d.teacher}` with
{_method(objective)}.

```python
{_usage(d, out, steps, as_lora)}
```

Call it exactly so: `guidance_scale=0` (guidance was distilled in; the generator runs without classifier-free
guidance) and `num_inference_steps={steps}`, with the scheduler that ships here. Other schedulers or step counts give
other images.

## Training

| | |
| --- | --- |
| teacher | {teacher}, {d.generator.net.prediction_type} prediction |
| objective | {name}: {settings} |
| generator | x0-prediction at t_init = {t0} from sqrt(1 - abar_t_init) * z = {s:.4f} * z |
| weights | {weights} |
| images seen | {seen} |
| precision | {train["precision"]} |

## Evaluation

{_evaluation(d)}

## How the stock call reproduces bigsid's sampler

The scheduler is `EulerDiscreteScheduler` on the teacher's noise schedule cut at t = {t0} (`num_train_timesteps`
= {t0 + 1}, `trained_betas` = the teacher's first {t0 + 1} betas, `timestep_spacing` = "trailing"). One step starts
from `init_noise_sigma` * z = {sigma:.4f} * z, feeds the UNet {sigma:.4f} * z / sqrt({sigma:.4f}^2 + 1) = {s:.4f} * z
at t = {t0}, exactly the generator's training input, and returns its x0-prediction. With k steps the scheduler
re-noises that x0 at trailing timesteps below {t0} with the noise the prediction implies (deterministic, DDIM eta = 0),
as `bigsid sample --steps k` does. The UNet's weights are the generator's, unchanged.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ---- sampling ----

def _stock_pipeline(model: Path):
    """An export loaded the way its model card says: a pipeline folder, or a LoRA over its teacher."""
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline
    from huggingface_hub import ModelCard

    if (model / "model_index.json").is_file():
        return DiffusionPipeline.from_pretrained(model)
    meta = ModelCard.load(model / CARD).data.bigsid
    pipe = StableDiffusionPipeline.from_pretrained(meta["teacher"], revision=meta["teacher_revision"] or None)
    pipe.scheduler = EulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    pipe.load_lora_weights(model)
    return pipe


def is_export(model: Path) -> bool:
    return (model / "model_index.json").is_file() or (model / LORA_WEIGHTS).is_file()


@torch.no_grad()
def sample(model: str | Path, prompts: list[str], out: str | Path, seeds: int = 4, seed: int = 0,
           steps: int | None = None,
           ema: bool = True, teacher: str | None = None, device: str = "auto", force: bool = False) -> list[Path]:
    """Images of `prompts` (seeds each; image j of every prompt uses noise seed + j) from an export, run by the stock
    pipeline, or from a run directory or checkpoint, run by `sample_latents`; the same noise gives the same image
    either way. Writes OUT/PPP-SEED.png and OUT/grid.png (a row per prompt); an existing OUT only with force."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    from bigsid.parallel.local import pick_device
    from bigsid.trainer import save_grid

    model, out, device = Path(model), Path(out), pick_device(device)
    if not prompts:
        raise ExportError("no prompts: pass --prompts")
    partial = _output_folder(out, force, [model])
    if is_export(model):
        pipe = _stock_pipeline(model).to(device)
        steps = 1 if steps is None else steps
        sampling_timesteps(pipe.scheduler, steps)
        unet = pipe.unet if hasattr(pipe, "unet") else pipe.transformer

        def generate(batch: list[str], z: torch.Tensor) -> list:
            return pipe(batch, latents=z, num_inference_steps=steps, guidance_scale=0).images
    else:
        d = load_distilled(model, ema, teacher)
        for module in (d.generator, d.encoder, d.vae):
            module.to(device)
        timesteps = sampling_timesteps(d.scheduler, d.generator.steps if steps is None else steps)
        unet = d.generator.net.network

        def generate(batch: list[str], z: torch.Tensor) -> list:
            latents = sample_latents(d.generator, z, d.encoder(batch), timesteps)
            decoded = d.vae.decode(latents / d.vae.config.scaling_factor).sample
            return VaeImageProcessor().postprocess(decoded, output_type="pil")  # as the stock pipeline does

    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    images = []
    for prompt in prompts:
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + j)) for j in range(seeds)])
        images += generate([prompt] * seeds, z.to(device))
    names = [f"{i // seeds:03d}-{seed + i % seeds}.png" for i in range(len(images))]
    partial.mkdir(parents=True)
    for name, image in zip(names, images):
        image.save(partial / name)
    save_grid(torch.from_numpy(np.stack([np.asarray(im) for im in images])), len(prompts), partial / "grid.png")
    _replace(partial, out)
    return [out / name for name in names + ["grid.png"]]
