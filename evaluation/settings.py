"""What an evaluation runs with: `key=value` arguments of `bigsid eval`, checked as bigsid's own config is.

Every weights file is a key here, so a missing file's message can name the key that points to it; nothing is
downloaded unless allow_download=true (offline clusters are the norm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bigsid.config import ConfigError, _merge, parse_overrides


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the key or file to change."""


@dataclass
class FIDSettings:
    inception: str = ""  # clean-fid's TorchScript Inception, inception-2015-12-05.pt
    reference: str = ""  # real images: a folder, webdataset shards ('{000..009}.tar') or a cached statistics .npz
    # where the reference statistics are cached; default: under $XDG_CACHE_HOME (~/.cache)/bigsid/fid, named by the
    # real images' path, file listing and the convention, so every run that scores against them reuses them
    reference_stats: str = ""
    resolution: int = 256  # long-edge centre crop, then PIL Lanczos to this size, real and generated alike
    kid: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000


@dataclass
class CLIPSettings:
    backend: str = "open_clip"  # open_clip | transformers (weights: a CLIPModel folder)
    model: str = "ViT-g-14"  # transformers with allow_download: a hub id, e.g. laion/CLIP-ViT-g-14-laion2B-s12B-b42K
    pretrained: str = "laion2b_s12b_b42k"
    weights: str = ""  # a local weights file (open_clip) or model folder (transformers)
    prefix: str = "A photo depicts "
    # GigaGAN's CLIP score (which SiD-LSG reports) sees each image centre-cropped and Lanczos-resized to its FID
    # resolution as uint8 before CLIP's own preprocessing; 0: CLIP's preprocessing alone
    resolution: int = 256


@dataclass
class AestheticSettings:
    head: str = ""  # the LAION predictor v2 head, sac+logos+ava1-l14-linearMSE.pth
    backend: str = "open_clip"
    model: str = "ViT-L-14-quickgelu"  # OpenAI's weights were trained with QuickGELU; open_clip's ViT-L-14 is GELU
    pretrained: str = "openai"
    weights: str = ""  # OpenAI CLIP ViT-L/14: an open_clip weights file or a transformers CLIPModel folder


@dataclass
class RewardSettings:
    imagereward: str = ""  # ImageReward-v1.0.pt (and med_config.json beside it)
    pickscore: str = ""  # a transformers folder of yuvalkirstain/PickScore_v1
    pickscore_processor: str = ""  # a transformers folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor
    hpsv2: str = ""  # HPS_v2.1_compressed.pt (an open_clip ViT-H-14 checkpoint)


METRICS = ("toy", "fid", "clip", "aesthetic", "imagereward", "pickscore", "hpsv2")


@dataclass
class EvalSettings:
    name: str = ""  # RUN_DIR/eval/NAME; default: step-N for the generator, teacher-... for the teacher's sampler
    out: str = ""  # the evaluation folder itself, instead of SOURCE/eval/NAME
    # default: toy for runs with an analytic truth, else fid, clip, aesthetic
    metrics: list[str] = field(default_factory=list)
    prompts: str = ""  # a text file (one prompt a line), webdataset shards, or empty: the run's sample prompts
    caption_key: str = "txt"  # shards: the caption member (txt, or json:FIELD)
    num_images: int = 0  # 0: one image per prompt (times images_per_prompt)
    images_per_prompt: int = 1
    seed: int = 0  # image i uses noise seed seed + i, whatever rank, order or subset generates it
    sampler: str = "generator"  # generator | teacher (the teacher's multi-step sampler: the baseline)
    teacher_steps: int = 25
    guidance: float = 7.5
    teacher: str = ""  # the teacher pipeline, if not at the run's teacher.path
    ema: bool = True
    batch_size: int = 16
    device: str = "auto"
    allow_download: bool = False  # let open_clip and friends fetch missing weights from the hub
    fid: FIDSettings = field(default_factory=FIDSettings)
    clip: CLIPSettings = field(default_factory=CLIPSettings)
    aesthetic: AestheticSettings = field(default_factory=AestheticSettings)
    rewards: RewardSettings = field(default_factory=RewardSettings)


def load_settings(overrides: list[str]) -> EvalSettings:
    settings = EvalSettings()
    _merge(settings, parse_overrides(overrides))
    unknown = [m for m in settings.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
    backends = ("open_clip", "transformers")
    # KID needs two features per subset (its unbiased estimate divides by subset_size - 1) and at least one subset;
    # checked here, since KID is computed only after every image is generated
    for key, ok, expected in (("sampler", settings.sampler in ("generator", "teacher"), "generator or teacher"),
                              ("clip.backend", settings.clip.backend in backends, " or ".join(backends)),
                              ("aesthetic.backend", settings.aesthetic.backend in backends, " or ".join(backends)),
                              ("num_images", settings.num_images >= 0, "an integer >= 0"),
                              ("images_per_prompt", settings.images_per_prompt >= 1, "an integer >= 1"),
                              ("teacher_steps", settings.teacher_steps >= 1, "an integer >= 1"),
                              ("batch_size", settings.batch_size >= 1, "an integer >= 1"),
                              ("fid.resolution", settings.fid.resolution >= 1, "a size in pixels, >= 1"),
                              ("fid.kid_subsets", settings.fid.kid_subsets >= 1, "an integer >= 1"),
                              ("fid.kid_subset_size", settings.fid.kid_subset_size >= 2, "an integer >= 2"),
                              ("clip.resolution", settings.clip.resolution >= 0, "a size in pixels, or 0 for none")):
        if not ok:
            raise ConfigError(f"{key}: invalid value {_get(settings, key)!r}; it must be {expected}")
    return settings


def _get(settings, dotted: str):
    for part in dotted.split("."):
        settings = getattr(settings, part)
    return settings


def weights_file(path: str, key: str, what: str, folder: bool = False) -> Path:
    """`path` if it is there; else a message naming the file, what it is and the key that points to it."""
    kind = "folder" if folder else "file"
    if not path:
        raise EvalError(f"{key} is not set: it must point to {what}. Stage the {kind} by hand on offline machines "
                        f"and pass {key}=PATH (nothing is downloaded unless allow_download=true)")
    if not (Path(path).is_dir() if folder else Path(path).is_file()):
        raise EvalError(f"{key}={path}: no such {kind}. It must be {what}; copy it there or point {key} to it")
    return Path(path)
