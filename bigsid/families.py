"""Teacher families: how each diffusers pipeline's network is called, loaded, sharded and exported.

A family is detected from the teacher folder's model_index.json and fixes everything bigsid does differently per
model: the denoiser's call convention (what of the `Cond` it passes) and its sharding plan (`blocks`, `stages`), the text
encoders (bigsid.text), the schedule (VP or rectified flow, from the scheduler config), and the
stock pipeline an export loads in (the teacher's own). The objectives, the trainer and the backends see none of it.

  family   pipelines                               network                    schedule
  sd       StableDiffusionPipeline                 UNet2DConditionModel       VP, eps or v
  sdxl     StableDiffusionXLPipeline               UNet2DConditionModel       VP, eps or v
  pixart   PixArtAlphaPipeline, PixArtSigmaPipeline PixArtTransformer2DModel  VP, eps (learned variance dropped)
  sd3      StableDiffusion3Pipeline                SD3Transformer2DModel      rectified flow, velocity
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bigsid.diffusion import Schedule
from bigsid.text import (CLIPPromptEncoder, Cond, PromptEncoder, SD3PromptEncoder, SDXLPromptEncoder,
                         T5PromptEncoder)

log = logging.getLogger("bigsid.families")


class TeacherError(ValueError):
    """The teacher cannot be loaded as configured; the message says what to change."""


class _Denoiser(nn.Module):
    """A diffusers network as `net(x_t, timestep, cond) -> prediction`, held under the pipeline's own component name
    (`unet`, `transformer`), with its sharding plan: `blocks` (the repeated blocks: FSDP2's inner units, compile's
    regions) and `stages` (outer units grouping what the blocks leave, where the network has them)."""

    component: str

    def __init__(self, network: nn.Module, prediction_type: str):
        super().__init__()
        setattr(self, self.component, network)
        self.prediction_type = prediction_type

    @property
    def network(self) -> nn.Module:
        return getattr(self, self.component)

    def stages(self) -> list[nn.Module]:
        return []


class UNetDenoiser(_Denoiser):
    """A diffusers UNet2DConditionModel as a denoiser: SD 1.x/2.x (eps or v), and SDXL, whose UNet also takes the
    pooled text embedding and the size ids (`addition_embed_type: text_time`)."""

    component = "unet"

    def blocks(self) -> list[nn.Module]:
        """Each resnet and attention module, in forward order."""
        return [m for stage in self.stages()
                for m in (*getattr(stage, "resnets", []), *(getattr(stage, "attentions", None) or []))]

    def stages(self) -> list[nn.Module]:
        """FSDP2's outer units: the down, mid and up blocks (with their down/upsamplers); a whole SDXL up-block is
        ~1.2 B parameters, too large to gather at once, hence the inner units. The root keeps the time and added
        embeddings and the in/out convolutions."""
        unet = self.unet
        return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # a teacher stored in bf16 is also called outside autocast (its evaluation sampler): inputs follow it
        dtype = self.unet.dtype
        cond = cond.to(dtype)
        added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.size}
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=cond.emb, added_cond_kwargs=added,
                         return_dict=False)[0]


class PixArtDenoiser(_Denoiser):
    """A PixArt-alpha/Sigma transformer: T5 tokens with their mask, resolution and aspect-ratio conditioning where
    the model takes it (of the released ones PixArt-alpha's 1024 px model alone: PixArt-Sigma's take none), and of its
    learned-variance output only the eps channels."""

    component = "transformer"

    def blocks(self) -> list[nn.Module]:
        """Each transformer block (self-attention, cross-attention to the T5 tokens, MLP): one unit each, all the
        same size; the root keeps the patch embedding, adaLN-single, caption projection and output layer."""
        return list(self.transformer.transformer_blocks)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self.transformer.dtype
        cond = cond.to(dtype)
        added = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            added = {"resolution": cond.size[:, :2], "aspect_ratio": cond.size[:, 2:]}
        out = self.transformer(x_t.to(dtype), encoder_hidden_states=cond.emb, encoder_attention_mask=cond.mask,
                               timestep=t, added_cond_kwargs=added, return_dict=False)[0]
        return out[:, :x_t.shape[1]]  # learned sigma: the variance channels follow the mean's


class SD3Denoiser(_Denoiser):
    """An SD3/SD3.5 transformer (rectified-flow velocity), called at its training timestep sigma * 1000."""

    component = "transformer"

    def blocks(self) -> list[nn.Module]:
        """Each joint (MM-DiT) block, image and text streams together: one unit each; the root keeps the patch,
        time, pooled-text and caption embeddings and the output layer."""
        return list(self.transformer.transformer_blocks)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self.transformer.dtype
        cond = cond.to(dtype)
        return self.transformer(x_t.to(dtype), encoder_hidden_states=cond.emb, pooled_projections=cond.pooled,
                                timestep=t, return_dict=False)[0]


@dataclass(frozen=True)
class Family:
    name: str
    pipelines: tuple[str, ...]  # model_index.json _class_name values
    network_class: str  # the diffusers class of its denoising network
    denoiser: type
    encoders: tuple[str, ...]  # text-encoder components, in the order the family's PromptEncoder takes them

    @property
    def network(self) -> str:
        """The pipeline component (and subfolder) that denoises: unet | transformer."""
        return self.denoiser.component


FAMILIES = {f.name: f for f in (
    Family("sd", ("StableDiffusionPipeline",), "UNet2DConditionModel", UNetDenoiser,
           ("text_encoder",)),
    Family("sdxl", ("StableDiffusionXLPipeline",), "UNet2DConditionModel", UNetDenoiser,
           ("text_encoder", "text_encoder_2")),
    Family("pixart", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), "PixArtTransformer2DModel",
           PixArtDenoiser, ("text_encoder",)),
    Family("sd3", ("StableDiffusion3Pipeline",), "SD3Transformer2DModel", SD3Denoiser,
           ("text_encoder", "text_encoder_2", "text_encoder_3")),
)}
# T5 lengths the stock pipelines encode with by default (PixArt-alpha 120 tokens, Sigma 300, SD3 256)
T5_MAX_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300, "StableDiffusion3Pipeline": 256}


def _load(load, path: str, subfolder: str | None, revision: str, what: str):
    try:
        return load(path, **({"subfolder": subfolder} if subfolder else {}), revision=revision or None)
    except (OSError, ValueError) as err:
        raise TeacherError(f"cannot load the teacher's {what} from {path!r} ({subfolder or '.'}/): {err}. "
                           "teacher.path must be a diffusers pipeline folder of a supported family "
                           f"({', '.join(p for f in FAMILIES.values() for p in f.pipelines)}) or a hub id reachable "
                           "from this machine") from None


def pipeline_config(path: str, revision: str = "") -> dict:
    from diffusers import DiffusionPipeline

    return dict(_load(DiffusionPipeline.load_config, path, None, revision, "model_index.json"))


def detect(index: dict, path: str) -> Family:
    """The family of a pipeline from its model_index.json, or a TeacherError naming what was found."""
    name = index.get("_class_name", "")
    for family in FAMILIES.values():
        if name in family.pipelines:
            return family
    supported = ", ".join(p for f in FAMILIES.values() for p in f.pipelines)
    raise TeacherError(f"{path!r} is a {name or 'pipeline without a _class_name'} folder, which bigsid cannot "
                       f"distill: supported pipelines are {supported}")


LIBRARIES = ("transformers", "diffusers")  # where a pipeline's components may come from


def _component(index: dict, name: str, path: str, revision: str, what: str):
    """Load component `name` of the pipeline with the class model_index.json names. The file only chooses among
    transformers' and diffusers' own classes: importing a module it names could run that module's code."""
    import importlib

    spec = index.get(name)
    if not spec or spec[0] is None:
        raise TeacherError(f"the teacher {path!r} has no {what} ({name} in model_index.json is empty): this family "
                           "needs it; use the model's full pipeline folder")
    library, class_name = spec
    cls = getattr(importlib.import_module(library), class_name, None) if library in LIBRARIES else None
    if not hasattr(cls, "from_pretrained"):
        raise TeacherError(f"the teacher {path!r} names {library}.{class_name} for its {what} in model_index.json: "
                           f"bigsid loads components of {' or '.join(LIBRARIES)} classes only")
    return _load(cls.from_pretrained, path, name, revision, what)


def t5_length(family: Family, index: dict, text_max_length: int = 0) -> int:
    """The T5 tokens a prompt is padded to: teacher.text_max_length, else the stock pipeline's; 0 without T5."""
    if text_max_length and family.name in ("sd", "sdxl"):
        raise TeacherError(f"teacher.text_max_length={text_max_length} applies to T5 encoders (pixart, sd3); a "
                           f"{family.name} teacher's CLIP encoders have a fixed length: leave it at 0")
    return text_max_length or T5_MAX_LENGTH.get(index["_class_name"], 0)


def load_encoder(family: Family, index: dict, path: str, revision: str, sample_size: int,
                 text_max_length: int = 0) -> PromptEncoder:
    """The family's PromptEncoder with its tokenizers and text encoders from the pipeline folder, conditioning on the
    size of the network's `sample_size` (in latents) where the family has size conditioning."""
    length = t5_length(family, index, text_max_length)
    tokenizer_names = ["tokenizer" + name[len("text_encoder"):] for name in family.encoders]
    tokenizers = [_component(index, n, path, revision, f"tokenizer {n}") for n in tokenizer_names]
    encoders = [_component(index, n, path, revision, f"text encoder {n}") for n in family.encoders]
    pixels = sample_size * 8  # VAE factor 8 in every supported family
    if family.name == "sd":
        return CLIPPromptEncoder(tokenizers[0], encoders[0])
    if family.name == "sdxl":
        return SDXLPromptEncoder(tokenizers, encoders, pixels, pixels,
                                 bool(index.get("force_zeros_for_empty_prompt", True)))
    if family.name == "pixart":
        return T5PromptEncoder(tokenizers[0], encoders[0], length, (pixels, pixels))
    return SD3PromptEncoder(tokenizers, encoders, length)


def decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents as the family's stock pipeline decodes them: latents / scaling_factor, plus
    the shift_factor of VAEs that have one (SD3's; none in SD, SDXL or PixArt)."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    if vae.config.get("shift_factor") is not None:
        latents = latents + vae.config.shift_factor
    return vae.decode(latents).sample


@dataclass
class Teacher:
    """A loaded teacher pipeline, ready for build_networks and export."""

    family: Family
    denoiser: nn.Module
    schedule: Schedule
    encoder: PromptEncoder | None  # None when loaded without text encoders (data.text_cache)
    vae: nn.Module
    scheduler_config: dict
    index: dict  # model_index.json

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.denoiser.network.config
        return (c.in_channels, c.sample_size, c.sample_size)


def load_network(family: Family, path: str, revision: str = "", torch_dtype: torch.dtype | None = None,
                 weights: bool = True) -> nn.Module:
    """The pipeline's denoising network (a diffusers model), its weights stored in `torch_dtype` (default fp32).

    weights=False reads its config alone: the tensors of its weight file are left on the meta device, in the dtype
    from_pretrained would store them in, for a backend to fill (models.build_networks); the buffers the network
    computes for itself are built as from_pretrained builds them (PixArt's position embedding stays fp32)."""
    import diffusers
    from accelerate import init_empty_weights

    network_class = getattr(diffusers, family.network_class)
    if weights:
        return _load(lambda *a, **k: network_class.from_pretrained(*a, **k, torch_dtype=torch_dtype), path,
                     family.network, revision, family.network)
    config = _load(network_class.load_config, path, family.network, revision, f"{family.network} config")
    with init_empty_weights(include_buffers=False):
        network = network_class.from_config(config)
    for name, t in network.state_dict(keep_vars=True).items():
        owner, _, attr = name.rpartition(".")
        module = network.get_submodule(owner)
        empty = torch.empty_like(t, device="meta", dtype=torch_dtype if t.is_floating_point() and torch_dtype else None)
        if isinstance(t, nn.Parameter):
            module.register_parameter(attr, nn.Parameter(empty, requires_grad=t.requires_grad))
        else:
            module.register_buffer(attr, empty)
    return network


# what from_pretrained reads when no variant is asked for: one file, or shards listed in WEIGHTS + ".index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class StoredTensor:
    """One tensor of a safetensors file, read when asked, whole or a run of its dim-0 rows, cast to `dtype`: a
    rank that holds rows of a sharded parameter reads those bytes and no others. The file is opened per read, so
    its pages are mapped only while one tensor is copied out of it."""

    def __init__(self, file: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype | None = None):
        self.file, self.key, self.shape, self.dtype = file, key, shape, dtype

    def to(self, dtype: torch.dtype) -> StoredTensor:
        return StoredTensor(self.file, self.key, self.shape, dtype)

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            t = f.get_slice(self.key)[start:stop] if self.shape else f.get_tensor(self.key)
        return t.to(self.dtype) if self.dtype is not None else t


def _network_folder(family: Family, path: str, revision: str) -> Path | None:
    """The folder of the pipeline's denoising network: in a local pipeline folder, or in the hub cache (its
    safetensors weights fetched there first, as from_pretrained would fetch them)."""
    if Path(path).is_dir():
        return Path(path) / family.network
    from huggingface_hub import snapshot_download

    sub = family.network
    shards = f"{sub}/{WEIGHTS.removesuffix('.safetensors')}-*"  # the files an index lists, not the fp16 variant's
    try:
        return Path(snapshot_download(path, revision=revision or None,
                                      allow_patterns=[f"{sub}/{WEIGHTS}", f"{sub}/{WEIGHTS}.index.json", shards])) / sub
    except (OSError, ValueError) as err:  # the hub's errors: not reachable, no such repository or revision
        log.info("the teacher's weight files of %r are not at hand (%s): from_pretrained reads them", path, err)
        return None


def stored_weights(family: Family, path: str, revision: str,
                   expected: dict[str, torch.Tensor]) -> dict[str, StoredTensor] | None:
    """The denoiser's weights as its safetensors files store them, named as the denoiser names them, for ranks that
    each read only the rows they hold. `expected`: the denoiser's state dict (built empty), each of which the files
    must hold in its shape. None where they are not stored so (.bin files, names from_pretrained converts, a hub id
    not reachable): load_network then reads them whole, and says what is wrong where it cannot."""
    from safetensors import SafetensorError, safe_open

    folder = _network_folder(family, path, revision)
    if folder is None:
        return None
    try:
        index = folder / f"{WEIGHTS}.index.json"
        files = ({folder / name for name in json.loads(index.read_text())["weight_map"].values()}
                 if index.is_file() else {folder / WEIGHTS})
        stored = {}
        for file in sorted(files):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    stored[f"{family.network}.{key}"] = StoredTensor(file, key, tuple(f.get_slice(key).get_shape()))
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        log.info("the teacher's weights in %s are not readable tensor by tensor (%s): from_pretrained reads them",
                 folder, err)
        return None
    for name, t in expected.items():
        if name not in stored or stored[name].shape != tuple(t.shape):
            log.info("%s does not hold %s as the network names it: from_pretrained reads the teacher's weights",
                     folder, name)
            return None
    return stored


def load_teacher(path: str, revision: str = "", prediction_type: str = "", text_max_length: int = 0,
                 torch_dtype: torch.dtype | None = None, text_encoders: bool = True, weights: bool = True) -> Teacher:
    """A teacher from a diffusers pipeline folder or hub id, of any supported family, its network stored in
    `torch_dtype` (default fp32); without its text encoders where `text_encoders` is false (a run that reads
    its prompts' encodings from a text cache never loads them); its network empty (meta device) where `weights` is
    false (load_network)."""
    import diffusers
    from diffusers import AutoencoderKL

    index = pipeline_config(path, revision)
    family = detect(index, path)
    scheduler_config = dict(_load(diffusers.DDPMScheduler.load_config, path, "scheduler", revision,
                                  "scheduler config"))
    schedule = Schedule.from_scheduler_config(scheduler_config, prediction_type)
    network = load_network(family, path, revision, torch_dtype, weights)
    encoder = (load_encoder(family, index, path, revision, network.config.sample_size, text_max_length)
               if text_encoders else None)
    vae = _load(AutoencoderKL.from_pretrained, path, "vae", revision, "VAE")
    denoiser = family.denoiser(network, schedule.prediction_type)
    return Teacher(family, denoiser, schedule, encoder, vae, scheduler_config, index)
