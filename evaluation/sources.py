"""What makes the images: a run's generator (a run directory or a checkpoint), an exported folder, or the teacher's
own multi-step sampler. Each turns (prompts, seeds) into PIL images, image i from noise seeded by seeds[i] alone."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bigsid import checkpoint, export
from bigsid.parallel.local import pick_device
from bigsid.toy import GMM
from evaluation.settings import EvalError, EvalSettings


def noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One latent per seed, each drawn from its own generator: the same seed gives the same image in any batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@dataclass
class Source:
    """`load()` builds the networks and returns `generate(prompts, seeds)` -> PIL images: only called when images
    are missing, so a finished evaluation loads nothing. `record` goes into the manifest and metrics.json."""

    load: object
    record: dict
    root: Path  # where eval/NAME goes: the run directory or the export folder
    default_name: str
    sample_prompts: list[str] = field(default_factory=list)


def _device(name: str) -> torch.device:
    """The rank's GPU: torchrun's LOCAL_RANK, else srun's SLURM_LOCALID."""
    return pick_device(name, int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))


def _run_prompts(config: dict) -> list[str]:
    """The run's eval.sample_prompts, else the toy teacher's vocabulary."""
    prompts = list(config.get("eval", {}).get("sample_prompts") or [])
    truth = GMM.load(config["teacher"]["path"]) if not prompts and config["teacher"].get("path") else None
    return prompts or (truth.prompts if truth is not None else [])


def _generator(path: Path, settings: EvalSettings, device: torch.device) -> Source:
    folder = export.find_checkpoint(path)
    state = checkpoint.read_state(folder)
    if state["config"]["teacher"]["kind"] != "diffusers":
        raise EvalError(f"{folder} distills the teacher kind {state['config']['teacher']['kind']!r}, whose samples are "
                        "latents of an analytic truth, not images: use metrics=[toy]")

    def load():
        from diffusers.image_processor import VaeImageProcessor

        d = export.load_distilled(folder, settings.ema, settings.teacher or None)
        for module in (d.generator, d.encoder, d.vae):
            module.to(device)
        timesteps = export.sampling_timesteps(d.scheduler, d.generator.steps)
        unet = d.generator.net.network.config
        shape = (unet.in_channels, unet.sample_size, unet.sample_size)

        @torch.no_grad()
        def generate(prompts: list[str], seeds: list[int]) -> list:
            z = noise(shape, seeds).to(device)
            latents = export.sample_latents(d.generator, z, d.encoder(prompts), timesteps)
            decoded = d.vae.decode(latents / d.vae.config.scaling_factor).sample
            return VaeImageProcessor().postprocess(decoded, output_type="pil")  # as the stock pipeline does
        return generate

    config, step = state["config"], state["step"]
    record = {"kind": "generator", "checkpoint": str(folder.resolve()), "step": step, "nimg": state["nimg"],
              "ema": settings.ema, "generator_steps": config["generator"].get("steps", 1),
              "teacher": settings.teacher or config["teacher"]["path"]}
    return Source(load, record, folder.parent.parent, f"step-{step:09d}", _run_prompts(config))


def _stock(pipe, steps: int, guidance: float, device: torch.device):
    """generate() of a stock diffusers pipeline, called on the noise of each seed."""
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    unet = (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)

    @torch.no_grad()
    def generate(prompts: list[str], seeds: list[int]) -> list:
        return pipe(prompts, latents=noise(shape, seeds).to(device), num_inference_steps=steps,
                    guidance_scale=guidance).images
    return generate


def _export_folder(path: Path, device: torch.device) -> Source:
    from huggingface_hub import ModelCard

    meta = ModelCard.load(path / export.CARD).data.to_dict().get("bigsid", {}) if (path / export.CARD).is_file() else {}
    steps = len(meta.get("timesteps") or [0])

    def load():
        return _stock(export._stock_pipeline(path), steps, 0.0, device)

    record = {"kind": "export", "folder": str(path), "step": meta.get("step"), "nimg": meta.get("nimg"),
              "ema": meta.get("ema"), "generator_steps": steps, "teacher": meta.get("teacher")}
    return Source(load, record, path, "export")


def _teacher(path: Path, settings: EvalSettings, device: torch.device) -> Source:
    """The teacher's stock pipeline with DDIM at teacher_steps and classifier-free guidance `guidance`: the teacher
    of a run directory, `teacher`, or `path` itself as a pipeline folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    config, root = {}, path
    latest = checkpoint.latest_checkpoint(path) if path.is_dir() else None
    if latest is not None:
        config, root = checkpoint.read_state(latest)["config"], latest.parent.parent
    elif (path / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((path / "config.yaml").read_text())
    teacher = settings.teacher or config.get("teacher", {}).get("path") or str(path)
    if config and config["teacher"]["kind"] != "diffusers":
        raise EvalError(f"{path} distills the teacher kind {config['teacher']['kind']!r}, whose samples are not "
                        "images; use metrics=[toy]")

    def load():
        try:
            pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as err:
            raise EvalError(f"sampler=teacher: cannot load the teacher pipeline {teacher!r}: {err}. Pass "
                            "teacher=PATH, a diffusers Stable Diffusion folder") from None
        pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": False})
        return _stock(pipe, settings.teacher_steps, settings.guidance, device)

    record = {"kind": "teacher", "teacher": teacher, "sampler": "DDIM (eta 0)", "steps": settings.teacher_steps,
              "guidance": settings.guidance, "step": None}
    name = f"teacher-ddim{settings.teacher_steps}-cfg{settings.guidance:g}"
    return Source(load, record, root, name, _run_prompts(config) if config else [])


def load_source(source: str, settings: EvalSettings) -> Source:
    path = Path(source)
    if not path.exists():
        raise EvalError(f"{source}: no such run directory, checkpoint or exported folder")
    device = _device(settings.device)
    if settings.sampler == "teacher":
        return _teacher(path, settings, device)
    if export.is_export(path):
        return _export_folder(path, device)
    return _generator(path, settings, device)
