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
        d = export.load_distilled(folder, settings.ema, settings.teacher or None).to(device)
        shape = export.latent_shape(d.generator.net.network)
        return lambda prompts, seeds: d.images(prompts, noise(shape, seeds).to(device), d.generator.steps)

    config, step = state["config"], state["step"]
    record = {"kind": "generator", "checkpoint": str(folder.resolve()), "step": step, "nimg": state["nimg"],
              "ema": settings.ema, "generator_steps": config["generator"].get("steps", 1),
              "teacher": settings.teacher or config["teacher"]["path"]}
    return Source(load, record, folder.parent.parent, f"step-{step:09d}", _run_prompts(config))


def _stock(pipe, call: dict, device: torch.device):
    """generate() of a stock diffusers pipeline, called with `call` on the noise of each seed."""
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    shape = export.latent_shape(pipe.unet if hasattr(pipe, "unet") else pipe.transformer)

    @torch.no_grad()
    def generate(prompts: list[str], seeds: list[int]) -> list:
        return pipe(prompts, latents=noise(shape, seeds).to(device), **call).images
    return generate


def _export_folder(path: Path, device: torch.device) -> Source:
    def load():
        return _stock(*export.load_export(path), device)

    meta = export.card_metadata(path)
    record = {"kind": "export", "folder": str(path), "step": meta.get("step"), "nimg": meta.get("nimg"),
              "ema": meta.get("ema"), "generator_steps": len(meta.get("timesteps") or [0]),
              "teacher": meta.get("teacher")}
    return Source(load, record, path, "export")


def _teacher(path: Path, settings: EvalSettings, device: torch.device) -> Source:
    """The teacher's stock pipeline at teacher_steps with classifier-free guidance `guidance`, DDIM (eta 0) for a VP
    teacher and its own flow-matching Euler for a flow teacher: the teacher of a run directory, `teacher`, or
    `path` itself as a pipeline folder."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from bigsid.families import TeacherError, detect, pipeline_config

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
    try:
        index = pipeline_config(teacher)
        family = detect(index, teacher)
    except TeacherError as err:
        raise EvalError(f"sampler=teacher: {err}. Pass teacher=PATH, the teacher's diffusers pipeline folder") from None
    flow = index.get("scheduler", [None, None])[1] == "FlowMatchEulerDiscreteScheduler"

    def load():
        # the safety checker would blank images that FID and CLIP score must see as the model made them
        extra = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
        pipe = DiffusionPipeline.from_pretrained(teacher, **extra)
        if not flow:
            pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": False})
        call = {"num_inference_steps": settings.teacher_steps, "guidance_scale": settings.guidance,
                **export.FAMILY_CALL.get(family.name, {})}
        return _stock(pipe, call, device)

    sampler = "Euler (flow matching)" if flow else "DDIM (eta 0)"
    record = {"kind": "teacher", "teacher": teacher, "sampler": sampler, "steps": settings.teacher_steps,
              "guidance": settings.guidance, "step": None}
    name = f"teacher-{'euler' if flow else 'ddim'}{settings.teacher_steps}-cfg{settings.guidance:g}"
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
