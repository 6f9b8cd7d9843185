"""Export a distilled generator into its teacher's own stock diffusers pipeline, and sample from it.

Every family exports into the pipeline class of its teacher (StableDiffusionPipeline, StableDiffusionXLPipeline,
PixArtAlphaPipeline / PixArtSigmaPipeline, StableDiffusion3Pipeline), which DiffusionPipeline.from_pretrained loads
without custom code and which runs bigsid's chain when called with standard arguments only (`stock_call`): the
network's weights are the generator's, unchanged, and the scheduler the export ships makes the call compute exactly
the generator's input and output.

VP teachers (SD, SDXL, PixArt). The generator is trained on sqrt(1 - abar_t0) * z at t0 = generator.t_init and
returns its x0-prediction. A stock pipeline feeds init_noise_sigma * z, so the export carries EulerDiscreteScheduler on
the teacher's schedule cut at t0 (num_train_timesteps = t0 + 1, trained_betas = the teacher's first t0 + 1 betas,
timestep_spacing "trailing"). One step then runs the network once at t0 on sigma_t0 * z / sqrt(sigma_t0^2 + 1) =
sqrt(1 - abar_t0) * z and returns its x0-prediction. With k steps the same scheduler re-noises x0 at trailing
timesteps t0 > t_1 > ... with the noise the generator's own prediction implies (DDIM, eta = 0), the chain
OneStepGenerator runs, at timesteps it computes by the scheduler's own expression; a k whose spacing takes an extra
step (to timestep -1) is refused. SDXL's, PixArt's and SD's pipelines call the scheduler alike (scale_model_input,
then step on the network's output: PixArt's of its eps channels); SDXL's also passes the size ids of its default
image size, which is the size bigsid conditions on.

Rectified flow (SD3). A stock flow pipeline starts every chain from the noise itself, x = z at sigma = 1, and no
FlowMatchEulerDiscreteScheduler setting scales it, so only a generator trained from pure noise (t_init = N - 1,
x_t = z) is reproduced: the export refuses any other t_init. The teacher's own scheduler then runs it: one step
(num_inference_steps=1) goes from sigma 1 to 0, x0 = z - v, the generator's x0-prediction. A k-step chain's Euler step
x + (sigma' - sigma) v is re-noising x0 = x - sigma v with the noise it implies, eps = x0 + v, at sigma' (DDIM,
eta = 0), so the chain is reproduced wherever the scheduler runs at the chain's sigmas. num_inference_steps=k does not
(its grid runs down to the config's smallest sigma, shifted twice, whatever k); the call passes them instead:
sigmas = (t_i + 1) / N, the chain's unshifted grid times, which the scheduler shifts with the teacher's shift.

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
from bigsid.families import Family, TeacherError, decode, detect, load_teacher, pipeline_config
from bigsid.diffusion import FlowSchedule, Schedule, vp_scheduler
from bigsid.models import OneStepGenerator, clean_step_counts, lora_config, trailing_timesteps
from bigsid.text import PromptEncoder
from bigsid.parallel import deepspeed as deepspeed_layout

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for
CARD = "README.md"
# What a family's stock call needs beyond (prompt, steps, guidance_scale=0, latents) to condition the network as
# bigsid does, besides the run's T5 length (`stock_call`): PixArt without aspect-ratio binning (the generator was
# trained at one size; binning maps a requested size to the model's bins and resizes the decoded image back) and
# without caption cleaning (bigsid lowercases and strips prompts, as the pipeline does when it does not clean them).
FAMILY_CALL = {"pixart": {"use_resolution_binning": False, "clean_caption": False}}
FAMILY_TAG = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl", "pixart": "pixart", "sd3": "sd3"}


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


# ---- the generator as trained, and the scheduler and call that reproduce it ----

def one_step_scheduler(teacher_scheduler_config: dict, t_init: int, prediction_type: str):
    """EulerDiscreteScheduler on the teacher's schedule cut at t_init: num_inference_steps=k reproduces the
    generator's k-step chain (see the module docstring)."""
    from diffusers import EulerDiscreteScheduler

    betas = vp_scheduler(teacher_scheduler_config).betas[: t_init + 1]
    # steps_offset only shifts "leading" spacing; 1 keeps StableDiffusionPipeline from rewriting the config.
    return EulerDiscreteScheduler(num_train_timesteps=t_init + 1, trained_betas=betas.tolist(),
                                  prediction_type=prediction_type, timestep_spacing="trailing", steps_offset=1)


def export_scheduler(teacher_scheduler_config: dict, t_init: int, schedule: Schedule):
    """The scheduler an export ships: the Euler cut for a VP teacher, a flow teacher's own (whatever the network
    predicts: `_check_reproducible` refuses what that scheduler cannot run)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(schedule, FlowSchedule):
        return FlowMatchEulerDiscreteScheduler.from_config(teacher_scheduler_config)
    return one_step_scheduler(teacher_scheduler_config, t_init, schedule.prediction_type)


def _is_flow(scheduler) -> bool:
    return type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def sampling_timesteps(scheduler, steps: int) -> list[int]:
    """The grid timesteps the exported scheduler, called as `stock_call` says, runs the generator at for `steps`
    steps, t_init first."""
    most = scheduler.config.num_train_timesteps - 1
    if not 1 <= steps <= most:
        raise ExportError(f"steps={steps}: expected 1..{most} (the generator's t_init)")
    if _is_flow(scheduler):
        return trailing_timesteps(most, steps)
    scheduler.set_timesteps(steps)
    stock, chain = [int(t) for t in scheduler.timesteps], trailing_timesteps(most, steps)
    if stock != chain:
        raise ExportError(f"steps={steps}: the exported scheduler would run the network at timesteps {stock}, but the "
                          f"generator's {steps}-step chain from t_init={most} runs at {chain}; ask for steps="
                          f"{' or '.join(map(str, clean_step_counts(most, steps)))} instead")
    return stock


def step_arguments(scheduler, steps: int) -> dict:
    """How the stock call asks the exported scheduler for the generator's `steps`-step chain: the step count, or for
    a flow chain of several steps its sigmas (see the module docstring)."""
    timesteps = sampling_timesteps(scheduler, steps)
    if _is_flow(scheduler) and steps > 1:
        return {"sigmas": [(t + 1) / scheduler.config.num_train_timesteps for t in timesteps]}
    return {"num_inference_steps": steps}


def stock_call(scheduler, steps: int, family: str, t5_length: int = 0) -> dict:
    """The keyword arguments (all but the prompt and the noise) of the stock pipeline call that runs the exported
    generator's `steps`-step chain: its steps, no guidance, the family's own conditioning arguments and, for a T5
    family, the T5 length the generator was conditioned with (SD3's transformer attends to the padding too)."""
    return (step_arguments(scheduler, steps) | {"guidance_scale": 0, **FAMILY_CALL.get(family, {})}
            | ({"max_sequence_length": t5_length} if t5_length else {}))


def latent_shape(network: torch.nn.Module) -> tuple[int, int, int]:
    c = network.config
    return (c.in_channels, c.sample_size, c.sample_size)


@dataclass
class Distilled:
    """A checkpoint's generator ready to sample, with what the export and its model card need."""

    generator: OneStepGenerator
    encoder: PromptEncoder
    vae: torch.nn.Module
    scheduler: object  # export_scheduler: the stock pipeline's convention for this generator
    family: Family
    pipeline: str  # the teacher's pipeline class, which the export is
    t5_length: int  # the T5 length the generator was conditioned with; 0 without T5
    teacher: str
    revision: str
    lora: object  # peft LoraConfig, or None
    lora_on_teacher: bool  # every weight outside the LoRA adapter is the teacher's
    folder: Path
    state: dict  # train_state.json
    ema: bool

    def to(self, device) -> "Distilled":
        for module in (self.generator, self.encoder, self.vae):
            module.to(device)
        return self

    @torch.no_grad()
    def images(self, prompts: list[str], z: torch.Tensor, steps: int) -> list:
        """PIL images of the generator's `steps`-step chain from z, decoded as the stock pipeline decodes."""
        from diffusers.image_processor import VaeImageProcessor

        if not 1 <= steps <= self.generator.t_init:
            raise ExportError(f"steps={steps}: expected 1..{self.generator.t_init} (the generator's t_init)")
        latents = self.generator(z, self.encoder(prompts), chain=steps)
        return VaeImageProcessor().postprocess(decode(self.vae, latents), output_type="pil")


def _teacher_family(teacher: str, revision: str) -> tuple[Family, str]:
    """The teacher's family and pipeline class, read from its model_index.json before anything is loaded."""
    try:
        index = pipeline_config(teacher, revision)
        return detect(index, teacher), index["_class_name"]
    except TeacherError as err:
        raise ExportError(f"{err}. The export copies the teacher's VAE, text encoders and tokenizers into the "
                          "teacher's own pipeline: pass --teacher with the pipeline folder or hub id the run was "
                          "trained from") from None


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
    family, pipeline = _teacher_family(path, revision)
    weights = load_generator_state(folder, ema)
    loaded = load_teacher(path, revision, config["teacher"]["prediction_type"],
                          config["teacher"].get("text_max_length", 0))
    net, schedule, encoder, vae = loaded.denoiser, loaded.schedule, loaded.encoder, loaded.vae
    lora = lora_config(config)
    if lora is not None:
        if not hasattr(net.network, "add_adapter"):
            raise ExportError(f"{folder}: the generator is a LoRA adapter, but diffusers' {family.network_class} "
                              f"(the {pipeline} teacher {path!r}) takes no LoRA adapter, so no run can have trained "
                              "one on it: pass --teacher with the run's teacher")
        net.network.add_adapter(lora)
    generator = OneStepGenerator(net, schedule, config["generator"]["t_init"], config["generator"].get("steps", 1))
    expected = generator.state_dict()
    _check_fit(weights, expected, path)
    # Compared before loading, while the network still holds the teacher's weights.
    lora_on_teacher = lora is not None and all(torch.equal(weights[k], v) for k, v in expected.items()
                                               if "lora_" not in k)
    generator.load_state_dict(weights)
    generator.requires_grad_(False).eval()
    scheduler = export_scheduler(loaded.scheduler_config, generator.t_init, schedule)
    # T5 comes last in both T5 families' encoders (PixArt: alone; SD3: after the two CLIPs)
    t5_length = encoder.tokens[-1].max_length if family.name in ("pixart", "sd3") else 0
    return Distilled(generator, encoder, vae.eval(), scheduler, family, pipeline, t5_length, path, revision, lora,
                     lora_on_teacher, folder, state, ema)


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


def _check_reproducible(d: Distilled) -> None:
    """Refuse a flow generator that a stock flow pipeline cannot run (see the module docstring)."""
    prediction = d.generator.net.prediction_type
    if _is_flow(d.scheduler) and prediction != "flow":
        raise ExportError(
            f"{d.folder}: the generator predicts {prediction} (teacher.prediction_type={prediction}), but "
            f"{d.pipeline}'s FlowMatchEulerDiscreteScheduler reads every network output as the flow velocity and "
            f"no scheduler setting converts it, so no stock call reproduces this generator. Train from a flow "
            f"teacher with teacher.prediction_type=flow to export it; `bigsid sample` and `bigsid eval` run this "
            f"checkpoint as it is")
    last = d.generator.schedule.num_timesteps - 1
    if _is_flow(d.scheduler) and d.generator.t_init != last:
        raise ExportError(
            f"{d.folder}: the generator was trained from sigma_t * z at generator.t_init={d.generator.t_init} "
            f"(sigma = {float(d.generator.schedule.s[d.generator.t_init]):.4f}), but {d.pipeline} starts every chain "
            f"from z itself at sigma 1 and no scheduler setting scales it, so no stock call reproduces this "
            f"generator. Train a flow generator with generator.t_init={last} (pure noise) to export it; `bigsid "
            f"sample` and `bigsid eval` run this checkpoint as it is")


def export(source: str | Path, out: str | Path, ema: bool = True, teacher: str | None = None, steps: int | None = None,
           fuse_lora: bool = False, force: bool = False) -> Path:
    """Write `source`'s generator as a diffusers pipeline folder of its teacher's class (safetensors) with a model
    card; a LoRA generator as pytorch_lora_weights.safetensors over its teacher, or fused into a full pipeline with
    fuse_lora=True.

    `steps` is the step count the model card's call uses; by default the run's generator.steps."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    out = Path(out)
    d = load_distilled(source, ema, teacher)
    _check_reproducible(d)
    steps = d.generator.steps if steps is None else steps
    call = stock_call(d.scheduler, steps, d.family.name, d.t5_length)
    as_lora = d.lora is not None and not fuse_lora
    if as_lora and not d.lora_on_teacher:
        raise ExportError(f"{d.folder}: weights outside the LoRA adapter differ from the teacher's, so the adapter "
                          "alone would not reproduce the generator; export with --fuse-lora")
    partial = _output_folder(out, force, [d.folder] + ([Path(d.teacher)] if Path(d.teacher).exists() else []))
    network = d.generator.net.network
    if as_lora:
        from peft.utils import get_peft_model_state_dict

        # A LoRA file without adapter metadata loads with lora_alpha = rank in every diffusers version: carry
        # alpha / rank in the up-projection instead of in metadata that older versions ignore.
        scale = d.lora.lora_alpha / d.lora.r
        layers = {k: v * scale if ".lora_B." in k else v for k, v in get_peft_model_state_dict(network).items()}
        getattr(diffusers, d.pipeline).save_lora_weights(
            partial, **{f"{d.family.network}_lora_layers": convert_state_dict_to_diffusers(layers)})
        d.scheduler.save_pretrained(partial / "scheduler")
    else:
        if d.lora is not None:
            network.fuse_lora()
            network.unload_lora()
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            d.teacher, revision=d.revision or None, scheduler=d.scheduler, vae=d.vae, **{d.family.network: network})
        pipe.save_pretrained(partial, safe_serialization=True)
    model_card(d, out, call, as_lora).save(partial / CARD)
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


def _usage(d: Distilled, out: Path, call: dict, as_lora: bool) -> str:
    """The Python that runs the export with stock diffusers."""
    arguments = ", ".join(f"{k}={v!r}" for k, v in call.items())
    line = f'image = pipe("a photo of a cat", {arguments}).images[0]'
    if as_lora:
        scheduler = type(d.scheduler).__name__
        return "\n".join([
            f"from diffusers import DiffusionPipeline, {scheduler}",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{d.teacher}")',
            f'pipe.scheduler = {scheduler}.from_pretrained("{out}", subfolder="scheduler")',
            f'pipe.load_lora_weights("{out}")',
            line])
    return "\n".join(["from diffusers import DiffusionPipeline", "",
                      f'pipe = DiffusionPipeline.from_pretrained("{out}")', line])


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
            ("fd_reference", "exact samples (noise floor)")]
    lines = [f"Frechet distance in latent space to the exact mean and covariance of the teacher's analytic "
             f"Gaussian-mixture truth (of its exact guided sampler for a guided run), {metrics['num_samples']} "
             f"samples per prompt, mean over prompts (lower is better); EMA weights, step {metrics['step']}.",
             "", "| samples from | Frechet distance |", "| --- | --- |"]
    lines += [f"| {label} | {metrics[key]:.4f} |" for key, label in rows if key in metrics]
    lines += ["", f"Mode coverage (total variation between nearest-mode frequencies and the true weights): "
                  f"{metrics['mode_coverage_tv']:.4f}."]
    return "\n".join(lines + (["", images] if images else []))


def _generator_input(d: Distilled) -> str:
    t0 = d.generator.t_init
    if _is_flow(d.scheduler):
        return f"x0-prediction at t_init = {t0} (sigma = 1) from the noise z itself"
    s = float(d.generator.schedule.s[t0])
    return f"x0-prediction at t_init = {t0} from sqrt(1 - abar_t_init) * z = {s:.4f} * z"


def _how(d: Distilled, call: dict) -> str:
    """The model card's account of why the stock call gives bigsid's chain, and what else the call needs."""
    t0, network = d.generator.t_init, "UNet" if d.family.network == "unet" else "transformer"
    if _is_flow(d.scheduler):
        shift = d.scheduler.config.shift
        text = f"""The scheduler is the teacher's own `FlowMatchEulerDiscreteScheduler` (shift {shift}). The generator
was trained from pure noise (t_init = {t0}, sigma = 1: x_t = z), where every stock flow chain starts: one step feeds
the transformer z at timestep {t0 + 1} and returns z - v, the generator's x0-prediction. With k steps the call passes
`sigmas` = (t_i + 1) / {t0 + 1} at the chain's grid times t_i, which the scheduler shifts as the teacher's schedule
does; each Euler step x + (sigma' - sigma) v re-noises x0 = x - sigma v with the noise it implies, x0 + v, at sigma'
(deterministic, DDIM eta = 0), as `bigsid sample --steps k` does. `num_inference_steps=k` alone would run other
sigmas. A flow generator trained from t_init below {t0} is not exported: the stock pipeline cannot scale its noise."""
    else:
        s, sigma = float(d.generator.schedule.s[t0]), float(d.scheduler.init_noise_sigma)
        text = f"""The scheduler is `EulerDiscreteScheduler` on the teacher's noise schedule cut at t = {t0}
(`num_train_timesteps` = {t0 + 1}, `trained_betas` = the teacher's first {t0 + 1} betas, `timestep_spacing` =
"trailing"). One step starts from `init_noise_sigma` * z = {sigma:.4f} * z, feeds the {network}
{sigma:.4f} * z / sqrt({sigma:.4f}^2 + 1) = {s:.4f} * z at t = {t0}, exactly the generator's training input, and
returns its x0-prediction. With k steps the scheduler
re-noises that x0 at trailing timesteps below {t0} with the noise the prediction implies (deterministic, DDIM eta = 0),
as `bigsid sample --steps k` does."""
    notes = [f"The {network}'s weights are the generator's, unchanged."]
    if "max_sequence_length" in call:
        notes.append(f"`max_sequence_length={call['max_sequence_length']}` is the T5 length the generator was "
                     "conditioned with" + (" (SD3's transformer attends to T5's padding too)." if d.family.name == "sd3"
                                           else "."))
    if d.family.name == "pixart":
        notes.append("`use_resolution_binning=False`: the generator was trained at one size, the pipeline's default; "
                     "binning would map other sizes to the model's aspect-ratio bins. `clean_caption=False`: bigsid "
                     "lowercases and strips prompts as the pipeline does without cleaning them.")
    if d.family.name == "sdxl":
        notes.append("SDXL's size ids are those of the pipeline's default size, which the generator was trained "
                     "with.")
    return text + "\n\n" + " ".join(notes) + """

Reproduced: bigsid's own latents on the same noise and prompts, to the fp32 rounding of the scheduler's arithmetic,
and the images the pipeline decodes from them. Not reproduced: other schedulers, step counts or sizes, negative
prompts and guidance_scale > 1 all run the generator on inputs it was not trained on."""


def model_card(d: Distilled, out: Path, call: dict, as_lora: bool):
    from huggingface_hub import ModelCard, ModelCardData

    timesteps = d.generator.timesteps(len(call["sigmas"]) if "sigmas" in call else call["num_inference_steps"])
    steps = len(timesteps)
    config, state = d.state["config"], d.state
    objective = config["objective"]
    name = objective["name"]
    settings = ", ".join(f"{k}={objective[k]}" for k in OBJECTIVE_KEYS[name])
    teacher = f"`{d.teacher}`" + (f" (revision {d.revision})" if d.revision else "")
    train = config["train"]
    seen = f'{state["nimg"]:,} (step {state["step"]}, batch {train["batch_size"]}, seed {train["seed"]})'
    weights = "EMA" if d.ema else "raw (not the EMA)"
    if d.lora is not None:
        weights += f", LoRA rank {d.lora.r} alpha {d.lora.lora_alpha}" + (" (fused)" if not as_lora else "")
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image",
        tags=["text-to-image", FAMILY_TAG[d.family.name], "distillation", "one-step", "bigsid", name]
        + (["lora"] if as_lora else []),
        bigsid={"teacher": d.teacher, "teacher_revision": d.revision, "pipeline": d.pipeline, "objective": name,
                "t_init": d.generator.t_init, "timesteps": timesteps, "call": call, "nimg": state["nimg"],
                "step": state["step"], "ema": d.ema, "lora": as_lora})
    steps_asked = f"`num_inference_steps={steps}`" if "num_inference_steps" in call else f"these {steps} `sigmas`"
    body = f"""
# {out.name}

A {"one" if steps == 1 else steps}-step text-to-image generator distilled by bigsid from `{d.teacher}` with
{_method(objective)}, as a `{d.pipeline}`.

```python
{_usage(d, out, call, as_lora)}
```

Call it exactly so: `guidance_scale=0` (guidance was distilled in; the generator runs without classifier-free
guidance), {steps_asked}, with the scheduler that ships here. Other schedulers or step counts give other images.

## Training

| | |
| --- | --- |
| teacher | {teacher}, {d.generator.net.prediction_type} prediction |
| objective | {name}: {settings} |
| generator | {_generator_input(d)} |
| weights | {weights} |
| images seen | {seen} |
| precision | {train["precision"]} |

## Evaluation

{_evaluation(d)}

## How the stock call reproduces bigsid's sampler

{_how(d, call)}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ---- sampling ----

def card_metadata(model: Path) -> dict:
    """The bigsid section of an export's model card; empty for a folder without one."""
    from huggingface_hub import ModelCard

    return ModelCard.load(model / CARD).data.to_dict().get("bigsid", {}) if (model / CARD).is_file() else {}


def _stock_pipeline(model: Path, meta: dict):
    """An export loaded the way its model card says: a pipeline folder, or a LoRA over its teacher."""
    import diffusers

    if (model / "model_index.json").is_file():
        return diffusers.DiffusionPipeline.from_pretrained(model)
    if not meta:
        raise ExportError(f"{model} holds a LoRA file but no model card ({CARD}) naming its teacher: export again")
    pipe = diffusers.DiffusionPipeline.from_pretrained(meta["teacher"], revision=meta["teacher_revision"] or None)
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    pipe.scheduler = getattr(diffusers, scheduler).from_pretrained(model, subfolder="scheduler")
    pipe.load_lora_weights(model)
    return pipe


def load_export(model: str | Path, steps: int | None = None) -> tuple[object, dict]:
    """An export loaded as its model card says, and the keyword arguments of its stock call for `steps` steps (by
    default the card's); a pipeline folder without a card is called with its family's arguments."""
    model = Path(model)
    meta = card_metadata(model)
    pipe = _stock_pipeline(model, meta)
    pipe.set_progress_bar_config(disable=True)
    call = meta.get("call") or stock_call(pipe.scheduler, 1, detect({"_class_name": type(pipe).__name__},
                                                                     str(model)).name)
    if steps is None:
        return pipe, call
    return pipe, {k: v for k, v in call.items() if k not in ("num_inference_steps", "sigmas")} | step_arguments(
        pipe.scheduler, steps)


def is_export(model: Path) -> bool:
    return (model / "model_index.json").is_file() or (model / LORA_WEIGHTS).is_file()


def _sampling_inputs(model: Path, teacher: str | None) -> list[Path]:
    """What sampling `model` reads, which an output folder must not hold: the model, and the local teacher folder
    it names (an export's card's; a run's, `teacher` in place of the one it trained from)."""
    if is_export(model):
        named = card_metadata(model).get("teacher")
    else:
        named = teacher or checkpoint.read_state(find_checkpoint(model))["config"]["teacher"]["path"]
    return [model] + ([Path(named)] if named and Path(named).exists() else [])


@torch.no_grad()
def sample(model: str | Path, prompts: list[str], out: str | Path, seeds: int = 4, seed: int = 0,
           steps: int | None = None,
           ema: bool = True, teacher: str | None = None, device: str = "auto", force: bool = False) -> list[Path]:
    """Images of `prompts` (seeds each; image j of every prompt uses noise seed + j) from an export, run by the stock
    pipeline, or from a run directory or checkpoint, run by bigsid; the same noise gives the same image either way.
    Writes OUT/PPP-SEED.png and OUT/grid.png (a row per prompt); an existing OUT only with force."""
    import numpy as np

    from bigsid.parallel.local import pick_device
    from bigsid.trainer import save_grid

    model, out, device = Path(model), Path(out), pick_device(device)
    if not prompts:
        raise ExportError("no prompts: pass --prompts")
    partial = _output_folder(out, force, _sampling_inputs(model, teacher))
    if is_export(model):
        pipe, call = load_export(model, steps)
        pipe.to(device)
        network = pipe.unet if hasattr(pipe, "unet") else pipe.transformer

        def generate(batch: list[str], z: torch.Tensor) -> list:
            return pipe(batch, latents=z, **call).images
    else:
        d = load_distilled(model, ema, teacher).to(device)
        steps = d.generator.steps if steps is None else steps
        network = d.generator.net.network

        def generate(batch: list[str], z: torch.Tensor) -> list:
            return d.images(batch, z, steps)

    images = []
    for prompt in prompts:
        z = torch.stack([torch.randn(latent_shape(network), generator=torch.Generator().manual_seed(seed + j))
                         for j in range(seeds)])
        images += generate([prompt] * seeds, z.to(device))
    names = [f"{i // seeds:03d}-{seed + i % seeds}.png" for i in range(len(images))]
    partial.mkdir(parents=True)
    for name, image in zip(names, images):
        image.save(partial / name)
    save_grid(torch.from_numpy(np.stack([np.asarray(im) for im in images])), len(prompts), partial / "grid.png")
    _replace(partial, out)
    return [out / name for name in names + ["grid.png"]]
