"""Memory planner: bytes per GPU of a distillation run for each backend, and the largest per-GPU batch that fits.

`bigsid plan CONFIG --gpus N [--gpu-mem GiB]`. P is the parameter count of one UNet (counted on the meta device,
free), S the ranks a network is sharded over (1 for local and ddp), N the GPUs, c the bytes of the compute dtype
(2 for bf16, 4 for fp32), b the per-GPU batch. What each GPU holds:

  teacher        cP/S   frozen, stored in the compute dtype (models.build_networks)
  weights        8P/S   generator and fake_score fp32 master weights
  optimizer     16P/S   Adam exp_avg and exp_avg_sq of both networks
  EMA            4P/S   the generator's
  encoders       4E     text encoder(s) and VAE (E parameters), fp32, never sharded
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
  activations    -      measured per sample (below), times each call's batch
  sampling       -      sample grids (trainer.save_samples, at train.sample_every and at the end; eval.sample_prompts x
                        eval.sample_seeds images): every rank runs the EMA generator without grad (its stored weights
                        backed up, 4P/S, and its forward in the training compute dtype on fsdp2, fp32 elsewhere); then
                        rank 0 alone decodes the latents with the VAE DECODE_CHUNK at a time, in bf16 under
                        train.precision=bf16, its peak measured on the meta device as the UNets' are
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

Activations are measured, not modelled: one forward and backward of the real-size UNet on the meta device (no
memory, no compute) at the run's latent size and batch 1, following every tensor storage from allocation to
release (LiveMemory), with CUDA's bf16 autocast policy and fused attention reproduced on meta tensors (_Autocast).
Activations are linear in the batch; tests check the meta measurement against real CPU runs. Not counted: the
objective's latent-size tensors (a few per sample), training-time image evaluation (--eval: its batches are the
evaluation's own), LoRA (planned as full training, an upper bound), the whole copies ZeRO-3 keeps of parameters under
DeepSpeed's persistence threshold (1e5 elements: 0.05% of SD1.5's and of SDXL's parameters).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from bigsid.config import Config

GiB = 2 ** 30
CONTEXT_BYTES = 2 * GiB  # CUDA context, NCCL buffers, cuBLAS/cuDNN workspaces: outside torch's allocator
FRAGMENTATION = 0.05  # caching-allocator slack over the bytes actually allocated
CONFIG_DIR = Path(__file__).parent / "unet_configs"
PRESETS = ("sd15", "sd21", "sdxl", "tiny")  # unet_configs/NAME.json: the public UNet configs; tiny: the toy one
# SD 1.x, 2.x and SDXL share one VAE architecture (unet_configs/vae.json; SDXL's differs in its scaling factor only)
VAE_PRESETS = {"sd15": "vae", "sd21": "vae", "sdxl": "vae"}
DECODE_CHUNK = 8  # latents per VAE decode: trainer.to_images' chunk
# Parameters of the frozen networks beside the UNet (CLIP text encoder(s) + VAE) and the prompt length.
_CLIP_L, _OPENCLIP_H, _OPENCLIP_BIGG, _VAE = 123_060_480, 340_387_840, 694_659_840, 83_653_863
PRESET_EXTRAS = {"sd15": (_CLIP_L + _VAE, 77), "sd21": (_OPENCLIP_H + _VAE, 77),
                 "sdxl": (_CLIP_L + _OPENCLIP_BIGG + _VAE, 77), "tiny": (0, 32)}
# Hub ids whose UNet is a preset (and their latent size), so that the shipped configs plan offline.
KNOWN_HUB_IDS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd15", 64),
                 "runwayml/stable-diffusion-v1-5": ("sd15", 64), "CompVis/stable-diffusion-v1-4": ("sd15", 64),
                 "stabilityai/stable-diffusion-2-1-base": ("sd21", 64), "stabilityai/stable-diffusion-2-1": ("sd21", 96),
                 "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", 128)}
NETWORKS = ("generator", "fake_score", "teacher")


class PlanError(ValueError):
    """The planner cannot run as asked; the message says what to change."""


# ---- the model ----

@dataclass
class ModelSpec:
    """What the planner needs to know about the teacher: its UNet config, latent size and frozen companions."""

    name: str
    unet_config: dict
    latent_size: int  # latent height = width
    text_tokens: int
    encoder_params: int  # text encoder(s) + VAE
    vae_config: dict | None = None  # the VAE that decodes sample grids (None: unknown, not counted)

    @property
    def config_json(self) -> str:
        return json.dumps(self.unet_config, sort_keys=True)

    @functools.cached_property
    def counts(self) -> tuple[int, list[int], int]:
        """(UNet parameters, FSDP unit sizes largest first, root parameters outside the units)."""
        from bigsid.families import UNetDenoiser
        from bigsid.parallel import fsdp2

        unet = meta_unet(self.config_json)
        total = sum(p.numel() for p in unet.parameters())
        # units nest (resnets inside blocks): a unit gathers only the parameters no inner unit holds
        seen, units = set(), []
        for block in fsdp2.units(UNetDenoiser(unet, "epsilon")):
            own = [p for p in block.parameters() if id(p) not in seen]
            seen.update(id(p) for p in own)
            units.append(sum(p.numel() for p in own))
        return total, sorted(units, reverse=True), total - sum(units)

    @property
    def params(self) -> int:
        return self.counts[0]


@functools.lru_cache(maxsize=8)
def meta_unet(config_json: str):
    """A UNet2DConditionModel with parameters on the meta device: its structure and sizes cost nothing."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(json.loads(config_json))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PlanError(f"cannot read {path}: {err}") from None


def _safetensors_params(folder: Path) -> int:
    """Parameters stored in a folder's safetensors files, from their headers (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _from_pipeline_folder(folder: Path) -> tuple[dict, int, int]:
    """(UNet config, encoder parameters, prompt tokens) of a diffusers pipeline folder."""
    unet = _read_json(folder / "unet" / "config.json")
    encoders = sum(_safetensors_params(folder / sub) for sub in ("text_encoder", "text_encoder_2", "vae"))
    tokenizer = folder / "tokenizer" / "tokenizer_config.json"
    tokens = _read_json(tokenizer).get("model_max_length", 77) if tokenizer.is_file() else 77
    return unet, encoders, int(tokens)


def load_model(unet: str | None = None, cfg: Config | None = None, resolution: int | None = None) -> ModelSpec:
    """The teacher's UNet: `unet` (a preset, a config.json, a UNet or pipeline folder), else the config's teacher.

    `resolution` in pixels (the VAE downsamples by 8); default: the UNet's own sample_size."""
    if unet is not None:
        name, config, encoders, tokens = _from_argument(unet)
    elif cfg is not None and cfg.teacher.kind == "diffusers":
        name, config, encoders, tokens = _from_teacher(cfg.teacher.path, cfg.teacher.revision)
    else:
        raise PlanError("the planner needs a diffusers UNet: set teacher.kind=diffusers and teacher.path, or pass "
                        f"--unet {'|'.join(PRESETS)}|PATH_TO_CONFIG_JSON")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise PlanError(f"--resolution {resolution}: expected a multiple of 8 pixels")
    latent = resolution // 8 if resolution is not None else int(config["sample_size"])
    source = unet if unet is not None else cfg.teacher.path
    return ModelSpec(name, config, latent, tokens, encoders, _vae_config(source))


def _vae_config(source: str) -> dict | None:
    """The VAE config of a preset, a known hub id or a pipeline folder; None for a bare UNet config."""
    preset = VAE_PRESETS.get(source) or VAE_PRESETS.get(KNOWN_HUB_IDS.get(source, ("",))[0])
    if preset:
        return _read_json(CONFIG_DIR / f"{preset}.json")
    folder = Path(source).expanduser() / "vae"
    return _read_json(folder / "config.json") if (folder / "config.json").is_file() else None


def _from_argument(unet: str) -> tuple[str, dict, int, int]:
    if unet in PRESETS:
        return (unet, _read_json(CONFIG_DIR / f"{unet}.json"), *PRESET_EXTRAS[unet])
    path = Path(unet).expanduser()
    if path.is_file():
        return path.name, _read_json(path), 0, 77
    if (path / "unet" / "config.json").is_file():
        return (path.name, *_from_pipeline_folder(path))
    if (path / "config.json").is_file():
        return path.name, _read_json(path / "config.json"), 0, 77
    raise PlanError(f"--unet {unet!r}: expected one of {', '.join(PRESETS)}, a UNet config.json, or a folder "
                    "holding one (a UNet folder or a diffusers pipeline folder)")


def _from_teacher(path: str, revision: str) -> tuple[str, dict, int, int]:
    folder = Path(path).expanduser()
    if folder.is_dir():
        return (folder.name, *_from_pipeline_folder(folder))
    if path in KNOWN_HUB_IDS:
        preset, latent = KNOWN_HUB_IDS[path]
        config = {**_read_json(CONFIG_DIR / f"{preset}.json"), "sample_size": latent}
        return (f"{preset} ({path})", config, *PRESET_EXTRAS[preset])
    from diffusers import UNet2DConditionModel

    try:  # from the local hub cache when offline
        config = dict(UNet2DConditionModel.load_config(path, subfolder="unet", revision=revision or None))
    except (OSError, ValueError):
        raise PlanError(f"cannot read the UNet config of teacher.path={path!r} from here; pass --unet "
                        f"{'|'.join(PRESETS)} or --unet PATH_TO_CONFIG_JSON") from None
    return path, config, 0, 77


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
    backward), as on a GPU, not as the meta device's unfused matmuls. `bf16=False` keeps only the attention part."""

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
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) == 3:
            q, k, v = args
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False), scale=kwargs.get("scale"))[0]
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
    """One UNet call at batch 1: activations kept from its forward for its backward, the transient above them
    (recomputation, activation gradients; parameter gradients excluded), and the batch-independent bf16 weight
    copies autocast holds (local/ddp): with its cache, and once its region exits (the fake score's backward runs
    outside it) those the graph still holds. For a trained call, `backward` follows its backward op by op as
    (activations, fraction of the parameter gradients accumulated): activations are freed as gradients grow, so
    the two never peak together. Only the points no other point exceeds in both are kept."""

    kept: int
    transient: int
    weight_copies: int
    graph_copies: int
    backward: tuple[tuple[int, float], ...] = ()


def unet_inputs(config: dict, batch: int, latent: int, tokens: int, device="meta") -> tuple[tuple, dict]:
    """Positional and keyword inputs of one UNet call, SDXL's added conditions included."""
    x = torch.randn(batch, config["in_channels"], latent, latent, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    kwargs = {"encoder_hidden_states": torch.randn(batch, tokens, config["cross_attention_dim"], device=device),
              "return_dict": False}
    if config.get("addition_embed_type") == "text_time":
        time_ids = 6  # original size, crop offset, target size
        pooled = config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device),
                                       "time_ids": torch.randn(batch, time_ids, device=device)}
    return (x, t), kwargs


@functools.lru_cache(maxsize=64)
def measure_call(config_json: str, latent: int, tokens: int, kind: str, checkpointing: bool, bf16: bool,
                 device_type: str = "cuda") -> CallMemory:
    """Measure one call of a UNet on the meta device (see CallMemory); `kind` is how the phase calls it:
    trained (parameter gradients), input_grad (frozen, gradients to its input) or no_grad."""
    from diffusers import UNet2DConditionModel

    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    tracker = LiveMemory()
    casts = _Autocast(tracker, bf16, device_type)
    if checkpointing:
        unet.enable_gradient_checkpointing(casts.checkpoint)
    unet.requires_grad_(kind != "input_grad")  # no_grad: the generator's weights, which autocast caches
    for p in unet.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: tracker.reclassify(p.grad, "grads"))
    (x, t), kwargs = unet_inputs(config, 1, latent, tokens)
    x.requires_grad_(kind == "input_grad")
    try:
        with torch.set_grad_enabled(kind != "no_grad"), tracker, casts:
            out = unet(x, t, **kwargs)[0]
            kept, copies = tracker.now["activations"], tracker.now["weight_copies"]
            casts.cache.clear()  # as autocast's region exiting: what the graph saved stays
            graph_copies = tracker.now["weight_copies"]
            tracker.timeline = [(kept, 0)]
            if kind != "no_grad":
                out.backward(torch.ones_like(out))
    except (RuntimeError, NotImplementedError) as err:
        raise PlanError(f"cannot run this UNet config on the meta device to measure its activations: {err}") from None
    curve = []
    if kind == "trained":
        all_grads = 4 * sum(p.numel() for p in unet.parameters())
        for activations, grads in sorted(tracker.timeline, key=lambda ag: (-ag[0], -ag[1])):
            if not curve or grads > curve[-1][1] * all_grads:
                curve.append((activations, grads / all_grads))
    return CallMemory(kept, tracker.peak_activations - kept, copies, graph_copies, tuple(curve))


@functools.lru_cache(maxsize=64)
def call_flops(config_json: str, latent: int, tokens: int, kind: str) -> int:
    """Model FLOPs of one call at batch 1, forward and (unless no_grad) backward, without recomputation: counted
    on the meta device with unfused attention, whose matmuls are the model's attention FLOPs."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(kind == "trained")
    (x, t), kwargs = unet_inputs(config, 1, latent, tokens)
    x.requires_grad_(kind == "input_grad")
    counter = FlopCounterMode(display=False)
    with torch.set_grad_enabled(kind != "no_grad"), counter:
        out = unet(x, t, **kwargs)[0]
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
    per = {phase: sum(call_flops(model.config_json, model.latent_size, model.text_tokens, c.kind) * c.batch
                      for c in cs) for phase, cs in calls.items()}
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


def state_bytes(backend: Backend, model: ModelSpec, bf16: bool, foreach_adam: bool = True) -> dict[str, float]:
    """Bytes per GPU held all run long, and those of the phases' grads and optimizer temporaries (see module doc).

    DeepSpeed: fp32 weights and EMA, whole for ZeRO-2 (plus a partitioned fp32 copy the optimizer steps) and
    partitioned for ZeRO-3 (the teacher too, the optimizer stepping the partitions in place); gradients and Adam
    partitioned."""
    p, s, n = model.params, backend.shard, backend.gpus
    c = 2 if bf16 else 4
    out = dict.fromkeys(CATEGORIES, 0.0)
    out["encoders"] = 4 * model.encoder_params
    if backend.name in ("local", "ddp", "fsdp2"):
        out |= {"teacher": c * p / s, "weights": 8 * p / s, "optimizer": 16 * p / s, "ema": 4 * p / s,
                "grads": 4 * p / s}
        if backend.name == "ddp":
            out["ddp_buckets"] = 8 * p
    else:
        working = 1 if backend.name == "zero2" else n
        # ZeRO-2 steps a partitioned fp32 copy beside the whole weights; ZeRO-3 steps the fp32 partitions in place
        master = 4 * p / n if backend.name == "zero2" else 0.0
        out |= {"teacher": c * p / working, "weights": 2 * (4 * p / working + master), "optimizer": 16 * p / n,
                "ema": 4 * p / working, "grads": 4 * p / n}
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
    state = state_bytes(backend, model, bf16, foreach_adam=device_type == "cuda")
    held = {k: state[k] for k in RESIDENT}
    grads, temporaries = state["grads"], state["temporaries"]
    # fsdp2 computes with bf16 weights and ZeRO-3 casts units it frees again: no autocast copies of whole weights.
    copies_apply = bf16 and backend.name in ("local", "ddp", "zero2")

    def memory(call: Call) -> CallMemory:
        return measure_call(model.config_json, model.latent_size, model.text_tokens, call.kind,
                            call.network in checkpointing and call.kind != "no_grad", bf16, device_type)

    def copies(call: Call, autocast_open: bool) -> float:
        # Autocast's cache keeps the casts of weights that require grad (the generator's even in its no-grad call),
        # the graph those an input-gradient backward needs; a frozen no-grad call's casts die with each op.
        held_copies = call.network != "teacher" and (call.kind != "no_grad" or call.network == "generator")
        if not (copies_apply and held_copies):
            return 0.0
        return memory(call).weight_copies if autocast_open else memory(call).graph_copies

    def fixed(calls: list[Call], trained: bool, autocast_open: bool = True) -> dict[str, float]:
        return {**held, "weight_copies": sum(copies(c, autocast_open) for c in calls),
                "gathered": gathered_bytes(backend, model, bf16, trained)}

    def kept(calls: list[Call]) -> float:
        return sum(memory(c).kept * c.batch for c in calls if c.kind != "no_grad")

    def transient(calls: list[Call]) -> float:
        return max(memory(c).transient * c.batch for c in calls)

    def backward(phase: str, call: Call, autocast_open: bool) -> PeakTerm:
        curve = tuple((a * call.batch, f) for a, f in memory(call).backward)
        return PeakTerm(phase, fixed([call], True, autocast_open), backward=curve, grads=grads)

    def with_frozen_gathered(fixed_bytes: dict[str, float]) -> dict[str, float]:
        # fsdp2 with parallel.gather_frozen_once: the frozen networks stay whole (compute dtype) from their forward
        # to the backward through their input; without a graph (DMD) each is resharded as its call returns
        if backend.name != "fsdp2" or backend.shard == 1 or not cfg.parallel.gather_frozen_once:
            return fixed_bytes
        whole = (2 if bf16 else 4) * model.params * (1 - 1 / backend.shard)
        networks = 1 if cfg.objective.name == "dmd" else 2  # teacher and fake score
        return {**fixed_bytes, "gathered": fixed_bytes["gathered"] + networks * whole}

    phases = step_calls(cfg)
    g_fake, f_trained = phases["fake_score"]
    gen = phases["generator"]
    g_trained, frozen = gen[0], gen[1:]
    return sampling_terms(model, cfg, backend, state, device_type) + [
        # the generator's no-grad forward: its output is all it leaves behind
        PeakTerm("fake_score", fixed([g_fake], False), transient([g_fake])),
        # the fake score's forward done, autocast still caching the generator's weight copies
        PeakTerm("fake_score", fixed([g_fake, f_trained], False), kept([f_trained])),
        backward("fake_score", f_trained, autocast_open=False),  # trainer.py: backward after autocast
        # all three networks' activations kept as the generator loss's backward starts with the frozen networks
        PeakTerm("generator", with_frozen_gathered(fixed(gen, False)), kept(gen) + transient(frozen)),
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
    forward = measure_call(model.config_json, model.latent_size, model.text_tokens, "no_grad", False,
                           bf16 and backend.name == "fsdp2", device_type)
    latents = 4 * images * model.unet_config["in_channels"] * model.latent_size ** 2
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
    encoders = (f"text encoder(s) + VAE {model.encoder_params / 1e6:,.1f}M" if model.encoder_params
                else "text encoder(s) and VAE not counted (unknown for a bare UNet config)")
    own = checkpoint_label(tuple(n for n in NETWORKS if n in tr.activation_checkpointing))
    lines = [
        f"model   {model.name}: UNet {model.params / 1e6:,.1f}M parameters x3 (teacher, generator, fake_score); "
        f"{encoders}; {model.latent_size * 8} px (latent {model.latent_size}x{model.latent_size}), "
        f"{model.text_tokens} prompt tokens",
        f"run     {o.name}, kappa1..4 {o.kappa1}/{o.kappa2}/{o.kappa3}/{o.kappa4} (a guided call runs at twice the "
        f"batch), {tr.precision}, fake_steps {tr.fake_steps}, per-GPU batch {rows[0].batch} (train.batch_size "
        f"{tr.batch_size} over {gpus} GPUs)" + (", LoRA planned as full training (an upper bound)"
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

