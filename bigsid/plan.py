"""Memory planner: bytes per GPU of a distillation run for each backend, and the largest per-GPU batch that fits.

`bigsid plan CONFIG --gpus N [--gpu-mem GiB]`, for a teacher of any family (bigsid.families: SD and SDXL UNets,
PixArt and SD3 transformers). P is the parameter count of its denoising network (counted on the meta device,
free), S the ranks a network is sharded over (1 for local and ddp), N the GPUs, c the bytes of the compute dtype
(2 for bf16, 4 for fp32), b the per-GPU batch. What each GPU holds:

  teacher        cP/S   frozen, stored in the compute dtype (models.build_networks); plus the three networks'
                        buffers (not sharded: SD3's positional-embedding table), counted here
  weights        8P/S   generator and fake_score fp32 master weights
  optimizer     16P/S   Adam exp_avg and exp_avg_sq of both networks
  EMA            4P/S   the generator's
  encoders    cT + 4V   text encoders (T parameters) in the compute dtype (models.build_networks), cT/S on fsdp2
                        with text_encoder.shard, and rank 0's VAE (V), fp32
  ddp buckets    8P     ddp: DDP keeps an fp32 gradient bucket copy of each wrapped network (generator, fake score)
  grads          4P/S   the trained network's, from its backward to its step (zero_grad frees them)
  temporaries    4P/S   the optimizer step: CUDA's foreach Adam allocates sqrt(exp_avg_sq) of all parameters at once
  weight copies  -      local/ddp in bf16: autocast's bf16 casts of fp32 weights, held by its cache (networks that
                        train) or by the autograd graph (frozen networks called for input gradients); measured
  gathered       -      fsdp2/zero3: unsharded units in flight, c (2 L1 + L2 + 3 R) with L1 >= L2 the largest units
                        and R the root parameters (kept unsharded from forward to backward), plus (c + 4) L1 during a
                        trained unit's backward (its unsharded gradients and their fp32 reduce-scatter copy); fsdp2
                        with parallel.gather_frozen_once adds, in the generator phase, the teacher and the fake
                        score whole, c P (1 - 1/S) each (one at a time for DMD, whose frozen calls carry no graph)
                        text_encoder.shard: while the prompts are encoded (no denoiser unit gathered then), c (E +
                        2 L) with L the largest encoder layer and E the largest encoder's parameters outside its
                        layers (embeddings, final norm, projection): the running encoder's outer unit, its layer and
                        the next one's all-gather
  activations    -      measured per sample (below), times each call's batch
  sampling       -      sample grids (trainer.save_samples, at train.sample_every and at the end; eval.sample_prompts x
                        eval.sample_seeds images): every rank runs the EMA generator without grad (its stored weights
                        backed up, 4P/S, and its forward in the training compute dtype on fsdp2, fp32 elsewhere); then
                        rank 0 alone decodes the latents with the VAE DECODE_CHUNK at a time, in bf16 under
                        train.precision=bf16, its peak measured on the meta device as the networks' are
fake_score.lora_rank > 0 (the fake score a LoRA adapter of A parameters on the teacher's network, which the teacher
calls with the adapter off): the teacher is that network, stored in fp32 (4P/S); weights 4(P + A)/S, optimizer
8(P + A)/S; autocast's copies of the frozen fp32 weights are held by the graphs of the teacher's and fake score's
calls; the fake score's backward runs through the frozen network to its input, as a frozen call's does.
DeepSpeed ZeRO (zero2/zero3) keeps bigsid's precision recipe (parallel/deepspeed.py): fp32 weights and EMA, whole
for ZeRO-2 (plus a partitioned fp32 copy its optimizer steps) and /N for ZeRO-3 (the teacher too); grads and Adam
/N; ZeRO-3 gathers fp32 units and autocast casts them as it goes. Checked against 2 CPU ranks (test_parallel.py).

The step's peak is the largest of these moments (g = 2 for a guided call, 1 otherwise; trainer.py, objectives/):
  fake_score  the generator's no-grad forward (b); the fake score's forward end (g1 b), autocast still caching
              both networks' weight copies; the fake score's backward, outside autocast, gradients growing
  generator   the generator loss's backward starting with the frozen teacher (g4 b) and fake score (g2 b, and g3 b
              if kappa3 != kappa2), every activation of the three calls kept (DMD: the frozen calls run without
              grad); the generator's own backward (b), gradients growing
  optimizer   grads and Adam temporaries
During a backward, activations are freed as parameter gradients accumulate: the planner follows the measured curve
of both rather than adding their maxima. `allocated` compares with torch.cuda.max_memory_allocated; `needed` adds
5% for allocator fragmentation and 2 GiB for the CUDA context, NCCL and cuBLAS/cuDNN workspaces.

Activations are measured, not modelled: one forward and backward of the real-size network on the meta device (no
memory, no compute), called through its family's denoiser with a Cond of the family's shapes (CLIP tokens; SDXL's
pooled embedding and size ids; PixArt's T5 tokens, mask and resolution conditioning; SD3's CLIP and T5 tokens and
pooled embedding; at the lengths the family's pipeline pads to), at the run's latent size and batch 1, following
every tensor storage from allocation to release (LiveMemory), with CUDA's bf16 autocast policy and fused attention
reproduced on meta tensors (_Autocast). Activations are linear in the batch; tests check the meta measurement
against real CPU runs. Not counted: the objective's latent-size tensors (a few per sample), training-time image
evaluation (--eval: its batches are the evaluation's own), a LoRA generator (planned as full training, an upper
bound) and a LoRA fake score's rank-r activations, the whole copies ZeRO-3 keeps of parameters under DeepSpeed's
persistence threshold (1e5 elements: 0.05% of SD1.5's and of SDXL's parameters).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from bigsid.config import Config
from bigsid.text import Cond

GiB = 2 ** 30
CONTEXT_BYTES = 2 * GiB  # CUDA context, NCCL buffers, cuBLAS/cuDNN workspaces: outside torch's allocator
FRAGMENTATION = 0.05  # caching-allocator slack over the bytes actually allocated
CONFIG_DIR = Path(__file__).parent / "unet_configs"  # the denoising networks' (and VAEs') configs, UNets or not
DECODE_CHUNK = 8  # latents per VAE decode: trainer.to_images' chunk


@dataclass(frozen=True)
class TextSize:
    """Parameters of a pipeline's text encoders, all together, and of their FSDP2 units under text_encoder.shard
    (text.PromptEncoder's plan): the largest transformer layer, and the largest part of one encoder outside its
    layers (token and position embeddings, final norm, projection)."""

    params: int = 0
    layer: int = 0
    own: int = 0

    def __add__(self, other: "TextSize") -> "TextSize":
        return TextSize(self.params + other.params, max(self.layer, other.layer), max(self.own, other.own))


# Parameters of the frozen networks beside the denoiser (text encoders + VAE), as their released weights hold them.
# A CLIP layer is 4 (d^2 + d) attention + 2 d f + f + d MLP + 4 d norms (CLIP-L d 768, f 3072, 12 layers;
# OpenCLIP-H 1024, 4096, 23; OpenCLIP-bigG 1280, 5120, 32 with a d x d projection); SD3's CLIP-L carries a projection
# (768 x 768) that SD's does not. T5: the T5-v1.1-XXL encoder of PixArt and SD3, 24 blocks of 4 d^2 attention + 3 d f
# gated MLP + 2 d norms (d 4096, f 10240), the first with the 32 x 64 relative-position table, and a 32128 x d
# embedding. SD3's VAE has 16 latent channels and no quant convolutions.
_CLIP_L = TextSize(123_060_480, 7_087_872, 38_006_016)
_CLIP_L_PROJ = TextSize(_CLIP_L.params + 768 * 768, _CLIP_L.layer, _CLIP_L.own + 768 * 768)
_OPENCLIP_H = TextSize(340_387_840, 12_596_224, 50_674_688)
_OPENCLIP_BIGG = TextSize(694_659_840, 19_677_440, 64_981_760)
_T5_XXL = TextSize(4_762_310_656, 192_948_224, 131_600_384)
_VAE, _VAE_SD3 = 83_653_863, 83_819_683


@dataclass(frozen=True)
class Preset:
    """unet_configs/NAME.json: a released model's network config (tiny*: the tests' and the CPU benchmark's)."""

    family: str  # bigsid.families
    text: TextSize  # text encoders
    vae_params: int
    clip_tokens: int  # the prompt sequence the network attends to: CLIP's tokens, then T5's as the family's
    t5_tokens: int  # pipeline pads them (families.T5_MAX_LENGTH; teacher.text_max_length replaces it)
    vae: str | None  # unet_configs/VAE.json, which decodes the sample grids


PRESETS = {
    "sd15": Preset("sd", _CLIP_L, _VAE, 77, 0, "vae"),
    "sd21": Preset("sd", _OPENCLIP_H, _VAE, 77, 0, "vae"),
    # SD 1.x, 2.x, SDXL and PixArt share one VAE architecture (SDXL's differs in its scaling factor only)
    "sdxl": Preset("sdxl", _CLIP_L + _OPENCLIP_BIGG, _VAE, 77, 0, "vae"),
    "pixart_alpha_512": Preset("pixart", _T5_XXL, _VAE, 0, 120, "vae"),
    "pixart_alpha_1024": Preset("pixart", _T5_XXL, _VAE, 0, 120, "vae"),  # with resolution and aspect conditioning
    "pixart_sigma_1024": Preset("pixart", _T5_XXL, _VAE, 0, 300, "vae"),
    "sd35_medium": Preset("sd3", _CLIP_L_PROJ + _OPENCLIP_BIGG + _T5_XXL, _VAE_SD3, 77, 256, "vae_sd3"),
    "tiny": Preset("sd", TextSize(), 0, 32, 0, None),
    "tiny_pixart": Preset("pixart", TextSize(), 0, 0, 32, None),
}
# Hub ids whose network is a preset (and their latent size), so that the shipped configs plan offline.
KNOWN_HUB_IDS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd15", 64),
                 "runwayml/stable-diffusion-v1-5": ("sd15", 64), "CompVis/stable-diffusion-v1-4": ("sd15", 64),
                 "stabilityai/stable-diffusion-2-1-base": ("sd21", 64), "stabilityai/stable-diffusion-2-1": ("sd21", 96),
                 "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", 128),
                 "PixArt-alpha/PixArt-XL-2-512x512": ("pixart_alpha_512", 64),
                 "PixArt-alpha/PixArt-XL-2-1024-MS": ("pixart_alpha_1024", 128),
                 "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": ("pixart_sigma_1024", 128),
                 "stabilityai/stable-diffusion-3.5-medium": ("sd35_medium", 128)}
# A bare network config's prompt tokens (CLIP, T5), as its family's pipeline pads them (families.T5_MAX_LENGTH)
DEFAULT_TOKENS = {"sd": (77, 0), "sdxl": (77, 0), "pixart": (0, 120), "sd3": (77, 256)}
NETWORKS = ("generator", "fake_score", "teacher")


class PlanError(ValueError):
    """The planner cannot run as asked; the message says what to change."""


# ---- the model ----

@dataclass
class ModelSpec:
    """What the planner needs to know about the teacher: its family and network config, latent size and frozen
    companions."""

    name: str
    family: str  # bigsid.families: sd | sdxl | pixart | sd3
    network_config: dict
    latent_size: int  # latent height = width
    text_tokens: int
    text_params: int  # text encoders (0: unknown, not counted)
    vae_params: int  # the VAE, on rank 0 only (0: unknown)
    vae_config: dict | None = None  # the VAE that decodes sample grids (None: unknown, not counted)
    text_units: tuple[int, int] = (0, 0)  # TextSize's (layer, own): the text encoders' FSDP2 units

    @property
    def config_json(self) -> str:
        return json.dumps(self.network_config, sort_keys=True)

    @functools.cached_property
    def counts(self) -> tuple[int, list[int], int]:
        """(network parameters, FSDP unit sizes largest first, root parameters outside the units)."""
        from bigsid.parallel import fsdp2

        denoiser = meta_denoiser(self.family, self.config_json)
        total = sum(p.numel() for p in denoiser.parameters())
        # units nest (a UNet's resnets inside its blocks): a unit gathers only the parameters no inner unit holds
        seen, units = set(), []
        for block in fsdp2.units(denoiser):
            own = [p for p in block.parameters() if id(p) not in seen]
            seen.update(id(p) for p in own)
            units.append(sum(p.numel() for p in own))
        return total, sorted(units, reverse=True), total - sum(units)

    @property
    def params(self) -> int:
        return self.counts[0]

    @functools.cached_property
    def buffers(self) -> int:
        """Floating-point buffer elements of the network, on every rank whatever the backend (no backend shards
        buffers): SD3's positional-embedding table, pos_embed_max_size^2 x its width, is 0.9 GB in fp32 for SD3.5."""
        return sum(b.numel() for b in meta_denoiser(self.family, self.config_json).buffers() if b.is_floating_point())

    def adapter_params(self, rank: int, target_modules: list[str]) -> int:
        """Parameters of a LoRA adapter of `rank` on the network: r (in + out) per adapted linear layer, the layers
        peft adapts (a name equal to a target or ending in "." + target)."""
        return sum(rank * (m.in_features + m.out_features)
                   for name, m in meta_denoiser(self.family, self.config_json).network.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t)
                                                            for t in target_modules))


def _network(family: str, config: dict) -> torch.nn.Module:
    import diffusers

    from bigsid.families import FAMILIES

    return getattr(diffusers, FAMILIES[family].network_class).from_config(config)


@functools.lru_cache(maxsize=8)
def meta_denoiser(family: str, config_json: str) -> torch.nn.Module:
    """The family's denoiser around its network, parameters on the meta device: structure and sizes cost nothing."""
    from bigsid.families import FAMILIES

    with torch.device("meta"):
        return FAMILIES[family].denoiser(_network(family, json.loads(config_json)), "epsilon")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PlanError(f"cannot read {path}: {err}") from None


def _stored(folder: Path):
    """(name, elements) of each tensor in a folder's safetensors files, from their headers (nothing is loaded)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            yield from ((k, math.prod(f.get_slice(k).get_shape())) for k in f.keys())


def _safetensors_params(folder: Path) -> int:
    return sum(n for _, n in _stored(folder))


# a tensor of a CLIP encoder layer or T5 block, under `text_model.` where a CLIP has a projection (text._layers)
_LAYER_KEY = re.compile(r"(?:^|\.)encoder\.(?:layers|block)\.(\d+)\.")


def _text_size(folder: Path) -> TextSize:
    layers, own = collections.Counter(), 0
    for key, n in _stored(folder):
        match = _LAYER_KEY.search(key)
        if match:
            layers[match.group(1)] += n
        else:
            own += n
    return TextSize(sum(layers.values()) + own, max(layers.values(), default=0), own)


def _family_of_config(config: dict, source: str) -> str:
    """The family of a bare network config, from its class (an SDXL UNet by its added text-time embedding)."""
    name = config.get("_class_name", "")
    if name == "UNet2DConditionModel":
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
    # PixArt's released configs name the class Transformer2DModel, which diffusers maps to PixArt's for adaLN-single
    if name == "PixArtTransformer2DModel" or (name == "Transformer2DModel"
                                             and config.get("norm_type") == "ada_norm_single"):
        return "pixart"
    if name == "SD3Transformer2DModel":
        return "sd3"
    raise PlanError(f"{source}: a {name or 'config without a _class_name'} network, which the planner cannot "
                    "plan: expected UNet2DConditionModel, PixArtTransformer2DModel or SD3Transformer2DModel")


def _from_pipeline_folder(folder: Path, text_max_length: int = 0) -> tuple[str, dict, int, int]:
    """(family, network config, encoder parameters, prompt tokens) of a diffusers pipeline folder, its prompt
    tokens as the family's PromptEncoder pads them (families.load_encoder)."""
    from bigsid.families import T5_MAX_LENGTH, TeacherError, detect, pipeline_config

    try:
        index = pipeline_config(str(folder))
        family = detect(index, str(folder))
    except TeacherError as err:
        raise PlanError(str(err)) from None
    config = _read_json(folder / family.network / "config.json")
    text = sum((_text_size(folder / sub) for sub in family.encoders), TextSize())
    encoders = text, _safetensors_params(folder / "vae")
    tokenizer = folder / "tokenizer" / "tokenizer_config.json"
    clip = int(_read_json(tokenizer).get("model_max_length", 77)) if family.name != "pixart" else 0
    return family.name, config, encoders, _tokens(clip, T5_MAX_LENGTH.get(index["_class_name"], 0), text_max_length)


def _tokens(clip: int, t5: int, text_max_length: int) -> int:
    return clip + ((text_max_length or t5) if t5 else 0)


def load_model(network: str | None = None, cfg: Config | None = None, resolution: int | None = None) -> ModelSpec:
    """The teacher's denoising network: `network` (a preset, a network config.json, a network or pipeline folder),
    else the config's teacher. `resolution` in pixels (the VAE downsamples by 8); default: the network's own
    sample_size."""
    text_max_length = cfg.teacher.text_max_length if cfg is not None else 0
    if network is not None:
        name, family, config, encoders, tokens = _from_argument(network, text_max_length)
    elif cfg is not None and cfg.teacher.kind == "diffusers":
        name, family, config, encoders, tokens = _from_teacher(cfg.teacher.path, cfg.teacher.revision, text_max_length)
    else:
        raise PlanError("the planner needs a diffusers teacher: set teacher.kind=diffusers and teacher.path, or pass "
                        f"--network {'|'.join(PRESETS)}|PATH_TO_CONFIG_JSON")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise PlanError(f"--resolution {resolution}: expected a multiple of 8 pixels")
    latent = resolution // 8 if resolution is not None else int(config["sample_size"])
    source = network if network is not None else cfg.teacher.path
    text, vae = encoders
    if cfg is not None and cfg.data.text_cache:  # the run reads its prompts' encodings and loads no text encoder
        text = TextSize()
    return ModelSpec(name, family, config, latent, tokens, text.params, vae, _vae_config(source),
                     (text.layer, text.own))


def _vae_config(source: str) -> dict | None:
    """The VAE config of a preset, a known hub id or a pipeline folder; None for a bare network config."""
    preset = PRESETS.get(source) or PRESETS.get(KNOWN_HUB_IDS.get(source, ("",))[0])
    if preset:
        return _read_json(CONFIG_DIR / f"{preset.vae}.json") if preset.vae else None
    folder = Path(source).expanduser() / "vae"
    return _read_json(folder / "config.json") if (folder / "config.json").is_file() else None


def _from_preset(name: str, text_max_length: int) -> tuple[str, dict, int, int]:
    preset = PRESETS[name]
    return (preset.family, _read_json(CONFIG_DIR / f"{name}.json"), (preset.text, preset.vae_params),
            _tokens(preset.clip_tokens, preset.t5_tokens, text_max_length))


def _bare(path: Path, text_max_length: int) -> tuple[str, str, dict, int, int]:
    """A network config.json alone: no encoders to count, the family's default prompt length."""
    config = _read_json(path)
    family = _family_of_config(config, str(path))
    name = path.parent.name if path.name == "config.json" else path.name
    return name, family, config, (TextSize(), 0), _tokens(*DEFAULT_TOKENS[family], text_max_length)


def _from_argument(network: str, text_max_length: int) -> tuple[str, str, dict, int, int]:
    if network in PRESETS:
        return (network, *_from_preset(network, text_max_length))
    path = Path(network).expanduser()
    if path.is_file():
        return _bare(path, text_max_length)
    if (path / "model_index.json").is_file():
        return (path.name, *_from_pipeline_folder(path, text_max_length))
    if (path / "config.json").is_file():
        return _bare(path / "config.json", text_max_length)
    raise PlanError(f"--network {network!r}: expected one of {', '.join(PRESETS)}, a network config.json (a UNet, "
                    "PixArt or SD3 transformer), or a folder holding one (the network's folder or a diffusers "
                    "pipeline folder)")


def _from_teacher(path: str, revision: str, text_max_length: int) -> tuple[str, str, dict, int, int]:
    folder = Path(path).expanduser()
    if folder.is_dir():
        return (folder.name, *_from_pipeline_folder(folder, text_max_length))
    if path in KNOWN_HUB_IDS:
        preset, latent = KNOWN_HUB_IDS[path]
        family, config, encoders, tokens = _from_preset(preset, text_max_length)
        return f"{preset} ({path})", family, {**config, "sample_size": latent}, encoders, tokens
    import diffusers

    from bigsid.families import detect, pipeline_config

    try:  # from the local hub cache when offline
        family = detect(pipeline_config(path, revision), path)
        network_class = getattr(diffusers, family.network_class)
        config = dict(network_class.load_config(path, subfolder=family.network, revision=revision or None))
    except (OSError, ValueError):
        raise PlanError(f"cannot read the network config of teacher.path={path!r} from here; pass --network "
                        f"{'|'.join(PRESETS)} or --network PATH_TO_CONFIG_JSON") from None
    return path, family.name, config, (TextSize(), 0), _tokens(*DEFAULT_TOKENS[family.name], text_max_length)


# ---- measuring a call ----

class LiveMemory(TorchDispatchMode):
    """Bytes of the tensor storages created while this mode is active and still alive, by category, with peaks.

    Storages that existed before (parameters, optimizer states, inputs) are never counted: an op's output counts
    only if its storage is not one of the op's inputs' (in-place ops and views alias them). Views share a storage,
    which counts once and leaves the count when it is freed. Works on real tensors and on the meta device."""

    def __init__(self):
        super().__init__()
        self.now: collections.Counter = collections.Counter()
        self.peak = 0  # all categories together
        self.peak_activations = 0
        self.peak_copies = 0  # weight_copies alone
        self.category = "activations"
        self.timeline: list[tuple[int, int]] | None = None  # (activations, grads) after each op, once started
        self._live: dict[int, tuple[str, int, weakref.ref]] = {}

    def _freed(self, key: int) -> None:
        category, nbytes, _ = self._live.pop(key)
        self.now[category] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._live:
                continue
            self._live[key] = (self.category, storage.nbytes(), weakref.ref(storage, lambda _, k=key: self._freed(k)))
            self.now[self.category] += storage.nbytes()
        self.peak = max(self.peak, sum(self.now.values()))
        self.peak_activations = max(self.peak_activations, self.now["activations"])
        self.peak_copies = max(self.peak_copies, self.now["weight_copies"])
        if self.timeline is not None:
            self.timeline.append((self.now["activations"], self.now["grads"]))
        return out

    @contextlib.contextmanager
    def counting_as(self, category: str):
        previous, self.category = self.category, category
        try:
            yield
        finally:
            self.category = previous

    def reclassify(self, tensor: torch.Tensor, category: str) -> None:
        key = id(tensor.untyped_storage())
        if key in self._live:
            old, nbytes, ref = self._live[key]
            self._live[key] = (category, nbytes, ref)
            self.now[old] -= nbytes
            self.now[category] += nbytes


# torch.autocast's CUDA policy for the functions a diffusers UNet calls: matmuls and convolutions in bf16, norms and
# softmax in fp32, everything else in its inputs' dtype. CPU autocast keeps norms in bf16.
_LOWER = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.mm, torch.bmm,
          torch.baddbmm, torch.addmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm,
          F.scaled_dot_product_attention}
_FP32 = {"cuda": {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax},
         "cpu": set()}


class _Autocast(TorchFunctionMode):
    """torch.autocast(bf16) reproduced above autograd, for tensors (meta ones) that real autocast does not touch.

    As autocast, it caches the casts of leaf tensors that require grad (the trained networks' weights) and casts
    frozen weights at every call. Attention runs as a fused kernel (flash: q, k, v, out and logsumexp kept for the
    backward; with PixArt's T5 padding mask, CUDA's memory-efficient kernel, which keeps the same), as on a GPU, not
    as the meta device's unfused matmuls. `bf16=False` keeps only the attention part."""

    def __init__(self, tracker: LiveMemory, bf16: bool, device_type: str = "cuda"):
        super().__init__()
        self.tracker = tracker
        self.dtype = torch.bfloat16 if bf16 else None
        self.fp32_ops = _FP32[device_type] if bf16 else set()
        self.cache: dict[int, torch.Tensor] = {}

    def _cast(self, x, dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if isinstance(x, torch.nn.Parameter):
            with self.tracker.counting_as("weight_copies"):
                if x.requires_grad and dtype != torch.float32:
                    if id(x) not in self.cache:
                        self.cache[id(x)] = x.to(dtype)
                    return self.cache[id(x)]
                return x.to(dtype)
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER and self.dtype is not None:
            args, kwargs = tree_map(lambda x: self._cast(x, self.dtype), (args, kwargs))
        elif func in self.fp32_ops:
            args, kwargs = tree_map(lambda x: self._cast(x, torch.float32), (args, kwargs))
        if func is F.scaled_dot_product_attention and len(args) == 3:
            q, k, v = args
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
                attn_mask=kwargs.get("attn_mask"), scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)

    def checkpoint(self, module, *args):
        """diffusers' gradient-checkpointing function, re-entering this mode for the recomputation (real autocast
        is restored by torch.utils.checkpoint itself; a function mode is not)."""
        def run(*a):
            if self in torch.overrides._get_current_function_mode_stack():
                return module(*a)
            with self:  # a recomputation outside autocast: it caches for its own region only, as autocast does
                try:
                    return module(*a)
                finally:
                    self.cache.clear()

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


@dataclass(frozen=True)
class CallMemory:
    """One network call at batch 1: activations kept from its forward for its backward, the transient above them
    (recomputation, activation gradients; parameter gradients excluded), and the batch-independent bf16 weight
    copies autocast holds (local/ddp): with its cache, and once its region exits (the fake score's backward runs
    outside it) those the graph still holds. For a trained call, `backward` follows its backward op by op as
    (activations, fraction of the parameter gradients accumulated): activations are freed as gradients grow, so
    the two never peak together. Only the points no other point exceeds in both are kept. `recast`: the casts a
    checkpointed backward's recomputation makes again, its region closed (batch-independent; the planner adds their
    peak to the activations' though the two need not coincide); a frozen network's casts are never cached."""

    kept: int
    transient: int
    weight_copies: int
    graph_copies: int
    backward: tuple[tuple[int, float], ...] = ()
    recast: int = 0


def denoiser_inputs(denoiser: torch.nn.Module, batch: int, latent: int, tokens: int,
                    device="meta") -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """(x_t, t, cond) of one call of a family's denoiser: the Cond fields its network takes (bigsid.text), at
    `tokens` prompt tokens: SDXL's pooled embedding and size ids, PixArt's T5 mask and its resolution and aspect
    conditioning where the network takes them, SD3's pooled CLIP embeddings."""
    c = denoiser.network.config
    x = torch.randn(batch, c.in_channels, latent, latent, device=device)
    t = torch.full((batch,), 500.0, device=device)
    if c._class_name == "UNet2DConditionModel":
        cond = Cond(torch.randn(batch, tokens, c.cross_attention_dim, device=device))
        if c.addition_embed_type == "text_time":
            time_ids = 6  # original size, crop offset, target size
            pooled = c.projection_class_embeddings_input_dim - time_ids * c.addition_time_embed_dim
            cond.pooled = torch.randn(batch, pooled, device=device)
            cond.size = torch.randn(batch, time_ids, device=device)
    elif c._class_name == "SD3Transformer2DModel":
        cond = Cond(torch.randn(batch, tokens, c.joint_attention_dim, device=device),
                    pooled=torch.randn(batch, c.pooled_projection_dim, device=device))
    else:  # PixArt: a tokenizer's integer mask; (height, width, aspect ratio)
        cond = Cond(torch.randn(batch, tokens, c.caption_channels, device=device),
                    mask=torch.ones(batch, tokens, dtype=torch.long, device=device))
        if denoiser.network.use_additional_conditions:
            cond.size = torch.randn(batch, 3, device=device)
    return x, t, cond


@functools.lru_cache(maxsize=64)
def measure_call(family: str, config_json: str, latent: int, tokens: int, kind: str, checkpointing: bool,
                 bf16: bool, device_type: str = "cuda") -> CallMemory:
    """Measure one call of a family's denoiser on the meta device (see CallMemory); `kind` is how the phase calls
    it: trained (parameter gradients), input_grad (frozen, gradients to its input) or no_grad."""
    from bigsid.families import FAMILIES

    with torch.device("meta"):  # a fresh network: checkpointing and requires_grad are set on it
        denoiser = FAMILIES[family].denoiser(_network(family, json.loads(config_json)), "epsilon")
    tracker = LiveMemory()
    casts = _Autocast(tracker, bf16, device_type)
    if checkpointing:
        denoiser.network.enable_gradient_checkpointing(casts.checkpoint)
    denoiser.requires_grad_(kind != "input_grad")  # no_grad: the generator's weights, which autocast caches
    for p in denoiser.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: tracker.reclassify(p.grad, "grads"))
    x, t, cond = denoiser_inputs(denoiser, 1, latent, tokens)
    x.requires_grad_(kind == "input_grad")
    try:
        with torch.set_grad_enabled(kind != "no_grad"), tracker, casts:
            out = denoiser(x, t, cond)
            kept, copies = tracker.now["activations"], tracker.now["weight_copies"]
            casts.cache.clear()  # as autocast's region exiting: what the graph saved stays
            graph_copies = tracker.now["weight_copies"]
            tracker.timeline = [(kept, 0)]
            tracker.peak_copies = graph_copies
            if kind != "no_grad":
                out.backward(torch.ones_like(out))
    except (RuntimeError, NotImplementedError) as err:
        raise PlanError(f"cannot run this {family} network config on the meta device to measure its activations: "
                        f"{err}") from None
    curve = []
    if kind == "trained":
        all_grads = 4 * sum(p.numel() for p in denoiser.parameters())
        for activations, grads in sorted(tracker.timeline, key=lambda ag: (-ag[0], -ag[1])):
            if not curve or grads > curve[-1][1] * all_grads:
                curve.append((activations, grads / all_grads))
    return CallMemory(kept, tracker.peak_activations - kept, copies, graph_copies, tuple(curve),
                      tracker.peak_copies - graph_copies)


@functools.lru_cache(maxsize=64)
def call_flops(family: str, config_json: str, latent: int, tokens: int, kind: str) -> int:
    """Model FLOPs of one call at batch 1, forward and (unless no_grad) backward, without recomputation: counted
    on the meta device with unfused attention, whose matmuls are the model's attention FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from bigsid.families import FAMILIES

    with torch.device("meta"):
        denoiser = FAMILIES[family].denoiser(_network(family, json.loads(config_json)), "epsilon")
    denoiser.requires_grad_(kind == "trained")
    x, t, cond = denoiser_inputs(denoiser, 1, latent, tokens)
    x.requires_grad_(kind == "input_grad")
    counter = FlopCounterMode(display=False)
    with torch.set_grad_enabled(kind != "no_grad"), counter:
        out = denoiser(x, t, cond)
        if kind != "no_grad":
            out.backward(torch.ones_like(out))
    return counter.get_total_flops()


@functools.lru_cache(maxsize=16)
def decode_bytes(vae_json: str, latent: int, batch: int, bf16: bool, device_type: str = "cuda") -> int:
    """Peak bytes of one VAE decode of `batch` latents (no grad), measured on the meta device: every activation and,
    in bf16, autocast's casts of the VAE's fp32 weights, which a no-grad call frees op by op."""
    from diffusers import AutoencoderKL

    config = json.loads(vae_json)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    tracker = LiveMemory()
    z = torch.randn(batch, config["latent_channels"], latent, latent, device="meta")
    with torch.no_grad(), tracker, _Autocast(tracker, bf16, device_type):
        vae.decode(z)
    return tracker.peak


# ---- a step's calls ----

@dataclass(frozen=True)
class Call:
    network: str  # teacher | generator | fake_score
    kind: str  # trained | input_grad | no_grad
    batch: int  # multiple of the per-GPU batch: 2 when guided


def step_calls(cfg: Config) -> dict[str, list[Call]]:
    """The UNet calls of one training step, per phase, in the order they run (trainer.py, objectives/)."""
    o = cfg.objective
    guided = {k: 2 if getattr(o, k) != 1.0 else 1 for k in ("kappa1", "kappa2", "kappa3", "kappa4")}
    fake = [Call("generator", "no_grad", 1), Call("fake_score", "trained", guided["kappa1"])]
    frozen = "no_grad" if o.name == "dmd" else "input_grad"  # DMD's scores carry no graph
    gen = [Call("generator", "trained", 1), Call("teacher", frozen, guided["kappa4"]),
           Call("fake_score", frozen, guided["kappa2"])]
    if o.kappa3 != o.kappa2:  # Objective.scores: a second fake-score call
        gen.append(Call("fake_score", frozen, guided["kappa3"]))
    return {"fake_score": fake, "generator": gen}


def iteration_flops(model: ModelSpec, cfg: Config, batch: int) -> int:
    """Model FLOPs of one training step at per-GPU batch `batch` (both phases, fake_steps fake-score phases)."""
    calls = step_calls(cfg)
    flops = functools.partial(call_flops, model.family, model.config_json, model.latent_size, model.text_tokens)
    per = {phase: sum(flops(c.kind) * c.batch for c in cs) for phase, cs in calls.items()}
    return batch * (cfg.train.fake_steps * per["fake_score"] + per["generator"])


# ---- per-GPU bytes ----

@dataclass(frozen=True)
class Backend:
    name: str  # local | ddp | fsdp2 | zero2 | zero3
    gpus: int
    shard: int  # ranks the states are sharded over (1: replicated)

    @property
    def label(self) -> str:
        if self.name == "fsdp2" and self.shard < self.gpus:
            return f"fsdp2 hybrid {self.shard}"
        return self.name


CATEGORIES = ("teacher", "weights", "optimizer", "ema", "encoders", "ddp_buckets", "grads", "weight_copies",
              "gathered", "temporaries", "activations", "sampling")
RESIDENT = CATEGORIES[:6]  # held from one step to the next


def state_bytes(backend: Backend, model: ModelSpec, bf16: bool, foreach_adam: bool = True,
                fake_adapter: int | None = None, shard_text: bool = False) -> dict[str, float]:
    """Bytes per GPU held all run long, and those of the phases' grads and optimizer temporaries (see module doc).
    `fake_adapter`: the parameters of the fake score's LoRA adapter when it is one (fake_score.lora_rank).
    `shard_text`: text_encoder.shard, which fsdp2 alone honours (the config refuses it elsewhere).

    DeepSpeed: fp32 weights and EMA, whole for ZeRO-2 (plus a partitioned fp32 copy the optimizer steps) and
    partitioned for ZeRO-3 (the teacher too, the optimizer stepping the partitions in place); gradients and Adam
    partitioned."""
    p, s, n = model.params, backend.shard, backend.gpus
    # A LoRA fake score trains its adapter alone, on the teacher's network, which then stays in fp32
    # (models.build_networks): fp32 master weights and Adam states for the generator and the adapter only.
    trained = p + (p if fake_adapter is None else fake_adapter)
    c = 2 if bf16 and fake_adapter is None else 4
    c_text = 2 if bf16 else 4
    out = dict.fromkeys(CATEGORIES, 0.0)
    text_shards = s if shard_text and backend.name == "fsdp2" else 1
    out["encoders"] = c_text * model.text_params / text_shards + 4 * model.vae_params
    buffers = model.buffers * (c + 4 * (2 if fake_adapter is None else 1))  # teacher, generator (, fake score)
    if backend.name in ("local", "ddp", "fsdp2"):
        out |= {"teacher": c * p / s + buffers, "weights": 4 * trained / s, "optimizer": 8 * trained / s,
                "ema": 4 * p / s, "grads": 4 * p / s}
        if backend.name == "ddp":
            out["ddp_buckets"] = 4 * trained
    else:
        working = 1 if backend.name == "zero2" else n
        # ZeRO-2 steps a partitioned fp32 copy beside the whole weights; ZeRO-3 steps the fp32 partitions in place
        master = 4 * trained / n if backend.name == "zero2" else 0.0
        out |= {"teacher": c * p / working + buffers, "weights": 4 * trained / working + master,
                "optimizer": 8 * trained / n, "ema": 4 * p / working, "grads": 4 * p / n}
    out["temporaries"] = 4 * p / (s if backend.name in ("local", "ddp", "fsdp2") else n) if foreach_adam else 0.0
    return out


def gathered_bytes(backend: Backend, model: ModelSpec, bf16: bool, trained: bool) -> float:
    """Unsharded parameters (and a trained unit's gradients) in flight on a sharded backend."""
    if backend.name not in ("fsdp2", "zero3") or backend.shard == 1:
        return 0.0
    c = 2 if bf16 and backend.name == "fsdp2" else 4  # ZeRO-3 gathers the fp32 weights
    _, units, root = model.counts
    l1, l2 = units[0], units[1] if len(units) > 1 else 0
    return c * (2 * l1 + l2 + 3 * root) + ((c + 4) * l1 if trained else 0)


@dataclass
class PeakTerm:
    """A moment of a step whose bytes may be the peak: fixed bytes by category plus activations per sample; or,
    for a trained network's backward, the peak along its measured (activations, gradients) curve."""

    phase: str
    fixed: dict[str, float]
    per_sample: float = 0.0
    backward: tuple[tuple[float, float], ...] = ()  # (activations per sample, fraction of `grads`)
    grads: float = 0.0

    def at(self, batch: int) -> dict[str, float]:
        if not self.backward:
            return {**self.fixed, "activations": self.per_sample * batch}
        activations, fraction = max(self.backward, key=lambda af: af[0] * batch + af[1] * self.grads)
        return {**self.fixed, "activations": activations * batch, "grads": fraction * self.grads}

    def total(self, batch: int) -> float:
        return sum(self.at(batch).values())


def peak_terms(model: ModelSpec, cfg: Config, backend: Backend, checkpointing: tuple[str, ...],
               device_type: str = "cuda") -> list[PeakTerm]:
    """The moments of a step that can be its peak (module doc), for one backend and the networks whose
    activations are checkpointed (train.activation_checkpointing)."""
    bf16 = cfg.train.precision == "bf16"
    lora = bool(cfg.fake_score.lora_rank)
    adapter = model.adapter_params(cfg.fake_score.lora_rank, cfg.fake_score.lora_target_modules) if lora else None
    shard_text = cfg.text_encoder.shard and backend.name == "fsdp2" and backend.shard > 1
    state = state_bytes(backend, model, bf16, foreach_adam=device_type == "cuda", fake_adapter=adapter,
                        shard_text=shard_text)
    held = {k: state[k] for k in RESIDENT}
    grads, temporaries = state["grads"], state["temporaries"]
    # fsdp2 computes with bf16 weights and ZeRO-3 casts units it frees again: no autocast copies of whole weights.
    copies_apply = bf16 and backend.name in ("local", "ddp", "zero2")

    def adapter_call(call: Call) -> bool:
        return lora and call.kind == "trained" and call.network == "fake_score"

    def memory(call: Call) -> CallMemory:
        # a LoRA fake score trains its adapter through the frozen network: its backward reaches every input, as a
        # frozen call's, and no base weight gets a gradient (the adapter's rank-r activations are not counted)
        kind = "input_grad" if adapter_call(call) else call.kind
        return measure_call(model.family, model.config_json, model.latent_size, model.text_tokens, kind,
                            call.network in checkpointing and call.kind != "no_grad", bf16, device_type)

    def copies(call: Call, autocast_open: bool) -> float:
        # Autocast's cache keeps the casts of weights that require grad (the generator's even in its no-grad call),
        # the graph those an input-gradient backward needs; a frozen no-grad call's casts die with each op. The
        # teacher is stored in bf16 and cast by none, unless it is a LoRA fake score's fp32 network.
        held_copies = ((call.network != "teacher" or lora)
                       and (call.kind != "no_grad" or call.network == "generator"))
        if not (copies_apply and held_copies):
            return 0.0
        return memory(call).weight_copies if autocast_open else memory(call).graph_copies

    def recast(calls: list[Call]) -> float:
        """The most that one of `calls`' backward recomputations casts again (CallMemory.recast)."""
        cast = [c for c in calls if c.kind != "no_grad" and (c.network != "teacher" or lora)]
        return max((memory(c).recast for c in cast), default=0) if copies_apply else 0.0

    def fixed(calls: list[Call], trained: bool, autocast_open: bool = True) -> dict[str, float]:
        return {**held, "weight_copies": sum(copies(c, autocast_open) for c in calls),
                "gathered": gathered_bytes(backend, model, bf16, trained)}

    def kept(calls: list[Call]) -> float:
        return sum(memory(c).kept * c.batch for c in calls if c.kind != "no_grad")

    def transient(calls: list[Call]) -> float:
        return max(memory(c).transient * c.batch for c in calls)

    def backward(phase: str, call: Call, autocast_open: bool) -> PeakTerm:
        if adapter_call(call):  # no network gradients grow as its activations are freed: its peak is theirs
            m = memory(call)
            return PeakTerm(phase, recasting(fixed([call], False, autocast_open), [call]),
                            (m.kept + m.transient) * call.batch)
        curve = tuple((a * call.batch, f) for a, f in memory(call).backward)
        # with autocast's region still open, a trained network's recomputation finds its casts in autocast's cache
        again = [] if autocast_open else [call]
        return PeakTerm(phase, recasting(fixed([call], True, autocast_open), again), backward=curve, grads=grads)

    def recasting(fixed_bytes: dict[str, float], calls: list[Call]) -> dict[str, float]:
        return {**fixed_bytes, "weight_copies": fixed_bytes["weight_copies"] + recast(calls)}

    def with_frozen_gathered(fixed_bytes: dict[str, float]) -> dict[str, float]:
        # fsdp2 with parallel.gather_frozen_once: the frozen networks stay whole (compute dtype) from their forward
        # to the backward through their input; without a graph (DMD) each is resharded as its call returns
        if backend.name != "fsdp2" or backend.shard == 1 or not cfg.parallel.gather_frozen_once:
            return fixed_bytes
        whole = (2 if bf16 else 4) * model.params * (1 - 1 / backend.shard)
        # teacher and fake score; one network when the fake score is the teacher's with an adapter
        networks = 1 if cfg.objective.name == "dmd" or lora else 2
        return {**fixed_bytes, "gathered": fixed_bytes["gathered"] + networks * whole}

    phases = step_calls(cfg)
    g_fake, f_trained = phases["fake_score"]
    gen = phases["generator"]
    g_trained, frozen = gen[0], gen[1:]
    layer, own = model.text_units
    # text_encoder.shard: the prompts are encoded before either phase, with no denoiser unit gathered (module doc)
    encoding = [PeakTerm("text_encoding", {**held, "gathered": (2 if bf16 else 4) * (own + 2 * layer)})] \
        if shard_text else []
    return encoding + sampling_terms(model, cfg, backend, state, device_type) + [
        # the generator's no-grad forward: its output is all it leaves behind
        PeakTerm("fake_score", fixed([g_fake], False), transient([g_fake])),
        # the fake score's forward done, autocast still caching the generator's weight copies
        PeakTerm("fake_score", fixed([g_fake, f_trained], False), kept([f_trained])),
        backward("fake_score", f_trained, autocast_open=False),  # trainer.py: backward after autocast
        # all three networks' activations kept as the generator loss's backward starts with the frozen networks
        PeakTerm("generator", with_frozen_gathered(recasting(fixed(gen, False), frozen)),
                 kept(gen) + transient(frozen)),
        backward("generator", g_trained, autocast_open=True),
        PeakTerm("optimizer", {**held, "grads": grads, "temporaries": temporaries}),
    ]


def sampling_terms(model: ModelSpec, cfg: Config, backend: Backend, state: dict[str, float],
                   device_type: str) -> list[PeakTerm]:
    """The two moments of a sample grid (module doc): the EMA generator's no-grad forward on every rank, with the
    raw weights backed up, then rank 0's VAE decode. A diffusers run without eval.sample_prompts makes no grid."""
    images = len(cfg.eval.sample_prompts) * cfg.eval.sample_seeds
    if not images:
        return []
    bf16 = cfg.train.precision == "bf16"
    held = {k: state[k] for k in RESIDENT}
    forward = measure_call(model.family, model.config_json, model.latent_size, model.text_tokens, "no_grad", False,
                           bf16 and backend.name == "fsdp2", device_type)
    latents = 4 * images * model.network_config["in_channels"] * model.latent_size ** 2
    terms = [PeakTerm("samples", {**held, "gathered": gathered_bytes(backend, model, bf16, False),
                                  "sampling": state["ema"] + (forward.kept + forward.transient) * images + latents})]
    if model.vae_config is not None:
        # SD's VAE decoder overflows fp16 (activations past 65504) but not bf16, whose range is fp32's
        decode = decode_bytes(json.dumps(model.vae_config, sort_keys=True), model.latent_size,
                              min(DECODE_CHUNK, images), bf16, device_type)
        terms.append(PeakTerm("samples", {**held, "sampling": latents + decode}))
    return terms


@dataclass
class Estimate:
    """One row of the plan: a backend and checkpointing setting at a per-GPU batch."""

    backend: str
    checkpointing: str  # the networks whose activations are recomputed
    batch: int  # per GPU
    phase: str  # the phase whose peak is the run's
    bytes: dict[str, float]  # per category at that peak
    allocated: float  # comparable to torch.cuda.max_memory_allocated
    needed: float  # allocated plus fragmentation and the CUDA context
    fits: bool
    max_batch: int  # the largest per-GPU batch that fits (0: none)


def needed_bytes(allocated: float) -> float:
    return allocated * (1 + FRAGMENTATION) + CONTEXT_BYTES


def largest_batch(fits) -> int:
    """The largest batch b with fits(b), for a test that holds up to some b and fails beyond (0: none fits)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2 ** 20:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate(model: ModelSpec, cfg: Config, backend: Backend, checkpointing: tuple[str, ...], batch: int,
             gpu_mem_gib: float, device_type: str = "cuda") -> Estimate:
    terms = peak_terms(model, cfg, backend, checkpointing, device_type)

    def allocated(b: int) -> float:
        return max(t.total(b) for t in terms)

    top = max(terms, key=lambda t: t.total(batch))
    fits = lambda b: needed_bytes(allocated(b)) <= gpu_mem_gib * GiB  # noqa: E731
    return Estimate(backend.label, checkpoint_label(checkpointing), batch, top.phase, top.at(batch),
                    allocated(batch), needed_bytes(allocated(batch)), fits(batch), largest_batch(fits))


def backends_for(gpus: int, shard_size: int = 0) -> list[Backend]:
    """Every backend that can run on `gpus` GPUs; fsdp2 hybrid too when 1 < shard_size < gpus divides them."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: expected at least 1")
    if gpus == 1:
        return [Backend("local", 1, 1)]
    rows = [Backend("ddp", gpus, 1), Backend("fsdp2", gpus, gpus)]
    if 1 < shard_size < gpus:
        if gpus % shard_size:
            raise PlanError(f"--shard-size {shard_size} does not divide --gpus {gpus}")
        rows.append(Backend("fsdp2", gpus, shard_size))
    return rows + [Backend("zero2", gpus, gpus), Backend("zero3", gpus, gpus)]


def checkpoint_label(networks: tuple[str, ...]) -> str:
    return "none" if not networks else "all" if set(networks) == set(NETWORKS) else "+".join(networks)


def checkpoint_settings(cfg: Config) -> list[tuple[str, ...]]:
    """None, all three networks, and the config's own train.activation_checkpointing if it is neither."""
    own = tuple(n for n in NETWORKS if n in cfg.train.activation_checkpointing)
    return [(), NETWORKS] + ([own] if own not in ((), NETWORKS) else [])


def plan(model: ModelSpec, cfg: Config, gpus: int, gpu_mem_gib: float = 80.0, shard_size: int | None = None,
         batch: int | None = None, device_type: str = "cuda") -> list[Estimate]:
    """Estimates for every backend x activation-checkpointing setting at per-GPU batch `batch` (default: the
    config's train.batch_size over the GPUs, rounded up)."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: expected at least 1")
    if gpu_mem_gib <= 0:
        raise PlanError(f"--gpu-mem {gpu_mem_gib}: expected a positive size in GiB")
    if batch is None:
        batch = math.ceil(cfg.train.batch_size / gpus)
    if batch < 1:
        raise PlanError(f"--batch {batch}: expected at least 1")
    shard = cfg.parallel.shard_size if shard_size is None else shard_size
    return [estimate(model, cfg, b, ckpt, batch, gpu_mem_gib, device_type)
            for b in backends_for(gpus, shard) for ckpt in checkpoint_settings(cfg)]


def format_plan(model: ModelSpec, cfg: Config, gpus: int, gpu_mem_gib: float, rows: list[Estimate]) -> str:
    o, tr = cfg.objective, cfg.train
    sharded = " (sharded on fsdp2: text_encoder.shard)" if cfg.text_encoder.shard else ""
    if cfg.data.text_cache:
        sharded = " (none loaded: data.text_cache)"
    encoders = (f"text encoders {model.text_params / 1e6:,.1f}M{sharded} + VAE {model.vae_params / 1e6:,.1f}M"
                if model.text_params or model.vae_params
                else "text encoders and VAE not counted (unknown for a bare network config)")
    own = checkpoint_label(tuple(n for n in NETWORKS if n in tr.activation_checkpointing))
    copies = ("x2 (teacher, generator; fake_score a LoRA adapter of rank "
              f"{cfg.fake_score.lora_rank} on the teacher's)" if cfg.fake_score.lora_rank
              else "x3 (teacher, generator, fake_score)")
    network = meta_denoiser(model.family, model.config_json).network
    lines = [
        f"model   {model.name} ({model.family}): {type(network).__name__} {model.params / 1e6:,.1f}M parameters "
        f"{copies}; "
        f"{encoders}; {model.latent_size * 8} px (latent {model.latent_size}x{model.latent_size}), "
        f"{model.text_tokens} prompt tokens",
        f"run     {o.name}, kappa1..4 {o.kappa1}/{o.kappa2}/{o.kappa3}/{o.kappa4} (a guided call runs at twice the "
        f"batch), {tr.precision}, fake_steps {tr.fake_steps}, per-GPU batch {rows[0].batch} (train.batch_size "
        f"{tr.batch_size} over {gpus} GPUs)" + (", the generator's LoRA planned as full training (an upper bound)"
                                                   if cfg.generator.lora_rank else ""),
        f"config  parallel.backend {cfg.parallel.backend}, train.activation_checkpointing {own}",
        f"GPUs    {gpus} x {gpu_mem_gib:g} GiB",
        "",
        "GiB per GPU at the step's peak (phase). allocated: comparable to torch.cuda.max_memory_allocated; needed: "
        "+5% allocator fragmentation + 2 GiB CUDA context, NCCL and workspaces. ckpt: the networks whose activations "
        "are recomputed. zero2/zero3: DeepSpeed ZeRO. Model of memory: bigsid/plan.py.",
        "",
    ]
    head = ["backend", "ckpt", "phase", *CATEGORIES, "allocated", "needed", "fits", "max batch"]
    short = {"weight_copies": "copies", "ddp_buckets": "buckets", "temporaries": "temps", "activations": "activ",
             "optimizer": "optim"}
    table = [[short.get(h, h) for h in head]]
    for r in rows:
        table.append([r.backend, r.checkpointing, r.phase, *(f"{r.bytes.get(k, 0) / GiB:.1f}" for k in CATEGORIES),
                      f"{r.allocated / GiB:.1f}", f"{r.needed / GiB:.1f}", "yes" if r.fits else "NO",
                      str(r.max_batch)])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

